"""An unCLIP-style generator: the same :class:`DiffusionGenerator` / :class:`TokenDenoiser`, conditioned on a CLIP
model's **image embedding** instead of text tokens.

unCLIP (Ramesh et al. 2022, "Hierarchical Text-Conditional Image Generation with CLIP Latents"; Stable unCLIP)
trains an image decoder on a frozen CLIP image encoder's embedding, i.e. it inverts the encoder. Here:

* the condition is the model's pooled, projected image embedding, L2-normalised (the joint space that the text tower
  shares), passed as **one token** (:meth:`Conditioning.single`). With ``context_tokens=k > 0`` the generator also
  maps it to ``k`` extra learned context tokens (DALL-E 2's decoder projects the embedding to four extra tokens):
  cross-attention over a single token is the same value at every pixel (softmax over one key), a spatially uniform
  bias, so extra tokens are what lets the condition act differently on different image regions;
* the encoder reads the scene at its own resolution (64 px for ``shapes-tiny``), the generator draws it smaller
  (32 px: the 64 px render average-pooled, which is exactly the generator world's box downsampling);
* classifier-free guidance: the condition is dropped to the **zero vector** with probability ``cond_dropout`` during
  training, and the zero vector is the stored unconditional branch (as diffusers' Stable unCLIP pipelines pass
  zeros as the negative image embedding);
* not done: Stable unCLIP's noise augmentation of the embedding (a noise-level input); the decoder here sees clean
  embeddings.

``train_unclip`` trains one (the image encoder frozen, embeddings computed once); ``save_unclip`` stores it in half
precision (the shipped ``unclip-32``, 4 context tokens, is 1.07 MB), :func:`load_unclip` reads it back at fp32.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from safetensors.torch import load_file, save_file

from ..progress import Progress
from .denoiser import DenoiserConfig, TokenDenoiser
from .generator import DiffusionGenerator
from .protocol import Conditioning
from .scenes import GenerationScenes

__all__ = ["EmbeddingContext", "UnclipDenoiser", "normalise_pixels", "image_embeddings", "image_conditioning", "unclip_null", "generator_view",
           "UnclipTrainConfig", "train_unclip", "save_unclip", "load_unclip", "unclip_variations",
           "shipped_unclip_dir"]

_ROOT = Path(__file__).parent / "pretrained"


class EmbeddingContext(nn.Module):
    """One embedding token -> itself followed by ``k`` learned context tokens (a linear map of the embedding)."""

    def __init__(self, dim: int, k: int) -> None:
        super().__init__()
        self.k, self.dim = int(k), int(dim)
        self.proj = nn.Linear(dim, self.k * dim)

    def forward(self, cond: Conditioning) -> Conditioning:
        if cond.tokens.shape[1] != 1:
            raise ValueError(f"unCLIP conditioning is one embedding token, got {cond.tokens.shape[1]} tokens")
        extra = self.proj(cond.tokens[:, 0]).view(len(cond), self.k, self.dim)
        tokens = torch.cat([cond.tokens, extra], dim=1)
        return Conditioning(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device))


class UnclipDenoiser(nn.Module):
    """A :class:`TokenDenoiser` reading one embedding token expanded by :class:`EmbeddingContext` (same call)."""

    def __init__(self, config: DenoiserConfig, context_tokens: int) -> None:
        super().__init__()
        self.inner = TokenDenoiser(config)
        self.context = EmbeddingContext(config.cond_dim, context_tokens)

    @property
    def config(self) -> DenoiserConfig:
        return self.inner.config

    def cross_attentions(self):
        return self.inner.cross_attentions()

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.inner(x, t, self.context(cond))


def _make_denoiser(config: DenoiserConfig, context_tokens: int) -> nn.Module:
    return UnclipDenoiser(config, context_tokens) if context_tokens else TokenDenoiser(config)


def normalise_pixels(model, images: torch.Tensor) -> torch.Tensor:
    """Images ``[B, 3, S, S]`` in [0, 1] at the model's input size -> the model's normalised pixels."""
    size = model.config.vision.image_size
    if images.shape[-1] != size or images.shape[-2] != size:
        raise ValueError(f"the image encoder reads {size} px images, got {tuple(images.shape[-2:])}; render at {size}")
    pre = model.config.preprocess
    mean = torch.tensor(pre.mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def image_embeddings(model, images: torch.Tensor, grad: bool = False) -> torch.Tensor:
    """The L2-normalised image embeddings ``[B, D]`` (pooled, after the projection) of images in [0, 1]."""
    with torch.set_grad_enabled(grad):
        return F.normalize(model.encode_image(normalise_pixels(model, images)).float(), dim=-1)


def image_conditioning(model, images: torch.Tensor, grad: bool = False) -> Conditioning:
    """The one-token unCLIP conditioning of images in [0, 1] (gradients reach the image tower with ``grad``)."""
    return Conditioning.single(image_embeddings(model, images, grad=grad))


def unclip_null(dim: int, n: int = 1) -> Conditioning:
    """The unconditional branch: ``n`` rows of one zero token of width ``dim``."""
    return Conditioning.single(torch.zeros(n, dim))


def generator_view(images: torch.Tensor, size: int) -> torch.Tensor:
    """Images at the generator's ``size``: an integer-factor average pool (the generator world's box downsampling)."""
    s = images.shape[-1]
    if s == size:
        return images
    if s % size:
        raise ValueError(f"cannot box-downsample {s} px images to {size} px (not an integer factor)")
    return F.avg_pool2d(images, s // size)


@dataclass
class UnclipTrainConfig:
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    n_images: int = 8000
    cond_dropout: float = 0.1      # embeddings replaced by the zero vector (guidance's unconditional branch)
    ema_decay: float = 0.995
    guidance: float = 3.0
    seed: int = 0
    context_tokens: int = 0        # extra learned context tokens from the embedding (0: the one token only)
    prediction: str = "v"          # the denoiser's target (the generation layer's default: velocity)
    denoiser: DenoiserConfig = field(default_factory=lambda: DenoiserConfig(channels=(16, 32, 56)))


def _scene_images(model, scenes: GenerationScenes | None, n: int, seed: int) -> torch.Tensor:
    size = model.config.vision.image_size
    scenes = scenes or GenerationScenes(image_size=size, seed=seed)
    if scenes.image_size != size:
        raise ValueError(f"scenes are {scenes.image_size} px but the image encoder reads {size} px")
    return scenes.tensors(n)[0]


@torch.no_grad()
def _embed_all(model, images_u8: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    return torch.cat([image_embeddings(model, images_u8[i:i + chunk].float() / 255)
                      for i in range(0, len(images_u8), chunk)])


def train_unclip(model, scenes: GenerationScenes | None = None, config: UnclipTrainConfig | None = None,
                 progress: bool | None = None, info: dict | None = None) -> DiffusionGenerator:
    """A :class:`DiffusionGenerator` that draws ``scenes`` (default: the generator world rendered at the encoder's
    size) from ``model``'s frozen, normalised image embedding; returns the EMA weights (eval mode)."""
    cfg = config or UnclipTrainConfig()
    dcfg = copy.deepcopy(cfg.denoiser)
    dcfg.cond_dim = model.config.embed_dim
    model.eval()
    images = _scene_images(model, scenes, cfg.n_images, cfg.seed)
    embeddings = _embed_all(model, images)
    small = generator_view(images.float() / 255, dcfg.image_size)
    torch.manual_seed(cfg.seed)
    denoiser = _make_denoiser(dcfg, cfg.context_tokens)
    ema = copy.deepcopy(denoiser).requires_grad_(False)
    gen = DiffusionGenerator(denoiser, null=unclip_null(dcfg.cond_dim), guidance=cfg.guidance,
                             prediction=cfg.prediction)
    opt = torch.optim.AdamW(denoiser.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / cfg.warmup) * 0.5 * (
        1 + torch.cos(torch.tensor(i / cfg.steps * torch.pi)).item()))
    rng = torch.Generator().manual_seed(cfg.seed)
    bar = Progress(cfg.steps, desc="unclip", unit="step", enabled=progress)
    t0, running = time.perf_counter(), None
    denoiser.train()
    for step in range(cfg.steps):
        idx = torch.randint(0, len(small), (cfg.batch_size,), generator=rng)
        keep = (torch.rand(cfg.batch_size, generator=rng) >= cfg.cond_dropout).float()[:, None]
        cond = Conditioning.single(embeddings[idx] * keep)
        loss = gen.loss(small[idx], cond, generator=rng)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(denoiser.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = cfg.ema_decay if step > cfg.warmup else 0.0
        with torch.no_grad():
            for e, p in zip(ema.parameters(), denoiser.parameters()):
                e.lerp_(p, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if bar.active:
            bar.set_postfix(loss=f"{running:.4f}")
            bar.update(1)
    bar.close()
    meta = {"kind": "unclip", "condition": "normalised image embedding (one token)",
            "context_tokens": cfg.context_tokens,
            "image_model": model.config.name, "encoder_size": model.config.vision.image_size,
            "train": {k: v for k, v in cfg.__dict__.items() if k != "denoiser"}, "final_loss": running,
            "train_seconds": round(time.perf_counter() - t0, 1)}
    meta.update(info or {})
    return DiffusionGenerator(ema.eval(), null=gen.null, timesteps=gen.timesteps, guidance=cfg.guidance, info=meta,
                              prediction=cfg.prediction)


def save_unclip(generator: DiffusionGenerator, directory: str | Path, half: bool = True) -> Path:
    """Save like :meth:`DiffusionGenerator.save`, with float weights stored as fp16 when ``half`` (they load back
    into fp32 parameters)."""
    d = generator.save(directory)
    if half:
        path = d / "generator.safetensors"
        tensors = load_file(str(path))
        save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, str(path))
    return d


def shipped_unclip_dir(name: str = "unclip-32") -> Path:
    d = _ROOT / name
    if not (d / "generator.json").is_file():
        raise FileNotFoundError(f"no shipped unCLIP generator {name!r} in {_ROOT} (train one: "
                                "python experiments/un2clip_train.py)")
    return d


def load_unclip(name_or_dir: str | Path = "unclip-32") -> DiffusionGenerator:
    """A saved unCLIP generator (shipped name or directory), fp32, eval mode."""
    p = Path(name_or_dir)
    d = p if (p / "generator.json").is_file() else shipped_unclip_dir(str(name_or_dir))
    meta = json.loads((d / "generator.json").read_text())
    k = int(meta.get("info", {}).get("context_tokens", 0))
    if k:
        tensors = load_file(str(d / "generator.safetensors"))
        denoiser = UnclipDenoiser(DenoiserConfig(**meta["denoiser"]), k)
        denoiser.load_state_dict({n[len("denoiser."):]: v.float() for n, v in tensors.items()
                                  if n.startswith("denoiser.")})
        null = Conditioning(tensors["null.tokens"].float(), tensors["null.mask"].bool())
        gen = DiffusionGenerator(denoiser, null=null, timesteps=meta["timesteps"], guidance=meta["guidance"],
                                 info=meta["info"], prediction=meta.get("prediction", "eps")).eval()
    else:
        gen = DiffusionGenerator.load(d).float().eval()
    if gen.null is not None:
        gen.null = Conditioning(gen.null.tokens.float(), gen.null.mask)
    return gen


@torch.no_grad()
def unclip_variations(generator: DiffusionGenerator, model, images: torch.Tensor, steps: int = 20, seed: int = 0,
                      guidance: float | None = None) -> torch.Tensor:
    """Images drawn from the embeddings of ``images`` (in [0, 1], at the encoder's size): unCLIP's "variations"."""
    return generator.sample(image_conditioning(model, images), steps=steps, seed=seed, guidance=guidance)
