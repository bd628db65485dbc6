"""Parity of an exported model against the PyTorch model: max abs difference and cosine on seeded random inputs."""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.nn.functional as F

from ..models import CLIP

_WORDS = [
    "a", "the", "dog", "cat", "man", "woman", "child", "runs", "sits", "jumps", "on", "in", "under", "red", "blue",
    "green", "small", "large", "wet", "field", "street", "beach", "with", "two", "three", "of", "and", "near",
    "bright", "old", "young", "photo",
]


def random_captions(n: int, seed: int = 0, max_words: int = 30) -> list[str]:
    """``n`` seeded captions of varied length (1 to ``max_words`` words), for text parity checks."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(_WORDS, k=rng.randint(1, max_words))) for _ in range(n)]


def random_pixels(model, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` seeded normal-noise images at the model's input size (a stand-in for preprocessed pixels)."""
    s = model.config.vision.image_size
    return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(seed))


def feature_agreement(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """``max_abs_diff`` and the ``min`` / ``mean`` row-wise cosine of two feature matrices."""
    reference, other = reference.float(), other.float()
    cosine = F.cosine_similarity(reference, other, dim=-1)
    return {"max_abs_diff": float((reference - other).abs().max()), "min_cosine": float(cosine.min()),
            "mean_cosine": float(cosine.mean())}


@torch.no_grad()
def check_parity(model: CLIP, exported, n: int = 8, seed: int = 0) -> dict[str, dict[str, float]]:
    """Compare ``exported`` (an :class:`~cliplab.export.OnnxCLIP`, or anything with the same API) with ``model`` on
    ``n`` random images and ``n`` captions of varied lengths (one batch each: padding cut to the longest), for every
    tower the export holds. Returns ``{"image": {...}, "text": {...}}`` (see :func:`feature_agreement`)."""
    report: dict[str, Any] = {}
    towers = getattr(exported, "towers", ("image", "text"))
    if "image" in towers:
        pixels = random_pixels(model, n, seed)
        report["image"] = feature_agreement(model.encode_image(pixels.to(model.device)).cpu(),
                                            exported.encode_image(pixels))
    if "text" in towers:
        batch = model.tokenize(random_captions(n, seed))
        report["text"] = feature_agreement(model.encode_text(batch).cpu(), exported.encode_text(batch))
    return report
