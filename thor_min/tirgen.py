"""TIRGen: THOR's actor-critic generator of tool-integrated SFT data (THOR.md section 2).

Goal: SFT data whose reasoning style is the policy's own, so cold-start SFT does not pull the model away
from its distribution. The loop, per attempt:
1. the **actor** (the policy itself, plain reasoning prompt, no tools) writes one chunk: at most
   `step_tokens` tokens, ended at `step_delimiter` (a blank line for real models, a line for the tiny
   world) or cut back to its last newline;
2. the **critic** rewrites that chunk alone (it never sees the problem or the answer), turning its
   computations into python cells; every cell is executed by the sandbox and its REAL output is
   spliced in as an ```output block; an attempt with a failed critic cell is dropped;
3. the actor continues from the rewritten text; repeat until a `\\boxed{}` answer, EOS or the limits.
Two critics share one interface (`rewrite(chunks) -> list[str | None]`): `LLMCritic` (any transformers
instruct model, e.g. Qwen3-32B, generating through the rollout engine, which pauses at each closing fence
and splices the real output) and `RuleCritic` (the tiny world: each `EXPR = VALUE.` statement becomes
`print(EXPR)` in python, executed, followed by the statement restated with the real value).
Then the multi-stage filter (`filter_attempts`, each stage counted): format, correct answer, code quality
(every cell passes; non-trivial: a library call or control flow, or the line-count variant), repetition,
difficulty (drop problems a plain-CoT baseline solves), one sample per problem, balance (down-sample the
one-cell bucket). Running it resumably over many problems, in rounds (one process or side by side), is
thor_min.tirgen_run.
Limits: the actor's chunk must not contain a fence itself (such attempts are dropped: code comes from the
critic only); the LLM critic prompt is ours and short, so weak critics rewrite poorly.
"""

import ast
import random
import re
from collections import Counter
from dataclasses import dataclass

from thor_min import tasks
from thor_min.data import Problem
from thor_min.grader import extract_boxed, grade_batch
from thor_min.models import build_prompt
from thor_min.rollout import RolloutRequest, SamplingConfig
from thor_min.sft import tokenize_example
from thor_min.trajectory import extract_cells, observation_block, split_segments


@dataclass
class TIRGenConfig:
    attempts: int = 8                # attempts per problem (THOR code: 8)
    step_tokens: int = 512           # L_step: 512 for non-reasoning models, 4096 for reasoning models
    step_delimiter: str = "\n\n"     # where an actor chunk ends
    max_chunks: int = 24
    max_response_tokens: int = 3200
    temperature: float = 1.0
    code_filter: str = "lines"       # lines (code, the default: > min_code_lines lines) | library (paper) | none
    min_code_lines: int = 5
    one_cell_keep: float = 0.5       # fraction of the one-cell bucket kept (THOR code: down-sample by 50 %)
    batch_size: int = 64             # rows per engine batch
    actor_sees_cells: bool = True    # False: the actor reads its text so far with cells and outputs elided
    seed: int = 0


@dataclass
class Attempt:
    """One actor-critic attempt at a problem; `dropped` says why it was abandoned ("" if it completed)."""

    problem_id: str
    response: str = ""
    dropped: str = ""
    done: bool = False


# ----------------------------------------------------------------------------------------------
# Critics


class RuleCritic:
    """The tiny world's critic: each `EXPR = VALUE.` line becomes a cell printing EXPR, then the line
    restated with the real output. It sees only the chunk."""

    name = "rule-critic"

    def __init__(self, sandbox):
        self.sandbox = sandbox

    def rewrite(self, chunks: list[str]) -> list[str | None]:
        plans = [[self._plan_line(line) for line in chunk.split("\n")] for chunk in chunks]
        codes = [step[1] for plan in plans for step in plan if step[1] is not None]
        results = iter(self.sandbox.run_batch(codes) if codes else [])
        rewritten: list[str | None] = []
        for plan in plans:
            lines, ok = [], True
            for line, code, expression in plan:
                if code is None:
                    lines.append(line)
                    continue
                result = next(results)
                ok = ok and result.passed
                cell = f"```python\n{code}\n```"
                lines.append(cell + observation_block(result.observation, cell) + f"{expression} = {result.observation}.")
            rewritten.append("\n".join(lines) if ok else None)
        return rewritten

    @staticmethod
    def _plan_line(line: str) -> tuple[str, str | None, str | None]:
        match = tasks.STATEMENT_RE.match(line.strip())
        code = tasks.statement_code(match["expression"]) if match else None
        return line, code, match["expression"] if match else None


CRITIC_INSTRUCTIONS = """You turn the computations in one step of a math solution into Python.
You see only this step: no problem statement, no answer. Keep the step's wording, but replace every \
calculation with a ```python block that print()s its result. After each block you will see the block's \
real output in an ```output block; continue the text using that output, even where it disagrees with \
the numbers the step wrote. A step without calculations is copied unchanged. Use at most 5 blocks; \
each block runs alone in a fresh interpreter, so import what you use.

Example step:
The rectangle has area 12.5 * 8 = 96, so each of the 4 equal parts has 24.

Example rewrite:
The rectangle has area
```python
print(12.5 * 8)
```
```output
100.0
```
100, so each of the 4 equal parts has
```python
print(100 / 4)
```
```output
25.0
```
25.
"""


class LLMCritic:
    """A transformers instruct model as critic, generating through the rollout engine with tools on."""

    def __init__(self, engine, max_new_tokens: int = 1024, temperature: float = 0.0, batch_size: int = 16):
        self.engine = engine
        self.name = getattr(engine.model.config, "_name_or_path", "") or "llm-critic"
        self.config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, max_tool_calls=5,
                                     stop_at_first_failure=True, batch_size=batch_size)

    def prompt(self, chunk: str) -> str:
        tokenizer = self.engine.tokenizer
        message = f"{CRITIC_INSTRUCTIONS}\nStep:\n{chunk}\n\nRewrite:"
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                                 add_generation_prompt=True, enable_thinking=False)
        return message + "\n"

    def rewrite(self, chunks: list[str]) -> list[str | None]:
        tokenizer = self.engine.tokenizer
        requests = [RolloutRequest(tokenizer.encode(self.prompt(c), add_special_tokens=False)) for c in chunks]
        rollouts = self.engine.generate(requests, self.config)
        # a failed cell, too many cells, or a rewrite cut off by max_new_tokens (part of the step lost) -> None;
        # the rewrite keeps the chunk's own trailing newlines (the actor's step delimiter)
        return [None if r.failed_cell is not None or r.finish_reason in ("budget", "length")
                else r.text.strip("\n") + (chunk[len(chunk.rstrip("\n")):] or "\n")
                for chunk, r in zip(chunks, rollouts)]


# ----------------------------------------------------------------------------------------------
# The actor-critic loop


def _cut_chunk(text: str, finished_by: str) -> str:
    """An actor chunk ends at the delimiter; a chunk cut by the token limit goes back to its last newline."""
    if finished_by == "length" and "\n" in text:
        return text[:text.rindex("\n") + 1]
    return text


CELL_AND_OUTPUT = re.compile(r"```python[ \t]*\n.*?\n```\n?```output\n.*?\n```\n", re.DOTALL)


def actor_view(response: str, config: TIRGenConfig) -> str:
    """What the actor reads before its next chunk: the rewritten text, or (`actor_sees_cells` off) that text
    without its cell + output blocks. The rule critic restates each statement with the real value after its
    output, so the elided view is plain chain-of-thought carrying the real results: in-distribution for a base
    that never saw a code block (the tiny one), while the kept sample still holds every cell and output."""
    return response if config.actor_sees_cells else CELL_AND_OUTPUT.sub("", response)


def generate_attempts(engine, critic, problems: list[Problem], config: TIRGenConfig, template: str) -> list[Attempt]:
    """Run `config.attempts` actor-critic attempts for every problem; return them all (dropped ones too)."""
    tokenizer = engine.tokenizer
    attempts = [Attempt(problem.id) for problem in problems for _ in range(config.attempts)]
    prompts = {p.id: build_prompt(template, p.question, tools=False, tokenizer=tokenizer) for p in problems}
    actor = SamplingConfig(max_new_tokens=config.step_tokens, temperature=config.temperature, max_tool_calls=0,
                           stop_strings=(config.step_delimiter,), batch_size=config.batch_size)
    for chunk_index in range(config.max_chunks):
        active = [a for a in attempts if not a.done]
        if not active:
            break
        requests = [RolloutRequest(tokenize_example(tokenizer, prompts[a.problem_id], actor_view(a.response, config),
                                                    add_eos=False).ids) for a in active]
        rollouts = engine.generate(requests, actor, seed=config.seed * 1000 + chunk_index)
        chunks = [_cut_chunk(r.text, r.finish_reason) for r in rollouts]
        rewritten = critic.rewrite(chunks)
        for attempt, rollout, chunk, new_text in zip(active, rollouts, chunks, rewritten):
            _advance(attempt, rollout, chunk, new_text, config, tokenizer)
    for attempt in attempts:
        if not attempt.done:
            attempt.done, attempt.dropped = True, "too many chunks"
    return attempts


def _advance(attempt: Attempt, rollout, chunk: str, new_text: str | None, config: TIRGenConfig, tokenizer) -> None:
    """Append one rewritten chunk to an attempt, or end the attempt (answered, dropped, or too long)."""
    if "```" in chunk:
        attempt.done, attempt.dropped = True, "actor wrote a fence"
    elif new_text is None:
        attempt.done, attempt.dropped = True, "critic cell failed"
    else:
        attempt.response += new_text
        if rollout.finish_reason == "eos" or extract_boxed(chunk) is not None:
            attempt.done = True
        elif len(tokenizer.encode(attempt.response, add_special_tokens=False)) > config.max_response_tokens:
            attempt.done, attempt.dropped = True, "too long"
        elif not chunk.strip():
            attempt.done, attempt.dropped = True, "empty chunk"


# ----------------------------------------------------------------------------------------------
# The multi-stage filter


def cell_is_nontrivial(code: str) -> bool:
    """THOR's paper rule: the cell imports something, calls a function other than print, or has control flow."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return False
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.For, ast.While, ast.If, ast.comprehension,
                             ast.FunctionDef, ast.Lambda)):
            return True
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id == "print"):
            return True
    return False


def code_quality_ok(response: str, config: TIRGenConfig) -> bool:
    """Most cells (at least half) pass the chosen non-triviality rule; every block has its output."""
    cells = extract_cells(response)
    outputs = sum(is_obs for _, is_obs in split_segments(response))
    if not cells or outputs != len(cells):
        return False
    if config.code_filter == "none":
        return True
    if config.code_filter == "lines":
        good = sum(len([l for l in c.splitlines() if l.strip() and not l.strip().startswith("#")]) > config.min_code_lines
                   for c in cells)
    elif config.code_filter == "library":
        good = sum(cell_is_nontrivial(c) for c in cells)
    else:
        raise ValueError(f"unknown code filter {config.code_filter!r}: use library, lines or none")
    return 2 * good >= len(cells)


CODE_BLOCK = re.compile(r"```python[ \t]*\n(.*?)\n```", re.DOTALL)


def is_repetitive(response: str, max_repeats: int = 3) -> bool:
    """A content line of the model's prose, or a whole cell, occurs `max_repeats`+ times (outputs ignored).

    Cells count as one unit each, not line by line: cells are stateless, so `import math` legitimately opens
    every cell; only the same cell written again and again is a loop."""
    units = []
    for segment, is_observation in split_segments(response):
        if not is_observation:
            units += [match.group(1).strip() for match in CODE_BLOCK.finditer(segment)]
            units += [line.strip() for line in CODE_BLOCK.sub("\n", segment).splitlines()
                      if len(line.strip()) > 8 and not line.strip().startswith("```")]
    return any(count >= max_repeats for count in Counter(units).values())


def format_ok(response: str) -> bool:
    """Balanced fences (every opened python block closed) and a boxed answer."""
    opened = len(re.findall(r"```python", response))
    return opened == len(extract_cells(response)) and extract_boxed(response) is not None


def filter_attempts(attempts: list[Attempt], problems: dict[str, Problem], config: TIRGenConfig,
                    cot_solved: set[str] | None = None, source: str = "") -> tuple[list[dict], dict]:
    """Apply the filter stages in order; return the kept records and per-stage counts."""
    stages: dict[str, int] = {"attempts": len(attempts)}
    survivors = [a for a in attempts if not a.dropped]
    stages["completed"] = len(survivors)
    survivors = [a for a in survivors if format_ok(a.response)]
    stages["format"] = len(survivors)
    correct = grade_batch([a.response for a in survivors], [problems[a.problem_id].golds for a in survivors])
    survivors = [a for a, ok in zip(survivors, correct) if ok]
    stages["correct_answer"] = len(survivors)
    survivors = [a for a in survivors if code_quality_ok(a.response, config)]
    stages["code_quality"] = len(survivors)
    survivors = [a for a in survivors if not is_repetitive(a.response)]
    stages["not_repetitive"] = len(survivors)
    if cot_solved is not None:
        survivors = [a for a in survivors if a.problem_id not in cot_solved]
    stages["not_solved_by_cot"] = len(survivors)
    first: dict[str, Attempt] = {}
    for attempt in survivors:
        first.setdefault(attempt.problem_id, attempt)
    survivors = list(first.values())
    stages["one_per_problem"] = len(survivors)
    rng = random.Random(config.seed)
    survivors = [a for a in survivors if len(extract_cells(a.response)) > 1 or rng.random() < config.one_cell_keep]
    stages["balanced"] = len(survivors)
    records = [{"id": a.problem_id, "problem": problems[a.problem_id].question, "answer": problems[a.problem_id].answer,
                "response": a.response, "n_cells": len(extract_cells(a.response)), "source": source}
               for a in survivors]
    stats = {"kept_per_stage": stages,
             "dropped_attempts": dict(Counter(a.dropped for a in attempts if a.dropped)),
             "cells_histogram": dict(sorted(Counter(r["n_cells"] for r in records).items())),
             "kinds": dict(Counter(problems[r["id"]].kind for r in records))}
    return records, stats
