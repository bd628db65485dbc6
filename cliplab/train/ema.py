"""Exponential-moving-average (EMA) teachers: a frozen copy of a module that trails the trained one.

``theta_ema <- m * theta_ema + (1 - m) * theta`` for every parameter (buffers, e.g. BatchNorm statistics, are
copied), with the momentum ``m`` raised from ``base`` to ``final`` on a cosine over the run (BYOL's and A-CLIP's
schedule). Used by A-CLIP (the EMA image encoder whose attention picks the kept patches, and BYOL's target
projector).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

__all__ = ["cosine_momentum", "ema_update_", "EMATeacher"]


def cosine_momentum(step: int, total: int, base: float = 0.996, final: float = 1.0) -> float:
    """``final - (final - base) * (cos(pi * step / total) + 1) / 2``: ``base`` at step 0, ``final`` at ``total``."""
    if total <= 0:
        return float(base)
    t = min(max(step, 0), total) / total
    return final - (final - base) * (math.cos(math.pi * t) + 1) / 2


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place: ``t <- m * t + (1 - m) * s`` for every parameter pair (same names, same order); buffers copied."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    t_params, s_params = dict(teacher.named_parameters()), dict(student.named_parameters())
    if t_params.keys() != s_params.keys():
        raise ValueError("teacher and student have different parameters (was the student rebuilt?)")
    for name, t in t_params.items():
        t.mul_(momentum).add_(s_params[name].detach().to(t.dtype), alpha=1.0 - momentum)
    s_buffers = dict(student.named_buffers())
    for name, b in teacher.named_buffers():
        b.copy_(s_buffers[name])


class EMATeacher(nn.Module):
    """A frozen deep copy of ``student`` updated by :meth:`update`; its parameters never need gradients and are
    left out of optimizers (``requires_grad=False``). Being a submodule of its owner, it is saved with the owner's
    state dict (so a resumed run continues the same teacher)."""

    def __init__(self, student: nn.Module, base: float = 0.996, final: float = 1.0, total_steps: int = 0):
        super().__init__()
        if not 0.0 <= base <= final <= 1.0:
            raise ValueError(f"need 0 <= base <= final <= 1, got base={base}, final={final}")
        self.module = copy.deepcopy(student).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.base, self.final, self.total_steps = float(base), float(final), int(total_steps)

    def momentum(self, step: int) -> float:
        return cosine_momentum(step, self.total_steps, self.base, self.final)

    def update(self, student: nn.Module, step: int) -> float:
        """One EMA step at the schedule's momentum for ``step``; returns the momentum used."""
        m = self.momentum(step)
        ema_update_(self.module, student, m)
        return m

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)
