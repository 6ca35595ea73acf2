"""The grader's slow path: math-verify (sympy) in a persistent worker process with a hard time bound.

`thor_min.grader` decides most answers in-process and hands the rest to a `Worker`: a fresh interpreter
started with `subprocess` running `worker_main` (no fork, so no torch threads are copied and no `__main__` is
re-imported). The protocol is one JSON request `{"answer", "golds"}` per stdin line and one `1`/`0` line per
reply, after a `ready` line once math-verify is imported and warm.

Design choice: every read has a deadline. The parent waits at most `timeout` seconds for a verdict; on a
hang or a crash `Worker.verify` returns None and the caller kills the worker and starts a new one on the next
call. A process kill is the only bound that works off the main thread and stops CPU-bound C code;
math-verify's own `signal.alarm` timeouts do neither, so the worker turns them off. The worker dies with its
parent (Linux `PR_SET_PDEATHSIG`, a parent-pid check, EOF on its stdin), is killed when its `Worker` is
closed or collected, and is limited to `memory_bytes` of address space.

Limits: with PDEATHSIG the worker also dies when the *thread* that started it exits (the grader then starts a
new one). Parsed golds are cached in the worker (cleared past 4,096 entries). math-verify's own quirks remain
(e.g. it rounds floats to 6 decimal places). Any exception in the worker (MemoryError, RecursionError, sympy
errors) means "not equal".
"""

import json
import logging
import os
import select
import subprocess
import sys
import time
import weakref
from pathlib import Path

GOLD_CACHE_LIMIT = 4096


# ----------------------------------------------------------------------------- inside the worker process

def verify_in_worker(answer: str, golds: list[str], gold_cache: dict) -> bool:
    """Inside the worker: math-verify with its signal timeouts off (the parent bounds us)."""
    from math_verify import parse, verify
    predicted = parse(f"\\boxed{{{answer}}}", parsing_timeout=None)
    if not predicted:
        return False
    for gold in golds:
        if gold not in gold_cache:
            if len(gold_cache) > GOLD_CACHE_LIMIT:
                gold_cache.clear()
            gold_cache[gold] = parse(f"\\boxed{{{gold}}}", parsing_timeout=None)
        if gold_cache[gold] and verify(gold_cache[gold], predicted, timeout_seconds=None):
            return True
    return False


def die_with_parent(parent_pid: int) -> None:
    try:  # Linux: SIGKILL us when the parent (thread) dies
        import ctypes
        import signal
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except Exception:
        pass
    if os.getppid() != parent_pid:
        os._exit(0)


def worker_main() -> None:
    """Entry point of the worker process: one JSON request per stdin line, '1'/'0' per reply."""
    parent_pid, memory_bytes = int(sys.argv[1]), int(sys.argv[2])
    die_with_parent(parent_pid)
    try:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    except (ImportError, ValueError, OSError):
        pass
    logging.disable(logging.CRITICAL)  # math-verify warns on every disabled timeout / bad parse
    gold_cache: dict = {}
    verify_in_worker("1", ["1"], gold_cache)  # warm up imports and caches before saying ready
    out = sys.stdout.buffer
    sys.stdout = sys.stderr  # stray prints from sympy must not corrupt the reply stream
    out.write(b"ready\n")
    out.flush()
    for line in sys.stdin.buffer:
        try:
            request = json.loads(line)
            verdict = verify_in_worker(request["answer"], request["golds"], gold_cache)
        except BaseException:  # MemoryError, RecursionError, sympy errors: all mean "not equal"
            verdict = False
        out.write(b"1\n" if verdict else b"0\n")
        out.flush()


# ----------------------------------------------------------------------------- the parent's handle

def kill_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()
    for stream in (process.stdin, process.stdout):
        stream.close()


class Worker:
    """One math-verify process and the line protocol to it; every read has a deadline."""

    def __init__(self, memory_bytes: int, startup_timeout: float):
        package_root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p))
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from thor_min.grader_worker import worker_main; worker_main()",
             str(os.getpid()), str(memory_bytes)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, start_new_session=True)
        self._finalizer = weakref.finalize(self, kill_process, self.process)
        self._buffer = b""
        if self._read_line(startup_timeout) != b"ready":
            self.close()
            raise RuntimeError("the math-verify grader worker did not start")

    def _read_line(self, timeout: float) -> bytes | None:
        """One reply line, or None on timeout or EOF."""
        deadline = time.monotonic() + timeout
        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.strip()

    def verify(self, answer: str, golds: list[str], timeout: float) -> bool | None:
        """The worker's verdict, or None if it hung/crashed (the worker is then unusable)."""
        request = json.dumps({"answer": answer, "golds": golds}).encode() + b"\n"
        try:
            self.process.stdin.write(request)
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            return None
        reply = self._read_line(timeout)
        return None if reply is None else reply == b"1"

    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        self._finalizer()
