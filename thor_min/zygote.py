"""Server side of the sandbox: a warm fork server ("zygote") that runs each Python cell in a fresh child.

`thor_min.sandbox` starts one zygote per worker as `python -I zygote.py CONFIG_JSON` (a fresh interpreter with
a minimal environment, never a fork of the trainer). It imports the preloaded modules, runs the warm-up
snippets, calls `gc.freeze()`, sets up the isolation layers it can, then serves one cell at a time: it forks a
child that drops privileges, applies rlimits and `exec`s the cell in a new `__main__`; it enforces the
wall-clock deadline and the output cap from outside (select on the two output pipes and a pidfd), SIGKILLs
everything the cell started, drains the pipes without blocking, and wipes the scratch directories. Messages are
length-prefixed ASCII JSON on two pipes. This file imports only the standard library; `sandbox.py` reuses its
framing and config. It exits when its request pipe closes (the controller died or closed it).

Layers, each probed at start-up (the ready message lists those in force):
- Namespaces (root: `unshare(NEWPID|NEWNET|NEWNS)`; without CAP_SYS_ADMIN or as a non-root user the same plus
  NEWUSER), then one fork: the serving zygote is PID 1 of its own PID namespace. Cells cannot see host
  processes, the kernel drops their signals to PID 1, and after every cell `kill(-1, SIGKILL)` removes every
  other process of the namespace (threads, children, setsid daemons, fork-bomb leftovers). The network
  namespace has no interface up, loopback included. Mounts are private; a fresh /proc; every writable mount is
  remounted read-only; /tmp and /dev/shm are size-capped tmpfs wiped after each cell.
- uid drop (real root, not in a user namespace): cells run as `UID_BASE + slot`, so RLIMIT_NPROC holds (root
  is exempt from it) and root-owned files are out of reach. A dropped uid cannot read an interpreter under a
  0700 home (pyenv in /root), so in the mount namespace the zygote mounts a tmpfs over such a directory and
  binds only the interpreter's trees back. Without a mount namespace only modules imported before the drop
  work (the controller preloads a broad stdlib set); the ready message says whether the interpreter is
  readable by the cell uid.
- Always: rlimits (address space, CPU, file size, open files, no core dump), own process group + SIGKILL of the group,
  PR_SET_NO_NEW_PRIVS, a scrubbed environment, stdin on /dev/null, a private 0700 working directory, and
  PR_SET_PDEATHSIG inside the tree. Without namespaces ("plain" mode) the zygote is a child subreaper, so every
  leftover descendant of a cell becomes its child and is killed after the cell.

Limits: Linux only. In a user namespace there is one uid, so no uid drop and no process-count limit (a fork
bomb runs until the timeout, inside the namespace), and cells keep the invoking user's read access. In plain
mode there is no network isolation, world-writable places (/tmp, /dev/shm) are shared with the host, and
without root nothing limits the process count. int->str conversion is capped at `int_max_str_digits` (100,000
by default, ~0.1 s to print; CPython's 4,300 rejects many math answers); the recursion limit is 10,000. Each
cell reseeds `random` and `numpy.random` with 0, so a cell prints the same numbers every time (and a replayed
history reproduces its values).
"""

import builtins
import ctypes
import gc
import importlib
import io
import json
import linecache
import os
import resource
import select
import shutil
import signal
import struct
import sys
import time
import traceback
import types
from dataclasses import dataclass, field

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
MOUNT_OPTION_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
                      "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21}
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_CHILD_SUBREAPER = 1, 38, 36
UID_BASE = 60001
HEADER = struct.Struct(">I")
READ_CHUNK = 1 << 16
POLL_SECONDS = 0.005
RECURSION_LIMIT = 10_000
OPEN_FILES_LIMIT = 256
SETUP_FAILED_EXIT = 70
EXIT_NOW = os._exit
CELL_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "OPENBLAS_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


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


@dataclass
class CellPlan:
    """How cells run in this zygote, fixed at start-up by the probes."""
    pid_namespace: bool
    uid: int | None
    cell_root: str
    wiped_roots: tuple
    layers: list


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


# ----------------------------------------------------------------------------------------- kernel calls

LIBC = ctypes.CDLL(None, use_errno=True)


def libc_call(name: str, *args) -> None:
    if getattr(LIBC, name)(*args) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{name}: {os.strerror(error)}")


def prctl(option: int, value: int) -> None:
    libc_call("prctl", ctypes.c_int(option), ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0),
              ctypes.c_ulong(0))


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    encode = lambda text: None if text is None else text.encode()  # noqa: E731
    libc_call("mount", encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags), encode(data))


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


def enter_namespaces(config: ZygoteConfig, channel_fds: tuple) -> str:
    """Unshare pid/net/mount (and user when not root) and fork; only the new PID 1 returns.

    The process left outside just waits for it and exits with it. Returns "root" or "user" (which namespaces
    were made), or "" when namespaces are unavailable and nothing changed.
    """
    if config.isolation == "plain":
        return ""
    base = CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWNS
    attempts = [base, base | CLONE_NEWUSER] if os.geteuid() == 0 else [base | CLONE_NEWUSER]
    uid, gid = os.getuid(), os.getgid()
    for flags in attempts:
        try:
            libc_call("unshare", ctypes.c_int(flags))
        except OSError:
            continue
        if flags & CLONE_NEWUSER:
            for path, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
                with open(f"/proc/self/{path}", "w") as handle:
                    handle.write(text)
        init_pid = os.fork()
        if init_pid == 0:
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            return "user" if flags & CLONE_NEWUSER else "root"
        for fd in channel_fds:
            os.close(fd)
        _, status = os.waitpid(init_pid, 0)
        os._exit(max(0, os.waitstatus_to_exitcode(status)))
    return ""


def expose_interpreter() -> None:
    """Let the cell uid read the interpreter: tmpfs over each 0700 ancestor, bind the interpreter's trees back."""
    wanted = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable)),
              *sys.path}
    trees = sorted({os.path.realpath(path) for path in wanted if path and os.path.isdir(path)})
    trees = [tree for index, tree in enumerate(trees) if not any(tree.startswith(kept + "/") for kept in trees[:index])]
    by_hider = {}
    for tree in trees:
        ancestor = "/"
        for part in tree.strip("/").split("/"):
            if not os.stat(ancestor).st_mode & 0o001:
                by_hider.setdefault(ancestor, []).append(tree)
                break
            ancestor = os.path.join(ancestor, part)
    for hider, hidden_trees in by_hider.items():
        handles = {tree: os.open(tree, os.O_PATH) for tree in hidden_trees}
        mount("tmpfs", hider, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
        for tree, handle in handles.items():
            os.makedirs(tree, mode=0o755, exist_ok=True)
            mount(f"/proc/self/fd/{handle}", tree, None, MS_BIND | MS_REC)
            os.close(handle)


def remount_read_only() -> int:
    """Remount every writable mount read-only (this namespace only); returns how many refused."""
    refused = 0
    with open("/proc/self/mountinfo") as handle:
        entries = [line.split() for line in handle]
    for entry in entries:
        target = entry[4].encode().decode("unicode_escape")
        options = entry[5].split(",")
        if "ro" in options or target == "/proc" or target.startswith("/proc/"):
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        flags |= sum(MOUNT_OPTION_FLAGS.get(option, 0) for option in options)
        try:
            mount(None, target, None, flags)
        except OSError:
            refused += 1
    return refused


def set_up_mounts(config: ZygoteConfig, drop_uid: bool, layers: list) -> None:
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    layers.append("private /proc")
    if drop_uid:
        expose_interpreter()
    refused = remount_read_only()
    layers.append("read-only filesystem" + (f" ({refused} mounts refused)" if refused else ""))
    size = f"size={config.tmpfs_bytes}"
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"{size},mode=0755")
    mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, f"{size},mode=1777")
    layers.append("private tmpfs /tmp and /dev/shm")


def probe_cell_uid(uid: int) -> tuple:
    """Fork a child that switches to `uid` and lists the stdlib: (can switch, can read the interpreter)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        except OSError:
            os._exit(2)
        try:
            os.listdir(os.path.dirname(os.__file__))
            os.stat(sys.executable)
        except OSError:
            os._exit(1)
        os._exit(0)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return code != 2, code == 0


def plan_cells(config: ZygoteConfig, channel_fds: tuple) -> CellPlan:
    layers = ["rlimits", "own process group + SIGKILL of the group", "no new privileges", "scrubbed environment",
              "stdin /dev/null", "private working directory"]
    namespaces = enter_namespaces(config, channel_fds)
    uid = UID_BASE + config.slot if os.geteuid() == 0 and namespaces != "user" else None
    if namespaces:
        layers += ["pid namespace (PID 1 zygote, kill(-1) after each cell)", "network namespace (no interfaces)",
                   "mount namespace" + (" in a user namespace" if uid is None else "")]
        set_up_mounts(config, uid is not None, layers)
        cell_root, wiped = "/tmp", ("/tmp", "/dev/shm")
    else:
        prctl(PR_SET_CHILD_SUBREAPER, 1)
        layers.append("child subreaper (leftover descendants killed after each cell)")
        os.makedirs(config.scratch_root, mode=0o755, exist_ok=True)
        wipe(config.scratch_root)  # a crashed predecessor may have left its last cell directory
        cell_root, wiped = config.scratch_root, (config.scratch_root,)
    if uid is not None:
        switched, readable = probe_cell_uid(uid)
        if not switched:
            uid = None
        else:
            layers += [f"uid drop to {uid} + RLIMIT_NPROC {config.max_processes}",
                       "interpreter readable by the cell uid" if readable else
                       "interpreter NOT readable by the cell uid: only preloaded modules import"]
    return CellPlan(bool(namespaces), uid, cell_root, wiped, layers)


# ----------------------------------------------------------------------------------------- the cell (child side)

def enter_cell(plan: CellPlan, config: ZygoteConfig, timeout: float, out_fd: int, err_fd: int, cell_dir: str):
    """In the forked child: own process group, fds 0/1/2 only, scrubbed env, rlimits, then the cell uid.

    `setpgid`, not `setsid`: the zygote has no terminal to detach from, and setsid costs up to milliseconds
    (it creates a scheduler autogroup). Whatever leaves the group is caught by kill(-1) or the subreaper.
    """
    os.setpgid(0, 0)
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    devnull = os.open(os.devnull, os.O_RDWR)
    for source, target in ((devnull, 0), (out_fd, 1), (err_fd, 2)):
        os.dup2(source, target)
    os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    os.chdir(cell_dir)
    os.environ.clear()
    os.environ.update(CELL_ENV, HOME=cell_dir, TMPDIR=cell_dir)
    if "tempfile" in sys.modules:
        sys.modules["tempfile"].tempdir = cell_dir
    cpu_seconds = int(timeout) + 2
    limits = [(resource.RLIMIT_AS, config.memory_bytes), (resource.RLIMIT_FSIZE, config.file_bytes),
              (resource.RLIMIT_CORE, 0), (resource.RLIMIT_CPU, cpu_seconds),
              (resource.RLIMIT_NOFILE, min(OPEN_FILES_LIMIT, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))]
    if plan.uid is not None:
        limits.append((resource.RLIMIT_NPROC, config.max_processes))
    for kind, value in limits:
        resource.setrlimit(kind, (value, value))
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    if plan.uid is not None:
        os.setgroups([])
        os.setgid(plan.uid)
        os.setuid(plan.uid)
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


def run_child(plan: CellPlan, config: ZygoteConfig, request: dict, out_fd: int, err_fd: int, cell_dir: str):
    try:
        enter_cell(plan, config, request["timeout"], out_fd, err_fd, cell_dir)
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


def kill_everything(plan: CellPlan, pid: int) -> int:
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


def wipe(directory: str) -> None:
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except OSError:
                pass


def run_cell(plan: CellPlan, config: ZygoteConfig, request: dict, serial: int) -> dict:
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
        wipe(root)
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
        plan = plan_cells(config, (request_fd, reply_fd))
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
