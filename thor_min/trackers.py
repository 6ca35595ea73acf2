"""Experiment trackers: every metrics row also goes to TensorBoard, Weights & Biases or Trackio (`--report-to`).

`OUT/metrics.jsonl` stays the source of truth and is always written (`thor_min.metrics.MetricsLog`); a tracker
gets a copy of each row as it is logged, for the dashboards people already watch their runs with. As in TRL,
`--report-to` takes `none` or one or more of `tensorboard`, `wandb`, `trackio`.

Design: one small class per tracker with `log(stage, step, values)` and `close()`. A metric is named
`STAGE/KEY` (`rl/reward`, `sft/loss`): each stage counts its steps from 0, so TensorBoard gets the stage's
step as its global step, and W&B and Trackio (which want one rising step per run) get `STAGE/step` as a
metric, which W&B is told to use as that stage's x-axis. Each tracker is an optional extra of the package;
`check_report_to` runs at start-up and fails in one line naming the extra to install, before any work.
Limits: the run's settings are sent as the tracker's config; W&B and Trackio read their usual environment
variables (`WANDB_MODE=offline`, `WANDB_ENTITY`, `TRACKIO_DIR`, ...); the project is always `thor-min`;
nothing is logged but scalars.
"""

import importlib.util
from pathlib import Path

# --report-to name -> (module that must be importable, pyproject extra that installs it)
TRACKER_MODULES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
                   "trackio": ("trackio", "trackio")}
PROJECT = "thor-min"


class TrackerError(ValueError):
    """An unknown tracker name, or one whose package is not installed; the message is one line."""


def check_report_to(names) -> tuple[str, ...]:
    """The trackers to open for `--report-to NAMES` ('none' = no tracker); raises TrackerError if one is missing."""
    names = tuple(dict.fromkeys(names or ("none",)))
    if "none" in names:
        if len(names) > 1:
            raise TrackerError(f"--report-to none cannot be combined with {', '.join(n for n in names if n != 'none')}")
        return ()
    for name in names:
        if name not in TRACKER_MODULES:
            raise TrackerError(f"unknown --report-to {name!r}: use none or any of {', '.join(TRACKER_MODULES)}")
        module, extra = TRACKER_MODULES[name]
        if importlib.util.find_spec(module) is None:
            raise TrackerError(f"--report-to {name} needs the {module} package: pip install -e \".[{extra}]\"")
    return names


def open_trackers(names, out_dir: str | Path, run_name: str, config: dict) -> list:
    """Open each tracker named in `names` (already checked), writing under `out_dir` where the tracker allows."""
    classes = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "trackio": TrackioTracker}
    return [classes[name](Path(out_dir), run_name, config) for name in check_report_to(names)]


def _scalars(values: dict) -> dict[str, float]:
    """The numeric values of a row (None = not measured this step, skipped)."""
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardTracker:
    """Event files in OUT/tensorboard (`tensorboard --logdir OUT/tensorboard`), one scalar tag per STAGE/KEY."""

    def __init__(self, out_dir: Path, run_name: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k} = {v!r}" for k, v in config.items()))

    def log(self, stage: str, step: int, values: dict) -> None:
        for key, value in _scalars(values).items():
            self.writer.add_scalar(f"{stage}/{key}", value, global_step=step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run (files under OUT/wandb); each stage's metrics are plotted against that stage's step."""

    def __init__(self, out_dir: Path, run_name: str, config: dict):
        import wandb

        self.run = wandb.init(project=PROJECT, name=run_name, dir=str(out_dir), config=config)
        self.stages: set[str] = set()

    def log(self, stage: str, step: int, values: dict) -> None:
        if stage not in self.stages:
            self.stages.add(stage)
            self.run.define_metric(f"{stage}/step")
            self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
        self.run.log({f"{stage}/step": step, **{f"{stage}/{k}": v for k, v in _scalars(values).items()}})

    def close(self) -> None:
        self.run.finish()


class TrackioTracker:
    """A Trackio run (a local SQLite database under TRACKIO_DIR; `trackio show` opens the dashboard)."""

    def __init__(self, out_dir: Path, run_name: str, config: dict):
        import trackio

        self.trackio = trackio
        trackio.init(project=PROJECT, name=run_name, config=config, embed=False)

    def log(self, stage: str, step: int, values: dict) -> None:
        self.trackio.log({f"{stage}/step": step, **{f"{stage}/{k}": v for k, v in _scalars(values).items()}})

    def close(self) -> None:
        self.trackio.finish()
