"""HQ-CLIP's short-tag classification (STC): a multi-label tag head on the image embedding, next to InfoNCE.

Paper: *HQ-CLIP: Leveraging Large Vision-Language Models to Create High-Quality Image-Text Datasets and CLIP Models*,
Zhixiang Wei, Guangting Wang, Xiaoxiao Ma, Ke Mei, Huaian Chen, Yi Jin, Fengyun Rao (ICCV 2025, arXiv 2507.22431).
HQ-CLIP trains on four texts per image written by a vision-language model (long positive and negative descriptions,
short positive and negative tags) and adds two terms to CLIP's loss: hard-negative identification (the negative
description as an extra candidate) and short-tag classification (a classifier over a fixed tag vocabulary on the
image embedding, multi-label binary cross-entropy against the image's positive tags).

What is implemented: the STC term, as the loss ``clip+stc`` (:class:`CLIPWithTagClassification`)::

    loss = CLIP(img, txt) + weight * STC,   STC = mean over the batch of sum over tags of BCE(logit_t, y_t)
    logit_t = <img, w_t> / temperature + b_t         img: the L2-normalised image embedding, w_t: a learned row

Choices:

* *Tags.* No vision-language model runs here, so an image's positive tags are read from its own caption:
  :func:`caption_tags` marks tag ``t`` when the caption has the word ``t`` or its plural (``t + "s"``,
  ``t + "es"``), case-insensitive. Every tag not in the caption is a negative (HQ-CLIP's explicit negative tags
  are not modelled). The vocabulary is a fixed list passed as ``tags`` (HQ-CLIP: a fixed vocabulary of frequent
  tags); :func:`cliplab.train.synthetic_tags` lists the synthetic world's attribute words. Matching is on words
  anywhere in the caption, so a tag word used for something else counts too: the synthetic world's long captions of
  cluttered scenes say "cluttered with small grey marks", which marks "small" on about 15% of the shipped model's
  training pairs whatever the objects' sizes (known label noise of that run).
* *Head.* A cosine-style head: the normalised embedding against learned rows (init ``N(0, 1/D)``, so rows start near
  unit norm) at a fixed temperature (0.07, CLIP's initial one), plus a bias (init -2: tags are sparse). The head
  is training-only; it lives in the loss module (saved in every checkpoint), not in the model.
* *Weight.* The paper's weight is not used (its scale differs: thousands of tags); ``weight=1`` here, with the BCE
  summed over tags, puts the term's gradient at the contrastive term's scale in the measured run.

The effect on the synthetic world (``docs/methods/hqclip.md``): the image tower learns object shape, which plain
contrastive training of the small default model barely did.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..methods import register_method
from ..train import BatchOutput, CLIPLoss, Loss, register_loss

__all__ = ["caption_tags", "CLIPWithTagClassification"]

register_method(
    "hqclip",
    "HQ-CLIP: Leveraging Large Vision-Language Models to Create High-Quality Image-Text Datasets and CLIP Models",
    "short-tag classification: a multi-label tag head on the image embedding next to the contrastive loss",
    doc="docs/methods/hqclip.md",
)(__name__)

_WORD = re.compile(r"[a-z]+")


def caption_tags(texts: Sequence[str], tags: Sequence[str]) -> torch.Tensor:
    """Multi-hot ``[len(texts), len(tags)]`` float targets: tag ``t`` is on when a text has the word ``t``, ``t+s``
    or ``t+es`` (case-insensitive, whole words)."""
    index: dict[str, int] = {}
    for j, tag in enumerate(tags):
        for form in (tag.lower(), tag.lower() + "s", tag.lower() + "es"):
            index.setdefault(form, j)
    out = torch.zeros(len(texts), len(tags))
    for i, text in enumerate(texts):
        hits = [index[w] for w in _WORD.findall(text.lower()) if w in index]
        if hits:
            out[i, hits] = 1.0
    return out


@register_loss("clip+stc")
class CLIPWithTagClassification(Loss):
    """CLIP's symmetric InfoNCE plus ``weight`` times HQ-CLIP's short-tag classification (see the module)."""

    def __init__(self, tags: Sequence[str], weight: float = 1.0, temperature: float = 0.07,
                 label_smoothing: float = 0.0):
        super().__init__()
        tags = [str(t) for t in tags]
        if not tags or len(set(t.lower() for t in tags)) != len(tags):
            raise ValueError(f"tags must be a non-empty list of distinct words, got {tags!r}")
        bad = [t for t in tags if not _WORD.fullmatch(t.lower())]
        if bad:
            raise ValueError(f"tags must be single words of letters a-z, got {bad}")
        if weight < 0 or temperature <= 0:
            raise ValueError(f"weight must be >= 0 and temperature > 0, got {weight}, {temperature}")
        self.tags, self.weight, self.temperature = tags, float(weight), float(temperature)
        self.contrastive = CLIPLoss(label_smoothing)
        self.head: nn.Linear | None = None

    def attach(self, model: nn.Module) -> None:
        self.head = nn.Linear(model.config.embed_dim, len(self.tags))
        with torch.no_grad():
            nn.init.normal_(self.head.weight, std=model.config.embed_dim**-0.5)
            nn.init.constant_(self.head.bias, -2.0)

    def get_extra_state(self) -> dict:
        return {"tags": list(self.tags)}  # checkpointed with the head, so a resume cannot map rows to other tags

    def set_extra_state(self, state: dict) -> None:
        if list(state["tags"]) != self.tags:
            raise ValueError(f"the checkpoint's tag head was trained for tags {state['tags']}, not {self.tags}")

    def tag_logits(self, image_features: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` tag logits of L2-normalised image features."""
        if self.head is None:
            raise RuntimeError("the tag head is created by attach(model); the trainer calls it")
        return F.linear(image_features, self.head.weight / self.temperature, self.head.bias)

    def forward(self, out: BatchOutput) -> tuple[torch.Tensor, dict[str, float]]:
        contrastive, logs = self.contrastive(out)
        logits = self.tag_logits(out.image_features)
        targets = caption_tags(out.batch.texts, self.tags).to(logits.device)
        stc = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / logits.shape[0]
        with torch.no_grad():
            pred = logits > 0
            logs.update(stc=stc.item(), tag_f1=_f1(pred, targets.bool()))
        return contrastive + self.weight * stc, logs

    def extra_repr(self) -> str:
        return f"tags={len(self.tags)}, weight={self.weight}, temperature={self.temperature}"


def _f1(pred: torch.Tensor, target: torch.Tensor) -> float:
    tp = (pred & target).sum().item()
    denom = pred.sum().item() + target.sum().item()
    return 2 * tp / denom if denom else 1.0
