"""The grader agrees with a careful human on MATH-style answers, and never hangs or raises."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from thor_min import grader
from thor_min.grader import Grader, extract_boxed, grade


@pytest.fixture(scope="module")
def shared_grader():
    """One worker process for the whole file (its start-up costs about a second)."""
    with Grader(timeout=10) as instance:
        yield instance
    grader.close()


# (boxed answer in the response, gold, what a careful human says)
HUMAN_TABLE = [
    ("\\frac{1}{2}", "0.5", True),
    ("0.5", "\\frac{1}{2}", True),
    ("1/2", "\\frac{1}{2}", True),
    ("\\dfrac{1}{2}", "\\frac12", True),
    ("-\\frac{1}{2}", "\\frac{-1}{2}", True),
    ("0.51", "\\frac12", False),
    ("0.333", "\\frac13", False),
    ("9.60", "9.6", True),
    ("(1, 2)", "(1,2)", True),
    ("(2, 1)", "(1, 2)", False),
    ("[0, 1)", "[0,1)", True),
    ("[0, 1]", "[0,1)", False),
    ("(-\\infty, 3]", "(-\\infty,3]", True),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", True),
    ("\\begin{bmatrix}1\\\\2\\end{bmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", True),
    ("\\begin{pmatrix}2\\\\1\\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", False),
    ("x = 5", "5", True),
    ("5", "x=5", True),
    ("x = 6", "5", False),
    ("\\{1,2\\}", "\\{2,1\\}", True),
    ("\\{1,3\\}", "\\{1,2\\}", False),
    ("3, 5, 7", "7,5,3", True),
    ("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}", True),
    ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}", True),
    ("2\\pi", "2 \\pi", True),
    ("x^2+2x+1", "(x+1)^2", True),
    ("x^2+2x", "(x+1)^2", False),
    ("3+2i", "2i+3", True),
    ("(B)", "B", True),
    ("\\text{(B)}", "B", True),
    ("B", "\\text{(B)}", True),
    ("\\textbf{(B) } 12", "B", True),
    ("(C)", "B", False),
    ("10\\text{ cm}", "10", True),
    ("10 \\text{ cm}^2", "10", True),
    ("18 dollars", "18", True),
    ("\\$18", "18", True),
    ("30^\\circ", "30", True),
    ("30", "30^{\\circ}", True),
    ("007", "7", True),
    ("1,000", "1000", True),
    ("1,\\!000", "1000", True),
    ("50\\%", "50", True),
    ("50\\%", "0.5", True),
    ("-3", "-3", True),
    ("-3", "3", False),
    ("4.4 \\times 10^{7}", "4.4e7", True),
    ("\\text{Evelyn}", "Evelyn", True),
    ("\\text{east}", "\\text{East}", True),
]


@pytest.mark.parametrize("answer, gold, expected", HUMAN_TABLE)
def test_grade_agrees_with_a_careful_human(shared_grader, answer, gold, expected):
    response = f"Some reasoning, then the answer is $\\boxed{{{answer}}}$."
    got = shared_grader.grade(response, gold)
    assert got == expected, f"grade(boxed {answer!r}, gold {gold!r}) = {got}, a human says {expected}"


def test_no_boxed_answer_is_wrong(shared_grader):
    assert not shared_grader.grade("The answer is 5.", "5"), "an unboxed answer must not count"


def test_empty_box_is_wrong(shared_grader):
    assert not shared_grader.grade("\\boxed{}", "5"), "an empty box must not count"


def test_last_box_wins(shared_grader):
    response = "First guess \\boxed{1}, but on reflection \\boxed{2}."
    assert shared_grader.grade(response, "2") and not shared_grader.grade(response, "1"), \
        "only the last \\boxed{} is the final answer"


def test_any_accepted_gold_form_matches(shared_grader):
    assert shared_grader.grade("\\boxed{10^{-3}}", ["0.002", "10^{-3}"]), "a list of golds means any of them"


def test_extract_boxed_handles_nested_braces():
    text = "so $\\boxed{\\frac{1}{\\sqrt{2}}}$ done"
    assert extract_boxed(text) == "\\frac{1}{\\sqrt{2}}", "nested braces must be kept whole"


def test_extract_boxed_handles_escaped_braces():
    assert extract_boxed("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}", "\\{ and \\} are not group braces"


def test_extract_boxed_without_braces_and_fbox():
    assert (extract_boxed("so $\\boxed 5$."), extract_boxed("\\fbox{7}")) == ("5", "7"), \
        "`\\boxed 5` and `\\fbox{}` are boxes too"


def test_extract_boxed_of_an_unclosed_last_box_is_none():
    assert extract_boxed("\\boxed{5} then \\boxed{6") is None, \
        "a response cut off inside its last box has no answer; the earlier box is stale"


def test_a_truncated_final_box_is_graded_wrong_even_if_an_earlier_box_is_right(shared_grader):
    assert not shared_grader.grade("first \\boxed{5}, finally \\boxed{6", "5"), \
        "a stale earlier box must not pass the grader (or RL's keep-filter)"


def test_extract_boxed_returns_none_without_box():
    assert extract_boxed("x = 5") is None, "no box -> None"


def test_integer_answers_never_start_a_worker():
    fresh = Grader()
    verdicts = fresh.grade_batch(["\\boxed{042}", "\\boxed{1,024}", "\\boxed{7}"], ["42", "1024", "8"])
    assert verdicts == [True, True, False] and fresh.worker_pid is None, \
        "integer answers must be decided in-process, without a worker"


def test_batch_matches_single_calls(shared_grader):
    responses = [f"\\boxed{{{answer}}}" for answer, _, _ in HUMAN_TABLE]
    golds = [gold for _, gold, _ in HUMAN_TABLE]
    single = [shared_grader.grade(r, g) for r, g in zip(responses, golds)]
    assert shared_grader.grade_batch(responses, golds) == single, "grade_batch must equal grade per item"


@pytest.mark.parametrize("response, gold", [
    (None, "5"), (12, "5"), ("\\boxed{5}", None), ("\\boxed{5}", []), ("\\boxed{" + "{" * 5000, "5"),
    ("\\boxed{\\frac{1}{0}}", "1"), ("\\boxed{\\begin{pmatrix}1\\end{pmatrix}}", "\\begin{pmatrix}"),
])
def test_strange_input_is_false_not_an_exception(shared_grader, response, gold):
    assert shared_grader.grade(response, gold) is False, f"grade({response!r:.40}, {gold!r}) must be False"


def test_pathological_input_returns_false_within_the_bound(shared_grader):
    verdict = shared_grader.grade("\\boxed{9^{9^{9^{9}}}}", "1", timeout=2)
    assert verdict is False, "a huge power tower must time out to False, not hang"


def test_grader_recovers_after_a_timeout(shared_grader):
    shared_grader.grade("\\boxed{10^{10^{10^{10}}}}", "7", timeout=1)
    assert shared_grader.grade("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt2}{2}"), \
        "after a killed worker the next slow-path call must still work"


def test_grade_works_off_the_main_thread():
    results = []

    def grade_in_thread():
        results.append(grade("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt2}"))
        results.append(grade("\\boxed{9^{9^{9^{9}}}}", "1", timeout=1))

    thread = threading.Thread(target=grade_in_thread)
    thread.start()
    thread.join(timeout=60)
    assert results == [True, False], f"from a worker thread: got {results}, expected [True, False]"


def _running(pid: int) -> bool:
    """True if the process exists and is not a zombie (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
def test_busy_worker_dies_with_its_parent():
    script = textwrap.dedent("""
        import os, threading, time
        from thor_min.grader import Grader
        instance = Grader()
        instance.grade("\\\\boxed{\\\\sqrt{4}}", "2")
        print(instance.worker_pid, flush=True)
        threading.Timer(1.0, os._exit, args=(0,)).start()  # die hard while the worker is busy
        instance.grade("\\\\boxed{9^{9^{9^{9}}}}", "1", timeout=60)
    """)
    parent = subprocess.run([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, timeout=120)
    worker_pid = int(parent.stdout.split()[0])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _running(worker_pid):
        time.sleep(0.1)
    orphaned = _running(worker_pid)
    if orphaned:
        os.kill(worker_pid, signal.SIGKILL)
    assert not orphaned, "a busy worker outlived its parent"


def test_close_stops_the_worker():
    instance = Grader()
    instance.grade("\\boxed{\\sqrt{4}}", "2")
    pid = instance.worker_pid
    instance.close()
    assert pid is not None and instance.worker_pid is None, "close() must stop the running worker"


def _worker_that_cannot_start(monkeypatch, failures: list):
    """Make every math-verify worker start fail, as a missing or broken math-verify install would."""
    def failing_worker(*args, **kwargs):
        failures.append(1)
        raise RuntimeError("the math-verify grader worker did not start")
    monkeypatch.setattr(grader, "Worker", failing_worker)


def test_a_worker_that_cannot_start_stops_grading_with_a_clear_error(monkeypatch):
    failures = []
    _worker_that_cannot_start(monkeypatch, failures)
    instance = Grader(timeout=5, start_attempts=3)
    with pytest.raises(grader.GraderError, match="failed to start 3 times"):
        instance.grade("\\boxed{\\frac{1}{2}}", "\\sqrt{1/4}")   # only math-verify can decide this pair
    assert len(failures) == 3, f"a failed start must be retried before giving up, tried {len(failures)} times"
    assert instance.use_math_verify, "a failed start must never switch math-verify off silently"


def test_a_worker_start_that_fails_once_is_retried(monkeypatch):
    real_worker, calls = grader.Worker, []

    def flaky_worker(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the math-verify grader worker did not start")
        return real_worker(*args, **kwargs)
    monkeypatch.setattr(grader, "Worker", flaky_worker)
    with Grader(timeout=10, start_attempts=3) as instance:
        assert instance.grade("\\boxed{\\frac{1}{2}}", "\\sqrt{1/4}"), "the retried worker must grade the pair"
    assert len(calls) == 2, f"one failure then one good start expected, saw {len(calls)} starts"


def test_train_py_reports_a_grader_that_cannot_start_in_one_line():
    code = textwrap.dedent("""
        import sys
        from thor_min import grader
        def fail(*a, **k): raise RuntimeError("the math-verify grader worker did not start")
        grader.Worker = fail
        import train
        import thor_min.pipeline as pipeline
        def stage(name):
            grader.Grader(start_attempts=2).grade("\\\\boxed{x^2}", "x*x")
        pipeline.run_stages = lambda run, name: stage(name)
        sys.exit(train.main(["--out", sys.argv[1], "--stage", "eval"]))
    """)
    import tempfile
    with tempfile.TemporaryDirectory(dir=os.getcwd()) as out:
        result = subprocess.run([sys.executable, "-c", code, os.path.join(out, "run")], capture_output=True,
                                text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(lines) == 1 and "failed to start 2 times" in lines[0], \
        f"expected exit 2 and one 'error:' line, got {result.returncode}: {result.stderr[-500:]}"
