"""The closed vocabulary of the synthetic scene world.

Every word a caption can contain comes from here.  The word classes are
pairwise disjoint (no colour is also a shape, no lexicon word is a colour, ...),
which is what makes the caption grammar unambiguous and its parser exact.
"""

from __future__ import annotations

import math

__all__ = [
    "VOCABULARY",
    "SHAPES",
    "COLOURS",
    "SIZES",
    "TEXTURES",
    "RELATIONS",
    "BRIGHTNESS",
    "WORDS",
    "REGIONS",
    "PLURALS",
    "NUMBER_WORDS",
    "ORDINALS",
    "SIZE_RADIUS",
    "TEXTURE_SHADE",
    "brightness_lut",
    "apply_brightness",
    "article",
    "plural",
    "number_word",
    "opposite_relation",
]

#: Object shapes (drawn by :mod:`cliplab.data.synthetic.render`).
SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon",
)

#: Object colours, far apart in RGB (min pairwise Euclidean distance > 100).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 25, 25),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 225, 30),
    "purple": (140, 50, 190),
    "orange": (250, 125, 0),
    "cyan": (30, 210, 220),
    "pink": (250, 110, 190),
}

#: Object sizes -> radius as a fraction of the image side.
SIZE_RADIUS: dict[str, float] = {"small": 0.07, "medium": 0.11, "large": 0.15}
SIZES: tuple[str, ...] = tuple(SIZE_RADIUS)

#: Textures.  Textured pixels are the object colour times ``TEXTURE_SHADE``.
TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted")
TEXTURE_SHADE: float = 0.5

#: Pairwise spatial relations (canonical name -> caption phrase).
RELATIONS: dict[str, str] = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

#: Global brightness levels: every output channel value v becomes
#: ``round(scale * v + offset)`` (clipped to 0..255), background included.
BRIGHTNESS: dict[str, dict[str, float]] = {
    "dark": {"scale": 0.5, "offset": 0.0},
    "normal": {"scale": 1.0, "offset": 0.0},
    "bright": {"scale": 0.7, "offset": 75.0},
}

#: Lexicon of words that may be rendered into an image (bitmap font).
WORDS: tuple[str, ...] = (
    "cat", "dog", "sun", "car", "cup", "hat", "key", "pen",
    "bus", "egg", "owl", "fox", "tree", "fish", "bird", "moon",
)

#: 3x3 grid regions of an object's centre, as used by long captions.
REGIONS: dict[tuple[int, int], str] = {
    (0, 0): "top left", (1, 0): "top", (2, 0): "top right",
    (0, 1): "left", (1, 1): "centre", (2, 1): "right",
    (0, 2): "bottom left", (1, 2): "bottom", (2, 2): "bottom right",
}

PLURALS: dict[str, str] = {s: (s + "es" if s.endswith(("s", "x", "ch", "sh")) else s + "s") for s in SHAPES}

NUMBER_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
)
ORDINALS: tuple[str, ...] = (
    "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
)

VOCABULARY: dict[str, object] = {
    "shapes": list(SHAPES),
    "colours": {k: list(v) for k, v in COLOURS.items()},
    "sizes": {k: v for k, v in SIZE_RADIUS.items()},
    "textures": list(TEXTURES),
    "texture_shade": TEXTURE_SHADE,
    "relations": dict(RELATIONS),
    "brightness": {k: dict(v) for k, v in BRIGHTNESS.items()},
    "words": list(WORDS),
    "regions": list(REGIONS.values()),
    "plurals": dict(PLURALS),
    "numbers": list(NUMBER_WORDS),
    "ordinals": list(ORDINALS),
}


def _check_disjoint() -> None:
    classes = [set(SHAPES), set(COLOURS), set(SIZES), set(TEXTURES), set(WORDS), set(PLURALS.values())]
    for i, a in enumerate(classes):
        for b in classes[i + 1:]:
            assert not (a & b), a & b
    names = list(COLOURS)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert math.dist(COLOURS[a], COLOURS[b]) > 100, (a, b)


_check_disjoint()

_LUT_CACHE: dict[str, "object"] = {}


def brightness_lut(level: str):
    """A 256-entry uint8 lookup table implementing brightness ``level``."""
    import numpy as np

    lut = _LUT_CACHE.get(level)
    if lut is None:
        p = BRIGHTNESS[level]
        v = np.arange(256, dtype=np.float64)
        lut = np.clip(np.round(p["scale"] * v + p["offset"]), 0, 255).astype(np.uint8)
        lut.setflags(write=False)
        _LUT_CACHE[level] = lut
    return lut


def apply_brightness(rgb, level: str) -> tuple[int, ...]:
    """Brightness-transform one RGB triple (ints), exactly as the renderer does."""
    lut = brightness_lut(level)
    return tuple(int(lut[int(c)]) for c in rgb)


def article(next_word: str) -> str:
    return "an" if next_word[:1] in "aeiou" else "a"


def plural(shape: str) -> str:
    return PLURALS[shape]


def number_word(n: int) -> str:
    return NUMBER_WORDS[n]


def opposite_relation(rel: str) -> str:
    return _OPPOSITE[rel]
