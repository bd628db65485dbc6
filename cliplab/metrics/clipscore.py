"""CLIPScore and RefCLIPScore on a model, images and captions: a thin front end to the evaluation harness.

Paper: *CLIPScore: A Reference-free Evaluation Metric for Image Captioning*, Jack Hessel, Ari Holtzman, Maxwell
Forbes, Ronan Le Bras, Yejin Choi, EMNLP 2021 (arXiv:2104.08718); reference code jmhessel/clipscore.

* ``CLIP-S(c, v) = w * max(cos(c, v), 0)`` with ``w = 2.5``;
* ``RefCLIP-S(c, R, v) = H-mean(CLIP-S(c, v), max(max_{r in R} cos(c, r), 0))``.

The formulas live in :mod:`cliplab.eval.metrics` (``clip_score`` / ``ref_clip_score`` on features); this module only
encodes. As in Hessel et al.'s code, every caption *and every reference* is prefixed with ``"A photo depicts "``
(``prefix=""`` turns it off). Scores come back per pair, as a float32 tensor ``[N]``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..eval.metrics import clip_score as _clip_score, ref_clip_score as _ref_clip_score

__all__ = ["clip_score", "ref_clip_score", "encode_pairs", "prepare_images", "with_template", "TEMPLATE", "CLIPSCORE_W"]

TEMPLATE = "A photo depicts "  # Hessel et al.'s caption prefix
CLIPSCORE_W = 2.5  # CLIP-S's rescaling weight w


def prepare_images(model, images) -> torch.Tensor:
    """PIL images / paths (one or a list) or preprocessed pixels ``[3, S, S]`` / ``[B, 3, S, S]`` -> ``[B, 3, S, S]``
    on the model's device."""
    if isinstance(images, torch.Tensor):
        pixels = images if images.dim() == 4 else images.unsqueeze(0)
    else:
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        pixels = model.preprocessor.batch(items)
    return pixels.to(model.device)


def with_template(template: str, caption: str) -> str:
    if template and not template[-1].isspace():
        template += " "
    return template + caption


@torch.no_grad()
def encode_pairs(model, images, captions: str | Sequence[str], prefix: str = TEMPLATE,
                 batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image_features [N, D], text_features [N, D])`` row-aligned; one image is repeated for every caption."""
    captions = [captions] if isinstance(captions, str) else list(captions)
    pixels = prepare_images(model, images)
    img = torch.cat([model.encode_image(pixels[i: i + batch_size]) for i in range(0, len(pixels), batch_size)])
    txt = model.encode_texts([with_template(prefix, c) for c in captions], batch_size=batch_size)
    if img.shape[0] == 1 and len(captions) > 1:
        img = img.expand(len(captions), -1)
    if img.shape[0] != txt.shape[0]:
        raise ValueError(f"{img.shape[0]} images for {txt.shape[0]} captions (pass one image, or one per caption)")
    return img, txt


def clip_score(model, images, captions: str | Sequence[str], *, w: float = CLIPSCORE_W,
               prefix: str = TEMPLATE) -> torch.Tensor:
    """CLIP-S of each (image, caption) pair ``[N]``."""
    img, txt = encode_pairs(model, images, captions, prefix)
    return _clip_score(img, txt, w)


def ref_clip_score(model, images, captions: str | Sequence[str], references: Sequence[Sequence[str]], *,
                   w: float = CLIPSCORE_W, prefix: str = TEMPLATE) -> torch.Tensor:
    """RefCLIP-S of each pair ``[N]`` given each caption's reference captions (``references[n]``; NaN where empty)."""
    img, txt = encode_pairs(model, images, captions, prefix)
    if len(references) != txt.shape[0]:
        raise ValueError(f"{len(references)} reference lists for {txt.shape[0]} captions")
    refs = [model.encode_texts([with_template(prefix, r) for r in rs]) if len(rs)
            else txt.new_zeros(0, txt.shape[1]) for rs in references]
    return _ref_clip_score(img, txt, refs, w)
