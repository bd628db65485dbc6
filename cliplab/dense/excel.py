"""ExCEL: pseudo masks for weakly supervised segmentation from CLIP's dense knowledge (image-level labels only).

Paper: Z. Yang et al., "Exploring CLIP's Dense Knowledge for Weakly Supervised Semantic Segmentation" (CVPR 2025;
official code zwyang6/ExCEL: ``model/load_attr.py``, ``clip/clip_surgery_model.py``, ``clip.clip_feature_surgery``).
Two training-free parts, both here:

* **Text Semantic Enrichment (TSE)** (:func:`attribute_bank`, :func:`enrich_text`): descriptions of every class are
  encoded by the text tower and clustered (KMeans) into ``K`` attribute prototypes ``A`` ``[D, K]`` shared by the
  dataset; a class embedding ``t`` becomes ``normalize(t + softmax(mask(t A)) A^T)``, where ``mask`` sets the lowest
  ``floor((1 - keep) K)`` logits to ``-inf`` (``keep=0.9``: the code's ``topK``). The paper's descriptions come from
  GPT-4; here they are the synthetic grammar's attribute phrases (:func:`class_descriptions`: "a red circle",
  "a small red shape", ...), no LLM. Background prompts are left unchanged.
* **Static Visual Calibration (SVC)** (:func:`calibrated_patch_features`): in the last ``layers`` blocks (the code
  converts ``range(1, 6)``, i.e. the last 5 of 12) a parallel path adds, block after block, the attention output
  ``out((sum over heads of (softmax(q q^T) + softmax(k k^T) + softmax(v v^T)) / 3) @ v)`` with ``q, k, v`` the
  block's own projections of the *original* stream's ``ln_1`` input, and skips the MLPs. The path starts from the
  stream entering the first converted block; its patch rows go through ``ln_post`` and ``proj`` (the class row keeps
  the original path). ``layers=0`` is the plain last-layer tokens, exactly.
* **CAM** (:func:`excel_cams`): CLIP Surgery's feature similarity between the calibrated patches and the enriched
  class embeddings (``clip_feature_surgery``: per-class weights ``softmax(2 cls.t)`` normalised by their mean, the
  element-wise products' mean over classes subtracted, then summed), one map per class; :func:`pseudo_masks` keeps
  the image's labelled classes, min-max normalises each map over the image and gives a pixel the best class whose
  score beats ``bg_threshold`` (else background).

Choices that differ from the official code, and why:

* The official code masks ``corr[:, -int((1 - topK) K):]``; when that count is 0 (``K < 10``) the slice is the whole
  row and every logit becomes ``-inf`` (NaN). Here a count of 0 masks nothing.
* The optional extra patch affinity from intermediate features (``ex_feats``) is not implemented; nor are the
  learnable decoder (LVC), PAR refinement and the attention-affinity CAM refinement of the training pipeline.
* Where the model acts on the shipped ``shapes-tiny``: the ViT's last ``layers`` blocks, before ``ln_post``; the
  conv stem's max-skip term (each patch's own stem feature, :mod:`cliplab.dense.maps`) is added to every patch as
  in the tokens view.

Control: the plain patch-text map with the class name alone (:func:`excel_cams` with ``layers=0``, no bank, cosine
instead of the surgery similarity: ``variant="clip"``), same model, same images, same image-level labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..methods import register_method
from .maps import joint_space, stem_skip_term, upsample_maps

register_method(
    "excel",
    "Exploring CLIP's Dense Knowledge for Weakly Supervised Semantic Segmentation (ExCEL)",
    "class embeddings enriched by clustered description prototypes (TSE) and a training-free q-q/k-k/v-v attention "
    "path in the last blocks (SVC) give patch-text CAMs, turned into pseudo masks with image-level labels only",
    doc="docs/methods/excel.md",
)(__name__)

__all__ = ["class_descriptions", "kmeans", "attribute_bank", "masked_count", "enrich_text", "surgery_attention",
           "calibrated_patch_features", "feature_surgery", "excel_cams", "pseudo_masks", "excel_segmentation"]


def class_descriptions(world, by: str = "shape") -> dict[str, list[str]]:
    """Attribute phrases of each class from the synthetic grammar: for a shape, "a red circle", "a small circle",
    "a striped circle" ...; for a colour, "a red circle", "a small red shape" ..."""
    if by not in ("shape", "colour"):
        raise ValueError(f"by must be 'shape' or 'colour', got {by!r}")
    out = {}
    if by == "shape":
        for s in world.shapes:
            out[s] = ([f"a {c} {s}" for c in world.colours] + [f"a {z} {s}" for z in world.sizes]
                      + [f"a {t} {s}" for t in world.textures if t != "plain"])
    else:
        for c in world.colours:
            out[c] = ([f"a {c} {s}" for s in world.shapes] + [f"a {z} {c} shape" for z in world.sizes]
                      + [f"a {t} {c} shape" for t in world.textures if t != "plain"])
    return out


def kmeans(x: torch.Tensor, k: int, iters: int = 50, seed: int = 0) -> torch.Tensor:
    """Seeded Lloyd's k-means with k-means++ initialisation: centres ``[k, D]`` of rows ``x`` ``[M, D]``."""
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"k must lie in [1, {x.shape[0]}] (the number of descriptions), got {k}")
    g = torch.Generator().manual_seed(seed)
    x = x.float()
    centres = [x[torch.randint(x.shape[0], (1,), generator=g)].squeeze(0)]
    for _ in range(1, k):
        d2 = torch.cdist(x, torch.stack(centres)).pow(2).min(1).values
        p = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1 / len(d2))
        centres.append(x[torch.multinomial(p, 1, generator=g)].squeeze(0))
    c = torch.stack(centres)
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(1)
        new = torch.stack([x[assign == j].mean(0) if (assign == j).any() else c[j] for j in range(k)])
        if torch.equal(new, c):
            break
        c = new
    return c


def attribute_bank(model, descriptions: dict[str, list[str]] | Sequence[str], n_clusters: int = 16,
                   seed: int = 0) -> torch.Tensor:
    """TSE's attribute prototypes ``A`` ``[D, K]``: k-means centres of the unit-norm text embeddings of every
    description (centres not re-normalised, as in the code)."""
    texts = [t for ts in descriptions.values() for t in ts] if isinstance(descriptions, dict) else list(descriptions)
    with torch.no_grad():
        feats = F.normalize(model.encode_texts(texts).float(), dim=-1)
    return kmeans(feats, n_clusters, seed=seed).t().contiguous()


def masked_count(k: int, keep: float) -> int:
    """How many of ``k`` attribute logits TSE masks: ``int((1 - keep) * k)`` in floating point, as the code computes
    it (so 1, not 2, for ``k=20, keep=0.9``: ``1 - 0.9`` is just below 0.1)."""
    return int((1 - keep) * k)


def enrich_text(class_features: torch.Tensor, bank: torch.Tensor, keep: float | None = 0.9) -> torch.Tensor:
    """``normalize(t + softmax(mask(t A)) A^T)`` for each row ``t`` of ``class_features`` ``[C, D]`` and ``bank``
    ``A`` ``[D, K]``; ``keep=None`` masks nothing. Rows are used as given (the code passes unit-norm embeddings)."""
    if bank.dim() != 2 or bank.shape[0] != class_features.shape[1]:
        raise ValueError(f"bank must be [D={class_features.shape[1]}, K], got {tuple(bank.shape)}")
    logits = class_features.float() @ bank.float()
    n = masked_count(bank.shape[1], keep) if keep is not None else 0
    if n > 0:
        lowest = logits.argsort(dim=-1)[:, :n]
        logits = logits.scatter(-1, lowest, float("-inf"))
    enriched = class_features.float() + logits.softmax(-1) @ bank.float().t()
    return F.normalize(enriched, dim=-1)


def surgery_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per-head SVC attention ``[B, H, n, n]``: ``(softmax(q q^T s) + softmax(k k^T s) + softmax(v v^T s)) / 3``,
    ``s = d^-1/2`` (every row sums to 1)."""
    s = q.shape[-1] ** -0.5
    return ((q @ q.transpose(-2, -1) * s).softmax(-1) + (k @ k.transpose(-2, -1) * s).softmax(-1)
            + (v @ v.transpose(-2, -1) * s).softmax(-1)) / 3


def calibrated_patch_features(model, pixels: torch.Tensor, layers: int = 5) -> torch.Tensor:
    """SVC patch features ``[B, N, D]`` in the joint space (module docstring); ``layers=0`` gives the plain tokens."""
    if model.config.vision.is_resnet:
        raise ValueError("SVC needs a ViT image tower (a ResNet has no transformer blocks)")
    visual = model.visual
    blocks = visual.transformer.blocks
    if not 0 <= layers <= len(blocks):
        raise ValueError(f"layers must lie in [0, {len(blocks)}], got {layers}")
    hidden = model.encode_image(pixels, output="hidden").hidden  # layers + 1 streams, [B, n, W]
    first = len(blocks) - layers
    x = hidden[first]
    for i in range(first, len(blocks)):
        block = blocks[i]
        q, k, v = block.attn.split_heads(block.ln_1(hidden[i]))  # the original path's input to block i
        attn = surgery_attention(q, k, v).sum(1, keepdim=True)  # summed over heads, the same for every head
        x = x + block.attn.merge_heads(attn @ v)
    patches = joint_space(visual, x)
    skip = stem_skip_term(visual, pixels)
    return patches if skip is None else patches + skip


def feature_surgery(patches: torch.Tensor, texts: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """CLIP Surgery's similarity ``[B, N, K]`` (``clip_feature_surgery`` without redundant features): unit-norm
    patches ``[B, N, D]``, texts ``[K, D]``, pooled image embedding ``[B, D]``."""
    p, t = F.normalize(patches.float(), dim=-1), F.normalize(texts.float(), dim=-1)
    c = F.normalize(pooled.float(), dim=-1)
    prob = (2 * (c @ t.t())).softmax(-1)  # [B, K]
    w = prob / prob.mean(-1, keepdim=True)
    feats = p[:, :, None, :] * t[None, None] * w[:, None, :, None]  # [B, N, K, D]
    return (feats - feats.mean(2, keepdim=True)).sum(-1)


def excel_cams(model, pixels: torch.Tensor, class_features: torch.Tensor, *, bank: torch.Tensor | None = None,
               keep: float | None = 0.9, layers: int = 5, variant: str = "surgery",
               background_features: torch.Tensor | None = None) -> torch.Tensor:
    """Class maps ``[B, C, H, W]`` (upsampled to the pixels): ``class_features`` ``[C, D]`` (enriched with ``bank``
    and ``keep`` when a bank is given), patches from SVC over ``layers`` blocks; ``variant`` ``"surgery"`` (the
    paper's feature surgery, over the classes and ``background_features`` rows) or ``"clip"`` (plain cosine)."""
    if variant not in ("surgery", "clip"):
        raise ValueError(f"variant must be 'surgery' or 'clip', got {variant!r}")
    texts = F.normalize(class_features.float(), dim=-1)
    if bank is not None:
        texts = enrich_text(texts, bank, keep)
    patches = calibrated_patch_features(model, pixels, layers)
    n_cls = texts.shape[0]
    if variant == "clip":
        sims = F.normalize(patches.float(), dim=-1) @ texts.t()
    else:
        if background_features is not None:
            texts = torch.cat([texts, F.normalize(background_features.float(), dim=-1)])
        pooled = model.encode_image(pixels)
        sims = feature_surgery(patches, texts, pooled)[..., :n_cls]
    g = model.config.vision.grid_size
    maps = sims.transpose(1, 2).reshape(sims.shape[0], n_cls, g, g)
    return upsample_maps(maps, tuple(pixels.shape[-2:]))


def pseudo_masks(cams: torch.Tensor, image_labels: torch.Tensor, bg_threshold: float = 0.5) -> torch.Tensor:
    """``[B, H, W]`` int64 pseudo masks (0 background, ``c + 1`` class ``c``) from ``cams`` ``[B, C, H, W]`` and the
    image-level labels ``[B, C]`` (bool): each labelled class's map min-max normalised over the image, unlabelled
    classes out, background where no labelled class reaches ``bg_threshold``."""
    if image_labels.shape != cams.shape[:2]:
        raise ValueError(f"image_labels must be [B, C] = {tuple(cams.shape[:2])}, got {tuple(image_labels.shape)}")
    lo = cams.amin((2, 3), keepdim=True)
    hi = cams.amax((2, 3), keepdim=True)
    norm = (cams - lo) / (hi - lo).clamp_min(1e-12)
    norm = norm.masked_fill(~image_labels.bool()[:, :, None, None], float("-inf"))
    scores = torch.cat([torch.full_like(norm[:, :1], bg_threshold), norm], dim=1)
    return scores.argmax(1)


def excel_segmentation(model, images, labels: Sequence[str], *, threshold: float = 0.8, layers: int = 5,
                       descriptions: dict[str, list[str]] | None = None, n_clusters: int = 16):
    """Pseudo masks as a :class:`~cliplab.dense.segment.SegmentationResult`, for ``cliplab segment --method excel``:
    every given label is taken as an image-level label of every image (weak supervision: the labels say what is
    there, ExCEL says where). ``descriptions`` (label -> phrases) turn on text-semantic enrichment; without them
    the class names are used alone. The maps (min-max normalised CAMs, background row = ``threshold``) and the
    masks are at each image's own size."""
    from .segment import BACKGROUND, SegmentationResult, prepare_images

    labels = list(labels)
    with torch.no_grad():
        pixels, sizes = prepare_images(model, images)
        cls = model.encode_texts(labels)
        bank = attribute_bank(model, descriptions, n_clusters) if descriptions else None
        cams = excel_cams(model, pixels.to(model.device), cls, bank=bank, layers=layers, variant="surgery",
                          background_features=model.encode_texts([BACKGROUND])).float().cpu()
    present = torch.ones(len(labels), dtype=torch.bool)
    masks, maps = [], []
    for cam, size in zip(cams, sizes):
        cam = upsample_maps(cam[None], size)[0]
        lo, hi = cam.amin((1, 2), keepdim=True), cam.amax((1, 2), keepdim=True)
        norm = (cam - lo) / (hi - lo).clamp_min(1e-12)
        maps.append(torch.cat([torch.full_like(norm[:1], threshold), norm]))
        masks.append(pseudo_masks(cam[None], present[None], threshold)[0])
    return SegmentationResult(masks, maps, (BACKGROUND, *labels), "excel", "threshold", threshold)
