"""Bench: executions per second of the fork-server sandbox vs a fresh `python3` process per cell.

Run `python -m thor_min.bench sandbox [--cells N --fresh-cells M --workers W --timeout S]` (or
`python sandbox.py --bench ...`). Both sides run the same cell, which imports sympy and computes something, with
the same parallelism (`--workers` threads, default the CPU count), in the same run:

- ours: `Sandbox.run_batch` of N copies (worker start-up is printed but not counted: it is paid once per run);
- baseline: `subprocess.run([sys.executable, "-c", cell])` per copy (the same interpreter, no isolation at all,
  so the baseline is as cheap as a fresh process gets), M copies on a thread pool of the same size.

It prints both rates, then `ratio: X` on its own line, plus the round-trip median of a trivial cell (the shape of
most rollout cells). Both sides must print the expected answer, or the bench exits non-zero.
Timing varies with machine load (other processes on the same cores slow both sides).
"""

import argparse
import concurrent.futures
import os
import statistics
import subprocess
import sys
import time

from thor_min.sandbox import Sandbox

BENCH_CELL = ("import sympy\nx = sympy.symbols('x')\n"
              "print(sympy.solve(x**3 - 6*x**2 + 11*x - 6, x), sympy.factorint(2**32 + 1))")
EXPECTED = "[1, 2, 3] {641: 1, 6700417: 1}"
TRIVIAL_CELL = "print(4821 * 37)"


def fresh_process_seconds(cells: int, workers: int, timeout: float) -> tuple:
    """Wall seconds to run `cells` fresh interpreters on `workers` threads; and whether all printed EXPECTED."""
    def one_cell(_):
        done = subprocess.run([sys.executable, "-c", BENCH_CELL], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=timeout)
        return done.returncode == 0 and done.stdout.strip() == EXPECTED

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        correct = all(pool.map(one_cell, range(cells)))
    return time.perf_counter() - started, correct


def sandbox_seconds(sandbox: Sandbox, cells: int) -> tuple:
    started = time.perf_counter()
    results = sandbox.run_batch([BENCH_CELL] * cells)
    return time.perf_counter() - started, all(result.observation == EXPECTED for result in results)


def trivial_round_trip_ms(sandbox: Sandbox, repeats: int = 50) -> float:
    times = [sandbox.run(TRIVIAL_CELL).seconds for _ in range(repeats)]
    return 1000 * statistics.median(times)


def run_bench(cells: int, fresh_cells: int, workers: int, timeout: float) -> int:
    print(f"cell: {BENCH_CELL!r}")
    print(f"workers: {workers} on {os.cpu_count()} CPUs (the same parallelism for both sides)")
    started = time.perf_counter()
    with Sandbox(workers=workers, timeout=timeout, memo_cells=0) as sandbox:   # every cell forks
        print(f"sandbox start-up: {time.perf_counter() - started:.2f} s (not counted); "
              f"{len(sandbox.layers)} isolation layers")
        sandbox_seconds(sandbox, 2 * workers)  # first cells touch fresh pages in each zygote
        ours_seconds, ours_correct = sandbox_seconds(sandbox, cells)
        trivial_ms = trivial_round_trip_ms(sandbox)
    fresh_seconds, fresh_correct = fresh_process_seconds(fresh_cells, workers, timeout=max(timeout, 60.0))
    ours_rate, fresh_rate = cells / ours_seconds, fresh_cells / fresh_seconds
    print(f"sandbox: {cells} cells in {ours_seconds:.2f} s = {ours_rate:.1f} exec/s")
    print(f"fresh python3 per cell: {fresh_cells} cells in {fresh_seconds:.2f} s = {fresh_rate:.2f} exec/s")
    print(f"sandbox trivial cell {TRIVIAL_CELL!r}: median round trip {trivial_ms:.2f} ms")
    print(f"ratio: {ours_rate / fresh_rate:.1f}x")
    if not (ours_correct and fresh_correct):
        print(f"error: wrong output (sandbox correct: {ours_correct}, fresh correct: {fresh_correct})",
              file=sys.stderr)
        return 1
    return 0


def main(argv: list) -> int:
    parser = argparse.ArgumentParser(prog="python -m thor_min.bench sandbox",
                                     description="Sandbox executions/s vs a fresh python3 process per cell.")
    parser.add_argument("--cells", type=int, default=200, help="cells run by the sandbox (default 200)")
    parser.add_argument("--fresh-cells", type=int, default=16, help="cells run as fresh processes (default 16)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallelism for both sides")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-cell timeout in seconds (default 30)")
    args = parser.parse_args(argv)
    if min(args.cells, args.fresh_cells, args.workers) < 1 or args.timeout <= 0:
        parser.error("--cells, --fresh-cells and --workers must be >= 1 and --timeout > 0")
    return run_bench(args.cells, args.fresh_cells, args.workers, args.timeout)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
