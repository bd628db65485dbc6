"""HQ-CLIP's objective: hard-negative identification (HNI) and short-tag classification (STC) next to InfoNCE.

Paper: *HQ-CLIP: Leveraging Large Vision-Language Models to Create High-Quality Image-Text Datasets and CLIP Models*,
Zhixiang Wei, Guangting Wang, Xiaoxiao Ma, Ke Mei, Huaian Chen, Yi Jin, Fengyun Rao (ICCV 2025, arXiv 2507.22431).
HQ-CLIP trains on four texts per image written by a vision-language model (long positive and negative descriptions,
short positive and negative tags) and adds two terms to CLIP's loss: hard-negative identification (the negative
description as an extra candidate) and short-tag classification (a classifier over a fixed tag vocabulary on the
image embedding, multi-label binary cross-entropy against the image's positive tags).

Losses: ``hqclip`` (:class:`HQCLIPLoss`, both terms) and ``clip+stc``, an alias of ``hqclip`` with HNI off
(:func:`clip_with_tag_classification`: ``hni_weight=0``, the same keywords and defaults)::

    loss = CLIP(img, txt) + hni_weight * HNI + stc_weight * STC
    HNI  = mean over images i of  CE(scale * img_i @ [txt_1 .. txt_B, neg_1 .. neg_N]^T,  target i)
    STC  = mean over the batch of  sum over tags t of  BCE(<img, w_t> / temperature + b_t,  y_t)

Choices:

* *Negatives.* No vision-language model runs here; the data source writes them. The synthetic source
  (``hard_negatives=["shape", ...]``) edits the scene, not the text: one value of an attribute present in the scene
  is replaced by an absent one in every object that has it (:meth:`SceneWorld.replace_attribute`), and the edited
  scene's caption of the same kind (short or long, as the row uses) is the negative, so it is false of the image and
  differs from the caption in that word only. The source skips an edit that only leaves a word out (a striped group
  made plain: "two crosses" stays true), and the batch drops a negative whose tokens equal one of its captions (long
  captions name colours after token 77). The trainer encodes negatives only for a loss that uses them
  (``uses_negatives``) and refuses such a loss with a source that has none.
* *HNI's softmax.* Every negative of the batch is a candidate for every image (B x (B + N) logits, the paper's
  "extra candidates"); with no negatives the term is exactly CLIP's image-to-text term. It is added to CLIP's
  symmetric loss rather than replacing its image-to-text half, as in the paper's sum of terms. Text-to-image is
  unchanged (a negative caption has no image).
* *Tags.* An image's positive tags are the words of the source's ``tag_texts`` when it has them and
  ``tags_from="source"`` (the default; the synthetic source gives every object's size, texture, colour and shape,
  the image's exact tags), else of its caption (``tags_from="caption"``, as in ``clip+stc``'s runs before sources
  gave tags; that was its default until it became an alias of ``hqclip``):
  :func:`caption_tags` marks tag ``t`` when the text has the word ``t`` or its plural (``t + "s"``, ``t + "es"``).
  Every other tag is a negative (HQ-CLIP's explicit negative tags are not modelled). The vocabulary is a fixed list
  passed as ``tags``; :func:`cliplab.train.synthetic_tags` lists the synthetic world's attribute words. Caption
  words are noisy labels: short captions leave attributes out, and long captions of cluttered scenes say "small
  grey marks" (before the source gave ``tag_texts``, that marked "small" on about 15% of training pairs).
* *Head.* A cosine-style head: the normalised embedding against learned rows (init ``N(0, 1/D)``, so rows start near
  unit norm) at a fixed temperature (0.07, CLIP's initial one), plus a bias (init -2: tags are sparse). The head
  is training-only; it lives in the loss module (saved in every checkpoint), not in the model.
* *Weights.* The paper's weights are not used (its scale differs: thousands of tags); 1 and 1 here, with the BCE
  summed over tags, put both terms' gradients at the contrastive term's scale in the measured runs.

The effect on the synthetic world (``docs/methods/hqclip.md``): STC makes the image tower learn object shape, which
plain contrastive training of the small default model barely did, and more so with exact tags (the shipped model:
97.5% zero-shot shape, 93.0% with caption tags). HNI teaches an attribute the contrastive loss leaves untaught
(texture on a tiny model, the effect test), but on the default model's recipe, where held-out images already prefer
their own caption over a shape-replaced one 98.5% of the time, shape negatives lowered zero-shot shape.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..methods import register_method
from ..train import BatchOutput, CLIPLoss, Loss, register_loss

__all__ = ["caption_tags", "HQCLIPLoss", "clip_with_tag_classification"]

register_method(
    "hqclip",
    "HQ-CLIP: Leveraging Large Vision-Language Models to Create High-Quality Image-Text Datasets and CLIP Models",
    "hard-negative identification and short-tag classification next to the contrastive loss",
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


@register_loss("hqclip")
class HQCLIPLoss(Loss):
    """HQ-CLIP's objective: ``CLIP + hni_weight * HNI + stc_weight * STC`` (see the module).

    ``tags=None`` turns STC off; ``hni_weight=0`` turns HNI off (then no negatives are needed). ``tags_from``:
    ``"source"`` reads each image's tags from the batch's ``tag_texts`` when the source gives them (else from its
    caption), ``"caption"`` always from the caption."""

    def __init__(self, tags: Sequence[str] | None = None, stc_weight: float = 1.0, hni_weight: float = 1.0,
                 temperature: float = 0.07, label_smoothing: float = 0.0, tags_from: str = "source"):
        super().__init__()
        if tags_from not in ("source", "caption"):
            raise ValueError(f"tags_from must be 'source' or 'caption', got {tags_from!r}")
        self.tags_from = tags_from
        if tags is not None:
            tags = [str(t) for t in tags]
            if not tags or len(set(t.lower() for t in tags)) != len(tags):
                raise ValueError(f"tags must be a non-empty list of distinct words, got {tags!r}")
            bad = [t for t in tags if not _WORD.fullmatch(t.lower())]
            if bad:
                raise ValueError(f"tags must be single words of letters a-z, got {bad}")
        if stc_weight < 0 or hni_weight < 0 or temperature <= 0:
            raise ValueError(f"weights must be >= 0 and temperature > 0, got stc_weight={stc_weight}, "
                             f"hni_weight={hni_weight}, temperature={temperature}")
        self.tags, self.temperature = tags, float(temperature)
        self.stc_weight, self.hni_weight = float(stc_weight), float(hni_weight)
        self.uses_negatives = self.hni_weight > 0
        self.contrastive = CLIPLoss(label_smoothing)
        self.head: nn.Linear | None = None

    def attach(self, model: nn.Module) -> None:
        if self.tags is None:
            return
        self.head = nn.Linear(model.config.embed_dim, len(self.tags))
        with torch.no_grad():
            nn.init.normal_(self.head.weight, std=model.config.embed_dim**-0.5)
            nn.init.constant_(self.head.bias, -2.0)

    def get_extra_state(self) -> dict:
        return {"tags": list(self.tags or [])}  # checkpointed with the head, so a resume cannot map rows to other tags

    def set_extra_state(self, state: dict) -> None:
        if list(state["tags"]) != list(self.tags or []):
            raise ValueError(f"the checkpoint's tag head was trained for tags {state['tags']}, not {self.tags}")

    def tag_logits(self, image_features: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` tag logits of L2-normalised image features."""
        if self.head is None:
            raise RuntimeError("the tag head is created by attach(model) (the trainer calls it), and only with tags")
        return F.linear(image_features, self.head.weight / self.temperature, self.head.bias)

    def hard_negative_logits(self, out: BatchOutput) -> torch.Tensor:
        """``[B, B + N]``: the image->text logits with the batch's N negative captions as extra columns."""
        neg = out.negative_text_features
        if neg is None:
            raise ValueError("hard-negative identification needs negative captions in the batch: give the source "
                             "hard negatives (synthetic: --set data.options.hard_negatives=[\"shape\"]) or set "
                             "hni_weight=0")
        return out.scale * (out.image_features @ torch.cat([out.text_features, neg]).t())

    def forward(self, out: BatchOutput) -> tuple[torch.Tensor, dict[str, float]]:
        loss, logs = self.contrastive(out)
        if self.hni_weight > 0:
            logits = self.hard_negative_logits(out)
            labels = torch.arange(logits.shape[0], device=logits.device)
            hni = F.cross_entropy(logits, labels, label_smoothing=self.contrastive.label_smoothing)
            loss = loss + self.hni_weight * hni
            logs["hni"] = hni.item()
            rows = out.batch.extras["negative_rows"].to(logits.device)
            if len(rows):  # a batch without negatives has no accuracy to log (not NaN: the window mean stays finite)
                with torch.no_grad():
                    own = logits[rows, logits.shape[0] + torch.arange(len(rows), device=logits.device)]
                    logs["hni_acc"] = (logits[rows, rows] > own).float().mean().item()
        if self.tags is not None:
            logits = self.tag_logits(out.image_features)
            texts = (out.batch.extras.get("tag_texts") if self.tags_from == "source" else None) or out.batch.texts
            targets = caption_tags(texts, self.tags).to(logits.device)
            stc = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / logits.shape[0]
            loss = loss + self.stc_weight * stc
            with torch.no_grad():
                logs.update(stc=stc.item(), tag_f1=_f1(logits > 0, targets.bool()))
        return loss, logs

    def extra_repr(self) -> str:
        tags = len(self.tags) if self.tags is not None else None
        return (f"tags={tags}, tags_from={self.tags_from}, stc_weight={self.stc_weight}, "
                f"hni_weight={self.hni_weight}, temperature={self.temperature}")


@register_loss("clip+stc")
def clip_with_tag_classification(tags: Sequence[str], stc_weight: float | None = None, temperature: float = 0.07,
                                 label_smoothing: float = 0.0, tags_from: str = "source",
                                 weight: float | None = None) -> HQCLIPLoss:
    """``clip+stc``: an alias of ``hqclip`` with HNI off (``hni_weight=0``), the same keywords and defaults; it
    needs ``tags``. ``weight`` is the older spelling of ``stc_weight``, kept because configs (the ``shapes-tiny``
    preset) use it."""
    if tags is None:
        raise ValueError("clip+stc needs tags (or use loss hqclip with tags=None)")
    if weight is not None and stc_weight is not None:
        raise ValueError("give the tag term's weight once: stc_weight (or its older name weight), not both")
    stc_weight = next((w for w in (stc_weight, weight) if w is not None), 1.0)
    return HQCLIPLoss(tags, stc_weight=stc_weight, hni_weight=0.0, temperature=temperature,
                      label_smoothing=label_smoothing, tags_from=tags_from)


def _f1(pred: torch.Tensor, target: torch.Tensor) -> float:
    tp = (pred & target).sum().item()
    denom = pred.sum().item() + target.sum().item()
    return 2 * tp / denom if denom else 1.0
