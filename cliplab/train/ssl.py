"""Self-supervised image losses used next to the contrastive loss (SLIP, A-CLIP): SimCLR's NT-Xent between two
views and BYOL's normalised regression onto a target."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["simclr_loss", "byol_loss"]


def simclr_loss(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """NT-Xent (SimCLR) over two views ``[B, D]`` (row ``i`` of ``a`` and of ``b`` are the positive pair).

    Each row of ``a`` is classified against every row of ``b`` and every *other* row of ``a``; the same from ``b``'s
    side; the two cross-entropies are averaged (SLIP's formulation, which A-CLIP uses)."""
    if a.shape != b.shape:
        raise ValueError(f"views must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    n = a.shape[0]
    labels = torch.arange(n, device=a.device)
    self_mask = torch.eye(n, device=a.device, dtype=torch.bool)
    aa = (a @ a.t() / temperature).masked_fill(self_mask, float("-inf"))
    bb = (b @ b.t() / temperature).masked_fill(self_mask, float("-inf"))
    ab, ba = a @ b.t() / temperature, b @ a.t() / temperature
    return (F.cross_entropy(torch.cat([ab, aa], 1), labels) + F.cross_entropy(torch.cat([ba, bb], 1), labels)) / 2


def byol_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean(2 - 2 cos(prediction, target))`` with the target detached (BYOL)."""
    p, z = F.normalize(prediction, dim=-1), F.normalize(target.detach(), dim=-1)
    return (2 - 2 * (p * z).sum(-1)).mean()
