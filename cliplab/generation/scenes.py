"""The generator's world: synthetic scenes of 1-3 large plain objects on a plain grey background, drawn at 64 px and
box-downsampled, with a prompt that names every object's colour and shape ("a red circle and a blue square").

Objects of one scene have distinct shapes and distinct colours, so a prompt's binding (which colour goes with which
shape) is unambiguous and a judge can score it. Objects sit in fixed slots (``SLOTS``: one object in the centre, two
side by side, three in a triangle, in the prompt's order) with a little jitter: a layout convention that leaves the
generator only the objects themselves to learn, which a small model on a CPU budget can (with free positions, sizes
and backgrounds it learned colours but not shapes in the same compute; docs/generation.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..data.synthetic import COLOURS, SceneWorld
from ..data.synthetic.vocabulary import article

__all__ = ["GEN_SHAPES", "GEN_COLOURS", "SLOTS", "BACKGROUND", "SceneSpec", "GenerationScenes", "prompt_for", "render_spec"]

#: Shapes the shipped generator draws: the four that stay distinct at 32 px.
GEN_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
GEN_COLOURS: tuple[str, ...] = tuple(COLOURS)

#: Object centres as fractions of the image side, by object count (in the prompt's order).
SLOTS: dict[int, tuple[tuple[float, float], ...]] = {
    1: ((0.5, 0.5),),
    2: ((0.27, 0.5), (0.73, 0.5)),
    3: ((0.25, 0.28), (0.75, 0.28), (0.5, 0.74)),
}
#: The scene background's grey level (the world's default).
BACKGROUND: int = 120
JITTER: float = 0.04  # of the image side, each axis

Pair = tuple[str, str]  # (colour, shape)


def prompt_for(pairs: list[Pair] | tuple[Pair, ...]) -> str:
    """``[("red", "circle"), ("blue", "square")]`` -> ``"a red circle and a blue square"``."""
    if not pairs:
        raise ValueError("a prompt needs at least one (colour, shape) pair")
    return " and ".join(f"{article(c)} {c} {s}" for c, s in pairs)


@dataclass(frozen=True)
class SceneSpec:
    prompt: str
    pairs: tuple[Pair, ...]


class GenerationScenes:
    """Seeded scenes for training and judging generators: ``scenes[i]`` -> ``(image [3, S, S] in [0, 1], spec)``.

    ``counts``: how many objects a scene may have, ``weights`` the chance of each count."""

    def __init__(self, image_size: int = 32, seed: int = 0, counts: tuple[int, ...] = (1, 2, 3),
                 weights: tuple[float, ...] | None = (0.3, 0.45, 0.25), shapes: tuple[str, ...] = GEN_SHAPES,
                 colours: tuple[str, ...] = GEN_COLOURS, render_size: int = 64) -> None:
        if render_size % image_size:
            raise ValueError("render_size must be a multiple of image_size")
        if max(counts) > min(len(shapes), len(colours)):
            raise ValueError("more objects than distinct shapes/colours")
        self.image_size, self.seed, self.render_size = image_size, seed, render_size
        self.counts = tuple(counts)
        w = np.ones(len(counts)) if weights is None else np.asarray(weights, dtype=float)
        if len(w) != len(self.counts):
            raise ValueError("one weight per count")
        self._cdf = np.cumsum(w / w.sum())
        self.shapes, self.colours = tuple(shapes), tuple(colours)
        self._worlds = {n: SceneWorld(render_size, seed * 10 + n, min_objects=n, max_objects=n, shapes=shapes,
                                      colours=colours, sizes=("large",), textures=("plain",),
                                      clutter_prob=0.0, word_prob=0.0, repeat_prob=0.0,
                                      brightness_probs={"normal": 1.0}) for n in self.counts}

    def count(self, index: int) -> int:
        u = np.random.default_rng([self.seed, index, 7]).random()
        return self.counts[int(np.searchsorted(self._cdf, u, side="right").clip(max=len(self.counts) - 1))]

    def scene(self, index: int, count: int | None = None):
        n = self.count(index) if count is None else count
        world = self._worlds[n]
        for k in range(1000):  # the first draw of the stream whose objects have distinct shapes and colours
            s = world.sample(index + k * 10_000_019)
            if len({o.shape for o in s.objects}) == n and len({o.colour for o in s.objects}) == n:
                return self._in_slots(s, index)
        raise RuntimeError("no scene with distinct shapes and colours found")  # pragma: no cover

    def _in_slots(self, scene, index: int):
        """The scene's objects moved to their slots (with jitter), on the plain background."""
        rng = np.random.default_rng([self.seed, index, 11])
        side = self.render_size
        objects = []
        for obj, (fx, fy) in zip(scene.objects, SLOTS[len(scene.objects)]):
            dx, dy = rng.uniform(-JITTER, JITTER, size=2)
            objects.append(obj.moved((fx + dx) * side, (fy + dy) * side))
        return scene.replace(objects=tuple(objects), background=BACKGROUND, clutter=False, word=None)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, SceneSpec]:
        s = self.scene(index)
        pairs = tuple((o.colour, o.shape) for o in s.objects)
        return self._pixels(s.render()), SceneSpec(prompt_for(pairs), pairs)

    def _pixels(self, img: Image.Image) -> torch.Tensor:
        img = img.convert("RGB").resize((self.image_size, self.image_size), Image.BOX)
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()

    def batch(self, indices) -> tuple[torch.Tensor, list[SceneSpec]]:
        items = [self[int(i)] for i in indices]
        return torch.stack([x for x, _ in items]), [s for _, s in items]

    def tensors(self, n: int, start: int = 0) -> tuple[torch.Tensor, list[SceneSpec]]:
        """Images ``[n, 3, S, S]`` as uint8 (compact for caching) and their specs, scenes ``start .. start+n-1``."""
        images, specs = self.batch(range(start, start + n))
        return (images * 255).round().to(torch.uint8), specs


def render_spec(pairs: list[Pair], image_size: int = 32, seed: int = 0, render_size: int = 64) -> torch.Tensor:
    """A clean render ``[3, S, S]`` of the given pairs (random sizes/positions from ``seed``), for references."""
    scenes = GenerationScenes(image_size, seed, counts=(len(pairs),), weights=None, render_size=render_size)
    s = scenes.scene(0)
    objs = tuple(o.with_attrs(render_size, colour=c, shape=sh) for o, (c, sh) in zip(s.objects, pairs))
    return scenes._pixels(s.replace(objects=objs).render())
