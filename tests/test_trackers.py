"""Experiment trackers (`--report-to`): real event files and runs, read back with each tracker's own reader.

TensorBoard is in the `dev` extra; W&B (offline mode) and Trackio (a local SQLite store) are tested when
installed (`pip install -e ".[wandb]"`, `".[trackio]"`) and skipped with the reason otherwise.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from thor_min import trackers
from thor_min.metrics import MetricsLog
from thor_min.trackers import TrackerError, check_report_to, open_trackers

NEVER = 1e12   # plot_every_s that keeps MetricsLog from drawing curves.png
REPO = Path(__file__).resolve().parent.parent


def log_two_stages(out: Path, names: list[str]) -> MetricsLog:
    log = MetricsLog(out, plot_every_s=NEVER, trackers=open_trackers(names, out, "test-run", {"lr": 1e-3}))
    for step in (1, 2, 3):
        log.log("sft", step, loss=1.0 / step, eval_loss=None)
    log.log("rl", 1, reward=0.25)
    log.log("rl", 2, reward=0.75)
    log.close()
    return log


def test_none_means_no_tracker():
    assert check_report_to(["none"]) == () and check_report_to(None) == (), "none must open nothing"


def test_unknown_and_contradictory_names_fail_in_one_line():
    with pytest.raises(TrackerError, match="unknown --report-to 'mlflow'"):
        check_report_to(["mlflow"])
    with pytest.raises(TrackerError, match="cannot be combined"):
        check_report_to(["none", "tensorboard"])


def test_a_missing_package_names_its_extra(monkeypatch):
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None)   # as if nothing were installed
    with pytest.raises(TrackerError) as error:
        check_report_to(["wandb"])
    message = str(error.value)
    assert 'pip install -e ".[wandb]"' in message and "\n" not in message, message


def test_train_py_refuses_a_missing_tracker_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    import train   # the top-level script

    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None)
    assert train.main(["--report-to", "trackio", "--out", str(tmp_path / "run")]) == 2, "expected exit status 2"
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: --report-to trackio") and '".[trackio]"' in error and "\n" not in error, error
    assert not (tmp_path / "run").exists(), "nothing may be written before the check"


def test_tensorboard_events_read_back_with_its_reader(tmp_path):
    pytest.importorskip("tensorboard", reason='needs the tensorboard extra: pip install -e ".[tensorboard]"')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = log_two_stages(tmp_path, ["tensorboard"])
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("sft/loss")]
    assert loss == [(1, 1.0), (2, pytest.approx(0.5)), (3, pytest.approx(1 / 3))], loss
    assert [(e.step, e.value) for e in events.Scalars("rl/reward")] == [(1, 0.25), (2, 0.75)]
    assert "sft/eval_loss" not in events.Tags()["scalars"], "a None value is not a measurement"
    assert len(log.rows()) == 5, "metrics.jsonl must still get every row"


def wandb_records(path: Path):
    """The protobuf records of a .wandb file: a W&B header, then LevelDB-log framed chunks in 32 KiB blocks."""
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", "not a W&B data file"
    position, pending = 7, b""
    while position + 7 <= len(data):
        if block - position % block < 7:           # a block's tail too short for a chunk header is padding
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):                          # FULL or LAST chunk: a record is complete
            yield pending
            pending = b""


@pytest.mark.slow
def test_wandb_offline_run_holds_the_logged_values(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason='needs the wandb extra: pip install -e ".[wandb]"')
    from wandb.proto import wandb_internal_pb2

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log_two_stages(tmp_path, ["wandb"])
    wandb.teardown()   # finish() can return before W&B's service process has written the file: wait for it
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    history = []
    for data in wandb_records(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
    losses = [(row["sft/step"], row["sft/loss"]) for row in history if "sft/loss" in row]
    assert losses == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))], history
    assert [(row["rl/step"], row["rl/reward"]) for row in history if "rl/reward" in row] == [(1, 0.25), (2, 0.75)]


TRACKIO_SCRIPT = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from tests.test_trackers import log_two_stages
from trackio.sqlite_storage import SQLiteStorage
log_two_stages(Path(sys.argv[1]), ["trackio"])
print(json.dumps(SQLiteStorage.get_logs("thor-min", "test-run")))
"""


@pytest.mark.slow
def test_trackio_run_holds_the_logged_values(tmp_path):
    pytest.importorskip("trackio", reason='needs the trackio extra: pip install -e ".[trackio]"')
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio")}   # read when trackio is imported: a fresh process
    result = subprocess.run([sys.executable, "-c", TRACKIO_SCRIPT, str(tmp_path / "run"), str(REPO)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    logs = json.loads(result.stdout.strip().splitlines()[-1])
    assert [(row["sft/step"], row["sft/loss"]) for row in logs if "sft/loss" in row] == \
        [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))], logs
    assert [row["rl/reward"] for row in logs if "rl/reward" in row] == [0.25, 0.75], logs
