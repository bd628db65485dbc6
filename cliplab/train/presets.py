"""Named training recipes: ``get_preset(name) -> TrainConfig`` (a fresh copy each call).

* ``tiny-smoke``: a very small CLIP on 64 px synthetic scenes, 300 steps of batch 32 in fp32, well under a minute on
  two CPU cores. Checks that the whole pipeline learns (the loss falls far below ln(32)).
* ``shapes-tiny``: the recipe of the shipped default model (architecture ``shapes-tiny``: ViT 64 px / patch 8,
  width 192 x 6 layers; text width 128 x 4 layers with the full CLIP vocabulary; embed 128). Endless synthetic
  stream, short and long captions mixed half and half (long ones truncated at 77 tokens), batch 256, bf16 autocast,
  AdamW lr 5e-4 with warm-up and cosine decay, sized to about 25 minutes on the 2-core development machine
  (see ``docs/training.md`` for the measurements).
"""

from __future__ import annotations

from typing import Callable

from ..models import get_config
from .config import DataConfig, TrainConfig
from .registry import Registry

__all__ = ["register_preset", "get_preset", "list_presets", "PRESETS"]

PRESETS: Registry[Callable[[], TrainConfig]] = Registry("preset")


def register_preset(name: str, overwrite: bool = False):
    """Decorator for a function returning the preset's :class:`TrainConfig`."""
    return PRESETS.register(name, overwrite=overwrite)


def list_presets() -> list[str]:
    return PRESETS.names()


def get_preset(name: str) -> TrainConfig:
    return PRESETS.get(name)()


def tiny_smoke_model() -> dict:
    """``test-tiny`` at 64 px with 16 px patches (17 image tokens): a few milliseconds per step."""
    cfg = get_config("test-tiny").to_dict()
    cfg["name"] = "tiny-smoke"
    cfg["vision"].update(image_size=64, patch_size=16)
    cfg["preprocess"]["image_size"] = 64
    return cfg


@register_preset("tiny-smoke")
def tiny_smoke() -> TrainConfig:
    return TrainConfig(
        model=tiny_smoke_model(),
        data=DataConfig(source="synthetic", caption="short"),
        batch_size=32,
        steps=300,
        lr=1e-3,
        warmup_steps=20,
        weight_decay=0.1,
        precision="fp32",
        log_every=20,
        checkpoint_every=100,
        threads=1,  # a model this small gains nothing from a second thread; one keeps it robust on a busy machine
        out_dir="runs/tiny-smoke",
    )


#: The shipped model's run: 600 steps at 0.41-0.47 steps/s with two torch threads on the otherwise quiet 2-core
#: development machine (OMP_WAIT_POLICY=PASSIVE), 24.5 minutes. With one thread: 0.31 steps/s at load ~2-3.
SHAPES_TINY_STEPS = 600


@register_preset("shapes-tiny")
def shapes_tiny() -> TrainConfig:
    return TrainConfig(
        # Measured alternatives, not adopted (docs/training.md): model="shapes-tiny-stem" (a convolutional stem: shape
        # 26.8% vs 19.5%, but retrieval, binding and word-level attribution got worse) and, on top of it, groups of 4
        # scenes that differ only in shapes (options={"shape_variants": 4} with sampler="sequential": shape 28.0%,
        # colour down to 93.3%).
        model="shapes-tiny",
        data=DataConfig(source="synthetic", caption="mix", long_prob=0.5, num_workers=0),
        batch_size=256,
        steps=SHAPES_TINY_STEPS,
        # 1e-3 with a short warm-up collapsed to chance (loss = ln B, gradient norm -> 0.02) within 15 steps in a
        # batch-64 run of this architecture; 5e-4 with a 30-step warm-up learns steadily.
        lr=5e-4,
        min_lr=1e-5,
        warmup_steps=30,
        weight_decay=0.1,
        precision="bf16",
        # Two threads on a quiet machine (the shipped run). On a busy 2-core machine PyTorch's OpenMP threads
        # spin-wait and run up to 3x slower: set OMP_WAIT_POLICY=PASSIVE or pass --set threads=1 there.
        # (two vs one thread under load: 0.05 vs 0.15 steps/s at load 6-8; 0.14 vs 0.31 at load ~2).
        threads=2,
        log_every=10,
        checkpoint_every=50,
        out_dir="runs/shapes-tiny",
    )
