"""The preallocated KV cache: every layout trick must give the logits of an unpadded single-sequence forward.

Rows are fed through `RolloutCache` with a shared write cursor, per-row positions and a per-row column mask
(left padding, holes in the middle of the mask, replicated rows, dropped rows, grown capacity). Each check
compares the last logits of every row with a fresh forward of that row's real tokens alone (no cache, no
padding), for tiny random Qwen2 and Qwen3 models with SDPA attention.
"""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from thor_min.kvcache import RolloutCache, attention_bias

VOCAB = 97
ATOL = 1e-4
MODEL_KINDS = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}



@pytest.fixture(scope="module", params=sorted(MODEL_KINDS))
def model(request):
    config_class, model_class = MODEL_KINDS[request.param]
    config = config_class(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                          attn_implementation="sdpa")
    torch.manual_seed(0)
    return model_class(config).eval()


class Batch:
    """Drives a RolloutCache the way the rollout engine does: shared cursor, per-row positions and mask."""

    def __init__(self, model, capacity: int):
        self.model = model
        self.cache = RolloutCache(model.config.num_hidden_layers, capacity)
        self.mask = torch.zeros(0, capacity, dtype=torch.bool)
        self.tokens: list[list[int]] = []

    def feed(self, chunks: list[list[int]]) -> torch.Tensor:
        """Feed chunk i to row i, right-aligned in a shared block of columns (shorter chunks leave holes)."""
        if not self.tokens:
            self.tokens = [[] for _ in chunks]
            self.mask = torch.zeros(len(chunks), self.cache.capacity, dtype=torch.bool)
        width, start = max(len(c) for c in chunks), self.cache.cursor
        ids = torch.zeros(len(chunks), width, dtype=torch.long)
        positions = torch.zeros(len(chunks), width, dtype=torch.long)
        for row, chunk in enumerate(chunks):
            offset = width - len(chunk)
            ids[row, offset:] = torch.tensor(chunk, dtype=torch.long)
            positions[row, offset:] = torch.arange(len(self.tokens[row]), len(self.tokens[row]) + len(chunk))
            self.mask[row, start + offset:start + width] = True
            self.tokens[row] += chunk
        with torch.no_grad():
            out = self.model(input_ids=ids, position_ids=positions, cache=self.cache, use_cache=True,
                             attention_mask=attention_bias(self.mask[:, :start + width], width, self.model.dtype))
        return out.logits[:, -1]

    def select(self, rows: list[int]) -> None:
        self.cache.select_rows(torch.tensor(rows))
        self.mask, self.tokens = self.mask[rows], [self.tokens[i] for i in rows]

    def expand(self, repeats: int, capacity: int) -> None:
        self.cache = self.cache.expand_rows(repeats, capacity)
        mask = self.mask.repeat_interleave(repeats, dim=0)
        self.mask = torch.zeros(len(mask), capacity, dtype=torch.bool)
        self.mask[:, :mask.shape[1]] = mask[:, :capacity]
        self.tokens = [list(t) for t in self.tokens for _ in range(repeats)]

    def grow(self, capacity: int) -> None:
        self.cache.grow(capacity)
        self.mask = torch.cat([self.mask, self.mask.new_zeros(len(self.mask), capacity - self.mask.shape[1])], 1)


def assert_matches_single_forwards(model, batch: Batch, logits: torch.Tensor, what: str) -> None:
    for row, tokens in enumerate(batch.tokens):
        with torch.no_grad():
            reference = model(input_ids=torch.tensor([tokens])).logits[0, -1]
        error = (logits[row] - reference).abs().max().item()
        assert error < ATOL, f"{what}: row {row} ({len(tokens)} tokens) differs from a single forward by {error:.2e}"


def random_tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_left_padded_prefill_matches_single_forwards(model):
    batch = Batch(model, capacity=32)
    logits = batch.feed([random_tokens(n, n) for n in (5, 11, 2, 8)])
    assert_matches_single_forwards(model, batch, logits, "left-padded prefill")


def test_holes_in_the_middle_of_the_mask_are_exact(model):
    batch = Batch(model, capacity=48)
    batch.feed([random_tokens(n, n) for n in (6, 3, 9)])
    logits = batch.feed([random_tokens(4, 1), random_tokens(1, 2), random_tokens(3, 3)])    # ragged chunk
    assert_matches_single_forwards(model, batch, logits, "ragged chunk with holes")
    for step in range(3):                                                             # decode after the holes
        logits = batch.feed([random_tokens(1, 10 * step + row) for row in range(3)])
    assert_matches_single_forwards(model, batch, logits, "decode after holes")


def test_masked_columns_are_invisible(model):
    """Columns a row un-marks (a rollback) no longer influence it; its next token may reuse the position."""
    batch = Batch(model, capacity=32)
    batch.feed([random_tokens(7, 0), random_tokens(4, 1)])
    batch.feed([[5], [6]])
    batch.feed([[7], [8]])
    batch.mask[0, batch.cache.cursor - 2:batch.cache.cursor] = False     # row 0 drops its last two tokens
    batch.tokens[0] = batch.tokens[0][:-2]
    logits = batch.feed([[9], [10]])
    assert_matches_single_forwards(model, batch, logits, "after masking a row's last columns")


def test_expand_rows_replicates_each_prompt(model):
    batch = Batch(model, capacity=16)
    batch.feed([random_tokens(5, 0), random_tokens(9, 1)])
    batch.expand(3, capacity=40)
    assert batch.cache.capacity == 40 and batch.cache.cursor == 9
    for step in range(3):
        logits = batch.feed([random_tokens(1, 100 * step + row) for row in range(6)])   # rows diverge
    assert_matches_single_forwards(model, batch, logits, "after expand_rows(3)")


def test_select_rows_drops_rows_and_keeps_the_rest_exact(model):
    batch = Batch(model, capacity=40)
    batch.feed([random_tokens(n, n) for n in (4, 7, 2, 5)])
    batch.feed([random_tokens(2, row) for row in range(4)])
    batch.select([3, 1])
    logits = batch.feed([[11], [12]])
    assert_matches_single_forwards(model, batch, logits, "after select_rows([3, 1])")


def test_grow_keeps_the_filled_columns(model):
    batch = Batch(model, capacity=10)
    batch.feed([random_tokens(8, 0), random_tokens(3, 1)])
    batch.feed([[1], [2]])
    batch.grow(24)
    assert batch.cache.capacity == 24 and batch.cache.cursor == 9
    for step in range(4):
        logits = batch.feed([[3 + step], [4 + step]])
    assert_matches_single_forwards(model, batch, logits, "after grow")


def test_overflowing_the_capacity_raises(model):
    batch = Batch(model, capacity=6)
    batch.feed([random_tokens(6, 0)])
    with pytest.raises(RuntimeError, match="overflow"):
        batch.feed([[1]])


def test_attention_bias_is_causal_masked_and_finite():
    column_mask = torch.tensor([[False, True, True, True], [False, False, False, True]])
    bias = attention_bias(column_mask, 2, torch.float32)
    assert bias.shape == (2, 1, 2, 4)
    allowed = bias == 0
    assert allowed[0, 0, 0].tolist() == [False, True, True, False], "query at column 2 sees columns <= 2 it owns"
    assert allowed[0, 0, 1].tolist() == [False, True, True, True]
    assert allowed[1, 0, 0].tolist() == [False, False, False, False], "a padding query sees nothing"
    assert torch.isfinite(bias).all(), "masked entries use the dtype's minimum, never -inf (no NaN rows)"
