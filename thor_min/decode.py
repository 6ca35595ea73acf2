"""One decode step (one new token per row) of a Qwen2/Qwen3 model on the rollout cache, without transformers' wrappers.

Why: the rollout engine calls the model once per generated token. For the tiny model, the work of a step is a few
small matmuls, and transformers' forward adds a fixed cost per call (argument deprecation and output-capturing
wrappers, gradient-checkpointing layer dispatch, output dataclasses) that was a large share of the step on a CPU.
`lean_decode_step` runs the same modules (embedding, RMSNorms, projections, MLP, rotary embedding, lm_head) and
the same attention call as transformers' SDPA path for a single query token (grouped heads packed into the query
length, `transformers.integrations.sdpa_attention`), so the logits are bitwise equal (a test checks it).
`decode_step_for(model)` returns it where that holds, and a plain `model(...)` call otherwise.
Limits: only Qwen2/Qwen3 decoders with SDPA attention, full attention layers and a CPU or CUDA device; prefill
and scoring still use the transformers forward.
"""

import torch
import torch.nn.functional as F
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

LEAN_MODEL_TYPES = ("qwen2", "qwen3")


def hf_decode_step(model, input_ids, position_ids, cache, bias) -> torch.Tensor:
    """Logits [B, V] of one token per row through the model's own forward."""
    out = model(input_ids=input_ids, position_ids=position_ids, cache=cache, use_cache=True, attention_mask=bias)
    return out.logits[:, -1]


def lean_decode_step(model, input_ids, position_ids, cache, bias) -> torch.Tensor:
    """Logits [B, V] for input_ids [B, 1] at position_ids [B, 1]; bias [B, 1, 1, K] is the additive attention mask."""
    inner = model.model
    hidden = inner.embed_tokens(input_ids)                                       # [B, 1, H]
    cos, sin = inner.rotary_emb(hidden, position_ids)
    rows = hidden.shape[0]
    for index, layer in enumerate(inner.layers):
        attention = layer.self_attn
        x = layer.input_layernorm(hidden)
        shape = (rows, 1, -1, attention.head_dim)
        query, key = attention.q_proj(x).view(shape), attention.k_proj(x).view(shape)
        if hasattr(attention, "q_norm"):                                           # Qwen3
            query, key = attention.q_norm(query), attention.k_norm(key)
        query, key = apply_rotary_pos_emb(query.transpose(1, 2), key.transpose(1, 2), cos, sin)   # [B, heads, 1, D]
        key, value = cache.layers[index].update(key, attention.v_proj(x).view(shape).transpose(1, 2))
        groups = attention.num_key_value_groups
        if groups > 1:     # a single query token: the heads of a group become its query rows
            query = query.reshape(rows, query.shape[1] // groups, groups, attention.head_dim)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=attention.scaling)
        out = out.reshape(rows, -1, 1, value.shape[-1]).transpose(1, 2).contiguous()
        hidden = hidden + attention.o_proj(out.reshape(rows, 1, -1))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return model.lm_head(inner.norm(hidden))[:, -1]


def decode_step_for(model):
    """`lean_decode_step` for a model it reproduces exactly, else `hf_decode_step`."""
    config = model.config
    inner = getattr(model, "model", None)
    lean = (config.model_type in LEAN_MODEL_TYPES and getattr(config, "_attn_implementation", None) == "sdpa"
            and model.device.type in ("cpu", "cuda") and inner is not None and hasattr(model, "lm_head")
            and all(getattr(layer.self_attn, "sliding_window", None) is None for layer in inner.layers))
    return lean_decode_step if lean else hf_decode_step
