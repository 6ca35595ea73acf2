"""A preallocated KV cache for batched sampling, plugged into any transformers causal LM.

Design: every layer owns two tensors `[B, H_kv, capacity, D]` allocated once. All rows of the batch
write the same column at each forward (a shared write cursor); what each row may attend to is decided by
a per-row boolean `column_mask [B, capacity]` that the rollout engine owns. So

- left-padded prompts, rows that consume tool-output tokens while others sample, and rows that rolled
  back k tokens (self-correction) are all just masked columns ("holes"); positions are per row
  (`position_ids`), so rotary embeddings stay exact;
- `update()` returns views of the filled prefix `[:, :, :cursor]`, so attention costs O(filled), not
  O(capacity), and nothing is concatenated per step (transformers' DynamicCache `torch.cat`s every step;
  its StaticCache attends over the whole capacity every step);
- rows can be replicated after a prefill (`expand_rows`, one prompt -> G samples of a GRPO group) and
  finished rows dropped (`select_rows`) by indexing the batch dimension.

The attention mask handed to the model is 4-D and additive (`attention_bias`), which transformers passes
through untouched to eager and SDPA attention. (FlashAttention-2's unpadding path ignores 4-D masks, so
models are loaded with SDPA for rollouts.) Limits: full-attention layers only (no sliding-window or
linear-attention layers), which covers Qwen2/Qwen2.5/Qwen3 dense models.
"""

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class PreallocatedLayer(CacheLayerMixin):
    """One layer's keys/values `[B, H_kv, capacity, D]`, written at the shared cursor."""

    is_compileable = False
    is_sliding = False

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0                      # filled columns (the shared cursor)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, key_dim = key_states.shape
        self.keys = key_states.new_zeros(batch, heads, self.capacity, key_dim)
        self.values = value_states.new_zeros(batch, heads, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.length, self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {end} columns > capacity {self.capacity}")
        self.keys[:, :, start:end] = key_states          # [B, H_kv, T_new, D]
        self.values[:, :, start:end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity


class RolloutCache(Cache):
    """A `Cache` of `PreallocatedLayer`s with batch-dimension surgery for the rollout engine."""

    def __init__(self, num_layers: int, capacity: int):
        super().__init__(layers=[PreallocatedLayer(capacity) for _ in range(num_layers)])

    @property
    def cursor(self) -> int:
        return self.layers[0].length

    @property
    def capacity(self) -> int:
        return self.layers[0].capacity

    def expand_rows(self, repeats: int, capacity: int) -> "RolloutCache":
        """A new cache of `capacity` columns whose row i*repeats+j copies row i (prefill once, sample G)."""
        expanded = RolloutCache(len(self.layers), capacity)
        for source, target in zip(self.layers, expanded.layers):
            filled = source.length
            keys = source.keys[:, :, :filled].repeat_interleave(repeats, dim=0)
            values = source.values[:, :, :filled].repeat_interleave(repeats, dim=0)
            target.lazy_initialization(keys, values)
            target.keys[:, :, :filled] = keys
            target.values[:, :, :filled] = values
            target.length = filled
        return expanded

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (LongTensor of batch indices), e.g. to drop finished rows."""
        for layer in self.layers:
            layer.keys = layer.keys.index_select(0, rows)
            layer.values = layer.values.index_select(0, rows)

    def grow(self, capacity: int) -> None:
        """Reallocate every layer to `capacity` columns, keeping what is filled."""
        for layer in self.layers:
            if capacity <= layer.capacity:
                continue
            keys, values = layer.keys, layer.values
            layer.capacity = capacity
            layer.lazy_initialization(keys, values)
            layer.keys[:, :, :layer.length] = keys[:, :, :layer.length]
            layer.values[:, :, :layer.length] = values[:, :, :layer.length]


def attention_bias(column_mask: torch.Tensor, query_columns: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4-D mask `[B, 1, Q, K]` for the last `query_columns` of `column_mask [B, K]`.

    Query q (at column K - Q + q) may attend to column k iff the row marks k valid and k <= its own
    column (causality). Disallowed entries get the dtype's most negative value rather than -inf, so a
    fully masked query row (a left pad) yields finite, ignored outputs instead of NaN.
    """
    batch, keys = column_mask.shape
    query_pos = torch.arange(keys - query_columns, keys, device=column_mask.device)       # [Q]
    causal = torch.arange(keys, device=column_mask.device)[None, :] <= query_pos[:, None]  # [Q, K]
    allowed = causal[None, :, :] & column_mask[:, None, :]                                  # [B, Q, K]
    bias = torch.zeros(batch, 1, query_columns, keys, dtype=dtype, device=column_mask.device)
    return bias.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
