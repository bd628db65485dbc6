"""``DiffusionGenerator``: the small token-conditioned diffusion model, meeting :class:`ConditionalGenerator`.

Images live in [-1, 1] inside the model and come out of :meth:`sample` in [0, 1]. Sampling is deterministic DDIM with
classifier-free guidance against the empty prompt's conditioning (stored with the model, so a loaded generator needs
no text tower to sample from precomputed conditioning). Saved as ``generator.json`` + ``generator.safetensors``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .denoiser import DenoiserConfig, TokenDenoiser
from .protocol import Conditioning
from .schedule import NoiseSchedule

__all__ = ["DiffusionGenerator", "guided_sample"]


def guided_sample(predict_noise: Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor],
                  schedule: NoiseSchedule, image_size: int, cond: Conditioning, uncond: Conditioning | None = None,
                  scale: float = 1.0, steps: int = 25, seed: int = 0,
                  cond_at: Callable[[torch.Tensor], Conditioning] | None = None) -> torch.Tensor:
    """Images ``[B, 3, S, S]`` in [0, 1] by deterministic DDIM from noise drawn with ``seed``, with classifier-free
    guidance ``eps_u + scale (eps_c - eps_u)`` against ``uncond`` (one row is repeated; unused at ``scale=1``).
    ``predict_noise(x_t, t, cond)`` is any noise predictor (a generator, or a wrapper that transforms the
    conditioning first); ``cond_at(t)`` lets a wrapper pick the conditional branch per timestep (Switch-Off)."""
    b = len(cond)
    if scale != 1.0:
        if uncond is None:
            raise ValueError("guidance needs an unconditional conditioning (uncond=), or scale=1")
        if len(uncond) == 1 and b > 1:
            uncond = uncond.repeat(b)
        fixed = Conditioning.cat([cond, uncond]) if cond_at is None else None

        def predict(x, t):
            both = fixed if fixed is not None else Conditioning.cat([cond_at(t), uncond])
            c, u = predict_noise(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
            return u + scale * (c - u)
    else:
        def predict(x, t):
            return predict_noise(x, t, cond if cond_at is None else cond_at(t))
    x = schedule.ddim_sample(predict, (b, 3, image_size, image_size), steps=steps, seed=seed,
                             device=cond.tokens.device)
    return ((x + 1) / 2).clamp(0, 1)


class DiffusionGenerator(torch.nn.Module):
    def __init__(self, denoiser: TokenDenoiser, null: Conditioning | None = None, timesteps: int = 1000,
                 guidance: float = 3.0, info: dict | None = None, prediction: str = "v") -> None:
        super().__init__()
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
        self.denoiser = denoiser
        self.prediction = prediction
        self.schedule = NoiseSchedule(timesteps)
        self.guidance = float(guidance)
        self.info = dict(info or {})
        self.null = null

    # -------------------------------------------------------------- protocol
    @property
    def cond_dim(self) -> int:
        return self.denoiser.config.cond_dim

    @property
    def image_size(self) -> int:
        return self.denoiser.config.image_size

    @property
    def timesteps(self) -> int:
        return self.schedule.timesteps

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The noise in ``x_t``; a velocity-predicting denoiser's output is converted (``prediction="v"``)."""
        out = self.denoiser(x_t, t, cond)
        return out if self.prediction == "eps" else self.schedule.noise_from_velocity(x_t, t, out)

    def sample(self, cond: Conditioning, steps: int = 25, seed: int = 0, guidance: float | None = None,
               uncond: Conditioning | None = None) -> torch.Tensor:
        """Images ``[B, 3, S, S]`` in [0, 1]; ``guidance`` (default: the model's) scales classifier-free guidance
        against ``uncond`` (default: the stored empty-prompt conditioning); ``guidance=1`` is unguided."""
        scale = self.guidance if guidance is None else float(guidance)
        if scale != 1.0 and uncond is None:
            uncond = self.null_for(1)
        was_training = self.training
        self.eval()
        try:
            return guided_sample(self.predict_noise, self.schedule, self.image_size, cond, uncond=uncond,
                                 scale=scale, steps=steps, seed=seed)
        finally:
            self.train(was_training)

    def null_for(self, n: int) -> Conditioning:
        if self.null is None:
            raise ValueError("this generator has no stored unconditional conditioning: pass uncond= or guidance=1")
        return self.null.repeat(n)

    def loss(self, images: torch.Tensor, cond: Conditioning, generator: torch.Generator | None = None,
             t: torch.Tensor | None = None, noise: torch.Tensor | None = None, reduction: str = "mean"
             ) -> torch.Tensor:
        """The training loss for clean ``images`` in [0, 1] under ``cond`` (gradients reach ``cond.tokens``): the
        error of the denoiser's own target (the velocity for ``prediction="v"``, else the noise)."""
        return self.schedule.loss(lambda x, tt: self.denoiser(x, tt, cond), images * 2 - 1, t=t, noise=noise,
                                  generator=generator, reduction=reduction, prediction=self.prediction)

    # -------------------------------------------------------------- save / load
    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {f"denoiser.{k}": v.detach().contiguous() for k, v in self.denoiser.state_dict().items()}
        if self.null is not None:
            tensors["null.tokens"] = self.null.tokens.detach().contiguous()
            tensors["null.mask"] = self.null.mask.to(torch.uint8).contiguous()
        save_file(tensors, str(d / "generator.safetensors"))
        meta = {"format": "cliplab-generator", "format_version": 1, "denoiser": self.denoiser.config.to_dict(),
                "timesteps": self.timesteps, "guidance": self.guidance, "prediction": self.prediction,
                "info": self.info}
        (d / "generator.json").write_text(json.dumps(meta, indent=2) + "\n")
        return d

    @classmethod
    def load(cls, directory: str | Path) -> "DiffusionGenerator":
        d = Path(directory)
        meta_path = d / "generator.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{d} is not a saved generator (no generator.json)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != "cliplab-generator":
            raise ValueError(f"{meta_path} is not a cliplab generator file")
        tensors = load_file(str(d / "generator.safetensors"))
        denoiser = TokenDenoiser(DenoiserConfig(**meta["denoiser"]))
        denoiser.load_state_dict({k[len("denoiser."):]: v for k, v in tensors.items() if k.startswith("denoiser.")})
        null = None
        if "null.tokens" in tensors:
            null = Conditioning(tensors["null.tokens"], tensors["null.mask"].bool())
        return cls(denoiser, null=null, timesteps=meta["timesteps"], guidance=meta["guidance"], info=meta["info"],
                   prediction=meta.get("prediction", "eps"))

    def frozen(self) -> "DiffusionGenerator":
        """Eval mode with every parameter's ``requires_grad`` off (methods that train around a fixed generator)."""
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

