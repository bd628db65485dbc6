"""``SceneJudge``: scores whether a generated image shows its prompt's objects, colours and bindings.

The synthetic world knows the truth, and in the generator's world every object of a scene has its own colour, so the
judge is a scene parser rather than a black box: every pixel is given the nearest of the world's colours (or the
grey background) when it is close enough; each prompt colour's largest connected region is its object; a small
classifier trained here on clean renders' regions (with noise, erosion and dilation, so it reads imperfect samples)
names the region's shape. A prompt of ``k`` objects is judged per object:

* **colours**: the fraction of the prompt's colours present (a region of at least ``min_area`` pixels);
* **shapes**: the fraction of the prompt's shapes found among the shapes of the regions of the prompt's colours;
* **binding**: 1 when every prompt colour is present *and* drawn as its own shape ("a red circle and a blue square"
  drawn as a blue circle and a red square has colours and shapes right and binding wrong).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from scipy import ndimage
from torch import nn

from ..data.synthetic import COLOURS
from ..progress import Progress
from .scenes import BACKGROUND, GEN_COLOURS, GEN_SHAPES, GenerationScenes, Pair, SceneSpec

__all__ = ["SceneJudge", "train_judge", "BACKGROUND_GREY"]

#: The generator world's background grey, in [0, 1].
BACKGROUND_GREY: float = BACKGROUND / 255


class SceneJudge(nn.Module):
    def __init__(self, colours: Sequence[str] = GEN_COLOURS, shapes: Sequence[str] = GEN_SHAPES, crop: int = 12,
                 max_distance: float = 0.35, min_area: int = 4) -> None:
        super().__init__()
        self.colours, self.shapes = tuple(colours), tuple(shapes)
        self.crop, self.max_distance, self.min_area = int(crop), float(max_distance), int(min_area)
        rgb = [[v / 255 for v in COLOURS[c]] for c in self.colours] + [[BACKGROUND_GREY] * 3]
        self.register_buffer("palette", torch.tensor(rgb), persistent=False)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(crop * crop, 96), nn.ReLU(),
                                        nn.Linear(96, len(self.shapes)))

    # -------------------------------------------------------------- parsing
    def colour_map(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, H, W]`` index of each pixel's nearest world colour, ``len(colours)`` for background, ``-1`` when
        no colour is within ``max_distance`` (Euclidean, RGB in [0, 1])."""
        px = images.permute(0, 2, 3, 1)[..., None, :]                        # [B, H, W, 1, 3]
        dist = (px - self.palette).norm(dim=-1)                             # [B, H, W, C+1]
        d, idx = dist.min(dim=-1)
        return torch.where(d <= self.max_distance, idx, torch.full_like(idx, -1))

    def region(self, cmap: torch.Tensor, colour: str) -> np.ndarray | None:
        """The largest connected region ``[H, W]`` (bool) of ``colour`` in one colour map, or None if too small."""
        m = (cmap == self.colours.index(colour)).cpu().numpy()
        labels, n = ndimage.label(m)
        if n == 0:
            return None
        sizes = ndimage.sum(m, labels, index=range(1, n + 1))
        best = int(np.argmax(sizes)) + 1
        return (labels == best) if sizes[best - 1] >= self.min_area else None

    def crop_region(self, mask: np.ndarray) -> torch.Tensor:
        """A region's bounding square, resized to ``crop x crop`` (area averaging): scale-free input for the
        shape classifier."""
        ys, xs = np.nonzero(mask)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        side = max(y1 - y0, x1 - x0)
        cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
        sy, sx = int(round(cy - side / 2)), int(round(cx - side / 2))
        padded = np.zeros((mask.shape[0] + 2 * side, mask.shape[1] + 2 * side), dtype=np.float32)
        padded[side:side + mask.shape[0], side:side + mask.shape[1]] = mask
        square = torch.from_numpy(padded[sy + side:sy + 2 * side, sx + side:sx + 2 * side].copy())
        return F.interpolate(square[None, None], size=(self.crop, self.crop), mode="area")[0, 0]

    @torch.no_grad()
    def parse(self, images: torch.Tensor) -> list[dict[str, str]]:
        """For every image, ``{colour: shape}`` of the world colours it shows."""
        self.eval()
        cmaps = self.colour_map(images)
        out = []
        for cmap in cmaps:
            found, crops = [], []
            for c in self.colours:
                r = self.region(cmap, c)
                if r is not None:
                    found.append(c)
                    crops.append(self.crop_region(r))
            shapes = self.classifier(torch.stack(crops)).argmax(-1).tolist() if crops else []
            out.append({c: self.shapes[s] for c, s in zip(found, shapes)})
        return out

    def score(self, images: torch.Tensor, specs: Sequence[SceneSpec | Sequence[Pair]], per_image: bool = False
              ) -> dict[str, float] | dict[str, list[float]]:
        """Mean ``binding``, ``colours``, ``shapes`` over the images (lists with ``per_image=True``)."""
        if len(images) != len(specs):
            raise ValueError(f"{len(images)} images for {len(specs)} prompts")
        rows = {"binding": [], "colours": [], "shapes": []}
        for spec, seen in zip(specs, self.parse(images)):
            pairs = _pairs(spec)
            present = [(c, s) for c, s in pairs if c in seen]
            drawn = {seen[c] for c, _ in pairs if c in seen}
            rows["colours"].append(len(present) / len(pairs))
            rows["shapes"].append(len({s for _, s in pairs} & drawn) / len(pairs))
            rows["binding"].append(float(all(seen.get(c) == s for c, s in pairs)))
        if per_image:
            return rows
        return {k: sum(v) / len(v) for k, v in rows.items()}

    # -------------------------------------------------------------- save / load
    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.classifier.state_dict().items()}, str(d / "judge.safetensors"))
        meta = {"format": "cliplab-scene-judge", "format_version": 2, "colours": self.colours, "shapes": self.shapes,
                "crop": self.crop, "max_distance": self.max_distance, "min_area": self.min_area}
        (d / "judge.json").write_text(json.dumps(meta, indent=2) + "\n")
        return d

    @classmethod
    def load(cls, directory: str | Path) -> "SceneJudge":
        d = Path(directory)
        meta = json.loads((d / "judge.json").read_text())
        if meta.get("format") != "cliplab-scene-judge" or meta.get("format_version") != 2:
            raise ValueError(f"{d / 'judge.json'} is not a version-2 scene-judge file")
        judge = cls(meta["colours"], meta["shapes"], meta["crop"], meta["max_distance"], meta["min_area"])
        judge.classifier.load_state_dict(load_file(str(d / "judge.safetensors")))
        return judge.eval()


def _pairs(spec) -> tuple[Pair, ...]:
    return tuple(spec.pairs) if isinstance(spec, SceneSpec) else tuple(tuple(p) for p in spec)


def degrade(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A third of the images as they are, a third blurred (3x3 box, random strength), a third with pixel noise:
    the soft edges and speckle of generated samples, so the classifier learns their regions' shapes too."""
    kind = torch.randint(0, 3, (len(images),), generator=generator)[:, None, None, None]
    w = 0.3 + 0.7 * torch.rand(len(images), 1, 1, 1, generator=generator)
    blurred = images * (1 - w) + F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, 1) * w
    noisy = images + torch.randn(images.shape, generator=generator) * 0.1 * w
    return torch.where(kind == 1, blurred, torch.where(kind == 2, noisy, images)).clamp(0, 1)


def _augment(crops: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Erosion or dilation (3x3 min/max pool) on a third each, plus pixel noise: regions of imperfect samples."""
    x = crops[:, None]
    kind = torch.randint(0, 3, (len(x),), generator=generator)
    dil = F.max_pool2d(x, 3, 1, 1)
    ero = -F.max_pool2d(-x, 3, 1, 1)
    x = torch.where((kind == 1)[:, None, None, None], dil, torch.where((kind == 2)[:, None, None, None], ero, x))
    x = x + torch.randn(x.shape, generator=generator) * 0.1
    return x[:, 0]


def train_judge(scenes: GenerationScenes | None = None, steps: int = 600, batch_size: int = 128, lr: float = 3e-3,
                n_images: int = 2000, seed: int = 0, progress: bool | None = None) -> SceneJudge:
    """A judge whose shape classifier is trained on the regions of ``n_images`` clean renders of ``scenes``
    (default: the generator world, seed 1000), found by the judge's own parser."""
    scenes = scenes or GenerationScenes(seed=1000)
    torch.manual_seed(seed)
    judge = SceneJudge(scenes.colours, scenes.shapes)
    crops, labels = [], []
    images, specs = scenes.batch(range(n_images))
    gen = torch.Generator().manual_seed(seed)
    for cmap, spec in zip(judge.colour_map(degrade(images, gen)), specs):
        for c, s in spec.pairs:
            r = judge.region(cmap, c)
            if r is not None:
                crops.append(judge.crop_region(r))
                labels.append(judge.shapes.index(s))
    crops, labels = torch.stack(crops), torch.tensor(labels)
    opt = torch.optim.AdamW(judge.classifier.parameters(), lr=lr, weight_decay=1e-4)
    bar = Progress(steps, desc="judge", unit="step", enabled=progress)
    judge.train()
    for _ in range(steps):
        idx = torch.randint(0, len(crops), (batch_size,), generator=gen)
        loss = F.cross_entropy(judge.classifier(_augment(crops[idx], gen)), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if bar.active:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            bar.update(1)
    bar.close()
    return judge.eval()
