"""Tests for cliplab.models.preprocess: parity with transformers and torchvision arithmetic, modes, EXIF, errors."""

from __future__ import annotations

import io
import json
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from cliplab.models.preprocess import (
    ImageLoadError,
    PreprocessConfig,
    Preprocessor,
    crop_offset,
    load_image,
    resized_size,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FLICKR = DATA / "flickr8k-1k" / "images"
S = 224
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def flickr_photos() -> list[Path]:
    if not FLICKR.is_dir():
        pytest.skip(f"real photos not available: {FLICKR} is absent (needs the shared data checkout ../shared/data)")
    photos = sorted(FLICKR.glob("*.jpg"))
    assert len(photos) == 1000, f"expected the 1000 flickr8k-1k photos, found {len(photos)}"
    return photos


# --------------------------------------------------------------------------------------------------------------------
# Independent reference: torchvision's documented Resize(int) + CenterCrop arithmetic on a PIL image, written out
# literally (torchvision/transforms/functional.py: _compute_resized_output_size, resize, center_crop; ToTensor,
# Normalize), with PIL + numpy.


def torchvision_reference(img: Image.Image, size: int = S, resample=Image.BICUBIC) -> np.ndarray:
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_h, new_w) != (h, w):  # F.resize returns the input untouched when the size is unchanged
        img = img.resize((new_w, new_h), resample)  # F_pil.resize: img.resize(size[::-1], interpolation)
    crop_top = int(round((new_h - size) / 2.0))
    crop_left = int(round((new_w - size) / 2.0))
    img = img.crop((crop_left, crop_top, crop_left + size, crop_top + size))
    x = np.asarray(img.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / np.float32(255)  # ToTensor
    return (x - MEAN[:, None, None]) / STD[:, None, None]  # Normalize


def hf_pil_processor(**kwargs):
    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, "CLIPImageProcessorPil", None)
    if cls is None:  # transformers < 5: CLIPImageProcessor *is* the PIL/numpy implementation
        cls = transformers.CLIPImageProcessor
    proc = cls(**kwargs)
    assert getattr(proc, "backend", "pil") == "pil", "need the PIL backend of CLIPImageProcessor"
    return proc


def hf_pixels(proc, img: Image.Image) -> np.ndarray:
    return proc(images=img, return_tensors="np")["pixel_values"][0]


def as_uint8(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img)


# --------------------------------------------------------------------------------------------------------------------
# Real photos


def test_transformers_convention_matches_clip_image_processor_on_1000_photos():
    photos = flickr_photos()
    hf = hf_pil_processor()  # default CLIP settings: shortest_edge 224, bicubic, crop 224, OpenAI mean/std
    ours = Preprocessor(PreprocessConfig(crop_rounding="floor"))
    worst = 0.0
    for path in photos:
        img = load_image(path)
        expected = hf_pixels(hf, img)
        got = ours(img).numpy()
        assert got.shape == expected.shape == (3, S, S)
        worst = max(worst, float(np.abs(got - expected).max()))
    assert worst <= 1e-4, f"max abs diff vs transformers CLIPImageProcessor (PIL): {worst}"


def test_openai_convention_matches_torchvision_reference_on_1000_photos():
    photos = flickr_photos()
    ours = Preprocessor(PreprocessConfig())  # defaults = OpenAI clip.load transform
    worst = 0.0
    for path in photos:
        img = load_image(path)
        got = ours(img).numpy()
        expected = torchvision_reference(img)
        worst = max(worst, float(np.abs(got - expected).max()))
    assert worst <= 1e-4, f"max abs diff vs torchvision reference: {worst}"


def test_conventions_differ_by_one_pixel_exactly_where_half_to_even_differs_from_floor():
    photos = flickr_photos()
    rounded = Preprocessor(PreprocessConfig(crop_rounding="round"))
    floored = Preprocessor(PreprocessConfig(crop_rounding="floor"))
    predicted = differ = 0
    checked_same = checked_shift = False
    for path in photos:
        img = load_image(path)
        nw, nh = resized_size(*img.size, S)
        dy = int(round((nh - S) / 2.0)) - (nh - S) // 2
        dx = int(round((nw - S) / 2.0)) - (nw - S) // 2
        # half-to-even differs from floor iff the margin is odd and its floor half is odd: margin % 4 == 3
        assert dy == int((nh - S) % 4 == 3) and dx == int((nw - S) % 4 == 3)
        a = as_uint8(rounded.resize_crop(img)).astype(np.int16)
        b = as_uint8(floored.resize_crop(img)).astype(np.int16)
        if dx == dy == 0:
            assert np.array_equal(a, b), path.name
            if not checked_same:  # the tensors follow the pixels (checked once: same code path for every photo)
                assert torch.equal(rounded(img), floored(img))
                checked_same = True
            continue
        predicted += 1
        assert not np.array_equal(a, b), path.name
        differ += 1
        # the "round" crop is the "floor" crop moved by one pixel (right and/or down)
        assert np.array_equal(a[: S - dy, : S - dx], b[dy:, dx:]), path.name
        if not checked_shift:
            ta, tb = rounded(img), floored(img)
            assert not torch.equal(ta, tb) and torch.equal(ta[:, : S - dy, : S - dx], tb[:, dy:, dx:])
            checked_shift = True
    print(f"\nphotos whose crop differs between conventions: {differ} / {len(photos)}")
    assert differ == predicted
    assert differ > 0
    # the photos are mostly 500x375 (margin 74) and 500x333 (margin 112): few odd margins, about 1/8 differ
    assert 0.05 * len(photos) <= differ <= 0.30 * len(photos), differ


def test_other_sizes_and_bilinear_match_transformers():
    photos = flickr_photos()[:25]
    for size, interp, resample in [(336, "bilinear", Image.BILINEAR), (160, "bicubic", Image.BICUBIC)]:
        hf = hf_pil_processor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}, resample=resample
        )
        ours = Preprocessor(PreprocessConfig(image_size=size, interpolation=interp, crop_rounding="floor"))
        ref = Preprocessor(PreprocessConfig(image_size=size, interpolation=interp))
        for path in photos:
            img = load_image(path)
            assert np.abs(ours(img).numpy() - hf_pixels(hf, img)).max() <= 1e-4
            assert np.abs(ref(img).numpy() - torchvision_reference(img, size, resample)).max() <= 1e-4


def test_sources_are_equivalent_and_batch_stacks():
    photos = flickr_photos()[:3]
    pp = Preprocessor()
    p = photos[0]
    expected = pp(p)
    assert torch.equal(pp(str(p)), expected)
    assert torch.equal(pp(p.read_bytes()), expected)
    with open(p, "rb") as f:
        assert torch.equal(pp(f), expected)
    assert torch.equal(pp(Image.open(p)), expected)
    b = pp.batch([p, photos[1].read_bytes(), Image.open(photos[2])])
    assert b.shape == (3, 3, S, S) and b.dtype == torch.float32
    assert torch.equal(b[0], expected) and torch.equal(b[2], pp(photos[2]))


# --------------------------------------------------------------------------------------------------------------------
# Geometry on synthetic images (no shared data needed)


def gradient(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack(
        [xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), rng.integers(0, 256, (h, w))], axis=-1
    ).astype(np.uint8)
    return Image.fromarray(arr)


@settings(max_examples=60, deadline=None)
@given(
    w=st.integers(1, 700),
    h=st.integers(1, 700),
    size=st.sampled_from([32, 64, 224]),
    rounding=st.sampled_from(["round", "floor"]),
    interp=st.sampled_from(["bicubic", "bilinear"]),
)
def test_resize_crop_matches_literal_arithmetic(w, h, size, rounding, interp):
    if max(w, h) / min(w, h) > 64:  # extreme aspect ratios take the windowed path (tested separately)
        w = min(w, 64 * h)
        h = min(h, 64 * w)
    img = gradient(w, h)
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[interp]
    pp = Preprocessor(PreprocessConfig(image_size=size, interpolation=interp, crop_rounding=rounding))
    out = pp.resize_crop(img)
    assert out.size == (size, size) and out.mode == "RGB"
    short, long = min(w, h), max(w, h)
    nw, nh = (size, int(size * long / short)) if w <= h else (int(size * long / short), size)
    assert resized_size(w, h, size) == (nw, nh)
    rnd = (lambda m: int(round(m / 2.0))) if rounding == "round" else (lambda m: m // 2)
    top, left = rnd(nh - size), rnd(nw - size)
    full = img if (nw, nh) == (w, h) else img.resize((nw, nh), resample)
    assert np.array_equal(as_uint8(out), np.asarray(full)[top : top + size, left : left + size])
    x = pp(img)
    assert x.shape == (3, size, size) and x.dtype == torch.float32 and torch.isfinite(x).all()


def test_crop_offset_rounding():
    assert [crop_offset(S + m, S, "round") for m in range(8)] == [0, 0, 1, 2, 2, 2, 3, 4]  # half to even
    assert [crop_offset(S + m, S, "floor") for m in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    with pytest.raises(ValueError):
        crop_offset(300, S, "ceil")


def test_small_image_is_upscaled_and_exact_size_is_not_resampled():
    pp = Preprocessor()
    tiny = gradient(10, 7)
    assert np.abs(pp(tiny).numpy() - torchvision_reference(tiny)).max() <= 1e-4
    exact = gradient(S, S, seed=3)  # already S x S: no resampling at all, pixels pass straight through
    assert np.array_equal(as_uint8(pp.resize_crop(exact)), np.asarray(exact))
    wide = gradient(301, S, seed=4)  # short side already S: only cropped (margin 77 -> round 38, floor 38)
    assert np.array_equal(as_uint8(pp.resize_crop(wide)), np.asarray(wide)[:, 38 : 38 + S])
    want = (np.asarray(exact, dtype=np.float32).transpose(2, 0, 1) / np.float32(255) - MEAN[:, None, None]) / STD[
        :, None, None
    ]
    assert np.abs(pp(exact).numpy() - want).max() <= 1e-6


@pytest.mark.parametrize("rounding", ["round", "floor"])
@pytest.mark.parametrize("shape", [(9, 1400), (1400, 9), (3, 700), (700, 3), (1, 400), (2000, 13)])
def test_extreme_aspect_ratio_window_stays_within_two_levels(shape, rounding):
    w, h = shape
    img = gradient(w, h, seed=w + h)
    pp = Preprocessor(PreprocessConfig(crop_rounding=rounding))
    nw, nh = resized_size(w, h, S)
    assert nw * nh > 64 * S * S  # really takes the windowed path
    top, left = crop_offset(nh, S, rounding), crop_offset(nw, S, rounding)
    full = np.asarray(img.resize((nw, nh), Image.BICUBIC))[top : top + S, left : left + S].astype(int)
    got = as_uint8(pp.resize_crop(img)).astype(int)
    diff = np.abs(got - full)
    assert diff.max() <= 2 and (diff > 0).mean() < 0.02, (diff.max(), (diff > 0).mean())


# --------------------------------------------------------------------------------------------------------------------
# Modes


def _arr(w=37, h=23, seed=1, lo=0, hi=256, dtype=np.uint8, channels=None):
    rng = np.random.default_rng(seed)
    shape = (h, w) if channels is None else (h, w, channels)
    return rng.integers(lo, hi, shape).astype(dtype)


def _palette_image(transparency: bool) -> Image.Image:
    im = Image.fromarray(_arr(hi=4)).convert("L").point(lambda v: v)  # values 0..3
    p = Image.frombytes("P", im.size, im.tobytes())
    p.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30] + [0] * (768 - 12))
    if transparency:
        p.info["transparency"] = 1  # index 1 (green) is transparent
    return p


def _i16_image() -> Image.Image:
    a = _arr(hi=65536, dtype=np.uint16)
    a[0, :6] = [0, 255, 256, 32768, 65280, 65535]
    return Image.frombytes("I;16", (a.shape[1], a.shape[0]), a.astype("<u2").tobytes())


def _f_values():
    a = _arr(lo=-50, hi=320).astype(np.float32) + 0.75
    a[0, :6] = [-3.0, 0.4, 100.7, 254.99, 255.0, 1e6]
    return a


MODE_CASES = {
    # mode: (builder, expected RGB uint8 array from the *source pixels* (decoded image), file formats)
    "1": (
        lambda: Image.fromarray(_arr(hi=2).astype(bool)),
        lambda im: np.asarray(im).astype(np.uint8) * 255,
        ["PNG", "TIFF"],
    ),
    "L": (lambda: Image.fromarray(_arr()), lambda im: np.asarray(im), ["PNG", "TIFF", "JPEG"]),
    "LA": (lambda: Image.fromarray(_arr(channels=2), "LA"), lambda im: np.asarray(im)[..., 0], ["PNG", "TIFF"]),
    "RGBA": (lambda: Image.fromarray(_arr(channels=4), "RGBA"), lambda im: np.asarray(im)[..., :3], ["PNG", "TIFF"]),
    "P": (lambda: _palette_image(False), None, ["PNG", "TIFF"]),
    "P+transparency": (lambda: _palette_image(True), None, ["PNG"]),
    "CMYK": (lambda: Image.fromarray(_arr(channels=4), "CMYK"), None, ["TIFF", "JPEG"]),
    "I;16": (_i16_image, lambda im: (np.asarray(im).astype(np.uint32) >> 8).astype(np.uint8), ["PNG", "TIFF"]),
    "I": (
        lambda: Image.fromarray(_arr(lo=-1000, hi=70000, dtype=np.int32)),
        lambda im: np.clip(np.asarray(im), 0, 255).astype(np.uint8),
        ["TIFF"],
    ),
    "F": (lambda: Image.fromarray(_f_values()), lambda im: np.clip(np.asarray(im), 0, 255).astype(np.uint8), ["TIFF"]),
}


def _expected_rgb(case: str, im: Image.Image) -> np.ndarray:
    fn = MODE_CASES[case][1]
    if case.startswith("P"):
        pal = np.array(im.getpalette("RGB"), dtype=np.uint8).reshape(-1, 3)
        return pal[np.asarray(im)]  # transparency is dropped: the transparent index keeps its palette colour
    if case == "CMYK":
        c, m, y, k = (np.asarray(im)[..., i].astype(np.int32) for i in range(4))
        # Pillow's cmyk2rgb (the references' convert("RGB")): 255 - clip(x + k) per channel, within rounding
        return np.stack([255 - np.clip(v + k - v * k // 255, 0, 255) for v in (c, m, y)], -1).astype(np.uint8)
    out = fn(im)
    return np.repeat(out[..., None], 3, axis=-1) if out.ndim == 2 else out


@pytest.mark.parametrize("case", list(MODE_CASES))
def test_modes_in_memory(case):
    im = MODE_CASES[case][0]()
    assert im.mode == case.split("+")[0]
    rgb = load_image(im)
    assert rgb.mode == "RGB" and rgb.size == im.size
    got = np.asarray(rgb).astype(int)
    want = _expected_rgb(case, im).astype(int)
    tol = 1 if case == "CMYK" else 0
    assert np.abs(got - want).max() <= tol
    pp = Preprocessor()
    x = pp(im)
    assert x.shape == (3, S, S) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert torch.equal(x, pp(Image.fromarray(np.asarray(rgb))))  # same as feeding the RGB equivalent
    assert im.mode == case.split("+")[0]  # the caller's image is not modified


@pytest.mark.parametrize(
    "case,fmt", [(c, f) for c, spec in MODE_CASES.items() for f in spec[2]], ids=lambda v: str(v)
)
def test_modes_round_trip_through_files(case, fmt, tmp_path):
    im = MODE_CASES[case][0]()
    path = tmp_path / f"img.{fmt.lower()}"
    kwargs = {"transparency": 1} if case == "P+transparency" else {}
    if fmt == "JPEG":
        kwargs["quality"] = 95
    im.save(path, fmt, **kwargs)
    decoded = Image.open(path)
    decoded.load()
    if fmt != "JPEG":
        assert decoded.mode == im.mode, (decoded.mode, im.mode)
        assert np.array_equal(np.asarray(decoded), np.asarray(im))
    rgb = load_image(path)
    got = np.asarray(rgb).astype(int)
    want = _expected_rgb(case, decoded).astype(int)
    assert np.abs(got - want).max() <= (1 if case == "CMYK" else 0)
    x = Preprocessor()(path)
    assert x.shape == (3, S, S) and torch.isfinite(x).all()


def test_mode_semantics_spot_values():
    # L: three equal channels before normalisation
    grey = np.asarray(Preprocessor().resize_crop(Image.fromarray(_arr())))
    assert grey.std() > 10 and (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    # I;16 keeps the high byte: 65535 -> 255, 65280 -> 255, 32768 -> 128, 256 -> 1, 255 -> 0
    row = np.asarray(load_image(_i16_image()))[0, :6, 0]
    assert row.tolist() == [0, 0, 1, 128, 255, 255]
    # I clips, F clips and truncates (Pillow's own I/F -> RGB)
    i32 = Image.fromarray(np.array([[-5, 0, 100, 255, 256, 70000]], dtype=np.int32))
    assert np.asarray(load_image(i32))[0, :, 0].tolist() == [0, 0, 100, 255, 255, 255]
    f = Image.fromarray(np.array([[-3.0, 0.4, 100.7, 254.99, 255.0, 1e6, np.inf, -np.inf]], dtype=np.float32))
    assert np.asarray(load_image(f))[0, :, 0].tolist() == [0, 0, 100, 254, 255, 255, 255, 0]
    nan = Image.fromarray(np.full((5, 5), np.nan, dtype=np.float32))
    assert torch.isfinite(Preprocessor()(nan)).all()
    # 1 -> 0 / 255
    assert np.unique(np.asarray(load_image(Image.new("1", (4, 4), 1)))).tolist() == [255]
    # CMYK pure colours
    px = lambda c: np.asarray(load_image(Image.new("CMYK", (1, 1), c)))[0, 0].tolist()  # noqa: E731
    assert px((255, 0, 0, 0)) == [0, 255, 255] and px((0, 0, 0, 255)) == [0, 0, 0] and px((0, 0, 0, 0)) == [255] * 3
    # alpha dropped (OpenAI) vs composited on white (transformers 5)
    rgba = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    assert np.asarray(load_image(rgba))[0, 0].tolist() == [10, 20, 30]
    assert np.asarray(load_image(rgba, alpha="white"))[0, 0].tolist() == [255, 255, 255]
    half = Image.new("LA", (1, 1), (0, 128))
    assert np.asarray(load_image(half))[0, 0].tolist() == [0, 0, 0]
    assert abs(np.asarray(load_image(half, alpha="white"))[0, 0, 0] - 127) <= 1
    pt = _palette_image(True)
    idx = np.asarray(pt)
    white = np.asarray(load_image(pt, alpha="white"))
    assert (white[idx == 1] == 255).all() and (white[idx == 0] == [255, 0, 0]).all()
    premult = Image.new("RGBA", (1, 1), (200, 100, 50, 255)).convert("RGBa")
    assert np.asarray(load_image(premult))[0, 0].tolist() == [200, 100, 50]
    assert load_image(Image.new("RGBA", (3, 3)).convert("La")).mode == "RGB"


@pytest.mark.parametrize("case", ["LA", "RGBA", "P+transparency", "L", "P", "CMYK", "1"])
def test_alpha_white_matches_transformers_convert_to_rgb(case):
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "CLIPImageProcessorPil"):
        pytest.skip("white-background alpha compositing is the transformers >= 5 behaviour")
    from transformers.image_transforms import convert_to_rgb

    im = MODE_CASES[case][0]()
    assert np.array_equal(np.asarray(load_image(im, alpha="white")), convert_to_rgb(im, return_numpy=True))
    big = im.resize((300, 260), Image.NEAREST)
    if case == "P+transparency":
        big.info["transparency"] = 1
    hf = hf_pil_processor()
    ours = Preprocessor(PreprocessConfig(crop_rounding="floor"), alpha="white")
    assert np.abs(ours(big).numpy() - hf_pixels(hf, big)).max() <= 1e-4


# --------------------------------------------------------------------------------------------------------------------
# EXIF orientation


def _marked(w: int, h: int) -> Image.Image:
    a = np.zeros((h, w, 3), dtype=np.uint8)
    a[: h // 3, : w // 3] = (255, 0, 0)  # red block at the stored top-left corner
    return Image.fromarray(a)


def _with_orientation(img: Image.Image, orientation: int, path: Path) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, "JPEG", quality=95, exif=exif.tobytes())
    return path


def _red(a: np.ndarray) -> np.ndarray:
    return (a[..., 0] > 200) & (a[..., 1] < 60) & (a[..., 2] < 60)


def test_exif_orientation_applied(tmp_path):
    stored = _marked(90, 60)  # landscape as stored
    p6 = _with_orientation(stored, 6, tmp_path / "rot6.jpg")  # 6: display rotated 90 degrees clockwise
    assert Image.open(p6).size == (90, 60)
    up = load_image(p6)
    assert up.size == (60, 90)  # portrait once upright
    a = np.asarray(up)
    # stored top-left ends up top-right after a clockwise quarter turn
    assert _red(a[:30, 40:]).mean() > 0.9 and _red(a[:30, :20]).mean() < 0.05 and _red(a[60:]).mean() < 0.05
    p3 = _with_orientation(stored, 3, tmp_path / "rot3.jpg")  # 3: 180 degrees
    a3 = np.asarray(load_image(p3))
    assert a3.shape == (60, 90, 3) and _red(a3[40:, 60:]).mean() > 0.9 and _red(a3[:20, :30]).mean() < 0.05
    p1 = _with_orientation(stored, 1, tmp_path / "rot1.jpg")
    assert _red(np.asarray(load_image(p1))[:20, :30]).mean() > 0.9
    # every source kind is transposed, and the preprocessed tensor follows
    assert load_image(p6.read_bytes()).size == (60, 90)
    assert load_image(Image.open(p6)).size == (60, 90)
    assert load_image(ImageOps.exif_transpose(Image.open(p6))).size == (60, 90)  # already upright: not turned twice
    pp = Preprocessor()
    assert torch.equal(pp(p6), pp(Image.fromarray(a)))


# --------------------------------------------------------------------------------------------------------------------
# Errors


def _jpeg_bytes(w=256, h=192) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_arr(w, h, channels=3)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\x00" * 16))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


def _as_source(kind: str, data: bytes, tmp_path: Path, name: str):
    if kind == "path":
        p = tmp_path / name
        p.write_bytes(data)
        return p
    if kind == "str":
        p = tmp_path / name
        p.write_bytes(data)
        return str(p)
    if kind == "bytes":
        return data
    return io.BytesIO(data)


BAD_INPUTS = {
    "text-named-jpg": (b"this is not an image, just text\n" * 10, "photo.jpg", "not a recognised image"),
    "zero-bytes": (b"", "empty.jpg", "0 bytes"),
    "truncated-jpeg": (_jpeg_bytes()[: len(_jpeg_bytes()) // 2], "cut.jpg", "truncated or corrupt"),
    "truncated-png": (_png_bytes(Image.fromarray(_arr(64, 64, channels=3)))[:-200], "cut.png", "truncated"),
    "garbage": (np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes(), "x.bin", "not a recognised"),
    "png-claims-huge-size": (_png_header_only(100_000, 100_000), "bomb.png", "decompression bomb"),
}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("kind", ["path", "str", "bytes", "stream"])
@pytest.mark.parametrize("bad", list(BAD_INPUTS))
def test_bad_inputs_raise_image_load_error(bad, kind, tmp_path):
    data, name, needle = BAD_INPUTS[bad]
    src = _as_source(kind, data, tmp_path, name)
    with pytest.raises(ImageLoadError) as info:
        load_image(src)
    msg = str(info.value)
    assert needle in msg, msg
    if kind in ("path", "str"):
        assert name in msg  # names the file
    with pytest.raises(ImageLoadError):
        Preprocessor()(src)


@pytest.mark.parametrize("pixels", [40 * 40, 100 * 100])  # above the limit (Pillow warns) / above twice it (raises)
@pytest.mark.parametrize("warning_action", ["ignore", "error"])
def test_decompression_bomb_limit_is_enforced(pixels, warning_action, monkeypatch, tmp_path):
    side = int(pixels**0.5)
    p = tmp_path / "big.png"
    Image.fromarray(_arr(side, side, channels=3)).save(p)
    assert load_image(p).size == (side, side)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter(warning_action, Image.DecompressionBombWarning)
        with pytest.raises(ImageLoadError, match="decompression-bomb|decompression bomb") as info:
            load_image(p)
        with pytest.raises(ImageLoadError):
            load_image(p.read_bytes())
    assert "big.png" in str(info.value)


def test_missing_file_directory_and_wrong_type(tmp_path):
    with pytest.raises(ImageLoadError, match="no such file") as info:
        load_image(tmp_path / "nope.jpg")
    assert "nope.jpg" in str(info.value)
    with pytest.raises(ImageLoadError, match="directory"):
        load_image(tmp_path)
    with pytest.raises(TypeError):
        load_image(12345)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="alpha"):
        load_image(Image.new("RGB", (2, 2)), alpha="black")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with open(empty, "rb") as f, pytest.raises(ImageLoadError, match="0 bytes"):
        load_image(f)
    with pytest.raises(ImageLoadError, match="no pixels"):
        load_image(Image.new("RGB", (0, 5)))


def test_batch_error_names_the_item(tmp_path):
    good = tmp_path / "ok.png"
    Image.new("RGB", (30, 20)).save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    pp = Preprocessor()
    with pytest.raises(ImageLoadError, match=r"batch item 1 .*bad\.jpg"):
        pp.batch([good, bad])
    empty = pp.batch([])
    assert empty.shape == (0, 3, S, S)
    assert ImageLoadError.__mro__[1] is ValueError


# --------------------------------------------------------------------------------------------------------------------
# Config


def test_config_round_trip_and_validation():
    c = PreprocessConfig(image_size=336, interpolation="bilinear", crop_rounding="floor")
    d = c.to_dict()
    assert d == {
        "image_size": 336,
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
        "interpolation": "bilinear",
        "crop_rounding": "floor",
    }
    assert PreprocessConfig.from_dict(json.loads(json.dumps(d))) == c
    assert PreprocessConfig.from_dict({}) == PreprocessConfig()
    with pytest.raises(ValueError, match="'resample'.*'size'|'size'.*'resample'") as info:
        PreprocessConfig.from_dict({"image_size": 224, "size": 3, "resample": 2})
    assert "resample" in str(info.value) and "size" in str(info.value)
    for bad in (
        {"image_size": 0},
        {"image_size": 2.5},
        {"mean": (0.5, 0.5)},
        {"std": (0.5, 0.0, 0.5)},
        {"interpolation": "nearest"},
        {"crop_rounding": "ceil"},
    ):
        with pytest.raises(ValueError):
            PreprocessConfig(**bad)


def test_packaged_model_configs_load():
    cfg_dir = Path(__file__).resolve().parents[1] / "cliplab" / "models" / "configs"
    blocks = [json.loads(p.read_text()).get("preprocess") for p in sorted(cfg_dir.glob("*.json"))]
    blocks = [b for b in blocks if b is not None]
    if not blocks:
        pytest.skip("no packaged model config carries a preprocess block")
    for b in blocks:
        c = PreprocessConfig.from_dict(b)
        assert c.to_dict() == {**PreprocessConfig().to_dict(), **b}


def test_docs_example_runs(capsys):
    doc = Path(__file__).resolve().parents[1] / "docs" / "preprocessing.md"
    if not doc.is_file():
        pytest.skip("docs/preprocessing.md not present")
    import re

    code = re.search(r"```python\n(.*?)```", doc.read_text(), re.S).group(1)
    exec(compile(code, str(doc), "exec"), {})
    out = capsys.readouterr().out
    assert "torch.Size([3, 224, 224]) torch.float32" in out and "not a recognised image format" in out
