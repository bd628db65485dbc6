"""A-CLIP: attentive token removal for CLIP training, with an EMA image encoder and two self-supervised terms.

Paper: *Attentive Mask CLIP*, Yifan Yang, Weiquan Huang, Yixuan Wei, Houwen Peng, Xinyang Jiang, Huiqiang Jiang,
Fangyun Wei, Yin Wang, Han Hu, Lili Qiu, Yuqing Yang (ICCV 2023, arXiv 2212.08653). Official code:
``microsoft/A-CLIP`` (``models.py``: ``get_att_mask``, ``ACLIP.get_mask``/``forward``; ``losses.py``).

What one step does (loss ``aclip``, :class:`AClipLoss`):

1. The EMA copy of the image tower (:class:`cliplab.train.ema.EMATeacher`) is moved one step,
   ``theta_ema <- m theta_ema + (1 - m) theta`` with ``m`` on a cosine from ``ema_base`` (0.996) to ``ema_final``
   (1) over ``total_steps``; then it encodes the full image. Its class token's attention to the patches, averaged
   over **all layers and heads** (:func:`cliplab.train.masking.cls_attention_over_layers`), scores every patch.
   Because the class token is what the contrastive loss aligns with the caption, this is the text's point of view
   without running the text.
2. Two views of the image are cut (random square crops, side in ``[crop_min, 1]`` of the image, resized back). The
   score map is resampled to each crop's coordinates (:func:`cliplab.train.masking.crop_score_map`, as the official
   ``get_mask``), downsampled to ``block x block`` cells, and the top ``int(cells * keep_ratio) + 1`` cells are kept
   (:func:`cliplab.train.masking.attentive_block_keep`; 25 of 49 in the paper). ``mask="random"`` keeps as many
   random cells instead (the control).
3. The online image tower runs on the kept patches only (``model.encode_image(view, keep=...)``: patches are dropped
   after positions are added and before the first block; the class token always stays; on a stem max-skip model
   the dropped patches also leave the max-skip).
4. ``loss = clip_weight * (CLIP(view1) + CLIP(view2)) / 2 + simclr_weight * SimCLR(view1, view2)
   + byol_weight * BYOL``: CLIP is the symmetric InfoNCE against the batch's captions; SimCLR is NT-Xent
   (temperature 0.1) between the views' SimCLR-head outputs; BYOL is ``2 - 2 cos`` between each view's
   predictor(projector(.)) and the EMA projector's output on the EMA encoder's full-image feature. Defaults are the
   paper's ``0.5 + 0.5``, ``1`` and ``2``.

Choices that differ from the paper or the official code, and why:

* *SimCLR pairs.* The official ``losses.py`` passes view 1 as both SimCLR inputs (``image_ssl_embed[:bs]`` twice), so
  its SimCLR term compares a view with itself. Here the intended view 1 / view 2 pair.
* *SSL heads' input.* The official heads read the class token after the final LayerNorm, before the image
  projection (vision width); here they read the pooled image embedding (after the projection, and on a stem
  max-skip model after the max-skip is added), because that is what ``encode_image`` returns with ``keep``. Sizes
  are smaller (hidden ``ssl_hidden`` 512, output ``ssl_dim`` 128 instead of 4096 and 256) for tiny models.
* *Views.* The paper's EMA view ``im2`` is a larger crop that covers both training crops; here the EMA sees the
  whole image (the largest such view). Crops are square with aspect 1 and no flips or colour jitter: synthetic
  captions name colours, positions and relations, which flips and colour jitter would make false.
* *One image forward too many.* The trainer encodes the full image for every loss; this loss encodes its own masked
  views and ignores ``out.image_features`` (the text features are used as they are). The saving in compute that the
  paper reports therefore does not show in a ``Trainer`` run's wall time here.
* *Precision.* The loss's own forwards run outside the trainer's autocast, i.e. in fp32 under ``precision="bf16"``.
* *Text EMA.* The official model also keeps an EMA of the text transformer that its forward never reads; not kept.
* *Patch-embedding freeze.* The official masked ViT freezes its patch embedding; here nothing is frozen by the loss
  (use ``freeze=["visual.patch_embed.*"]`` in the run's config for the paper's setting).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..methods import register_method
from ..train import BatchOutput, CLIPLoss, Loss, TrainConfig, get_preset, register_loss, register_preset
from ..train.ema import EMATeacher
from ..train.masking import attentive_block_keep, cls_attention_over_layers, crop_score_map, random_block_keep
from ..train.ssl import byol_loss, simclr_loss

__all__ = ["AClipLoss", "view_boxes", "crop_views", "aclip_keep", "aclip_tiny"]

register_method(
    "aclip",
    "Attentive Mask CLIP",
    "keeps the image patches an EMA image encoder's class token attends to (drops the rest), plus SimCLR and BYOL",
    doc="docs/methods/aclip.md",
)(__name__)

MASKS = ("attentive", "random")


def view_boxes(batch: int, image_size: int, crop_min: float, generator: torch.Generator) -> torch.Tensor:
    """Random square crops ``[B, 4]`` = ``(top, left, side, side)`` in pixels, side uniform in
    ``[crop_min, 1] * image_size`` (``crop_min == 1``: the whole image)."""
    if not 0.0 < crop_min <= 1.0:
        raise ValueError(f"crop_min must be in (0, 1], got {crop_min}")
    u = crop_min + (1.0 - crop_min) * torch.rand(batch, generator=generator)
    side = (u * image_size).round().long().clamp(1, image_size)
    top = (torch.rand(batch, generator=generator) * (image_size - side + 1)).long()
    left = (torch.rand(batch, generator=generator) * (image_size - side + 1)).long()
    return torch.stack([top, left, side, side], dim=1)


def crop_views(pixels: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Cut each box out of its image and resize it back to the image size (bilinear); a full-image box is the very
    image."""
    size = pixels.shape[-1]
    out = []
    for i, (top, left, h, w) in enumerate(boxes.tolist()):
        if (top, left, h, w) == (0, 0, size, size):
            out.append(pixels[i: i + 1])
            continue
        crop = pixels[i: i + 1, :, top: top + h, left: left + w]
        out.append(F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False))
    return torch.cat(out)


def aclip_keep(scores: torch.Tensor, boxes: torch.Tensor, image_size: int, keep_ratio: float = 0.5, block: int = 2,
               mask: str = "attentive", generator: torch.Generator | None = None) -> torch.Tensor:
    """The kept patch indices ``[B, K]`` of each view: the full image's patch ``scores`` ``[B, N]`` seen from the
    view's box (a full-image box uses them as they are), then the top cells (``mask="attentive"``) or as many random
    cells (``"random"``)."""
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
    if mask == "random":
        return random_block_keep(scores.shape[0], scores.shape[1], keep_ratio, block, generator)
    full = (boxes == torch.tensor([0, 0, image_size, image_size])).all(1)
    view_scores = scores.float().clone()
    if not bool(full.all()):
        idx = (~full).nonzero().flatten()
        view_scores[idx] = crop_score_map(scores[idx], boxes[idx], image_size)
    return attentive_block_keep(view_scores, keep_ratio, block)


def _mlp(dims: list[int], bias: bool = True) -> nn.Sequential:
    """Linear -> BatchNorm -> ReLU between layers; the last layer plain (SimCLR's / BYOL's heads)."""
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=bias))
        if i < len(dims) - 2:
            layers += [nn.BatchNorm1d(dims[i + 1]), nn.ReLU()]
    return nn.Sequential(*layers)


@register_loss("aclip")
class AClipLoss(Loss):
    """A-CLIP's objective (see the module docstring). Options reach it from ``loss_kwargs`` (``cliplab train --set
    loss_kwargs.keep_ratio=0.25``)."""

    def __init__(self, keep_ratio: float = 0.5, block: int = 2, mask: str = "attentive", crop_min: float = 0.75,
                 clip_weight: float = 1.0, simclr_weight: float = 1.0, byol_weight: float = 2.0,
                 temperature: float = 0.1, ema_base: float = 0.996, ema_final: float = 1.0, total_steps: int = 0,
                 ssl_dim: int = 128, ssl_hidden: int = 512, seed: int = 0):
        super().__init__()
        if mask not in MASKS:
            raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        if not 0.0 < crop_min <= 1.0:
            raise ValueError(f"crop_min must be in (0, 1], got {crop_min}")
        if min(clip_weight, simclr_weight, byol_weight) < 0:
            raise ValueError("loss weights must be >= 0")
        self.keep_ratio, self.block, self.mask, self.crop_min = float(keep_ratio), int(block), mask, float(crop_min)
        self.clip_weight, self.simclr_weight, self.byol_weight = float(clip_weight), float(simclr_weight), float(
            byol_weight)
        self.temperature = float(temperature)
        self.ema_base, self.ema_final, self.total_steps = float(ema_base), float(ema_final), int(total_steps)
        self.ssl_dim, self.ssl_hidden, self.seed = int(ssl_dim), int(ssl_hidden), int(seed)
        self.clip = CLIPLoss()
        self._model: list[nn.Module] = []  # a plain list: the model's parameters must not register in the loss

    def attach(self, model: nn.Module) -> None:
        visual = model.visual
        if model.config.vision.is_resnet or getattr(visual, "n_prefix", 0) != 1:
            raise ValueError("A-CLIP needs a ViT image tower with a class token (its attention picks the patches)")
        self._model = [model]
        self.teacher = EMATeacher(visual, self.ema_base, self.ema_final, self.total_steps)
        d = model.config.embed_dim
        self.simclr_head = _mlp([d, self.ssl_hidden, self.ssl_hidden, self.ssl_dim])
        self.byol_projector = _mlp([d, self.ssl_hidden, self.ssl_dim], bias=False)
        self.byol_predictor = _mlp([self.ssl_dim, self.ssl_hidden, self.ssl_dim])
        self.byol_target = EMATeacher(self.byol_projector, self.ema_base, self.ema_final, self.total_steps)

    @property
    def model(self) -> nn.Module:
        if not self._model:
            raise RuntimeError("AClipLoss.attach(model) must be called first (the trainer does)")
        return self._model[0]

    def generator(self, step: int) -> torch.Generator:
        """The views' and the random control's randomness: a pure function of (seed, step), so resumed runs agree."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + int(step))

    @torch.no_grad()
    def teacher_scores(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The EMA tower on the full images: (patch scores ``[B, N]``, pooled feature ``[B, D]``)."""
        visual = self.teacher.module
        out = visual.forward_rich(pixels, want=frozenset({"attn"}))
        n = visual.cfg.grid_size ** 2
        return cls_attention_over_layers(out.attn, n), out.pooled.float()

    def forward(self, out: BatchOutput) -> tuple[torch.Tensor, dict[str, float]]:
        model, batch = self.model, out.batch
        pixels = batch.pixels
        step = int(getattr(batch, "step", 0))
        momentum = self.teacher.update(model.visual, step)
        self.byol_target.update(self.byol_projector, step)
        scores, ema_pooled = self.teacher_scores(pixels)
        g = self.generator(step)
        size = pixels.shape[-1]
        views, keeps = [], []
        for _ in range(2):
            boxes = view_boxes(pixels.shape[0], size, self.crop_min, g)
            views.append(crop_views(pixels, boxes))
            keeps.append(aclip_keep(scores, boxes, size, self.keep_ratio, self.block, self.mask, g))
        feats = model.encode_image(torch.cat(views), keep=torch.cat(keeps)).pooled.float()
        b = pixels.shape[0]
        f1, f2 = feats[:b], feats[b:]
        clip1, _ = self.clip(BatchOutput(F.normalize(f1, dim=-1), out.text_features, out.logit_scale, batch))
        clip2, logs = self.clip(BatchOutput(F.normalize(f2, dim=-1), out.text_features, out.logit_scale, batch))
        loss = self.clip_weight * (clip1 + clip2) / 2
        values = {"clip_view1": clip1.item(), "clip_view2": clip2.item(), "acc_i2t": logs["acc_i2t"],
                  "momentum": momentum, "kept": keeps[0].shape[1] / scores.shape[1]}
        if self.simclr_weight:
            z = self.simclr_head(feats)
            ssl = simclr_loss(z[:b], z[b:], self.temperature)
            loss = loss + self.simclr_weight * ssl
            values["simclr"] = ssl.item()
        if self.byol_weight:
            with torch.no_grad():
                target = self.byol_target(ema_pooled)
            pred = self.byol_predictor(self.byol_projector(feats))
            byol = byol_loss(pred, torch.cat([target, target]))
            loss = loss + self.byol_weight * byol
            values["byol"] = byol.item()
        return loss, values

    def extra_repr(self) -> str:
        return (f"keep_ratio={self.keep_ratio}, block={self.block}, mask={self.mask!r}, crop_min={self.crop_min}, "
                f"weights=({self.clip_weight}, {self.simclr_weight}, {self.byol_weight})")


@register_preset("aclip-tiny")
def aclip_tiny() -> TrainConfig:
    """``tiny-smoke``'s recipe with 8 px patches (an 8 x 8 grid, 16 cells of 2 x 2) and the ``aclip`` loss; the EMA
    momentum's cosine spans the preset's steps (set ``loss_kwargs.total_steps`` too when changing ``steps``)."""
    cfg = get_preset("tiny-smoke")
    model = dict(cfg.model)
    model["vision"] = {**model["vision"], "patch_size": 8}
    model["name"] = "aclip-tiny"
    return cfg.replace(model=model, loss="aclip", loss_kwargs={"total_steps": cfg.steps}, out_dir="runs/aclip-tiny")
