"""Hand-written PNG plots: training-curve panels and an evaluation bar chart.

What it does: draws line-chart panels (one metric per panel, one or more named series each) and a
bar chart with interval whiskers into a numpy RGB raster, then hands it to `thor_min.png`, which
encodes the PNG by hand and writes it atomically (its names are re-exported here, so
`from thor_min.plot import read_png` keeps working). Text uses the bitmap font of `thor_min.plot_font`.

Design choice: thor-min deliberately has no plotting dependency (no matplotlib, no PIL). Training
boxes are often headless and minimal; a few hundred lines of numpy + zlib give plots that open in
any image viewer, are byte-for-byte deterministic, and cannot break on a library upgrade. Reading
this file is also a compact lesson in what a plotting library does underneath.

Limits: no anti-aliasing (lines are sampled pixel by pixel, 1-2 px wide); one built-in bitmap font
(printable ASCII; other characters draw as a box) at integer scales; linear axes only; each
panel's legend is a strip above its plot, never a box on top of the data. PNG limits: `thor_min.png`.
"""

import math
from dataclasses import dataclass, field

import numpy as np

from thor_min.plot_font import (
    CAP_HEIGHT, GLYPH_HEIGHT, TEXT_SCALE, draw_text, draw_vertical_text, fit_text, stamp_mask, text_width,
)
from thor_min.png import PNG_SIGNATURE, encode_png, png_chunk, read_png, read_png_size, write_png  # noqa: F401

WHITE = (255, 255, 255)
MUTED = (140, 140, 140)        # "no data" notes
GRID = (226, 226, 226)
FRAME = (120, 120, 120)
WHISKER = (40, 40, 40)
COLOR_CYCLE = (                # distinguishable on white, in this order
    (31, 119, 180), (230, 120, 20), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (220, 90, 170), (100, 100, 100), (170, 170, 30), (20, 180, 200),
)
TITLE_SCALE = 3                # font pixel size of the figure title (labels use TEXT_SCALE)
LINE_WIDTH = 2                 # data lines, in pixels
TICK_LENGTH = 5
PADDING = 14                   # blank border inside each panel
PANEL_WIDTH, PANEL_HEIGHT = 540, 400
MARKER_LIMIT = 30              # series with at most this many points also get a dot per point


@dataclass
class Panel:
    """One line chart: `series` maps a legend name to (x values, y values); None/NaN are gaps.

    Series take colors from COLOR_CYCLE in order; a legend strip is drawn when there are two or more.
    """

    title: str
    series: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    xlabel: str = "step"
    ylabel: str = ""


@dataclass
class PlotArea:
    """Where a plot sits in the image (pixel box, inclusive) and which data range it shows."""

    left: int
    top: int
    right: int
    bottom: int
    xlo: float
    xhi: float
    ylo: float
    yhi: float

    def x_px(self, xs):
        """Image column of each data x (x values outside the range land outside the box)."""
        fraction = (np.asarray(xs, float) - self.xlo) / (self.xhi - self.xlo)
        return self.left + fraction * (self.right - self.left)

    def y_px(self, ys):
        """Image row of each data y; rows grow downwards, so larger y is nearer the top."""
        fraction = (np.asarray(ys, float) - self.ylo) / (self.yhi - self.ylo)
        return self.bottom - fraction * (self.bottom - self.top)


# ----------------------------------------------------------------------------- raster drawing

def new_canvas(width: int, height: int, color=WHITE) -> np.ndarray:
    """A (height, width, 3) uint8 RGB image filled with one color."""
    image = np.empty((height, width, 3), np.uint8)
    image[:] = color
    return image


def fill_rect(image, x0, y0, x1, y1, color) -> None:
    """Fill the rectangle with corners (x0, y0) and (x1, y1), both inclusive; clipped to the image."""
    height, width = image.shape[:2]
    left, right = max(0, int(min(x0, x1))), min(width - 1, int(max(x0, x1)))
    top, bottom = max(0, int(min(y0, y1))), min(height - 1, int(max(y0, y1)))
    if left <= right and top <= bottom:
        image[top:bottom + 1, left:right + 1] = color


def plot_points(image, xs, ys, color, width: int = 1) -> None:
    """Paint a width x width block at each pixel position; positions off the image are dropped."""
    height, image_width = image.shape[:2]
    xs = np.rint(np.asarray(xs, float)).astype(np.int64) - (width - 1) // 2
    ys = np.rint(np.asarray(ys, float)).astype(np.int64) - (width - 1) // 2
    for dy in range(width):
        for dx in range(width):
            px, py = xs + dx, ys + dy
            inside = (px >= 0) & (px < image_width) & (py >= 0) & (py < height)
            image[py[inside], px[inside]] = color


def draw_polyline(image, xs, ys, color, width: int = 1) -> None:
    """Join consecutive pixel positions with straight lines: every segment is sampled once per
    pixel along its longer axis (the DDA algorithm), all segments at once with numpy."""
    xs = np.rint(np.asarray(xs, float)).astype(np.int64)
    ys = np.rint(np.asarray(ys, float)).astype(np.int64)
    if len(xs) < 2:
        plot_points(image, xs, ys, color, width)
        return
    dx, dy = np.diff(xs), np.diff(ys)
    samples = np.maximum(np.abs(dx), np.abs(dy)) + 1           # pixels per segment, both ends included
    segment = np.repeat(np.arange(len(dx)), samples)
    position = np.arange(len(segment)) - np.repeat(np.cumsum(samples) - samples, samples)
    fraction = position / np.maximum(samples - 1, 1)[segment]
    plot_points(image, xs[:-1][segment] + fraction * dx[segment],
                ys[:-1][segment] + fraction * dy[segment], color, width)


def draw_line(image, x0, y0, x1, y1, color, width: int = 1) -> None:
    """A straight line from (x0, y0) to (x1, y1), both ends included."""
    draw_polyline(image, [x0, x1], [y0, y1], color, width)


def draw_marker(image, x, y, color, radius: int = 3) -> None:
    """A filled dot centred on (x, y)."""
    offsets = np.arange(-radius, radius + 1)
    disc = offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius * radius + radius
    stamp_mask(image, int(round(x)) - radius, int(round(y)) - radius, disc, color)


# ----------------------------------------------------------------------------- axes and ticks

def nice_ticks(lo: float, hi: float, max_ticks: int = 6, expand: bool = True, min_step: float = 0.0):
    """Ticks on a 1-2-5 step for [lo, hi]; returns (axis_lo, axis_hi, ticks, step).

    With expand=True the axis grows outwards to the nearest ticks. An empty or single-value range
    is padded so the axis still has height, and at most max_ticks (at least 3) ticks are returned.
    """
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo, hi = 0.0, 1.0
    lo, hi = min(lo, hi), max(lo, hi)
    if hi - lo <= 1e-12 * max(1.0, abs(lo), abs(hi)):
        pad = abs(lo) * 0.1 if lo != 0 else 1.0
        lo, hi = lo - pad, hi + pad
    max_ticks = max(3, max_ticks)
    magnitude = 10.0 ** math.floor(math.log10((hi - lo) / (max_ticks - 1)))
    for multiple in (1, 2, 5, 10, 20, 50, 100):
        step = max(multiple * magnitude, min_step)
        axis_lo = math.floor(lo / step + 1e-9) * step if expand else lo
        axis_hi = math.ceil(hi / step - 1e-9) * step if expand else hi
        first, last = math.ceil(axis_lo / step - 1e-9), math.floor(axis_hi / step + 1e-9)
        if last - first + 1 <= max_ticks:
            break
    ticks = [float(f"{k * step:.12g}") for k in range(first, last + 1)]
    return float(f"{axis_lo:.12g}"), float(f"{axis_hi:.12g}"), ticks, step


def format_tick(value: float, step: float) -> str:
    """Compact tick label with just enough digits for the step: 0, 0.25, 1.5k, 3M, 2e-05."""
    if abs(value) < step * 1e-6:
        return "0"
    for divisor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= divisor:
            return format_tick(value / divisor, step / divisor) + suffix
    if abs(value) < 1e-3:
        return f"{value:.3g}"
    decimals = next((d for d in range(12) if abs(round(step, d) - step) <= step * 1e-6), 12)
    text = f"{value:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def fitting_ticks(lo: float, hi: float, length_px: int, min_step: float = 0.0):
    """nice_ticks for a horizontal axis with as many ticks as leave a gap between their labels."""
    for max_ticks in range(max(3, length_px // 60), 2, -1):
        axis_lo, axis_hi, ticks, step = nice_ticks(lo, hi, max_ticks, min_step=min_step)
        widest = max(text_width(format_tick(tick, step)) for tick in ticks)
        if widest + 16 <= step / (axis_hi - axis_lo) * length_px:
            break
    return axis_lo, axis_hi, ticks, step


def draw_axes(image, area: PlotArea, xticks, xstep, yticks, ystep) -> None:
    """Light grid lines, the frame, tick marks and compact tick labels of one plot."""
    label_height = CAP_HEIGHT * TEXT_SCALE
    for tick in yticks:
        row = int(round(float(area.y_px(tick))))
        draw_line(image, area.left, row, area.right, row, GRID)
        draw_line(image, area.left - TICK_LENGTH, row, area.left - 1, row, FRAME)
        draw_text(image, area.left - TICK_LENGTH - 4, row - label_height // 2,
                  format_tick(tick, ystep), align="right")
    for tick in xticks:
        column = int(round(float(area.x_px(tick))))
        draw_line(image, column, area.top, column, area.bottom, GRID)
        draw_line(image, column, area.bottom + 1, column, area.bottom + TICK_LENGTH, FRAME)
        draw_text(image, column, area.bottom + TICK_LENGTH + 4, format_tick(tick, xstep), align="center")
    for x0, y0, x1, y1 in ((area.left, area.top, area.right, area.top),
                           (area.left, area.bottom, area.right, area.bottom),
                           (area.left, area.top, area.left, area.bottom),
                           (area.right, area.top, area.right, area.bottom)):
        draw_line(image, x0, y0, x1, y1, FRAME)


# ----------------------------------------------------------------------------- line panels

def float_array(values) -> np.ndarray:
    """A float array of the values, None becoming NaN (a gap)."""
    return np.array([np.nan if value is None else float(value) for value in values], float)


def series_arrays(name: str, xs, ys) -> tuple[np.ndarray, np.ndarray]:
    """Float arrays of one series; x and y must have the same length."""
    xs, ys = float_array(xs), float_array(ys)
    if len(xs) != len(ys):
        raise ValueError(f"series {name!r} has {len(xs)} x values but {len(ys)} y values")
    return xs, ys


def finite_range(values: np.ndarray) -> tuple[float, float] | None:
    """(min, max) of the finite values, or None when there are none."""
    finite = values[np.isfinite(values)]
    return (float(finite.min()), float(finite.max())) if finite.size else None


def legend_item_width(name: str) -> int:
    """Swatch, gap, name and the space before the next entry, in pixels."""
    return 22 + 6 + text_width(name) + 18


def draw_legend(image, names, colors, center_x: int, top: int, max_width: int) -> int:
    """Rows of 'swatch name' entries, each row centred on center_x; returns the height used."""
    rows: list[list[int]] = [[]]
    for index, name in enumerate(names):
        used = sum(legend_item_width(names[i]) for i in rows[-1])
        if rows[-1] and used + legend_item_width(name) > max_width:
            rows.append([])
        rows[-1].append(index)
    row_height = GLYPH_HEIGHT * TEXT_SCALE + 4
    for row_index, row in enumerate(rows):
        x = center_x - (sum(legend_item_width(names[i]) for i in row) - 18) // 2
        middle = top + row_index * row_height + CAP_HEIGHT * TEXT_SCALE // 2
        for index in row:
            fill_rect(image, x, middle - 2, x + 21, middle + 1, colors[index])
            draw_text(image, x + 28, top + row_index * row_height, names[index])
            x += legend_item_width(names[index])
    return len(rows) * row_height if names else 0


def draw_series(view, area: PlotArea, xs, ys, color) -> None:
    """Lines through each run of finite points; NaN breaks the line, a lone point gets a dot.

    `view` is the image cut to the plot box, so anything drawn is clipped to it.
    """
    finite = np.isfinite(xs) & np.isfinite(ys)
    px = area.x_px(np.where(finite, xs, area.xlo)) - area.left
    py = area.y_px(np.where(finite, ys, area.ylo)) - area.top
    with_markers = finite.sum() <= MARKER_LIMIT
    for run in np.split(np.arange(len(xs)), np.flatnonzero(~finite)):
        run = run[finite[run]]
        if len(run) >= 2:
            draw_polyline(view, px[run], py[run], color, LINE_WIDTH)
        if len(run) == 1 or with_markers:
            for index in run:
                draw_marker(view, px[index], py[index], color)


def draw_line_panel(image, panel: Panel, left: int, top: int, width: int, height: int) -> None:
    """One Panel inside the box (left, top, width, height): title, legend strip, axes, lines."""
    names = list(panel.series)
    data = [series_arrays(name, *panel.series[name]) for name in names]
    colors = [COLOR_CYCLE[index % len(COLOR_CYCLE)] for index in range(len(names))]
    line_height = GLYPH_HEIGHT * TEXT_SCALE
    center_x = left + width // 2
    draw_text(image, center_x, top + PADDING, fit_text(panel.title, width - 2 * PADDING),
              align="center", bold=True)
    cursor = top + PADDING + line_height + 6
    shown = [fit_text(name, width - 2 * PADDING - legend_item_width("")) for name in names]
    if len(names) >= 2:                                   # a lone series is named by the panel title
        cursor += draw_legend(image, shown, colors, center_x, cursor, width - 2 * PADDING)
    plot_top = cursor + CAP_HEIGHT * TEXT_SCALE // 2 + 4  # room for the top y label's upper half
    xlabel_height = (line_height + 6) * bool(panel.xlabel)
    plot_bottom = top + height - PADDING - xlabel_height - line_height - TICK_LENGTH - 4

    usable = [np.isfinite(xs) & np.isfinite(ys) for xs, ys in data]    # a point needs both coordinates
    all_x = np.concatenate([xs[ok] for (xs, _), ok in zip(data, usable)] + [np.zeros(0)])
    all_y = np.concatenate([ys[ok] for (_, ys), ok in zip(data, usable)] + [np.zeros(0)])
    has_data = all_x.size > 0
    ylo, yhi, yticks, ystep = nice_ticks(*(finite_range(all_y) or (0.0, 1.0)), (plot_bottom - plot_top) // 50)
    tick_label_width = max(text_width(format_tick(tick, ystep)) for tick in yticks)
    ylabel_width = (line_height + 8) * bool(panel.ylabel)
    plot_left = left + PADDING + ylabel_width + tick_label_width + TICK_LENGTH + 6
    plot_right = left + width - PADDING - 16                        # room for half the last x label
    whole_steps = has_data and bool(np.all(all_x == np.round(all_x)))
    xlo, xhi, xticks, xstep = fitting_ticks(*(finite_range(all_x) or (0.0, 1.0)), plot_right - plot_left,
                                            min_step=1.0 if whole_steps else 0.0)
    area = PlotArea(plot_left, plot_top, plot_right, plot_bottom, xlo, xhi, ylo, yhi)
    draw_axes(image, area, xticks, xstep, yticks, ystep)

    view = image[area.top:area.bottom + 1, area.left:area.right + 1]
    for (xs, ys), color in zip(data, colors):
        draw_series(view, area, xs, ys, color)
    if not has_data:
        draw_text(image, (plot_left + plot_right) // 2, (plot_top + plot_bottom - line_height) // 2,
                  "no data", MUTED, align="center")
    if panel.xlabel:
        draw_text(image, (plot_left + plot_right) // 2, plot_bottom + TICK_LENGTH + 4 + line_height + 6,
                  fit_text(panel.xlabel, plot_right - plot_left), align="center")
    if panel.ylabel:
        draw_vertical_text(image, left + PADDING, (plot_top + plot_bottom) // 2,
                           fit_text(panel.ylabel, plot_bottom - plot_top))


def save_line_panels(path, panels: list[Panel], *, title: str = "", columns: int = 3) -> None:
    """Write a grid of line charts (`columns` per row, left to right) as a PNG at `path`."""
    panels = list(panels)
    columns = max(1, min(columns, len(panels) or 1))
    rows = max(1, math.ceil(len(panels) / columns))
    title_height = GLYPH_HEIGHT * TITLE_SCALE + 20 if title else 0
    image = new_canvas(columns * PANEL_WIDTH, title_height + rows * PANEL_HEIGHT)
    if title:
        title = fit_text(title, image.shape[1] - 2 * PADDING, TITLE_SCALE)
        draw_text(image, image.shape[1] // 2, PADDING, title, scale=TITLE_SCALE, align="center")
    if not panels:
        draw_text(image, PANEL_WIDTH // 2, title_height + PANEL_HEIGHT // 2, "no panels", MUTED,
                  align="center")
    for index, panel in enumerate(panels):
        row, column = divmod(index, columns)
        draw_line_panel(image, panel, column * PANEL_WIDTH, title_height + row * PANEL_HEIGHT,
                        PANEL_WIDTH, PANEL_HEIGHT)
    write_png(path, image)


# ----------------------------------------------------------------------------- bar chart

def save_bar_chart(path, labels: list[str], values: list[float], *, lows: list[float] | None = None,
                   highs: list[float] | None = None, title: str = "", ylabel: str = "",
                   ymax: float | None = None, value_format: str = "{:.3g}") -> None:
    """Write a bar chart as a PNG: one colored bar per label, its value printed above it (`value_format`), and
    an optional whisker from lows[i] to highs[i] (e.g. a 95% interval). None/NaN values draw no bar."""
    count = len(labels)
    heights, low_ends, high_ends = (float_array([None] * count if column is None else column)
                                    for column in (values, lows, highs))
    if not len(heights) == len(low_ends) == len(high_ends) == count:
        raise ValueError("labels, values, lows and highs must all have the same length")
    line_height = GLYPH_HEIGHT * TEXT_SCALE
    image = new_canvas(max(600, 150 * count + 160), 440)
    if title:
        title = fit_text(title, image.shape[1] - 2 * PADDING)
        draw_text(image, image.shape[1] // 2, PADDING, title, align="center", bold=True)
    data_lo, data_hi = finite_range(np.concatenate([heights, low_ends, high_ends])) or (0.0, 0.0)
    top_value = ymax if ymax is not None else (data_hi * 1.05 if data_hi > 0 else 1.0)
    plot_top = PADDING + (line_height + 16) * bool(title) + line_height + 8     # room for value labels
    plot_bottom = image.shape[0] - PADDING - line_height - 12
    ylo, yhi, yticks, ystep = nice_ticks(min(0.0, data_lo), top_value, (plot_bottom - plot_top) // 50,
                                         expand=ymax is None)
    tick_label_width = max(text_width(format_tick(tick, ystep)) for tick in yticks)
    plot_left = PADDING + (line_height + 8) * bool(ylabel) + tick_label_width + TICK_LENGTH + 6
    area = PlotArea(plot_left, plot_top, image.shape[1] - PADDING - 10, plot_bottom,
                    0.0, float(max(count, 1)), ylo, yhi)                   # bar i is centred on x = i + 0.5
    draw_axes(image, area, [], 1.0, yticks, ystep)
    if ylabel:
        ylabel = fit_text(ylabel, plot_bottom - plot_top)
        draw_vertical_text(image, PADDING, (plot_top + plot_bottom) // 2, ylabel)
    slot = (area.right - area.left) / max(count, 1)
    label_scale = TEXT_SCALE if all(text_width(label) <= slot - 8 for label in labels) else 1
    for index, label in enumerate(labels):
        center = int(round(float(area.x_px(index + 0.5))))
        draw_bar(image, area, center, int(slot * 0.3), heights[index], low_ends[index], high_ends[index],
                 COLOR_CYCLE[index % len(COLOR_CYCLE)], value_format)
        draw_text(image, center, plot_bottom + 10, fit_text(label, int(slot) - 8, label_scale),
                  scale=label_scale, align="center")
    if count == 0:
        draw_text(image, (area.left + area.right) // 2, (plot_top + plot_bottom) // 2, "no data", MUTED,
                  align="center")
    write_png(path, image)


def draw_bar(image, area: PlotArea, center: int, half_width: int, value, low, high, color,
             value_format: str = "{:.3g}") -> None:
    """One bar from zero to value (clipped to the plot), its whisker, and its value printed above."""
    view = image[area.top:area.bottom + 1, area.left:area.right + 1]    # drawing here clips to the plot
    # Rows inside the view, clamped just outside it so a far-off value never costs a long line.
    rows = np.clip(area.y_px([max(area.ylo, 0.0), value, low, high]) - area.top, -3, view.shape[0] + 2)
    zero_row, value_row, low_row, high_row = rows.tolist()
    column = center - area.left
    if math.isfinite(value):
        fill_rect(view, column - half_width, zero_row, column + half_width, value_row, color)
    if math.isfinite(low) and math.isfinite(high):
        draw_line(view, column, low_row, column, high_row, WHISKER, 2)
        for row in (low_row, high_row):
            draw_line(view, column - 8, row, column + 8, row, WHISKER, 2)
    text_top = float(area.y_px(max(v for v in (value, high, 0.0) if math.isfinite(v))))
    text = value_format.format(value) if math.isfinite(value) else "n/a"
    draw_text(image, center, max(text_top, area.top) - 8 - CAP_HEIGHT * TEXT_SCALE, text, align="center")
