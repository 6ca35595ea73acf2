"""Tests for the hand-written PNG plotter `thor_min.plot` and its bitmap font."""

import os
import string
import struct
import zlib

import numpy as np
import pytest

from thor_min import plot, png
from thor_min.plot import (
    COLOR_CYCLE, Panel, PlotArea, draw_line, draw_series, format_tick, new_canvas,
    nice_ticks, read_png, read_png_size, save_bar_chart, save_line_panels, write_png,
)
from thor_min.plot_font import GLYPH_HEIGHT, GLYPHS, draw_text, glyph_mask, text_width

RED = (200, 0, 0)
ABLATIONS = ["base-cot", "cold-start", "traj-rl", "step-rl", "self-correct", "cot-rl"]


def png_chunks(data: bytes) -> list[tuple[bytes, bytes, int]]:
    """(type, body, stored CRC) of every chunk, parsed independently of the module under test."""
    chunks, position = [], 8
    while position < len(data):
        (length,) = struct.unpack(">I", data[position:position + 4])
        kind = data[position + 4:position + 8]
        body = data[position + 8:position + 8 + length]
        (crc,) = struct.unpack(">I", data[position + 8 + length:position + 12 + length])
        chunks.append((kind, body, crc))
        position += 12 + length
    return chunks


def two_series_panels() -> list[Panel]:
    steps = list(range(50))
    return [
        Panel("reward", {"train": (steps, [0.01 * s for s in steps]), "eval": (steps, [0.3] * 50)}),
        Panel("kl", {"kl": (steps, [1e-5 * s for s in steps])}, ylabel="nats"),
    ]


def is_color(image: np.ndarray, color) -> np.ndarray:
    return np.all(image == np.array(color, np.uint8), axis=-1)


# ----------------------------------------------------------------------------- PNG file format

def test_png_starts_with_signature_and_ihdr_has_the_image_size(tmp_path):
    path = tmp_path / "a.png"
    write_png(path, new_canvas(37, 11))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "PNG signature missing"
    kind, body, _ = png_chunks(data)[0]
    assert kind == b"IHDR", "first chunk must be IHDR"
    assert struct.unpack(">IIBBBBB", body) == (37, 11, 8, 2, 0, 0, 0), "IHDR must say 37x11, 8-bit RGB"
    assert read_png_size(path) == (37, 11), "read_png_size disagrees with IHDR"


def test_every_chunk_crc_verifies_and_chunks_are_in_order(tmp_path):
    path = tmp_path / "curves.png"
    save_line_panels(path, two_series_panels(), title="run")
    chunks = png_chunks(path.read_bytes())
    for kind, body, crc in chunks:
        assert zlib.crc32(kind + body) == crc, f"CRC mismatch in {kind!r} chunk"
    kinds = [kind for kind, _, _ in chunks]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds, f"bad chunk order {kinds}"


def test_decoding_returns_exactly_the_pixels_written(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, size=(13, 29, 3), dtype=np.uint8)
    write_png(tmp_path / "noise.png", image)
    decoded = read_png(tmp_path / "noise.png")
    assert decoded.shape == (13, 29, 3), f"decoded shape {decoded.shape}"
    assert np.array_equal(decoded, image), "decoded pixels differ from the written ones"


def test_corrupted_file_is_rejected(tmp_path):
    path = tmp_path / "a.png"
    write_png(path, new_canvas(8, 8))
    data = bytearray(path.read_bytes())
    data[45] ^= 0xFF                                   # a byte inside the IDAT body
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="CRC"):
        read_png(path)


def test_line_figure_decodes_to_the_grid_size(tmp_path):
    path = tmp_path / "curves.png"
    save_line_panels(path, two_series_panels() * 2, columns=3)
    height, width, _ = read_png(path).shape
    expected = (3 * plot.PANEL_WIDTH, 2 * plot.PANEL_HEIGHT)
    assert (width, height) == expected, "4 panels in 3 columns make a 3x2 grid"


def test_output_is_deterministic(tmp_path):
    save_line_panels(tmp_path / "a.png", two_series_panels(), title="same")
    save_line_panels(tmp_path / "b.png", two_series_panels(), title="same")
    same = (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert same, "the same input gave different bytes"


def test_atomic_write_leaves_only_the_final_file(tmp_path):
    save_bar_chart(tmp_path / "bars.png", ["a", "b"], [0.2, 0.4])
    save_bar_chart(tmp_path / "bars.png", ["a", "b"], [0.3, 0.1])      # overwrite in place
    assert sorted(os.listdir(tmp_path)) == ["bars.png"], f"leftover files: {os.listdir(tmp_path)}"


def test_failed_write_keeps_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "a.png"
    write_png(path, new_canvas(4, 4))
    before = path.read_bytes()

    def broken_replace(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(png.os, "replace", broken_replace)
    with pytest.raises(OSError):
        write_png(path, new_canvas(9, 9))
    assert path.read_bytes() == before, "a failed write must not touch the existing file"
    assert os.listdir(tmp_path) == ["a.png"], "a failed write must remove its temporary file"


# ----------------------------------------------------------------------------- raster drawing

def test_line_paints_its_path_and_nothing_else():
    image = new_canvas(50, 30)
    draw_line(image, 5, 5, 40, 20, RED)
    painted = is_color(image, RED)
    for x in range(5, 41):
        y = round(5 + (x - 5) * 15 / 35)
        assert painted[y, x], f"pixel ({x}, {y}) on the line is not painted"
    assert painted.sum() == 36, f"a 1-px line over 36 columns paints 36 pixels, got {painted.sum()}"
    assert np.all(image[~painted] == 255), "background off the line changed"


def test_wide_line_is_two_pixels_thick():
    image = new_canvas(20, 10)
    draw_line(image, 2, 4, 17, 4, RED, width=2)
    rows = np.flatnonzero(is_color(image, RED).any(axis=1))
    assert rows.tolist() == [4, 5], f"a 2-px horizontal line covers rows 4-5, got {rows.tolist()}"


def test_text_puts_ink_inside_its_box_only():
    image = new_canvas(80, 40)
    draw_text(image, 10, 12, "Hi:5", RED, scale=2)
    ink = is_color(image, RED)
    box = np.zeros_like(ink)
    box[12:12 + GLYPH_HEIGHT * 2, 10:10 + text_width("Hi:5", 2)] = True
    assert ink.sum() > 40, "text drew almost no ink"
    assert not np.any(ink & ~box), "text ink outside its bounding box"


def test_font_has_a_distinct_glyph_for_every_printable_character():
    printable = [chr(code) for code in range(32, 127)]
    assert set(printable) <= set(GLYPHS), f"missing glyphs: {sorted(set(printable) - set(GLYPHS))}"
    shapes = {char: glyph_mask(char).tobytes() for char in printable}
    duplicates = [c for c in printable if list(shapes.values()).count(shapes[c]) > 1]
    assert not duplicates, f"glyphs drawn identically: {duplicates}"
    assert all(glyph_mask(c).any() for c in string.ascii_letters + string.digits), "a glyph has no ink"


# ----------------------------------------------------------------------------- series and ticks

def test_series_colors_appear_in_the_figure(tmp_path):
    save_line_panels(tmp_path / "c.png", two_series_panels())
    image = read_png(tmp_path / "c.png")
    for index in (0, 1):
        assert is_color(image, COLOR_CYCLE[index]).sum() > 100, f"series color {index} barely visible"


def test_nan_values_leave_a_gap_in_the_line():
    image = new_canvas(100, 50)
    area = PlotArea(0, 0, 99, 49, 0.0, 9.0, 0.0, 1.0)
    ys = [0.5, 0.5, 0.5, 0.5, float("nan"), None, 0.5, 0.5, 0.5, 0.5]
    draw_series(image, area, np.arange(10.0), plot.float_array(ys), RED)
    painted_columns = is_color(image, RED).any(axis=0)
    gap = slice(int(area.x_px(3)) + 5, int(area.x_px(6)) - 4)
    assert not painted_columns[gap].any(), "the line was drawn across the NaN gap"
    assert painted_columns[:30].all() and painted_columns[70:].all(), "the runs beside the gap are missing"


def test_a_single_point_still_shows_as_a_marker():
    image = new_canvas(60, 60)
    area = PlotArea(0, 0, 59, 59, 0.0, 2.0, 0.0, 2.0)
    draw_series(image, area, np.array([1.0]), np.array([1.0]), RED)
    painted = is_color(image, RED)
    assert painted[28:32, 28:32].all(), "the lone point has no marker at its position"


@pytest.mark.parametrize("series", [
    {},                                                   # a panel without series
    {"empty": ([], [])},
    {"constant": ([0, 1, 2], [5.0, 5.0, 5.0])},
    {"zeros": ([0, 1, 2], [0.0, 0.0, 0.0])},
    {"one point": ([7], [0.5])},
    {"all gaps": ([0, 1], [None, float("nan")])},
    {"infinite": ([0, 1, 2], [1.0, float("inf"), 2.0])},
    {"tiny": ([0, 1], [1e-9, 2e-9]), "huge": ([0, 1], [3e9, 1e9])},
])
def test_degenerate_series_still_write_a_valid_png(tmp_path, series):
    save_line_panels(tmp_path / "d.png", [Panel("degenerate", series)])
    assert read_png(tmp_path / "d.png").shape[:2] == (plot.PANEL_HEIGHT, plot.PANEL_WIDTH), "bad image size"


def test_no_panels_and_no_bars_still_write_images(tmp_path):
    save_line_panels(tmp_path / "none.png", [], title="empty run")
    save_bar_chart(tmp_path / "none-bars.png", [], [])
    assert read_png_size(tmp_path / "none.png")[0] > 0 and read_png_size(tmp_path / "none-bars.png")[0] > 0


def test_mismatched_series_lengths_raise(tmp_path):
    with pytest.raises(ValueError, match="2 x values but 3 y values"):
        save_line_panels(tmp_path / "m.png", [Panel("bad", {"s": ([0, 1], [1, 2, 3])})])


@pytest.mark.parametrize("lo, hi", [(0, 1), (0.13, 0.71), (-3, 250), (1e-6, 4e-5), (998, 1003), (5, 5)])
def test_nice_ticks_use_1_2_5_steps_and_cover_the_range(lo, hi):
    axis_lo, axis_hi, ticks, step = nice_ticks(lo, hi, max_ticks=6)
    mantissa = round(step / 10 ** np.floor(np.log10(step)), 6)
    assert mantissa in (1, 2, 5), f"step {step} is not 1, 2 or 5 times a power of ten"
    assert axis_lo <= lo and axis_hi >= hi and axis_hi > axis_lo, f"axis {axis_lo}..{axis_hi} misses data"
    assert 2 <= len(ticks) <= 6, f"{len(ticks)} ticks"


@pytest.mark.parametrize("value, step, text", [
    (0.0, 0.2, "0"), (0.25, 0.05, "0.25"), (1.0, 0.2, "1"), (1500, 500, "1.5k"),
    (2e-05, 1e-05, "2e-05"), (3_000_000, 1_000_000, "3M"), (-40, 20, "-40"),
    (0.30000000000000004, 0.1, "0.3"),
])
def test_tick_labels_are_compact(value, step, text):
    assert format_tick(value, step) == text, f"format_tick({value}, {step})"


# ----------------------------------------------------------------------------- bar chart

def test_bar_heights_are_ordered_like_the_values(tmp_path):
    values = [0.31, 0.62, 0.12, 0.48]
    save_bar_chart(tmp_path / "bars.png", ABLATIONS[:4], values,
                   lows=[v - 0.05 for v in values], highs=[v + 0.05 for v in values], title="accuracy")
    image = read_png(tmp_path / "bars.png")
    heights = [is_color(image, COLOR_CYCLE[index]).sum(axis=0).max() for index in range(4)]
    assert np.argsort(heights).tolist() == np.argsort(values).tolist(), f"bar heights {heights}"
    ratio = heights[1] / heights[2]
    assert abs(ratio - 0.62 / 0.12) < 0.3, f"bars are not proportional to values: {heights}"


def test_bar_chart_with_ymax_missing_values_and_long_labels(tmp_path):
    save_bar_chart(tmp_path / "b.png", ["a-very-long-ablation-name", "b"], [1.3, None], ymax=1.0,
                   lows=[1.1, None], highs=[1.5, None], ylabel="accuracy")
    assert read_png_size(tmp_path / "b.png")[1] > 0, "bar chart not written"


def test_far_off_whisker_ends_are_clipped_not_drawn_in_full(tmp_path):
    save_bar_chart(tmp_path / "w.png", ["wide"], [0.5], lows=[-1e12], highs=[1e12], ymax=1.0)
    image = read_png(tmp_path / "w.png")
    assert is_color(image, plot.WHISKER).sum() > 100, "the clipped whisker should still cross the plot"
