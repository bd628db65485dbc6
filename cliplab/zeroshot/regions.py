"""Image regions for region-aware matching: the :class:`RegionProposer` protocol and two proposers.

A region proposer turns one image into a list of :class:`Region` (a pixel box, optionally a pixel mask, a label and
a score). It stands in for the detector of region-aware methods (ComCLIP uses GRiT dense captions):

* :class:`SceneRegionProposer`: the synthetic world's ground truth: one region per object, box and visible-pixel
  mask from the renderer, labelled with the object's shape (what a detector would name; never its colour, size or
  texture, which are what the caption must be checked against). Takes a
  :class:`~cliplab.data.synthetic.Scene` (anything with ``objects`` and ``masks``).
* :class:`GridRegionProposer`: a generic fallback for free images: a ``rows x cols`` grid of (optionally
  overlapping) unlabelled crops, so a method can still pick the best-matching region by similarity.

A proposer is any callable ``image -> list[Region]``; :func:`propose_regions` maps one over a list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

__all__ = ["Region", "RegionProposer", "SceneRegionProposer", "GridRegionProposer", "propose_regions",
           "image_size_of"]


@dataclass(frozen=True, eq=False)
class Region:
    """``box``: pixel box ``(x0, y0, x1, y1)``, x1/y1 exclusive; ``mask``: bool ``[H, W]`` of the whole image (or
    ``None``: the box is the region); ``label``: what the region shows, when the proposer knows; ``score``: the
    proposer's confidence, when it has one."""

    box: tuple[int, int, int, int]
    mask: np.ndarray | None = None
    label: str | None = None
    score: float | None = None

    def keep(self, size: tuple[int, int], cutout: str = "box") -> np.ndarray:
        """Bool ``[H, W]`` (``size`` = ``(W, H)``) of the pixels this region keeps: its box (``cutout="box"``, as
        the paper blacks out everything outside the matched box) or its mask (``"mask"``; the box when it has
        none)."""
        w, h = size
        if cutout == "mask" and self.mask is not None:
            if self.mask.shape != (h, w):
                raise ValueError(f"region mask {self.mask.shape} does not match the image ({h}, {w})")
            return np.asarray(self.mask, dtype=bool)
        if cutout not in ("box", "mask"):
            raise ValueError(f"cutout must be 'box' or 'mask', got {cutout!r}")
        x0, y0, x1, y1 = (int(v) for v in self.box)
        out = np.zeros((h, w), dtype=bool)
        out[max(y0, 0): max(min(y1, h), 0), max(x0, 0): max(min(x1, w), 0)] = True
        return out


@runtime_checkable
class RegionProposer(Protocol):
    """``proposer(image) -> list[Region]``: the regions of one image."""

    def __call__(self, image: Any) -> list[Region]: ...


def image_size_of(image: Any) -> tuple[int, int]:
    """``(W, H)`` of a PIL image, an ``[H, W, C]`` array, or a synthetic scene."""
    if hasattr(image, "masks") and hasattr(image, "image_size"):
        return (int(image.image_size), int(image.image_size))
    if hasattr(image, "size") and not isinstance(image, np.ndarray):
        return tuple(image.size)  # type: ignore[return-value]
    arr = np.asarray(image)
    return (arr.shape[1], arr.shape[0])


class SceneRegionProposer:
    """Regions of a synthetic scene from its renderer: one per object with at least ``min_pixels`` visible pixels;
    box = the object's box clipped to the image, mask = its visible pixels, label = its shape, score 1."""

    def __init__(self, min_pixels: int = 1):
        self.min_pixels = int(min_pixels)

    def __call__(self, scene: Any) -> list[Region]:
        if not (hasattr(scene, "masks") and hasattr(scene, "objects")):
            raise ValueError("SceneRegionProposer needs a synthetic Scene (with objects and masks); for a plain "
                             "image use GridRegionProposer or a detector")
        s = int(scene.image_size)
        out = []
        for obj, mask in zip(scene.objects, scene.masks):
            if int(mask.sum()) < self.min_pixels:
                continue
            x0, y0, x1, y1 = obj.box
            box = (max(int(x0), 0), max(int(y0), 0), min(int(x1), s), min(int(y1), s))
            out.append(Region(box, np.asarray(mask, dtype=bool), obj.shape, 1.0))
        return out


class GridRegionProposer:
    """A ``rows x cols`` grid of unlabelled boxes; ``overlap`` (a fraction of a cell) widens each cell on every side
    so that an object on a cell border is still inside one region."""

    def __init__(self, rows: int = 2, cols: int = 2, overlap: float = 0.25):
        if rows < 1 or cols < 1:
            raise ValueError(f"rows and cols must be >= 1, got {rows}x{cols}")
        if overlap < 0:
            raise ValueError(f"overlap must be >= 0, got {overlap}")
        self.rows, self.cols, self.overlap = int(rows), int(cols), float(overlap)

    def __call__(self, image: Any) -> list[Region]:
        w, h = image_size_of(image)
        cw, ch = w / self.cols, h / self.rows
        out = []
        for r in range(self.rows):
            for c in range(self.cols):
                # rounded edges: neighbouring cells share an edge exactly, so overlap=0 tiles the image
                x0 = int(round(max(0.0, (c - self.overlap) * cw)))
                y0 = int(round(max(0.0, (r - self.overlap) * ch)))
                x1 = int(round(min(float(w), (c + 1 + self.overlap) * cw)))
                y1 = int(round(min(float(h), (r + 1 + self.overlap) * ch)))
                out.append(Region((x0, y0, x1, y1)))
        return out


def propose_regions(proposer: RegionProposer, images: Sequence[Any]) -> list[list[Region]]:
    """``proposer`` applied to every image, in order."""
    return [list(proposer(im)) for im in images]
