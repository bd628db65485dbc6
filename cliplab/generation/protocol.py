"""The protocol every text-to-image consumer in cliplab meets, and the conditioning it reads.

Methods that edit or learn text conditioning (WiCLP, CoRe, ELLA, attribute control, un²CLIP) talk to a generator
only through :class:`ConditionalGenerator`, so a real diffusion backend (a Stable Diffusion UNet reading CLIP's
per-token states) can replace the small one shipped here without touching them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

__all__ = ["Conditioning", "ConditionalGenerator"]


@dataclass
class Conditioning:
    """A batch of conditioning sequences: ``tokens`` ``[B, L, D]`` and ``mask`` ``[B, L]`` (True = attend).

    Positions past a prompt's end (padding) are masked out, so a prompt's conditioning never depends on how long the
    other prompts of its batch are."""

    tokens: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self) -> None:
        if self.tokens.dim() != 3:
            raise ValueError(f"conditioning tokens must be [B, L, D], got shape {tuple(self.tokens.shape)}")
        if self.mask.shape != self.tokens.shape[:2]:
            raise ValueError(f"mask shape {tuple(self.mask.shape)} does not match tokens {tuple(self.tokens.shape[:2])}")
        if not bool(self.mask.any(dim=1).all()):
            raise ValueError("every conditioning row needs at least one unmasked token")
        self.mask = self.mask.bool()

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def dim(self) -> int:
        return self.tokens.shape[-1]

    def select(self, index) -> "Conditioning":
        """Rows ``index`` (a slice, a list or a tensor of indices)."""
        return Conditioning(self.tokens[index], self.mask[index])

    def repeat(self, n: int) -> "Conditioning":
        """Every row ``n`` times in a row (``[a, a, b, b]`` for ``n=2``)."""
        return Conditioning(self.tokens.repeat_interleave(n, 0), self.mask.repeat_interleave(n, 0))

    def detach(self) -> "Conditioning":
        return Conditioning(self.tokens.detach(), self.mask)

    @staticmethod
    def cat(parts: "list[Conditioning]") -> "Conditioning":
        """Rows of several batches, padded to the longest sequence."""
        length = max(p.tokens.shape[1] for p in parts)
        tokens, masks = [], []
        for p in parts:
            pad = length - p.tokens.shape[1]
            tokens.append(torch.nn.functional.pad(p.tokens, (0, 0, 0, pad)))
            masks.append(torch.nn.functional.pad(p.mask, (0, pad), value=False))
        return Conditioning(torch.cat(tokens), torch.cat(masks))

    @staticmethod
    def single(vectors: torch.Tensor) -> "Conditioning":
        """One conditioning token per row from ``[B, D]`` vectors (pooled or image-embedding conditioning)."""
        if vectors.dim() != 2:
            raise ValueError(f"expected [B, D] vectors, got shape {tuple(vectors.shape)}")
        return Conditioning(vectors[:, None, :], torch.ones(vectors.shape[0], 1, dtype=torch.bool,
                                                            device=vectors.device))


@runtime_checkable
class ConditionalGenerator(Protocol):
    """An image generator conditioned on a token sequence.

    * ``predict_noise(x_t, t, cond)``: the noise ``eps`` in ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``, for
      images ``x_t`` ``[B, 3, H, W]`` in [-1, 1] scale, integer timesteps ``t`` ``[B]`` in ``[0, timesteps)``;
    * ``sample(cond, steps, seed)``: images ``[B, 3, H, W]`` in [0, 1] drawn for each conditioning row;
    * ``cond_dim`` and ``image_size``: what it reads and draws; ``timesteps``: the training schedule's length.
    """

    cond_dim: int
    image_size: int
    timesteps: int

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor: ...

    def sample(self, cond: Conditioning, steps: int = 25, seed: int = 0) -> torch.Tensor: ...
