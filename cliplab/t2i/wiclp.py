"""WiCLP: learned projections of a text encoder's per-token conditioning, trained with a frozen generator's
denoising loss, and Switch-Off sampling.

Paper: Zarei et al., "Understanding and Mitigating Compositional Issues in Text-to-Image Generative Models" (v2:
"Improving Compositional Attribute Binding in Text-to-Image Generative Models via Enhanced Text Embeddings"); official
code ``text_emb_projection_models.py`` / ``train_text_emb_projection.py`` / ``evaluation.py``.

Where it acts: on the sequence the generator's cross-attention reads, i.e. the text tower's per-token states after
its final LayerNorm and before the projection (``TextConditioner(space="final")``, Stable Diffusion 1.x's site), every
position up to EOT. The text tower and the generator are frozen; only the projection learns.

* :class:`CLP`: ``x' = W x + b`` per token, ``W = I``, ``b = 0`` at init (the paper's "linear, eye" projector);
* :class:`WiCLP`: ``x' = x + Conv1d_{d->d}(x)`` along the token axis, kernel ``window`` (5), zero ``'same'``
  padding, weights and bias zero at init, so it starts as the identity;
* training (:func:`train_projection`): ``|eps_theta(x_t, t, P(E(p))) - eps|^2`` over uniform ``t`` on compositional
  (two-object) image-prompt pairs, Adam, MultiStep decay x0.1 at 50 % and 80 % of the steps (the paper's 10k/16k of
  20k), gradient norm clipped to 1 on the projection (as the official code);
* :class:`SwitchOffGenerator`: sampling with the projected tokens for timesteps ``t > threshold`` and the original
  ones for ``t <= threshold`` (the official code's strict ``>``; ``threshold=-1`` projects at every step); the
  unconditional branch of classifier-free guidance reads the unprojected empty prompt, as in the official code.

Differences from the paper, and why:

* padding: SD pads every prompt to 77 tokens and its UNet attends to all of them; cliplab's generator masks padding.
  So WiCLP zeroes masked positions before its convolution (a padded position reads as the convolution's own zero
  padding) and leaves masked positions unchanged, so a prompt's projected tokens never depend on its batch;
* scale: lr 2e-3 and 400 steps at batch 32 on the 32 px generator world instead of lr 1e-5, 20k steps,
  batch 8 on SD (a 16k / 82k-parameter projection on a CPU budget); the training images are clean renders of
  :class:`~cliplab.generation.GenerationScenes` two-object scenes (the paper: T2I-CompBench-style pairs with
  generated images filtered by VQA), with every scene whose (colour, shape) set appears in the judged held-out
  prompts left out, so the judged prompts are new combinations to the projection;
* the frozen text tower's conditioning of the training prompts is computed once (it cannot change);
* not built: the linear+skip and MLP+skip variants, the per-prompt "optimal text embedding" upper bound, and the
  attention re-weighting diagnostic in CLIP's last layers (the paper's minor effect).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..generation.generator import guided_sample
from ..generation.protocol import Conditioning
from ..generation.quality import held_out_specs, judge_generator
from ..generation.scenes import GenerationScenes
from ..methods import register_method
from ..progress import Progress

__all__ = ["CLP", "WiCLP", "KINDS", "make_projection", "apply_projection", "SwitchOffGenerator", "encode_prompts",
           "WiCLPTrainConfig", "TrainedProjection", "training_set", "fit_projection", "train_projection",
           "judge_projection", "save_projection", "load_projection", "shipped_projection", "shipped_dir"]

register_method(
    "wiclp",
    "Understanding and Mitigating Compositional Issues in Text-to-Image Generative Models (WiCLP)",
    "CLP / WiCLP projections of the final-LN token states trained with a frozen generator's denoising loss; "
    "Switch-Off sampling",
    doc="docs/methods/wiclp.md",
)(__name__)

KINDS = ("clp", "wiclp")
_PRETRAINED = Path(__file__).parent / "pretrained" / "wiclp"


class CLP(nn.Module):
    """Per-token linear projection ``x' = W x + b``, identity at init; masked (padding) tokens pass unchanged."""

    kind = "clp"

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = int(dim)
        self.linear = nn.Linear(dim, dim)
        nn.init.eye_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.linear(tokens)
        return out if mask is None else torch.where(mask[..., None], out, tokens)

    def config(self) -> dict:
        return {"kind": self.kind, "dim": self.dim}


class WiCLP(nn.Module):
    """``x' = x + Conv1d(x)`` over the token axis (kernel ``window``, zero 'same' padding), zero at init.

    Masked positions are zeroed before the convolution and left unchanged after it: token ``i`` reads the unmasked
    tokens ``i - window//2 .. i + window//2`` only."""

    kind = "wiclp"

    def __init__(self, dim: int, window: int = 5) -> None:
        super().__init__()
        if window < 1 or window % 2 == 0:
            raise ValueError(f"window must be a positive odd number (a centred window), got {window}")
        self.dim, self.window = int(dim), int(window)
        self.conv = nn.Conv1d(dim, dim, window, padding="same", padding_mode="zeros")
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if tokens.dim() != 3 or tokens.shape[-1] != self.dim:
            raise ValueError(f"expected tokens [B, L, {self.dim}], got shape {tuple(tokens.shape)}")
        keep = None if mask is None else mask[..., None].to(tokens.dtype)
        x = tokens if keep is None else tokens * keep
        delta = self.conv(x.transpose(1, 2)).transpose(1, 2)
        return tokens + (delta if keep is None else delta * keep)

    def config(self) -> dict:
        return {"kind": self.kind, "dim": self.dim, "window": self.window}


def make_projection(kind: str, dim: int, window: int = 5) -> CLP | WiCLP:
    """A fresh (identity) projection: ``kind="clp"`` or ``"wiclp"``."""
    if kind == "clp":
        return CLP(dim)
    if kind == "wiclp":
        return WiCLP(dim, window)
    raise ValueError(f"unknown projection kind {kind!r}: use one of {KINDS}")


def apply_projection(projection: nn.Module, cond: Conditioning) -> Conditioning:
    """``cond`` with its tokens projected (mask unchanged)."""
    return Conditioning(projection(cond.tokens, cond.mask), cond.mask)


# ---------------------------------------------------------------------------------------------- Switch-Off sampling
class SwitchOffGenerator:
    """A :class:`~cliplab.generation.ConditionalGenerator` that reads ``projection(cond)`` while ``t > threshold``
    and ``cond`` itself once ``t <= threshold`` (``threshold=-1``: projected at every step).

    ``generator`` is a :class:`~cliplab.generation.DiffusionGenerator` (its schedule, guidance and stored empty
    prompt are used by :meth:`sample`, which mirrors ``DiffusionGenerator.sample``)."""

    def __init__(self, generator, projection: nn.Module, threshold: int = -1) -> None:
        for need in ("schedule", "guidance", "null_for", "predict_noise"):
            if not hasattr(generator, need):
                raise TypeError(f"SwitchOffGenerator needs a DiffusionGenerator-like generator (no .{need})")
        if not -1 <= int(threshold) < generator.timesteps:
            raise ValueError(f"threshold must be in [-1, {generator.timesteps - 1}], got {threshold}")
        self.generator, self.projection, self.threshold = generator, projection, int(threshold)

    @property
    def cond_dim(self) -> int:
        return self.generator.cond_dim

    @property
    def image_size(self) -> int:
        return self.generator.image_size

    @property
    def timesteps(self) -> int:
        return self.generator.timesteps

    def conditioning_at(self, cond: Conditioning, t: torch.Tensor, projected: Conditioning | None = None
                        ) -> Conditioning:
        """Row ``i`` reads the projected tokens if ``t[i] > threshold``, the original ones otherwise."""
        use = t.reshape(-1).to(cond.tokens.device) > self.threshold
        if use.numel() != len(cond):
            raise ValueError(f"{use.numel()} timesteps for {len(cond)} conditioning rows")
        if not bool(use.any()):
            return cond
        projected = projected if projected is not None else apply_projection(self.projection, cond)
        if bool(use.all()):
            return projected
        return Conditioning(torch.where(use[:, None, None], projected.tokens, cond.tokens), cond.mask)

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.generator.predict_noise(x_t, t, self.conditioning_at(cond, t))

    def sample(self, cond: Conditioning, steps: int = 25, seed: int = 0, guidance: float | None = None,
               uncond: Conditioning | None = None) -> torch.Tensor:
        """Images ``[B, 3, S, S]`` in [0, 1], deterministic DDIM as ``DiffusionGenerator.sample`` (same noise for the
        same ``seed``), guidance against the unprojected ``uncond`` (default: the generator's empty prompt)."""
        gen = self.generator
        scale = gen.guidance if guidance is None else float(guidance)
        with torch.no_grad():
            projected = apply_projection(self.projection, cond)
        if scale != 1.0 and uncond is None:
            uncond = gen.null_for(1)
        was_training = getattr(gen, "training", False)
        if hasattr(gen, "eval"):
            gen.eval()
        try:
            return guided_sample(gen.predict_noise, gen.schedule, self.image_size, cond, uncond=uncond, scale=scale,
                                 steps=steps, seed=seed, cond_at=lambda t: self.conditioning_at(cond, t, projected))
        finally:
            if hasattr(gen, "train"):
                gen.train(was_training)


# ---------------------------------------------------------------------------------------------- training
@dataclass
class WiCLPTrainConfig:
    kind: str = "wiclp"
    window: int = 5
    steps: int = 400
    batch_size: int = 32
    lr: float = 2e-3
    decay_at: tuple[float, ...] = (0.5, 0.8)  # fractions of ``steps`` where the lr drops x0.1
    n_images: int = 1024
    counts: tuple[int, ...] = (2,)            # objects per training scene (compositional prompts)
    scene_seed: int = 7                       # training world seed (the generator: 0, the judge: 1000, held out: 5000)
    exclude_held_out: int = 256               # leave out scenes whose pairs appear in the first N held-out prompts
    seed: int = 0
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown projection kind {self.kind!r}: use one of {KINDS}")
        if self.steps < 1 or self.batch_size < 1 or self.n_images < 1:
            raise ValueError("steps, batch_size and n_images must be >= 1")
        self.decay_at, self.counts = tuple(self.decay_at), tuple(self.counts)


@dataclass
class TrainedProjection:
    projection: nn.Module
    losses: list[float]
    config: WiCLPTrainConfig
    info: dict = field(default_factory=dict)

    def save(self, directory: str | Path, threshold: int = -1) -> Path:
        return save_projection(self.projection, directory, threshold=threshold,
                               info={"train": asdict(self.config), **self.info})


def training_set(config: WiCLPTrainConfig) -> tuple[torch.Tensor, list[str]]:
    """``(images uint8 [N, 3, S, S], prompts)``: ``config.n_images`` scenes of ``config.counts`` objects from world
    ``config.scene_seed``, without any scene whose (colour, shape) set is one of the held-out judged prompts."""
    banned = set()
    for count in config.counts:
        if config.exclude_held_out > 0:
            specs, _ = held_out_specs(count, config.exclude_held_out)
            banned |= {frozenset(s.pairs) for s in specs}
    scenes = GenerationScenes(seed=config.scene_seed, counts=config.counts,
                              weights=None if len(config.counts) > 1 else (1.0,))
    images, prompts, index = [], [], 0
    while len(prompts) < config.n_images:
        if index > 50 * config.n_images + 1000:
            raise ValueError("too few training scenes left after excluding held-out prompts: lower exclude_held_out")
        image, spec = scenes[index]
        index += 1
        if frozenset(spec.pairs) in banned:
            continue
        images.append(image)
        prompts.append(spec.prompt)
    return (torch.stack(images) * 255).round().to(torch.uint8), prompts


def encode_prompts(conditioner, prompts: list[str], batch_size: int = 256) -> Conditioning:
    """The frozen conditioner's (no-grad) conditioning of ``prompts``, padded to the longest."""
    return Conditioning.cat([conditioner(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)])


def fit_projection(generator, cond: Conditioning, images: torch.Tensor, config: WiCLPTrainConfig,
                   progress: bool | None = None) -> TrainedProjection:
    """The core loop: a fresh projection trained on ``(images uint8, cond)`` with ``generator.loss`` (frozen)."""
    cfg = config
    if len(cond) != len(images):
        raise ValueError(f"{len(cond)} conditioning rows for {len(images)} images")
    torch.manual_seed(cfg.seed)
    projection = make_projection(cfg.kind, cond.dim, cfg.window)
    frozen = [p for p in generator.parameters() if p.requires_grad] if hasattr(generator, "parameters") else []
    if frozen:
        raise ValueError("freeze the generator first (generator.frozen()): only the projection may learn")
    opt = torch.optim.Adam(projection.parameters(), lr=cfg.lr)
    milestones = sorted({max(1, int(round(f * cfg.steps))) for f in cfg.decay_at})
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    rng = torch.Generator().manual_seed(cfg.seed)
    bar = Progress(cfg.steps, desc=f"{cfg.kind}", unit="step", enabled=progress)
    losses, t0 = [], time.perf_counter()
    projection.train()
    for _ in range(cfg.steps):
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=rng)
        loss = generator.loss(images[idx].float() / 255, apply_projection(projection, cond.select(idx)),
                              generator=rng)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip and cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(projection.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if bar.active:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            bar.update(1)
    bar.close()
    projection.eval()
    return TrainedProjection(projection, losses, cfg, {"train_seconds": round(time.perf_counter() - t0, 1)})


def train_projection(generator, conditioner, config: WiCLPTrainConfig | None = None, progress: bool | None = None,
                     **overrides) -> TrainedProjection:
    """Train a CLP/WiCLP projection on ``conditioner``'s tokens for frozen ``generator`` (a DiffusionGenerator).

    ``overrides`` are :class:`WiCLPTrainConfig` fields (``kind="clp"``, ``steps=300``, ...)."""
    unknown = set(overrides) - set(WiCLPTrainConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown WiCLP training options {sorted(unknown)}: see WiCLPTrainConfig")
    cfg = replace(config or WiCLPTrainConfig(), **overrides)
    images, prompts = training_set(cfg)
    cond = encode_prompts(conditioner, prompts)
    if cond.dim != generator.cond_dim:
        raise ValueError(f"conditioner width {cond.dim} != the generator's cond_dim {generator.cond_dim}")
    return fit_projection(generator, cond, images, cfg, progress=progress)


# ---------------------------------------------------------------------------------------------- judging
@torch.no_grad()
def judge_projection(generator, conditioner, judge, projection: nn.Module | None = None, threshold: int = -1,
                     per_count: int = 48, counts: tuple[int, ...] = (1, 2), steps: int = 25, seed: int = 0,
                     guidance: float | None = None, batch_size: int = 48) -> dict:
    """``judge_generator`` scores (per object count: binding, colours, shapes, clean_binding) of ``generator`` read
    through ``projection`` with Switch-Off at ``threshold``; ``projection=None`` judges the plain generator (the
    control: same prompts, same seeds)."""
    target = generator if projection is None else SwitchOffGenerator(generator, projection, threshold)
    return judge_generator(target, conditioner, judge, per_count=per_count, counts=counts, steps=steps, seed=seed,
                           guidance=guidance, batch_size=batch_size)


# ---------------------------------------------------------------------------------------------- save / load
def save_projection(projection: nn.Module, directory: str | Path, threshold: int = -1, info: dict | None = None
                    ) -> Path:
    """``wiclp.safetensors`` + ``wiclp.json`` (kind, dim, window, the Switch-Off threshold to use, ``info``)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in projection.state_dict().items()}, str(d / "wiclp.safetensors"))
    meta = {"format": "cliplab-wiclp", "projection": projection.config(), "threshold": int(threshold),
            "info": info or {}}
    (d / "wiclp.json").write_text(json.dumps(meta, indent=2) + "\n")
    return d


def load_projection(directory: str | Path) -> tuple[nn.Module, dict]:
    """``(projection in eval mode, metadata)`` saved by :func:`save_projection`."""
    d = Path(directory)
    meta_path = d / "wiclp.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{d} holds no saved projection (no wiclp.json): train one with train_projection")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != "cliplab-wiclp":
        raise ValueError(f"{meta_path} is not a cliplab WiCLP projection file")
    cfg = meta["projection"]
    projection = make_projection(cfg["kind"], cfg["dim"], cfg.get("window", 5))
    projection.load_state_dict(load_file(str(d / "wiclp.safetensors")))
    return projection.eval(), meta


def shipped_dir(kind: str = "wiclp") -> Path:
    if kind not in KINDS:
        raise ValueError(f"unknown projection kind {kind!r}: use one of {KINDS}")
    return _PRETRAINED / kind


def shipped_projection(kind: str = "wiclp") -> tuple[nn.Module, dict]:
    """The projection shipped for the ``scenes-32`` generator (``experiments/wiclp_train.py``)."""
    return load_projection(shipped_dir(kind))
