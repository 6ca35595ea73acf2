"""One decode step (one new token per row) of a Qwen2/Qwen3 model on the rollout cache, without transformers' wrappers.

Why: the rollout engine calls the model once per generated token. For the tiny model, the work of a step is a few
small matmuls, and transformers' forward adds a fixed cost per call (argument deprecation and output-capturing
wrappers, gradient-checkpointing layer dispatch, output dataclasses) that was a large share of the step on a CPU.
`lean_decode_step` runs the same modules (embedding, RMSNorms, projections, MLP, rotary embedding, lm_head) on
the single query token, with two changes: the rotary embedding's rotate_half is one `roll` (bitwise the same
products), and on a CPU attention is an explicit matmul-softmax-matmul (`decode_attention`, the
arithmetic of transformers' eager attention), because torch's fused CPU kernel is ~1.8x slower for a query of one
or two rows per head. So the logits equal the SDPA forward's up to float rounding (~1e-7, as far as transformers'
own eager and SDPA paths are from each other; a test checks it), not bitwise.
`decode_step_for(model)` returns it for the models it covers, and a plain `model(...)` call otherwise.
Limits: only Qwen2/Qwen3 decoders with SDPA attention, full attention layers and a CPU or CUDA device; prefill
and scoring still use the transformers forward.
"""

import torch
import torch.nn.functional as F

LEAN_MODEL_TYPES = ("qwen2", "qwen3")


def hf_decode_step(model, input_ids, position_ids, cache, bias) -> torch.Tensor:
    """Logits [B, V] of one token per row through the model's own forward."""
    out = model(input_ids=input_ids, position_ids=position_ids, cache=cache, use_cache=True, attention_mask=bias)
    return out.logits[:, -1]


def lean_decode_step(model, input_ids, position_ids, cache, bias) -> torch.Tensor:
    """Logits [B, V] for input_ids [B, 1] at position_ids [B, 1]; bias [B, 1, 1, K] is the additive attention mask."""
    inner = model.model
    hidden = inner.embed_tokens(input_ids)                                       # [B, 1, H]
    cos, sin = inner.rotary_emb(hidden, position_ids)                            # [B, 1, D]
    cos, sin_signed = cos[:, None], signed_sin(sin)[:, None]                     # [B, 1, 1, D]: broadcast over heads
    rows = hidden.shape[0]
    for index, layer in enumerate(inner.layers):
        attention = layer.self_attn
        x = layer.input_layernorm(hidden)
        shape = (rows, -1, 1, attention.head_dim)    # one token: [B, 1, heads * D] is already [B, heads, 1, D]
        query, key = attention.q_proj(x).view(shape), attention.k_proj(x).view(shape)
        if hasattr(attention, "q_norm"):                                           # Qwen3
            query, key = attention.q_norm(query), attention.k_norm(key)
        query, key = rotate(query, cos, sin_signed), rotate(key, cos, sin_signed)
        key, value = cache.layers[index].update(key, attention.v_proj(x).view(shape))   # [B, H_kv, K, D]
        # a single query token: the heads of a kv group become its query rows, [B, H_kv, G, D]
        query = query.view(rows, key.shape[1], attention.num_key_value_groups, attention.head_dim)
        out = decode_attention(query, key, value, bias, attention.scaling)         # [B, H_kv, G, D] = [B, heads, D]
        hidden = hidden + attention.o_proj(out.reshape(rows, 1, -1))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return model.lm_head(inner.norm(hidden))[:, -1]


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """[-sin_1, sin_2] for sin = [sin_1, sin_2] (halves of the last dim): so that rotate_half(x) * sin, the rotary
    embedding's second term, is x.roll(D/2) * signed_sin, one op instead of four (the products are the same)."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [..., D]: x * cos + rotate_half(x) * sin."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed


def decode_attention(query, key, value, bias, scale: float) -> torch.Tensor:
    """softmax(query key^T * scale + bias) value: query [B, H_kv, G, D], key/value [B, H_kv, K, D], bias [B, 1, 1, K].

    On a CPU: explicit matmul, float32 softmax, matmul, the arithmetic of transformers' eager attention. For a
    query of G = 1-2 rows per head, torch's fused CPU kernel (flash attention) costs ~1.8x as much (measured on Zen 4,
    64 rows, K = 200, 1 and 2 threads). On CUDA the fused kernel is the faster one and is kept.
    """
    if query.device.type != "cpu":
        return F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=scale)
    scores = torch.matmul(query, key.transpose(-1, -2)).float().mul_(scale).add_(bias)      # [B, H_kv, G, K]
    return torch.matmul(scores.softmax(dim=-1).to(value.dtype), value)


def decode_step_for(model):
    """`lean_decode_step` for a model it reproduces (up to float rounding), else `hf_decode_step`."""
    config = model.config
    inner = getattr(model, "model", None)
    lean = (config.model_type in LEAN_MODEL_TYPES and getattr(config, "_attn_implementation", None) == "sdpa"
            and model.device.type in ("cpu", "cuda") and isinstance(getattr(inner, "layers", None), torch.nn.ModuleList)
            and hasattr(model, "lm_head")   # a wrapper around a model (e.g. the rehearsal's scripted logits) has neither
            and all(getattr(layer.self_attn, "sliding_window", None) is None for layer in inner.layers))
    return lean_decode_step if lean else hf_decode_step
