"""Run metrics: one JSONL line per logged step, the curves as a PNG, and a copy for experiment trackers.

Every stage (pretrain, SFT, RL) appends `{"stage", "step", "time", ...numbers}` rows to
`OUT/metrics.jsonl` (append-only, so a resumed run continues the same file): the source of truth, always
written. `OUT/curves.png` is redrawn from the whole file (`thor_min.plot.save_curves`), at most every
`plot_every_s` seconds and at the end of each stage. Each row also goes to the trackers the run was given
(`--report-to`: TensorBoard, W&B, Trackio; `thor_min.trackers`), which `close()` flushes.
Limits: metrics are scalars; a resumed run may log a step twice (the plot shows both points; trackers get
the repeated step again).
"""

import json
import math
import time
from pathlib import Path

from thor_min.plot import save_curves


class MetricsLog:
    """Append-only JSONL metrics, a periodically refreshed PNG of the curves, and optional trackers."""

    def __init__(self, out_dir: str | Path, plot_every_s: float = 120.0, trackers: list | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "metrics.jsonl"
        self.plot_path = self.out_dir / "curves.png"
        self.plot_every_s = plot_every_s
        self.trackers = list(trackers or [])
        self._last_plot = time.monotonic()

    def log(self, stage: str, step: int, **values: float) -> None:
        row = {"stage": stage, "step": step, "time": round(time.time(), 3)}
        row.update({key: _clean(value) for key, value in values.items()})
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        for tracker in self.trackers:
            tracker.log(stage, step, {k: v for k, v in row.items() if k not in ("stage", "step", "time")})
        if time.monotonic() - self._last_plot > self.plot_every_s:
            self.plot()

    def drop_stage(self, stage: str) -> None:
        """Forget a stage's earlier rows (a stage re-run from scratch replaces its curve)."""
        kept = [row for row in self.rows() if row["stage"] != stage]
        self.path.write_text("".join(json.dumps(row) + "\n" for row in kept))

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def plot(self) -> None:
        """Redraw `curves.png` from every row logged so far (nothing is written before the first row)."""
        self._last_plot = time.monotonic()
        save_curves(self.plot_path, self.rows())

    def close(self) -> None:
        """Flush and close the trackers (metrics.jsonl needs nothing: every row is written when logged)."""
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def _clean(value):
    """JSON-safe scalar: python float/int, NaN/inf as None."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
