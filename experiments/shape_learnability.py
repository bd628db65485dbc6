"""How fast can an image encoder learn *shape* in the synthetic world? Supervised, single-object scenes.

A plain ViT trained from scratch with the contrastive recipe learned colour perfectly but shape barely (19.5% zero-shot,
chance 12.5%). This experiment separates the objective from the architecture: it trains image encoders with plain
cross-entropy on the shape label of single-object scenes (8 shapes, chance 12.5%) and prints held-out accuracy as
training goes on (AdamW, linear warm-up over 30 steps, gradient clipping at 1.0).

* ``cnn``: a 3-layer convolutional net with global max pooling (the shape-biased baseline);
* ``vit``: the plain CLIP ViT of the first default model, ``shapes-tiny-plain`` (64 px, patch 8, width 192, 6 layers,
  CLS pooling) + a linear head;
* ``vit-stem``: the same ViT with a convolutional stem (architecture ``shapes-tiny-stem``, :mod:`cliplab.models.stem`);
* ``cnn-avgpool``: the CNN with a global average pool instead of the max pool;
* ``cnn-attnpool``: the CNN's feature map with ModifiedResNet-style attention pooling instead of the max pool;
* ``vit-stem-maxpool``: the stem ViT read out by a max over its projected patch tokens instead of CLS;
* ``vit-stem-maxskip``: the stem ViT's CLS output plus a linear map of a global max over its stem features
  (``vision.stem_max_skip``, the architecture of the shipped ``shapes-tiny``);
* ``hf-vit``: `transformers`' CLIPVisionModel of the plain ViT's configuration (to rule out a bug in our tower).

    python experiments/shape_learnability.py [--models cnn,vit,vit-stem,hf-vit] [--steps 300] [--batch 64]

Results: docs/training.md ("Shape: what was tried").
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

import cliplab
from cliplab.data import SceneWorld
from cliplab.data.synthetic.vocabulary import SHAPES
from cliplab.train.data import _normalise_uint8


def small_cnn(pool: type = nn.AdaptiveMaxPool2d) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), pool(1), nn.Flatten(), nn.Linear(128, 8))


class MaxPooledTokens(nn.Module):
    """A vision tower read out by a max over its projected patch tokens instead of CLS (not a CLIP pooling)."""

    def __init__(self, visual):
        super().__init__()
        self.visual = visual

    def forward(self, x):
        v = self.visual
        t = v.ln_post(v.transformer(v.ln_pre(v.embed_patches(x) + v.pos_embed)))
        return v.proj(t[:, 1:]).amax(1)


class AttentionPooledCNN(nn.Module):
    """The 3-layer CNN's feature map (16x16, before its global max pool) pooled the way OpenAI's ModifiedResNet (the
    RN50 CLIP family) pools: one multi-head attention whose query is the mean feature, over the mean and every
    position, each with a learned positional embedding. A sketch for choosing the next image tower, not library code.
    """

    def __init__(self, width: int = 128, heads: int = 4, grid: int = 16):
        super().__init__()
        self.features = nn.Sequential(*list(small_cnn())[:8])  # conv/ReLU/pool x2, conv/ReLU: [B, 128, 16, 16]
        self.pos = nn.Parameter(torch.randn(grid * grid + 1, width) / width**0.5)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.head = nn.Linear(width, len(SHAPES))

    def forward(self, x):
        f = self.features(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        f = torch.cat([f.mean(1, keepdim=True), f], dim=1) + self.pos
        pooled, _ = self.attn(f[:, :1], f, f, need_weights=False)
        return self.head(pooled[:, 0])


class TowerClassifier(nn.Module):
    """An image encoder (``[B, 3, S, S] -> [B, dim]``) with a linear shape head."""

    def __init__(self, encoder: nn.Module, dim: int):
        super().__init__()
        self.encoder, self.head = encoder, nn.Linear(dim, len(SHAPES))

    def forward(self, x):
        return self.head(self.encoder(x))


class HFImageEncoder(nn.Module):
    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, x):
        return self.hf(pixel_values=x).image_embeds


def build(name: str) -> nn.Module:
    if name == "cnn":
        return small_cnn()
    if name == "cnn-avgpool":
        return small_cnn(nn.AdaptiveAvgPool2d)
    if name == "cnn-attnpool":
        return AttentionPooledCNN()
    if name == "vit-stem-maxskip":  # the library's vision.stem_max_skip: the shipped shapes-tiny's image tower
        return TowerClassifier(cliplab.create_model("shapes-tiny", seed=0).visual, 128)
    if name == "vit-stem-maxpool":
        return TowerClassifier(MaxPooledTokens(cliplab.create_model("shapes-tiny-stem", seed=0).visual), 128)
    model = cliplab.create_model("shapes-tiny-stem" if name == "vit-stem" else "shapes-tiny-plain", seed=0)
    if name in ("vit", "vit-stem"):
        return TowerClassifier(model.visual, model.config.embed_dim)
    if name == "hf-vit":
        import transformers

        v = model.config.vision
        cfg = transformers.CLIPVisionConfig(hidden_size=v.width, intermediate_size=v.mlp_dim,
                                            num_hidden_layers=v.layers, num_attention_heads=v.heads,
                                            image_size=v.image_size, patch_size=v.patch_size,
                                            projection_dim=model.config.embed_dim, hidden_act="gelu")
        return TowerClassifier(HFImageEncoder(transformers.CLIPVisionModelWithProjection(cfg)),
                               model.config.embed_dim)
    raise ValueError(f"unknown model {name!r}")


def scenes_to_batch(world: SceneWorld, start: int, n: int, mean, std):
    scenes = [world.sample(start + i) for i in range(n)]
    x = _normalise_uint8(np.stack([np.asarray(s.image, dtype=np.uint8) for s in scenes]), mean, std)
    y = torch.tensor([SHAPES.index(s.objects[0].shape) for s in scenes])
    return x, y


def run(name: str, steps: int, batch: int, lr: float, every: int, warmup: int = 30) -> list[tuple[int, float]]:
    torch.manual_seed(0)
    net = build(name)
    pre = cliplab.get_config("shapes-tiny").preprocess
    train = SceneWorld(seed=0, min_objects=1, max_objects=1)
    held_x, held_y = scenes_to_batch(SceneWorld(seed=1, min_objects=1, max_objects=1), 0, 512, pre.mean, pre.std)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    curve, t0 = [], time.time()
    for step in range(steps + 1):
        if step % every == 0:
            with torch.no_grad():
                acc = float((net(held_x).argmax(1) == held_y).float().mean())
            curve.append((step, acc))
            print(f"  {name:7s} step {step:4d} ({step * batch:6d} scenes): held-out shape accuracy {acc:.3f} "
                  f"[{time.time() - t0:.0f} s]", flush=True)
        if step == steps:
            break
        x, y = scenes_to_batch(train, step * batch, batch, pre.mean, pre.std)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup)
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
    return curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="cnn,vit,vit-stem,hf-vit")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--every", type=int, default=50)
    args = ap.parse_args()
    results = {name: run(name, args.steps, args.batch, args.lr, args.every) for name in args.models.split(",")}
    print("\n| model | " + " | ".join(f"{s * args.batch} scenes" for s, _ in next(iter(results.values()))) + " |")
    print("|---|" + "---:|" * len(next(iter(results.values()))))
    for name, curve in results.items():
        print(f"| {name} | " + " | ".join(f"{a:.2f}" for _, a in curve) + " |")


if __name__ == "__main__":
    main()
