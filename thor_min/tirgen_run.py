"""Resumable TIRGen over many problems: rounds of problems, the raw attempts file, and the final filter pass.

TIRGen (thor_min.tirgen) attempts a round of problems at a time (`problems_per_round`, 64); each finished round
is appended to OUT/tirgen_raw.jsonl, so a killed run resumes at the round it was in. The filter then rebuilds
tirgen.jsonl and tirgen_stats.json from every raw attempt, in problem order.

Design: a round's attempts depend only on its problems and the seed (each row draws from its own seeded stream,
thor_min.rollout), so rounds can also be split into contiguous shares that run side by side, one process each
(thor_min.pipeline), each appending to its own part file (`part_path`); `pending_problems` folds finished parts
into the raw file, and the filter's problem order makes the result the same as one process's. Limits: a round
is the unit of resumption (a round cut by a kill is redone); the raw file grows with every attempt (dropped ones
too, with the reason), about 1 kB per attempt in the tiny world.
"""

import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from thor_min import distributed
from thor_min.data import Problem
from thor_min.tirgen import Attempt, TIRGenConfig, filter_attempts, generate_attempts


def _load_raw(raw_path: Path, attempts: int) -> list[Attempt]:
    """The attempts of finished problems. A round cut by a kill mid-write (a truncated last line, a problem
    with fewer than `attempts` rows) is dropped, and the file rewritten clean, so those problems are redone."""
    if not raw_path.exists():
        return []
    text, raw = raw_path.read_text(), []
    for line in text.splitlines(keepends=True):
        try:
            if not line.endswith("\n"):
                raise ValueError("unterminated line")
            raw.append(Attempt(**json.loads(line)))
        except (ValueError, TypeError):   # the write in flight when the run was killed
            break
    counts = Counter(a.problem_id for a in raw)
    complete = [a for a in raw if counts[a.problem_id] >= attempts]
    _write_clean(raw_path, text, "".join(json.dumps(asdict(a)) + "\n" for a in complete))
    return complete


@distributed.rank_zero_writes
def _write_clean(raw_path: Path, text: str, clean: str) -> None:
    """Atomically replace the raw file by its complete rounds (other ranks read the old or the new file)."""
    if clean != text:
        temp = raw_path.with_suffix(".tmp")
        temp.write_text(clean)
        temp.replace(raw_path)


@distributed.rank_zero_writes
def _append_attempts(raw_path: Path, attempts: list[Attempt]) -> None:
    with raw_path.open("a") as handle:
        for attempt in attempts:
            handle.write(json.dumps(asdict(attempt)) + "\n")


@distributed.rank_zero_writes
def _write_outputs(out_dir: Path, records: list[dict], stats: dict) -> None:
    with (out_dir / "tirgen.jsonl").open("w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    (out_dir / "tirgen_stats.json").write_text(json.dumps(stats, indent=2) + "\n")


RAW_FILE = "tirgen_raw.jsonl"


def part_path(out_dir: Path, part: int) -> Path:
    """The raw file of one side-by-side share of the rounds (folded into RAW_FILE when its job is done)."""
    return Path(out_dir) / f"tirgen_raw.part-{part}.jsonl"


def fold_parts(out_dir: Path, config: TIRGenConfig) -> list[Attempt]:
    """Append the finished attempts of the side-by-side part files, in part order, to RAW_FILE and remove the
    parts; return those attempts."""
    folded = []
    for part in sorted(Path(out_dir).glob("tirgen_raw.part-*.jsonl"), key=lambda path: int(path.stem.split("-")[-1])):
        finished = _load_raw(part, config.attempts)
        _append_attempts(Path(out_dir) / RAW_FILE, finished)
        distributed.rank_zero_writes(part.unlink)()
        folded += finished
    return folded


def pending_problems(out_dir: Path, problems: list[Problem],
                     config: TIRGenConfig) -> tuple[list[Attempt], list[Problem]]:
    """The raw attempts so far (a cut-short side-by-side run's parts folded in) and the problems left."""
    raw = _load_raw(Path(out_dir) / RAW_FILE, config.attempts) + fold_parts(out_dir, config)
    done = {a.problem_id for a in raw}
    return raw, [p for p in problems if p.id not in done]


def split_rounds(problems: list[Problem], size: int) -> list[list[Problem]]:
    """Consecutive slices of `size` problems: TIRGen's rounds, or the plain-CoT baseline's batches."""
    return [problems[start:start + size] for start in range(0, len(problems), size)]


def generate_rounds(raw_path: Path, engine, critic, rounds: list[list[Problem]], config: TIRGenConfig, template: str,
                    progress=None) -> list[Attempt]:
    """Attempt each round of problems, appending its attempts to `raw_path` as it finishes; `progress(n)` after
    n rounds (default: a tqdm bar)."""
    bar = tqdm(total=len(rounds), desc="tirgen", unit="round", dynamic_ncols=True) if progress is None else None
    attempts = []
    for done, problems in enumerate(rounds, start=1):
        attempts += (round_attempts := generate_attempts(engine, critic, problems, config, template))
        _append_attempts(raw_path, round_attempts)
        bar.update() if bar is not None else progress(done)
    if bar is not None:
        bar.close()
    return attempts


def finish_tirgen(out_dir: Path, raw: list[Attempt], problems: list[Problem], config: TIRGenConfig,
                  cot_solved: set[str] | None, source: str) -> dict:
    """Filter every raw attempt of `problems`, in problem order (whatever order the rounds finished in); write
    tirgen.jsonl and tirgen_stats.json; return the stats."""
    order = {problem.id: index for index, problem in enumerate(problems)}
    attempts = sorted((a for a in raw if a.problem_id in order), key=lambda a: order[a.problem_id])
    records, stats = filter_attempts(attempts, {p.id: p for p in problems}, config, cot_solved, source=source)
    _write_outputs(Path(out_dir), records, stats)
    return stats


def run_tirgen(out_dir: str | Path, engine, critic, problems: list[Problem], config: TIRGenConfig, template: str,
               cot_solved: set[str] | None = None, problems_per_round: int = 64) -> dict:
    """Resumable TIRGen in one process: attempts are appended to tirgen_raw.jsonl per round of problems; the filter
    then writes tirgen.jsonl and tirgen_stats.json from every raw attempt of `problems`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw, remaining = pending_problems(out_dir, problems, config)
    raw += generate_rounds(out_dir / RAW_FILE, engine, critic, split_rounds(remaining, problems_per_round), config,
                           template)
    return finish_tirgen(out_dir, raw, problems, config, cot_solved, source=getattr(critic, "name", "critic"))
