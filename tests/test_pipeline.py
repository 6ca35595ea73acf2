"""train.py end to end: flags, errors, and a run killed with SIGKILL that resumes from its checkpoint.

    pytest tests/test_pipeline.py          # the kill/resume test is marked slow (about a minute)
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def train(*args, **kwargs):
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          **kwargs)


def test_help_lists_every_stage():
    result = train("--help")
    assert result.returncode == 0, f"--help failed: {result.stderr}"
    for stage in ("pretrain", "tirgen", "sft", "rl", "eval"):
        assert stage in result.stdout, f"--help must mention the {stage} stage"


def test_an_unknown_flag_is_a_usage_error():
    result = train("--no-such-flag")
    assert result.returncode == 2 and "unrecognized arguments" in result.stderr, "argparse must reject it"


def test_a_full_run_into_a_used_directory_needs_resume_or_overwrite(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    result = train("--out", str(tmp_path))
    assert result.returncode != 0, "starting over a previous run must not proceed silently"
    assert "--resume" in result.stderr and "--overwrite" in result.stderr, f"the error names the fix: {result.stderr}"
    assert (tmp_path / "metrics.jsonl").exists(), "nothing of the previous run is lost"


def test_sft_without_tirgen_data_is_one_clear_line(tmp_path):
    result = train("--stage", "sft", "--out", str(tmp_path))
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1 and "tirgen" in lines[0], f"one line naming the fix: {lines}"


def test_an_unloadable_model_is_one_clear_line(tmp_path):
    result = train("--model", str(tmp_path / "missing"), "--stage", "eval", "--out", str(tmp_path / "out"))
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), f"got: {lines}"


def _checkpoint_step(out: Path) -> int:
    pointer = out / "checkpoints" / "pretrain" / "latest"
    return int(pointer.read_text().split("-")[1]) if pointer.exists() else 0


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_and_loses_at_most_the_step_in_flight(tmp_path):
    args = ["--stage", "pretrain", "--out", str(tmp_path), "--pretrain-steps", "200", "--pretrain-max-steps", "200",
            "--checkpoint-every", "1"]
    process = subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while _checkpoint_step(tmp_path) < 30 and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = time.time()
    saved = _checkpoint_step(tmp_path)
    assert 30 <= saved < 200, f"the run should have been killed mid-way, checkpoint at step {saved}"
    assert not (tmp_path / "base" / "config.json").exists(), "a killed stage must not leave a finished model"
    logged_before = max(json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines())

    result = train(*args, "--resume", timeout=600)
    assert result.returncode == 0, f"resume failed: {result.stderr[-2000:]}"
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    resumed = [row["step"] for row in rows if row["time"] > killed_at]
    assert min(resumed) >= logged_before, f"resumed at step {min(resumed)}, more than the step in flight was lost"
    assert min(resumed) == saved + 1, "training continues right after the last checkpoint"
    assert max(resumed) == 200 and (tmp_path / "base" / "config.json").exists(), "the resumed stage finishes"
