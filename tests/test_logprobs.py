"""Tests for thor_min.logprobs: the chunked lm_head log-prob Function. Run: pytest tests/test_logprobs.py"""

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

from thor_min import logprobs
from thor_min.logprobs import default_chunk_size, naive_token_logprobs, token_logprobs

NUM_ROWS, HIDDEN, VOCAB = 37, 16, 301  # odd sizes so chunks leave a remainder
GRADCHECK_SIZES = dict(num_rows=9, hidden_size=4, vocab_size=17)  # gradcheck perturbs every entry: keep it tiny


def make_inputs(dtype=torch.float32, num_rows=NUM_ROWS, hidden_size=HIDDEN, vocab_size=VOCAB, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_rows, hidden_size, generator=generator, dtype=torch.float64).to(dtype)  # [N, H]
    weight = torch.randn(vocab_size, hidden_size, generator=generator, dtype=torch.float64).to(dtype)  # [V, H]
    targets = torch.randint(0, vocab_size, (num_rows,), generator=generator)  # [N]
    return hidden, weight, targets


def reference_entropy(hidden, weight, temperature):
    logits = hidden.double() @ weight.double().T / temperature  # [N, V]
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)


def test_gradcheck_fp64_trainable_head():
    hidden, weight, targets = make_inputs(torch.float64, **GRADCHECK_SIZES)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    ok = torch.autograd.gradcheck(lambda h, w: token_logprobs(h, w, targets, 0.7, chunk_size=4), (hidden, weight))
    assert ok, "gradcheck failed for hidden and weight (recompute backward)"


def test_gradcheck_fp64_frozen_head():
    hidden, weight, targets = make_inputs(torch.float64, **GRADCHECK_SIZES)
    hidden.requires_grad_(True)
    ok = torch.autograd.gradcheck(lambda h: token_logprobs(h, weight, targets, 1.3, chunk_size=4), (hidden,))
    assert ok, "gradcheck failed for hidden with a frozen head (E_p[W] backward)"


@pytest.mark.parametrize("chunk_size", [1, 8, NUM_ROWS, 1000, None])
def test_values_match_naive_log_softmax_gather(chunk_size):
    hidden, weight, targets = make_inputs()
    ours = token_logprobs(hidden, weight, targets, temperature=0.8, chunk_size=chunk_size)
    naive = naive_token_logprobs(hidden, weight, targets, temperature=0.8)
    torch.testing.assert_close(ours, naive, rtol=1e-5, atol=1e-5, msg=f"values differ at chunk_size={chunk_size}")


@pytest.mark.skipif(not hasattr(F, "linear_cross_entropy"), reason="torch has no F.linear_cross_entropy")
def test_values_match_torch_linear_cross_entropy():
    hidden, weight, targets = make_inputs()
    temperature = 0.6
    options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=8, chunking_method=None)
    nll = F.linear_cross_entropy(hidden / temperature, weight, targets, reduction="none", options=options)  # [N]
    ours = token_logprobs(hidden, weight, targets, temperature=temperature, chunk_size=8)
    torch.testing.assert_close(ours, -nll, rtol=1e-5, atol=1e-5, msg="differs from -F.linear_cross_entropy")


@pytest.mark.parametrize("train_head", [False, True])
def test_gradients_match_naive_fp32(train_head):
    hidden, weight, targets = make_inputs()
    upstream = torch.randn(NUM_ROWS, generator=torch.Generator().manual_seed(1))  # [N] arbitrary dL/dlogp
    grads = []
    for fn in (naive_token_logprobs, lambda h, w, y, t: token_logprobs(h, w, y, t, chunk_size=8)):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(train_head)
        (fn(h, w, targets, 0.9) * upstream).sum().backward()
        grads.append((h.grad, w.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-4, atol=1e-5, msg="hidden grad differs from naive")
    if train_head:
        torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-4, atol=1e-5, msg="weight grad differs")
    else:
        assert grads[1][1] is None, "a frozen head must not receive a gradient"


def test_entropy_matches_reference_and_has_no_grad():
    hidden, weight, targets = make_inputs()
    hidden.requires_grad_(True)
    logp, entropy = token_logprobs(hidden, weight, targets, temperature=0.7, chunk_size=8, return_entropy=True)
    expected = reference_entropy(hidden.detach(), weight, 0.7).float()
    torch.testing.assert_close(entropy, expected, rtol=1e-5, atol=1e-5, msg="entropy differs from -sum p log p")
    assert not entropy.requires_grad, "entropy is for logging and must carry no gradient"
    assert logp.requires_grad, "logp must stay differentiable when the entropy is returned too"


def test_entropy_request_does_not_change_logp():
    hidden, weight, targets = make_inputs()
    plain = token_logprobs(hidden, weight, targets, chunk_size=8)
    with_entropy, _ = token_logprobs(hidden, weight, targets, chunk_size=8, return_entropy=True)
    assert torch.equal(plain, with_entropy), "asking for the entropy changed the log-probs"


def test_frozen_and_trainable_modes_give_same_hidden_grad():
    hidden, weight, targets = make_inputs()
    hidden_grads = []
    for train_head in (False, True):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(train_head)
        token_logprobs(h, w, targets, 1.4, chunk_size=8).sum().backward()
        hidden_grads.append(h.grad)
    torch.testing.assert_close(hidden_grads[0], hidden_grads[1], rtol=1e-5, atol=1e-6, msg="the two backwards differ")


def test_bf16_inputs_use_fp32_head():
    hidden, weight, targets = make_inputs(torch.bfloat16, hidden_size=64)
    logp = token_logprobs(hidden, weight, targets, chunk_size=8)
    exact = naive_token_logprobs(hidden.double(), weight.double(), targets)  # fp64 math on the same bf16 values
    assert logp.dtype == torch.float32, f"log-probs must be fp32, got {logp.dtype}"
    max_error = (logp.double() - exact).abs().max().item()
    assert max_error < 1e-4, f"bf16 inputs gave {max_error:.2e} nats of error: head not computed in fp32?"


@pytest.mark.parametrize("train_head", [False, True])
def test_bf16_gradients_keep_input_dtypes(train_head):
    hidden, weight, targets = make_inputs(torch.bfloat16)
    hidden.requires_grad_(True)
    weight.requires_grad_(train_head)
    token_logprobs(hidden, weight, targets, chunk_size=8).sum().backward()
    assert hidden.grad.dtype == torch.bfloat16, f"hidden grad dtype {hidden.grad.dtype}"
    if train_head:
        assert weight.grad.dtype == torch.bfloat16, f"weight grad dtype {weight.grad.dtype}"


@pytest.mark.parametrize("train_head", [False, True])
def test_bf16_head_upcast_in_vocab_slices_matches_fp64(monkeypatch, train_head):
    monkeypatch.setattr(logprobs, "WEIGHT_SLICE_ROWS", 7)  # many slices, the last one partial
    hidden, weight, targets = make_inputs(torch.bfloat16)
    upstream = torch.randn(NUM_ROWS, generator=torch.Generator().manual_seed(1))  # [N]
    results = []
    for h, w in ((hidden, weight), (hidden.double(), weight.double())):  # sliced bf16 path, exact fp64 path
        h, w = h.clone().requires_grad_(True), w.clone().requires_grad_(train_head)
        logp, entropy = token_logprobs(h, w, targets, 0.9, chunk_size=8, return_entropy=True)
        (logp * upstream.to(logp.dtype)).sum().backward()
        results.append([logp, entropy, h.grad] + ([w.grad] if train_head else []))
    for name, ours, exact in zip(["logp", "entropy", "hidden grad", "weight grad"], *results):
        rtol = 1e-5 if name in ("logp", "entropy") else 1e-2  # fp32 outputs vs grads rounded to bf16
        torch.testing.assert_close(ours.double(), exact, rtol=rtol, atol=1e-4, msg=f"sliced bf16 {name} differs")


def test_no_grad_returns_detached_logp():
    hidden, weight, targets = make_inputs()
    hidden.requires_grad_(True)
    with torch.no_grad():
        logp = token_logprobs(hidden, weight, targets)
    assert logp.grad_fn is None and not logp.requires_grad, "no_grad call must not build a graph"


def test_tied_embedding_gradient_equals_full_logits_path():
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )
    model = Qwen2ForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight, "test needs a tied head"
    input_ids = torch.randint(0, 300, (2, 9))  # [B, T]
    targets = input_ids[:, 1:].reshape(-1)  # [B*(T-1)]

    full_logits = model(input_ids).logits[:, :-1].float()  # [B, T-1, V]
    full_logp = full_logits.log_softmax(-1).reshape(-1, 300).gather(1, targets[:, None]).squeeze(1)
    full_logp.sum().backward()
    full_grad = model.model.embed_tokens.weight.grad.clone()
    model.zero_grad()

    hidden = model.model(input_ids).last_hidden_state[:, :-1].reshape(-1, 64)  # [B*(T-1), H]
    ours = token_logprobs(hidden, model.lm_head.weight, targets, chunk_size=5)
    ours.sum().backward()
    torch.testing.assert_close(ours, full_logp, rtol=1e-5, atol=1e-5, msg="tied log-probs differ")
    torch.testing.assert_close(
        model.model.embed_tokens.weight.grad, full_grad, rtol=1e-4, atol=1e-5,
        msg="embedding grad (lookup + head) differs from the full-logits path",
    )


def test_rejects_mismatched_shapes():
    hidden, weight, targets = make_inputs()
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(hidden, weight, targets[:-1])
    with pytest.raises(ValueError, match="hidden"):
        token_logprobs(hidden, weight[:, :-1], targets)


def test_default_chunk_size_respects_budget_and_bounds():
    assert default_chunk_size(10_000, 151_936, torch.device("cpu")) >= 256, "CPU chunks must be >= 256 rows"
    assert default_chunk_size(7, 151_936, torch.device("cpu")) == 7, "chunk must not exceed the row count"
    assert default_chunk_size(10_000, 300, torch.device("cpu")) == 10_000, "a tiny vocab fits in one chunk"


@pytest.mark.slow
def test_real_vocab_matches_naive():
    hidden, weight, targets = make_inputs(num_rows=128, hidden_size=64, vocab_size=151_936)
    weight = weight * 0.1  # logits of a realistic spread
    hidden.requires_grad_(True)
    ours = token_logprobs(hidden, weight, targets, chunk_size=48)
    ours.sum().backward()
    ours_grad = hidden.grad.clone()
    hidden.grad = None
    naive = naive_token_logprobs(hidden, weight, targets)
    naive.sum().backward()
    torch.testing.assert_close(ours, naive, rtol=1e-5, atol=1e-4, msg="real-vocab log-probs differ")
    torch.testing.assert_close(ours_grad, hidden.grad, rtol=1e-4, atol=1e-5, msg="real-vocab grads differ")
