"""The run's figures, drawn with matplotlib: training curves, the ablation bars, accuracy per template.

- `save_curves(path, rows)`: `curves.png` from the rows of `metrics.jsonl`, one block of panels per stage
  family (pretraining, SFT, RL) with the x-axis (optimiser step) shared inside a block. Noisy series are
  smoothed (`smooth`, a debiased exponential moving average, as TensorBoard's slider) and drawn over their
  raw values, which stay faint behind; sparse series (held-out evaluations) are drawn as points.
- `save_ablation(path, rows, samples)`: `ablation.png`, accuracy per ablation row with its 95% interval.
- `save_templates(path, rows)`: `templates.png`, a heat map of accuracy per row and problem kind (the tiny
  world's templates, held-out ones marked; for real benchmarks, one column per benchmark).

Design: matplotlib's Agg backend renders to files with no display, so the same code runs on a headless
training box; each `*_figure` function returns the Figure (tests inspect its axes and lines), and the
`save_*` function writes it and closes it. Which metrics get a panel is curated in `PANELS`; every
metric stays in `metrics.jsonl` and in the trackers (`thor_min.trackers`).
Limits: linear axes; a panel shows the stages of one family only; a resumed run that logged a step twice
shows both points.
"""

import math
from pathlib import Path


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend, imported on first use: every process imports this module
    (through the metrics log), few of them draw, and pyplot costs a quarter of a second to import."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


SMOOTHING = 0.8          # EMA weight of the previous value (0 = raw, closer to 1 = smoother)
SMOOTH_MIN_POINTS = 12   # shorter series are drawn raw
SPARSE_POINTS = 30       # a series with at most this many points (and fewer than its stage's steps) gets markers
COLUMNS = 4              # panels per row of a block
STYLE = {"font.size": 11, "axes.titlesize": 12, "axes.titleweight": "bold", "axes.grid": True, "grid.alpha": 0.3,
         "axes.spines.top": False, "axes.spines.right": False, "legend.fontsize": 9, "legend.frameon": False}

# Stage family -> panels: (title, metric keys drawn in the panel, smoothed?). Keys a run did not log are skipped.
PANELS = {
    "pretraining": [("loss", ("loss", "eval_loss"), True), ("restates the question", ("restate_rate",), False),
                    ("learning rate", ("lr",), False), ("tokens / s", ("tokens_per_s",), False)],
    "cold-start SFT": [("loss", ("loss", "eval_loss"), True), ("gradient norm", ("grad_norm",), True),
                       ("learning rate", ("lr",), False), ("tokens / s", ("tokens_per_s",), False)],
    "RL": [("reward (sampled trajectories)", ("reward",), True),
           ("greedy accuracy (held out)", ("eval_accuracy",), False),
           ("cell call rate", ("cell_call_rate",), True),
           ("cell pass rate", ("cell_pass_rate", "step_pass_rate"), True),
           ("response tokens", ("response_tokens",), True), ("entropy", ("entropy",), True),
           ("approx. KL to the rollout policy", ("approx_kl_old",), True),
           ("clipped tokens", ("clip_frac_high", "clip_frac_low"), True),
           ("tokens / s (rollout)", ("tokens_per_s",), True)],
}
LINE_STYLES = ("-", "--", ":", "-.")


def smooth(values: list, weight: float = SMOOTHING) -> list[float]:
    """Debiased exponential moving average; None/NaN stay gaps and do not move the average.

    s_t = weight * s_(t-1) + (1 - weight) * x_t, divided by 1 - weight^n (n = points seen) so the curve starts at
    the first value instead of at zero.
    """
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    average, norm, out = 0.0, 0.0, []
    for value in values:
        if value is None or not math.isfinite(value):
            out.append(math.nan)
            continue
        average = weight * average + (1.0 - weight) * value
        norm = weight * norm + (1.0 - weight)
        out.append(average / norm)
    return out


def stage_family(stage: str) -> str:
    """Which block of curves.png a stage belongs to (its own name when unknown)."""
    if stage == "pretrain":
        return "pretraining"
    if stage.startswith("sft"):
        return "cold-start SFT"
    return "RL" if stage.startswith("rl") else stage


def series_of(rows: list[dict]) -> dict[str, dict[str, tuple[list, list]]]:
    """stage -> metric -> (steps, values) from metrics rows; only numeric values (None = not logged)."""
    out: dict[str, dict[str, tuple[list, list]]] = {}
    for row in rows:
        for key, value in row.items():
            if key in ("stage", "step", "time") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            steps, values = out.setdefault(row["stage"], {}).setdefault(key, ([], []))
            steps.append(row["step"])
            values.append(value)
    return out


def family_panels(family: str, stages: dict[str, dict]) -> list[tuple[str, tuple[str, ...], bool]]:
    """The family's curated panels that have data, or one raw panel per metric for an unknown family."""
    logged = {key for metrics in stages.values() for key in metrics}
    if family not in PANELS:
        return [(key, (key,), False) for key in sorted(logged)]
    return [(title, keys, smoothed) for title, keys, smoothed in PANELS[family] if logged & set(keys)]


def draw_panel(axis, title: str, keys: tuple[str, ...], smoothed: bool, stages: dict[str, dict]) -> None:
    """One panel: per stage a color, per metric key a line style; dense noisy series smoothed over faint raw."""
    axis.set_title(title)
    for color_index, (stage, metrics) in enumerate(stages.items()):
        color = f"C{color_index % 10}"
        longest = max(len(steps) for steps, _ in metrics.values())
        for key_index, key in enumerate(keys):
            if key not in metrics:
                continue
            steps, values = metrics[key]
            values = [math.nan if v is None else v for v in values]
            label = stage if len(keys) == 1 else f"{stage} {key}"
            style = LINE_STYLES[key_index % len(LINE_STYLES)]
            if len(steps) <= SPARSE_POINTS and len(steps) < longest:
                axis.plot(steps, values, style, marker="o", markersize=4, color=color, label=label)
            elif smoothed and len(steps) >= SMOOTH_MIN_POINTS:
                axis.plot(steps, values, style, color=color, alpha=0.2, linewidth=1)
                axis.plot(steps, smooth(values), style, color=color, linewidth=1.8, label=label)
            else:
                axis.plot(steps, values, style, color=color, linewidth=1.5, label=label)
    if len(axis.get_legend_handles_labels()[1]) > 1:
        axis.legend(loc="best")


def curves_figure(rows: list[dict]):
    """The Figure of curves.png: one sub-figure per stage family, x shared within it. None without rows."""
    plt = _pyplot()
    by_family: dict[str, dict[str, dict]] = {}
    for stage, metrics in series_of(rows).items():
        by_family.setdefault(stage_family(stage), {})[stage] = metrics
    blocks = [(family, stages, family_panels(family, stages)) for family, stages in by_family.items()]
    blocks = [block for block in blocks if block[2]]
    if not blocks:
        return None
    heights = [math.ceil(len(panels) / COLUMNS) for _, _, panels in blocks]
    with plt.rc_context(STYLE):
        figure = plt.figure(figsize=(4.2 * COLUMNS, 3.1 * sum(heights) + 0.7 * len(blocks)), layout="constrained")
        subfigures = figure.subfigures(len(blocks), 1, height_ratios=heights, squeeze=False)[:, 0]
        for subfigure, (family, stages, panels), height in zip(subfigures, blocks, heights):
            subfigure.suptitle(f"{family}: {', '.join(stages)}", fontsize=14, fontweight="bold", x=0.01,
                               horizontalalignment="left")
            axes = subfigure.subplots(height, COLUMNS, sharex=True, squeeze=False).ravel()
            for axis, (title, keys, smoothed) in zip(axes, panels):
                draw_panel(axis, title, keys, smoothed, stages)
            for axis in axes[len(panels):]:
                axis.set_visible(False)
            for axis in axes[max(0, len(panels) - COLUMNS):len(panels)]:
                axis.set_xlabel("step")
                axis.xaxis.set_tick_params(labelbottom=True)
    return figure


def save(figure, path: str | Path, dpi: int = 100) -> bool:
    """Write a figure as PNG (atomically: a reader never sees half a file) and free it; None writes nothing.

    Returns whether a file was written.
    """
    if figure is None:
        return False
    path = Path(path)
    temp = path.with_name(path.name + ".tmp")
    figure.savefig(temp, dpi=dpi, format="png")
    _pyplot().close(figure)
    temp.replace(path)
    return True


def save_curves(path: str | Path, rows: list[dict]) -> bool:
    """Write curves.png from metrics rows; False (nothing written) when there is nothing to draw."""
    return save(curves_figure(rows), path)


def ablation_figure(rows: list[dict], samples: int):
    """Accuracy (%) per ablation row with its 95% interval; tool-integrated rows blue, plain-CoT rows grey."""
    plt = _pyplot()
    names = [row["name"] for row in rows]
    values = [100 * (row["accuracy"] if row["accuracy"] is not None else math.nan) for row in rows]
    lows = [max(0.0, value - 100 * row["ci95"][0]) for value, row in zip(values, rows)]
    highs = [max(0.0, 100 * row["ci95"][1] - value) for value, row in zip(values, rows)]
    colors = ["C0" if row.get("tools", True) else "0.6" for row in rows]
    with plt.rc_context(STYLE | {"axes.grid.axis": "y"}):
        figure, axis = plt.subplots(figsize=(max(7.0, 1.3 * len(rows) + 2), 4.8), layout="constrained")
        axis.bar(names, values, color=colors, yerr=[lows, highs], capsize=6, ecolor="0.2", width=0.6)
        for x, (value, high) in enumerate(zip(values, highs)):   # the value above its whisker
            text = "n/a" if math.isnan(value) else f"{value:.1f}"
            axis.text(x, (0 if math.isnan(value) else value + high) + 1.5, text, ha="center", va="bottom")
        axis.set_ylim(0, 100)
        axis.set_ylabel("accuracy (%)")
        axis.set_title(f"accuracy per ablation row (Avg@{samples}, 95% interval over problems)")
        axis.tick_params(axis="x", labelrotation=20)
        handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in ("C0", "0.6")]
        axis.legend(handles, ["with the python tool", "plain chain of thought"], loc="upper left")
    return figure


def kind_columns(rows: list[dict]) -> list[tuple[str, bool]]:
    """(kind, held out?) in first-seen order over every row's benchmarks; held-out benchmarks' kinds last."""
    seen: dict[str, bool] = {}
    for row in rows:
        for bench, summary in row.get("benchmarks", {}).items():
            for kind in summary.get("kinds", {}):
                seen.setdefault(kind, bench.endswith("-heldout"))
    return sorted(seen.items(), key=lambda item: item[1])


def templates_figure(rows: list[dict]):
    """Heat map: accuracy (%) of each ablation row (y) on each problem kind (x). None when no kinds were recorded."""
    plt = _pyplot()
    columns = kind_columns(rows)
    if not columns or not rows:
        return None
    grid = [[math.nan] * len(columns) for _ in rows]
    for y, row in enumerate(rows):
        merged = {k: v for summary in row.get("benchmarks", {}).values() for k, v in summary.get("kinds", {}).items()}
        for x, (kind, _) in enumerate(columns):
            grid[y][x] = 100 * merged[kind] if kind in merged else math.nan
    with plt.rc_context(STYLE | {"axes.grid": False}):
        figure, axis = plt.subplots(figsize=(1.0 * len(columns) + 3.5, 0.6 * len(rows) + 2.2), layout="constrained")
        image = axis.imshow(grid, cmap="Blues", vmin=0, vmax=100, aspect="auto")
        for y, line in enumerate(grid):
            for x, value in enumerate(line):
                text = "-" if math.isnan(value) else f"{value:.0f}"
                axis.text(x, y, text, ha="center", va="center", fontsize=10, color="white" if value > 60 else "black")
        axis.set_xticks(range(len(columns)), [kind for kind, _ in columns], rotation=35, ha="right")
        axis.set_yticks(range(len(rows)), [row["name"] for row in rows])
        for label, (_, held_out) in zip(axis.get_xticklabels(), columns):
            label.set_fontstyle("italic" if held_out else "normal")
        first_held_out = next((x for x, (_, held_out) in enumerate(columns) if held_out), None)
        if first_held_out:
            axis.axvline(first_held_out - 0.5, color="black", linewidth=2)
        title = "accuracy (%) per problem kind" + (" (italic: held-out templates, never trained on)"
                                                   if first_held_out is not None else "")
        axis.set_title(title)
        figure.colorbar(image, ax=axis, label="accuracy (%)", shrink=0.8)
    return figure


def save_ablation(path: str | Path, rows: list[dict], samples: int) -> None:
    save(ablation_figure(rows, samples), path)


def save_templates(path: str | Path, rows: list[dict]) -> bool:
    """Write templates.png; False (nothing written) when the rows carry no per-kind accuracy."""
    return save(templates_figure(rows), path)
