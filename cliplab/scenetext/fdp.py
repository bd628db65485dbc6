"""FDP: Focus, Distinguish, and Prompt, CLIP for OCR-free scene text retrieval (the parts done so far).

Paper: G. Zeng et al., "Focus, Distinguish, and Prompt: Unleashing CLIP for Efficient and Flexible Scene Text
Retrieval" (ACM MM 2024; official code Gyann-z/FDP: ``main.py``, ``fdp.py``, ``utils.py``). Implemented here:

* **Distracted queries** (:func:`distracted_candidates`, :func:`candidate_target`, :func:`distractor_loss`): for a
  query ``q`` the candidates are ``q`` and every dictionary word within Levenshtein distance 1 (``len(q) <= 5``) or 2
  (longer), sorted by distance, padded with ``"###"`` (whose distance is ``lev("###", q)``, as in the code) and cut
  to 5. The target is ``softmax(1 / (d + 0.1))`` over the 5; the loss is ``KL(target || softmax(s cos(image,
  candidate texts)))`` (batch mean). Ties in distance are broken alphabetically (the code's order is a set's).
* **Focus supervision** (:func:`shrink_box`, :func:`text_kernel`, :func:`balanced_bce`): positives are the text
  kernels shrunk PSENet/DB-style with ratio 0.4 (offset ``int(area (1 - r^2) / (perimeter + 0.001) + 0.5)``; our
  word regions are axis-aligned boxes, so the offset polygon is a box), rasterised on the patch grid (a patch is
  positive when its centre is inside a kernel); balanced BCE keeps every positive and the ``3 x positives`` hardest
  negatives inside the effective mask, averaged over their count (+1e-6).
* **Focus bias** (:class:`FocusBias`): the predicted text map ``sigmoid(map)`` is added to the attention logits of
  the class token's query over the patches in the image tower's **last** block (``[1, sigmoid(map)]``: the class key
  gets +1); the map is a linear head on the residual stream entering that block (``ln``-normalised patch rows).
  Adaptation: FDP's backbone is RN50 and the bias acts on the attention pool; on a ViT the last block's class-token
  attention plays that role.
* :func:`mean_average_precision`: retrieval mAP over queries (images ranked by score; AP over the relevant ones).

Not implemented yet (stated in docs/methods/fdp.md): the learnable function/content prompts with KMeans routing, the
"scene text" text-query cross-attention, the training loop, and the measured retrieval effect.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..methods import register_method
from ..models.hooks import Hooks

register_method(
    "fdp",
    "Focus, Distinguish, and Prompt: Unleashing CLIP for Efficient and Flexible Scene Text Retrieval (FDP)",
    "scene-text retrieval: a predicted text map biases the class token's last attention (balanced-BCE supervised) "
    "and near-spelling distracted queries (edit distance, softmax(1/(d+0.1)) target) sharpen word discrimination",
    doc="docs/methods/fdp.md",
)(__name__)

__all__ = ["PAD", "levenshtein", "edit_budget", "distracted_candidates", "candidate_target", "distractor_loss",
           "shrink_box", "text_kernel", "balanced_bce", "FocusBias", "mean_average_precision"]

PAD = "###"


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each cost 1)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def edit_budget(query: str) -> int:
    """FDP's neighbourhood radius: 1 for words of up to 5 characters, 2 for longer ones."""
    return 1 if len(query) <= 5 else 2


def distracted_candidates(query: str, dictionary: Sequence[str], k: int = 5, pad: str = PAD) -> list[tuple[str, int]]:
    """``k`` (word, distance) pairs: the query and its dictionary neighbours within :func:`edit_budget`, nearest
    first (ties alphabetical), padded with ``pad`` at distance ``levenshtein(pad, query)``."""
    budget = edit_budget(query)
    found = {w: levenshtein(query, w) for w in set(dictionary) | {query}}
    near = sorted(((w, d) for w, d in found.items() if d <= budget), key=lambda wd: (wd[1], wd[0]))
    near += [(pad, levenshtein(pad, query))] * max(0, k - len(near))
    return near[:k]


def candidate_target(distances: torch.Tensor | Sequence, eps: float = 0.1) -> torch.Tensor:
    """``softmax(1 / (d + eps))`` over the last axis."""
    d = torch.as_tensor(distances, dtype=torch.float32)
    return torch.softmax(1.0 / (d + eps), dim=-1)


def distractor_loss(image_features: torch.Tensor, candidate_features: torch.Tensor, target: torch.Tensor,
                    logit_scale: float) -> torch.Tensor:
    """``KL(target || softmax(logit_scale * cos(image_b, candidate_bk)))``, batch mean. Shapes ``[B, D]``,
    ``[B, k, D]``, ``[B, k]``."""
    img = F.normalize(image_features, dim=-1)
    cand = F.normalize(candidate_features, dim=-1)
    logits = logit_scale * torch.einsum("bd,bkd->bk", img, cand)
    return F.kl_div(logits.log_softmax(-1), target, reduction="batchmean")


def shrink_box(box: Sequence[float], ratio: float = 0.4) -> tuple[float, float, float, float] | None:
    """The DB/PSENet kernel of an axis-aligned box ``(x0, y0, x1, y1)``: every side moved in by
    ``int(area (1 - ratio^2) / (perimeter + 0.001) + 0.5)``; None when nothing is left."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    offset = int(w * h * (1 - ratio * ratio) / (2 * (w + h) + 0.001) + 0.5)
    if 2 * offset >= w or 2 * offset >= h:
        return None
    return x0 + offset, y0 + offset, x1 - offset, y1 - offset


def text_kernel(boxes: Sequence[Sequence[float]], image_size: int, grid: int, ratio: float = 0.4) -> torch.Tensor:
    """``[grid, grid]`` 0/1 map: a patch is positive when its centre lies inside a shrunk box."""
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) * image_size / grid
    out = torch.zeros(grid, grid)
    for box in boxes:
        kern = shrink_box(box, ratio)
        if kern is None:
            continue
        x0, y0, x1, y1 = kern
        rows = (centres >= y0) & (centres < y1)
        cols = (centres >= x0) & (centres < x1)
        out[rows[:, None] & cols[None]] = 1.0
    return out


def balanced_bce(logits: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor | None = None,
                 negative_ratio: float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """Balanced BCE (DB's): all positives and the ``min(#neg, negative_ratio * #pos)`` largest negative losses,
    summed and divided by their count (+``eps``); only where ``mask`` is 1."""
    mask = torch.ones_like(gt) if mask is None else mask.to(gt.dtype)
    pos, neg = gt * mask, (1 - gt) * mask
    n_pos = int(pos.sum())
    n_neg = min(int(neg.sum()), int(n_pos * negative_ratio))
    loss = F.binary_cross_entropy_with_logits(logits, gt, reduction="none")
    neg_loss = torch.topk((loss * neg).reshape(-1), n_neg).values
    return ((loss * pos).sum() + neg_loss.sum()) / (n_pos + n_neg + eps)


class FocusBias(Hooks):
    """Hook set for the image tower: after block ``L - 2`` a linear ``head`` on the ``ln``-normalised patch rows
    predicts the text map (logits, kept in ``self.map`` ``[B, N]``); block ``L - 1``'s attention gets the additive
    bias ``[1, sigmoid(map)]`` on the class token's query row (other rows unbiased). ``enabled=False`` is a no-op."""

    def __init__(self, width: int, enabled: bool = True) -> None:
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, 1)
        self.enabled = enabled
        self.layers = None
        self.map: torch.Tensor | None = None

    def parameters(self):
        return list(self.ln.parameters()) + list(self.head.parameters())

    def bind(self, model) -> "FocusBias":
        self.layers = model.tower_layers()["image"]
        return self

    def resid(self, tower: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        if self.enabled and tower == "image" and layer == self.layers - 2:
            self.map = self.head(self.ln(x[:, 1:])).squeeze(-1)
        return x

    def attn_bias(self, tower: str, layer: int, n: int) -> torch.Tensor | None:
        if not (self.enabled and tower == "image" and layer == self.layers - 1):
            return None
        b = self.map.shape[0]
        row = torch.cat([torch.ones(b, 1, dtype=self.map.dtype), torch.sigmoid(self.map)], dim=1)  # [B, n]
        if row.shape[1] != n:
            raise ValueError(f"FocusBias: map has {row.shape[1] - 1} patches, the block {n - 1} tokens after CLS")
        bias = torch.zeros(b, 1, n, n, dtype=row.dtype)
        bias[:, 0, 0] = row
        return bias


def mean_average_precision(scores: torch.Tensor, relevant: torch.Tensor) -> float:
    """mAP of ``scores [Q, G]`` against 0/1 ``relevant [Q, G]`` (queries with no relevant image are skipped)."""
    aps = []
    for s, r in zip(scores, relevant.bool()):
        if not r.any():
            continue
        hits = r[s.argsort(descending=True)].float()
        precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1)
        aps.append(float((precision * hits).sum() / hits.sum()))
    return sum(aps) / len(aps) if aps else math.nan
