"""Per-token log-probs through the lm_head without ever materialising the [N, V] logits.

What it does
    `token_logprobs(hidden, weight, targets)` returns log softmax(hidden @ weight.T / T)[i, targets[i]]
    for every row i, in fp32 (fp64 when the inputs are fp64), and optionally the per-token entropy of that
    softmax (for logging; it carries no gradient). The trainer calls it on final-norm hidden states gathered
    at loss-mask positions with `model.lm_head.weight`, for old and new log-probs alike, so the PPO ratio is
    exactly 1 on-policy.

Design
    A `torch.autograd.Function` that walks row chunks of `hidden`. Per chunk it computes the logits in fp32
    (bf16 logits are off by up to ~0.1 nats, see notes/efficiency.md §1.5), shifts them by the row max,
    exponentiates once, and reads off the log-sum-exp, the target log-prob and the entropy. Only [N]-sized
    results leave the chunk, so the peak is one [chunk, V] fp32 buffer (two when the entropy is asked for)
    instead of ~3 x [N, V] for the naive log_softmax + gather.
    Backward has two modes, picked from what needs a gradient:
      * frozen head (LoRA / QLoRA, or a head you do not train): d logp_i / d h_i = (W[y_i] - E_p[W]) / T
        with E_p[W] = softmax_i @ W. Forward computes E_p[W] ([N, H], small) while the softmax is at hand,
        so backward is one gather and costs no matmul: two matmuls in total, like the naive path.
      * trainable head (full fine-tuning, tied embeddings): forward saves only the log-sum-exp ([N]);
        backward recomputes each chunk's softmax and forms G = g * (onehot(y) - p) / T, then
        dh = G @ W and dW += G.T @ h (accumulated in fp32). Three matmuls in backward instead of two.
    Tied embeddings need no special handling: pass `lm_head.weight` (the same Parameter as the input
    embedding) and autograd sums this gradient with the embedding lookup's.

Limits
    * A bf16/fp16 head is upcast WEIGHT_SLICE_ROWS vocabulary rows at a time (48 MiB at H = 1,536),
      once per chunk and matmul: a little extra time instead of a 0.93 GB fp32 copy of Qwen2.5-1.5B's head.
      A trainable bf16 head still gets a [V, H] fp32 gradient accumulator, by design.
    * No double backward (`once_differentiable`), no forward-mode AD, no bias, no ignore_index: gather the
      rows you score before calling (the trainer passes hidden[loss_mask]).
    * Pure PyTorch: each chunk still makes ~2 passes over a [chunk, V] buffer that a fused kernel would avoid.
"""

import torch
from torch.autograd.function import once_differentiable

# One fp32 logits chunk is about this many bytes (plus a same-sized exp buffer for the entropy). On 2 CPU cores,
# chunks below ~256 rows reread W too often; on a GPU, 512 MiB (883 rows at V = 151,936) keeps the GEMMs large.
CHUNK_BYTES = {"cpu": 256 * 2**20, "cuda": 512 * 2**20}
MIN_CHUNK_ROWS = 256
WEIGHT_SLICE_ROWS = 8192  # vocab rows of a bf16/fp16 head upcast to fp32 at a time (48 MiB at H = 1,536)


def default_chunk_size(num_rows: int, vocab_size: int, device: torch.device) -> int:
    """Rows per chunk: fill the per-device byte budget with fp32 logits, at least MIN_CHUNK_ROWS."""
    budget = CHUNK_BYTES.get(torch.device(device).type, CHUNK_BYTES["cuda"])
    rows = max(MIN_CHUNK_ROWS, budget // (4 * max(vocab_size, 1)))
    return max(1, min(rows, num_rows))


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs, fp64 for fp64 inputs (so gradcheck sees exact math)."""
    return torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)


def _weight_slices(weight, compute_dtype):
    """Yield (vocab rows, weight rows in compute_dtype): one no-copy slice when no cast is needed."""
    if weight.dtype == compute_dtype:
        yield slice(0, weight.shape[0]), weight
        return
    for start in range(0, weight.shape[0], WEIGHT_SLICE_ROWS):
        vocab = slice(start, start + WEIGHT_SLICE_ROWS)
        yield vocab, weight[vocab].to(compute_dtype)


def _logits(hidden_chunk, weight, compute_dtype):
    """hidden_chunk [n, H] (compute dtype) @ weight.T -> [n, V] in compute_dtype, W upcast slice by slice."""
    if weight.dtype == compute_dtype:
        return hidden_chunk @ weight.T
    logits = hidden_chunk.new_empty((hidden_chunk.shape[0], weight.shape[0]))
    for vocab, weight_slice in _weight_slices(weight, compute_dtype):
        logits[:, vocab] = hidden_chunk @ weight_slice.T
    return logits


def _times_weight(matrix, weight, compute_dtype):
    """matrix [n, V] @ weight [V, H] -> [n, H] in compute_dtype, W upcast slice by slice."""
    if weight.dtype == compute_dtype:
        return matrix @ weight
    out = matrix.new_zeros((matrix.shape[0], weight.shape[1]))
    for vocab, weight_slice in _weight_slices(weight, compute_dtype):
        out.addmm_(matrix[:, vocab], weight_slice)
    return out


def _chunk_forward(hidden_chunk, weight, targets_chunk, temperature, want_entropy, want_expected):
    """Log-prob, log-sum-exp, optional entropy and optional E_p[W] for one row chunk.

    hidden_chunk [n, H] is in the compute dtype, weight [V, H] in its own dtype; targets_chunk [n] long.
    """
    logits = _logits(hidden_chunk, weight, hidden_chunk.dtype)  # [n, V]
    if temperature != 1.0:
        logits.div_(temperature)
    row_max = logits.amax(dim=-1, keepdim=True)  # [n, 1]
    logits.sub_(row_max)  # shifted logits, each row's max is 0
    target_shifted = logits.gather(1, targets_chunk[:, None]).squeeze(1)  # [n]
    # [n, V] unnormalised softmax; in place unless the entropy still needs the logits
    exp_logits = torch.exp(logits) if want_entropy else logits.exp_()
    sum_exp = exp_logits.sum(dim=-1)  # [n]
    log_sum_exp = sum_exp.log()  # [n], relative to row_max
    logp = target_shifted - log_sum_exp  # [n]
    lse = row_max.squeeze(1) + log_sum_exp  # [n]
    expected_weight = None
    if want_expected:  # E_p[W] = softmax @ W, [n, H]
        expected_weight = _times_weight(exp_logits, weight, hidden_chunk.dtype).div_(sum_exp[:, None])
    entropy = None
    if want_entropy:  # H = log(sum e) - sum(e * z) / sum(e), with z the shifted logits
        entropy = log_sum_exp - exp_logits.mul_(logits).sum(dim=-1) / sum_exp
    return logp, lse, entropy, expected_weight


class ChunkedTokenLogProbs(torch.autograd.Function):
    """autograd.Function behind `token_logprobs`; see the module docstring for the math."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, want_entropy, save_expected):
        compute_dtype = _compute_dtype(hidden, weight)
        num_rows = hidden.shape[0]
        logp = hidden.new_empty(num_rows, dtype=compute_dtype)  # [N]
        lse = hidden.new_empty(num_rows, dtype=compute_dtype)  # [N]
        entropy = hidden.new_empty(num_rows if want_entropy else 0, dtype=compute_dtype)  # [N] or [0]
        expected = hidden.new_empty((num_rows, hidden.shape[1]) if save_expected else (0,), dtype=compute_dtype)
        for start in range(0, num_rows, chunk_size):
            rows = slice(start, start + chunk_size)
            chunk_logp, chunk_lse, chunk_entropy, chunk_expected = _chunk_forward(
                hidden[rows].to(compute_dtype), weight, targets[rows], temperature, want_entropy, save_expected
            )
            logp[rows], lse[rows] = chunk_logp, chunk_lse
            if want_entropy:
                entropy[rows] = chunk_entropy
            if save_expected:
                expected[rows] = chunk_expected
        ctx.temperature, ctx.chunk_size, ctx.save_expected = temperature, chunk_size, save_expected
        ctx.save_for_backward(hidden, weight, targets, lse, expected)
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, _grad_entropy):
        hidden, weight, targets, lse, expected = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_logp = grad_logp.to(lse.dtype)  # [N]
        if ctx.save_expected and not need_weight:  # frozen head: no matmul at all
            target_rows = weight[targets].to(lse.dtype)  # [N, H]
            grad_hidden = (target_rows - expected).mul_(grad_logp[:, None] / ctx.temperature)
            return grad_hidden.to(hidden.dtype), None, None, None, None, None, None
        grad_hidden = torch.zeros_like(hidden, dtype=lse.dtype) if need_hidden else None  # [N, H]
        grad_weight = torch.zeros_like(weight, dtype=lse.dtype) if need_weight else None  # [V, H] fp32 accumulator
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            _chunk_backward(
                hidden[rows].to(lse.dtype), weight, targets[rows], lse[rows], grad_logp[rows], ctx.temperature,
                grad_hidden[rows] if need_hidden else None, grad_weight,
            )
        grad_hidden = grad_hidden.to(hidden.dtype) if need_hidden else None
        grad_weight = grad_weight.to(weight.dtype) if need_weight else None
        return grad_hidden, grad_weight, None, None, None, None, None


def _chunk_backward(hidden_chunk, weight, targets_chunk, lse_chunk, grad_chunk, temperature, grad_hidden_out,
                    grad_weight):
    """Recompute one chunk: G = g * (onehot(y) - p) / T; grad_hidden_out = G @ W; grad_weight += G.T @ h.

    hidden_chunk [n, H] in the compute dtype; grad_hidden_out [n, H] (a view to fill) or None;
    grad_weight [V, H] compute-dtype accumulator or None. A function, so the [n, V] buffer dies on return.
    """
    grad_logits = _logits(hidden_chunk, weight, hidden_chunk.dtype)  # [n, V]
    if temperature != 1.0:
        grad_logits.div_(temperature)
    grad_logits.sub_(lse_chunk[:, None]).exp_()  # softmax p, in place
    grad_logits.mul_(-grad_chunk[:, None])  # -g * p
    grad_logits.scatter_add_(1, targets_chunk[:, None], grad_chunk[:, None])  # + g at the target
    if temperature != 1.0:
        grad_logits.div_(temperature)
    if grad_hidden_out is not None:
        grad_hidden_out.copy_(_times_weight(grad_logits, weight, hidden_chunk.dtype))
    if grad_weight is not None:
        grad_weight.addmm_(grad_logits.T, hidden_chunk)


def token_logprobs(hidden, weight, targets, temperature=1.0, chunk_size=None, return_entropy=False):
    """log softmax(hidden @ weight.T / temperature) at `targets`, chunked over rows.

    hidden [N, H] (any float dtype), weight [V, H] (lm_head / tied embedding), targets [N] long.
    Returns logp [N] in fp32 (fp64 for fp64 inputs), or (logp, entropy) with entropy [N] (no gradient)
    when `return_entropy`. chunk_size=None picks `default_chunk_size` for the device.
    Call it under torch.no_grad() for old / reference log-probs: with grad on and a frozen head, forward also
    computes E_p[W] (a second matmul) for the backward.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [N, H] and weight [V, H], got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [N] = {tuple(hidden.shape[:1])}, got {tuple(targets.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is None:
        chunk_size = default_chunk_size(hidden.shape[0], weight.shape[0], hidden.device)
    grad_enabled = torch.is_grad_enabled()
    save_expected = grad_enabled and hidden.requires_grad and not weight.requires_grad  # frozen-head mode
    logp, entropy = ChunkedTokenLogProbs.apply(
        hidden, weight, targets.long(), float(temperature), int(chunk_size), bool(return_entropy), save_expected
    )
    return (logp, entropy) if return_entropy else logp


def naive_token_logprobs(hidden, weight, targets, temperature=1.0):
    """Reference: full [N, V] fp32 logits, log_softmax, gather. Tests and the bench compare against it."""
    compute_dtype = _compute_dtype(hidden, weight)
    logits = hidden.to(compute_dtype) @ weight.to(compute_dtype).T / temperature  # [N, V]
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
