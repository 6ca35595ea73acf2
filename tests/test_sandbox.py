"""Sandbox tests: THOR's pass rule and observation format, then one hostile behaviour per test.

Tests that need a layer this machine lacks (namespaces, a uid drop) skip with the reason. Timeouts are 1.5 s so
the file stays fast on 2 cores; timing itself is measured by `python -m thor_min.bench sandbox`, not here.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from thor_min.sandbox import (NO_OUTPUT_MESSAGE, OBSERVATION_HALF, Sandbox, cell_passed, error_line,
                              format_observation, uses_light_pool)
from thor_min.zygote import UID_BASE

TIMEOUT = 1.5
SECRET = "thor-sandbox-test-secret-7731"
FORK_COUNTER = """
import os, time
forks = 0
try:
    while True:
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        forks += 1
except OSError as error:
    print(forks, type(error).__name__)
"""
FORK_BOMB = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
SETSID_DAEMON = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint('parent done')"


@pytest.fixture(scope="module")
def sandbox():
    os.environ["THOR_SANDBOX_TEST_SECRET"] = SECRET  # must not reach any cell
    with Sandbox(workers=2, timeout=TIMEOUT, memo_cells=0) as box:   # every hostile cell really runs
        box.start()   # the preloaded pool too, so tests that compare worker pids see every worker from the start
        yield box
    del os.environ["THOR_SANDBOX_TEST_SECRET"]


@pytest.fixture(scope="module")
def plain_sandbox():
    with Sandbox(workers=1, timeout=TIMEOUT, isolation="plain", preload=("math",)) as box:
        yield box


def has_layer(box: Sandbox, prefix: str) -> bool:
    return any(layer.startswith(prefix) for layer in box.layers)


def process_table() -> dict:
    """pid -> (ppid, real uid) for every process on the machine."""
    table = {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/status") as handle:
                fields = dict(line.split(":", 1) for line in handle if ":" in line)
            table[int(name)] = (int(fields["PPid"]), int(fields["Uid"].split()[0]))
        except (OSError, KeyError, ValueError):
            pass
    return table


def leftover_processes(box: Sandbox) -> list:
    """Processes of the cell uids, and descendants of the zygotes other than a namespace's PID 1."""
    table = process_table()
    cell_uids = range(UID_BASE, UID_BASE + box.slots)
    leftovers = [pid for pid, (_, uid) in table.items() if uid in cell_uids]
    allowed_depth = 1 if has_layer(box, "pid namespace") else 0
    frontier = [(pid, 0) for pid in box.worker_pids()]
    while frontier:
        parent, depth = frontier.pop()
        for pid, (ppid, _) in table.items():
            if ppid == parent:
                frontier.append((pid, depth + 1))
                if depth + 1 > allowed_depth:
                    leftovers.append(pid)
    return sorted(set(leftovers))


# ----------------------------------------------------------------------------------------- THOR's rules

def test_pass_needs_clean_exit_and_output():
    assert cell_passed(0, False, False, "42\n"), "clean exit with output must pass"
    assert not cell_passed(0, False, False, ""), "a cell that printed nothing must not pass"
    assert not cell_passed(0, False, False, " \n"), "whitespace-only output must not pass"
    assert not cell_passed(1, False, False, "42\n"), "a non-zero exit must not pass even with output"
    assert not cell_passed(None, True, False, "42\n"), "a timed-out cell must not pass"


def test_observation_is_stdout_on_success():
    assert format_observation(True, "42\n", "") == "42", "success shows stdout without the trailing newline"


def test_observation_is_error_line_on_failure():
    assert format_observation(False, "partial\n", "ZeroDivisionError: division by zero") == \
        "ZeroDivisionError: division by zero", "failure shows the error line, not the partial stdout"


def test_long_observation_keeps_head_and_tail():
    text = "".join(chr(ord("a") + index % 26) for index in range(300))
    observed = format_observation(True, text, "")
    assert observed == text[:OBSERVATION_HALF] + "..." + text[-OBSERVATION_HALF:], "expected 128 + ... + 128"
    assert format_observation(True, "x" * 256, "") == "x" * 256, "256 characters must be kept whole"


def test_error_line_is_last_stderr_line():
    raw = {"timed_out": False, "truncated": False, "signal": None, "exit_code": 1,
           "stderr": 'Traceback (most recent call last):\n  File "<cell>", line 1\n'
                     "NameError: name 'x' is not defined\n"}
    assert error_line(raw, 5.0, 100) == "NameError: name 'x' is not defined"


def test_timeout_message_when_nothing_came_back():
    raw = {"timed_out": True, "truncated": False, "signal": 9, "exit_code": None, "stderr": ""}
    assert error_line(raw, 5.0, 100).startswith("TimeoutError"), "a silent timeout must say it timed out"


def test_silent_clean_exit_says_nothing_was_printed(sandbox):
    result = sandbox.run("x = 1")
    assert not result.passed and result.observation == NO_OUTPUT_MESSAGE, result


def test_exception_observation_from_a_real_cell(sandbox):
    result = sandbox.run("print('before')\n1/0")
    assert not result.passed and result.observation == "ZeroDivisionError: division by zero", result
    assert result.stdout == "before\n", "output printed before the error is kept in stdout"


def test_preloaded_sympy_cell_passes(sandbox):
    result = sandbox.run("import sympy\nx = sympy.symbols('x')\nprint(sympy.solve(x**2 - 2, x))")
    assert result.passed and result.observation == "[-sqrt(2), sqrt(2)]", result


def test_batch_results_come_back_in_order(sandbox):
    codes = [f"import time\ntime.sleep({(7 * index) % 5} / 200)\nprint({index} ** 2)" for index in range(12)]
    results = sandbox.run_batch(codes)
    assert [result.observation for result in results] == [str(index ** 2) for index in range(12)]


def test_history_is_replayed_silently(sandbox):
    result = sandbox.run("print(x + y)", history=["x = 40\nprint('hidden')", "y = 2\n1/0", "import sys; sys.exit(4)"])
    assert result.passed and result.stdout == "42\n", f"expected only the cell's own output: {result}"


def test_no_state_leaks_between_cells(sandbox):
    sandbox.run("import builtins, sympy\nbuiltins.LEAK = 42\nsympy.pi = 3\nprint('set')")
    result = sandbox.run("import builtins, sympy\nprint(hasattr(builtins, 'LEAK'), sympy.pi)")
    assert result.stdout == "False pi\n", f"a cell saw another cell's state: {result.stdout!r}"


def test_int_to_str_limit_is_raised(sandbox):
    result = sandbox.run("print(len(str(2 ** 20000)))")
    assert result.passed and result.stdout == "6021\n", result


# ----------------------------------------------------------------------------------------- limits

def test_infinite_loop_times_out(sandbox):
    result = sandbox.run("while True:\n    pass")
    assert result.timed_out and not result.passed and result.observation.startswith("TimeoutError"), result


def test_sleep_is_stopped_by_the_wall_clock(sandbox):
    result = sandbox.run("import time\ntime.sleep(100)")
    assert result.timed_out, f"a sleeping cell must hit the wall-clock timeout: {result}"


def test_timeout_kills_threads_and_children(sandbox):
    code = ("import subprocess, threading, time\nthreading.Thread(target=time.sleep, args=(100,)).start()\n"
            "subprocess.Popen(['sleep', '100'])\nwhile True:\n    pass")
    result = sandbox.run(code)
    assert result.timed_out, result
    assert leftover_processes(sandbox) == [], "a timed-out cell left processes behind"


def test_escaped_setsid_daemon_is_killed(sandbox):
    result = sandbox.run(SETSID_DAEMON)
    assert result.passed, result
    assert leftover_processes(sandbox) == [], "a daemon detached with setsid survived its cell"


def test_memory_bomb_fails_inside_the_cell(sandbox):
    result = sandbox.run("blocks = []\nwhile True:\n    blocks.append(bytes(50 * 2**20))")  # calloc: no memset
    assert result.observation == "MemoryError", result


def test_huge_allocation_fails_fast(sandbox):
    result = sandbox.run("import numpy\nnumpy.ones((10**5, 10**5))")
    assert "Unable to allocate" in result.observation and not result.timed_out, result


def test_process_count_is_limited(sandbox):
    if not has_layer(sandbox, "uid drop"):
        pytest.skip("RLIMIT_NPROC needs a uid drop (root is exempt from it): " + repr(sandbox.layers))
    result = sandbox.run(FORK_COUNTER)
    forks, error = result.stdout.split()
    assert int(forks) < 32 and error == "BlockingIOError", f"forks were not limited: {result}"


def test_fork_bomb_is_contained(sandbox):
    if not has_layer(sandbox, "uid drop"):
        pytest.skip("a fork bomb is only contained with RLIMIT_NPROC (uid drop): " + repr(sandbox.layers))
    result = sandbox.run(FORK_BOMB)
    assert not result.passed, result
    assert leftover_processes(sandbox) == [], "fork-bomb processes survived"
    assert sandbox.run("print('after the bomb')").passed, "the next cell must run normally"


def test_file_size_is_limited(sandbox):
    result = sandbox.run("with open('big.bin', 'wb') as handle:\n    handle.write(bytes(64 << 20))")
    assert result.observation == "OSError: [Errno 27] File too large", result


def test_working_directory_is_private_and_fresh(sandbox):
    sandbox.run("open('note.txt', 'w').write('left behind')\nprint('wrote')")
    result = sandbox.run("import os\nprint(os.listdir('.'), os.listdir('..') == [os.path.basename(os.getcwd())])")
    assert result.stdout == "[] True\n", f"a cell saw files or directories of other cells: {result.stdout!r}"


def test_cannot_write_outside_the_working_directory(sandbox):
    if not (has_layer(sandbox, "uid drop") or has_layer(sandbox, "read-only")):
        pytest.skip("needs a uid drop or a read-only mount namespace: " + repr(sandbox.layers))
    code = ("import os\nfor path in ('/etc/thor_sbx', '/var/tmp/thor_sbx', '/thor_sbx', '/root/thor_sbx'):\n"
            "    try:\n        open(path, 'w').write('x')\n        print('WROTE', path)\n"
            "    except OSError:\n        pass\n"
            "print('done')")
    result = sandbox.run(code)
    assert result.stdout == "done\n", f"a cell wrote outside its directory: {result.stdout!r}"


def test_shared_memory_does_not_persist(sandbox):
    if not has_layer(sandbox, "private tmpfs"):
        pytest.skip("/dev/shm is only private with a mount namespace: " + repr(sandbox.layers))
    sandbox.run("open('/dev/shm/thor_secret', 'w').write('from cell one')\nprint('wrote')")
    result = sandbox.run("import os\nprint(os.path.exists('/dev/shm/thor_secret'))")
    assert result.stdout == "False\n", "a file in /dev/shm survived into the next cell"


def test_no_network_not_even_loopback(sandbox):
    if not has_layer(sandbox, "network namespace"):
        pytest.skip("no network namespace here: " + repr(sandbox.layers))
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        result = sandbox.run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                             "print('connected')")
    assert not result.passed and "Error" in result.observation, f"a cell reached the host's loopback: {result}"


def test_environment_is_scrubbed(sandbox):
    code = ("import os\nprint(sorted(os.environ))\nfor pid in ('1', str(os.getppid())):\n    try:\n"
            "        print(open(f'/proc/{pid}/environ').read())\n    except OSError:\n        pass")
    result = sandbox.run(code)
    assert result.passed and SECRET not in result.stdout, "the parent's environment leaked into a cell"


def test_stdin_is_closed(sandbox):
    result = sandbox.run("input()")
    assert result.observation.startswith("EOFError") and not result.timed_out, result


def test_output_flood_is_capped(sandbox):
    result = sandbox.run("while True:\n    print('spam' * 100)")
    assert result.truncated and not result.timed_out, f"expected a stop at the output cap: {result}"
    assert len(result.stdout.encode()) <= sandbox.output_limit, "more than the cap was kept"


@pytest.mark.parametrize("code,passed,exit_code", [
    ("print('hi')\nimport sys\nsys.exit(0)", True, 0),
    ("print('hi')\nimport sys\nsys.exit()", True, 0),
    ("print('hi')\nimport sys\nsys.exit(3)", False, 3),
    ("print('hi')\nimport os\nos._exit(0)", True, 0),
    ("print('hi')\nimport os\nos._exit(5)", False, 5),
])
def test_exit_paths(sandbox, code, passed, exit_code):
    result = sandbox.run(code)
    assert (result.passed, result.exit_code, result.stdout) == (passed, exit_code, "hi\n"), result


def test_exit_with_a_message_on_a_closed_stderr(sandbox):
    result = sandbox.run("import sys\nsys.stderr.close()\nsys.exit('bye')")
    assert (result.exit_code, result.observation) == (1, "bye"), result


def test_replacing_os_exit_does_not_confuse_the_child(sandbox):
    result = sandbox.run("import os\nos._exit = lambda status: None\nprint('patched')")
    assert result.passed and result.stdout == "patched\n", result
    assert sandbox.run("print('next')").passed, "the cell after must run normally"


def test_ignored_signals_do_not_stop_the_timeout(sandbox):
    code = ("import signal\nfor sig in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM, signal.SIGXCPU):\n"
            "    signal.signal(sig, signal.SIG_IGN)\nsignal.pthread_sigmask(signal.SIG_BLOCK, range(1, 32))\n"
            "while True:\n    pass")
    assert sandbox.run(code).timed_out, "a cell ignoring signals escaped the timeout"


def test_signal_death_is_reported(sandbox):
    result = sandbox.run("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)")
    assert result.signal == signal.SIGSEGV and "SIGSEGV" in result.observation, result


def test_closed_stdout_and_stderr(sandbox):
    result = sandbox.run("import os\nos.close(1)\nos.close(2)\ntotal = sum(range(10**6))")
    assert result.exit_code == 0 and not result.timed_out and not result.passed, result


def test_closed_sys_stdout_gives_readable_error(sandbox):
    result = sandbox.run("import sys\nsys.stdout.close()\nprint(1)")
    assert result.observation == "ValueError: I/O operation on closed file.", result


def test_deep_recursion(sandbox):
    result = sandbox.run("def down(n):\n    return down(n + 1)\ndown(0)")
    assert result.observation.startswith("RecursionError"), result


def test_binary_output_is_decoded_safely(sandbox):
    result = sandbox.run("import sys\nsys.stdout.buffer.write(b'\\xff\\xfe\\x00abc\\n')")
    assert result.passed and "\ufffd" in result.stdout and "abc" in result.stdout, result


def test_killing_the_parent_does_not_break_the_sandbox(sandbox):
    sandbox.run("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nprint('tried')")
    assert sandbox.run("print('next')").passed, "the cell after a parent kill must run"


def test_kill_all_inside_the_namespace_is_harmless(sandbox):
    if not has_layer(sandbox, "pid namespace"):
        pytest.skip("kill(-1) is only safe to test inside a private PID namespace: " + repr(sandbox.layers))
    pids = sandbox.worker_pids()
    sandbox.run("import os, signal\nos.kill(-1, signal.SIGKILL)\nprint('tried')")
    assert sandbox.worker_pids() == pids and sandbox.run("print('next')").passed, "kill(-1) hurt the sandbox"


def test_leftover_thread_does_not_hold_the_cell(sandbox):
    result = sandbox.run("import threading, time\nthreading.Thread(target=time.sleep, args=(100,)).start()\n"
                         "print('main')")
    assert result.passed and not result.timed_out, result


def test_nul_bytes_in_code(sandbox):
    result = sandbox.run("print(1)\x00")
    assert not result.passed and "null bytes" in result.observation, result


def test_lone_surrogate_in_code(sandbox):
    result = sandbox.run("print('\ud800')")
    assert not result.passed and "surrogates" in result.observation, result


def test_lone_surrogate_in_output(sandbox):
    result = sandbox.run("print('a\\udcffb')")
    assert result.passed and result.stdout == "a\\udcffb\n", result


def test_module_not_preloaded_imports(sandbox):
    if not any("interpreter readable" in layer for layer in sandbox.layers) and has_layer(sandbox, "uid drop"):
        pytest.skip("the cell uid cannot read the interpreter here: " + repr(sandbox.layers))
    result = sandbox.run("import wave, this\nprint(wave.__name__)")
    assert result.stdout.endswith("wave\n"), result


# ----------------------------------------------------------------------------------------- recovery

def test_dead_worker_is_restarted_transparently():
    with Sandbox(workers=1, timeout=TIMEOUT, preload=()) as box:
        os.killpg(box.worker_pids()[0], signal.SIGKILL)
        time.sleep(0.1)
        result = box.run("print('fresh')")
        assert result.passed and box.restarts == 1, f"expected one transparent restart: {result}"


def test_worker_dying_mid_cell_fails_only_that_cell():
    with Sandbox(workers=1, timeout=5.0, preload=()) as box:
        pid = box.worker_pids()[0]
        threading.Timer(0.5, os.killpg, (pid, signal.SIGKILL)).start()
        crashed = box.run("import time\ntime.sleep(3)\nprint('done')")
        assert crashed.crashed and not crashed.passed, crashed
        assert box.run("print('next')").passed, "the cell after a crash must run normally"


def test_workers_exit_when_the_controller_dies():
    controller = subprocess.Popen(
        [sys.executable, "-c", "import time\nfrom thor_min.sandbox import Sandbox\n"
         "box = Sandbox(workers=1, preload=())\nprint(box.worker_pids()[0], box.temp_root, flush=True)\n"
         "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    worker, temp_root = controller.stdout.readline().split()
    worker = int(worker)
    controller.kill()
    controller.wait()
    shutil.rmtree(temp_root, ignore_errors=True)  # a SIGKILLed controller cannot remove its (empty) temp root
    for _ in range(100):  # the worker sees EOF on its request pipe and exits; poll up to 10 s
        if not os.path.exists(f"/proc/{worker}") or open(f"/proc/{worker}/stat").read().split()[2] == "Z":
            break
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{worker}") or open(f"/proc/{worker}/stat").read().split()[2] == "Z", \
        "a worker outlived its controller"


def test_plain_mode_kills_escaped_daemons(plain_sandbox):
    assert plain_sandbox.run(SETSID_DAEMON).passed
    assert leftover_processes(plain_sandbox) == [], "plain mode left a setsid daemon running"


def test_plain_mode_removes_cell_directories(plain_sandbox):
    plain_sandbox.run("open('junk.txt', 'w').write('x')\nprint('ok')")
    leftovers = [name for _, _, names in os.walk(plain_sandbox.temp_root) for name in names]
    assert leftovers == [], f"files left in the sandbox temp root: {leftovers}"


def test_close_removes_the_temp_root():
    box = Sandbox(workers=1, timeout=TIMEOUT, preload=())
    box.run("print(1)")
    box.close()
    assert not os.path.exists(box.temp_root) and box.worker_pids() == [], "close() left a temp root or a worker"


@pytest.mark.slow
def test_hundred_hostile_cells_in_a_row(sandbox):
    hostile = ["while True:\n    pass", "x = bytearray(8 * 2**30)", "import sys\nsys.exit(3)", "import os\nos._exit(1)",
               "1/0", "input()", "while True:\n    print('y' * 1000)", SETSID_DAEMON, "import os\nos.close(1)",
               "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)", "print('\ud800')", "\x00",
               "def down(n):\n    return down(n + 1)\ndown(0)",
               "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)",
               "open('f', 'wb').write(bytes(64 << 20))", "import threading, time\n"
               "threading.Thread(target=time.sleep, args=(100,)).start()\nimport os\nos._exit(0)"]
    if has_layer(sandbox, "uid drop"):
        hostile.append(FORK_BOMB)
    cells = [hostile[index % len(hostile)] for index in range(100)]
    pids, restarts = sandbox.worker_pids(), sandbox.restarts
    results = sandbox.run_batch(cells)
    assert not any(result.crashed for result in results), "a hostile cell crashed a worker"
    assert sandbox.worker_pids() == pids and sandbox.restarts == restarts, "a worker died during the hostile batch"
    assert leftover_processes(sandbox) == [], "hostile cells left processes behind"
    scratch = sandbox.run("import os\nprint(os.listdir('..') == [os.path.basename(os.getcwd())])")
    assert scratch.stdout == "True\n", f"cell directories were left in the scratch root: {scratch}"
    assert [name for _, _, names in os.walk(sandbox.temp_root) for name in names] == [], "files left on the host"
    assert sandbox.run("print(6 * 7)").observation == "42", "the next ordinary cell must pass"


# ----------------------------------------------------------------------------------------- the light pool

SYMPY_LOADED = "print(any(c.__module__.startswith('sympy') for c in ().__class__.__base__.__subclasses__()))"
SAME_EITHER_WAY = ["print(4821 * 37)", "print(sum(k**2 for k in range(1, 292 + 1)))", "1/0", "print(int('x'))",
                   "x = 5", "print(undefined_name)", "print('a' * 300)"]


def test_a_cell_that_never_says_import_uses_the_light_pool():
    assert uses_light_pool("print(4821 * 37)", []), "an arithmetic cell is light"
    assert not uses_light_pool("import math\nprint(math.pi)", []), "an import needs the preloaded pool"
    assert not uses_light_pool("print(x)", ["from sympy import symbols"]), "so does an import in the history"
    assert not uses_light_pool("print(__import__('sys').version)", []), "any mention of import counts"


def test_import_free_cells_run_where_sympy_is_not_preloaded():
    with Sandbox(workers=1, timeout=TIMEOUT) as box:
        assert box.slots == 2 and len(box.worker_pids()) == 1, "the light worker starts, the preloaded one waits"
        assert box.run(SYMPY_LOADED).observation == "False", "an import-free cell runs in the light pool"
        assert len(box.worker_pids()) == 1, "and does not start the preloaded worker"
        assert box.run("import sys\n" + SYMPY_LOADED).observation == "True", "a cell that imports gets the preload"
        assert len(box.worker_pids()) == 2, "the preloaded worker started on its first cell"


def test_the_light_pool_gives_the_observations_the_preloaded_one_gives(sandbox):
    with Sandbox(workers=1, timeout=TIMEOUT, light_cells=False) as preloaded_only:
        assert preloaded_only.run(SYMPY_LOADED).observation == "True", "light_cells=False: one preloaded pool"
        expected = [result.observation for result in preloaded_only.run_batch(SAME_EITHER_WAY)]
    assert [result.observation for result in sandbox.run_batch(SAME_EITHER_WAY)] == expected
