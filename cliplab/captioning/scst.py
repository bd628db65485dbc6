"""Self-critical sequence training (SCST; Rennie et al., CVPR 2017): REINFORCE with the greedy decode as baseline.

For ``n`` samples per image with rewards ``r`` ``[B, n]``, the greedy caption's reward ``b`` ``[B]`` and the samples'
log-probs ``logp`` ``[B*n]`` (image-major), the loss is ``-mean(logp * (r - b))``: a sample scoring above the greedy
baseline gets its log-prob pushed up, one below it pushed down, one equal to it left alone. Generic: any reward.
"""

from __future__ import annotations

import torch

__all__ = ["scst_loss", "advantages"]


def advantages(rewards: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """``rewards - baseline`` flattened image-major to ``[B*n]``; ``rewards`` ``[B, n]``, ``baseline`` ``[B]``."""
    if rewards.dim() != 2 or baseline.shape != rewards.shape[:1]:
        raise ValueError(f"rewards must be [B, n] and baseline [B], got {tuple(rewards.shape)} and "
                         f"{tuple(baseline.shape)}")
    return (rewards - baseline.unsqueeze(1)).reshape(-1)


def scst_loss(log_probs: torch.Tensor, rewards: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """``-mean(logp * (r - b))`` with the advantage treated as a constant (no gradient through the rewards)."""
    adv = advantages(rewards.detach(), baseline.detach())
    if log_probs.shape != adv.shape:
        raise ValueError(f"log_probs must be [B*n] = {tuple(adv.shape)}, got {tuple(log_probs.shape)}")
    return -(log_probs * adv).mean()
