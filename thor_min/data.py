"""Loaders of problems (`Problem`, from `thor_min.problem`, re-exported here) for every source.

`load_problems(name)` returns a list of `Problem` for:
- a bundled benchmark: math500, aime24, amc23, minerva, olympiadbench, gsm8k (JSONL files in
  `thor_min/benchmarks/`, provenance in its README.md);
- a path to a local `.jsonl` file, one JSON object per line with `problem` (or `question`) and
  `answer` (or `final_answer`; a string, a number, or a list of accepted forms), optional `id`;
- `hf:OWNER/NAME`, `hf:OWNER/NAME:SPLIT` or `hf:OWNER/NAME:CONFIG:SPLIT`, read with the
  `datasets` library (imported only then; needs network or a local cache);
- `tiny` / `tiny-heldout`: the tiny world's test / held-out split from `thor_min.tasks`.

Design: every failure is a `DataError` (a ValueError) with a one-line message naming the file
and 1-based line, so a CLI can print it without a traceback. Rows are validated as they are read.
Limits: the whole file is read into memory; Hugging Face column names are guessed from a short
list of common names (problem/question, answer/final_answer/solution).
"""

import json
from pathlib import Path
from typing import Any, Iterable

from thor_min import tasks
from thor_min.problem import Problem  # noqa: F401  (re-exported: `from thor_min.data import Problem`)


class DataError(ValueError):
    """A data source that cannot be read or a malformed row; the message is one line."""


BENCHMARK_DIR = Path(__file__).parent / "benchmarks"
BENCHMARK_FILES = {
    "math500": "math500.jsonl",
    "aime24": "aime24.jsonl",
    "amc23": "amc23.jsonl",
    "minerva": "minerva_math.jsonl",
    "olympiadbench": "olympiadbench.jsonl",
    "gsm8k": "gsm8k.jsonl",
}
TINY_SPLITS = {"tiny": "test_split", "tiny-heldout": "heldout_split"}
QUESTION_KEYS = ("problem", "question", "Problem", "Question", "prompt", "query")
ANSWER_KEYS = ("answer", "final_answer", "Answer", "expected_answer", "target", "solution")


def source_names() -> list[str]:
    """The names `load_problems` accepts besides paths and `hf:` specs."""
    return [*BENCHMARK_FILES, *TINY_SPLITS]


def load_problems(name: str, *, limit: int | None = None) -> list[Problem]:
    """Problems of a bundled benchmark, a local .jsonl, an `hf:` dataset or the tiny world."""
    if limit is not None and limit < 0:
        raise DataError(f"limit must be >= 0, got {limit}")
    if name in BENCHMARK_FILES:
        return load_jsonl(BENCHMARK_DIR / BENCHMARK_FILES[name], kind=name, limit=limit)
    if name in TINY_SPLITS:
        return _load_tiny(name)[:limit]
    if name.startswith("hf:"):
        return load_hf(name[3:], limit=limit)
    if name.endswith(".jsonl") or Path(name).is_file():
        return load_jsonl(Path(name), limit=limit)
    raise DataError(f"unknown problem source {name!r}: use one of {', '.join(source_names())}, "
                    f"a path to a .jsonl file, or hf:OWNER/NAME[:SPLIT]")


def load_jsonl(path: Path, *, kind: str | None = None, limit: int | None = None) -> list[Problem]:
    """Read one problem per non-blank line; any malformed row raises DataError naming file:line."""
    path = Path(path)
    kind = kind or path.stem
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read problems from {path}: {error}") from None
    problems: list[Problem] = []
    seen_ids: set[str] = set()
    for line_number, line in enumerate(lines, start=1):
        if limit is not None and len(problems) >= limit:
            break
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from None
        problem = problem_from_record(record, where=where, default_id=f"{kind}-{len(problems)}", kind=kind)
        if problem.id in seen_ids:
            raise DataError(f"{where}: duplicate id {problem.id!r}")
        seen_ids.add(problem.id)
        problems.append(problem)
    return problems


def _answer_text(value: Any, where: str) -> str:
    """A gold answer as a non-empty string (numbers are converted; 18.0 -> '18')."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: answer must be a string, a number or a list of them, got {value!r:.80}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    if not text:
        raise DataError(f"{where}: empty answer")
    return text


def _first_present(record: dict, keys: Iterable[str]) -> tuple[str | None, Any]:
    for key in keys:
        if record.get(key) is not None:
            return key, record[key]
    return None, None


def _gold_answers(key: str, value: Any, where: str) -> list[str]:
    """Accepted answer strings from an answer-like column (list, GSM8K '#### 42', boxed solution)."""
    values = value if isinstance(value, list) else [value]
    if not values:
        raise DataError(f"{where}: empty answer list")
    answers = [_answer_text(v, where) for v in values]
    if key == "solution" or any("\\boxed" in a or "####" in a for a in answers):
        from thor_min.grader import extract_boxed  # only for worked solutions
        answers = [a.rsplit("####", 1)[1].strip() if "####" in a else (extract_boxed(a) or "") for a in answers]
        if not all(answers):
            raise DataError(f"{where}: no final answer (#### or \\boxed{{}}) in the {key!r} column")
    return list(dict.fromkeys(answers))  # drop repeated forms, keep order


def problem_from_record(record: Any, *, where: str, default_id: str, kind: str) -> Problem:
    """Validate one row (a dict) and turn it into a Problem; errors name `where`."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    question_key, question = _first_present(record, QUESTION_KEYS)
    if question_key is None:
        raise DataError(f"{where}: missing field 'problem' (or {', '.join(QUESTION_KEYS[1:])})")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: empty or non-text {question_key!r}")
    answer_key, answer_value = _first_present(record, ANSWER_KEYS)
    if answer_key is None:
        raise DataError(f"{where}: missing field 'answer' (or {', '.join(ANSWER_KEYS[1:])})")
    answers = _gold_answers(answer_key, answer_value, where)
    solution = record.get("solution")
    reference = solution if isinstance(solution, str) and "\\boxed" in solution else ""
    problem_id = record.get("id", record.get("unique_id", default_id))
    return Problem(id=str(problem_id), question=question, answer=answers[0],
                   alternatives=tuple(answers[1:]), reference=reference, kind=kind)


def _parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """'OWNER/NAME[:CONFIG]:SPLIT' -> (repo, config, split); the split defaults to 'test'."""
    parts = spec.split(":")
    if not parts[0].count("/") == 1 or len(parts) > 3 or not all(parts):
        raise DataError(f"bad Hugging Face spec 'hf:{spec}': use hf:OWNER/NAME, hf:OWNER/NAME:SPLIT "
                        f"or hf:OWNER/NAME:CONFIG:SPLIT")
    repo, config, split = parts[0], (parts[1] if len(parts) == 3 else None), (parts[-1] if len(parts) > 1 else "test")
    return repo, config, split


def load_hf(spec: str, *, limit: int | None = None) -> list[Problem]:
    """Problems from a Hugging Face dataset, mapping common column names (see QUESTION_KEYS)."""
    repo, config, split = _parse_hf_spec(spec)
    try:
        import datasets
        rows = datasets.load_dataset(repo, config, split=split)
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"cannot load Hugging Face dataset {repo!r} (split {split!r}): {reason[:200]}; "
                        f"without network access, pass a local .jsonl file instead") from None
    kind = repo.split("/")[-1]
    problems = []
    for index, record in enumerate(rows):
        if limit is not None and index >= limit:
            break
        where = f"hf:{spec} row {index + 1}"
        problems.append(problem_from_record(dict(record), where=where, default_id=f"{kind}-{index}", kind=kind))
    return problems


def _load_tiny(name: str) -> list[Problem]:
    """The tiny world's splits, generated by `thor_min.tasks`."""
    return list(getattr(tasks, TINY_SPLITS[name])())
