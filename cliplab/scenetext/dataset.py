"""Scene-text data: words drawn with TrueType fonts into synthetic scenes, with word boxes and exact text masks.

Two kinds of sample, both pure functions of ``(seed, index)``:

* :class:`SceneTextWorld` scenes (for retrieval): a shapes scene of :class:`cliplab.data.synthetic.SceneWorld`
  (objects are the visual distractors), then ``words_per_scene`` words from a dictionary drawn on top at
  non-overlapping places. The *cluttered* variant draws the words straight over grey clutter (no cleared patch),
  adds stray single letters (text-like distractors that are not words) and strokes across the words.
* :func:`word_image` crops (for recognition): one word centred (with jitter) on a plain or cluttered background.

Fonts: the DejaVu TrueType fonts (``/usr/share/fonts/truetype/dejavu``, Debian's ``fonts-dejavu-core``). When they
are absent, :func:`load_font` falls back to PIL's built-in bitmap font and :data:`FONT_NOTE` says so (warned once):
the data stay usable but have one font at one size.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..data.synthetic import SceneWorld
from ..data.synthetic.vocabulary import WORDS

__all__ = ["FONT_DIR", "FONT_FILES", "FUNCTION_WORDS", "CONFUSERS", "DICTIONARY", "available_fonts", "font_note",
           "load_font", "glyph_mask", "word_image", "TextScene", "SceneTextWorld"]

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONT_FILES = ("DejaVuSans-Bold.ttf", "DejaVuSans.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSansMono-Bold.ttf")

#: Function words (FDP routes queries into function / content words).
FUNCTION_WORDS: tuple[str, ...] = ("the", "and", "for", "of", "in", "on", "to", "at", "by", "or")
#: Near-spellings (Levenshtein distance 1) of the synthetic world's words: the confusers of retrieval.
CONFUSERS: tuple[str, ...] = ("cut", "cap", "bat", "can", "dig", "fog", "run", "jar", "pup", "hut", "hay", "hen",
                              "pan", "bug", "own", "box", "free", "dish", "bid", "mood")
#: Every word the scene-text data draw: the synthetic world's 16 words, their confusers and the function words.
DICTIONARY: tuple[str, ...] = tuple(dict.fromkeys(WORDS + CONFUSERS + FUNCTION_WORDS))


def available_fonts() -> tuple[Path, ...]:
    """The DejaVu font files present on this machine (empty when the fonts are not installed)."""
    return tuple(FONT_DIR / f for f in FONT_FILES if (FONT_DIR / f).is_file())


def font_note() -> str:
    """One line on which fonts the data use (the bitmap fallback is stated plainly)."""
    fonts = available_fonts()
    if fonts:
        return f"TrueType fonts: {', '.join(f.name for f in fonts)}"
    return (f"no DejaVu fonts in {FONT_DIR}: PIL's bitmap font is used at every size (install fonts-dejavu-core "
            "for several TrueType faces)")


@lru_cache(maxsize=64)
def load_font(size: int, face: int = 0):
    """Font ``face`` (index into the available DejaVu files, wrapping) at pixel ``size``; the bitmap font when none."""
    fonts = available_fonts()
    if not fonts:
        warnings.warn(font_note(), stacklevel=2)
        loader = getattr(ImageFont, "load_default_imagefont", None)
        return loader() if loader is not None else ImageFont.load_default()
    return ImageFont.truetype(str(fonts[face % len(fonts)]), int(size))


def glyph_mask(word: str, size: int, face: int = 0) -> np.ndarray:
    """Tight boolean ink mask ``[h, w]`` of ``word`` (binarised, no anti-aliasing, so masks are exact)."""
    font = load_font(size, face)
    x0, y0, x1, y1 = font.getbbox(word)
    canvas = Image.new("L", (max(1, x1 - x0), max(1, y1 - y0)), 0)
    ImageDraw.Draw(canvas).text((-x0, -y0), word, fill=255, font=font)
    ink = np.asarray(canvas) >= 128
    if not ink.any():
        raise ValueError(f"word {word!r} renders no ink at size {size}")
    rows, cols = np.where(ink.any(1))[0], np.where(ink.any(0))[0]
    return ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _paint(arr: np.ndarray, mask: np.ndarray, x: int, y: int, shade: int) -> None:
    h, w = mask.shape
    arr[y:y + h, x:x + w][mask] = shade


def _strokes(arr: np.ndarray, rng: np.random.Generator, n: int, avoid: int) -> None:
    img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    s = arr.shape[0]
    for _ in range(n):
        g = int(rng.integers(40, 220))
        if abs(g - avoid) < 30:
            g = (g + 90) % 256
        x, y = rng.random(2) * (s - 1)
        length, ang = 4 + 10 * rng.random(), np.pi * rng.random()
        draw.line([x, y, x + length * np.cos(ang), y + length * np.sin(ang)], fill=(g, g, g), width=1)
    arr[:] = np.asarray(img)


def word_image(word: str, index: int = 0, *, image_size: int = 64, font_sizes: Sequence[int] = (11, 12, 13),
               clutter: bool = False, seed: int = 0) -> Image.Image:
    """One word, centred with a few pixels of jitter, on a grey background (random font face, size, shade).
    ``clutter`` adds grey strokes across the image. A pure function of ``(word, index, seed)``."""
    rng = np.random.default_rng([seed, index, sum(map(ord, word)), len(word)])
    face, size = int(rng.integers(len(FONT_FILES))), int(rng.choice(list(font_sizes)))
    ink = glyph_mask(word, size, face)
    bg = int(rng.integers(90, 150))
    shade = 240 if rng.random() < 0.6 else 15
    arr = np.full((image_size, image_size, 3), bg, dtype=np.uint8)
    h, w = ink.shape
    if w + 2 > image_size or h + 2 > image_size:
        raise ValueError(f"word {word!r} at size {size} does not fit in {image_size}px; use smaller font_sizes")
    x = int(np.clip((image_size - w) // 2 + rng.integers(-3, 4), 1, image_size - w - 1))
    y = int(np.clip((image_size - h) // 2 + rng.integers(-6, 7), 1, image_size - h - 1))
    if clutter:
        _strokes(arr, rng, 10, bg)
    _paint(arr, ink, x, y, shade)
    return Image.fromarray(arr, "RGB")


@dataclass(frozen=True)
class TextScene:
    image: Image.Image
    words: tuple[str, ...]                        # the words drawn, in drawing order
    boxes: tuple[tuple[int, int, int, int], ...]  # (x0, y0, x1, y1) of each word's ink, x1/y1 exclusive
    text_mask: np.ndarray                         # bool [H, W]: word ink as drawn (before strokes; no stray letters)
    cluttered: bool


class SceneTextWorld:
    """Scenes with several words and distractors (see the module docstring). ``sample(i)`` is a pure function of
    ``(seed, i)``; ``words`` is the dictionary words are drawn from."""

    def __init__(self, image_size: int = 64, seed: int = 0, *, words: Sequence[str] = DICTIONARY,
                 words_per_scene: tuple[int, int] = (1, 2), cluttered: bool = False, stray_letters: int = 3,
                 font_sizes: Sequence[int] = (11, 12, 13), max_objects: int = 3) -> None:
        lo, hi = words_per_scene
        if not 1 <= lo <= hi:
            raise ValueError("words_per_scene must be (lo, hi) with 1 <= lo <= hi")
        self.image_size, self.seed, self.words = int(image_size), int(seed), tuple(words)
        self.words_per_scene, self.cluttered, self.stray_letters = (lo, hi), bool(cluttered), int(stray_letters)
        self.font_sizes = tuple(font_sizes)
        self.shapes = SceneWorld(image_size=image_size, seed=seed, word_prob=0.0, max_objects=max_objects,
                                 clutter_prob=1.0 if cluttered else 0.0)

    def __repr__(self) -> str:
        return f"SceneTextWorld(image_size={self.image_size}, seed={self.seed}, cluttered={self.cluttered})"

    def sample(self, index: int, words: Sequence[str] | None = None) -> TextScene:
        """Scene ``index``; ``words`` forces the words drawn (else sampled from the dictionary, no repeats)."""
        rng = np.random.default_rng([self.seed, int(index), 7])
        base = np.array(self.shapes.sample(index).image)
        s = self.image_size
        if words is None:
            n = int(rng.integers(self.words_per_scene[0], self.words_per_scene[1] + 1))
            words = [self.words[i] for i in rng.choice(len(self.words), size=n, replace=False)]
        mask = np.zeros((s, s), dtype=bool)
        occupied = np.zeros((s, s), dtype=bool)
        boxes, drawn = [], []
        for word in words:
            ink = glyph_mask(word, int(rng.choice(self.font_sizes)), int(rng.integers(len(FONT_FILES))))
            h, w = ink.shape
            for _ in range(50):  # rejection sampling of a free place (a 1-px margin between words)
                x, y = int(rng.integers(1, s - w)), int(rng.integers(1, s - h))
                if not occupied[max(0, y - 2):y + h + 2, max(0, x - 2):x + w + 2].any():
                    break
            else:
                raise ValueError(f"no room for {len(words)} words in a {s}px scene; draw fewer words")
            occupied[y:y + h, x:x + w] = True
            bg = int(np.median(base[y:y + h, x:x + w, 0]))
            shade = 240 if bg < 128 else 15
            if not self.cluttered:  # clean variant: the word sits on a cleared patch, as in the synthetic world
                base[max(0, y - 1):y + h + 1, max(0, x - 1):x + w + 1] = bg
            _paint(base, ink, x, y, shade)
            mask[y:y + h, x:x + w] |= ink
            boxes.append((x, y, x + w, y + h))
            drawn.append(word)
        if self.cluttered:
            letters = "abcdefghijklmnopqrstuvwxyz"
            for _ in range(self.stray_letters):  # text-like distractors that are not words
                ink = glyph_mask(letters[int(rng.integers(26))], int(rng.choice(self.font_sizes)))
                h, w = ink.shape
                x, y = int(rng.integers(0, s - w)), int(rng.integers(0, s - h))
                if not occupied[max(0, y - 3):y + h + 3, max(0, x - 3):x + w + 3].any():  # keep words readable
                    _paint(base, ink, x, y, int(rng.choice([15, 240])))
            _strokes(base, rng, 6, int(base[0, 0, 0]))
        return TextScene(Image.fromarray(base, "RGB"), tuple(drawn), tuple(boxes), mask, self.cluttered)

    def scenes(self, n: int, start: int = 0) -> list[TextScene]:
        return [self.sample(i) for i in range(start, start + n)]
