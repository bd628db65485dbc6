"""Token-level Correlation-guided Compression (Zhang et al., "Token-level Correlation-guided Compression for
Efficient Multimodal Document Understanding", arXiv 2407.14439; official repository JiuTian-VL/TokenCorrCompressor,
which holds no code): the number of patch tokens kept follows the image's *information density*, measured by
patch-patch correlation, and which tokens are kept follows their correlation with the class token.

Per image, on the ``n`` patch tokens at the reduction point:

1. **Pattern repetitiveness.** ``S`` = cosine similarity of the patches' keys (the previous block's keys averaged
   over heads; ``metric="tokens"`` uses the residual stream). Token ``i`` is *redundant* when at least ``limit``
   other tokens are near-duplicates of it (``S_ij > threshold``) and rank above it (higher CLS correlation, ties to
   the lower index). Information density ``rho = 1 - #redundant / n``.
2. **Adaptive keep count.** ``K = clamp(ceil(density_scale * rho * n), max(min_keep, #global), n)``.
3. **Selection by CLS-patch correlation** (the attention the class token pays each patch in the block just run,
   averaged over heads): the IQR outliers of that score (``score > Q3 + 1.5 IQR``, the paper's "global" tokens)
   first, then the non-redundant tokens, then the redundant ones, each tier by descending score; the ``K`` best are
   kept in their original order and the rest dropped.

``ratio=`` gives a fixed-ratio mode (remove ``round(ratio * n)`` tokens, the same selection) so that the method can
be compared with others at equal token counts; ``ratio=None`` (default) is the paper's adaptive mode.

**Where it acts.** In the paper the compressor sits between the vision encoder (CLIP-ViT of mPLUG-DocOwl1.5) and the
LLM, on each sub-image's output tokens. In cliplab it acts at a chosen layer ``L`` of the ViT through
:func:`~cliplab.vision_tokens.encode_image_reduced`: ``layer = depth`` (the default of :func:`tcc_compress`) is after
the last block, before ``ln_post``/projection, i.e. the tokens handed onward (``output="tokens"`` gives them in the
joint space); a smaller ``layer`` lets the remaining blocks (and so the pooled CLS embedding) run on fewer tokens.
The class token is never dropped.

Differences from the paper, and why:

* **Redundancy keeps one representative.** The paper counts a token as redundant when it has many highly similar
  counterparts, so every member of a duplicated group counts. Here a token needs ``limit`` similar tokens that rank
  *above* it, so a group of ``m`` identical patches counts ``m - 1`` redundant tokens and its best member stays:
  a uniform region keeps one token instead of none, and duplicated patches are the first to go.
* **Deterministic top-K.** The paper samples local tokens with probabilities from a shallow layer's CLS attention
  and takes global tokens from a deep layer's; here one score (the block just before the reduction) serves both,
  and the selection is a deterministic top-K, so results are reproducible and the keep count is exact.
* **Batches.** The adaptive ``K`` is computed per image (:attr:`TCCCompress.last_counts`); a batched forward needs
  one token count, so every image keeps the batch's largest ``K`` (images with a smaller ``K`` keep their next-best
  tokens). With batch size 1 the count is exactly the paper's.
* **Hyperparameters.** ``threshold=0.9`` and ``limit=1`` are this implementation's defaults (the paper's values are
  for CLIP ViT-L keys and DocOwl's documents); ``density_scale`` (1 = the paper's ``K = rho * n``) is an added knob.
* The paper's weighted aggregation of sampled tokens into the LLM adapter and its sub-image cropping are not part of
  a ViT-internal reducer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..methods import register_method
from ..models.hooks import TowerOutput
from .forward import encode_image_reduced
from .reducer import TokenReducer, count_to_remove, keep_assignment
from .registry import register_reducer
from .saliency import cls_attention, iqr_outliers, patch_keys

register_method(
    "tcc_compress",
    "Token-level Correlation-guided Compression for Efficient Multimodal Document Understanding (TCC)",
    "patch-patch key correlation gives each image's information density, which sets how many vision tokens are kept "
    "(adaptive); CLS-patch correlation (IQR outliers first) picks which; training-free, inside the ViT at any layer",
    doc="docs/methods/tcc_compress.md",
)(__name__)

__all__ = ["TCCCompress", "information_density", "redundant_tokens", "tcc_compress", "tcc_keep_count"]


def redundant_tokens(metric: torch.Tensor, scores: torch.Tensor, threshold: float = 0.9,
                     limit: int = 1) -> torch.Tensor:
    """``[B, n]`` bool: token ``i`` is redundant when at least ``limit`` other tokens have cosine similarity
    ``> threshold`` with it (on ``metric`` ``[B, n, d]``) and rank above it (higher ``scores``, ties to the lower
    index)."""
    if limit < 1:
        raise ValueError(f"limit must be >= 1 (similar tokens needed to call a token redundant), got {limit}")
    unit = F.normalize(metric.float(), dim=-1)
    near = unit @ unit.transpose(1, 2) > threshold  # [B, n, n]
    n = metric.shape[1]
    s = scores.double()
    index = torch.arange(n, device=metric.device)
    above = (s.unsqueeze(1) > s.unsqueeze(2)) | ((s.unsqueeze(1) == s.unsqueeze(2)) & (index < index.unsqueeze(1)))
    # above[b, i, j]: token j ranks above token i (never true for j == i)
    return (near & above).sum(-1) >= limit


def information_density(metric: torch.Tensor, scores: torch.Tensor, threshold: float = 0.9,
                        limit: int = 1) -> torch.Tensor:
    """``[B]`` float64: ``rho = 1 - #redundant / n`` (see :func:`redundant_tokens`)."""
    return 1.0 - redundant_tokens(metric, scores, threshold, limit).double().mean(-1)


def tcc_keep_count(density: torch.Tensor, n: int, density_scale: float = 1.0, min_keep: int = 1,
                   n_global: torch.Tensor | None = None) -> torch.Tensor:
    """``[B]`` long: the adaptive keep count ``clamp(ceil(density_scale * rho * n), max(min_keep, n_global), n)``."""
    k = torch.ceil(density.double() * n * density_scale - 1e-9).long()  # -1e-9: rho * n integral stays integral
    low = torch.full_like(k, min(max(int(min_keep), 1), n))
    if n_global is not None:
        low = torch.maximum(low, n_global.long().clamp(max=n))
    return torch.minimum(torch.maximum(k, low), torch.full_like(k, n))


class TCCCompress(TokenReducer):
    """TCC as a :class:`~cliplab.vision_tokens.TokenReducer` (see the module docstring). ``ratio=None``: adaptive
    keep count from the information density; a float: remove ``round(ratio * n)`` tokens (0 keeps everything, the
    plain forward bit for bit). ``metric``: ``"keys"`` (the previous block's keys, averaged over heads; the paper's
    choice) or ``"tokens"``. ``global_outliers``: keep the IQR outliers of the CLS score first (``whisker`` * IQR
    above Q3). Needs a block before it (``layer >= 1``) and a class token."""

    def __init__(self, ratio: float | None = None, *, threshold: float = 0.9, limit: int = 1,
                 density_scale: float = 1.0, min_keep: int = 1, metric: str = "keys", global_outliers: bool = True,
                 whisker: float = 1.5):
        if ratio is not None:
            count_to_remove(ratio, 1)  # validates
        if metric not in ("keys", "tokens"):
            raise ValueError(f"unknown TCC metric {metric!r}; choose 'keys' or 'tokens'")
        if density_scale <= 0:
            raise ValueError(f"density_scale must be > 0, got {density_scale}")
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.ratio, self.threshold, self.limit = ratio, threshold, limit
        self.density_scale, self.min_keep, self.metric = density_scale, min_keep, metric
        self.global_outliers, self.whisker = global_outliers, whisker
        self.needs = frozenset({"attention", "keys"} if metric == "keys" else {"attention"})
        self.last_counts: torch.Tensor | None = None
        self.last_density: torch.Tensor | None = None

    def reduce(self, tokens, attention, keys, text, *, sizes):
        b, n, w = tokens.shape
        if self.ratio is not None and count_to_remove(self.ratio, n) == 0:  # keep all: the very tensor
            self.last_counts = torch.full((b,), n, dtype=torch.long)
            return tokens, torch.arange(n, device=tokens.device).expand(b, -1).clone()
        scores = cls_attention(attention, n, "TCCCompress")
        metric = tokens if self.metric == "tokens" else patch_keys(keys, n, "mean")
        redundant = redundant_tokens(metric, scores, self.threshold, self.limit)
        density = 1.0 - redundant.double().mean(-1)
        is_global = iqr_outliers(scores, self.whisker) if self.global_outliers else torch.zeros_like(redundant)
        if self.ratio is None:
            counts = tcc_keep_count(density, n, self.density_scale, self.min_keep, is_global.sum(-1))
        else:
            counts = torch.full((b,), n - count_to_remove(self.ratio, n), dtype=torch.long)
        self.last_counts, self.last_density = counts.cpu(), density.cpu()
        k = int(counts.max())
        # tiers: global (2) > non-redundant (1) > redundant (0); attention probabilities lie in [0, 1]
        tier = torch.where(is_global, 2.0, torch.where(redundant, 0.0, 1.0)).double()
        keep = (tier * 2.0 + scores.double()).topk(k, dim=1).indices.sort(dim=1).values
        kept = tokens.gather(1, keep.unsqueeze(-1).expand(-1, -1, w))
        return kept, keep_assignment(keep, n)


def tcc_compress(model, pixels: torch.Tensor, ratio: float | None = None, layer: int | None = None, *,
                 threshold: float = 0.9, limit: int = 1, density_scale: float = 1.0, min_keep: int = 1,
                 metric: str = "keys", global_outliers: bool = True, whisker: float = 1.5, output=False,
                 normalize: bool = False) -> TowerOutput:
    """Encode ``pixels`` with TCC applied before block ``layer`` (default: the tower's depth, i.e. on the tokens
    handed onward, as in the paper). Returns :func:`encode_image_reduced`'s output; ``extras["tcc_counts"]`` and
    ``extras["tcc_density"]`` hold each image's keep count and information density."""
    depth = len(model.visual.transformer.blocks)
    reducer = TCCCompress(ratio, threshold=threshold, limit=limit, density_scale=density_scale, min_keep=min_keep,
                          metric=metric, global_outliers=global_outliers, whisker=whisker)
    out = encode_image_reduced(model, pixels, reducer, depth if layer is None else layer, output=output,
                               normalize=normalize)
    out.extras["tcc_counts"], out.extras["tcc_density"] = reducer.last_counts, reducer.last_density
    return out


@register_reducer("tcc_compress", default_layer=lambda depth: depth,
                  summary="correlation-guided compression: redundant tokens go first, CLS-correlated tokens stay "
                          "(paper: the output tokens)")
def _tcc_reducer(keep: float, model) -> TokenReducer:
    return TCCCompress(ratio=1.0 - keep)
