"""Promptable segmentation: points (with SAM's labels) on an image -> a mask.

* :class:`PromptableSegmenter`: the protocol a point-prompted segmenter meets (SAM's prompt convention: ``(x, y)``
  pixel coordinates, label ``1`` foreground, ``0`` background, ``-1`` a point to ignore);
* :class:`PointSegmenter`: a small stand-in trained here on synthetic scenes (points -> the mask of the object(s)
  under the positive points). A few thousand parameters of convolutions on 64 px images; the points enter as two
  Gaussian heat-map channels (positives, negatives) next to the RGB channels. It is no SAM: it knows the synthetic
  world's flat-coloured shapes and nothing else, which is what the methods that hand it points need to be compared.
* :func:`train_point_segmenter`, :meth:`PointSegmenter.save` / :meth:`PointSegmenter.load` (``model.safetensors``
  + ``config.json``; loading never unpickles code).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..data.synthetic import SceneWorld

__all__ = ["PromptableSegmenter", "PointSegmenterConfig", "PointSegmenter", "point_heatmaps", "image_tensor",
           "train_point_segmenter", "sample_point_prompts"]

IGNORE_POINT = -1  # SAM's label for a padding point


@runtime_checkable
class PromptableSegmenter(Protocol):
    """``predict(images [B, 3, H, W] float in [0, 1], points [B, P, 2] (x, y) pixels, labels [B, P] in {1, 0, -1})
    -> [B, H, W]`` foreground probabilities. Points with label ``-1`` are ignored (SAM's padding)."""

    def predict(self, images: torch.Tensor, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...


def image_tensor(images) -> torch.Tensor:
    """PIL images (or one) -> ``[B, 3, H, W]`` float in ``[0, 1]``."""
    images = images if isinstance(images, (list, tuple)) else [images]
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def point_heatmaps(points: torch.Tensor, labels: torch.Tensor, size: tuple[int, int], sigma: float) -> torch.Tensor:
    """``[B, 2, H, W]``: per pixel, the max over positive (channel 0) / negative (channel 1) points of
    ``exp(-d^2 / 2 sigma^2)``; ignored points (label -1) contribute nothing."""
    h, w = size
    ys = torch.arange(h, dtype=torch.float32).view(1, 1, h, 1) + 0.5
    xs = torch.arange(w, dtype=torch.float32).view(1, 1, 1, w) + 0.5
    px = points[..., 0].float().view(*points.shape[:2], 1, 1) + 0.5  # point (x, y) sits at pixel centre x + 0.5
    py = points[..., 1].float().view(*points.shape[:2], 1, 1) + 0.5
    g = torch.exp(-((xs - px) ** 2 + (ys - py) ** 2) / (2 * sigma**2))  # [B, P, H, W]
    lab = labels.view(*labels.shape[:2], 1, 1)
    pos = (g * (lab == 1)).amax(1, keepdim=True) if points.shape[1] else torch.zeros(points.shape[0], 1, h, w)
    neg = (g * (lab == 0)).amax(1, keepdim=True) if points.shape[1] else torch.zeros(points.shape[0], 1, h, w)
    return torch.cat([pos, neg], dim=1)


@dataclass
class PointSegmenterConfig:
    image_size: int = 64
    channels: int = 24  # at half resolution
    fine_channels: int = 12  # at full resolution
    sigma: float = 1.5  # point heat-map width in pixels
    dilations: tuple[int, ...] = (1, 2, 4)

    @classmethod
    def from_dict(cls, d: dict) -> "PointSegmenterConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown PointSegmenter config keys {unknown}; known: {sorted(known)}")
        d = dict(d)
        if "dilations" in d:
            d["dilations"] = tuple(d["dilations"])
        return cls(**d)


class PointSegmenter(nn.Module):
    """RGB + point heat-maps -> mask logits: a full-resolution conv, a stride-2 conv, dilated convs at half resolution
    (receptive field past the largest synthetic object), upsampling and a skip from the full-resolution features."""

    def __init__(self, config: PointSegmenterConfig | None = None):
        super().__init__()
        self.config = config = config or PointSegmenterConfig()
        c, f = config.channels, config.fine_channels
        self.inp = nn.Sequential(nn.Conv2d(5, f, 3, padding=1), nn.GELU())
        self.down = nn.Sequential(nn.Conv2d(f, c, 3, stride=2, padding=1), nn.GELU())
        self.context = nn.ModuleList(nn.Conv2d(c, c, 3, padding=d, dilation=d) for d in config.dilations)
        # 1x1 at full resolution: the expensive part of a conv net on 2 CPU cores is a 3x3 at 64 px
        self.fuse = nn.Sequential(nn.Conv2d(f + c, f, 1), nn.GELU(), nn.Conv2d(f, 1, 1))

    def forward(self, images: torch.Tensor, heatmaps: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] and ``[B, 2, H, W]`` -> ``[B, H, W]`` logits."""
        full = self.inp(torch.cat([images * 2 - 1, heatmaps], dim=1))
        x = self.down(full)
        for conv in self.context:
            x = x + F.gelu(conv(x))
        x = F.interpolate(x, size=full.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([full, x], dim=1))[:, 0]

    @torch.no_grad()
    def predict(self, images: torch.Tensor, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] in [0, 1], got {tuple(images.shape)}")
        if points.shape[:2] != labels.shape or points.shape[-1] != 2 or points.shape[0] != images.shape[0]:
            raise ValueError(f"points [B, P, 2] and labels [B, P] expected for {images.shape[0]} images, got "
                             f"{tuple(points.shape)} and {tuple(labels.shape)}")
        heat = point_heatmaps(points, labels, tuple(images.shape[-2:]), self.config.sigma)
        return torch.sigmoid(self(images.float(), heat))

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, directory / "model.safetensors")
        (directory / "config.json").write_text(json.dumps({"kind": "point_segmenter",
                                                           "config": asdict(self.config)}, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "PointSegmenter":
        directory = Path(directory)
        meta_path, weights = directory / "config.json", directory / "model.safetensors"
        if not meta_path.is_file() or not weights.is_file():
            raise ValueError(f"{directory}: a point segmenter needs config.json and model.safetensors "
                             "(written by PointSegmenter.save)")
        meta = json.loads(meta_path.read_text())
        if meta.get("kind") != "point_segmenter":
            raise ValueError(f"{meta_path}: kind {meta.get('kind')!r}, expected 'point_segmenter'")
        model = cls(PointSegmenterConfig.from_dict(meta["config"]))
        model.load_state_dict(load_file(str(weights)))
        return model.eval()


def sample_point_prompts(mask: np.ndarray, rng: np.random.Generator, max_pos: int = 6, max_neg: int = 6,
                         max_ignored: int = 4, pad_to: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Training prompts for a target mask: 1..max_pos points inside it, 0..max_neg outside, some label -1 points
    anywhere, shuffled and padded with -1 points to ``pad_to``."""
    inside, outside = np.argwhere(mask), np.argwhere(~mask)
    n_pos = int(rng.integers(1, max_pos + 1))
    n_neg = int(rng.integers(0, max_neg + 1)) if len(outside) else 0
    n_ign = int(rng.integers(0, max_ignored + 1))
    rows = [inside[rng.integers(0, len(inside), n_pos)], outside[rng.integers(0, len(outside), n_neg)]
            if n_neg else np.zeros((0, 2), int), rng.integers(0, mask.shape[0], (n_ign, 2))]
    yx = np.concatenate(rows)[:pad_to]
    labels = np.array([1] * n_pos + [0] * n_neg + [IGNORE_POINT] * n_ign)[:pad_to]
    order = rng.permutation(len(yx))
    pts = np.zeros((pad_to, 2), np.float32)
    lab = np.full(pad_to, IGNORE_POINT, np.int64)
    pts[: len(yx)] = yx[order][:, ::-1] + rng.uniform(-0.5, 0.5, (len(yx), 2))  # (x, y), sub-pixel jitter
    lab[: len(yx)] = labels[order]
    return pts, lab


def _example(world: SceneWorld, index: int, rng: np.random.Generator, by: str):
    """One training example: the image, the union mask of the objects sharing a random object's class, prompts."""
    scene = world.sample(index)
    k = int(rng.integers(len(scene.objects)))
    value = getattr(scene.objects[k], by)
    mask = np.zeros((scene.image_size, scene.image_size), bool)
    for obj, m in zip(scene.objects, scene.masks):
        if getattr(obj, by) == value:
            mask |= m
    if not mask.any():  # a fully occluded object: take the most visible one instead
        mask = max(scene.masks, key=lambda m: m.sum())
    pts, lab = sample_point_prompts(mask, rng)
    return scene.image, mask, pts, lab


def train_point_segmenter(world: SceneWorld | None = None, steps: int = 600, batch_size: int = 32, lr: float = 3e-3,
                          seed: int = 0, config: PointSegmenterConfig | None = None, n_scenes: int = 4000,
                          by: str = "colour", log_every: int = 0) -> PointSegmenter:
    """Train a :class:`PointSegmenter` on scenes ``0 .. n_scenes-1`` of ``world`` (AdamW, cosine decay, BCE + soft
    Dice). A target is the union of the visible masks of the objects that share one random object's ``by``
    attribute ("the red things"); its prompts come from :func:`sample_point_prompts`."""
    if by not in ("colour", "shape"):
        raise ValueError(f"by must be 'colour' or 'shape', got {by!r}")
    world = world if world is not None else SceneWorld(image_size=64, seed=0)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = PointSegmenter(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    model.train()
    for step in range(steps):
        batch = [_example(world, int(rng.integers(n_scenes)), rng, by) for _ in range(batch_size)]
        images = image_tensor([b[0] for b in batch])
        target = torch.from_numpy(np.stack([b[1] for b in batch])).float()
        points = torch.from_numpy(np.stack([b[2] for b in batch]))
        labels = torch.from_numpy(np.stack([b[3] for b in batch]))
        logits = model(images, point_heatmaps(points, labels, tuple(images.shape[-2:]), model.config.sigma))
        prob = torch.sigmoid(logits)
        dice = 1 - (2 * (prob * target).sum((1, 2)) + 1) / (prob.sum((1, 2)) + target.sum((1, 2)) + 1)
        loss = F.binary_cross_entropy_with_logits(logits, target) + dice.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}: loss {loss.item():.4f}")
    return model.eval()


#: The stand-in shipped with cliplab: trained by experiments/read_sasp_train_segmenter.py on 64 px synthetic scenes.
SHIPPED_SEGMENTER = Path(__file__).parent / "pretrained" / "point-seg-64"


def load_point_segmenter(directory: str | Path | None = None) -> "PointSegmenter":
    """A saved :class:`PointSegmenter` (default: the shipped stand-in), in eval mode."""
    return PointSegmenter.load(SHIPPED_SEGMENTER if directory is None else directory).eval()
