"""The sandbox's isolation layers: probed once when a zygote starts, entered by every cell's child.

`thor_min.zygote` (the fork server) calls `plan_cells` once at start-up, which sets up what it can and returns a
`CellPlan` naming the layers in force; each forked cell child then calls `enter_cell`; after every cell the
zygote `wipe`s the scratch directories. Design choice: every layer is probed rather than assumed, so the same
code runs as root, as a user with user namespaces, or with no namespaces at all, and says which it got (the
ready message lists `CellPlan.layers`). Kernel calls without a Python wrapper (unshare, mount, prctl) go
through ctypes. This file imports only the standard library: the zygote runs as `python -I zygote.py` and loads
it by file path, so it must not import `thor_min` (nor the zygote: it is that script's `__main__`).

Layers:
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
- Always (`enter_cell`): rlimits (address space, CPU, file size, open files, no core dump), own process group
  (the zygote SIGKILLs the group), PR_SET_NO_NEW_PRIVS, a scrubbed environment, stdin on /dev/null, a private
  0700 working directory, and PR_SET_PDEATHSIG inside the tree. Without namespaces ("plain" mode) the zygote
  is a child subreaper, so every leftover descendant of a cell becomes its child and is killed after the cell.

Limits: Linux only. In a user namespace there is one uid, so no uid drop and no process-count limit (a fork
bomb runs until the timeout, inside the namespace), and cells keep the invoking user's read access. In plain
mode there is no network isolation, world-writable places (/tmp, /dev/shm) are shared with the host, and
without root nothing limits the process count. `config` below is a `zygote.ZygoteConfig` (duck-typed here,
since this module cannot import the zygote).
"""

import ctypes
import os
import resource
import shutil
import signal
import sys
from dataclasses import dataclass

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
MOUNT_OPTION_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
                      "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21}
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_CHILD_SUBREAPER = 1, 38, 36
UID_BASE = 60001
OPEN_FILES_LIMIT = 256
CELL_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "OPENBLAS_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass
class CellPlan:
    """How cells run in this zygote, fixed at start-up by the probes."""
    pid_namespace: bool
    uid: int | None
    cell_root: str
    wiped_roots: tuple
    layers: list


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


# ----------------------------------------------------------------------------------------- start-up (zygote)

def enter_namespaces(config, channel_fds: tuple) -> str:
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


def set_up_mounts(config, drop_uid: bool, layers: list) -> None:
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


def plan_cells(config, channel_fds: tuple) -> CellPlan:
    """Set up every layer this machine allows (namespaces, mounts or a subreaper, the cell uid); say which."""
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


def wipe(directory: str) -> None:
    """Empty a scratch directory (a cell's leftovers), keeping the directory itself."""
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except OSError:
                pass


# ----------------------------------------------------------------------------------------- per cell (child)

def enter_cell(plan: CellPlan, config, timeout: float, out_fd: int, err_fd: int, cell_dir: str) -> None:
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
