"""Jobs side by side (thor_min.side_by_side), and the RL stage training its two variants that way.

The jobs below run in spawned processes, which import this module by name to find them (so it imports nothing
heavy at the top, and they run without torch: threads=0).
"""

import contextlib
import io
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from thor_min.metrics import MetricsLog
from thor_min.side_by_side import Job, run_side_by_side

REPO = Path(__file__).resolve().parents[1]


def counting_job(name: str, steps: int, *, log) -> dict:
    log.drop_stage(name)
    for step in range(1, steps + 1):
        log.log(name, step, reward=step / steps)
    return {"name": name, "pid": os.getpid()}


def failing_job(*, log) -> None:
    log.log("failing", 1, reward=0.0)
    raise ValueError("no such problem file")


def dying_job(*, log) -> None:
    os._exit(3)


def test_jobs_log_through_the_parent_and_return_their_results(tmp_path):
    log = MetricsLog(tmp_path)
    log.log("old", 1, loss=1.0)
    jobs = [Job("first", f"{__name__}:counting_job", ("first", 5), steps=5),
            Job("second", f"{__name__}:counting_job", ("second", 3), steps=3)]
    results = run_side_by_side(jobs, log, at_once=2, threads=0)
    assert list(results) == ["first", "second"], f"one result per job, in job order: {results}"
    assert results["first"]["pid"] != results["second"]["pid"] != os.getpid(), "each job has a process of its own"
    rows = log.rows()
    steps = {stage: [row["step"] for row in rows if row["stage"] == stage] for stage in ("old", "first", "second")}
    assert steps == {"old": [1], "first": [1, 2, 3, 4, 5], "second": [1, 2, 3]}, f"every row, once, in order: {steps}"


def test_a_failed_job_is_named_and_the_others_finish(tmp_path):
    log = MetricsLog(tmp_path)
    jobs = [Job("failing", f"{__name__}:failing_job"), Job("counting", f"{__name__}:counting_job", ("counting", 4))]
    with pytest.raises(RuntimeError, match="failing failed: ValueError: no such problem file"):
        run_side_by_side(jobs, log, at_once=1, threads=0)   # one at a time: the second job starts after the first failed
    assert [row["step"] for row in log.rows() if row["stage"] == "counting"] == [1, 2, 3, 4], \
        "a failed job must not stop the others"


def test_a_job_that_dies_without_a_word_is_reported_with_its_exit_code(tmp_path):
    with pytest.raises(RuntimeError, match="dying failed: exit code 3"):
        run_side_by_side([Job("dying", f"{__name__}:dying_job")], MetricsLog(tmp_path), at_once=1, threads=0)


def test_the_run_time_counts_side_by_side_variants_once():
    from thor_min.ablation import run_seconds

    stages = {"sft": {"seconds": 100.0}, "rl-traj": {"seconds": 300.0, "side_by_side": True},
              "rl": {"seconds": 320.0, "side_by_side": True}, "rl-side-by-side": {"seconds": 330.0},
              "eval": {"seconds": 50.0}}
    assert run_seconds(stages) == 480.0, "the variants' shared wall time, not the sum of their times"


FLAGS = ["--rl-steps", "1", "--rl-prompts", "2", "--group-size", "2", "--max-new-tokens", "24", "--eval-problems", "3",
         "--eval-samples", "1"]


@pytest.fixture(scope="module")
def both_ways(tmp_path_factory):
    """RL and eval stages of one run through train.py's main in this process: side by side (the tiny preset; the
    jobs are spawned processes, as always) and one job after the other (--side-by-side 1)."""
    sys.path.insert(0, str(REPO))
    import train as train_cli
    from thor_min import tiny

    outs = {mode: tmp_path_factory.mktemp(mode) for mode in ("side-by-side", "sequential")}
    printed = io.StringIO()
    for mode, out in outs.items():
        for name in ("base", "sft"):   # the shipped base stands in for the cold-start model
            shutil.copytree(tiny.SHIPPED_BASE, out / name)
        flags = ["--out", str(out), *FLAGS] + (["--side-by-side", "1"] if mode == "sequential" else [])
        for stage in ("rl", "eval"):
            with contextlib.redirect_stdout(printed if mode == "side-by-side" else io.StringIO()):
                assert train_cli.main(["--stage", stage, *flags]) == 0, f"{mode} --stage {stage} failed"
    return outs, printed.getvalue()


@pytest.mark.slow
def test_rl_variants_side_by_side_train_the_weights_one_after_the_other_would(both_ways):
    outs, printed = both_ways
    assert "rl-traj, rl side by side (2 processes" in printed, "the tiny preset trains both variants at once"
    for variant in ("rl-traj", "rl"):
        weights = [(out / variant / "model.safetensors").read_bytes() for out in outs.values()]
        assert weights[0] == weights[1], f"{variant}: side by side must train the same weights as alone"


@pytest.mark.slow
def test_side_by_side_rl_writes_each_variants_rows_and_times_once(both_ways):
    out = both_ways[0]["side-by-side"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for variant in ("rl-traj", "rl"):
        assert [row["step"] for row in rows if row["stage"] == variant] == [0, 1], \
            f"{variant}: the parent writes each child's rows once (step 0 is the first greedy eval)"
    stages = json.loads((out / "stages.json").read_text())
    assert stages["rl-side-by-side"]["variants"] == ["rl-traj", "rl"], stages
    assert stages["rl"]["side_by_side"] and stages["rl-traj"]["side_by_side"], "each variant is marked"


@pytest.mark.slow
def test_eval_rows_side_by_side_write_what_one_process_writes(both_ways):
    outs, printed = both_ways
    assert "eval: 5 rows in 2 processes side by side" in printed, printed[-500:]
    files = sorted(path.name for path in (outs["sequential"] / "eval").iterdir())
    assert len(files) == 10, f"5 rows x 2 benchmarks: {files}"
    for name in files:
        texts = [(out / "eval" / name).read_text() for out in outs.values()]
        assert texts[0] == texts[1], f"eval/{name} differs between side by side and one process"
    summaries = [json.dumps(without_seconds(json.loads((out / "summary.json").read_text())["rows"]))
                 for out in outs.values()]
    assert summaries[0] == summaries[1], "summary.json rows (in the ablation order) must not depend on the mode"


def without_seconds(value):
    """A summary without its wall times (the one thing that may differ)."""
    if isinstance(value, dict):
        return {key: without_seconds(item) for key, item in value.items() if key != "seconds"}
    return [without_seconds(item) for item in value] if isinstance(value, list) else value


TIRGEN_FLAGS = ["--tirgen-problems", "12", "--tirgen-attempts", "2", "--tirgen-problems-per-round", "4",
                "--rollout-batch", "8"]   # 3 rounds (shares of 1 and 2); the plain-CoT baseline in batches of 8 and 4


@pytest.mark.slow
def test_tirgen_side_by_side_writes_what_one_process_writes(tmp_path):
    sys.path.insert(0, str(REPO))
    import train as train_cli
    from thor_min import tiny

    printed = {}
    for mode in ("side-by-side", "sequential"):
        shutil.copytree(tiny.SHIPPED_BASE, tmp_path / mode / "base")
        flags = ["--stage", "tirgen", "--out", str(tmp_path / mode), *TIRGEN_FLAGS]
        with contextlib.redirect_stdout(io.StringIO()) as stdout:
            assert train_cli.main(flags + (["--side-by-side", "1"] if mode == "sequential" else [])) == 0, mode
        printed[mode] = stdout.getvalue()
    assert "tirgen: 3 rounds in 2 processes side by side" in printed["side-by-side"], printed["side-by-side"][-500:]
    assert "side by side" not in printed["sequential"], "--side-by-side 1 runs TIRGen in this process"
    stats = json.loads((tmp_path / "sequential" / "tirgen_stats.json").read_text())
    assert stats["kept_per_stage"]["attempts"] == 24 and stats["kept_per_stage"]["balanced"] > 0, stats
    for name in ("tirgen.jsonl", "tirgen_stats.json", "tirgen_raw.jsonl"):
        texts = [(tmp_path / mode / name).read_text() for mode in ("side-by-side", "sequential")]
        if name == "tirgen_raw.jsonl":   # the same attempts; the order is the shares' (the filter sorts them)
            texts = [sorted(text.splitlines()) for text in texts]
        assert texts[0] == texts[1], f"{name} differs between side by side and one process"
    assert not list((tmp_path / "side-by-side").glob("tirgen_raw.part-*")), "the part files are folded and removed"
    stages = json.loads((tmp_path / "side-by-side" / "stages.json").read_text())
    assert stages["tirgen"]["jobs"] == 2, stages["tirgen"]
