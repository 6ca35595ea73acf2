"""Server side of the sandbox: a warm fork server ("zygote") that runs each Python cell in a fresh child.

`thor_min.sandbox` starts one zygote per worker as `python -I zygote.py CONFIG_JSON` (a fresh interpreter with
a minimal environment, never a fork of the trainer). It imports the preloaded modules, runs the warm-up
snippets, calls `gc.freeze()`, sets up the isolation layers it can, then serves one cell at a time: it forks a
child that enters the isolation layers and `exec`s the cell in a new `__main__`; it enforces the wall-clock
deadline and the output cap from outside (select on the two output pipes and a pidfd), SIGKILLs everything
the cell started, drains the pipes without blocking, and wipes the scratch directories. Messages are
length-prefixed ASCII JSON on two pipes. It exits when its request pipe closes (the controller died or closed
it).

Design choice: this file is the fork server only (framing, start-up, running, watching and killing a cell).
What isolates a cell (namespaces, mounts, the uid drop, rlimits, the scrubbed environment; which layers
apply where, and their limits) lives in `thor_min/isolation.py`: `isolation.plan_cells` at start-up,
`isolation.enter_cell` in each child, `isolation.wipe` after each cell. Both files import only the standard
library; `sandbox.py` imports this one as `thor_min.zygote` to reuse its framing and config. Run as a script
under `-I` this folder is not on `sys.path`, so the zygote loads `isolation.py` by file path (`load_sibling`).

Limits: Linux only. int->str conversion is capped at `int_max_str_digits` (100,000 by default, ~0.1 s to
print; CPython's 4,300 rejects many math answers); the recursion limit is 10,000. Each cell reseeds `random`
and `numpy.random` with 0, so a cell prints the same numbers every time (and a replayed history reproduces
its values).
"""

import builtins
import gc
import importlib
import importlib.util
import io
import json
import linecache
import os
import select
import signal
import struct
import sys
import time
import traceback
import types
from dataclasses import dataclass, field


def load_sibling(name: str) -> types.ModuleType:
    """Import `<name>.py` from this file's folder by path (registered in sys.modules under `name`)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


if __package__:  # imported as thor_min.zygote (the controller)
    from thor_min import isolation
else:  # run as `python -I zygote.py`: the package may not be importable
    isolation = load_sibling("isolation")

UID_BASE = isolation.UID_BASE  # cells run as UID_BASE + slot when the uid drop is in force
HEADER = struct.Struct(">I")
READ_CHUNK = 1 << 16
POLL_SECONDS = 0.005
RECURSION_LIMIT = 10_000
SETUP_FAILED_EXIT = 70
EXIT_NOW = os._exit


@dataclass
class ZygoteConfig:
    """Everything a zygote needs, sent as JSON on its command line; per-cell timeouts come with each request."""
    slot: int
    scratch_root: str
    isolation: str = "auto"
    memory_bytes: int = 1 << 30
    file_bytes: int = 16 << 20
    output_bytes: int = 256 << 10
    max_processes: int = 32
    tmpfs_bytes: int = 256 << 20
    int_max_str_digits: int = 100_000
    preload: list = field(default_factory=list)
    warm_up: list = field(default_factory=list)


# ----------------------------------------------------------------------------------------- framing

def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def read_exact(fd: int, size: int, deadline: float | None = None) -> bytes | None:
    """Read `size` bytes; None on EOF or when the deadline (time.monotonic) passes first."""
    data = bytearray()
    while len(data) < size:
        if deadline is not None and not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            return None
        chunk = os.read(fd, size - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def send_message(fd: int, payload: dict) -> None:
    data = json.dumps(payload).encode("ascii")  # ASCII JSON escapes lone surrogates instead of failing
    write_all(fd, HEADER.pack(len(data)) + data)


def recv_message(fd: int, deadline: float | None = None) -> dict | None:
    header = read_exact(fd, HEADER.size, deadline)
    body = header and read_exact(fd, HEADER.unpack(header)[0], deadline)
    return None if body is None else json.loads(body)


# ----------------------------------------------------------------------------------------- start-up

def preload_modules(names: list, warm_up: list) -> list:
    """Import the modules, run the warm-up snippets (failures ignored), freeze the heap; returns failed imports."""
    failed = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:
            failed.append(name)
    for snippet in warm_up:
        try:
            exec(snippet, {})
        except Exception:
            pass
    gc.collect()
    gc.freeze()
    return failed


# ----------------------------------------------------------------------------------------- the cell (child side)

def prepare_interpreter(cell_dir: str) -> None:
    """In the child, after `isolation.enter_cell`: UTF-8 std streams on fds 0/1/2, tempdir, seeds reset to 0."""
    if "tempfile" in sys.modules:
        sys.modules["tempfile"].tempdir = cell_dir
    writer = lambda fd: io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding="utf-8",  # noqa: E731
                                         errors="backslashreplace", write_through=True)
    sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
    sys.stdout = sys.__stdout__ = writer(1)
    sys.stderr = sys.__stderr__ = writer(2)
    for name in ("random", "numpy"):
        module = sys.modules.get(name)
        if module is not None:
            (module.random if name == "numpy" else module).seed(0)


def exit_status(code, report_fd: int) -> int:
    """The process exit status Python gives `SystemExit(code)` (a non-int code is printed, status 1)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    write_all(report_fd, f"{code}\n".encode("utf-8", "backslashreplace"))
    return 1


def replay_silently(history: list, namespace: dict) -> None:
    """Run earlier cells of the trajectory with fds 1 and 2 on /dev/null, each in its own try."""
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    for index, earlier in enumerate(history):
        try:
            exec(compile(earlier, f"<history {index}>", "exec"), namespace)
        except BaseException:  # noqa: B036 - a failed earlier cell keeps its partial state, like a notebook
            pass
    for fd, target in zip(saved, (1, 2)):
        os.dup2(fd, target)
        os.close(fd)
    os.close(devnull)


def execute_cell(code: str, history: list) -> int:
    """Run one cell in a fresh `__main__`; returns the exit status. Tracebacks show only the cell's frames."""
    report_fd = os.dup(2)  # still there if the cell closes fd 2
    main = types.ModuleType("__main__")
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    status = 0
    try:
        if history:
            replay_silently(history, main.__dict__)
        linecache.cache["<cell>"] = (len(code), None, code.splitlines(True), "<cell>")
        exec(compile(code, "<cell>", "exec"), main.__dict__)
    except SystemExit as stop:
        status = exit_status(stop.code, report_fd)
    except BaseException as error:  # noqa: B036 - everything the cell raises is reported, never re-raised
        status = 1
        frames = error.__traceback__.tb_next if error.__traceback__ else None
        try:
            text = "".join(traceback.format_exception(type(error), error, frames))
        except BaseException:  # noqa: B036
            text = f"{type(error).__name__}\n"
        write_all(report_fd, text.encode("utf-8", "backslashreplace"))
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: B036 - the cell may have closed or replaced its streams
            pass
    return status


def run_child(plan: isolation.CellPlan, config: ZygoteConfig, request: dict, out_fd: int, err_fd: int, cell_dir: str):
    try:
        isolation.enter_cell(plan, config, request["timeout"], out_fd, err_fd, cell_dir)
        prepare_interpreter(cell_dir)
        status = execute_cell(request["code"], request.get("history") or [])
    except BaseException as error:  # noqa: B036
        write_all(2, f"SandboxError: cell set-up failed: {error!r}\n".encode("utf-8", "backslashreplace"))
        status = SETUP_FAILED_EXIT
    EXIT_NOW(status)  # bound at import: a cell that replaces os._exit still cannot return into zygote code
    os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------------------- the cell (zygote side)

@dataclass
class Captured:
    """Bytes read from a cell's stdout and stderr, capped in total."""
    cap: int
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    total: int = 0

    def add(self, buffer: bytearray, chunk: bytes) -> None:
        self.total += len(chunk)
        buffer += chunk[: max(0, self.cap - len(buffer))]

    @property
    def over_cap(self) -> bool:
        return self.total > self.cap


def child_exited(pid: int, pidfd: int | None, ready: list) -> bool:
    if pidfd is not None:
        return pidfd in ready
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def watch_cell(pid: int, streams: dict, deadline: float, captured: Captured) -> bool:
    """Read output until the child exits, the deadline passes or the cap is hit; returns True on timeout."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    open_fds = list(streams)
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            watched = open_fds + ([pidfd] if pidfd is not None else [])
            ready = select.select(watched, [], [], remaining if pidfd is not None else POLL_SECONDS)[0]
            for fd in set(ready) & set(open_fds):
                chunk = os.read(fd, READ_CHUNK)
                if chunk:
                    captured.add(streams[fd], chunk)
                else:
                    open_fds.remove(fd)
            if captured.over_cap or child_exited(pid, pidfd, ready):
                return False
    finally:
        if pidfd is not None:
            os.close(pidfd)


def drain(streams: dict, captured: Captured) -> None:
    """Read what is left without ever blocking (an escaped writer may still hold the pipe)."""
    for fd, buffer in streams.items():
        os.set_blocking(fd, False)
        while not captured.over_cap:
            try:
                chunk = os.read(fd, READ_CHUNK)
            except BlockingIOError:
                break
            if not chunk:
                break
            captured.add(buffer, chunk)


def kill_everything(plan: isolation.CellPlan, pid: int) -> int:
    """SIGKILL the cell and all it started, reap them; returns the cell's wait status."""
    if plan.pid_namespace and os.getpid() == 1:  # never kill(-1) outside a private PID namespace
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        status = os.waitpid(pid, 0)[1]
        while True:
            try:
                os.kill(-1, signal.SIGKILL)
            except ProcessLookupError:
                return status
            try:
                while True:
                    os.waitpid(-1, 0)
            except ChildProcessError:
                pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    status = os.waitpid(pid, 0)[1]
    while children := list_children():  # the zygote is a subreaper: every leftover descendant ends up here
        for child in children:
            os.kill(child, signal.SIGKILL)
        for child in children:
            os.waitpid(child, 0)
    return status


def list_children() -> list:
    """Pids of this process's children (via /proc/<pid>/task/<pid>/children, else a /proc scan)."""
    me = os.getpid()
    try:
        with open(f"/proc/{me}/task/{me}/children") as handle:
            return [int(pid) for pid in handle.read().split()]
    except FileNotFoundError:
        pass
    children = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat") as handle:
                if int(handle.read().rsplit(")", 1)[1].split()[1]) == me:
                    children.append(int(name))
        except (OSError, IndexError, ValueError):
            pass
    return children


def run_cell(plan: isolation.CellPlan, config: ZygoteConfig, request: dict, serial: int) -> dict:
    """Fork a child for one cell, watch it, kill what is left, wipe the scratch dirs; returns the raw outcome."""
    cell_dir = os.path.join(plan.cell_root, f"cell-{serial}")
    os.mkdir(cell_dir, 0o700)
    if plan.uid is not None:
        os.chown(cell_dir, plan.uid, plan.uid)
    (out_read, out_write), (err_read, err_write) = os.pipe(), os.pipe()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        run_child(plan, config, request, out_write, err_write, cell_dir)
    os.close(out_write)
    os.close(err_write)
    captured = Captured(config.output_bytes)
    streams = {out_read: captured.stdout, err_read: captured.stderr}
    timed_out = watch_cell(pid, streams, started + request["timeout"], captured)
    status = kill_everything(plan, pid)
    seconds = time.monotonic() - started
    drain(streams, captured)
    for fd in streams:
        os.close(fd)
    for root in plan.wiped_roots:
        isolation.wipe(root)
    signaled = os.WIFSIGNALED(status)
    return {"stdout": captured.stdout.decode("utf-8", "replace"),
            "stderr": captured.stderr.decode("utf-8", "replace"),
            "exit_code": None if signaled else os.WEXITSTATUS(status),
            "signal": os.WTERMSIG(status) if signaled else None,
            "timed_out": timed_out, "truncated": captured.over_cap, "seconds": seconds}


def main(argv: list) -> int:
    """Serve requests on the pipes that were fds 0 and 1; fds 0/1 then point at /dev/null."""
    request_fd, reply_fd = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    try:
        config = ZygoteConfig(**json.loads(argv[0]))
        sys.setrecursionlimit(RECURSION_LIMIT)
        sys.set_int_max_str_digits(config.int_max_str_digits)
        failed = preload_modules(config.preload, config.warm_up)
        plan = isolation.plan_cells(config, (request_fd, reply_fd))
    except BaseException:  # noqa: B036 - report any start-up failure to the controller
        send_message(reply_fd, {"error": traceback.format_exc()})
        return 1
    send_message(reply_fd, {"layers": plan.layers, "uid": plan.uid, "preload_failed": failed})
    serial = 0
    while (request := recv_message(request_fd)) is not None:
        serial += 1
        send_message(reply_fd, run_cell(plan, config, request, serial))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
