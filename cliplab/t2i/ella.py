"""ELLA: a Timestep-aware Semantic Connector (TSC) between a frozen language model and a frozen diffusion model.

Paper: X. Hu, R. Wang, Y. Fang, B. Fu, P. Cheng, G. Yu, "ELLA: Equip Diffusion Models with LLM for Enhanced Semantic
Alignment" (2024; official code TencentQQGYLab/ELLA ``model.py``). The TSC is a Perceiver resampler:

* the timestep ``t`` -> sinusoidal features (cos first, ``flip_sin_to_cos``) -> ``Linear, SiLU, Linear`` = ``temb``;
* ``num_latents`` learnable latents (init ``randn * width^-0.5``) plus ``time_aware_linear(SiLU(temb))``;
* the LM's token states through ``proj_in`` (LM width -> ``width``);
* ``layers`` blocks: ``latents += MHA(q=AdaLN(latents), kv=[AdaLN(latents); AdaLN'(x)])``, then
  ``latents += MLP(AdaLN''(latents))`` with a 4x squared-ReLU MLP; ``AdaLN(z) = LN(z) * (1 + scale) + shift`` with
  ``(shift, scale) = Linear(SiLU(temb))`` **zero-initialised** (LN without affine, eps 1e-6);
* ``proj_out``: ``Linear(width, cond_dim)`` + ``LayerNorm(cond_dim)``: the generator's cross-attention context, the
  same ``num_latents`` tokens for every prompt length, recomputed at every denoising step with that step's ``t``.

Only the connector is trained, with the frozen generator's denoising loss (:func:`train_connector`); the LM and the
generator stay frozen. :class:`ConnectedGenerator` wraps generator + connector as a
:class:`~cliplab.generation.ConditionalGenerator` whose conditioning is the LM's token sequence, so ``sample()`` and
``loss()`` hand every call's timestep to the connector.

Where it acts here: the LM is all-MiniLM-L6-v2 (:class:`LMConditioner`: the last encoder layer's per-token states,
every position from [CLS] to [SEP], padding masked; the paper's Flan-T5-XL reads ``last_hidden_state`` likewise); the
output replaces the shipped ``scenes-32`` generator's conditioning (shapes-tiny's per-token states after ``ln_final``,
before the projection, SD 1.x's site), i.e. the keys/values of every cross-attention of its U-Net.

Choices that differ from the paper or the official code, and why:

* Sizes (:data:`TOY`): width 64, 2 blocks, 4 heads, time features 64 -> 64, 64 latents, against the paper's 768,
  6, 8, 320 -> 768, 64: the generator reads 128-d tokens and the connector must train on two shared CPU cores and
  ship under 1 MB. :class:`ConnectorConfig`'s defaults are the paper's sizes.
* The LM's padding is masked in the attention (``key_padding_mask``); the official code attends to whatever the
  T5 tokenizer returns. With the mask a prompt's output does not depend on its batch-mates' lengths.
* Training: AdamW, lr 1e-3 with warmup and cosine decay, batch 16, 1000 + 600 steps (shipped), prompt dropout
  0.1 (the empty prompt through the connector is the unconditional branch of classifier-free guidance, as the
  official inference passes the negative prompt through ELLA); the paper trains for days on 34M image-text pairs.
* The loss is the frozen generator's own objective: velocity prediction for ``scenes-32`` (SD 1.5, the paper's
  backbone, predicts the noise). A v-predictor read as a noise predictor has a noise error ``sqrt(abar_t)`` times its
  velocity error, which would leave the high-noise steps (where layout and binding are decided) untrained.
* The control (:class:`PooledConnector`): the LM's mean-pooled sentence embedding (MiniLM's own pooling) through a
  trained ``Linear`` + ``LayerNorm`` to one token, trained with the same loop, data, seed and steps. The paper's
  comparisons are against CLIP conditioning and other LLM adapters, not this ablation.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..generation import Conditioning, GenerationScenes, NoiseSchedule, guided_sample, timestep_embedding
from ..generation.quality import held_out_specs
from ..methods import register_method
from ..progress import Progress

register_method(
    "ella",
    "ELLA: Equip Diffusion Models with LLM for Enhanced Semantic Alignment",
    "Timestep-aware Semantic Connector: a zero-initialised AdaLN Perceiver resampler from a frozen LM's (MiniLM) "
    "token states to a frozen generator's cross-attention context, trained with the denoising loss",
    doc="docs/methods/ella.md",
)(__name__)

__all__ = [
    "ConnectorConfig", "TOY", "AdaLayerNorm", "PerceiverAttentionBlock", "TimestepAwareConnector", "PooledConnector",
    "LMConditioner", "ConnectedGenerator", "ELLATrainConfig", "train_connector", "save_connector", "load_connector",
    "shipped_connector", "judge_binding", "ella_generator", "encode_unique", "stack_states",
    "train_ella", "load_ella", "slot_colour_accuracy", "held_out_loss",
]

PRETRAINED = Path(__file__).parent / "pretrained" / "ella"


# ----------------------------------------------------------------------------------------------------- the connector
@dataclass
class ConnectorConfig:
    """The TSC's sizes; the defaults are the paper's (Flan-T5-XL 2048 -> SD 1.5's 768)."""

    input_dim: int = 2048        # the LM's token width
    output_dim: int = 768        # the generator's cross-attention width (``cond_dim``)
    width: int = 768
    layers: int = 6
    heads: int = 8
    num_latents: int = 64
    time_channels: int = 320     # sinusoidal features of t
    time_embed_dim: int = 768
    time_aware: bool = True      # the additive time_aware_linear(SiLU(temb)) term on the latents

    def to_dict(self) -> dict:
        return asdict(self)


#: The reduced sizes trained here (MiniLM 384 -> the shipped generator's 128).
TOY = ConnectorConfig(input_dim=384, output_dim=128, width=64, layers=2, heads=4, num_latents=64, time_channels=64,
                      time_embed_dim=64)


class AdaLayerNorm(nn.Module):
    """``LN(x) * (1 + scale) + shift`` with ``(shift, scale) = Linear(SiLU(temb))``, zero-initialised (identity LN)."""

    def __init__(self, dim: int, time_embed_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(time_embed_dim, 2 * dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.linear(F.silu(temb))[:, None, :].chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


class SquaredReLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x).square()


class PerceiverAttentionBlock(nn.Module):
    """Latents attend to ``[latents; x]`` (both AdaLN'd), then a squared-ReLU MLP; both residual."""

    def __init__(self, width: int, heads: int, time_embed_dim: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), SquaredReLU(), nn.Linear(4 * width, width))
        self.ln_latents = AdaLayerNorm(width, time_embed_dim)
        self.ln_inputs = AdaLayerNorm(width, time_embed_dim)
        self.ln_ff = AdaLayerNorm(width, time_embed_dim)

    def forward(self, x: torch.Tensor, pad: torch.Tensor, latents: torch.Tensor, temb: torch.Tensor
                ) -> torch.Tensor:
        q = self.ln_latents(latents, temb)
        kv = torch.cat([q, self.ln_inputs(x, temb)], dim=1)
        # latents are never padding; the LM's padding positions (pad=True) are ignored
        ignore = torch.cat([pad.new_zeros(pad.shape[0], q.shape[1]), pad], dim=1)
        latents = latents + self.attn(q, kv, kv, key_padding_mask=ignore, need_weights=False)[0]
        return latents + self.mlp(self.ln_ff(latents, temb))


class TimestepAwareConnector(nn.Module):
    """``connector(tokens [B, L, input_dim], mask [B, L], t [B]) -> [B, num_latents, output_dim]``."""

    kind = "tsc"

    def __init__(self, config: ConnectorConfig | None = None) -> None:
        super().__init__()
        cfg = self.config = config or ConnectorConfig()
        if cfg.width % cfg.heads:
            raise ValueError(f"width {cfg.width} is not divisible by heads {cfg.heads}")
        self.time_embedding = nn.Sequential(nn.Linear(cfg.time_channels, cfg.time_embed_dim), nn.SiLU(),
                                            nn.Linear(cfg.time_embed_dim, cfg.time_embed_dim))
        self.latents = nn.Parameter(cfg.width ** -0.5 * torch.randn(cfg.num_latents, cfg.width))
        self.time_aware_linear = nn.Linear(cfg.time_embed_dim, cfg.width)
        self.proj_in = nn.Linear(cfg.input_dim, cfg.width)
        self.blocks = nn.ModuleList(PerceiverAttentionBlock(cfg.width, cfg.heads, cfg.time_embed_dim)
                                    for _ in range(cfg.layers))
        self.proj_out = nn.Sequential(nn.Linear(cfg.width, cfg.output_dim), nn.LayerNorm(cfg.output_dim))

    @property
    def input_dim(self) -> int:
        return self.config.input_dim

    @property
    def output_dim(self) -> int:
        return self.config.output_dim

    def timestep_features(self, t: torch.Tensor) -> torch.Tensor:
        return self.time_embedding(timestep_embedding(t, self.config.time_channels))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _check_inputs(tokens, mask, t, self.config.input_dim)
        temb = self.timestep_features(t.to(tokens.device))
        latents = self.latents[None].expand(tokens.shape[0], -1, -1)
        if self.config.time_aware:
            latents = latents + self.time_aware_linear(F.silu(temb))[:, None, :]
        x, pad = self.proj_in(tokens), ~mask.bool()
        for block in self.blocks:
            latents = block(x, pad, latents, temb)
        return self.proj_out(latents)

    def condition(self, cond: Conditioning, t: torch.Tensor) -> Conditioning:
        """The generator's conditioning for LM tokens ``cond`` at timesteps ``t`` (every latent attended)."""
        out = self(cond.tokens, cond.mask, t)
        return Conditioning(out, torch.ones(out.shape[:2], dtype=torch.bool, device=out.device))


class PooledConnector(nn.Module):
    """The control: the mean of the LM's unmasked token states (MiniLM's sentence pooling) through ``Linear`` +
    ``LayerNorm`` to a single conditioning token; ``t`` is ignored."""

    kind = "pooled"

    def __init__(self, input_dim: int, output_dim: int) -> None:
        super().__init__()
        self.config = {"input_dim": int(input_dim), "output_dim": int(output_dim)}
        self.proj = nn.Sequential(nn.Linear(input_dim, output_dim), nn.LayerNorm(output_dim))

    @property
    def input_dim(self) -> int:
        return self.config["input_dim"]

    @property
    def output_dim(self) -> int:
        return self.config["output_dim"]

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        _check_inputs(tokens, mask, t, self.input_dim)
        m = mask.to(tokens.dtype)[..., None]
        pooled = (tokens * m).sum(1) / m.sum(1)
        return self.proj(pooled)[:, None, :]

    def condition(self, cond: Conditioning, t: torch.Tensor | None = None) -> Conditioning:
        return Conditioning.single(self(cond.tokens, cond.mask, t)[:, 0])


def _check_inputs(tokens: torch.Tensor, mask: torch.Tensor, t: torch.Tensor | None, input_dim: int) -> None:
    if tokens.dim() != 3 or tokens.shape[-1] != input_dim:
        raise ValueError(f"expected LM tokens [B, L, {input_dim}], got {tuple(tokens.shape)}")
    if mask.shape != tokens.shape[:2]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match tokens {tuple(tokens.shape[:2])}")
    if t is not None and t.shape != (tokens.shape[0],):
        raise ValueError(f"expected one timestep per row ([{tokens.shape[0]}]), got {tuple(t.shape)}")


# ----------------------------------------------------------------------------------------------------- the LM side
class LMConditioner:
    """``conditioner(texts) -> Conditioning`` of a frozen ``cliplab.text`` embedder's last-layer token states
    (all-MiniLM-L6-v2: [CLS] .. [SEP], up to 256 tokens; padding masked). No gradients: the LM stays frozen."""

    def __init__(self, embedder) -> None:
        if not hasattr(embedder, "token_states"):
            raise ValueError("LMConditioner needs a cliplab.text SequenceEmbedder (e.g. load_embedder("
                             "'all-MiniLM-L6-v2'))")
        self.embedder = embedder
        self.name = getattr(embedder, "name", "lm")

    @property
    def dim(self) -> int:
        return self.embedder.dim

    @torch.no_grad()
    def __call__(self, texts: str | Sequence[str]) -> Conditioning:
        texts = [texts] if isinstance(texts, str) else list(texts)
        batch = self.embedder.tokenize(texts)
        states = self.embedder.token_states(batch).tokens.float()
        mask = batch.mask.bool().to(states.device)[:, : states.shape[1]]
        return Conditioning(states, mask)

    def null(self, n: int = 1) -> Conditioning:
        return self([""] * n)


# ----------------------------------------------------------------------------------------------------- the wrapper
class ConnectedGenerator(nn.Module):
    """A frozen generator read through a connector: a :class:`~cliplab.generation.ConditionalGenerator` whose
    conditioning is the LM's token sequence (``cond_dim`` = the LM's width). Every ``predict_noise`` call hands its
    timesteps to the connector, so sampling recomputes the context at each DDIM step, as ELLA does."""

    def __init__(self, generator, connector: nn.Module, text: LMConditioner | None = None,
                 null: Conditioning | None = None) -> None:
        super().__init__()
        if connector.output_dim != generator.cond_dim:
            raise ValueError(f"the connector writes {connector.output_dim}-d tokens but the generator reads "
                             f"{generator.cond_dim}-d: build it with output_dim={generator.cond_dim}")
        self.generator, self.connector, self.text = generator, connector, text
        self.schedule = getattr(generator, "schedule", None) or NoiseSchedule(generator.timesteps)
        self._null = null

    @property
    def cond_dim(self) -> int:
        return self.connector.input_dim

    @property
    def image_size(self) -> int:
        return self.generator.image_size

    @property
    def timesteps(self) -> int:
        return self.generator.timesteps

    @property
    def null(self) -> Conditioning:
        """The empty prompt's LM tokens (the unconditional branch of guidance, through the connector)."""
        if self._null is None:
            if self.text is None:
                raise ValueError("no unconditional prompt: pass text= (an LMConditioner), null=, uncond= or "
                                 "guidance=1")
            self._null = self.text.null()
        return self._null

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.generator.predict_noise(x_t, t, self.connector.condition(cond, t))

    def loss(self, images: torch.Tensor, cond: Conditioning, generator: torch.Generator | None = None,
             t: torch.Tensor | None = None, noise: torch.Tensor | None = None, reduction: str = "mean"
             ) -> torch.Tensor:
        """The frozen generator's own training loss (its target: velocity or noise) for clean ``images`` in [0, 1];
        the connector sees each image's sampled timestep. A generator without a ``denoiser`` gets the noise loss."""
        denoiser = getattr(self.generator, "denoiser", None)
        if denoiser is None:
            predict, prediction = (lambda x, tt: self.predict_noise(x, tt, cond)), "eps"
        else:  # a v-predictor's noise error is sqrt(abar_t) times its velocity error: train on what it learned
            predict = lambda x, tt: denoiser(x, tt, self.connector.condition(cond, tt))  # noqa: E731
            prediction = getattr(self.generator, "prediction", "eps")
        return self.schedule.loss(predict, images * 2 - 1, t=t, noise=noise, generator=generator,
                                  reduction=reduction, prediction=prediction)

    @torch.no_grad()
    def sample(self, cond: Conditioning, steps: int = 25, seed: int = 0, guidance: float | None = None,
               uncond: Conditioning | None = None) -> torch.Tensor:
        """Images ``[B, 3, S, S]`` in [0, 1] by DDIM; ``guidance`` (default: the generator's) against ``uncond``
        (default: the empty prompt's LM tokens), both through the connector at every step."""
        scale = float(getattr(self.generator, "guidance", 1.0) if guidance is None else guidance)
        if scale != 1.0 and uncond is None:
            uncond = self.null
        was_training = self.connector.training
        self.connector.eval()
        try:
            return guided_sample(self.predict_noise, self.schedule, self.image_size, cond, uncond=uncond, scale=scale,
                                 steps=steps, seed=seed)
        finally:
            self.connector.train(was_training)

    def generate(self, prompts: str | Sequence[str], steps: int = 25, seed: int = 0,
                 guidance: float | None = None) -> torch.Tensor:
        """Images for ``prompts`` (needs ``text=``)."""
        if self.text is None:
            raise ValueError("generate() needs text= (an LMConditioner); otherwise call sample() with LM tokens")
        return self.sample(self.text(prompts), steps=steps, seed=seed, guidance=guidance)


def ella_generator(generator, connector: nn.Module, embedder) -> ConnectedGenerator:
    """``generator`` (frozen) read through ``connector`` from ``embedder``'s token states."""
    return ConnectedGenerator(generator.frozen() if hasattr(generator, "frozen") else generator, connector,
                              text=LMConditioner(embedder))


# ----------------------------------------------------------------------------------------------------- training
@dataclass
class ELLATrainConfig:
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.0
    n_images: int = 6000
    cond_dropout: float = 0.1   # prompts replaced by "" (guidance's unconditional branch)
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def train_connector(connected: ConnectedGenerator, scenes: GenerationScenes | None = None,
                    config: ELLATrainConfig | None = None, progress: bool | None = None, log_every: int = 0
                    ) -> dict:
    """Train ``connected.connector`` alone with the frozen generator's denoising loss on ``scenes`` (default: the
    generator world at its size, seed ``config.seed``); the LM and the generator get no gradients. The batches,
    timesteps and noise come from one generator seeded with ``config.seed``, so two connectors trained with the same
    config see the same data. Returns ``{"losses": [...], "seconds": ..., "config": ...}``."""
    cfg = config or ELLATrainConfig()
    if connected.text is None:
        raise ValueError("train_connector needs the wrapper's text= (an LMConditioner)")
    scenes = scenes or GenerationScenes(image_size=connected.image_size, seed=cfg.seed)
    images, specs = scenes.tensors(cfg.n_images)
    prompts = [s.prompt for s in specs]
    for p in connected.generator.parameters():
        p.requires_grad_(False)
    params = [p for p in connected.connector.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / max(1, cfg.warmup)) * 0.5 * (1 + math.cos(math.pi * i / cfg.steps)))
    lm_states = encode_unique(connected.text, prompts + [""])  # the LM is frozen: each prompt once
    rng = torch.Generator().manual_seed(cfg.seed)
    bar = Progress(cfg.steps, desc=f"ella {connected.connector.kind}", unit="step", enabled=progress)
    losses, t0, running = [], time.perf_counter(), None
    connected.connector.train()
    for step in range(cfg.steps):
        idx = torch.randint(0, len(prompts), (cfg.batch_size,), generator=rng)
        drop = torch.rand(cfg.batch_size, generator=rng) < cfg.cond_dropout
        cond = stack_states([lm_states["" if d else prompts[int(i)]] for i, d in zip(idx, drop)])
        loss = connected.loss(images[idx].float() / 255, cond, generator=rng)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        running = losses[-1] if running is None else 0.98 * running + 0.02 * losses[-1]
        if bar.active:
            bar.set_postfix(loss=f"{running:.4f}")
            bar.update(1)
        if log_every and (step + 1) % log_every == 0:
            print(f"{connected.connector.kind} step {step + 1}: loss {running:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    bar.close()
    connected.connector.eval()
    return {"losses": losses, "seconds": round(time.perf_counter() - t0, 1), "config": cfg.to_dict()}


def encode_unique(text, prompts: Sequence[str], batch_size: int = 64) -> dict[str, torch.Tensor]:
    """``{prompt: states [n_tokens, D]}`` for every distinct prompt (unpadded), encoded in batches."""
    unique = sorted(set(prompts), key=len)
    out = {}
    for i in range(0, len(unique), batch_size):
        chunk = unique[i:i + batch_size]
        cond = text(chunk)
        for j, p in enumerate(chunk):
            out[p] = cond.tokens[j, cond.mask[j]]
    return out


def stack_states(rows: Sequence[torch.Tensor]) -> Conditioning:
    """Unpadded ``[n_i, D]`` token states as one right-padded :class:`Conditioning`."""
    length = max(r.shape[0] for r in rows)
    tokens = torch.stack([F.pad(r, (0, 0, 0, length - r.shape[0])) for r in rows])
    mask = torch.arange(length)[None] < torch.tensor([r.shape[0] for r in rows])[:, None]
    return Conditioning(tokens, mask)


# ----------------------------------------------------------------------------------------------------- save / load
def save_connector(connector: nn.Module, directory: str | Path, info: dict | None = None) -> Path:
    """``connector.safetensors`` + ``connector.json`` (its kind, sizes and ``info``: how it was made)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in connector.state_dict().items()},
              str(d / "connector.safetensors"))
    config = connector.config.to_dict() if isinstance(connector.config, ConnectorConfig) else dict(connector.config)
    meta = {"format": "cliplab-ella-connector", "kind": connector.kind, "config": config, "info": info or {}}
    (d / "connector.json").write_text(json.dumps(meta, indent=2) + "\n")
    return d


def load_connector(directory: str | Path) -> nn.Module:
    """A connector saved by :func:`save_connector` (eval mode); ``.info`` holds how it was made."""
    d = Path(directory)
    path = d / "connector.json"
    if not path.is_file():
        raise FileNotFoundError(f"{d} is not a saved ELLA connector (no connector.json)")
    meta = json.loads(path.read_text())
    if meta.get("format") != "cliplab-ella-connector":
        raise ValueError(f"{path} is not an ELLA connector file")
    if meta["kind"] == "tsc":
        connector = TimestepAwareConnector(ConnectorConfig(**meta["config"]))
    elif meta["kind"] == "pooled":
        connector = PooledConnector(**meta["config"])
    else:
        raise ValueError(f"unknown connector kind {meta['kind']!r} in {path}")
    connector.load_state_dict(load_file(str(d / "connector.safetensors")))
    connector.info = meta["info"]
    return connector.eval()


def shipped_connector(name: str = "tsc") -> nn.Module:
    """The shipped connectors for ``scenes-32`` from MiniLM: ``"tsc"`` (ELLA) or ``"pooled"`` (the control)."""
    d = PRETRAINED / name
    if not (d / "connector.json").is_file():
        known = sorted(p.name for p in PRETRAINED.glob("*") if (p / "connector.json").is_file())
        raise FileNotFoundError(f"no shipped ELLA connector {name!r}; shipped: {known or 'none'}")
    return load_connector(d)


def train_ella(out: str | Path, kind: str = "tsc", generator: str | Path = "scenes-32",
               embedder: str = "all-MiniLM-L6-v2", config: ELLATrainConfig | None = None,
               connector_config: ConnectorConfig | None = None, progress: bool | None = None, log_every: int = 0,
               init: str | Path | None = None) -> tuple[ConnectedGenerator, dict]:
    """Train a ``kind`` connector (``"tsc"``: ELLA; ``"pooled"``: the control) from ``embedder``'s tokens to the frozen
    ``generator`` (a shipped name or a directory) and save it to ``out``; returns the wrapper and the history.
    ``init``: continue from a saved connector of that kind (e.g. one trained against an earlier generator)."""
    import cliplab.text as text_models
    from ..generation import load_generator

    gen = load_generator(generator).frozen()
    emb = text_models.load_embedder(embedder)
    cfg = config or ELLATrainConfig()
    torch.manual_seed(cfg.seed)
    if init is not None:
        connector = load_connector(init)
        if connector.kind != kind:
            raise ValueError(f"init={init} holds a {connector.kind!r} connector, not {kind!r}")
    elif kind == "tsc":
        ccfg = connector_config or ConnectorConfig(**{**TOY.to_dict(), "input_dim": emb.dim,
                                                      "output_dim": gen.cond_dim})
        connector = TimestepAwareConnector(ccfg)
    elif kind == "pooled":
        connector = PooledConnector(emb.dim, gen.cond_dim)
    else:
        raise ValueError(f"kind must be 'tsc' or 'pooled', got {kind!r}")
    wrapped = ella_generator(gen, connector, emb)
    history = train_connector(wrapped, config=cfg, progress=progress, log_every=log_every)
    losses = history["losses"]
    tail = losses[-min(100, len(losses)):]
    info = {"generator": str(generator), "generator_step": gen.info.get("step", gen.info.get("train", {}).get(
        "steps")), "embedder": embedder, "train": cfg.to_dict(), "seconds": history["seconds"],
        "final_loss": round(sum(tail) / len(tail), 5)}
    if init is not None:
        info["init"] = {"from": str(init), **getattr(connector, "info", {})}
    save_connector(connector, out, info=info)
    connector.info = info
    return wrapped, history


def load_ella(connector: str | Path = "tsc", generator: str | Path = "scenes-32",
              embedder: str = "all-MiniLM-L6-v2") -> ConnectedGenerator:
    """A saved connector (a directory, or a shipped name: ``"tsc"``/``"pooled"``) between ``embedder`` and the frozen
    ``generator``, ready for ``.generate(prompts)``."""
    import cliplab.text as text_models
    from ..generation import load_generator

    p = Path(connector)
    conn = load_connector(p) if (p / "connector.json").is_file() else shipped_connector(str(connector))
    return ella_generator(load_generator(generator), conn, text_models.load_embedder(embedder))


# ----------------------------------------------------------------------------------------------------- judging
def slot_colour_accuracy(images: torch.Tensor, specs, radius: float = 0.09, threshold: float = 0.16,
                         per_image: bool = False):
    """The fraction of a prompt's objects whose slot (the generator world's fixed position for the k-th object named,
    :data:`~cliplab.generation.scenes.SLOTS`) shows that object's colour: the majority nearest world colour of the
    non-background pixels within ``radius`` (of the side) of the slot centre; a slot with none counts as wrong.
    Colour-to-object binding that does not need the shapes to be drawn right."""
    from ..data.synthetic import COLOURS
    from ..generation.scenes import BACKGROUND, SLOTS

    names = list(COLOURS)
    palette = torch.tensor([COLOURS[c] for c in names], dtype=torch.float32) / 255
    side = images.shape[-1]
    r = max(1, round(radius * side))
    rows = []
    for image, spec in zip(images, specs):
        pairs = spec.pairs if hasattr(spec, "pairs") else tuple(spec)
        hits = 0
        for (colour, _), (fx, fy) in zip(pairs, SLOTS[len(pairs)]):
            cx, cy = round(fx * side), round(fy * side)
            patch = image[:, max(0, cy - r):cy + r + 1, max(0, cx - r):cx + r + 1].reshape(3, -1).T
            fg = patch[(patch - BACKGROUND / 255).norm(dim=1) > threshold]
            if len(fg):
                votes = torch.cdist(fg, palette).argmin(1).bincount(minlength=len(names))
                hits += names[int(votes.argmax())] == colour
        rows.append(hits / len(pairs))
    return rows if per_image else sum(rows) / len(rows)


@torch.no_grad()
def held_out_loss(generator, conditioner, count: int = 3, n: int = 128, seed: int = 0, batch_size: int = 64
                  ) -> float:
    """The mean denoising loss (the generator's own objective) on ``n`` held-out scenes of ``count`` objects, with
    timesteps and noise fixed by ``seed``: the same images, ``t`` and noise for every generator/conditioning pair."""
    specs, clean = held_out_specs(count, n)
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, generator.timesteps, (n,), generator=g)
    noise = torch.randn(clean.shape, generator=g)
    total = 0.0
    for i in range(0, n, batch_size):
        cond = conditioner([s.prompt for s in specs[i:i + batch_size]])
        part = generator.loss(clean[i:i + batch_size], cond, t=t[i:i + batch_size], noise=noise[i:i + batch_size],
                              reduction="none")
        total += float(part.sum())
    return round(total / n, 5)


@torch.no_grad()
def judge_binding(generator, conditioner, judge, count: int = 3, n: int = 48, steps: int = 20, seed: int = 0,
                  guidance: float | None = None, batch_size: int = 48, return_images: bool = False) -> dict:
    """Judge scores (``binding``, ``colours``, ``shapes``, ``clean_binding``) and :func:`slot_colour_accuracy`
    (``slot_colours``, ``clean_slot_colours``) of ``generator`` on ``n`` held-out
    prompts of ``count`` objects; ``conditioner(texts)`` makes its conditioning (an :class:`LMConditioner` for a
    :class:`ConnectedGenerator`, a ``TextConditioner`` for the shipped generator)."""
    specs, clean = held_out_specs(count, n)
    samples = []
    for i in range(0, n, batch_size):
        kwargs = {} if guidance is None else {"guidance": guidance}
        cond = conditioner([s.prompt for s in specs[i:i + batch_size]])
        samples.append(generator.sample(cond, steps=steps, seed=seed + i, **kwargs))
    images = torch.cat(samples)
    scores = judge.score(images, specs)
    scores["clean_binding"] = judge.score(clean, specs)["binding"]
    scores["slot_colours"] = slot_colour_accuracy(images, specs)
    scores["clean_slot_colours"] = slot_colour_accuracy(clean, specs)
    out = {k: round(float(v), 4) for k, v in scores.items()}
    if return_images:
        out["images"] = images
        out["prompts"] = [s.prompt for s in specs]
    return out
