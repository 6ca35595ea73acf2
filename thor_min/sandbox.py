"""The code tool: run model-written Python cells fast and isolated, and format what THOR feeds back.

    with Sandbox(workers=2, timeout=5.0) as sandbox:
        result = sandbox.run("print(pow(7, 222, 1000))")          # ExecResult(passed=True, observation='49', ...)
        results = sandbox.run_batch(["print(4821 * 37)", "1/0"])  # parallel across workers, in input order

Design: each worker is a warm fork server (`thor_min.zygote`), a fresh interpreter started with a minimal
environment that has already imported the preloaded modules (the broad stdlib set below plus math, numpy and
sympy by default) and warmed sympy up. Every cell runs in a new child forked from it, so it starts clean in
milliseconds and sees no state of any other cell; a cell that never says "import" goes to a second, light set
of workers that preloaded only the stdlib set (a fork costs in proportion to the zygote's memory; see
`Sandbox`). Cells are stateless, as in THOR; `history` replays earlier
cells of the same trajectory silently before the cell (a notebook-like mode; the wall-clock budget is then
`timeout` per replayed cell too). The zygote enforces the timeout and the output cap and kills everything the
cell started; this controller adds a safety timeout on top and transparently restarts a zygote that died or
wedged (the cell running at that moment gets a failed result with `crashed=True`). Which isolation layers apply
depends on the machine (see `thor_min/zygote.py`; `Sandbox.layers` lists them): as root on Linux, PID,
network and mount namespaces, a read-only filesystem and a dropped uid with RLIMIT_NPROC; without
CAP_SYS_ADMIN or as a non-root user, the same namespaces inside a user namespace but no uid drop (so no
process-count limit); with no namespaces at all ("plain"), rlimits, process-group kill, a subreaper that kills
leftovers, a scrubbed environment, and the uid drop when root. If namespace set-up fails, the worker falls
back to plain mode and `layers` says why.

THOR's rules (`cell_passed`, `format_observation`): a cell passes when it exits cleanly (status 0, which
includes `sys.exit(0)`/`sys.exit()`) AND prints something to stdout (whitespace alone does not count). The
observation is stdout on success; otherwise a one-line error: the last line of stderr (the exception line), or
a fixed message for a timeout, the output cap, a signal, a bare non-zero exit, or no output at all. Longer than
`OBSERVATION_LIMIT` characters -> first 128 + "..." + last 128 (a 256-character text is kept whole).

Limits: Linux only. Output is capped in bytes and decoded as UTF-8 with replacement characters; printing an
int is limited to 100,000 digits; `seconds` is the controller's round trip, start-up excluded. A zygote exits
when its request pipe closes (the controller exited), at the latest one cell timeout later: PR_SET_PDEATHSIG
is not used on that link because it fires when the *thread* that started the zygote exits (a pool thread may
restart workers). Two sandboxes on one machine share the cell uids (`zygote.UID_BASE` + slot), and with them
the RLIMIT_NPROC budget (`Sandbox.slots` of them: both pools). A preloaded worker that cannot start when its
first cell comes raises SandboxError from `run` (`start()` up front checks them all).
"""

import concurrent.futures
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import asdict, dataclass

from thor_min import zygote
from thor_min.cell_memo import CellMemo, is_memoizable

DEFAULT_PRELOAD = ("math", "numpy", "sympy")
STDLIB_PRELOAD = (  # imported before any uid drop, so they work even when the interpreter is unreadable
    "math", "cmath", "fractions", "decimal", "itertools", "functools", "collections", "collections.abc",
    "statistics", "random", "re", "string", "heapq", "bisect", "operator", "datetime", "json", "copy", "numbers",
    "traceback", "linecache", "io", "time", "array", "struct", "typing", "dataclasses", "enum", "textwrap",
    "pprint", "hashlib", "base64", "calendar", "contextlib", "csv", "unicodedata", "warnings", "weakref", "abc",
    "inspect", "ast", "tempfile", "pathlib", "glob", "fnmatch", "threading", "queue", "concurrent.futures",
    "subprocess", "socket", "encodings.idna", "zlib", "pickle", "secrets", "uuid", "timeit", "locale", "ctypes",
    "signal", "sysconfig")
WARM_UPS = {  # first calls load sympy's lazy modules and fill its caches once, in the zygote
    "sympy": """
import sympy as sp
x, y = sp.symbols('x y')
sp.solve(x**3 - 2*x - 5, x); sp.solve([x + y - 3, x - y - 1], [x, y]); sp.simplify(sp.sin(x)**2 + sp.cos(x)**2)
sp.integrate(x**2 * sp.sin(x), x); sp.factorint(2**64 + 1); sp.nsimplify(0.3333333333); sp.N(sp.pi, 30)
sp.limit(sp.sin(x) / x, x, 0); sp.series(sp.exp(x), x, 0, 5); sp.Matrix([[1, 2], [3, 4]]).det()
sp.expand((x + y)**5); sp.factor(x**4 - 1); sp.isprime(97); sp.binomial(10, 3); sp.summation(1 / x**2, (x, 1, sp.oo))
sp.diff(sp.tan(x), x); sp.Rational(3, 4) + sp.Rational(1, 6); sp.gcd(12, 18); sp.latex(x**2); str(sp.sqrt(8))
""",
    "numpy": """
import numpy as np
np.linalg.solve(np.eye(2), np.ones(2)); np.fft.fft(np.ones(4)); np.polynomial.Polynomial([1, 2]).roots()
np.random.default_rng(0).random(3); np.linalg.eigvals(np.eye(2)); str(np.arange(3))
"""}
ZYGOTE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "OPENBLAS_NUM_THREADS": "1",
              "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
OBSERVATION_LIMIT, OBSERVATION_HALF = 256, 128
NO_OUTPUT_MESSAGE = "NoOutputError: the code ran but printed nothing; print() the result"
CRASH_MESSAGE = "SandboxError: the sandbox worker died during this cell and was restarted"
SAFETY_MARGIN_SECONDS = 5.0


class SandboxError(RuntimeError):
    """The sandbox itself failed (a worker could not start); never raised for anything a cell does."""


@dataclass
class ExecResult:
    """What one cell did. `observation` is the text THOR shows the model; `error` is "" when it passed."""
    passed: bool
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float
    observation: str
    exit_code: int | None = None  # None when a signal ended the cell
    signal: int | None = None
    truncated: bool = False  # the output cap was hit and the cell was stopped
    error: str = ""
    crashed: bool = False  # the worker died during the cell (an infrastructure failure)


def cell_passed(exit_code: int | None, timed_out: bool, truncated: bool, stdout: str) -> bool:
    """THOR's pass rule: exited cleanly AND printed something."""
    return exit_code == 0 and not timed_out and not truncated and bool(stdout.strip())


def error_line(raw: dict, timeout: float, output_cap: int) -> str:
    """One line saying why a cell failed, the way THOR reduces errors (exception text's last line)."""
    if raw["timed_out"]:
        return f"TimeoutError: the cell ran longer than {timeout:g} seconds and was stopped"
    if raw["truncated"]:
        return f"OutputLimitError: the cell printed more than {output_cap} bytes and was stopped"
    if raw["signal"] is not None:
        try:
            name = signal.Signals(raw["signal"]).name
        except ValueError:
            name = str(raw["signal"])
        return f"KilledError: the cell was killed by signal {name}"
    lines = [line for line in raw["stderr"].splitlines() if line.strip()]
    if raw["exit_code"] != 0:
        return lines[-1].strip() if lines else f"SystemExit: {raw['exit_code']}"
    return NO_OUTPUT_MESSAGE


def format_observation(passed: bool, stdout: str, error: str) -> str:
    """stdout on success, else the error line; more than 256 characters -> first 128 + "..." + last 128."""
    text = stdout.rstrip() if passed else error
    if len(text) > OBSERVATION_LIMIT:
        text = text[:OBSERVATION_HALF] + "..." + text[-OBSERVATION_HALF:]
    return text


def build_result(raw: dict, timeout: float, output_cap: int, seconds: float) -> ExecResult:
    passed = cell_passed(raw["exit_code"], raw["timed_out"], raw["truncated"], raw["stdout"])
    error = "" if passed else error_line(raw, timeout, output_cap)
    return ExecResult(passed=passed, stdout=raw["stdout"], stderr=raw["stderr"], timed_out=raw["timed_out"],
                      seconds=seconds, observation=format_observation(passed, raw["stdout"], error),
                      exit_code=raw["exit_code"], signal=raw["signal"], truncated=raw["truncated"], error=error)


def uses_light_pool(code: str, history: list) -> bool:
    """A cell (with its history) that never says "import" cannot reach a preloaded module, so it runs the same
    in a zygote that preloaded only the stdlib set, whose fork costs a fraction (see `Sandbox`)."""
    return "import" not in code and not any("import" in cell for cell in history)


def crashed_result(seconds: float) -> ExecResult:
    return ExecResult(passed=False, stdout="", stderr="", timed_out=False, seconds=seconds,
                      observation=CRASH_MESSAGE, error=CRASH_MESSAGE, crashed=True)


class ZygoteProcess:
    """One warm zygote and its two pipes; restarted when it dies or wedges."""

    def __init__(self, config: zygote.ZygoteConfig, startup_timeout: float):
        self.config = config
        self.startup_timeout = startup_timeout
        self.process = None
        self.ready = {}
        self.notes = []
        self.restarts = 0

    def spawn(self) -> None:
        command = [sys.executable, "-I", zygote.__file__, json.dumps(asdict(self.config))]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=ZYGOTE_ENV,
                                        close_fds=True, start_new_session=True, cwd="/")

    def wait_ready(self) -> None:
        """Wait for the ready message; if namespace set-up failed under "auto", fall back to plain mode once."""
        message = zygote.recv_message(self.process.stdout.fileno(), time.monotonic() + self.startup_timeout)
        if message is not None and "error" not in message:
            self.ready = message
            self.ready["layers"] += self.notes
            return
        self.stop(grace_seconds=0.0)
        detail = "no answer" if message is None else message["error"].strip().splitlines()[-1]
        if self.config.isolation != "auto":
            raise SandboxError(f"sandbox worker {self.config.slot} failed to start: {detail}")
        self.config.isolation = "plain"
        self.notes.append(f"namespaces failed ({detail}); running in plain mode")
        self.spawn()
        self.wait_ready()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def execute(self, request: dict, budget: float) -> dict | None:
        """Send one cell, wait for its outcome; None (and the zygote killed) if it died or overran."""
        for attempt in range(2):
            if not self.alive():
                self.restarts += self.process is not None
                self.spawn()
                self.wait_ready()
            try:
                zygote.send_message(self.process.stdin.fileno(), request)
                break
            except OSError:  # died between cells: restart once, transparently
                self.stop()
        else:
            return None
        reply = zygote.recv_message(self.process.stdout.fileno(), time.monotonic() + budget + SAFETY_MARGIN_SECONDS)
        if reply is None:
            self.stop(grace_seconds=0.0)
        return reply

    def stop(self, grace_seconds: float = 1.0) -> None:
        """Close the pipes (a healthy zygote exits on EOF), then SIGKILL its process group if it lingers."""
        if self.process is None:
            return
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass
        try:
            self.process.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)  # a PID-namespace zygote also has PDEATHSIG
            except ProcessLookupError:
                pass
            self.process.wait()


def stop_all(zygotes: list, temp_root: str) -> None:
    for process in zygotes:
        process.stop()
    shutil.rmtree(temp_root, ignore_errors=True)


class Sandbox:
    """A pool of warm zygotes. `run` and `run_batch` never raise for anything a cell does.

    Options: `workers` (default: CPU count), per-cell `timeout` in seconds, `memory_limit` (address space,
    bytes), `output_limit` (bytes of stdout+stderr before the cell is stopped), `preload` (modules imported once
    in each zygote, on top of `STDLIB_PRELOAD`), `file_size_limit` (bytes per written file), `max_processes`
    (processes+threads per cell when a uid drop is in force), `isolation` ("auto", or "plain" to skip the
    namespaces), `int_max_str_digits`, `light_cells`, `memo_cells`.

    The light pool (`light_cells`, on by default when `preload` adds modules): a second set of `workers`
    zygotes that preload only `STDLIB_PRELOAD`, with the same isolation, for cells that never say "import" (most
    arithmetic cells: `print(4821 * 37)`). Forking a zygote copies its page tables and the child's exit tears
    them down, so a cell costs in proportion to the zygote's memory: measured on 2 Zen 4 cores, 11.5 ms of machine
    CPU per arithmetic cell from the numpy+sympy zygote (62 MB), 5.6 ms from the light one.

    The memo (`memo_cells` entries, 0 = off): a cell that can only compute (`thor_min.cell_memo`) and was run before
    with the same history gets the earlier result back (`seconds` 0) instead of a fork. In RL the G samples of a
    prompt often write the same cell: 3/4 of a tiny-world rollout's cells are repeats. Timeouts and crashes are
    never remembered. Output that varies between workers even for such a cell (object addresses in a repr, the
    order of a set of strings under each zygote's hash seed) is pinned to its first run.
    """

    def __init__(self, workers: int | None = None, timeout: float = 5.0, memory_limit: int = 1 << 30,
                 output_limit: int = 256 << 10, preload: tuple = DEFAULT_PRELOAD, file_size_limit: int = 16 << 20,
                 max_processes: int = 32, isolation: str = "auto", int_max_str_digits: int = 100_000,
                 startup_timeout: float = 120.0, light_cells: bool = True, memo_cells: int = 4096):
        if isolation not in ("auto", "plain"):
            raise ValueError(f"isolation must be 'auto' or 'plain', not {isolation!r}")
        self.workers = max(1, workers or os.cpu_count() or 1)
        self.timeout = float(timeout)
        self.output_limit = int(output_limit)
        self._memo = CellMemo(int(memo_cells)) if memo_cells > 0 else None
        self.temp_root = tempfile.mkdtemp(prefix="thor-sandbox-")
        os.chmod(self.temp_root, 0o755)  # a dropped cell uid must reach its own 0700 directory inside
        heavy = list(dict.fromkeys((*STDLIB_PRELOAD, *preload)))
        pools = [(heavy, [WARM_UPS[name] for name in preload if name in WARM_UPS])]
        if light_cells and len(heavy) > len(STDLIB_PRELOAD):
            pools.append((list(STDLIB_PRELOAD), []))   # the light pool: see `uses_light_pool`
        self._zygotes = [ZygoteProcess(zygote.ZygoteConfig(
            slot=slot, scratch_root=os.path.join(self.temp_root, f"slot-{slot}"), isolation=isolation,
            memory_bytes=int(memory_limit), file_bytes=int(file_size_limit), output_bytes=self.output_limit,
            max_processes=int(max_processes), int_max_str_digits=int(int_max_str_digits), preload=modules,
            warm_up=warm_up), startup_timeout)
            for pool, (modules, warm_up) in enumerate(pools)
            for slot in range(pool * self.workers, (pool + 1) * self.workers)]   # slots 0..W-1 preloaded, W..2W-1 light
        self._finalizer = weakref.finalize(self, stop_all, self._zygotes, self.temp_root)
        # with a light pool, the preloaded one starts on its first cell (tiny-world cells never import)
        self.start(self._zygotes if len(pools) == 1 else self._zygotes[self.workers:])
        self._idle = [queue.SimpleQueue() for _ in pools]   # [heavy] or [heavy, light]
        for index, process in enumerate(self._zygotes):
            self._idle[index // self.workers].put(process)
        self._pool = concurrent.futures.ThreadPoolExecutor(self.workers * len(pools), thread_name_prefix="sandbox")

    def start(self, processes: list | None = None) -> None:
        """Start the workers that are not running yet (default: all of them, the preloaded pool included); call it
        before any cell runs. Raises SandboxError (and closes the sandbox) if one cannot start."""
        waiting = [process for process in (self._zygotes if processes is None else processes) if not process.alive()]
        for process in waiting:
            process.spawn()
        for process in waiting:
            try:
                process.wait_ready()
            except SandboxError:
                self.close()
                raise

    @property
    def slots(self) -> int:
        """Worker slots, both pools (slot s runs its cells as uid `zygote.UID_BASE` + s under a uid drop)."""
        return len(self._zygotes)

    @property
    def layers(self) -> tuple:
        """The isolation layers in force (as reported by the first started worker)."""
        return tuple(next((p.ready for p in self._zygotes if p.ready), {}).get("layers", ()))

    @property
    def preload_failed(self) -> tuple:
        """Preloaded modules that failed to import (the preloaded pool is started to find out)."""
        if not any(process.ready for process in self._zygotes[:self.workers]):
            self.run("import math\nprint(1)")
        return tuple(next(p.ready for p in self._zygotes[:self.workers] if p.ready).get("preload_failed", ()))

    @property
    def memo_hits(self) -> int:
        """Cells answered from the memo instead of running again (see `memo_cells`)."""
        return self._memo.hits if self._memo is not None else 0

    @property
    def restarts(self) -> int:
        """How many times a dead or wedged worker was restarted."""
        return sum(process.restarts for process in self._zygotes)

    def worker_pids(self) -> list:
        """Host pids of the zygote processes (the namespace's PID 1 is a child of each)."""
        return [process.process.pid for process in self._zygotes if process.alive()]

    def run(self, code: str, history: list | None = None) -> ExecResult:
        """Run one cell (after silently replaying `history`, if given) in a fresh child of an idle worker."""
        if not isinstance(code, str) or not all(isinstance(cell, str) for cell in history or ()):
            raise TypeError("code and history cells must be str")
        history = list(history or ())
        key = (tuple(history), code) if self._memo is not None and is_memoizable(code, history) else None
        remembered = self._memo.get(key) if key is not None else None
        if remembered is not None:
            return remembered
        budget = self.timeout * (1 + len(history))
        idle = self._idle[-1] if len(self._idle) > 1 and uses_light_pool(code, history) else self._idle[0]
        process = idle.get()
        started = time.perf_counter()
        try:
            raw = process.execute({"code": code, "history": history, "timeout": budget}, budget)
        finally:
            idle.put(process)
        seconds = time.perf_counter() - started
        result = crashed_result(seconds) if raw is None else build_result(raw, budget, self.output_limit, seconds)
        if key is not None:
            self._memo.put(key, result)
        return result

    def run_batch(self, codes: list, histories: list | None = None) -> list:
        """Run cells in parallel across the workers; results come back in input order."""
        if histories is not None and len(histories) != len(codes):
            raise ValueError(f"{len(histories)} histories for {len(codes)} cells")
        histories = histories if histories is not None else [None] * len(codes)
        futures = [self._pool.submit(self.run, code, history) for code, history in zip(codes, histories)]
        return [future.result() for future in futures]

    def close(self) -> None:
        """Stop the workers and remove the temporary root. Safe to call twice."""
        if hasattr(self, "_pool"):
            self._pool.shutdown(wait=True)
        self._finalizer()

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
