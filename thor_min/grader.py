"""Grading: is the last \\boxed{} answer of a response equivalent to the gold answer?

`grade(response, gold)` extracts the LAST `\\boxed{...}` of the response (no box -> False),
normalises both sides (`\\dfrac`, `\\left`, spacing, `$`, `\\text{}` wrappers, units, degree
signs, thousands commas) and compares them in two tiers:

1. In-process fast path for the common cases (this file): identical normalised strings, plain
   numbers compared exactly (decimals to a relative 1e-6, percentages as X or X/100),
   multiple-choice letters, `x = 5` against `5`, and case-insensitive words. Integer answers (the
   tiny world) never leave the process.
2. Everything else goes to math-verify (sympy) in a persistent worker process, each call bounded
   by `timeout` seconds (a hang counts as False and the worker is replaced on the next call). The
   worker, its line protocol and why a process kill is the bound: `thor_min/grader_worker.py`.

Design choice: `grade` never raises on strange input, and a `Grader` owns at most one worker, started
lazily, so integer-only grading costs no process at all. A worker that fails to start is retried
`START_ATTEMPTS` times and then raises `GraderError`: grading what only math-verify can decide as False
would silently corrupt RL rewards and benchmark scores. The worker is limited to `WORKER_MEMORY_BYTES`
and closed at exit.

Limits: a multiple-choice gold matches only the letter, not the value of that choice; unit
stripping is heuristic (`\\text{...}` words after a value, or plain words after a number);
answers longer than `MAX_ANSWER_CHARS` are rejected; math-verify's own quirks remain on the
slow path (e.g. it rounds floats to 6 decimal places).
"""

import functools
import logging
import re
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

from thor_min.grader_worker import Worker

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 5.0          # seconds per response on the math-verify path
STARTUP_TIMEOUT = 60.0         # seconds for the worker to import sympy and math-verify
START_ATTEMPTS = 3             # a worker that fails to start is retried this often, then the run stops
MAX_ANSWER_CHARS = 1000        # longer boxed answers are rejected outright
WORKER_MEMORY_BYTES = 4 << 30  # address-space limit of the worker process
RELATIVE_TOLERANCE = Fraction(1, 10**6)  # for decimals written with a point or exponent

Gold = str | Sequence[str]

# ----------------------------------------------------------------------------- extraction

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def _brace_pairs(text: str) -> dict[int, int]:
    """Index of each '{' -> index of its matching '}' (escaped \\{ \\} are skipped)."""
    pairs, open_stack, i = {}, [], 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 1  # skip the escaped character
        elif char == "{":
            open_stack.append(i)
        elif char == "}" and open_stack:
            pairs[open_stack.pop()] = i
        i += 1
    return pairs


def _braced_content(text: str, open_index: int) -> str | None:
    """Content of the brace group opening at text[open_index] ('{'), or None if unclosed."""
    close_index = _brace_pairs(text).get(open_index)
    return None if close_index is None else text[open_index + 1:close_index]


def extract_boxed(text: str) -> str | None:
    """Content of the LAST `\\boxed{...}` (or `\\fbox{...}`, or `\\boxed 5`); None if there is none or the last
    one is unclosed: a response cut off inside its final box has no answer (an earlier box is stale)."""
    if not isinstance(text, str):
        return None
    last = None
    for last in _BOX_COMMAND.finditer(text):
        pass
    if last is None:
        return None
    after = re.match(r"\s*", text[last.end():last.end() + 100]).end() + last.end()
    if text.startswith("{", after):
        content = _braced_content(text, after)   # one linear pass, so many unclosed braces stay cheap
        return None if content is None else content.strip()
    token = re.match(r"[^\s${]*", text[after:after + MAX_ANSWER_CHARS + 1]).group()
    return token if after > last.end() and token else None   # "\boxed 5": one token up to a space or `$`


# ----------------------------------------------------------------------------- normalisation

_REPLACEMENTS = (
    ("\u2212", "-"), ("\u03c0", "\\pi "), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\displaystyle", ""),
    ("~", " "), ("\\$", ""), ("$", ""), ("bmatrix", "pmatrix"), ("^{\\circ}", ""), ("^\\circ", ""), ("\u00b0", ""),
    ("^\\degree", ""), ("\\degree", ""), ("{,}", ","), ("\\%", "%"), ("%", "\\%"),
)
_SPACING = re.compile(r"\\\\|\\[,;:!> ]")  # a row break `\\` is kept; \, \; \! ... go
_SIZING = re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)(?![A-Za-z])")
_TEXT_GROUP = re.compile(r"\\(text|textrm|textnormal|mbox|mathrm|textbf|textit|mathbf|mathit)\s*\{")
_UNIT_COMMANDS = {"text", "textrm", "textnormal", "mbox", "mathrm"}
_WORDS = re.compile(r"[A-Za-z][A-Za-z .'/-]*")
_TRAILING_EXPONENT = re.compile(r"\s*\^(?:\{[^{}]*\}|-?\w)")
_BARE_UNITS = re.compile(r"(?P<value>[-+]?[\d.,]*\d(?:\\%)?)\s+(?P<unit>[A-Za-z]{2,}(?:\s+[A-Za-z]+)*)\.?"
                         r"(?:\^\{?-?\d+\}?)?")
_MATH_WORDS = {"pi", "sqrt", "log", "ln", "sin", "cos", "tan", "and", "or"}
_COMMAND_SPACE = re.compile(r"(\\[A-Za-z]+) (?=[^A-Za-z])")
_SPACE_TO_DROP = re.compile(r"(?<![A-Za-z0-9]) | (?![A-Za-z0-9])")
_SHORT_FRAC = re.compile(r"\\frac(\d)(\d)")


def _is_unit(command: str, words: str, before: str) -> bool:
    """A `\\text{...}`-like group of words that follows a value, e.g. the ` cm` in `5\\text{ cm}`."""
    return (command in _UNIT_COMMANDS and bool(before.strip()) and bool(_WORDS.fullmatch(words))
            and words.lower() not in _MATH_WORDS and (command != "mathrm" or len(words) >= 2))


def _rewrite_text_groups(answer: str) -> str:
    """Unwrap `\\text{...}`-like groups; drop unit words that follow a value; 'and' -> ','."""
    match = _TEXT_GROUP.search(answer)
    while match:
        content = _braced_content(answer, match.end() - 1)
        if content is None:
            break
        before, after = answer[:match.start()], answer[match.end() + len(content) + 1:]
        words = content.strip()
        if words in ("and", "or", ","):
            replacement = ","
        elif _is_unit(match.group(1), words, before):
            exponent = _TRAILING_EXPONENT.match(after)  # the ^2 of \text{ cm}^2
            replacement, after = " ", after[exponent.end():] if exponent else after
        else:
            replacement = content
        answer = before + replacement + after
        match = _TEXT_GROUP.search(answer, len(before))  # re-scan unwrapped content
    return answer


@functools.lru_cache(maxsize=65536)
def normalize_answer(answer: str) -> str:
    """Canonical string form of an answer: what the fast path compares and the worker parses."""
    text = str(answer).strip()
    inner = extract_boxed(text)
    text = inner if inner is not None else text
    for old, new in _REPLACEMENTS:
        text = text.replace(old, new)
    text = _SPACING.sub(lambda m: {"\\\\": "\\\\", "\\ ": " "}.get(m.group(), ""), text)
    text = _SIZING.sub("", text)
    text = _rewrite_text_groups(text)
    text = re.sub(r"\s+", " ", text).strip()
    bare = _BARE_UNITS.fullmatch(text)
    if bare and bare.group("unit").lower() not in _MATH_WORDS:
        text = bare.group("value")
    text = _SPACE_TO_DROP.sub("", _COMMAND_SPACE.sub(r"\1", text))
    text = _SHORT_FRAC.sub(r"\\frac{\1}{\2}", text)
    return text.rstrip(".,;").strip()


# ----------------------------------------------------------------------------- fast path

@dataclass(frozen=True)
class Number:
    """A plain number as written: its exact value, whether it was inexact, whether a percent."""

    value: Fraction
    inexact: bool
    percent: bool


_DECIMAL = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|[-+]?\.\d+"
_SCIENTIFIC = re.compile(rf"(?P<mantissa>{_DECIMAL})(?:[eE]|\\times10\^|\\cdot10\^)\{{?(?P<exp>[-+]?\d{{1,4}})\}}?")
_FRACTION = re.compile(r"(?P<sign>-?)\\frac\{(?P<num>[-+]?\d+)\}\{(?P<den>[-+]?\d+)\}|(?P<num2>[-+]?\d+)/(?P<den2>\d+)")


def parse_number(text: str) -> Number | None:
    """Parse integers (commas, leading zeros), decimals, 1.5e3 / 1.5\\times10^{3}, a/b, \\frac{a}{b}, X\\%."""
    percent = text.endswith("\\%")
    text = text[:-2] if percent else text
    if len(text) > 100:
        return None
    if re.fullmatch(_DECIMAL, text):
        return Number(Fraction(text.replace(",", "")), "." in text, percent)
    if match := _SCIENTIFIC.fullmatch(text):
        mantissa = Fraction(match["mantissa"].replace(",", ""))
        return Number(mantissa * Fraction(10) ** int(match["exp"]), True, percent)
    if match := _FRACTION.fullmatch(text):
        numerator, denominator = int(match["num"] or match["num2"]), int(match["den"] or match["den2"])
        if denominator == 0:
            return None
        sign = -1 if (match["sign"] or "") == "-" else 1
        return Number(sign * Fraction(numerator, denominator), False, percent)
    return None


def _close(x: Fraction, y: Fraction, inexact: bool) -> bool:
    if not inexact:
        return x == y
    return abs(x - y) <= RELATIVE_TOLERANCE * max(abs(x), abs(y))


def _numbers_equal(a: Number, b: Number) -> bool:
    inexact = a.inexact or b.inexact
    a_values = (a.value, a.value / 100) if a.percent else (a.value,)
    b_values = (b.value, b.value / 100) if b.percent else (b.value,)
    return any(_close(x, y, inexact) for x in a_values for y in b_values)


_CHOICE_GOLD = re.compile(r"\(?([A-E])\)?")
_CHOICE_ANSWER = re.compile(r"\(([A-Ea-e])\).*|([A-Ea-e])\)?")
_ASSIGNMENT = re.compile(r"(?:[A-Za-z]|\\[A-Za-z]+)(?:_\{?[A-Za-z0-9]+\}?)?=(?!=)")
_PLAIN_WORDS = re.compile(r"[A-Za-z][A-Za-z ]*")


def _strip_assignment(text: str, other: str) -> str:
    """`x=5` -> `5` when the other side is not an equation (one `=`, a bare variable on the left)."""
    if "=" in other or text.count("=") != 1:
        return text
    match = _ASSIGNMENT.match(text)
    return text[match.end():] if match else text


def fast_match(answer: str, gold: str) -> bool | None:
    """Compare two normalised answers in-process; None means 'undecided, ask math-verify'."""
    answer, gold = _strip_assignment(answer, gold), _strip_assignment(gold, answer)
    if answer == gold:
        return True
    if choice := _CHOICE_GOLD.fullmatch(gold):
        picked = _CHOICE_ANSWER.fullmatch(answer)
        return bool(picked) and (picked[1] or picked[2]).upper() == choice[1]
    answer_number, gold_number = parse_number(answer), parse_number(gold)
    if answer_number is not None and gold_number is not None:
        return _numbers_equal(answer_number, gold_number)
    if _PLAIN_WORDS.fullmatch(answer) and _PLAIN_WORDS.fullmatch(gold) and answer.lower() == gold.lower():
        return True
    return None


# ----------------------------------------------------------------------------- public API

def _golds_list(gold: Gold) -> list[str]:
    golds = [gold] if isinstance(gold, (str, int, float)) else list(gold)
    return [str(g) for g in golds if g is not None and str(g).strip()]


class GraderError(RuntimeError):
    """The math-verify worker could not be started: symbolic answers cannot be graded, so the run stops
    (grading them False instead would silently corrupt rewards and scores)."""


class Grader:
    """Grades responses against gold answers; owns (lazily) one math-verify worker process."""

    def __init__(self, timeout: float = DEFAULT_TIMEOUT, *, use_math_verify: bool = True,
                 memory_bytes: int = WORKER_MEMORY_BYTES, startup_timeout: float = STARTUP_TIMEOUT,
                 start_attempts: int = START_ATTEMPTS):
        self.timeout = timeout
        self.use_math_verify = use_math_verify   # False: the fast path alone, by the caller's explicit choice
        self.memory_bytes = memory_bytes
        self.startup_timeout = startup_timeout
        self.start_attempts = start_attempts
        self.worker_restarts = 0  # how many times a hung or crashed worker was killed
        self._worker: Worker | None = None
        self._lock = threading.Lock()

    @property
    def worker_pid(self) -> int | None:
        """Process id of the running math-verify worker, or None if none is running."""
        worker = self._worker
        return worker.process.pid if worker is not None and worker.alive() else None

    def grade(self, response: str, gold: Gold, timeout: float | None = None) -> bool:
        """True iff the last boxed answer of `response` is equivalent to `gold` (or one of them)."""
        return self.grade_batch([response], [gold], timeout=timeout)[0]

    def grade_batch(self, responses: Sequence[str], golds: Sequence[Gold],
                    timeout: float | None = None) -> list[bool]:
        """Grade many responses; each slow-path item gets its own `timeout` bound."""
        if len(responses) != len(golds):
            raise ValueError(f"{len(responses)} responses but {len(golds)} golds")
        verdicts: list[bool] = [False] * len(responses)
        pending: dict[tuple[str, tuple[str, ...]], list[int]] = {}
        for index, (response, gold) in enumerate(zip(responses, golds)):
            try:
                key = self._fast_grade(response, gold)
            except Exception:  # never raise on strange input
                log.debug("grader fast path failed", exc_info=True)
                continue
            if isinstance(key, tuple):  # (normalised answer, undecided normalised golds)
                pending.setdefault(key, []).append(index)
            else:
                verdicts[index] = key
        for (answer, undecided), indices in pending.items():
            verdict = self._slow_grade(answer, list(undecided), timeout or self.timeout)
            for index in indices:
                verdicts[index] = verdict
        return verdicts

    def _fast_grade(self, response: str, gold: Gold) -> bool | tuple[str, tuple[str, ...]]:
        """True/False if decided in-process, else (answer, golds) for math-verify to decide."""
        boxed = extract_boxed(response)
        if not boxed or len(boxed) > MAX_ANSWER_CHARS:
            return False
        answer = normalize_answer(boxed)
        undecided = []
        for gold_text in _golds_list(gold):
            normalised = normalize_answer(gold_text)
            verdict = fast_match(answer, normalised)
            if verdict:
                return True
            if verdict is None:
                undecided.append(normalised)
        if not undecided or not self.use_math_verify:
            return False
        return answer, tuple(undecided)

    def _slow_grade(self, answer: str, golds: list[str], timeout: float) -> bool:
        with self._lock:
            if self._worker is None or not self._worker.alive():
                self._worker = self._start_worker()
            verdict = None
            try:
                verdict = self._worker.verify(answer, golds, timeout)
            finally:  # hung, crashed or interrupted: kill it; the next call starts a fresh one
                if verdict is None:
                    self._worker.close()
                    self._worker = None
                    self.worker_restarts += 1
            return bool(verdict)

    def _start_worker(self) -> Worker:
        """A fresh worker; a failed start is retried `start_attempts` times, then raises GraderError."""
        failure = None
        for attempt in range(1, self.start_attempts + 1):
            try:
                return Worker(self.memory_bytes, self.startup_timeout)
            except Exception as error:  # noqa: BLE001 -- any failure to start counts as one attempt
                failure = error
                log.warning("math-verify worker failed to start (attempt %d of %d): %s", attempt,
                            self.start_attempts, error)
                time.sleep(0.2 * attempt)
        raise GraderError(f"the math-verify grader worker failed to start {self.start_attempts} times ({failure}); "
                          f"check that math-verify imports (python -c 'import math_verify') and that memory is free")

    def close(self) -> None:
        """Stop the worker process (a later call starts a new one)."""
        with self._lock:
            if self._worker is not None:
                self._worker.close()
                self._worker = None

    def __enter__(self) -> "Grader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


_default_grader: Grader | None = None
_default_lock = threading.Lock()


def default_grader() -> Grader:
    """The module-level Grader behind `grade`/`grade_batch`, created on first use."""
    global _default_grader
    with _default_lock:
        if _default_grader is None:
            _default_grader = Grader()
        return _default_grader


def grade(response: str, gold: Gold, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """True iff the last \\boxed{} answer in `response` is equivalent to `gold` (any of a sequence)."""
    return default_grader().grade(response, gold, timeout=timeout)


def grade_batch(responses: Sequence[str], golds: Sequence[Gold], timeout: float = DEFAULT_TIMEOUT) -> list[bool]:
    """`grade` over many responses (deduplicated; one worker round trip per distinct slow item)."""
    return default_grader().grade_batch(responses, golds, timeout=timeout)


def close() -> None:
    """Stop the default grader's worker (it also stops by itself at interpreter exit)."""
    if _default_grader is not None:
        _default_grader.close()
