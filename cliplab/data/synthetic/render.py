"""Rasterisation of scenes with PIL ImageDraw (no anti-aliasing, exact masks).

Pipeline for one scene (all integer, hence bit-exact and deterministic):

1. grey background, optional clutter marks (grey 1-px lines and dots);
2. optional rendered word (PIL's default *bitmap* font, integer-upscaled for
   images larger than 64 px) on a cleared patch of background;
3. objects, in list order (later objects occlude earlier ones), drawn into a
   label map; each object's pixels get its colour, textured pixels get
   ``colour * TEXTURE_SHADE``;
4. global brightness lookup table applied to every pixel.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .geometry import ring_width, shape_outline
from .protocols import SceneLike
from .vocabulary import COLOURS, TEXTURE_SHADE, brightness_lut


__all__ = ["render", "render_with_masks", "word_size", "texture_pattern", "object_shades"]


@lru_cache(maxsize=1)
def _font():
    loader = getattr(ImageFont, "load_default_imagefont", None)
    return loader() if loader is not None else ImageFont.load_default()


def _word_scale(image_size: int) -> int:
    return max(1, int(round(image_size / 64)))


@lru_cache(maxsize=256)
def word_size(word: str, image_size: int) -> tuple[int, int]:
    """Pixel (width, height) of ``word`` as rendered in an image of ``image_size``."""
    x0, y0, x1, y1 = _font().getbbox(word)
    k = _word_scale(image_size)
    return (x1 - x0) * k, (y1 - y0) * k


@lru_cache(maxsize=64)
def texture_pattern(texture: str, image_size: int) -> np.ndarray:
    """Boolean [H, W] array: True where a textured object gets the darker shade."""
    s = image_size
    yy, xx = np.mgrid[0:s, 0:s]
    if texture == "plain":
        pat = np.zeros((s, s), dtype=bool)
    elif texture == "striped":
        w = max(1, s // 32)  # 2-px stripes at 64 px
        pat = ((xx + yy) // w) % 2 == 1  # diagonal stripes
    elif texture == "dotted":
        p = max(3, s // 16)
        d = max(1, p // 2)
        pat = ((xx % p) < d) & ((yy % p) < d)
    else:  # pragma: no cover - guarded by vocabulary
        raise ValueError(f"unknown texture {texture!r}")
    pat.setflags(write=False)
    return pat


def object_shades(colour: str) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(base, textured) RGB of an object colour, before brightness."""
    base = COLOURS[colour]
    dark = tuple(int(round(c * TEXTURE_SHADE)) for c in base)
    return base, dark  # type: ignore[return-value]


_SHADES = {c: tuple(np.array(v, dtype=np.uint8) for v in object_shades(c)) for c in COLOURS}


def _draw_clutter(draw: ImageDraw.ImageDraw, scene: SceneLike) -> None:
    """8-16 grey marks at 64 px; counts, lengths and widths scale with the image
    side so the clutter looks the same at every resolution."""
    s = scene.image_size
    rng = np.random.default_rng(scene.clutter_seed)
    k = s / 64.0
    width = max(1, int(round(k)))
    n = int(rng.integers(int(8 * k), int(16 * k) + 1))
    vals = rng.random((n, 6))
    for i in range(n):
        g = int(60 + 140 * vals[i, 0])
        if abs(g - scene.background) < 20:
            g = scene.background + (25 if g >= scene.background else -25)
        x = vals[i, 1] * (s - 1)
        y = vals[i, 2] * (s - 1)
        if vals[i, 3] < 0.35:  # dot (1-2 px square at 64 px)
            d = (1 if vals[i, 4] < 0.5 else 2) * width
            draw.rectangle([int(x), int(y), int(x) + d - 1, int(y) + d - 1], fill=(g, g, g))
        else:  # short line
            length = (3 + 6 * vals[i, 4]) * k
            ang = vals[i, 5] * np.pi
            draw.line([x, y, x + length * np.cos(ang), y + length * np.sin(ang)], fill=(g, g, g), width=width)


def _draw_word(img: Image.Image, draw: ImageDraw.ImageDraw, scene: SceneLike) -> None:
    x, y, x1, y1 = scene.word_box
    bg = scene.background
    draw.rectangle([x - 1, y - 1, x1, y1], fill=(bg, bg, bg))
    font = _font()
    fx0, fy0, fx1, fy1 = font.getbbox(scene.word)
    g = scene.word_shade
    k = _word_scale(scene.image_size)
    if k == 1:
        draw.text((x - fx0, y - fy0), scene.word, fill=(g, g, g), font=font)
        return
    small = Image.new("L", (fx1 - fx0, fy1 - fy0), 0)
    ImageDraw.Draw(small).text((-fx0, -fy0), scene.word, fill=255, font=font)
    big = small.resize(((fx1 - fx0) * k, (fy1 - fy0) * k), Image.Resampling.NEAREST)
    img.paste((g, g, g), (x, y), big)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: int) -> None:
    pts = shape_outline(shape, cx, cy, r)
    if pts is not None:
        draw.polygon(pts, fill=fill)
    elif shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=ring_width(r))
    else:  # pragma: no cover
        raise ValueError(f"unknown shape {shape!r}")


def render_with_masks(scene: SceneLike) -> tuple[Image.Image, np.ndarray]:
    """Render ``scene``; also return visible-pixel masks, bool array [n_objects, H, W]."""
    s = scene.image_size
    bg = scene.background
    img = Image.new("RGB", (s, s), (bg, bg, bg))
    if scene.clutter or scene.word:
        draw = ImageDraw.Draw(img)
        if scene.clutter:
            _draw_clutter(draw, scene)
        if scene.word:
            _draw_word(img, draw, scene)
    label_img = Image.new("L", (s, s), 0)
    ldraw = ImageDraw.Draw(label_img)
    for i, o in enumerate(scene.objects):
        _draw_shape(ldraw, o.shape, o.x, o.y, o.radius, i + 1)
    label = np.asarray(label_img)
    arr = np.array(img)
    masks = np.zeros((len(scene.objects), s, s), dtype=bool)
    for i, o in enumerate(scene.objects):
        m = label == (i + 1)
        masks[i] = m
        base, dark = _SHADES[o.colour]
        arr[m] = base
        if o.texture != "plain":
            arr[m & texture_pattern(o.texture, s)] = dark
    if scene.brightness != "normal":
        arr = brightness_lut(scene.brightness)[arr]
    return Image.fromarray(arr, "RGB"), masks


def render(scene: SceneLike) -> Image.Image:
    """Render ``scene`` to an RGB PIL image."""
    return render_with_masks(scene)[0]

