"""A tiny bitmap font for `thor_min.plot`, drawn by hand for this project, and its rasterizer.

Every printable ASCII character is a 5-pixel-wide glyph. Rows are listed top to bottom and
separated by spaces; `#` is ink and `.` is paper. Rows 0-6 hold capitals and digits (row 6 is
the baseline), lowercase letters use rows 2-6, and characters that hang below the baseline
(g j p q y , ; _) add rows 7-8. Glyphs with fewer than 9 rows are padded with paper at the bottom.

Below the table, `text_mask` turns a string into a boolean ink mask at an integer scale, and
`draw_text` / `draw_vertical_text` stamp that mask onto a numpy RGB canvas (the vertical one
rotated a quarter turn, for y-axis labels).
"""

from functools import lru_cache

import numpy as np

GLYPH_WIDTH = 5       # pixels of ink per glyph, before scaling
GLYPH_HEIGHT = 9      # 7 rows above the baseline (inclusive) + 2 descender rows
GLYPH_ADVANCE = 6     # glyph width + 1 pixel of spacing between characters
CAP_HEIGHT = 7        # rows from the top of a capital to the baseline
TEXT_SCALE = 2        # default screen pixels per font pixel (labels, ticks, legends)
INK = (34, 34, 34)    # default text color
UNKNOWN_GLYPH = "##### #...# #...# #...# #...# #...# #####"  # drawn for characters not in the table

GLYPHS = {
    " ": "..... ..... ..... ..... ..... ..... .....",
    "!": "..#.. ..#.. ..#.. ..#.. ..#.. ..... ..#..",
    '"': ".#.#. .#.#. ..... ..... ..... ..... .....",
    "#": ".#.#. .#.#. ##### .#.#. ##### .#.#. .#.#.",
    "$": "..#.. .#### #.#.. .###. ..#.# ####. ..#..",
    "%": "##... ##..# ...#. ..#.. .#... #..## ...##",
    "&": ".##.. #..#. #.#.. .#... #.#.# #..#. .##.#",
    "'": "..#.. ..#.. ..... ..... ..... ..... .....",
    "(": "...#. ..#.. .#... .#... .#... ..#.. ...#.",
    ")": ".#... ..#.. ...#. ...#. ...#. ..#.. .#...",
    "*": "..... ..#.. #.#.# .###. #.#.# ..#.. .....",
    "+": "..... ..#.. ..#.. ##### ..#.. ..#.. .....",
    ",": "..... ..... ..... ..... ..... .##.. .##.. ..#.. .#...",
    "-": "..... ..... ..... .###. ..... ..... .....",
    ".": "..... ..... ..... ..... ..... .##.. .##..",
    "/": "..... ....# ...#. ..#.. .#... #.... .....",
    "0": ".###. #...# #..## #.#.# ##..# #...# .###.",
    "1": "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
    "2": ".###. #...# ....# ...#. ..#.. .#... #####",
    "3": "##### ...#. ..#.. ...#. ....# #...# .###.",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#.",
    "5": "##### #.... ####. ....# ....# #...# .###.",
    "6": "..##. .#... #.... ####. #...# #...# .###.",
    "7": "##### ....# ...#. ..#.. .#... .#... .#...",
    "8": ".###. #...# #...# .###. #...# #...# .###.",
    "9": ".###. #...# #...# .#### ....# ...#. .##..",
    ":": "..... .##.. .##.. ..... .##.. .##.. .....",
    ";": "..... .##.. .##.. ..... .##.. .##.. ..#.. .#...",
    "<": "...#. ..#.. .#... #.... .#... ..#.. ...#.",
    "=": "..... ..... ##### ..... ##### ..... .....",
    ">": ".#... ..#.. ...#. ....# ...#. ..#.. .#...",
    "?": ".###. #...# ....# ...#. ..#.. ..... ..#..",
    "@": ".###. #...# #.### #.#.# #.### #.... .####",
    "A": ".###. #...# #...# ##### #...# #...# #...#",
    "B": "####. #...# #...# ####. #...# #...# ####.",
    "C": ".###. #...# #.... #.... #.... #...# .###.",
    "D": "###.. #..#. #...# #...# #...# #..#. ###..",
    "E": "##### #.... #.... ####. #.... #.... #####",
    "F": "##### #.... #.... ####. #.... #.... #....",
    "G": ".###. #...# #.... #.### #...# #...# .####",
    "H": "#...# #...# #...# ##### #...# #...# #...#",
    "I": ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "J": "..### ...#. ...#. ...#. ...#. #..#. .##..",
    "K": "#...# #..#. #.#.. ##... #.#.. #..#. #...#",
    "L": "#.... #.... #.... #.... #.... #.... #####",
    "M": "#...# ##.## #.#.# #.#.# #...# #...# #...#",
    "N": "#...# #...# ##..# #.#.# #..## #...# #...#",
    "O": ".###. #...# #...# #...# #...# #...# .###.",
    "P": "####. #...# #...# ####. #.... #.... #....",
    "Q": ".###. #...# #...# #...# #.#.# #..#. .##.#",
    "R": "####. #...# #...# ####. #.#.. #..#. #...#",
    "S": ".#### #.... #.... .###. ....# ....# ####.",
    "T": "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "U": "#...# #...# #...# #...# #...# #...# .###.",
    "V": "#...# #...# #...# #...# #...# .#.#. ..#..",
    "W": "#...# #...# #...# #.#.# #.#.# #.#.# .#.#.",
    "X": "#...# #...# .#.#. ..#.. .#.#. #...# #...#",
    "Y": "#...# #...# .#.#. ..#.. ..#.. ..#.. ..#..",
    "Z": "##### ....# ...#. ..#.. .#... #.... #####",
    "[": ".###. .#... .#... .#... .#... .#... .###.",
    "\\": "..... #.... .#... ..#.. ...#. ....# .....",
    "]": ".###. ...#. ...#. ...#. ...#. ...#. .###.",
    "^": "..#.. .#.#. #...# ..... ..... ..... .....",
    "_": "..... ..... ..... ..... ..... ..... ..... #####",
    "`": ".#... ..#.. ..... ..... ..... ..... .....",
    "a": "..... ..... .###. ....# .#### #...# .####",
    "b": "#.... #.... #.##. ##..# #...# #...# ####.",
    "c": "..... ..... .###. #.... #.... #...# .###.",
    "d": "....# ....# .##.# #..## #...# #...# .####",
    "e": "..... ..... .###. #...# ##### #.... .###.",
    "f": "..##. .#..# .#... ###.. .#... .#... .#...",
    "g": "..... ..... .#### #...# #...# #...# .#### ....# .###.",
    "h": "#.... #.... #.##. ##..# #...# #...# #...#",
    "i": "..#.. ..... .##.. ..#.. ..#.. ..#.. .###.",
    "j": "...#. ..... ..##. ...#. ...#. ...#. ...#. #..#. .##..",
    "k": "#.... #.... #..#. #.#.. ##... #.#.. #..#.",
    "l": ".##.. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "m": "..... ..... ##.#. #.#.# #.#.# #.#.# #.#.#",
    "n": "..... ..... #.##. ##..# #...# #...# #...#",
    "o": "..... ..... .###. #...# #...# #...# .###.",
    "p": "..... ..... ####. #...# #...# #...# ####. #.... #....",
    "q": "..... ..... .#### #...# #...# #...# .#### ....# ....#",
    "r": "..... ..... #.##. ##..# #.... #.... #....",
    "s": "..... ..... .#### #.... .###. ....# ####.",
    "t": ".#... .#... ###.. .#... .#... .#..# ..##.",
    "u": "..... ..... #...# #...# #...# #..## .##.#",
    "v": "..... ..... #...# #...# #...# .#.#. ..#..",
    "w": "..... ..... #...# #...# #.#.# #.#.# .#.#.",
    "x": "..... ..... #...# .#.#. ..#.. .#.#. #...#",
    "y": "..... ..... #...# #...# #...# #...# .#### ....# .###.",
    "z": "..... ..... ##### ...#. ..#.. .#... #####",
    "{": "...#. ..#.. ..#.. .#... ..#.. ..#.. ...#.",
    "|": "..#.. ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "}": ".#... ..#.. ..#.. ...#. ..#.. ..#.. .#...",
    "~": "..... ..... .#... #.#.# ...#. ..... .....",
}


# ----------------------------------------------------------------------------- rasterizing text

@lru_cache(maxsize=None)
def glyph_mask(char: str) -> np.ndarray:
    """The (GLYPH_HEIGHT, GLYPH_WIDTH) boolean ink mask of one character."""
    mask = np.zeros((GLYPH_HEIGHT, GLYPH_WIDTH), bool)
    for row, pixels in enumerate(GLYPHS.get(char, UNKNOWN_GLYPH).split()):
        mask[row] = [pixel == "#" for pixel in pixels]
    mask.flags.writeable = False
    return mask


def text_width(text: str, scale: int = TEXT_SCALE) -> int:
    """Width in pixels of one line of text."""
    return max(len(text) * GLYPH_ADVANCE - 1, 0) * scale


def text_mask(text: str, scale: int = TEXT_SCALE) -> np.ndarray:
    """Boolean ink mask of one line of text; its height is GLYPH_HEIGHT * scale (descenders included)."""
    mask = np.zeros((GLYPH_HEIGHT, text_width(text, 1)), bool)
    for index, char in enumerate(text):
        mask[:, index * GLYPH_ADVANCE:index * GLYPH_ADVANCE + GLYPH_WIDTH] = glyph_mask(char)
    return mask.repeat(scale, axis=0).repeat(scale, axis=1)


def fit_text(text: str, max_width: int, scale: int = TEXT_SCALE) -> str:
    """The text, cut short and ended with '..' if it would be wider than max_width pixels."""
    if text_width(text, scale) <= max_width:
        return text
    keep = max(max_width // (GLYPH_ADVANCE * scale) - 2, 0)
    return text[:keep] + ".."


def stamp_mask(image, left: int, top: int, mask: np.ndarray, color) -> None:
    """Paint `color` wherever the boolean mask is True, with the mask's corner at (left, top)."""
    height, width = image.shape[:2]
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(left + mask.shape[1], width), min(top + mask.shape[0], height)
    if x0 < x1 and y0 < y1:
        image[y0:y1, x0:x1][mask[y0 - top:y1 - top, x0 - left:x1 - left]] = color


def draw_text(image, x, y, text, color=INK, scale=TEXT_SCALE, align="left", bold=False) -> None:
    """One line of text with its top at row y; x is its left edge, centre or right edge (align)."""
    mask = text_mask(text, scale)
    left = int(x) - {"left": 0, "center": mask.shape[1] // 2, "right": mask.shape[1]}[align]
    stamp_mask(image, left, int(y), mask, color)
    if bold:
        stamp_mask(image, left + 1, int(y), mask, color)


def draw_vertical_text(image, x, center_y, text, color=INK, scale=TEXT_SCALE) -> None:
    """Text turned a quarter turn counter-clockwise (read bottom to top), left edge at column x."""
    mask = np.rot90(text_mask(text, scale))
    stamp_mask(image, int(x), int(center_y) - mask.shape[0] // 2, mask, color)
