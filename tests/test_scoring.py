"""Scoring token sequences: padded batches, masked log-probs (vs a naive full-logits reference), scatter,
and micro-batching."""

import itertools
import random

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from thor_min.scoring import micro_batches, pad_batch, scatter_targets, sequence_logprobs

VOCAB = 96



@pytest.fixture(scope="module")
def model():
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).float().eval()


def random_batch(seed=0, lengths=(9, 5, 12), pad_id=0):
    rng = random.Random(seed)
    sequences = [[rng.randrange(1, VOCAB) for _ in range(n)] for n in lengths]
    masks = [[rng.random() < 0.7 for _ in range(n)] for n in lengths]
    masks[0][-1] = True   # at least one target
    return pad_batch(sequences, [[int(m) for m in mask] for mask in masks], pad_id), sequences, masks


def naive_logprobs(model, batch, temperature=1.0):
    """Full [B, T, V] logits, log_softmax, gather; and the entropies at the same positions."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float() / temperature
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    scored = batch.target_mask[:, 1:]
    gathered = logp.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return gathered[scored], entropy[scored]


# ----------------------------------------------------------------------------------------------
# pad_batch


def test_pad_batch_right_pads_ids_and_attention():
    batch = pad_batch([[5, 6, 7], [8, 9]], [[1, 1, 1], [1, 1]], pad_id=3)
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 9, 3]], batch.input_ids
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]], batch.attention_mask


def test_pad_batch_target_mask_follows_the_given_masks_and_never_column_zero():
    batch = pad_batch([[5, 6, 7, 4], [8, 9]], [[1, 0, 1, 1], [1, 1]], pad_id=0)
    assert batch.target_mask.tolist() == [[False, False, True, True], [False, True, False, False]], batch.target_mask
    assert batch.num_targets == 3, f"num_targets {batch.num_targets} != 3"


def test_pad_batch_padding_is_never_a_target():
    batch, sequences, _ = random_batch()
    for row, ids in enumerate(sequences):
        assert not batch.target_mask[row, len(ids):].any(), f"row {row}: a pad position is scored"


def test_pad_batch_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="sequence 1"):
        pad_batch([[1, 2], [3, 4, 5]], [[1, 1], [1, 1]], pad_id=0)


# ----------------------------------------------------------------------------------------------
# sequence_logprobs


def test_sequence_logprobs_match_naive_full_logits(model):
    batch, _, _ = random_batch()
    with torch.no_grad():
        got = sequence_logprobs(model, batch)
        expected, _ = naive_logprobs(model, batch)
    assert got.shape == (batch.num_targets,), f"shape {tuple(got.shape)} != ({batch.num_targets},)"
    assert torch.allclose(got, expected, atol=1e-5), f"max diff {(got - expected).abs().max():.2e}"


def test_sequence_logprobs_with_temperature_match_naive(model):
    batch, _, _ = random_batch(seed=3)
    with torch.no_grad():
        got = sequence_logprobs(model, batch, temperature=0.6)
        expected, _ = naive_logprobs(model, batch, temperature=0.6)
    assert torch.allclose(got, expected, atol=1e-5), f"max diff {(got - expected).abs().max():.2e}"


def test_sequence_logprobs_return_entropies(model):
    batch, _, _ = random_batch(seed=1)
    with torch.no_grad():
        logp, entropy = sequence_logprobs(model, batch, return_entropy=True)
        expected_logp, expected_entropy = naive_logprobs(model, batch)
    assert torch.allclose(logp, expected_logp, atol=1e-5), "log-probs differ when entropies are requested"
    assert torch.allclose(entropy, expected_entropy, atol=1e-4), \
        f"entropy max diff {(entropy - expected_entropy).abs().max():.2e}"


def test_padding_does_not_change_a_sequence_logprobs(model):
    batch, sequences, masks = random_batch(seed=2, lengths=(4, 11))
    alone = pad_batch([sequences[0]], [[int(m) for m in masks[0]]], pad_id=0)
    with torch.no_grad():
        together = sequence_logprobs(model, batch)
        single = sequence_logprobs(model, alone)
    assert torch.allclose(together[:single.numel()], single, atol=1e-5), "right padding / batching leaked in"


def test_sequence_logprobs_gradient_matches_naive(model):
    batch, _, _ = random_batch(seed=4)
    sequence_logprobs(model, batch).sum().backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    naive_logprobs(model, batch)[0].sum().backward()
    slow = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    assert fast.keys() == slow.keys(), "different parameters got gradients"
    worst = max((fast[n] - slow[n]).abs().max().item() for n in fast)
    assert worst < 1e-4, f"gradient differs from the naive reference by {worst:.2e}"


# ----------------------------------------------------------------------------------------------
# scatter_targets


def test_scatter_targets_places_values_at_target_positions():
    batch = pad_batch([[5, 6, 7], [8, 9]], [[1, 1, 0], [1, 1]], pad_id=0)   # targets (0,1), (1,1)
    out = scatter_targets(torch.tensor([10.0, 20.0]), batch, fill=-1.0)
    assert out.tolist() == [[-1.0, 10.0, -1.0], [-1.0, 20.0, -1.0]], out


def test_scatter_targets_inverts_the_gather(model):
    batch, _, _ = random_batch(seed=5)
    values = torch.arange(batch.num_targets, dtype=torch.float32) + 1
    out = scatter_targets(values, batch)
    assert torch.equal(out[batch.target_mask], values), "scatter then gather must give the values back"
    assert not out[~batch.target_mask].any(), "non-target positions must hold the fill value"


# ----------------------------------------------------------------------------------------------
# micro_batches


def test_micro_batches_cover_every_index_once():
    rng = random.Random(0)
    lengths = [rng.randint(1, 60) for _ in range(50)]
    indices = rng.sample(range(50), 37)
    groups = micro_batches(lengths, indices, max_tokens=120)
    flat = [i for group in groups for i in group]
    assert sorted(flat) == sorted(indices), "indices lost or duplicated"


def test_micro_batches_respect_the_token_budget():
    rng = random.Random(1)
    lengths = [rng.randint(1, 60) for _ in range(80)]
    groups = micro_batches(lengths, list(range(80)), max_tokens=150)
    for group in groups:
        padded = max(lengths[i] for i in group) * len(group)
        assert padded <= 150, f"group {group} has {padded} padded tokens > 150"


def test_micro_batches_oversize_sequence_gets_its_own_group():
    groups = micro_batches([10, 500, 12], [0, 1, 2], max_tokens=100)
    assert [1] in groups and sorted(i for g in groups for i in g) == [0, 1, 2], groups


def test_micro_batches_of_nothing_is_empty():
    assert micro_batches([3, 4], [], max_tokens=10) == [], "no indices -> no groups"


def test_micro_batches_do_not_pad_short_rows_to_a_long_width_when_a_forward_is_cheaper():
    lengths = [10] * 8 + [200] * 2
    groups = micro_batches(lengths, list(range(10)), max_tokens=10_000, call_tokens=100)
    assert sorted(map(sorted, groups)) == [list(range(8)), [8, 9]], \
        f"8 x 10 tokens padded to 200 wastes 1,520 tokens > one extra forward (100): {groups}"


def test_micro_batches_minimise_padding_plus_forwards():
    rng = random.Random(2)
    lengths = [rng.randint(1, 40) for _ in range(7)]
    cost = lambda groups: sum(max(lengths[i] for i in g) * len(g) + 30 for g in groups)
    best = float("inf")
    for cuts in itertools.product([0, 1], repeat=6):   # every split of the sorted rows into contiguous groups
        order, groups, current = sorted(range(7), key=lambda i: lengths[i]), [], []
        for position, i in enumerate(order):
            current.append(i)
            if position == 6 or cuts[position]:
                groups.append(current)
                current = []
        if all(max(lengths[i] for i in g) * len(g) <= 60 or len(g) == 1 for g in groups):
            best = min(best, cost(groups))
    got = micro_batches(lengths, list(range(7)), max_tokens=60, call_tokens=30)
    assert cost(got) == best, f"cost {cost(got)} > the best split's {best}"
