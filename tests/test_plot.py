"""The run's figures (`thor_min.plot`): smoothing, the curves layout, the ablation bars, the template heat map.

Figures are checked through matplotlib's objects (axes, lines, bars, image data), never through pixels.
"""

import math

import matplotlib.colors
from matplotlib.container import BarContainer
import numpy as np
import pytest
from PIL import Image

from thor_min.plot import (_pyplot, ablation_figure, curves_figure, save_ablation, save_curves, save_templates, smooth,
                           templates_figure)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def metrics_rows(rl_steps: int = 40) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = [{"stage": "pretrain", "step": s, "loss": 5.0 / s, "lr": 1e-3} for s in range(1, 31)]
    rows += [{"stage": "sft", "step": s, "loss": 2.0 / s} for s in range(1, 21)]
    for stage in ("rl-traj", "rl"):
        rows.append({"stage": stage, "step": 0, "eval_accuracy": 0.2})
        rows += [{"stage": stage, "step": s, "reward": float(rng.random()), "cell_pass_rate": 0.9,
                  "step_pass_rate": None if stage == "rl-traj" else 0.5} for s in range(1, rl_steps + 1)]
        rows.append({"stage": stage, "step": rl_steps, "eval_accuracy": 0.4})
    return rows


def panel(figure, block_title: str, panel_title: str):
    """The axes titled `panel_title` inside the sub-figure whose title starts with `block_title`."""
    for subfigure in figure.subfigs:
        if subfigure._suptitle.get_text().startswith(block_title):
            found = [axis for axis in subfigure.axes if axis.get_title() == panel_title]
            assert len(found) == 1, f"{panel_title!r} panels in {block_title!r}: {len(found)}"
            return found[0]
    raise AssertionError(f"no block {block_title!r} in {[s._suptitle.get_text() for s in figure.subfigs]}")


# ----------------------------------------------------------------------------- smoothing

def test_smooth_keeps_a_constant_series_constant():
    assert smooth([3.0] * 20) == pytest.approx([3.0] * 20), "debiasing must keep a constant at its value"


def test_smooth_is_the_debiased_exponential_average():
    # weight 0.5: s1 = 0.5 * 0 / 0.5 = 0; s2 = (0.25 * 0 + 0.5 * 10) / 0.75
    assert smooth([0.0, 10.0], weight=0.5) == pytest.approx([0.0, 10.0 * 0.5 / 0.75]), "wrong EMA values"
    assert smooth([1.0, 5.0, -2.0], weight=0.0) == [1.0, 5.0, -2.0], "weight 0 must return the raw values"


def test_smooth_skips_gaps_without_moving_the_average():
    out = smooth([1.0, None, float("nan"), 3.0], weight=0.5)
    assert math.isnan(out[1]) and math.isnan(out[2]), f"gaps must stay gaps: {out}"
    assert [out[0], out[3]] == pytest.approx(smooth([1.0, 3.0], weight=0.5)), "a gap must not move the average"


def test_smooth_reduces_noise():
    noise = np.random.default_rng(1).normal(size=400)
    assert np.std(smooth(list(noise))) < 0.5 * np.std(noise), "smoothing should cut white noise by more than half"


def test_smooth_rejects_a_weight_of_one():
    with pytest.raises(ValueError, match="smoothing weight"):
        smooth([1.0], weight=1.0)


# ----------------------------------------------------------------------------- curves

def test_curves_have_one_block_per_stage_family_in_order():
    figure = curves_figure(metrics_rows())
    titles = [subfigure._suptitle.get_text() for subfigure in figure.subfigs]
    assert titles == ["pretraining: pretrain", "cold-start SFT: sft", "RL: rl-traj, rl"], titles
    _pyplot().close(figure)


def test_panels_of_a_block_share_their_x_axis():
    figure = curves_figure(metrics_rows())
    reward, passing = panel(figure, "RL", "reward (sampled trajectories)"), panel(figure, "RL", "cell pass rate")
    assert reward.get_shared_x_axes().joined(reward, passing), "RL panels must share the step axis"
    pretrain_loss = panel(figure, "pretraining", "loss")
    assert not reward.get_shared_x_axes().joined(reward, pretrain_loss), "blocks must not share x with each other"
    assert {axis.get_xlabel() for axis in figure.subfigs[2].axes if axis.get_visible()} >= {"step"}, "no step label"
    _pyplot().close(figure)


def test_noisy_rl_series_are_smoothed_over_faint_raw_values():
    figure = curves_figure(metrics_rows())
    lines = panel(figure, "RL", "reward (sampled trajectories)").get_lines()
    assert len(lines) == 4, f"expected raw + smoothed for each of 2 stages, got {len(lines)} lines"
    raw, smoothed = lines[0], lines[1]
    assert raw.get_alpha() < 0.5 and smoothed.get_alpha() in (None, 1.0), "raw values must be faint behind"
    assert list(smoothed.get_ydata()) == pytest.approx(smooth(list(raw.get_ydata()))), "the top line is smooth(raw)"
    assert smoothed.get_label() == "rl-traj" and raw.get_label().startswith("_"), "only the smoothed line is named"
    _pyplot().close(figure)


def test_sparse_evaluations_are_drawn_as_points():
    figure = curves_figure(metrics_rows())
    lines = panel(figure, "RL", "greedy accuracy (held out)").get_lines()
    assert [list(line.get_xdata()) for line in lines] == [[0, 40], [0, 40]], "eval points at steps 0 and 40"
    assert all(line.get_marker() == "o" for line in lines), "sparse series need markers"
    _pyplot().close(figure)


def test_two_metrics_in_one_panel_get_their_own_names():
    figure = curves_figure(metrics_rows())
    labels = [line.get_label() for line in panel(figure, "RL", "cell pass rate").get_lines()]
    assert "rl step_pass_rate" in labels and "rl cell_pass_rate" in labels, labels
    assert "rl-traj step_pass_rate" not in labels, "a metric a stage never measured must not be drawn"
    _pyplot().close(figure)


def test_an_unknown_stage_gets_one_panel_per_metric():
    figure = curves_figure([{"stage": "probe", "step": s, "b": s, "a": -s} for s in range(3)])
    assert [axis.get_title() for axis in figure.subfigs[0].axes if axis.get_visible()] == ["a", "b"]
    _pyplot().close(figure)


def test_save_curves_writes_a_png_of_the_figure_size(tmp_path):
    path = tmp_path / "curves.png"
    assert save_curves(path, metrics_rows()), "rows given, a figure expected"
    assert path.read_bytes()[:8] == PNG_SIGNATURE, "not a PNG file"
    with Image.open(path) as image:
        width, height = image.size
    assert width == 4.2 * 4 * 100 and height > 900, f"unexpected size {width}x{height}"
    assert not list(tmp_path.glob("*.tmp")), "the temporary file must be renamed"


def test_save_curves_without_rows_writes_nothing(tmp_path):
    assert not save_curves(tmp_path / "curves.png", []) and not (tmp_path / "curves.png").exists()


# ----------------------------------------------------------------------------- ablation bars and templates

def summary_rows() -> list[dict]:
    def row(name, accuracy, tools, kinds):
        return {"name": name, "accuracy": accuracy, "ci95": [accuracy - 0.05, accuracy + 0.05], "tools": tools,
                "benchmarks": {"tiny": {"kinds": kinds}, "tiny-heldout": {"kinds": {"orchard": accuracy / 2}}}}
    return [row("base-cot", 0.1, False, {"product": 0.0, "gcd": 0.2}),
            row("step-rl", 0.6, True, {"product": 0.9, "gcd": 0.3})]


def test_ablation_bars_show_each_row_with_its_interval():
    figure = ablation_figure(summary_rows(), samples=4)
    axis = figure.axes[0]
    bars = next(c for c in axis.containers if isinstance(c, BarContainer))
    assert [bar.get_height() for bar in bars] == pytest.approx([10.0, 60.0]), "bar heights are accuracy in %"
    assert [t.get_text() for t in axis.get_xticklabels()] == ["base-cot", "step-rl"], "one labelled bar per row"
    whiskers = bars.errorbar.lines[2][0].get_segments()
    assert [tuple(s[:, 1]) for s in whiskers] == [pytest.approx((5.0, 15.0)), pytest.approx((55.0, 65.0))]
    assert matplotlib.colors.to_hex(bars[0].get_facecolor()) != matplotlib.colors.to_hex(bars[1].get_facecolor()), \
        "plain-CoT and tool rows must differ in color"
    assert axis.get_ylim() == (0, 100) and "Avg@4" in axis.get_title(), axis.get_title()
    _pyplot().close(figure)


def test_template_map_has_a_cell_per_row_and_kind_held_out_last():
    figure = templates_figure(summary_rows())
    axis = figure.axes[0]
    assert [t.get_text() for t in axis.get_xticklabels()] == ["product", "gcd", "orchard"], "held-out kinds go last"
    data = np.asarray(axis.get_images()[0].get_array())
    assert np.allclose(data, [[0.0, 20.0, 5.0], [90.0, 30.0, 30.0]]), data
    assert [t.get_fontstyle() for t in axis.get_xticklabels()] == ["normal", "normal", "italic"], "mark held-out kinds"
    _pyplot().close(figure)


def test_rows_without_kinds_give_no_template_map(tmp_path):
    rows = [{"name": "step-rl", "accuracy": 0.5, "ci95": [0.4, 0.6], "benchmarks": {"math500": {}}}]
    assert templates_figure(rows) is None and not save_templates(tmp_path / "t.png", rows)


def test_save_ablation_writes_a_png(tmp_path):
    save_ablation(tmp_path / "ablation.png", summary_rows(), samples=2)
    with Image.open(tmp_path / "ablation.png") as image:
        assert image.format == "PNG" and image.size == (700, 480), image.size
