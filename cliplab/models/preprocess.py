"""CLIP image preprocessing with Pillow and NumPy only (no torchvision).

Two reference pipelines are reproduced exactly for RGB inputs; they differ only in how the centre crop is placed:

* OpenAI ``clip.load`` (torchvision ``Resize(S, BICUBIC)`` on a PIL image, ``CenterCrop(S)``, ``ToTensor``,
  ``Normalize``): ``crop_rounding="round"``, offset ``int(round((H - S) / 2.0))`` (Python ``round``: half to even).
* Hugging Face ``CLIPImageProcessor`` (PIL backend, ``CLIPImageProcessorPil`` in transformers 5):
  ``crop_rounding="floor"``, offset ``(H - S) // 2``.

Both resize so that the short side is ``S`` and the long side is ``int(S * long / short)``, with
``PIL.Image.resize((w, h), resample)`` (no ``reducing_gap``; skipped when the size is unchanged), then scale to
``[0, 1]`` and normalise with the per-channel mean and std. See ``docs/preprocessing.md``.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import asdict, dataclass, fields
from typing import IO, Any, Iterable, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "ImageLoadError",
    "PreprocessConfig",
    "Preprocessor",
    "load_image",
    "resized_size",
    "crop_offset",
]

ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, IO[bytes], Image.Image]

_INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_FILTER_SUPPORT = {"bicubic": 2.0, "bilinear": 1.0}  # Pillow's filter radii (Resample.c)
_CROP_ROUNDINGS = ("round", "floor")
#: "shortest+crop": short side to S, then a centred S x S crop (CLIP); "squash": straight to S x S, no crop (SigLIP's
#: processor, ``size={"height": S, "width": S}``)
_RESIZE_MODES = ("shortest+crop", "squash")
_ALPHA_POLICIES = ("drop", "white")
_EXIF_ORIENTATION = 0x0112

# Above this many pixels (as a multiple of S*S) the full resized image is not materialised; only the rows/columns
# that reach the crop are resampled (aspect ratios beyond 64:1). Normal photos never get near it.
_FULL_RESIZE_MAX_FACTOR = 64


class ImageLoadError(ValueError):
    """An image could not be read: missing, empty, not an image, truncated/corrupt, or a decompression bomb."""

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"cannot load image from {source}: {reason}")


# --------------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class PreprocessConfig:
    """Resize/crop/normalise settings. Defaults are OpenAI CLIP's (224 px, bicubic, torchvision crop rounding)."""

    image_size: int = 224
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    interpolation: str = "bicubic"  # "bicubic" | "bilinear"
    crop_rounding: str = "round"  # "round": OpenAI/torchvision; "floor": transformers
    resize_mode: str = "shortest+crop"  # or "squash" (SigLIP): see _RESIZE_MODES

    def __post_init__(self) -> None:
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, (int, np.integer)):
            raise ValueError(f"image_size must be a positive int, got {self.image_size!r}")
        self.image_size = int(self.image_size)
        if self.image_size <= 0:
            raise ValueError(f"image_size must be a positive int, got {self.image_size!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            try:
                value = tuple(float(v) for v in value)
            except TypeError:
                raise ValueError(f"{name} must be 3 floats, got {value!r}") from None
            if len(value) != 3 or not all(math.isfinite(v) for v in value):
                raise ValueError(f"{name} must be 3 finite floats, got {value!r}")
            setattr(self, name, value)
        if any(s == 0.0 for s in self.std):
            raise ValueError(f"std must be non-zero, got {self.std!r}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}, got {self.interpolation!r}")
        if self.crop_rounding not in _CROP_ROUNDINGS:
            raise ValueError(f"crop_rounding must be one of {list(_CROP_ROUNDINGS)}, got {self.crop_rounding!r}")
        if self.resize_mode not in _RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {list(_RESIZE_MODES)}, got {self.resize_mode!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (mean/std as lists)."""
        d = asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        if self.resize_mode == "shortest+crop":  # the default: CLIP configs stay as they were
            del d["resize_mode"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PreprocessConfig":
        """Inverse of :meth:`to_dict`; missing keys take defaults, unknown keys raise ``ValueError`` naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown PreprocessConfig keys: {', '.join(map(repr, unknown))} (known: {sorted(known)})")
        return cls(**dict(d))


# --------------------------------------------------------------------------------------------------------------------
# Loading


def _describe(src: Any) -> str:
    if isinstance(src, (str, os.PathLike)):
        return repr(os.fspath(src))
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    if isinstance(src, Image.Image):
        return f"<PIL image mode={src.mode} size={src.size[0]}x{src.size[1]}>"
    name = getattr(src, "name", None)
    return repr(name) if isinstance(name, (str, bytes)) else f"<{type(src).__name__} stream>"


def _check_pixels(im: Image.Image, desc: str) -> None:
    """Pillow only *warns* between MAX_IMAGE_PIXELS and twice that; we refuse (thread-safe, no warning filters)."""
    limit = Image.MAX_IMAGE_PIXELS
    w, h = im.size
    if limit is not None and w * h > limit:
        raise ImageLoadError(
            desc,
            f"image is {w}x{h} = {w * h} pixels, above the decompression-bomb limit "
            f"PIL.Image.MAX_IMAGE_PIXELS = {limit}",
        )


def _to_rgb(im: Image.Image, alpha: str) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB. See docs/preprocessing.md for the per-mode semantics."""
    mode = im.mode
    if mode.startswith("I;16"):
        # 16-bit grey: keep the high byte (65535 -> 255, 256 -> 1); Pillow's convert("RGB") saturates (>= 255 -> 255)
        arr = np.asarray(im)
        im = Image.fromarray((arr >> 8).astype(np.uint8))
        mode = im.mode
    elif mode in ("La", "RGBa"):  # premultiplied alpha: un-premultiply first
        im = im.convert(mode.upper())
        mode = im.mode

    has_alpha = any(b in ("A", "a") for b in im.getbands()) or im.info.get("transparency") is not None
    if not has_alpha:
        return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, I (clipped to 0..255), F (clipped, truncated), ...
    rgba = im.convert("RGBA")
    if alpha == "white":  # transformers >= 5 convert_to_rgb: composite over an opaque white background
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return rgba.convert("RGB")  # OpenAI: convert("RGB") discards alpha; going via RGBA avoids Pillow's palette warnings


def load_image(src: ImageSource, *, alpha: str = "drop", draft: int | None = None) -> Image.Image:
    """Open ``src`` (path, bytes, binary file object or PIL image) as an RGB image, upright per EXIF orientation.

    ``alpha``: ``"drop"`` (default, OpenAI: ``convert("RGB")`` ignores alpha/transparency) or ``"white"``
    (transformers 5: composite over white). ``draft``: for JPEG files, let the decoder scale by 1/2, 1/4 or 1/8 (in
    the DCT, much faster than a full decode) while both sides stay at least ``draft`` pixels (Pillow's draft mode);
    not exact, so only the fast mode uses it. Raises :class:`ImageLoadError` for missing/empty files, non-images,
    truncated or corrupt data (the image is fully decoded here) and decompression bombs.
    """
    if alpha not in _ALPHA_POLICIES:
        raise ValueError(f"alpha must be one of {list(_ALPHA_POLICIES)}, got {alpha!r}")
    desc = _describe(src)

    if isinstance(src, Image.Image):
        try:
            src.load()
        except Exception as exc:  # lazily opened images decode here
            raise ImageLoadError(desc, f"image data is truncated or corrupt ({type(exc).__name__}: {exc})") from exc
        return _finish(src, alpha, desc)

    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if not os.path.exists(path):
            raise ImageLoadError(desc, "no such file")
        if os.path.isdir(path):
            raise ImageLoadError(desc, "is a directory, not an image file")
        if os.path.getsize(path) == 0:
            raise ImageLoadError(desc, "file is empty (0 bytes)")
        fp: Any = path
    elif isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise ImageLoadError(desc, "no data (0 bytes)")
        fp = io.BytesIO(bytes(src))
    elif hasattr(src, "read"):
        if hasattr(src, "seek") and getattr(src, "seekable", lambda: True)():
            start = src.tell()
            empty = not src.read(1)
            src.seek(start)
            fp = src
        else:
            fp = io.BytesIO(src.read())
            empty = fp.getbuffer().nbytes == 0
        if empty:
            raise ImageLoadError(desc, "no data (0 bytes)")
    else:
        raise TypeError(
            f"load_image expects a path, bytes, a binary file object or a PIL image, got {type(src).__name__}"
        )

    try:
        with Image.open(fp) as im:
            _check_pixels(im, desc)
            if draft and im.format == "JPEG" and min(im.size) >= 2 * draft:  # else draft would only change the IDCT
                im.draft("RGB", (int(draft), int(draft)))
            im.load()  # force the full decode so truncation/corruption surfaces here
            return _finish(im, alpha, desc)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(desc, f"decompression bomb refused by Pillow ({exc})") from exc
    except Image.DecompressionBombWarning as exc:  # only raised when warnings are turned into errors
        raise ImageLoadError(desc, f"decompression bomb refused by Pillow ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageLoadError(desc, "not a recognised image format (Pillow cannot identify it)") from exc
    except Exception as exc:
        # Pillow reports truncated or malformed data with a zoo of types depending on the plugin: OSError,
        # SyntaxError, ValueError, EOFError, struct.error, zlib.error, MemoryError, ...
        raise ImageLoadError(desc, f"image data is truncated or corrupt ({type(exc).__name__}: {exc})") from exc


def _finish(im: Image.Image, alpha: str, desc: str) -> Image.Image:
    if im.width <= 0 or im.height <= 0:
        raise ImageLoadError(desc, f"image has no pixels ({im.width}x{im.height})")
    upright = im
    try:
        if im.getexif().get(_EXIF_ORIENTATION, 1) in range(2, 9):  # skip exif_transpose's copy when upright
            upright = ImageOps.exif_transpose(im)
    except Exception as exc:  # a malformed EXIF block must not make a decodable photo unusable
        warnings.warn(f"{desc}: ignoring unreadable EXIF orientation ({exc})", stacklevel=3)
    try:
        out = _to_rgb(upright, alpha)
    except (ValueError, OSError) as exc:
        raise ImageLoadError(desc, f"cannot convert mode {im.mode!r} to RGB ({exc})") from exc
    if out is im:  # never hand back the object that the caller (or our `with`) will close
        out = im.copy()
    return out


# --------------------------------------------------------------------------------------------------------------------
# Geometry


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(new_width, new_height) with the short side ``size`` and the long side ``int(size * long / short)``.

    Identical to torchvision's ``_compute_resized_output_size`` and transformers' ``get_resize_output_image_size``
    (``default_to_square=False``): ties (square images) count as "width is short".
    """
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def crop_offset(length: int, size: int, rounding: str) -> int:
    """Start of a centred window of ``size`` in ``length``: torchvision ``int(round((L - S) / 2.0))`` or floor."""
    if rounding == "round":
        return int(round((length - size) / 2.0))
    if rounding == "floor":
        return (length - size) // 2
    raise ValueError(f"crop_rounding must be one of {list(_CROP_ROUNDINGS)}, got {rounding!r}")


# --------------------------------------------------------------------------------------------------------------------
# Preprocessor


class Preprocessor:
    """Image -> normalised ``float32`` tensor ``[3, S, S]`` (``batch``: ``[B, 3, S, S]``).

    ``alpha`` is forwarded to :func:`load_image` (``"drop"`` = OpenAI, ``"white"`` = transformers 5). ``fast``
    decodes JPEGs of at least 4x the input size at 1/2, 1/4 or 1/8 scale, keeping both sides >= 2x the input so
    the bicubic resize still antialiases (Pillow draft mode, see :func:`load_image`). Not bit-exact, so models
    turn it on only in their fast mode (``precision="bf16"``); ``benchmarks/suite.py`` measures its effect.
    """

    def __init__(self, config: PreprocessConfig | None = None, *, alpha: str = "drop", fast: bool = False):
        if config is None:
            config = PreprocessConfig()
        if not isinstance(config, PreprocessConfig):
            raise TypeError(f"config must be a PreprocessConfig, got {type(config).__name__}")
        if alpha not in _ALPHA_POLICIES:
            raise ValueError(f"alpha must be one of {list(_ALPHA_POLICIES)}, got {alpha!r}")
        self.config = config
        self.alpha = alpha
        self.fast = bool(fast)
        self._resample = _INTERPOLATIONS[config.interpolation]
        self._mean = np.asarray(config.mean, dtype=np.float32).reshape(3, 1, 1)
        self._std = np.asarray(config.std, dtype=np.float32).reshape(3, 1, 1)

    def __repr__(self) -> str:
        return f"Preprocessor({self.config!r}, alpha={self.alpha!r}, fast={self.fast})"

    def resize_crop(self, image: ImageSource) -> Image.Image:
        """Load, resize (short side S) and centre-crop: the RGB ``S x S`` image before scaling/normalisation."""
        img = load_image(image, alpha=self.alpha, draft=2 * self.config.image_size if self.fast else None)
        return self._resize_crop_rgb(img)

    def _resize_crop_rgb(self, img: Image.Image) -> Image.Image:
        s = self.config.image_size
        w, h = img.size
        if self.config.resize_mode == "squash":  # SigLIP: both sides to S, aspect ratio not kept
            return img if (w, h) == (s, s) else img.resize((s, s), self._resample)
        nw, nh = resized_size(w, h, s)
        top = crop_offset(nh, s, self.config.crop_rounding)
        left = crop_offset(nw, s, self.config.crop_rounding)
        if nw * nh <= _FULL_RESIZE_MAX_FACTOR * s * s:
            if (nw, nh) != (w, h):  # torchvision returns the image untouched when the size is unchanged
                img = img.resize((nw, nh), self._resample)
            return img.crop((left, top, left + s, top + s))
        return self._resize_crop_extreme(img, nw, nh, top, left)

    def _resize_crop_extreme(self, img: Image.Image, nw: int, nh: int, top: int, left: int) -> Image.Image:
        """Same pixels as resize-then-crop for aspect ratios > 64:1, without building the huge intermediate.

        Pillow resamples horizontally first, then vertically, each pass separable and per row/column. So the wide
        case restricts the horizontal pass to the crop columns (box), the tall case keeps only the input rows that
        the vertical filter of the crop rows reaches, then resamples with a box.
        """
        s = self.config.image_size
        w, h = img.size
        if nw > nh:  # wide: nh == s
            sx = w / nw
            img = img.resize((s, h), self._resample, box=(left * sx, 0, (left + s) * sx, h))
            if h != s:
                img = img.resize((s, s), self._resample)
            return img
        # tall: nw == s
        sy = h / nh
        support = _FILTER_SUPPORT[self.config.interpolation] * max(sy, 1.0)
        y0, y1 = top * sy, (top + s) * sy
        r0 = max(0, int(math.floor(y0 - support)) - 2)
        r1 = min(h, int(math.ceil(y1 + support)) + 2)
        img = img.crop((0, r0, w, r1))
        if w != s:
            img = img.resize((s, r1 - r0), self._resample)
        return img.resize((s, s), self._resample, box=(0, y0 - r0, s, y1 - r0))

    def _to_array(self, img: Image.Image) -> np.ndarray:
        # float32 IEEE ops in the same order as torchvision's ToTensor + Normalize (x / 255, - mean, / std), so the
        # result is bit-identical to doing them in torch. NumPy avoids torch's intra-op thread pool, which costs far
        # more than the arithmetic itself on [3, 224, 224] when CPUs are oversubscribed (data-loader workers).
        x = np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1), dtype=np.float32)
        x /= np.float32(255.0)
        x -= self._mean
        x /= self._std
        return x

    def __call__(self, image: ImageSource) -> torch.Tensor:
        return torch.from_numpy(self._to_array(self.resize_crop(image)))

    def batch(self, images: Iterable[ImageSource]) -> torch.Tensor:
        """Stack of ``__call__`` results, ``[B, 3, S, S]``; an :class:`ImageLoadError` names the failing index."""
        out = []
        for i, image in enumerate(images):
            try:
                out.append(self._to_array(self.resize_crop(image)))
            except ImageLoadError as exc:
                raise ImageLoadError(f"batch item {i} ({exc.source})", exc.reason) from exc
        s = self.config.image_size
        if not out:
            return torch.empty((0, 3, s, s), dtype=torch.float32)
        return torch.from_numpy(np.stack(out))
