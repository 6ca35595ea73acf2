"""The sandbox's memo of deterministic cells (thor_min.cell_memo): what it remembers, and what it never does."""

import pytest

from thor_min.cell_memo import CellMemo, is_memoizable
from thor_min.sandbox import ExecResult, Sandbox

TIMEOUT = 1.5


@pytest.fixture(scope="module")
def box():
    with Sandbox(workers=1, timeout=TIMEOUT) as sandbox:
        yield sandbox


def result(stdout="42\n", timed_out=False, crashed=False) -> ExecResult:
    return ExecResult(passed=not (timed_out or crashed), stdout=stdout, stderr="", timed_out=timed_out,
                      seconds=0.01, observation=stdout.strip(), crashed=crashed)


def test_a_repeated_arithmetic_cell_is_answered_from_the_memo(box):
    hits = box.memo_hits
    first, again = box.run("print(4821 * 37)"), box.run("print(4821 * 37)")
    assert box.memo_hits == hits + 1, "the second identical cell must not run again"
    assert (again.observation, again.passed, again.seconds) == (first.observation, True, 0.0), \
        f"a remembered cell gives the first run's observation, with no round trip: {first} vs {again}"


def test_a_failing_cell_is_remembered_with_its_error(box):
    first, again = box.run("print(1 / 0)"), box.run("print(1 / 0)")
    assert again.error == first.error and "ZeroDivisionError" in again.observation, \
        f"a deterministic error is as good as an output: {again}"


def test_the_history_is_part_of_the_key(box):
    two, three = box.run("print(x * 10)", ["x = 2"]), box.run("print(x * 10)", ["x = 3"])
    assert (two.observation, three.observation) == ("20", "30"), "the same cell after another history is another cell"


def test_cells_that_reach_beyond_their_code_run_every_time(box):
    hits = box.memo_hits
    for cell in ("import random\nprint(random.random())", "print(open('/proc/self/stat').read().split()[0])", "print(id(object()))", "print(().__class__)"):
        box.run(cell), box.run(cell)
    assert box.memo_hits == hits, "a cell that imports, opens files, asks for ids or touches dunders is never memoized"


def test_only_pure_computation_is_memoizable():
    assert is_memoizable("print(sum(k**2 for k in range(10)))", ["n = 10"]), "plain arithmetic is"
    for cell in ("import math\nprint(math.pi)", "print(open('x').read())", "print(hash('a'))", "exec('1')",
                 "print(getattr(1, 'real'))", "g = (x for x in [1])\nprint(g.gi_frame)", "print(().__class__)"):
        assert not is_memoizable(cell, []), f"{cell!r} could see more than its code"
    assert not is_memoizable("print(x)", ["import random\nx = random.random()"]), "an unsafe history counts too"
    assert is_memoizable("identity = 3\nprint(identity)", []), "names are matched whole, not as substrings"


def test_timeouts_crashes_and_large_outputs_are_not_remembered():
    memo = CellMemo(capacity=8)
    memo.put(("a",), result(timed_out=True))
    memo.put(("b",), result(crashed=True))
    memo.put(("c",), result(stdout="x" * 100_000))
    assert [memo.get((k,)) for k in "abc"] == [None, None, None], "only results about the code itself are kept"


def test_the_least_recently_used_entry_leaves_first():
    memo = CellMemo(capacity=2)
    memo.put(("a",), result("1\n")), memo.put(("b",), result("2\n"))
    memo.get(("a",))
    memo.put(("c",), result("3\n"))
    assert memo.get(("b",)) is None and memo.get(("a",)).stdout == "1\n", "b was the least recently used"


def test_memo_cells_zero_runs_every_cell():
    with Sandbox(workers=1, timeout=TIMEOUT, memo_cells=0) as sandbox:
        sandbox.run("print(2 + 2)"), sandbox.run("print(2 + 2)")
        assert sandbox.memo_hits == 0, "memo_cells=0 turns the memo off"
