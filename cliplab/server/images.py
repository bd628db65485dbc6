"""Untrusted image bytes in, a decoded RGB image or a one-line refusal out; thumbnails of indexed files, served only
from inside the index's image root."""

from __future__ import annotations

import io
import os
import threading
import warnings
from collections import OrderedDict
from pathlib import Path


class ImageRejected(ValueError):
    """An upload that is not a usable image: ``status`` is the HTTP status to answer with (415 not an image,
    400 undecodable or too many pixels)."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


def decode_upload(data: bytes, *, max_pixels: int):
    """Decode ``data`` into an RGB PIL image. The pixel count is checked from the header, before any pixel is
    decoded, so a small file that would expand to gigabytes (a decompression bomb) is refused cheaply."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageRejected(400, "the uploaded image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageRejected(415, "the upload is not an image this server can read (JPEG, PNG, WebP, GIF, BMP, TIFF)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageRejected(400, "the image has too many pixels (a decompression bomb?)") from None
    except Exception as exc:  # a broken header
        raise ImageRejected(400, f"the image cannot be decoded: {type(exc).__name__}") from None
    w, h = img.size
    if w < 1 or h < 1 or w * h > max_pixels:
        raise ImageRejected(400, f"the image is {w}x{h} pixels, over the limit of {max_pixels:,} "
                                 "(a decompression bomb?)")
    try:
        img.draft("RGB", (1024, 1024))  # JPEG: decode at reduced size; the model sees a 224-ish crop anyway
        img = img.convert("RGB")
    except Exception as exc:  # truncated or corrupt pixel data
        raise ImageRejected(400, f"the image cannot be decoded: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    return img


def image_root(paths) -> Path | None:
    """The deepest folder holding every indexed file (resolved): thumbnails are served only from inside it, so an
    indexed symlink that points elsewhere is refused."""
    parents = {os.path.dirname(os.path.abspath(p)) for p in paths if p}
    if not parents:
        return None
    return Path(os.path.commonpath(sorted(parents))).resolve()


class Thumbnails:
    """JPEG thumbnails of indexed files by row, made on first request and kept in a small LRU cache."""

    def __init__(self, paths: list[str | None], *, size: int = 256, cache: int = 1024, max_pixels: int = 100_000_000):
        self.paths, self.size, self.max_pixels = paths, size, max_pixels
        self.root = image_root(paths)
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._capacity = cache
        self._lock = threading.Lock()

    def safe_path(self, row: int) -> Path | None:
        """The row's file if it exists and resolves to a regular file inside the image root, else None."""
        p = self.paths[row] if 0 <= row < len(self.paths) else None
        if not p or self.root is None:
            return None
        try:
            real = Path(p).resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        if not real.is_file() or not real.is_relative_to(self.root):
            return None
        return real

    def get(self, row: int) -> bytes | None:
        with self._lock:
            if row in self._cache:
                self._cache.move_to_end(row)
                return self._cache[row]
        path = self.safe_path(row)
        if path is None:
            return None
        try:
            img = decode_upload(path.read_bytes(), max_pixels=self.max_pixels)
        except (OSError, ImageRejected):
            return None
        img.thumbnail((self.size, self.size))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        data = buf.getvalue()
        with self._lock:
            self._cache[row] = data
            while len(self._cache) > self._capacity:
                self._cache.popitem(last=False)
        return data
