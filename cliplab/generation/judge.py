"""``SceneJudge``: scores whether a generated image shows its prompt's objects, colours and bindings.

The synthetic world knows the truth, so the judge is a small CNN trained here on clean renders of
:class:`GenerationScenes` (with noise and blur, so it reads imperfect samples) to say, for every (colour, shape) pair,
whether an object of that colour and shape is in the image. A prompt with ``k`` objects is judged by the ``k`` most
likely pairs: **binding** is right when they are exactly the prompt's pairs; **colours**/**shapes** are the fractions
of the prompt's colours/shapes found among them (a sample with a blue circle for "a red circle and a blue square" has
the colours and shapes right and the binding wrong).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..progress import Progress
from .scenes import GEN_COLOURS, GEN_SHAPES, GenerationScenes, Pair, SceneSpec

__all__ = ["SceneJudge", "train_judge", "JudgeScores"]

JudgeScores = dict[str, float]


class SceneJudge(nn.Module):
    def __init__(self, colours: Sequence[str] = GEN_COLOURS, shapes: Sequence[str] = GEN_SHAPES,
                 image_size: int = 32, width: int = 32) -> None:
        super().__init__()
        self.colours, self.shapes, self.image_size, self.width = tuple(colours), tuple(shapes), image_size, width
        w = width
        layers, cin = [], 3
        for cout, stride in ((w, 1), (2 * w, 2), (4 * w, 2), (4 * w, 2)):
            layers += [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(cin * (image_size // 8) ** 2, 256), nn.ReLU(),
                                  nn.Linear(256, len(self.colours) * len(self.shapes)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, colours, shapes]`` for images ``[B, 3, S, S]`` in [0, 1]."""
        if images.shape[-1] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="area")
        return self.head(self.features(images * 2 - 1)).view(-1, len(self.colours), len(self.shapes))

    def labels(self, specs: Sequence[SceneSpec | Sequence[Pair]]) -> torch.Tensor:
        y = torch.zeros(len(specs), len(self.colours), len(self.shapes))
        for i, spec in enumerate(specs):
            for c, s in _pairs(spec):
                y[i, self.colours.index(c), self.shapes.index(s)] = 1
        return y

    @torch.no_grad()
    def top_pairs(self, images: torch.Tensor, k: int | Sequence[int]) -> list[set[Pair]]:
        """The ``k`` most likely (colour, shape) pairs of every image (one ``k`` for all, or one per image)."""
        self.eval()
        logits = self(images).flatten(1)
        ks = [k] * len(images) if isinstance(k, int) else list(k)
        out = []
        for row, kk in zip(logits, ks):
            idx = row.topk(kk).indices.tolist()
            out.append({(self.colours[i // len(self.shapes)], self.shapes[i % len(self.shapes)]) for i in idx})
        return out

    def score(self, images: torch.Tensor, specs: Sequence[SceneSpec | Sequence[Pair]], per_image: bool = False
              ) -> JudgeScores | dict[str, list[float]]:
        """Mean ``binding``, ``colours``, ``shapes`` over the images (lists with ``per_image=True``)."""
        if len(images) != len(specs):
            raise ValueError(f"{len(images)} images for {len(specs)} prompts")
        truth = [set(_pairs(s)) for s in specs]
        found = self.top_pairs(images, [len(t) for t in truth])
        rows = {"binding": [], "colours": [], "shapes": []}
        for t, f in zip(truth, found):
            rows["binding"].append(float(t == f))
            rows["colours"].append(len({c for c, _ in t} & {c for c, _ in f}) / len(t))
            rows["shapes"].append(len({s for _, s in t} & {s for _, s in f}) / len(t))
        if per_image:
            return rows
        return {k: sum(v) / len(v) for k, v in rows.items()}

    # -------------------------------------------------------------- save / load
    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(d / "judge.safetensors"))
        meta = {"format": "cliplab-scene-judge", "colours": self.colours, "shapes": self.shapes,
                "image_size": self.image_size, "width": self.width}
        (d / "judge.json").write_text(json.dumps(meta, indent=2) + "\n")
        return d

    @classmethod
    def load(cls, directory: str | Path) -> "SceneJudge":
        d = Path(directory)
        meta = json.loads((d / "judge.json").read_text())
        if meta.get("format") != "cliplab-scene-judge":
            raise ValueError(f"{d / 'judge.json'} is not a scene-judge file")
        judge = cls(meta["colours"], meta["shapes"], meta["image_size"], meta["width"])
        judge.load_state_dict(load_file(str(d / "judge.safetensors")))
        return judge.eval()


def _pairs(spec) -> tuple[Pair, ...]:
    return tuple(spec.pairs) if isinstance(spec, SceneSpec) else tuple(tuple(p) for p in spec)


def degrade(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Noise and blur of random strength per image: a judge trained on these reads soft generated samples."""
    b = images.shape[0]
    blur = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(b, 1, 1, 1, generator=generator)
    x = images * (1 - mix) + blur * mix
    x = x + torch.randn(x.shape, generator=generator) * 0.08 * torch.rand(b, 1, 1, 1, generator=generator)
    return x.clamp(0, 1)


def train_judge(scenes: GenerationScenes | None = None, steps: int = 1500, batch_size: int = 64, lr: float = 2e-3,
                n_images: int = 8000, seed: int = 0, width: int = 32, progress: bool | None = None) -> SceneJudge:
    """A judge trained on ``n_images`` renders of ``scenes`` (default: the generator world, seed 1000)."""
    scenes = scenes or GenerationScenes(seed=1000)
    torch.manual_seed(seed)
    judge = SceneJudge(scenes.colours, scenes.shapes, scenes.image_size, width)
    images, specs = scenes.tensors(n_images)
    labels = judge.labels(specs)
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    bar = Progress(steps, desc="judge", unit="step", enabled=progress)
    judge.train()
    for _ in range(steps):
        idx = torch.randint(0, n_images, (batch_size,), generator=gen)
        x = degrade(images[idx].float() / 255, gen)
        loss = F.binary_cross_entropy_with_logits(judge(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if bar.active:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            bar.update(1)
    bar.close()
    return judge.eval()
