"""A memo of deterministic sandbox cells: the same cell, with the same history, is not run twice.

`thor_min.sandbox.Sandbox` asks the memo before it forks a cell, and stores what the cell did after. Why: in RL
the G samples of one prompt often write the very same cell (3 of 4 cells of a tiny-world rollout repeat an
earlier one), and a fork costs milliseconds of kernel time that the model's own process then waits for.
Design choice: only cells that can do nothing but compute are remembered (`is_memoizable`: no import, no dunder,
no name that reaches files, the clock, randomness or the interpreter's internals), and only results that say
something about the code (no timeout, no crash, small output). Limits: the name check is a heuristic for
determinism, not a security layer (a remembered cell still ran once, isolated, in the sandbox); output that
varies between workers even for such a cell (object addresses in a repr, the order of a set of strings under
each zygote's hash seed) is pinned to its first run.
"""

import collections
import dataclasses
import re
import threading

# names through which an import-free cell could still reach randomness, the clock, files or the environment
MEMO_UNSAFE_NAMES = frozenset({
    "open", "id", "hash", "input", "eval", "exec", "compile", "breakpoint", "help", "globals", "locals", "vars",
    "dir", "getattr", "setattr", "delattr", "gi_frame", "cr_frame", "ag_frame", "tb_frame", "f_back", "f_builtins",
    "f_globals", "f_locals"})
MEMO_MAX_OUTPUT = 8 << 10   # bytes of stdout+stderr a memo entry may hold


def is_memoizable(code: str, history: list) -> bool:
    """True when a cell (with its history) can only compute: it never says "import", touches no dunder and names
    nothing in `MEMO_UNSAFE_NAMES`, so every run of it prints the same. A heuristic for determinism, not a
    security layer: a memoized cell still ran once, isolated, and its first result is what the memo returns."""
    cells = [*history, code]
    return (not any("import" in cell or "__" in cell for cell in cells)
            and not any(MEMO_UNSAFE_NAMES.intersection(re.findall(r"[A-Za-z_]\w*", cell)) for cell in cells))


class CellMemo:
    """The results of deterministic cells, by (history, code); least recently used out first. Thread-safe."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.hits = 0
        self._results = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple):
        with self._lock:
            result = self._results.get(key)
            if result is None:
                return None
            self._results.move_to_end(key)
            self.hits += 1
            return dataclasses.replace(result, seconds=0.0)

    def put(self, key: tuple, result) -> None:
        """Keep a result that says something about the code, not the machine (no timeout, no crash)."""
        if result.timed_out or result.crashed or len(result.stdout) + len(result.stderr) > MEMO_MAX_OUTPUT:
            return
        with self._lock:
            self._results[key] = dataclasses.replace(result)
            while len(self._results) > self.capacity:
                self._results.popitem(last=False)
