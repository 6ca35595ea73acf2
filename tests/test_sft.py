"""Cold-start SFT: tokenisation and loss masks the way the engine builds trajectories, batching, learning,
and exact resumption from a checkpoint."""

import math

import pytest
import torch

from thor_min import tasks, tiny
from thor_min.metrics import MetricsLog
from thor_min.models import build_prompt
from thor_min.scoring import pad_batch
from thor_min.sft import (SFTConfig, TokenizedExample, _batches, evaluate_loss, full_text_examples, pack_examples,
                          tokenize_example, train_sft)
from thor_min.trajectory import observation_block, split_segments

SIZE = tiny.TinyModelSize(hidden_size=64, num_layers=2, intermediate_size=128, num_heads=4, num_kv_heads=2)
NEVER = 1e12




def make_model(tokenizer):
    return tiny.build_model(tokenizer, SIZE, seed=0)


def tool_response(problem) -> str:
    """The tool-integrated form of a tiny-world reference: each statement as a cell, its output, the line again."""
    parts = []
    for line in problem.reference.split("\n"):
        match = tasks.STATEMENT_RE.match(line)
        if match:
            cell = f"```python\n{tasks.statement_code(match['expression'])}\n```"
            line = cell + observation_block(match["value"], cell) + line
        parts.append(line)
    return "\n".join(parts)


def tool_examples(tokenizer, problems):
    return [tokenize_example(tokenizer, build_prompt("tiny", p.question), tool_response(p)) for p in problems]


@pytest.fixture(scope="module")
def sample(any_tokenizer):
    problem = next(p for p in tasks.train_split(20) if p.kind == "boxes")   # two cells
    prompt, response = build_prompt("tiny", problem.question), tool_response(problem)
    return prompt, response, tokenize_example(any_tokenizer, prompt, response)


def segment_spans(any_tokenizer, prompt, response):
    """(start, end, is_observation) token spans of the response segments, tokenised one by one."""
    position, spans = len(any_tokenizer.encode(prompt, add_special_tokens=False)), []
    for segment, is_observation in split_segments(response):
        n = len(any_tokenizer.encode(segment, add_special_tokens=False))
        spans.append((position, position + n, is_observation))
        position += n
    return spans


# ----------------------------------------------------------------------------------------------
# tokenize_example


def test_prompt_tokens_are_the_prompt_alone_and_masked(any_tokenizer, sample):
    prompt, _, example = sample
    prompt_ids = any_tokenizer.encode(prompt, add_special_tokens=False)
    assert example.ids[:len(prompt_ids)] == prompt_ids, "the prompt must be tokenised on its own, first"
    assert set(example.loss_mask[:len(prompt_ids)]) == {0}, "prompt tokens must have loss mask 0"


def test_observation_blocks_are_masked_and_model_text_is_trained(any_tokenizer, sample):
    prompt, response, example = sample
    spans = segment_spans(any_tokenizer, prompt, response)
    assert sum(obs for *_, obs in spans) == 2, "the sample should have two observation blocks"
    for start, end, is_observation in spans:
        assert set(example.loss_mask[start:end]) == {0 if is_observation else 1}, \
            f"span {start}:{end} (observation={is_observation}) has mask {example.loss_mask[start:end]}"


def test_eos_is_appended_and_trained(any_tokenizer, sample):
    _, _, example = sample
    assert (example.ids[-1], example.loss_mask[-1]) == (any_tokenizer.eos_token_id, 1), "EOS must end the example, mask 1"


def test_mask_has_one_entry_per_token(sample):
    _, _, example = sample
    assert len(example.ids) == len(example.loss_mask), "ids and loss mask lengths differ"


def test_train_on_outputs_trains_observations_too(any_tokenizer, sample):
    prompt, response, _ = sample
    example = tokenize_example(any_tokenizer, prompt, response, train_on_outputs=True)
    n_prompt = len(any_tokenizer.encode(prompt, add_special_tokens=False))
    assert set(example.loss_mask[n_prompt:]) == {1}, "train_on_outputs=True should put 1 on the whole response"
    assert set(example.loss_mask[:n_prompt]) == {0}, "the prompt stays masked with train_on_outputs"


def test_add_eos_false_leaves_eos_out(any_tokenizer, sample):
    prompt, response, full = sample
    example = tokenize_example(any_tokenizer, prompt, response, add_eos=False)
    assert example.ids == full.ids[:-1] and example.loss_mask == full.loss_mask[:-1], "add_eos=False changed more"
    assert any_tokenizer.eos_token_id not in example.ids, "EOS present although add_eos=False"


def test_ids_decode_back_to_prompt_response_eos(any_tokenizer, sample):
    prompt, response, example = sample
    text = any_tokenizer.decode(example.ids, skip_special_tokens=False)
    assert text == prompt + response + any_tokenizer.eos_token, f"round trip failed:\n{text!r}"


def test_observation_ids_equal_the_engine_encoding_of_the_block(any_tokenizer, sample):
    """The engine tokenises each observation block alone: `any_tokenizer.encode(observation_block(obs, text))`."""
    prompt, response, example = sample
    blocks, text = [], ""
    for segment, is_observation in split_segments(response):
        if is_observation:
            value = segment.split("```output\n")[1].split("\n```")[0]
            blocks.append(observation_block(value, text))
        text += segment
    spans = [(s, e) for s, e, obs in segment_spans(any_tokenizer, prompt, response) if obs]
    assert len(spans) == len(blocks) == 2, f"expected 2 observation blocks in {response!r}"
    for (start, end), block in zip(spans, blocks):
        assert example.ids[start:end] == any_tokenizer.encode(block, add_special_tokens=False), \
            f"observation ids differ from the engine's encoding of {block!r}"


def test_plain_response_is_all_trained(any_tokenizer):
    example = tokenize_example(any_tokenizer, "Question: x\nAnswer:\n", "1 + 1 = 2.\nThe answer is \\boxed{2}.")
    n_prompt = len(any_tokenizer.encode("Question: x\nAnswer:\n", add_special_tokens=False))
    assert set(example.loss_mask[n_prompt:]) == {1}, "a response without tools is model text throughout"


# ----------------------------------------------------------------------------------------------
# _batches


def fake_examples(lengths):
    return [TokenizedExample([1] * n, [1] * n) for n in lengths]


@pytest.mark.parametrize("n, batch_size", [(37, 4), (64, 8), (5, 16), (200, 3)])
def test_batches_cover_every_example_once_per_epoch(n, batch_size):
    examples = fake_examples([(i * 7) % 23 + 1 for i in range(n)])
    batches = _batches(examples, batch_size, epoch=2, seed=5)
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(n)), "an example was dropped or repeated within the epoch"
    assert len(batches) == math.ceil(n / batch_size), f"{len(batches)} batches, train_sft expects ceil(n / bs)"
    assert all(len(batch) <= batch_size for batch in batches), "a batch is larger than batch_size"


def test_batches_are_deterministic():
    examples = fake_examples([(i * 5) % 17 + 1 for i in range(50)])
    assert _batches(examples, 4, 1, 3) == _batches(examples, 4, 1, 3), "same (epoch, seed) must give the same batches"


def test_batches_change_between_epochs():
    examples = fake_examples([(i * 5) % 17 + 1 for i in range(50)])
    assert _batches(examples, 4, 0, 3) != _batches(examples, 4, 1, 3), "each epoch should reshuffle"


# ----------------------------------------------------------------------------------------------
# Loss and training


def numbered_examples(lengths):
    """Examples whose ids are (example index, position) pairs, so a block shows where each token came from."""
    return [TokenizedExample([(i, j) for j in range(n)], [1] * n) for i, n in enumerate(lengths)]


def test_packing_keeps_every_token_in_order():
    examples = numbered_examples([5, 7, 3, 9, 2, 6])
    blocks = pack_examples(examples, block_tokens=12)
    flat = [token for block in blocks for token in block.ids]
    assert flat == [token for example in examples for token in example.ids], "packing lost or reordered tokens"


def test_packing_never_splits_an_example_and_respects_the_block_size():
    blocks = pack_examples(numbered_examples([5, 7, 3, 9, 2, 6, 20]), block_tokens=12)
    for block in blocks:
        assert block.ids[0][1] == 0, f"a block must start at an example's first token: {block.ids[:2]}"
        assert len(block.ids) <= 12 or len({i for i, _ in block.ids}) == 1, "only a lone long example may exceed"
        assert len(block.loss_mask) == len(block.ids), "mask and ids must stay aligned"


def test_packing_fills_blocks_greedily():
    blocks = pack_examples(numbered_examples([4, 4, 4, 4, 4]), block_tokens=12)
    assert [len(b.ids) for b in blocks] == [12, 8], f"want blocks of 12 then 8 tokens, got {[len(b.ids) for b in blocks]}"


def test_evaluate_loss_is_the_mean_nll_of_masked_tokens(tokenizer):
    model = make_model(tokenizer)
    examples = tool_examples(tokenizer, tasks.train_split(6))
    expected_total, expected_count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            logits = model(input_ids=torch.tensor([example.ids])).logits[0, :-1]
            logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(example.ids[1:])[:, None]).squeeze(-1)
            mask = torch.tensor(example.loss_mask[1:], dtype=torch.bool)
            expected_total -= float(logp[mask].sum())
            expected_count += int(mask.sum())
    got = evaluate_loss(model, examples, tokenizer.pad_token_id, max_tokens=300)
    assert got == pytest.approx(expected_total / expected_count, rel=1e-5), "held-out loss is not the masked mean NLL"


def train(tokenizer, model, examples, held_out, tmp_path, *, checkpoint_dir=None, resume=False, **config):
    settings = dict(lr=3e-3, batch_size=4, micro_batch_tokens=4096, max_tokens=512, eval_every=1000,
                    checkpoint_every=1000, seed=0)
    settings.update(config)
    log = MetricsLog(tmp_path / "log", plot_every_s=NEVER)
    summary = train_sft(model, tokenizer, examples, held_out, SFTConfig(**settings), log=log,
                        checkpoint_dir=checkpoint_dir, resume=resume)
    return summary, log


@pytest.fixture(scope="module")
def data(tokenizer):
    return tool_examples(tokenizer, tasks.train_split(48)), tool_examples(tokenizer, tasks.test_split(12))


def test_sft_lowers_held_out_loss(tokenizer, data, tmp_path):
    train_set, held_out = data
    model = make_model(tokenizer)
    summary, _ = train(tokenizer, model, train_set, held_out, tmp_path, max_steps=40)
    first, final = summary["first_eval_loss"], summary["final_eval_loss"]
    assert final < 0.6 * first, f"held-out loss barely moved: {first:.3f} -> {final:.3f}"


def test_sft_logs_eval_at_step_zero_and_loss_every_step(tokenizer, data, tmp_path):
    train_set, held_out = data
    _, log = train(tokenizer, make_model(tokenizer), train_set, held_out, tmp_path, max_steps=3)
    rows = [r for r in log.rows() if r["stage"] == "sft"]
    assert [r["step"] for r in rows] == [0, 1, 2, 3], [r["step"] for r in rows]
    assert rows[0]["eval_loss"] is not None and all(r["loss"] > 0 for r in rows[1:]), rows
    assert rows[-1].get("eval_loss") is not None, "the last step must evaluate the held-out loss"


def test_micro_batching_does_not_change_the_loss_or_gradient(tokenizer, data, tmp_path):
    train_set, held_out = data
    _, whole = train(tokenizer, make_model(tokenizer), train_set, held_out, tmp_path / "a", max_steps=1)
    _, split = train(tokenizer, make_model(tokenizer), train_set, held_out, tmp_path / "b", max_steps=1,
                     micro_batch_tokens=64)   # forces one sequence per micro-batch
    a, b = whole.rows()[-1], split.rows()[-1]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), f"loss {a['loss']} vs {b['loss']}"
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), f"grad norm {a['grad_norm']} vs {b['grad_norm']}"


def test_resume_matches_an_uninterrupted_run(tokenizer, data, tmp_path):
    train_set, held_out = data
    straight = make_model(tokenizer)
    train(tokenizer, straight, train_set, held_out, tmp_path / "a", max_steps=10)
    interrupted = make_model(tokenizer)
    ckpt = tmp_path / "ckpt"
    train(tokenizer, interrupted, train_set, held_out, tmp_path / "b", max_steps=6, checkpoint_dir=ckpt)
    resumed = make_model(tokenizer)   # a new process: fresh weights, everything from the checkpoint
    summary, _ = train(tokenizer, resumed, train_set, held_out, tmp_path / "b", max_steps=10, checkpoint_dir=ckpt,
                       resume=True)
    expected, got = straight.state_dict(), resumed.state_dict()
    worst = max((expected[k] - got[k]).abs().max().item() for k in expected)
    assert worst < 1e-6, f"resumed weights differ from the uninterrupted run by {worst:.2e}"
    assert summary["steps"] == 10, summary


def test_long_examples_are_dropped_and_counted(tokenizer, data, tmp_path):
    train_set, held_out = data
    limit = sorted(len(e.ids) for e in train_set)[len(train_set) // 2]
    too_long = sum(len(e.ids) > limit for e in train_set)
    summary, _ = train(tokenizer, make_model(tokenizer), train_set, held_out, tmp_path, max_steps=1, max_tokens=limit)
    assert (summary["dropped_long"], summary["examples"]) == (too_long, len(train_set) - too_long), summary


def test_empty_training_set_raises(tokenizer, data, tmp_path):
    with pytest.raises(ValueError, match="no training examples"):
        train(tokenizer, make_model(tokenizer), [], data[1], tmp_path, max_steps=1)


def test_training_set_with_only_long_examples_raises(tokenizer, data, tmp_path):
    with pytest.raises(ValueError, match="no training examples"):
        train(tokenizer, make_model(tokenizer), data[0], data[1], tmp_path, max_steps=1, max_tokens=5)


def test_epochs_set_the_number_of_steps(tokenizer, data, tmp_path):
    train_set, held_out = data
    summary, _ = train(tokenizer, make_model(tokenizer), train_set[:10], held_out, tmp_path, epochs=2.0, batch_size=4,
                       lr=1e-5)
    assert summary["steps"] == 2 * math.ceil(10 / 4), f"2 epochs of 10 examples at batch 4: {summary['steps']} steps"


def test_padding_batch_helper_matches_examples(tokenizer, data):
    """The SFT batch scores exactly the loss-masked tokens (minus the first position)."""
    examples = data[0][:3]
    batch = pad_batch([e.ids for e in examples], [e.loss_mask for e in examples], tokenizer.pad_token_id)
    assert batch.num_targets == sum(sum(e.loss_mask[1:]) for e in examples), "scored tokens != masked tokens"


def test_the_batched_pretraining_corpus_has_the_ids_of_one_example_at_a_time():
    tokenizer = tiny.build_tokenizer()
    problems = tasks.train_split(200)
    batched = full_text_examples(tokenizer, problems)
    for example, problem in zip(batched, problems):
        single = tokenize_example(tokenizer, build_prompt("tiny", problem.question, tools=False), problem.reference)
        assert example.ids == single.ids, f"batched encoding changed the ids of {problem.id}"
        assert example.loss_mask == [1] * len(single.ids), "every pretraining token is trained"
