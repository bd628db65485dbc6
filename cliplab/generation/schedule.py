"""A DDPM noise schedule (cosine, Nichol & Dhariwal 2021) with the forward process, the noise- or velocity-prediction
loss and a deterministic DDIM sampler."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["NoiseSchedule"]


class NoiseSchedule:
    """``alpha_bar[t]`` for ``t = 0 .. timesteps-1`` from the cosine schedule (clipped so betas stay <= 0.999)."""

    def __init__(self, timesteps: int = 1000, offset: float = 0.008) -> None:
        if timesteps < 2:
            raise ValueError("timesteps must be >= 2")
        self.timesteps = int(timesteps)
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        f = torch.cos((steps + offset) / (1 + offset) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        self.alpha_bar = torch.cumprod(1 - betas, 0).float()

    def _abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self.alpha_bar.to(like.device)[t].view(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``."""
        a = self._abar(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        a = self._abar(t, x_t)
        return (x_t - (1 - a).sqrt() * eps) / a.sqrt()

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        return torch.randint(0, self.timesteps, (n,), generator=generator, device=device)

    def velocity(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The v target ``sqrt(abar_t) noise - sqrt(1 - abar_t) x0`` (Salimans & Ho 2022)."""
        a = self._abar(t, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def noise_from_velocity(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t``: a v-predicting model read as a noise predictor."""
        a = self._abar(t, x_t)
        return a.sqrt() * v + (1 - a).sqrt() * x_t

    def loss(self, predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor,
             t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
             generator: torch.Generator | None = None, reduction: str = "mean", prediction: str = "eps"
             ) -> torch.Tensor:
        """The denoising loss ``|target - predict(x_t, t)|^2`` with target the noise (``prediction="eps"``) or the
        velocity (``"v"``); ``reduction="none"`` gives one value per image."""
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
        if t is None:
            t = self.sample_timesteps(x0.shape[0], generator, x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        target = noise if prediction == "eps" else self.velocity(x0, t, noise)
        err = (predict(self.add_noise(x0, t, noise), t) - target).pow(2)
        if reduction == "none":
            return err.flatten(1).mean(1)
        if reduction != "mean":
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        return err.mean()

    def ddim_timesteps(self, steps: int) -> list[int]:
        """``steps`` timesteps from ``T-1`` down to 0, evenly spaced."""
        if not 1 <= steps <= self.timesteps:
            raise ValueError(f"steps must be in [1, {self.timesteps}], got {steps}")
        return [int(round(v)) for v in torch.linspace(self.timesteps - 1, 0, steps).tolist()]

    @torch.no_grad()
    def ddim_sample(self, predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], shape: tuple[int, ...],
                    steps: int = 25, seed: int = 0, device=None, clip_x0: bool = True,
                    on_step: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Deterministic DDIM (eta=0) from pure noise drawn with ``seed``; returns ``x_0`` in the model's [-1, 1]
        scale. ``predict(x_t, t)`` gets a ``[B]`` timestep tensor."""
        gen = torch.Generator().manual_seed(int(seed))
        x = torch.randn(shape, generator=gen).to(device or "cpu")
        ts = self.ddim_timesteps(steps)
        for i, t in enumerate(ts):
            tt = torch.full((shape[0],), t, dtype=torch.long, device=x.device)
            eps = predict(x, tt)
            x0 = self.predict_x0(x, tt, eps)
            if clip_x0:
                x0 = x0.clamp(-1, 1)
            a_next = self.alpha_bar[ts[i + 1]].item() if i + 1 < len(ts) else 1.0
            a_t = self.alpha_bar[t].item()
            eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)  # consistent with the clipped x0
            x = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps
            if on_step is not None:
                on_step(t, x)
        return x

