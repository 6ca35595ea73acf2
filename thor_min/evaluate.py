"""Evaluation: sample k answers per problem through the rollout engine, grade them, summarise.

Used by `generate.py --bench` and by the train pipeline's eval stage. For each problem it draws
`samples` completions (tools on or off, optional self-correction) and reports, over problems:
- `accuracy` (avg@k: mean correctness of all samples) with a 95% interval over problems
  (mean +- 1.96 standard errors of the per-problem accuracies), `pass_at_k`, `maj_at_k` (majority vote on
  the normalised boxed answers), `best_of_n` (THOR's self-rewarded best-of-N: the first sample whose cells
  all passed, else the first sample);
- `cell_call_rate` (samples that executed at least one cell), `cell_pass_rate` (passing / executed cells
  in the final trajectories), `cell_attempts` (executed cells including self-corrected retries) and
  `tokens` (sampled tokens per sample, retries included: THOR's cost measure), and `kinds` (accuracy per
  problem kind: the tiny world's template, else the benchmark name).
Every sample is also returned as a `SampleRecord` (written to JSONL by the callers).
Limits: majority voting compares normalised answer strings, so equivalent forms split the vote.
"""

import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

from tqdm.auto import tqdm

from thor_min.data import Problem
from thor_min.grader import extract_boxed, grade_batch, normalize_answer
from thor_min.models import encode_prompt
from thor_min.rollout import RolloutRequest, SamplingConfig


@dataclass
class EvalConfig:
    samples: int = 4
    temperature: float = 0.6
    top_p: float = 1.0
    max_new_tokens: int = 3200
    max_tool_calls: int = 10         # THOR inference budget; 0 = plain chain-of-thought
    self_correct: int = 0            # retries per failed cell (THOR: 4)
    backtrack_tokens: int = 500      # L_suf at inference
    batch_size: int = 64
    seed: int = 0

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                              max_tool_calls=self.max_tool_calls, self_correct=self.self_correct,
                              backtrack_tokens=self.backtrack_tokens, batch_size=self.batch_size)


@dataclass
class SampleRecord:
    id: str
    problem: str
    gold: str
    completion: str
    correct: bool | None
    answer: str | None
    cells: list[dict] = field(default_factory=list)
    tokens: int = 0
    retries: int = 0
    finish_reason: str = ""
    kind: str = ""                   # the problem's template (tiny world) or benchmark name


def _interval(per_problem: list[float]) -> list[float]:
    n = len(per_problem)
    mean = sum(per_problem) / n
    variance = sum((p - mean) ** 2 for p in per_problem) / max(n - 1, 1)
    half = 1.96 * math.sqrt(variance / n)
    return [max(0.0, mean - half), min(1.0, mean + half)]


def summarise(records: list[SampleRecord], samples: int) -> dict:
    """Aggregate metrics over problems (records are grouped `samples` at a time, in problem order)."""
    groups = [records[i:i + samples] for i in range(0, len(records), samples)]
    per_problem = [sum(r.correct for r in group) / len(group) for group in groups]
    cells = [c for r in records for c in r.cells]
    majority, best = [], []
    for group in groups:
        votes = Counter(normalize_answer(r.answer) for r in group if r.answer)
        top = votes.most_common(1)[0][0] if votes else None
        majority.append(any(r.correct for r in group if r.answer and normalize_answer(r.answer) == top))
        clean = [r for r in group if r.answer and all(c["passed"] for c in r.cells)]
        best.append((clean or group)[0].correct)
    return {
        "problems": len(groups), "samples": samples,
        "accuracy": sum(per_problem) / len(per_problem), "ci95": _interval(per_problem),
        "pass_at_k": sum(p > 0 for p in per_problem) / len(per_problem),
        "maj_at_k": sum(majority) / len(majority), "best_of_n": sum(best) / len(best),
        "cell_call_rate": sum(bool(r.cells) for r in records) / len(records),
        "cell_pass_rate": sum(c["passed"] for c in cells) / len(cells) if cells else float("nan"),
        "cells_per_sample": len(cells) / len(records),
        "cell_attempts": (len(cells) + sum(r.retries for r in records)) / len(records),
        "tokens": sum(r.tokens for r in records) / len(records),
        "kinds": kind_accuracy(records),
    }


def kind_accuracy(records: list[SampleRecord]) -> dict[str, float]:
    """Accuracy per problem kind (tiny-world template or benchmark name), kinds in first-seen order."""
    totals: dict[str, list[int]] = {}
    for record in records:
        counts = totals.setdefault(record.kind, [0, 0])
        counts[0] += bool(record.correct)
        counts[1] += 1
    return {kind: correct / seen for kind, (correct, seen) in totals.items()}


def sample_rollouts(engine, problems: list[Problem], template: str, config: EvalConfig, *, tools: bool = True,
                    desc: str = "eval") -> list:
    """`config.samples` rollouts per problem, in problem order, with a progress bar (tools off: no cells)."""
    requests = [RolloutRequest(encode_prompt(engine.tokenizer, template, p.question, tools=tools), config.samples)
                for p in problems]
    sampling = config.sampling()
    if not tools:
        sampling.max_tool_calls, sampling.self_correct = 0, 0
    with tqdm(total=len(problems) * config.samples, desc=desc, unit="sample", dynamic_ncols=True) as bar:
        return engine.generate(requests, sampling, seed=config.seed, progress=bar.update)


def sample_record(problem: Problem, rollout, correct: bool | None) -> SampleRecord:
    """One sample as the record callers write to JSONL (`correct` is None when there is no gold answer)."""
    cells = [{"code": c.code, "passed": c.passed, "observation": c.observation} for c in rollout.executed_cells]
    return SampleRecord(id=problem.id, problem=problem.question, gold=problem.answer, completion=rollout.text,
                        correct=correct, answer=extract_boxed(rollout.text), cells=cells,
                        tokens=rollout.sampled_tokens, retries=rollout.retries, finish_reason=rollout.finish_reason,
                        kind=problem.kind)


def evaluate(engine, problems: list[Problem], template: str, config: EvalConfig, *, tools: bool = True,
             desc: str = "eval") -> tuple[list[SampleRecord], dict]:
    """Sample, grade and summarise `problems`; returns (per-sample records, summary dict)."""
    if not problems:
        raise ValueError("no problems to evaluate")
    started = time.time()
    rollouts = sample_rollouts(engine, problems, template, config, tools=tools, desc=desc)
    correct = grade_batch([r.text for r in rollouts], [problems[r.request].golds for r in rollouts])
    records = [sample_record(problems[r.request], r, bool(ok)) for r, ok in zip(rollouts, correct)]
    summary = summarise(records, config.samples)
    summary["seconds"] = time.time() - started
    return records, summary


def record_dict(record: SampleRecord) -> dict:
    return asdict(record)

