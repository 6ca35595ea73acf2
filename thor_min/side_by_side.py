"""Independent jobs side by side, one process each, writing one metrics log.

THOR's ablation trains two RL variants (trajectory level only, and hierarchical) from the same cold-start
model, and evaluates five rows; none reads another's output. On a CPU whose sampling stages use one torch
thread, one job after the other leaves a core idle, so the tiny preset runs them at once, one process per core
(`Preset.side_by_side`). Each job draws its randomness from its own seeded streams (thor_min.rollout,
thor_min.rl) and decodes the same batches as alone, so running it beside another does the same work.

Design:
- Fresh interpreters (the "spawn" start method): a forked child would inherit torch's thread pools and the
  parent's sandbox processes.
- One owner per file. A child's metrics rows travel over a queue to the parent, which writes metrics.jsonl,
  feeds the trackers and draws one progress bar per job (the children's own bars are off). The parent also
  records what each job returns (the pipeline writes stages.json from it).
- A job that fails does not stop the others: their work is kept, and the error names every failed job.

Limits: a job is a module-level function, named "module:function" and called as `function(*args, log=...)`
with picklable arguments and result. The children start in about the time an interpreter takes to import
torch (a few seconds).
"""

import importlib
import multiprocessing
import os
import queue as queue_module
from contextlib import contextmanager
from dataclasses import dataclass

from tqdm.auto import tqdm

BAR_KEYS = ("reward", "cell_pass_rate")   # metrics a job's bar shows when its rows have them


@dataclass(frozen=True)
class Job:
    name: str           # the job's name, and the metrics stage its progress bar follows
    target: str         # "module:function", called in the child as function(*args, log=QueuedLog)
    args: tuple = ()
    steps: int = 0      # the last step the job logs (its bar's total)


class QueuedLog:
    """A child's stand-in for MetricsLog: each call is sent to the parent, which makes it on the real log."""

    def __init__(self, channel, index: int):
        self.channel, self.index = channel, index

    def log(self, stage: str, step: int, **values) -> None:
        self.channel.put(("call", self.index, ("log", (stage, step), values)))

    def drop_stage(self, stage: str) -> None:
        self.channel.put(("call", self.index, ("drop_stage", (stage,), {})))

    def plot(self) -> None:
        self.channel.put(("call", self.index, ("plot", (), {})))

    def progress(self, done: int) -> None:
        """Move the job's bar to `done` of its steps without logging a row."""
        self.channel.put(("progress", self.index, done))


def _child(target: str, args: tuple, threads: int, channel, index: int) -> None:
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    module, name = target.split(":")
    function = getattr(importlib.import_module(module), name)
    try:
        result = function(*args, log=QueuedLog(channel, index))
    except BaseException as error:
        channel.put(("failed", index, f"{type(error).__name__}: {error}"))
        raise
    channel.put(("done", index, result))


@contextmanager
def _environment(**values: str):
    """Environment variables set for the processes started inside (spawn copies os.environ at start)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_side_by_side(jobs: list[Job], log, *, at_once: int, threads: int = 1) -> dict[str, object]:
    """Run `jobs`, at most `at_once` at a time, each in its own process with `threads` torch threads (0: torch's
    default); make their log calls on `log`. Returns {job name: its result}; raises RuntimeError naming the jobs
    that failed (after every other job has finished)."""
    context = multiprocessing.get_context("spawn")
    channel = context.Queue()
    waiting, running, results, failures = list(range(len(jobs))), {}, {}, {}
    bars = [tqdm(total=job.steps, desc=job.name, position=index, dynamic_ncols=True) for index, job in enumerate(jobs)]
    try:
        while waiting or running:
            while waiting and len(running) < at_once:
                index = waiting.pop(0)
                process = context.Process(target=_child, args=(jobs[index].target, jobs[index].args, threads,
                                                                channel, index), name=jobs[index].name)
                with _environment(TQDM_DISABLE="1"):
                    process.start()
                running[index] = process
            try:
                kind, index, payload = channel.get(timeout=1.0)
            except queue_module.Empty:   # a child that died without a word (killed, out of memory)
                for index in [i for i, process in running.items() if not process.is_alive()]:
                    failures.setdefault(index, f"exit code {running.pop(index).exitcode}")
                continue
            if kind == "call":
                method, args, values = payload
                getattr(log, method)(*args, **values)
                if method == "log":
                    _advance(bars[index], args[1], values)
            elif kind == "progress":
                _advance(bars[index], payload, {})
            else:
                (results if kind == "done" else failures)[index] = payload
                running.pop(index).join()
    finally:
        for process in running.values():   # interrupted (Ctrl-C): stop the children too
            process.terminate()
            process.join()
        for bar in bars:
            bar.close()
    if failures:
        raise RuntimeError("; ".join(f"{jobs[i].name} failed: {why}" for i, why in sorted(failures.items())))
    return {jobs[index].name: result for index, result in sorted(results.items())}


def _advance(bar, step: int, values: dict) -> None:
    bar.update(max(0, step - bar.n))
    shown = {key: f"{values[key]:.2f}" for key in BAR_KEYS if isinstance(values.get(key), (int, float))}
    if shown:
        bar.set_postfix(shown)
