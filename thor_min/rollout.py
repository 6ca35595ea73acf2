"""The rollout engine: batched KV-cache sampling with python cells executed mid-generation.

Every stage generates through `RolloutEngine.generate` (TIRGen's actor, RL rollouts, evaluation,
generate.py). It is a hand-written sampler over any transformers causal LM (no `model.generate`):

- Prefill once per prompt, then replicate the cache to the G rows of its group (`expand_rows`).
- One forward per step for all live rows, each writing the same column of a preallocated cache
  (`thor_min.kvcache`); per-row positions and a per-row column mask make left padding, tool output
  and rollbacks exact. Finished rows are dropped from the batch when half of it is done. For Qwen2/Qwen3
  models the step skips transformers' per-call wrappers (`thor_min.decode`, the same logits up to float rounding).
- Tool calls. When a row's text closes a ```python block, the cells closed at that step are submitted
  together to the sandbox in a background thread, and generation goes on: the row waits (feeding nothing,
  its column masked) while every other row keeps sampling, so a slow cell never stalls the batch; only when
  no row has anything to do does the engine block on the sandbox. The observation block is tokenised on its
  own and queued as *forced tokens*: the row feeds them one per step (loss mask 0, no sampling). Why forced
  tokens rather than a ragged chunk prefill: THOR caps observations at 256 chars (tens of tokens), rows close
  cells at different steps, and with forced tokens no row waits for another; rollback (below) needs no extra
  mechanism. The cost is one step per observation token for that row, paid in parallel with the others.
- Randomness is per row: row (request r, sample s) draws its uniforms from its own stream seeded by
  (seed, r, s), so its draws do not depend on when cells finish, on the batch size or on the other rows (its
  logits only up to the float rounding of other batch shapes: thor_min.sampling).
- Self-correction (THOR section 5): a failed cell is thrown away together with `backtrack_tokens` more
  tokens (never crossing the last observation) and resampled, up to `self_correct` times per failing
  cell; then the failure is kept and generation goes on. Rolling back re-masks the discarded columns and
  re-feeds the last kept token: the cache is never rebuilt. Every sampled token counts in
  `Rollout.sampled_tokens`, retries included.
- Modes for training: `stop_at_first_failure` (trajectory-level RL), `stop_after_first_cell` (step-level
  RL: continue a prefix, stop once the first block closes, execute it only to report whether it passes).

The loss mask is built from the token stream: 1 for every token the policy sampled, 0 for forced
observation tokens; prompt tokens are never part of the completion. Sampling log-probs are recorded
under temperature scaling only (top-k/top-p are for inference, THOR.md section 7).
Limits: one cache column per step for all rows (rolled-back tokens and the steps a row waits for a cell
leave masked columns behind; the cache grows when full); full-attention models (see kvcache.py); the
tokenizer must be a fast (Rust) tokenizer; `sandbox.run_batch` is called from worker threads.
"""

import bisect
import concurrent.futures
import random
from collections import deque
from dataclasses import dataclass, field

import torch

from thor_min.decode import decode_step_for
from thor_min.kvcache import RolloutCache, attention_bias
from thor_min.sampling import sample_tokens
from thor_min.trajectory import Cell, FenceTracker, Rollout, observation_block

COMPACT_MIN_ROWS = 8          # drop finished rows only from batches at least this big


@dataclass
class SamplingConfig:
    """How to sample. Defaults follow THOR's training rollouts (T = 1, no top-p, <= 5 cells)."""

    max_new_tokens: int = 512
    temperature: float = 1.0          # 0 = greedy
    top_p: float = 1.0                # inference only
    top_k: int = 0                    # inference only (0 = off)
    max_tool_calls: int = 5           # executed cells per row; 0 = plain chain-of-thought (no fences parsed)
    stop_at_first_failure: bool = False
    stop_after_first_cell: bool = False
    self_correct: int = 0             # retries per failing cell (THOR inference: 4)
    backtrack_tokens: int = 500       # L_suf: tokens dropped before a failed cell's fence when retrying
    batch_size: int = 64              # rows per forward
    ignore_eos: bool = False          # benchmarks: always generate max_new_tokens
    stop_strings: tuple[str, ...] = ()  # finish a row (reason "stop") once its text contains one of these

    @property
    def parses_fences(self) -> bool:
        return self.max_tool_calls > 0 or self.stop_after_first_cell


@dataclass
class RolloutRequest:
    """A prompt (or a prefix to continue) and how many samples to draw from it."""

    prompt_ids: list[int]
    samples: int = 1


@dataclass
class _Row:
    """Mutable per-row state while a batch is being generated."""

    rollout: Rollout
    tokens: list[int]                          # prompt + completion ids
    columns: list[int]                         # cache column of each fed token (prefix of `tokens`)
    tracker: FenceTracker = field(default_factory=FenceTracker)
    char_end: list[int] = field(default_factory=list)   # len(text) after each completion token
    to_feed: deque = field(default_factory=deque)
    decode_from: int = 0                       # incremental detokenisation window (completion indices)
    decoded_upto: int = 0
    floor: int = 0                             # rollback never goes before this completion index
    retries_by_cell: dict = field(default_factory=dict)
    stale_columns: list[int] = field(default_factory=list)   # columns to unmask before the next feed
    rng: random.Random = field(default_factory=random.Random)   # this row's uniforms for sampling
    cell_result: tuple | None = None           # (future of a sandbox batch, index in it) while a cell runs
    done: bool = False

    @property
    def n_prompt(self) -> int:
        return len(self.rollout.prompt_ids)


class RolloutEngine:
    """Samples completions from `model`, running closed python cells through `sandbox`."""

    def __init__(self, model, tokenizer, sandbox=None):
        self.model = model
        self.tokenizer = tokenizer
        self.sandbox = sandbox
        self.decode = tokenizer.backend_tokenizer.decode
        self.decode_step = decode_step_for(model)      # one token per row: a lean forward where it is exact
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos_ids = set(eos) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    # ------------------------------------------------------------------------------------------
    # Public API

    @torch.inference_mode()
    def generate(self, requests: list[RolloutRequest], config: SamplingConfig, *, seed: int = 0,
                 progress=None, first_request: int = 0) -> list[Rollout]:
        """Rollouts for every request, `samples` each, in request order. `progress(n)` is called per batch.
        `first_request` is the global index of `requests[0]` (a rank's share: row seeds use global indices)."""
        if config.parses_fences and self.sandbox is None:
            raise ValueError("tool calls need a sandbox: pass sandbox=Sandbox(...) or max_tool_calls=0")
        results: list[Rollout] = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="cells") as cell_runner:
            for batch in _batches(requests, config.batch_size):
                rows = self._prefill([requests[i] for i in batch], first_request + batch[0], config, seed)
                results.extend(self._generate_batch(*rows, config, cell_runner))
                if progress is not None:
                    progress(sum(requests[i].samples for i in batch))
        return results

    # ------------------------------------------------------------------------------------------
    # One batch

    def _generate_batch(self, cache, logits, column_mask, rows, config, cell_runner) -> list[Rollout]:
        all_rows = list(rows)
        while True:
            self._sample_step(rows, logits, config)
            self._submit_cells(rows, cell_runner)
            self._collect_cells(rows, config, block=False)
            while not any(row.to_feed for row in rows if not row.done) and any(row.cell_result for row in rows):
                self._collect_cells(rows, config, block=True)         # nothing else to do: wait for a cell
            live = [i for i, row in enumerate(rows) if not row.done]
            if not live:
                break
            if len(live) <= len(rows) // 2 and len(rows) >= COMPACT_MIN_ROWS:
                index = torch.tensor(live, device=column_mask.device)
                cache.select_rows(index)
                column_mask, rows = column_mask[index], [rows[i] for i in live]
            logits, column_mask = self._feed_step(cache, column_mask, rows)
        return [row.rollout for row in all_rows]

    def _prefill(self, requests, first_request: int, config, seed: int):
        """Prefill distinct prompts once (left-padded), then replicate each to its samples' rows."""
        device = self.model.device
        width = max(len(r.prompt_ids) for r in requests)
        input_ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long, device=device)
        prompt_mask = torch.zeros(len(requests), width, dtype=torch.bool, device=device)
        for i, request in enumerate(requests):
            input_ids[i, width - len(request.prompt_ids):] = torch.tensor(request.prompt_ids, device=device)
            prompt_mask[i, width - len(request.prompt_ids):] = True
        positions = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)                  # [P, Tp]
        small = RolloutCache(self.model.config.num_hidden_layers, width)
        out = self.model(input_ids=input_ids, position_ids=positions, cache=small, use_cache=True,
                         attention_mask=attention_bias(prompt_mask, width, self.model.dtype), logits_to_keep=1)
        repeats = torch.tensor([r.samples for r in requests], device=device)
        capacity = width + config.max_new_tokens + 16
        cache = _expand_ragged(small, repeats, capacity)
        column_mask = torch.zeros(int(repeats.sum()), capacity, dtype=torch.bool, device=device)
        column_mask[:, :width] = prompt_mask.repeat_interleave(repeats, dim=0)
        logits = out.logits[:, -1].float().repeat_interleave(repeats, dim=0)          # [B, V]
        rows = []
        for i, request in enumerate(requests):
            first_column = width - len(request.prompt_ids)
            for sample in range(request.samples):
                rollout = Rollout(request=first_request + i, sample=sample, prompt_ids=list(request.prompt_ids))
                rows.append(_Row(rollout=rollout, tokens=list(request.prompt_ids),
                                 columns=list(range(first_column, width)),
                                 rng=random.Random(f"{seed}/{first_request + i}/{sample}")))
        return cache, logits, column_mask, rows

    def _feed_step(self, cache, column_mask, rows):
        """Feed each live row its next token at the shared cursor column; return the new logits."""
        column = cache.cursor
        if column + 1 > cache.capacity:
            capacity = int(cache.capacity * 1.5) + 16
            cache.grow(capacity)
            column_mask = torch.cat([column_mask, column_mask.new_zeros(len(rows), capacity - column_mask.shape[1])], 1)
        tokens, positions, fed = [self.pad_id] * len(rows), [0] * len(rows), [False] * len(rows)
        for i, row in enumerate(rows):
            if row.stale_columns:                               # discarded by a rollback
                column_mask[i, row.stale_columns] = False
                row.stale_columns = []
            if not row.done and row.to_feed:                    # rows waiting for a cell feed nothing
                tokens[i] = row.to_feed.popleft()
                positions[i] = len(row.columns)                 # a token's position = its index in the row
                row.columns.append(column)
                fed[i] = True
        device = self.model.device
        column_mask[:, column] = torch.tensor(fed, device=device)
        inputs = torch.tensor([tokens, positions], device=device)[:, :, None]          # [2, B, 1]
        logits = self.decode_step(self.model, inputs[0], inputs[1], cache,
                                  attention_bias(column_mask[:, :column + 1], 1, self.model.dtype))
        return logits.float(), column_mask

    # ------------------------------------------------------------------------------------------
    # Sampling and bookkeeping

    def _sample_step(self, rows, logits, config) -> None:
        """Sample one token for every live row that has nothing queued to feed and no cell running."""
        ready = [i for i, row in enumerate(rows) if not row.done and not row.to_feed and row.cell_result is None]
        if not ready:
            return
        uniform = None
        if config.temperature > 0:
            uniform = torch.tensor([rows[i].rng.random() for i in ready], device=logits.device)
        tokens, logprobs = sample_tokens(logits[ready], config, uniform=uniform)
        for i, token, logprob in zip(ready, tokens.tolist(), logprobs.tolist()):
            self._append_sampled(rows[i], token, logprob, config)

    def _append_sampled(self, row: _Row, token: int, logprob: float, config: SamplingConfig) -> None:
        rollout = row.rollout
        rollout.completion_ids.append(token)
        rollout.loss_mask.append(1)
        rollout.logprobs.append(logprob)
        rollout.sampled_tokens += 1
        row.tokens.append(token)
        row.to_feed.append(token)
        if token in self.eos_ids and not config.ignore_eos:
            return self._finish(row, "eos")
        closed, piece = [], ""
        if config.parses_fences:
            piece = self._decode_increment(row)
            closed = row.tracker.append(piece)
            row.char_end.append(len(row.tracker.text))
        elif config.stop_strings:                                        # plain CoT needs no text otherwise
            piece = self._decode_increment(row)
            row.tracker.text += piece
        if piece and config.stop_strings and not closed and _ends_in_stop(row.tracker, piece, config.stop_strings):
            return self._finish(row, "stop")
        if closed:
            fence_token = bisect.bisect_right(row.char_end, row.tracker.fence_at)
            rollout.cells.append(Cell(code=closed[-1], passed=False, executed=False, observation="",
                                      fence_token=fence_token, close_token=len(rollout.completion_ids),
                                      output_end=len(rollout.completion_ids)))
            over_budget = len(rollout.executed_cells) >= config.max_tool_calls and not config.stop_after_first_cell
            if over_budget:
                return self._finish(row, "budget")
        if len(rollout.completion_ids) >= config.max_new_tokens and not row.done:
            if not (rollout.cells and rollout.cells[-1].close_token == len(rollout.completion_ids)):
                return self._finish(row, "length")

    def _decode_increment(self, row: _Row) -> str:
        """New text produced by the row's latest token (holds back incomplete UTF-8 sequences)."""
        ids = row.rollout.completion_ids
        before = self.decode(ids[row.decode_from:row.decoded_upto], skip_special_tokens=False)
        after = self.decode(ids[row.decode_from:], skip_special_tokens=False)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        row.decode_from, row.decoded_upto = row.decoded_upto, len(ids)
        return after[len(before):]

    def _finish(self, row: _Row, reason: str) -> None:
        row.done = True
        row.rollout.finish_reason = reason
        row.rollout.text = self.decode(row.rollout.completion_ids, skip_special_tokens=True)

    # ------------------------------------------------------------------------------------------
    # Cells

    def _submit_cells(self, rows, cell_runner) -> None:
        """Send every cell closed at this step to the sandbox as one batch, in the background."""
        closed = [row for row in rows if not row.done and row.cell_result is None and row.rollout.cells
                  and not row.rollout.cells[-1].executed
                  and row.rollout.cells[-1].close_token == len(row.rollout.completion_ids)]
        if closed:
            future = cell_runner.submit(self.sandbox.run_batch, [row.rollout.cells[-1].code for row in closed])
            for index, row in enumerate(closed):
                row.cell_result = (future, index)

    def _collect_cells(self, rows, config, block: bool) -> None:
        """Apply the results of finished cells: append the observation, roll back, or finish the row."""
        waiting = [row for row in rows if row.cell_result is not None]
        if block:
            concurrent.futures.wait({row.cell_result[0] for row in waiting},
                                    return_when=concurrent.futures.FIRST_COMPLETED)
        for row in waiting:
            future, index = row.cell_result
            if not future.done():
                continue
            row.cell_result, result = None, future.result()[index]
            cell = row.rollout.cells[-1]
            cell.executed, cell.passed = True, result.passed
            cell.observation, cell.error = result.observation, getattr(result, "error", "") or ""
            if config.stop_after_first_cell:
                self._finish(row, "cell")
            elif not result.passed and config.stop_at_first_failure:
                self._finish(row, "cell_error")
            elif not result.passed and self._retry_allowed(row, config):
                self._roll_back(row, config)
            else:
                self._append_observation(row, cell, config)

    def _retry_allowed(self, row: _Row, config: SamplingConfig) -> bool:
        index = len(row.rollout.cells) - 1
        used = row.retries_by_cell.get(index, 0)
        if used >= config.self_correct:
            return False
        row.retries_by_cell[index] = used + 1
        return True

    def _roll_back(self, row: _Row, config: SamplingConfig) -> None:
        """Drop the failed block and `backtrack_tokens` before it, then resample from there."""
        rollout = row.rollout
        cell = rollout.cells.pop()
        keep = max(row.floor, cell.fence_token - config.backtrack_tokens)   # completion tokens to keep
        last_kept = row.n_prompt + keep - 1                                  # index in row.tokens to re-feed
        for name in ("completion_ids", "loss_mask", "logprobs"):
            del getattr(rollout, name)[keep:]
        del row.tokens[last_kept + 1:]
        row.stale_columns = row.columns[last_kept:]  # unmasked before the next feed
        row.columns = row.columns[:last_kept]        # the re-fed token gets a fresh column
        row.to_feed = deque([row.tokens[last_kept]])
        row.char_end = row.char_end[:keep]
        row.tracker.truncate(row.char_end[-1] if row.char_end else 0)
        row.decode_from = row.decoded_upto = _decoded_prefix(row.char_end, row.floor)
        rollout.retries += 1

    def _append_observation(self, row: _Row, cell: Cell, config: SamplingConfig) -> None:
        rollout = row.rollout
        block = observation_block(cell.observation, row.tracker.text)
        ids = self.tokenizer.encode(block, add_special_tokens=False)
        rollout.completion_ids.extend(ids)
        rollout.loss_mask.extend([0] * len(ids))
        rollout.logprobs.extend([0.0] * len(ids))
        row.tokens.extend(ids)
        row.to_feed.extend(ids)
        row.tracker.append_observation(block)
        row.char_end.extend([len(row.tracker.text)] * len(ids))
        row.floor = row.decode_from = row.decoded_upto = len(rollout.completion_ids)
        cell.output_end = len(rollout.completion_ids)
        if len(rollout.completion_ids) >= config.max_new_tokens:
            self._finish(row, "length")


# ----------------------------------------------------------------------------------------------
# Helpers


def _ends_in_stop(tracker: FenceTracker, piece: str, stop_strings) -> bool:
    """Did the latest `piece` complete a stop string? Only model-written text after the last observation counts."""
    start = max(len(tracker.text) - len(piece) - max(map(len, stop_strings)) + 1, tracker.parse_floor, 0)
    tail = tracker.text[start:]
    return any(stop in tail for stop in stop_strings)


def _decoded_prefix(char_end: list[int], floor: int) -> int:
    """Completion tokens whose text is fully in the tracker: trailing tokens that added no text (bytes of an
    incomplete UTF-8 character held back by `_decode_increment`) are decoded again after a rollback."""
    kept = len(char_end)
    while kept > floor and char_end[kept - 1] == (char_end[kept - 2] if kept >= 2 else 0):
        kept -= 1
    return kept


def _expand_ragged(cache: RolloutCache, repeats: torch.Tensor, capacity: int) -> RolloutCache:
    """Replicate row i of `cache` repeats[i] times (rows in order), into a cache of `capacity` columns."""
    if bool((repeats == repeats[0]).all()):
        return cache.expand_rows(int(repeats[0]), capacity)
    index = torch.repeat_interleave(torch.arange(len(repeats), device=repeats.device), repeats)
    cache.select_rows(index)
    return cache.expand_rows(1, capacity)


def _batches(requests: list[RolloutRequest], max_rows: int) -> list[list[int]]:
    """Group consecutive requests into batches of at most `max_rows` rows (a group is never split)."""
    batches, current, rows = [], [], 0
    for i, request in enumerate(requests):
        if current and rows + request.samples > max_rows:
            batches.append(current)
            current, rows = [], 0
        current.append(i)
        rows += request.samples
    if current:
        batches.append(current)
    return batches
