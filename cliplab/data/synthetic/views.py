"""Lazy dataset views of a scene world: ``(PIL image, caption)`` sequences and image folders on disk.

Written against :mod:`.protocols` (anything with ``sample(index)``), so :class:`SceneWorld` can offer them as methods
without this module importing it.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence

from .protocols import CaptionedScene, SceneSource

__all__ = ["SceneDataset", "write_image_folder"]


class SceneDataset(Sequence):
    """Lazy ``(PIL image, caption)`` view of scenes ``offset .. offset+n-1``."""

    def __init__(self, world: SceneSource, n: int, offset: int = 0, caption: str = "short") -> None:
        if caption not in ("short", "long"):
            raise ValueError("caption must be 'short' or 'long'")
        self.world, self.n, self.offset, self.caption = world, int(n), int(offset), caption

    def __len__(self) -> int:
        return self.n

    def scene(self, i: int) -> CaptionedScene:
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.world.sample(self.offset + i)

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(self.n)
            if step != 1:
                return [self[j] for j in range(start, stop, step)]
            return SceneDataset(self.world, max(0, stop - start), self.offset + start, self.caption)
        scene = self.scene(i)
        text = scene.short_caption if self.caption == "short" else scene.long_caption
        return scene.render(), text


def write_image_folder(world: SceneSource, directory: str | os.PathLike, n: int, offset: int = 0) -> str:
    """Write scenes ``offset .. offset+n-1`` as ``{index:07d}.png`` into
    ``directory`` plus ``captions.csv`` (columns image, caption, long_caption;
    image paths relative to ``directory``).  Returns the CSV path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "captions.csv")
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption", "long_caption"])
        for i in range(offset, offset + n):
            scene = world.sample(i)
            name = f"{i:07d}.png"
            scene.image.save(os.path.join(directory, name))
            writer.writerow([name, scene.short_caption, scene.long_caption])
    return path
