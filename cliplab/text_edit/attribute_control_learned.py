"""Attribute control's learned direction: a token-level delta optimised through a frozen text-to-image generator.

Paper: *Continuous, Subject-Specific Attribute Control in T2I Models by Identifying Semantic Directions*,
S. A. Baumann, F. Krause, M. Neumayr, N. Stracke, M. Sevi, V. T. Hu, B. Ommer (CompVis), arXiv 2403.17064
(CVPR 2025), Sec. 3.3 ("learned" deltas). Official code: ``CompVis/attribute-control`` (``learn_delta.py``,
``configs/learn_delta.yaml``). The optimisation-free variant (Eq. 2) is :mod:`cliplab.text_edit.attribute_control`;
this module reuses its public :func:`~cliplab.text_edit.attribute_control.direction_intervention` (subject mask and
``alpha * delta`` on the subject's tokens) and :func:`~cliplab.text_edit.attribute_control.apply_direction`.

**Where it acts.** ``delta`` lives in the generator's conditioning space: the text tower's per-token states that the
generator cross-attends to (``TextConditioner.space``; ``"final"`` for the shipped ``scenes-32``: after the final
LayerNorm, before the text projection, SD 1.x's site). It is added to the **subject's tokens only** (SOT, EOT, the
other words and the other subjects stay bit-identical); the text tower and the generator stay frozen.

**Algorithm** (per prompt triple ``target`` / ``positive`` / ``negative``, e.g. "a blue circle" / "a red circle" /
"a blue circle", combined with prefixes as the official ``PromptCombinationDataset``):

* ``x_t`` from the frozen generator for the target prompt at a relative time ``t``;
* ``eps_p, eps_t, eps_n`` = the generator's (unguided) noise predictions at ``x_t`` for the three prompts;
* ``eps* = eps_t + alpha (eps_p - eps_n)`` with ``alpha ~ +-U[0.1, 5]`` (random sign), several ``alpha`` per sample;
* loss ``MSE(eps(x_t, cond_target + alpha * delta on the subject's tokens), eps*)``; ``delta`` starts at zero and is
  the only parameter; AdamW (lr 0.1, betas (0.5, 0.8), weight decay 0.333, the official config).

Choices (where this differs from the paper or the official code, and why):

* ``x_t``: the official code samples ``x_0`` with guidance and re-noises it to ``t`` when its batch holds more than
  one prompt (and cuts a sampling run at ``t`` for a batch of one). Here ``x_0`` comes from a **pool sampled once**
  (``samples_per_prompt`` guided samples per target prompt) and is re-noised with fresh noise at every step: on a CPU
  one sampling run per step would cost ~50 denoiser calls for one gradient step.
* Relative time ``t_rel ~ U[t_range]`` maps to the integer timestep ``round(t_rel * (T - 1))`` of the generator's
  own training schedule (the official code indexes its 50-step DDIM grid, the same spread over ``[0, T)``).
* ``prediction="eps"`` (default) compares noise predictions, as the paper writes the loss. The official code's
  ``predict_eps`` returns ``(x_t - sqrt(1 - abar) eps) / sqrt(abar)``, the ``x_0`` estimate: an MSE weighted by
  ``(1 - abar) / abar`` per timestep. ``prediction="x0"`` reproduces that.
* ``guidance``: the pool is sampled with the generator's own default guidance (``guidance=None``), not SD's 7.5,
  since the small generator is tuned to its own scale.
* Steps, batch and gradient accumulation default to CPU sizes (the official: 1000 steps, 10 accumulation steps).
* Registration: the paper is registered once, as ``attribute_control`` (the catalogue has one slug per paper);
  this module is its learned variant, documented in the same page (``docs/methods/attribute_control.md``).
* One delta for one conditioning space (SDXL learns one per text encoder; the library has one tower).
* The shipped delta (``load_direction("red-blue")``, made by ``experiments/attribute_control_learned.py``) is colour,
  red vs blue. The paper's target is the attribute-free subject ("man" between "old man" and "young man"); the
  shipped generator was only trained on prompts that name a colour and draws arbitrary scenes for "a circle", so
  there the target is the subject in its negative colour ("a blue circle"), making ``eps* = eps_n + alpha (eps_p -
  eps_n)``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..generation.protocol import Conditioning
from ..models.tokenizer import TokenizedBatch
from ..progress import Progress
from ..tokens import as_batch, space_output, space_tokens
from .attribute_control import apply_direction, direction_intervention

__all__ = ["AttributePrompt", "edit_conditioning", "encode_with_direction", "guided_target", "direction_loss",
           "learn_direction", "LearnedDirection", "save_direction", "load_direction", "shipped_directions",
           "generator_fingerprint", "attribute_readout"]

_PRETRAINED = Path(__file__).parent / "pretrained" / "attribute_control_learned"


@dataclass(frozen=True)
class AttributePrompt:
    """One row of the official prompt config: ``target`` is what the edit is applied to ("a blue circle"),
    ``positive`` / ``negative`` the two poles ("a red circle" / "a blue circle"), ``subject`` the target's words that
    get the delta ("circle")."""

    target: str
    positive: str
    negative: str
    subject: str

    def with_prefix(self, prefix: str) -> "AttributePrompt":
        """Every prompt preceded by ``prefix`` and one space (the official ``f"{prefix} {prompt}"``)."""
        head = prefix.strip()
        join = (lambda p: f"{head} {p.strip()}") if head else (lambda p: p.strip())
        return AttributePrompt(join(self.target), join(self.positive), join(self.negative), self.subject)


def _prompt(p) -> AttributePrompt:
    if isinstance(p, AttributePrompt):
        return p
    if isinstance(p, dict):  # the official config's keys
        return AttributePrompt(p["prompt_target"], p["prompt_positive"], p["prompt_negative"], p["pattern_target"])
    return AttributePrompt(*p)


# --- applying a delta to conditioning -------------------------------------------------------------------------------
def edit_conditioning(cond: Conditioning, batch: TokenizedBatch, subject: str | Sequence[str | None],
                      delta: torch.Tensor, alpha: float | Sequence[float] | torch.Tensor = 1.0,
                      occurrence: int | None = None) -> Conditioning:
    """``cond`` (encoded from ``batch``) with ``alpha * delta`` added to the tokens of ``subject`` (one for all rows
    or one per row; ``alpha`` one scale or one per row), through the optimisation-free module's
    ``direction_intervention`` applied to the sequence. Differentiable in ``delta``; every other position keeps its
    bits. The mask is unchanged."""
    if len(batch) != len(cond):
        raise ValueError(f"{len(batch)} texts for {len(cond)} conditioning rows: pass the batch cond was encoded from")
    iv = direction_intervention(batch, subject, delta, alpha, width=cond.tokens.shape[1], occurrence=occurrence)
    return Conditioning(iv.apply(cond.tokens, seq_dim=1), cond.mask)


def encode_with_direction(conditioner, texts: str | Sequence[str] | TokenizedBatch,
                          subject: str | Sequence[str | None], delta: torch.Tensor,
                          alpha: float | Sequence[float] | torch.Tensor = 1.0, occurrence: int | None = None
                          ) -> Conditioning:
    """The generator conditioning of ``texts`` with ``alpha * delta`` on ``subject``'s tokens, encoded through the
    text tower with the edit as an intervention at the conditioner's site (``apply_direction(..., space=
    conditioner.space)``): a learned delta and an optimisation-free one (``find_direction(space=...)``) go through
    the same path. At ``final``/``joint`` this equals :func:`edit_conditioning` of the plain conditioning."""
    model, space = conditioner.model, conditioner.space
    batch = as_batch(model, texts)
    with torch.no_grad():
        out = apply_direction(model, batch, subject, delta, alpha, output=space_output(space), occurrence=occurrence,
                              space=space)
    seq = space_tokens(out, space)
    mask = torch.arange(seq.shape[1], device=seq.device)[None] < batch.lengths.to(seq.device)[:, None]
    return Conditioning(seq, mask)


# --- the objective ----------------------------------------------------------------------------------------------------
def guided_target(eps_target: torch.Tensor, eps_positive: torch.Tensor, eps_negative: torch.Tensor,
                  alpha: float | torch.Tensor) -> torch.Tensor:
    """``eps* = eps_t + alpha (eps_p - eps_n)``, ``alpha`` a scalar or one value per row."""
    a = torch.as_tensor(alpha, dtype=eps_target.dtype, device=eps_target.device)
    if a.dim():
        a = a.reshape(-1, *([1] * (eps_target.dim() - 1)))
    return eps_target + a * (eps_positive - eps_negative)


def _to_x0(generator, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    schedule = getattr(generator, "schedule", None)
    if schedule is None:
        raise ValueError("prediction='x0' needs a generator with a noise schedule (.schedule); use prediction='eps'")
    return schedule.predict_x0(x_t, t, eps)


def direction_loss(generator, cond_target: Conditioning, batch: TokenizedBatch, subject: str | Sequence[str | None],
                   delta: torch.Tensor, alpha: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                   eps_target: torch.Tensor, eps_positive: torch.Tensor, eps_negative: torch.Tensor,
                   prediction: str = "eps", occurrence: int | None = None) -> torch.Tensor:
    """``MSE(generator.predict_noise(x_t, t, cond_target + alpha*delta on subject), eps_t + alpha(eps_p - eps_n))``
    for one row per ``alpha`` (rows of ``cond_target``/``batch``/``x_t``/``t``/``eps_*`` aligned); ``prediction=
    "x0"`` compares the ``x_0`` estimates instead (the official code's weighting)."""
    if prediction not in ("eps", "x0"):
        raise ValueError(f"prediction must be 'eps' or 'x0', got {prediction!r}")
    edited = edit_conditioning(cond_target, batch, subject, delta, alpha, occurrence=occurrence)
    pred = generator.predict_noise(x_t, t, edited)
    target = guided_target(eps_target, eps_positive, eps_negative, alpha)
    if prediction == "x0":
        pred, target = _to_x0(generator, x_t, t, pred), _to_x0(generator, x_t, t, target)
    return F.mse_loss(pred, target.detach())


# --- learning -------------------------------------------------------------------------------------------------------
@dataclass
class LearnedDirection:
    """A learned ``delta`` ``[D]`` in ``space``, the loss of every optimiser step, and how it was made."""

    delta: torch.Tensor
    space: str
    losses: list[float] = field(default_factory=list)
    config: dict = field(default_factory=dict)


@dataclass
class _Pool:
    texts: list[str]
    subjects: list[str]
    cond_target: Conditioning
    cond_positive: Conditioning
    cond_negative: Conditioning
    x0: torch.Tensor  # [N * samples, 3, S, S] in [-1, 1]
    row_of: torch.Tensor  # prompt row of every pooled image


@torch.no_grad()
def _build_pool(generator, conditioner, rows: list[AttributePrompt], samples_per_prompt: int, sample_steps: int,
                guidance: float | None, seed: int) -> _Pool:
    cond_t, cond_p, cond_n = (conditioner([getattr(r, k) for r in rows]) for k in ("target", "positive", "negative"))
    kwargs = {} if guidance is None else {"guidance": guidance}
    images = [generator.sample(cond_t, steps=sample_steps, seed=seed + 7919 * k, **kwargs)
              for k in range(samples_per_prompt)]
    x0 = torch.cat(images) * 2 - 1
    row_of = torch.arange(len(rows)).repeat(samples_per_prompt)
    return _Pool([r.target for r in rows], [r.subject for r in rows], cond_t, cond_p, cond_n, x0, row_of)


def learn_direction(generator, conditioner, prompts: Sequence, prefixes: Sequence[str] = ("",), *,
                    steps: int = 200, batch_size: int = 4, scales_per_sample: int = 4,
                    scale_range: tuple[float, float] = (0.1, 5.0), random_sign: bool = True, lr: float = 0.1,
                    betas: tuple[float, float] = (0.5, 0.8), weight_decay: float = 0.333, grad_accum: int = 1,
                    samples_per_prompt: int = 2, sample_steps: int = 20, guidance: float | None = None,
                    t_range: tuple[float, float] = (0.0, 1.0), prediction: str = "eps", seed: int = 0,
                    init: torch.Tensor | None = None, progress: bool | None = None) -> LearnedDirection:
    """Learn ``delta`` (init zero, or ``init``) for ``prompts`` (:class:`AttributePrompt`, ``(target, positive,
    negative, subject)`` tuples, or the official config's dicts) combined with every prefix, against the frozen
    ``generator`` read through ``conditioner`` (see the module docstring). Each optimiser step averages
    ``grad_accum`` losses, each over ``batch_size`` pooled ``x_t`` times ``scales_per_sample`` scales."""
    rows = [_prompt(p).with_prefix(prefix) for prefix in prefixes for p in prompts]
    if not rows:
        raise ValueError("need at least one prompt and one prefix")
    if not 0 <= t_range[0] <= t_range[1] <= 1:
        raise ValueError(f"t_range must lie in [0, 1], got {t_range}")
    if prediction not in ("eps", "x0"):
        raise ValueError(f"prediction must be 'eps' or 'x0', got {prediction!r}")
    lo, hi = scale_range
    config = {k: v for k, v in locals().items() if k in (
        "steps", "batch_size", "scales_per_sample", "scale_range", "random_sign", "lr", "betas", "weight_decay",
        "grad_accum", "samples_per_prompt", "sample_steps", "guidance", "t_range", "prediction", "seed")}
    config.update(prompts=[asdict(_prompt(p)) for p in prompts], prefixes=list(prefixes), space=conditioner.space)
    pool = _build_pool(generator, conditioner, rows, samples_per_prompt, sample_steps, guidance, seed)
    dim = pool.cond_target.dim
    delta = torch.nn.Parameter(torch.zeros(dim) if init is None else torch.as_tensor(init).detach().clone().float())
    opt = torch.optim.AdamW([delta], lr=lr, betas=betas, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    timesteps = generator.timesteps
    losses: list[float] = []
    bar = Progress(steps, desc="learn delta", unit="step", enabled=progress)
    for _ in range(steps):
        total = 0.0
        for _ in range(grad_accum):
            pick = torch.randint(0, len(pool.x0), (batch_size,), generator=gen)
            rows_b = pool.row_of[pick]
            t_rel = t_range[0] + (t_range[1] - t_range[0]) * torch.rand(batch_size, generator=gen)
            t = (t_rel * (timesteps - 1)).round().long()
            noise = torch.randn(pool.x0[pick].shape, generator=gen)
            x_t = generator.schedule.add_noise(pool.x0[pick], t, noise)
            with torch.no_grad():
                eps = [generator.predict_noise(x_t, t, c.select(rows_b))
                       for c in (pool.cond_target, pool.cond_positive, pool.cond_negative)]
            scale = lo + (hi - lo) * torch.rand(scales_per_sample, batch_size, generator=gen)
            if random_sign:
                scale = scale * (torch.rand(scales_per_sample, batch_size, generator=gen) > 0.5).float().mul(2).sub(1)
            alpha = scale.flatten()  # row s * batch_size + b: scale s of sample b
            tile = rows_b.repeat(scales_per_sample)
            batch = conditioner.model.tokenize([pool.texts[i] for i in tile.tolist()])
            rep = (lambda x: x.repeat(scales_per_sample, *([1] * (x.dim() - 1))))  # noqa: E731
            loss = direction_loss(generator, pool.cond_target.select(tile), batch,
                                  [pool.subjects[i] for i in tile.tolist()], delta, alpha, rep(x_t), rep(t),
                                  *(rep(e) for e in eps), prediction=prediction)
            (loss / grad_accum).backward()
            total += loss.item() / grad_accum
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
        if bar.active:
            bar.set_postfix(loss=f"{total:.4f}")
            bar.update(1)
    bar.close()
    return LearnedDirection(delta.detach().clone(), conditioner.space, losses, config)


# --- saving and loading -----------------------------------------------------------------------------------------------
def save_direction(direction: LearnedDirection, directory: str | Path, info: dict | None = None) -> Path:
    """``direction.safetensors`` (the delta) and ``direction.json`` (space, config, losses, ``info``) in
    ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file({"delta": direction.delta.detach().float().contiguous()}, str(d / "direction.safetensors"))
    meta = {"format": "cliplab-attribute-direction", "space": direction.space, "config": direction.config,
            "final_loss": direction.losses[-1] if direction.losses else None,
            "losses_every_10": direction.losses[::10], "info": dict(info or {})}
    (d / "direction.json").write_text(json.dumps(meta, indent=2) + "\n")
    return d


def generator_fingerprint(generator: torch.nn.Module) -> str:
    """16 hex digits of a SHA-256 over the generator's parameters and buffers: which generator a learned direction
    belongs to (a delta is only meaningful for the generator it was learned against)."""
    h = hashlib.sha256()
    for name, value in sorted(generator.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def shipped_directions() -> list[str]:
    """Names of the directions shipped with cliplab (``load_direction(name)``)."""
    if not _PRETRAINED.is_dir():
        return []
    return sorted(p.name for p in _PRETRAINED.iterdir() if (p / "direction.json").is_file())


def load_direction(name_or_dir: str | Path) -> LearnedDirection:
    """A saved direction by shipped name (:func:`shipped_directions`) or directory; ``config["info"]`` holds the
    ``info`` it was saved with (for the shipped ones: the generator it was learned against)."""
    p = Path(name_or_dir)
    d = p if (p / "direction.json").is_file() else _PRETRAINED / str(name_or_dir)
    if not (d / "direction.json").is_file():
        raise FileNotFoundError(f"no saved direction at {name_or_dir!r}; shipped: {shipped_directions() or 'none'}")
    meta = json.loads((d / "direction.json").read_text())
    if meta.get("format") != "cliplab-attribute-direction":
        raise ValueError(f"{d / 'direction.json'} is not an attribute-direction file")
    delta = load_file(str(d / "direction.safetensors"))["delta"]
    config = dict(meta.get("config", {}), info=meta.get("info", {}))
    return LearnedDirection(delta, meta["space"], [], config)


# --- reading the effect ---------------------------------------------------------------------------------------------
@torch.no_grad()
def attribute_readout(judge, images: torch.Tensor, subject: str, positive: str, negative: str
                      ) -> dict[str, torch.Tensor]:
    """How a scene judge (:class:`cliplab.generation.SceneJudge`) reads the colour of ``subject`` (a shape) in each
    image: ``positive`` / ``negative`` (bool ``[B]``: a region of that colour is parsed as the subject's shape) and
    ``share`` (float ``[B]``: pixels of the positive colour among pixels of either colour; 0.5 when there are none),
    a continuous reading when the rest of the prompt uses neither colour."""
    for c in (positive, negative):
        if c not in judge.colours:
            raise ValueError(f"the judge knows the colours {judge.colours}, not {c!r}")
    parsed = judge.parse(images)
    cmap = judge.colour_map(images)
    pos = (cmap == judge.colours.index(positive)).flatten(1).sum(1).float()
    neg = (cmap == judge.colours.index(negative)).flatten(1).sum(1).float()
    share = torch.where(pos + neg > 0, pos / (pos + neg).clamp(min=1), torch.full_like(pos, 0.5))
    return {"positive": torch.tensor([p.get(positive) == subject for p in parsed]),
            "negative": torch.tensor([p.get(negative) == subject for p in parsed]), "share": share}
