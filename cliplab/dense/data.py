"""Segmentation samples: an image and its per-pixel class labels (``0`` is background, ``k >= 1`` the class
``classes[k]``; ``IGNORE`` marks pixels no metric counts).

* :class:`SyntheticSegmentation`: scenes of the synthetic world, labelled by each object's shape or colour from the
  renderer's exact visible-pixel masks (occlusion applied). Pure function of ``(world seed, index)``.
* :class:`FolderSegmentation`: ``NAME.png|jpg`` + ``NAME.mask.png`` pairs in a folder (the mask's pixel values are
  class indices) with ``classes.txt`` (one class name per line, the first being the background's name).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.synthetic import SceneWorld

__all__ = ["BACKGROUND", "IGNORE", "SegmentationSample", "SyntheticSegmentation", "FolderSegmentation"]

BACKGROUND = "background"
IGNORE = 255  # label value excluded from every metric
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MASK_SUFFIX = ".mask.png"


@dataclass
class SegmentationSample:
    """``image`` (RGB PIL), ``label`` ``int64 [H, W]`` (0 background, k -> ``classes[k]``, ``IGNORE`` not scored),
    ``classes`` (``classes[0]`` is the background), and ``scene`` for synthetic samples (boxes, attributes)."""

    image: Image.Image
    label: np.ndarray
    classes: tuple[str, ...]
    scene: object | None = None
    name: str = ""

    def boxes(self) -> list[tuple[int, tuple[int, int, int, int]]]:
        """``(class index, (x0, y0, x1, y1))`` of each labelled region's bounding box (x1/y1 exclusive); for a
        synthetic sample, one per visible object."""
        out = []
        if self.scene is not None:
            for k, mask in enumerate(self.scene.masks):
                ys, xs = np.nonzero(mask)
                if len(xs):
                    out.append((int(self.label[ys[0], xs[0]]), (int(xs.min()), int(ys.min()), int(xs.max()) + 1,
                                                                 int(ys.max()) + 1)))
            return out
        for c in np.unique(self.label):
            if c in (0, IGNORE):
                continue
            ys, xs = np.nonzero(self.label == c)
            out.append((int(c), (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)))
        return out


class SyntheticSegmentation(Sequence):
    """Scenes ``offset .. offset + n - 1`` of ``world`` labelled by ``by`` (``"shape"`` or ``"colour"``).

    ``classes`` is ``("background", *world.shapes)`` (or colours); a pixel's label is the class of the object visible
    there. Text labels for the classes are their names ("circle", "red"), as the synthetic captions use them."""

    def __init__(self, world: SceneWorld | None = None, n: int = 100, offset: int = 0, by: str = "shape"):
        if by not in ("shape", "colour"):
            raise ValueError(f"by must be 'shape' or 'colour', got {by!r}")
        self.world = world if world is not None else SceneWorld(image_size=64, seed=0)
        self.n, self.offset, self.by = int(n), int(offset), by
        names = self.world.shapes if by == "shape" else self.world.colours
        self.classes = (BACKGROUND, *names)
        self._index = {name: k for k, name in enumerate(self.classes)}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> SegmentationSample:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(i)
        scene = self.world.sample(self.offset + i)
        label = np.zeros((scene.image_size, scene.image_size), dtype=np.int64)
        for obj, mask in zip(scene.objects, scene.masks):
            label[mask] = self._index[getattr(obj, self.by)]
        return SegmentationSample(scene.image, label, self.classes, scene, name=f"scene-{self.offset + i}")


class FolderSegmentation(Sequence):
    """Image + mask pairs in ``directory`` (see the module docstring). A missing ``classes.txt``, an image without
    its mask, a mask of another size or a class index past ``classes.txt`` is a one-line ``ValueError``."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        listing = self.directory / "classes.txt"
        if not listing.is_file():
            raise ValueError(f"{self.directory}: no classes.txt (one class name per line, background first)")
        self.classes = tuple(line.strip() for line in listing.read_text(encoding="utf-8").splitlines() if line.strip())
        if len(self.classes) < 2:
            raise ValueError(f"{listing}: needs the background and at least one class")
        self.images = sorted(p for p in self.directory.iterdir()
                             if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.endswith(MASK_SUFFIX))
        missing = [p for p in self.images if not self._mask_path(p).is_file()]
        if missing:
            raise ValueError(f"{self.directory}: {len(missing)} image(s) without a mask (e.g. {missing[0].name} needs "
                             f"{self._mask_path(missing[0]).name})")
        if not self.images:
            raise ValueError(f"{self.directory}: no image + mask pairs (NAME.png with NAME{MASK_SUFFIX})")

    @staticmethod
    def _mask_path(image: Path) -> Path:
        return image.with_name(image.stem + MASK_SUFFIX)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> SegmentationSample:
        path = self.images[i]
        image = Image.open(path).convert("RGB")
        label = np.asarray(Image.open(self._mask_path(path)), dtype=np.int64)
        if label.ndim != 2 or label.shape != (image.height, image.width):
            raise ValueError(f"{self._mask_path(path)}: mask of shape {label.shape}, image is "
                             f"{image.height}x{image.width} (a one-channel mask of the same size is expected)")
        bad = np.unique(label[(label >= len(self.classes)) & (label != IGNORE)])
        if len(bad):
            raise ValueError(f"{self._mask_path(path)}: class index {int(bad[0])} past classes.txt's "
                             f"{len(self.classes)} classes")
        return SegmentationSample(image, label, self.classes, None, name=path.name)
