"""Training the small generator: the denoising loss on :class:`GenerationScenes` under a frozen text tower's
per-token conditioning, with prompt dropout (for classifier-free guidance) and an EMA of the weights (what is saved).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..progress import Progress
from .conditioning import TextConditioner
from .denoiser import DenoiserConfig, TokenDenoiser
from .generator import DiffusionGenerator
from .scenes import GenerationScenes

__all__ = ["GeneratorTrainConfig", "train_generator"]


@dataclass
class GeneratorTrainConfig:
    steps: int = 1600
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 100
    n_images: int = 12000
    cond_dropout: float = 0.1      # prompts replaced by "" (the unconditional branch of guidance)
    ema_decay: float = 0.995
    guidance: float = 3.0
    prediction: str = "v"          # velocity: well conditioned at high noise, where eps-prediction's x0 is not
    seed: int = 0
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)
        for e, b in zip(ema.buffers(), model.buffers()):
            e.copy_(b)


def train_generator(conditioner: TextConditioner, scenes: GenerationScenes | None = None,
                    config: GeneratorTrainConfig | None = None, progress: bool | None = None,
                    info: dict | None = None, checkpoint_every: int = 0,
                    on_checkpoint: Callable[[int, DiffusionGenerator], None] | None = None,
                    init: DiffusionGenerator | None = None) -> DiffusionGenerator:
    """A :class:`DiffusionGenerator` trained on ``scenes`` (default: the generator world at the denoiser's size)
    conditioned on ``conditioner``'s per-token states; returns the EMA weights. ``on_checkpoint(step, generator)``
    sees the EMA weights every ``checkpoint_every`` steps (a long run saves as it goes). ``init``: continue from a
    saved generator's weights (same architecture and conditioning) with a fresh schedule of ``config.steps``."""
    cfg = config or GeneratorTrainConfig()
    dcfg = copy.deepcopy(cfg.denoiser)
    dcfg.cond_dim = conditioner.dim
    scenes = scenes or GenerationScenes(image_size=dcfg.image_size, seed=cfg.seed)
    if scenes.image_size != dcfg.image_size:
        raise ValueError(f"scenes are {scenes.image_size} px but the denoiser is {dcfg.image_size} px")
    torch.manual_seed(cfg.seed)
    denoiser = TokenDenoiser(dcfg)
    if init is not None:
        if init.denoiser.config.to_dict() != dcfg.to_dict():
            raise ValueError("init= has another denoiser configuration than config.denoiser (with the conditioner's "
                             f"width): {init.denoiser.config.to_dict()} vs {dcfg.to_dict()}")
        denoiser.load_state_dict(init.denoiser.state_dict())
    ema = copy.deepcopy(denoiser).requires_grad_(False)
    gen = DiffusionGenerator(denoiser, null=conditioner.null(), guidance=cfg.guidance, prediction=cfg.prediction)
    images, specs = scenes.tensors(cfg.n_images)
    prompts = [s.prompt for s in specs]
    opt = torch.optim.AdamW(denoiser.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / cfg.warmup) * 0.5 * (1 + torch.cos(torch.tensor(i / cfg.steps * 3.14159)).item()))
    rng = torch.Generator().manual_seed(cfg.seed)
    bar = Progress(cfg.steps, desc="generator", unit="step", enabled=progress)
    t0, running = time.perf_counter(), None
    denoiser.train()
    for step in range(cfg.steps):
        idx = torch.randint(0, len(prompts), (cfg.batch_size,), generator=rng)
        drop = torch.rand(cfg.batch_size, generator=rng) < cfg.cond_dropout
        batch_prompts = ["" if d else prompts[int(i)] for i, d in zip(idx, drop)]
        cond = conditioner(batch_prompts)
        loss = gen.loss(images[idx].float() / 255, cond, generator=rng)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(denoiser.parameters(), 1.0)
        opt.step()
        sched.step()
        _ema_update(ema, denoiser, cfg.ema_decay if step > cfg.warmup else 0.0)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if bar.active:
            bar.set_postfix(loss=f"{running:.4f}")
            bar.update(1)
        if on_checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0:
            on_checkpoint(step + 1, DiffusionGenerator(ema, null=gen.null, guidance=cfg.guidance,
                                                       prediction=cfg.prediction,
                                                       info={"step": step + 1, "loss": running}))
    bar.close()
    meta = {"train": {k: v for k, v in cfg.__dict__.items() if k != "denoiser"}, "final_loss": running,
            "train_seconds": round(time.perf_counter() - t0, 1), "scenes": {
                "image_size": scenes.image_size, "seed": scenes.seed, "counts": scenes.counts,
                "shapes": scenes.shapes, "colours": scenes.colours}}
    meta.update(info or {})
    return DiffusionGenerator(ema.eval(), null=gen.null, timesteps=gen.timesteps, guidance=cfg.guidance, info=meta,
                              prediction=cfg.prediction)
