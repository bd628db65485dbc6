"""Recoverable Compression (Chen et al., "Recoverable Compression: A Multimodal Vision Token Recovery Mechanism
Guided by Text Information", 2024; official code banjiuyufen/Recoverable-Compression, ``clip_encoder.py``,
``token_recycling_with_text_in_vision_and_clustring``): keep the visually salient patch tokens, *recover* the tokens
salient to the question text, and merge the rest into a few cluster tokens.

Per image, on the ``n`` patch tokens ``x`` at the reduction point:

1. **Scores.** ``a`` = the attention the class token pays each patch in the block just run (averaged over heads);
   ``s`` = ``cos(text, project(x_j)) / sqrt(D)`` (the code's scaling; ``D`` the joint width), with ``project`` the
   tower's own token head (``ln_post`` then ``proj``) so patches and text meet in the joint space.
2. **Visual keep.** ``n_v = floor(r_v * n)`` tokens of highest ``a``, where ``r_v`` is the share of LOF outliers
   among the ``a`` values (Local Outlier Factor on the 1-D scores, ``vision_neighbors=20`` neighbours, outlier when
   LOF > 1.5: scikit-learn's ``contamination="auto"``).
3. **Text recovery.** With the visually kept tokens excluded, ``n_t = floor(r_t * (n - n_v))`` tokens of highest
   ``s`` (``r_t`` the LOF outlier share of ``s``, ``text_neighbors=20``). Kept = the union, in original order.
4. **Merge the rest.** Among the ``R`` remaining tokens, ``n_c = floor(r_c * n)`` centres of highest ``a`` (``r_c``
   the LOF outlier share of their ``a``, ``centre_neighbors=10``; at most ``R``). Each centre ``c`` takes the
   ``cluster_size=32`` other remaining tokens (centres included) with the highest ``cos(k_c, k_j) + text_weight * s_j``
   (``k``: the block's keys, heads concatenated; ``text_weight=50``) and becomes ``x_c + sum_j a_j x_j``
   (unnormalised weights, as in the code). One extra token ``sum_j a_j x_j`` over the non-centres is appended (none
   when every remaining token is a centre). With no centre, the remaining tokens are dropped and no extra token is
   made (as in the code).
5. **Output** ``[kept ; centres ; extra]``.

``ratio=`` gives a fixed-count mode for comparisons at equal token counts: ``M = n - round(ratio * n)`` output
tokens, of which ``round(centre_share * M)`` centres and one extra token (when merging), and the kept rest split
``vision_share`` : ``1 - vision_share`` between visual keep and text recovery (all visual without text).
``ratio=0`` keeps everything: the plain forward bit for bit.

**The text.** ``text`` is one feature per image ``[B, D]`` (or one ``[D]`` for all) in the joint space, e.g.
``model.encode_texts([...], normalize=True)``; :func:`recoverable_compression` also takes strings. The question's
text makes the image encoding query-dependent: for retrieval each (caption, image) pair is encoded with that caption.
``text=None`` switches the recovery (and the text term of the merge) off.

**Where it acts.** In the paper the compression runs on LLaVA's penultimate-layer patch features (``select_layer=-2``
of CLIP ViT-L/14-336) with the CLS attention of the last layer, and hands the result to the LLM's projector. In
cliplab it acts at a chosen layer ``L`` of the ViT (:func:`~cliplab.vision_tokens.encode_image_reduced`); the
default of :func:`recoverable_compression` is ``L = depth - 1``, the penultimate hidden states, so only the last
block (and the pooled CLS embedding) runs on the compressed tokens. ``layer = depth`` compresses the output tokens.

Differences from the official code, and why:

* The CLS attention is the block's real multi-head attention averaged over heads, from the block just before the
  reduction; the code recomputes a single-head softmax over the full-width ``q``/``k`` of the last layer.
* Patch features for the text score go through ``ln_post`` and ``proj`` of the tokens at the reduction layer (exact
  joint-space tokens only at ``layer = depth``); the code projects the last layer's tokens without the final LayerNorm.
* The text feature is the text tower's pooled output (EOT); the code takes the last *padded* position, a quirk.
* Text recovery excludes the visually kept tokens by ``-inf`` (the code sets their score to the row minimum, which
  can re-pick a kept token on ties), and the text LOF share is computed over the ``n - n_v`` candidates only (the
  code fits LOF on all ``n`` scores with the kept ones set to the minimum, a block of ties that LOF handles badly).
* The centre count is ``floor(r_c * n)`` as in the code's first variant (its active variant multiplies by the
  hidden width, a bug), capped at the remaining tokens.
* At least one token is kept visually (the code can keep none when no score is an outlier).
* Batches: LOF counts are per image (:attr:`RecoverableCompression.last_counts`); a batched forward needs one layout,
  so the batch uses the largest ``n_v``, ``n_t``, ``n_c`` of its images. With batch size 1 it is the code's rule.
* The index map (``extras["index_map"]``) records kept tokens and centres as themselves and every non-centre as
  standing for the extra token; a centre's overlapping cluster is not recorded there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..methods import register_method
from ..models.hooks import TowerOutput
from .forward import encode_image_reduced
from .reducer import TokenReducer, count_to_remove
from .registry import register_reducer
from .saliency import cls_attention, lof_outlier_fraction, patch_keys, text_patch_similarity

register_method(
    "recoverable_compression",
    "Recoverable Compression: A Multimodal Vision Token Recovery Mechanism Guided by Text Information",
    "keeps the CLS-salient vision tokens, recovers the tokens most similar to the question text (LOF outlier counts), "
    "and merges the rest into attention-weighted cluster tokens; training-free, text-conditioned, inside the ViT",
    doc="docs/methods/recoverable_compression.md",
)(__name__)

__all__ = ["RecoverableCompression", "merge_clusters", "recoverable_compression", "token_projector"]


def token_projector(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """The tower's token head as a function ``[B, n, W] -> [B, n, D]``: ``ln_post`` then ``proj`` (what
    ``output="tokens"`` applies to each token). CLIP-style towers only (not a probe-head pool)."""
    visual = model.visual
    if getattr(visual, "head", None) is not None:
        raise ValueError("token_projector needs a CLS-pooled tower (ln_post + proj); this one pools with a probe head")

    def project(tokens: torch.Tensor) -> torch.Tensor:
        y = visual.ln_post(tokens)
        return y if visual.proj is None else visual.proj(y)

    return project


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[B, k]`` of the ``k`` highest scores (stable for ties: lower index first)."""
    return scores.sort(dim=1, descending=True, stable=True).indices[:, :k]


def merge_clusters(tokens: torch.Tensor, weights: torch.Tensor, affinity: torch.Tensor, centres: torch.Tensor,
                   candidates: torch.Tensor, cluster_size: int) -> torch.Tensor:
    """The paper's merge: each centre ``c`` (``centres`` ``[B, C]`` indices into ``tokens`` ``[B, n, W]``) becomes
    ``x_c + sum_j weights_j * x_j`` over the ``cluster_size`` candidates ``j != c`` (``candidates`` ``[B, n]`` bool)
    with the highest ``affinity[b, c, j]`` (``affinity`` ``[B, C, n]``). Returns ``[B, C, W]``."""
    b, n, w = tokens.shape
    own = F.one_hot(centres, n).bool()  # [B, C, n]
    allowed = candidates.unsqueeze(1) & ~own
    k = min(int(cluster_size), int(allowed.sum(-1).min()) if allowed.numel() else 0)
    centre_tokens = tokens.gather(1, centres.unsqueeze(-1).expand(-1, -1, w))
    if k <= 0:
        return centre_tokens
    members = affinity.masked_fill(~allowed, float("-inf")).topk(k, dim=-1).indices  # [B, C, k]
    # a [B, C, n] matrix of the members' weights, so the sum is one matmul (no [B, C, k, W] gather)
    member_weights = weights.to(tokens.dtype).gather(1, members.flatten(1)).view_as(members)
    mix = torch.zeros(b, centres.shape[1], n, dtype=tokens.dtype, device=tokens.device)
    return centre_tokens + mix.scatter_(2, members, member_weights) @ tokens


class RecoverableCompression(TokenReducer):
    """Recoverable Compression as a :class:`~cliplab.vision_tokens.TokenReducer` (see the module docstring).

    ``ratio=None``: the paper's LOF-adaptive counts; a float: a fixed output count ``n - round(ratio * n)``.
    ``project``: maps tokens ``[B, n, W]`` to the space of ``text`` (:func:`token_projector`); without it the text
    must have the tokens' width. ``merge=False`` drops the remaining tokens instead of merging them."""

    needs = frozenset({"attention", "keys"})

    def __init__(self, ratio: float | None = None, *, project: Callable | None = None, vision_neighbors: int = 20,
                 text_neighbors: int = 20, centre_neighbors: int = 10, lof_threshold: float = 1.5,
                 cluster_size: int = 32, text_weight: float = 50.0, vision_share: float = 0.5,
                 centre_share: float = 0.1, merge: bool = True):
        if ratio is not None:
            count_to_remove(ratio, 1)  # validates
        for name, v in (("vision_share", vision_share), ("centre_share", centre_share)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        self.ratio, self.project = ratio, project
        self.vision_neighbors, self.text_neighbors, self.centre_neighbors = vision_neighbors, text_neighbors, \
            centre_neighbors
        self.lof_threshold, self.cluster_size, self.text_weight = lof_threshold, cluster_size, text_weight
        self.vision_share, self.centre_share, self.merge = vision_share, centre_share, merge
        self.last_counts: dict[str, torch.Tensor] | None = None

    def text_scores(self, tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``[B, n]``: ``cos(text, project(token)) / sqrt(D)``."""
        patches = tokens if self.project is None else self.project(tokens)
        return text_patch_similarity(patches, text) * patches.shape[-1] ** -0.5

    def _fixed_counts(self, n: int, has_text: bool) -> tuple[int, int, int, int]:
        m = n - count_to_remove(self.ratio, n)
        n_c = round(self.centre_share * m) if self.merge else 0
        extra = 1 if n_c > 0 and m - n_c - 1 >= 1 else 0
        n_c = n_c if extra else 0
        kept = m - n_c - extra
        n_v = kept - round((1.0 - self.vision_share) * kept) if has_text else kept
        return max(n_v, 1 if kept else 0), kept - max(n_v, 1 if kept else 0), n_c, extra

    def reduce(self, tokens, attention, keys, text, *, sizes):
        b, n, w = tokens.shape
        if self.ratio is not None and count_to_remove(self.ratio, n) == 0:  # keep all: the very tensor
            return tokens, torch.arange(n, device=tokens.device).expand(b, -1).clone()
        a = cls_attention(attention, n, "RecoverableCompression")
        s = None if text is None else self.text_scores(tokens, text).double()
        # 1. visual keep
        if self.ratio is None:
            per_v = torch.floor(lof_outlier_fraction(a, self.vision_neighbors, self.lof_threshold) * n).long()
            n_v = max(int(per_v.max()), 1)
        else:
            n_v, n_t_fixed, n_c_fixed, _ = self._fixed_counts(n, s is not None)
            per_v = torch.full((b,), n_v)
        by_vision = _top(a, n_v)
        kept_mask = torch.zeros(b, n, dtype=torch.bool, device=tokens.device).scatter_(1, by_vision, True)
        # 2. text recovery among the rest
        per_t = torch.zeros(b, dtype=torch.long)
        n_t = 0
        if s is not None:
            masked = s.masked_fill(kept_mask, float("-inf"))
            if self.ratio is None:
                rest = s[~kept_mask].view(b, n - n_v)
                per_t = torch.floor(lof_outlier_fraction(rest, self.text_neighbors, self.lof_threshold)
                                    * (n - n_v)).long()
                n_t = int(per_t.max())
            else:
                n_t = n_t_fixed
                per_t = torch.full((b,), n_t)
            if n_t:
                kept_mask.scatter_(1, _top(masked, n_t), True)
        kept_idx = kept_mask.float().sort(dim=1, descending=True, stable=True).indices[:, :n_v + n_t].sort(1).values
        n_keep, r = n_v + n_t, n - n_v - n_t
        # 3. centres among the remaining tokens, by CLS attention
        n_c = 0
        per_c = torch.zeros(b, dtype=torch.long)
        if self.merge and r:
            a_rest = a.masked_fill(kept_mask, float("-inf"))
            if self.ratio is None:
                rest_a = a[~kept_mask].view(b, r)
                per_c = torch.floor(lof_outlier_fraction(rest_a, self.centre_neighbors, self.lof_threshold)
                                    * n).long().clamp(max=r)
                n_c = int(per_c.max())
            else:
                n_c = n_c_fixed
                per_c = torch.full((b,), n_c)
        self.last_counts = {"vision": per_v.cpu(), "text": per_t.cpu(), "centres": per_c.cpu()}
        out_kept = tokens.gather(1, kept_idx.unsqueeze(-1).expand(-1, -1, w))
        step = torch.full((b, n), -1, dtype=torch.long, device=tokens.device)
        step.scatter_(1, kept_idx, torch.arange(n_keep, device=tokens.device).expand(b, -1).contiguous())
        if n_c == 0:  # no centre: the remaining tokens are dropped, no extra token (as in the code)
            return out_kept, step
        centres = _top(a_rest, n_c)  # descending attention, as the code's topk
        remaining = ~kept_mask
        key = F.normalize(patch_keys(keys, n, "concat"), dim=-1)
        affinity = key.gather(1, centres.unsqueeze(-1).expand(-1, -1, key.shape[-1])) @ key.transpose(1, 2)
        if s is not None:
            affinity = affinity + self.text_weight * s.to(affinity.dtype).unsqueeze(1)
        merged = merge_clusters(tokens, a, affinity, centres, remaining, self.cluster_size)
        step.scatter_(1, centres, n_keep + torch.arange(n_c, device=tokens.device).expand(b, -1).contiguous())
        if n_c == r:  # every remaining token is a centre: no extra token (it would stand for nothing)
            return torch.cat([out_kept, merged], dim=1), step
        non_centre = remaining.clone().scatter_(1, centres, False)
        extra = (tokens * (a * non_centre).to(tokens.dtype).unsqueeze(-1)).sum(1, keepdim=True)
        step = torch.where(non_centre, torch.full_like(step, n_keep + n_c), step)
        return torch.cat([out_kept, merged, extra], dim=1), step


def recoverable_compression(model, pixels: torch.Tensor, text: torch.Tensor | str | Sequence[str] | None,
                            ratio: float | None = None, layer: int | None = None, *, vision_neighbors: int = 20,
                            text_neighbors: int = 20, centre_neighbors: int = 10, lof_threshold: float = 1.5,
                            cluster_size: int = 32, text_weight: float = 50.0, vision_share: float = 0.5,
                            centre_share: float = 0.1, merge: bool = True, output=False,
                            normalize: bool = False) -> TowerOutput:
    """Encode ``pixels`` with Recoverable Compression before block ``layer`` (default ``depth - 1``: the penultimate
    hidden states, as LLaVA's ``select_layer=-2``). ``text``: joint-space features ``[B, D]`` / ``[D]``, strings (one
    per image, or one for all; encoded with ``model.encode_texts``), or None. ``extras["recoverable_counts"]`` holds
    each image's LOF counts."""
    if isinstance(text, str):
        text = [text]
    if text is not None and not isinstance(text, torch.Tensor):
        text = model.encode_texts(list(text), normalize=True)
    depth = len(model.visual.transformer.blocks)
    reducer = RecoverableCompression(ratio, project=token_projector(model), vision_neighbors=vision_neighbors,
                                     text_neighbors=text_neighbors, centre_neighbors=centre_neighbors,
                                     lof_threshold=lof_threshold, cluster_size=cluster_size, text_weight=text_weight,
                                     vision_share=vision_share, centre_share=centre_share, merge=merge)
    out = encode_image_reduced(model, pixels, reducer, depth - 1 if layer is None else layer, text=text,
                               output=output, normalize=normalize)
    out.extras["recoverable_counts"] = reducer.last_counts
    return out


@register_reducer("recoverable_compression", default_layer=lambda depth: depth - 1, text_guided=True,
                  summary="CLS-salient tokens kept, text-salient ones recovered, the rest merged (paper: the "
                          "penultimate layer)")
def _recoverable_reducer(keep: float, model) -> TokenReducer:
    return RecoverableCompression(ratio=1.0 - keep, project=token_projector(model))
