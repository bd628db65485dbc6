"""Token saliency helpers shared by the vision token reducers: CLS attention to the patches, patch keys as one
vector per token, batched Local Outlier Factor (the outlier rule of Recoverable Compression), the IQR outlier rule,
and patch-to-text cosine similarity. All batched over images; no loops over tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cls_attention(attention: torch.Tensor | None, n: int, who: str = "this reducer") -> torch.Tensor:
    """``[B, H, P + n, P + n]`` probabilities of the block just run -> ``[B, n]`` float32: the attention the class
    token (row 0) pays each of the last ``n`` (patch) tokens, averaged over heads."""
    if attention is None:
        raise ValueError(f"{who} scores patches by CLS attention and needs a block before it (layer >= 1)")
    if attention.shape[-1] == n:
        raise ValueError(f"{who} scores patches by CLS attention and needs a model with a class token")
    return attention[:, :, 0, attention.shape[-1] - n:].float().mean(1)


def patch_keys(keys: torch.Tensor, n: int, heads: str = "mean") -> torch.Tensor:
    """``[B, H, P + n, d]`` keys -> ``[B, n, *]`` float32 of the last ``n`` tokens: averaged over heads (``"mean"``,
    ToMe's choice) or the heads concatenated (``"concat"``, the full-width ``k_proj`` output)."""
    k = keys[:, :, keys.shape[2] - n:].float()
    if heads == "mean":
        return k.mean(1)
    if heads == "concat":
        return k.transpose(1, 2).reshape(k.shape[0], n, -1)
    raise ValueError(f"unknown heads mode {heads!r}; choose 'mean' or 'concat'")


def local_outlier_factor(points: torch.Tensor, k: int = 20) -> torch.Tensor:
    """Local Outlier Factor of every point among the others of its row, batched: ``points`` ``[B, n]`` (scalars) or
    ``[B, n, d]`` -> ``[B, n]``. The same arithmetic as scikit-learn's ``LocalOutlierFactor`` fitted on each row
    (neighbours exclude the point itself; ``k`` is capped at ``n - 1``; ``lrd = 1 / (mean reach-dist + 1e-10)``).
    With ``contamination="auto"`` scikit-learn calls a point an outlier when its LOF exceeds 1.5."""
    x = points.double()
    if x.dim() == 2:
        x = x.unsqueeze(-1)
    n = x.shape[1]
    if n < 2:
        return torch.ones(x.shape[:2], dtype=torch.float64, device=x.device)
    k = max(1, min(int(k), n - 1))
    dist = torch.cdist(x, x)
    dist.diagonal(dim1=1, dim2=2).fill_(float("inf"))  # a point is not its own neighbour
    near, idx = dist.topk(k, dim=-1, largest=False)  # [B, n, k]
    k_distance = near[..., -1]  # [B, n]
    reach = torch.maximum(near, k_distance.gather(1, idx.flatten(1)).view_as(idx))
    lrd = 1.0 / (reach.mean(-1) + 1e-10)
    return lrd.gather(1, idx.flatten(1)).view_as(idx).mean(-1) / lrd


def lof_outlier_fraction(points: torch.Tensor, k: int = 20, threshold: float = 1.5) -> torch.Tensor:
    """``[B]`` float: the share of each row's points that are LOF outliers (``LOF > threshold``; 1.5 is
    scikit-learn's ``contamination="auto"``). Recoverable Compression turns this share into a keep ratio."""
    return (local_outlier_factor(points, k) > threshold).double().mean(-1)


def iqr_outliers(scores: torch.Tensor, whisker: float = 1.5) -> torch.Tensor:
    """``[B, n]`` -> ``[B, n]`` bool: high outliers of each row by Tukey's rule, ``score > Q3 + whisker * IQR``."""
    q = torch.quantile(scores.double(), torch.tensor([0.25, 0.75], dtype=torch.float64, device=scores.device),
                       dim=1)  # [2, B]
    return scores.double() > (q[1] + whisker * (q[1] - q[0])).unsqueeze(1)


def text_patch_similarity(patches: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Cosine similarity ``[B, n]`` of each patch ``[B, n, D]`` with its image's text feature ``[B, D]`` (or one
    ``[D]`` / ``[1, D]`` for every image). Both must be in the same space (e.g. the joint space)."""
    text = text.reshape(-1, text.shape[-1]) if text.dim() != 2 else text
    if text.shape[-1] != patches.shape[-1]:
        raise ValueError(f"text features have width {text.shape[-1]}, the patches {patches.shape[-1]}; pass text "
                         "in the space the patches are projected to (e.g. model.encode_text features)")
    if text.shape[0] not in (1, patches.shape[0]):
        raise ValueError(f"need one text feature per image ({patches.shape[0]}) or one for all, got {text.shape[0]}")
    t = F.normalize(text.float(), dim=-1).to(patches.device)
    return (F.normalize(patches.float(), dim=-1) @ t.unsqueeze(-1)).squeeze(-1) if t.shape[0] == patches.shape[0] \
        else F.normalize(patches.float(), dim=-1) @ t[0]
