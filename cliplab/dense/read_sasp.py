"""READ's Similarity-as-Points (SasP): a text-patch similarity map becomes point prompts for a promptable segmenter.

Paper: R. Qian, X. Yin, D. Dou, "Reasoning to Attend: Try to Understand How <SEG> Token Works" (CVPR 2025; official
code rui-qian/READ, ``READForCausalLM.similarity_map_to_points``). READ fine-tunes a LISA-style LMM (LLaVA + SAM); its
SasP module turns the similarity between the ``<SEG>`` token and the image tokens into SAM point prompts. Here the
query is a CLIP text embedding and the image tokens are CLIP's patch features (any map of
:mod:`cliplab.dense.maps`); the segmenter is anything meeting
:class:`~cliplab.dense.promptable.PromptableSegmenter` (the shipped stand-in is
:class:`~cliplab.dense.promptable.PointSegmenter`, not SAM).

Point selection, as the official code does it (:func:`sasp_points`):

1. the grid map is bilinearly down-sampled by ``down_sample`` and min-max normalised to ``[0, 1]``;
2. **positives**: cells with value ``>= t_pos`` (0.8), highest first; **negatives**: cells in ``[0, t_neg]`` (0.2),
   lowest first; **neutral** (label ``-1``, which SAM ignores): the rest, in raster order;
3. positives, then negatives, then neutrals, cut to the first ``num_points`` (30);
4. each cell's centre in pixels, ``min((i + 0.5) * scale, size - 1)``, truncated to an integer;
5. **discrete -> continuous**: each point moves to the average of the pixel coordinates weighted by
   ``exp(-dist^2) * softmax(full-resolution map)`` (the full-resolution map is the min-max normalised grid map
   upsampled bilinearly to the image).

Choices that differ from the official code, and why:

* ``down_sample`` defaults to 1 (the code's 13B setting), not 2 (its 7B setting): the paper's grid is 24x24, ours is
  8x8 on 64 px images whose objects are 9-20 px wide; halving it leaves 4x4 cells of 16 px.
* The code pads the map to the image's aspect ratio with -1 (LLaVA pads images to a square); CLIP's preprocessing
  here resizes to a square, so there is no padding.
* ``min_spacing`` (default 0 = the official rule) is an optional extension: greedy suppression of a positive or
  negative cell within ``min_spacing`` cells (Chebyshev distance) of an already chosen cell of the same label. The
  official code has no suppression; its down-sampling is what spaces the points.
* READ passes the ``<SEG>`` embedding to SAM with the points; the stand-in segmenter takes points only.

Control: :func:`argmax_point` (one positive point at the map's maximum cell), same map, same segmenter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..methods import register_method
from .maps import similarity_maps, upsample_maps
from .promptable import PromptableSegmenter, image_tensor

register_method(
    "read_sasp",
    "Reasoning to Attend: Try to Understand How <SEG> Token Works (READ, Similarity-as-Points)",
    "the top cells of a text-patch similarity map (thresholded, sorted, refined to continuous coordinates) become "
    "positive / negative point prompts for a promptable segmenter (PromptableSegmenter protocol, trained stand-in)",
    doc="docs/methods/read_sasp.md",
)(__name__)

__all__ = ["sasp_points", "discrete_to_continuous", "argmax_point", "grid_maps", "SasPResult", "read_sasp_segment",
           "sasp_segmentation"]


def _minmax(x: torch.Tensor) -> torch.Tensor:
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else torch.zeros_like(x)


def discrete_to_continuous(full_map: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """READ's refinement: each ``(x, y)`` point -> the mean pixel coordinate weighted by ``exp(-d^2)`` (``d`` the
    pixel distance to the point) times ``softmax`` over all pixels of ``full_map`` ``[H, W]``."""
    h, w = full_map.shape
    probs = F.softmax(full_map.reshape(-1).float(), dim=0)
    gy, gx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    gx, gy = gx.reshape(-1), gy.reshape(-1)
    d2 = (gx[None] - points[:, :1].float()) ** 2 + (gy[None] - points[:, 1:].float()) ** 2  # [P, HW]
    weights = torch.exp(-d2) * probs[None]
    weights = weights / weights.sum(1, keepdim=True)
    return torch.stack([(weights * gx).sum(1), (weights * gy).sum(1)], dim=1)


def _suppress(order: list[int], width: int, spacing: int) -> list[int]:
    kept: list[int] = []
    for i in order:
        if all(max(abs(i % width - j % width), abs(i // width - j // width)) >= spacing for j in kept):
            kept.append(i)
    return kept


def sasp_points(sim: torch.Tensor, image_size: tuple[int, int], num_points: int = 30, t_pos: float = 0.8,
                t_neg: float = 0.2, down_sample: int = 1, continuous: bool = True,
                min_spacing: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Point prompts from one similarity map ``sim`` ``[gh, gw]`` (patch grid) for an image of ``image_size``
    ``(H, W)``: ``points`` ``[P, 2]`` float ``(x, y)`` pixels and ``labels`` ``[P]`` (1 positive, 0 negative, -1
    neutral), ``P <= num_points``. See the module docstring for the rule and each keyword."""
    if sim.dim() != 2:
        raise ValueError(f"sim must be one map [gh, gw], got {tuple(sim.shape)}")
    if down_sample < 1 or num_points < 1:
        raise ValueError(f"down_sample and num_points must be >= 1, got {down_sample} and {num_points}")
    if not 0 <= t_neg < t_pos <= 1:
        raise ValueError(f"thresholds must satisfy 0 <= t_neg < t_pos <= 1, got t_neg={t_neg}, t_pos={t_pos}")
    sim = sim.detach().float().cpu()
    H, W = int(image_size[0]), int(image_size[1])
    gh, gw = sim.shape
    h, w = max(1, gh // down_sample), max(1, gw // down_sample)
    small = F.interpolate(sim[None, None], size=(h, w), mode="bilinear")[0, 0] if (h, w) != (gh, gw) else sim
    flat = _minmax(small).reshape(-1)
    idx = torch.arange(flat.numel())
    pos = idx[flat >= t_pos]
    pos = pos[torch.argsort(flat[pos], descending=True, stable=True)]
    neg = idx[(flat >= 0) & (flat <= t_neg)]
    neg = neg[torch.argsort(flat[neg], stable=True)]
    neutral = idx[(flat > t_neg) & (flat < t_pos)]
    pos_l, neg_l = pos.tolist(), neg.tolist()
    if min_spacing > 0:
        pos_l, neg_l = _suppress(pos_l, w, min_spacing), _suppress(neg_l, w, min_spacing)
    chosen = (pos_l + neg_l + neutral.tolist())[:num_points]
    labels = torch.tensor([1] * len(pos_l) + [0] * len(neg_l) + [-1] * len(neutral), dtype=torch.long)[:num_points]
    sel = torch.tensor(chosen, dtype=torch.long)
    scale_w, scale_h = W / w, H / h
    x = torch.clamp((sel % w + 0.5) * scale_w, max=W - 1).floor()  # the code's int(): truncation of positives
    y = torch.clamp((sel // w + 0.5) * scale_h, max=H - 1).floor()
    points = torch.stack([x, y], dim=1)
    if continuous and len(points):
        full = upsample_maps(_minmax(sim)[None, None], (H, W))[0, 0]
        points = discrete_to_continuous(full, points)
    return points, labels


def argmax_point(sim: torch.Tensor, image_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The control: one positive point at the centre of the map's highest cell."""
    gh, gw = sim.shape
    i = int(sim.reshape(-1).argmax())
    H, W = int(image_size[0]), int(image_size[1])
    x = min((i % gw + 0.5) * W / gw, W - 1)
    y = min((i // gw + 0.5) * H / gh, H - 1)
    return torch.tensor([[float(int(x)), float(int(y))]]), torch.ones(1, dtype=torch.long)


def grid_maps(model, pixels: torch.Tensor, text_features: torch.Tensor, method: str = "naive") -> torch.Tensor:
    """Cosine maps ``[B, K, gh, gw]`` at the patch grid (:func:`cliplab.dense.maps.similarity_maps`)."""
    g = model.config.vision.grid_size
    return similarity_maps(model, pixels, text_features, method, size=(g, g))


@dataclass
class SasPResult:
    masks: torch.Tensor            # [B, K, H, W] bool
    probs: torch.Tensor            # [B, K, H, W] the segmenter's foreground probabilities
    maps: torch.Tensor             # [B, K, gh, gw] similarity maps the points came from
    points: list                   # points[b][k]: [P, 2] (x, y)
    labels: list                   # labels[b][k]: [P]


def read_sasp_segment(model, segmenter: PromptableSegmenter, images, texts: Sequence[str] | None = None, *,
                      text_features: torch.Tensor | None = None, method: str = "naive", prompts: str = "sasp",
                      num_points: int = 30, t_pos: float = 0.8, t_neg: float = 0.2, down_sample: int = 1,
                      continuous: bool = True, min_spacing: int = 0, threshold: float = 0.5) -> SasPResult:
    """Masks of each query in each image: CLIP maps (``method``) -> points -> ``segmenter``.

    ``images``: PIL images (the model's input size); ``texts`` or ``text_features`` ``[K, D]``: the queries;
    ``prompts``: ``"sasp"`` (:func:`sasp_points` with the keywords that follow) or ``"argmax"`` (the control,
    :func:`argmax_point`); ``threshold`` on the segmenter's probability."""
    if prompts not in ("sasp", "argmax"):
        raise ValueError(f"prompts must be 'sasp' or 'argmax', got {prompts!r}")
    if (texts is None) == (text_features is None):
        raise ValueError("give the queries as texts or as text_features (exactly one)")
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    with torch.no_grad():
        feats = model.encode_texts(list(texts)) if text_features is None else text_features
        pixels = torch.stack([model.preprocess(im) for im in images]).to(model.device)
        maps = grid_maps(model, pixels, feats, method).cpu()
        rgb = image_tensor(images)
        size = tuple(rgb.shape[-2:])
        all_points, all_labels, probs = [], [], []
        for b in range(len(images)):
            pts_b, lab_b, prob_b = [], [], []
            for k in range(maps.shape[1]):
                if prompts == "sasp":
                    pts, lab = sasp_points(maps[b, k], size, num_points=num_points, t_pos=t_pos, t_neg=t_neg,
                                           down_sample=down_sample, continuous=continuous, min_spacing=min_spacing)
                else:
                    pts, lab = argmax_point(maps[b, k], size)
                pts_b.append(pts)
                lab_b.append(lab)
                prob_b.append(segmenter.predict(rgb[b:b + 1], pts[None], lab[None])[0])
            all_points.append(pts_b)
            all_labels.append(lab_b)
            probs.append(torch.stack(prob_b))
        probs_t = torch.stack(probs)
    return SasPResult(probs_t > threshold, probs_t, maps, all_points, all_labels)


def sasp_segmentation(model, images, labels: Sequence[str], *, segmenter: PromptableSegmenter | None = None,
                      method: str = "sclip", prompts: str = "sasp", threshold: float = 0.5, **point_options):
    """:func:`read_sasp_segment` as a :class:`~cliplab.dense.segment.SegmentationResult` for ``cliplab segment
    --method read_sasp``: images of any size are resized to the model's input (no crop), each label's mask comes
    from its own points, and a pixel takes the label of highest probability where that exceeds ``threshold``,
    else the background; masks are returned at each image's own size (nearest). ``segmenter``: the shipped
    stand-in by default. ``point_options`` reach :func:`sasp_points`."""
    from PIL import Image

    from ..models.preprocess import load_image
    from .promptable import load_point_segmenter
    from .segment import BACKGROUND, SegmentationResult

    segmenter = load_point_segmenter() if segmenter is None else segmenter
    s = model.config.vision.image_size
    masks, maps = [], []
    for src in images:
        img = load_image(src)
        square = img if img.size == (s, s) else img.resize((s, s), Image.BICUBIC)
        out = read_sasp_segment(model, segmenter, [square], list(labels), method=method, prompts=prompts,
                                threshold=threshold, **point_options)
        probs = out.probs[0].float()  # [K, S, S]
        full = torch.cat([torch.full_like(probs[:1], threshold), probs])  # background wins at or below threshold
        full = F.interpolate(full[None], size=(img.height, img.width), mode="nearest")[0]
        maps.append(full)
        masks.append(full.argmax(0))
    return SegmentationResult(masks, maps, (BACKGROUND, *labels), "read_sasp", "threshold", threshold)
