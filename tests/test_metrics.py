"""MetricsLog: append-only JSONL rows, JSON-safe values, per-stage reset, and the curves PNG."""

import json
import math

import numpy as np
import torch
from PIL import Image

from thor_min.metrics import MetricsLog

NEVER = 1e12   # plot_every_s that keeps `log` from redrawing the PNG


def lines(log: MetricsLog) -> list[dict]:
    return [json.loads(line) for line in log.path.read_text().splitlines()]


def test_log_appends_one_row_per_call(tmp_path):
    log = MetricsLog(tmp_path, plot_every_s=NEVER)
    log.log("sft", 1, loss=2.5)
    log.log("sft", 2, loss=2.0, lr=1e-3)
    rows = lines(log)
    assert [(r["stage"], r["step"], r.get("loss")) for r in rows] == [("sft", 1, 2.5), ("sft", 2, 2.0)], rows
    assert rows[1]["lr"] == 1e-3, "extra metrics must be kept"


def test_rows_carry_a_wall_clock_time(tmp_path):
    log = MetricsLog(tmp_path, plot_every_s=NEVER)
    log.log("rl", 3, reward=0.5)
    row = lines(log)[0]
    assert isinstance(row["time"], float) and row["time"] > 1.6e9, f"time should be a unix timestamp: {row}"


def test_a_new_log_on_the_same_directory_appends(tmp_path):
    MetricsLog(tmp_path, plot_every_s=NEVER).log("sft", 1, loss=1.0)
    MetricsLog(tmp_path, plot_every_s=NEVER).log("sft", 2, loss=0.5)
    assert [r["step"] for r in lines(MetricsLog(tmp_path))] == [1, 2], "a resumed run must continue the file"


def test_non_finite_values_become_null(tmp_path):
    log = MetricsLog(tmp_path, plot_every_s=NEVER)
    log.log("sft", 1, a=float("nan"), b=float("inf"), c=-float("inf"), d=1.5)
    text = log.path.read_text()
    assert "NaN" not in text and "Infinity" not in text, f"invalid JSON tokens written: {text}"
    row = json.loads(text)
    assert (row["a"], row["b"], row["c"], row["d"]) == (None, None, None, 1.5), row


def test_tensor_and_numpy_scalars_are_stored_as_numbers(tmp_path):
    log = MetricsLog(tmp_path, plot_every_s=NEVER)
    log.log("rl", 1, t=torch.tensor(0.25), n=np.float32(0.5), bad=torch.tensor(float("nan")))
    row = lines(log)[0]
    assert (row["t"], row["n"], row["bad"]) == (0.25, 0.5, None), row


def test_drop_stage_removes_only_that_stage(tmp_path):
    log = MetricsLog(tmp_path, plot_every_s=NEVER)
    log.log("pretrain", 1, loss=3.0)
    log.log("sft", 1, loss=2.0)
    log.log("pretrain", 2, loss=2.9)
    log.log("rl", 1, reward=0.1)
    log.drop_stage("pretrain")
    assert [(r["stage"], r["step"]) for r in log.rows()] == [("sft", 1), ("rl", 1)], log.rows()


def test_drop_stage_on_a_missing_file_is_harmless(tmp_path):
    log = MetricsLog(tmp_path, plot_every_s=NEVER)
    log.drop_stage("sft")
    assert log.rows() == [], "dropping from an empty log should leave it empty"


def test_plot_writes_a_valid_png(tmp_path):
    log = MetricsLog(tmp_path, plot_every_s=NEVER)
    for step in range(1, 6):
        log.log("sft", step, loss=3.0 / step, eval_loss=float("nan") if step == 2 else 3.2 / step)
        log.log("rl", step, reward=0.1 * step)
    log.plot()
    with Image.open(log.plot_path) as image:
        image.verify()   # checks the PNG's chunks and CRCs
        assert image.format == "PNG" and image.size[0] > 1000 and image.size[1] > 300, f"odd PNG {image.size}"


def test_plot_without_rows_writes_nothing(tmp_path):
    log = MetricsLog(tmp_path, plot_every_s=NEVER)
    log.plot()
    assert not log.plot_path.exists(), "no metrics, no PNG expected"


def test_log_redraws_the_png_when_due(tmp_path):
    log = MetricsLog(tmp_path, plot_every_s=0.0)
    log.log("sft", 1, loss=1.0)
    assert log.plot_path.exists(), "with plot_every_s=0 every log call should redraw curves.png"


def test_clean_values_are_json_serialisable(tmp_path):
    log = MetricsLog(tmp_path, plot_every_s=NEVER)
    log.log("x", 0, big=1e308 * 10, small=-0.0, integer=3)
    row = lines(log)[0]
    assert row["big"] is None and row["integer"] == 3 and math.copysign(1, row["small"]) == -1, row
