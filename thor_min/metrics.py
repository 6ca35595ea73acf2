"""Run metrics: one JSONL line per logged step, and a PNG of the curves a person can look at.

Every stage (pretrain, SFT, RL) appends `{"stage", "step", "time", ...numbers}` rows to
`OUT/metrics.jsonl` (append-only, so a resumed run continues the same file) and the PNG
`OUT/curves.png` is redrawn from the whole file, at most every `plot_every_s` seconds and at the end of
each stage. One panel per metric, one line per stage, drawn by the hand-written `thor_min.plot`.
Limits: metrics are scalars; a resumed run may log a step twice (the plot shows both points).
"""

import json
import math
import time
from pathlib import Path

from thor_min.plot import Panel, save_line_panels

# Panels in display order (metrics missing from the file are skipped; others are appended after).
PREFERRED_PANELS = (
    "loss", "eval_loss", "restate_rate", "reward", "accuracy", "eval_accuracy", "cell_call_rate", "cell_pass_rate",
    "step_pass_rate", "clip_frac_high", "clip_frac_low", "approx_kl_old", "entropy", "tokens_per_s", "lr",
)
SKIPPED_KEYS = {"stage", "step", "time"}


class MetricsLog:
    """Append-only JSONL metrics with a periodically refreshed PNG of the curves."""

    def __init__(self, out_dir: str | Path, plot_every_s: float = 15.0):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "metrics.jsonl"
        self.plot_path = self.out_dir / "curves.png"
        self.plot_every_s = plot_every_s
        self._last_plot = 0.0

    def log(self, stage: str, step: int, **values: float) -> None:
        row = {"stage": stage, "step": step, "time": round(time.time(), 3)}
        row.update({key: _clean(value) for key, value in values.items()})
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
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
        """Redraw `curves.png` from every row logged so far."""
        self._last_plot = time.monotonic()
        rows = self.rows()
        series: dict[str, dict[str, tuple[list, list]]] = {}
        for row in rows:
            for key, value in row.items():
                if key in SKIPPED_KEYS or not isinstance(value, (int, float)):
                    continue
                xs, ys = series.setdefault(key, {}).setdefault(row["stage"], ([], []))
                xs.append(row["step"])
                ys.append(value)
        keys = [k for k in PREFERRED_PANELS if k in series]
        keys += sorted(k for k in series if k not in PREFERRED_PANELS and not k.startswith("seconds_"))
        if keys:
            panels = [Panel(title=key, series=series[key]) for key in keys[:15]]
            save_line_panels(self.plot_path, panels, title="thor-min training curves", columns=3)


def _clean(value):
    """JSON-safe scalar: python float/int, NaN/inf as None."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
