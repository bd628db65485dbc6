"""A small training loop for text models (the representation-learning methods of ``cliplab.textrep`` share it).

``fit(params, step, steps=...)`` runs AdamW with a linear warm-up and a cosine decay. Each step calls
``step(i) -> (loss, logs)``; the loop does the backward pass, gradient clipping, the optimizer step, progress
(:mod:`cliplab.progress`) and logging every ``log_every`` steps. Seeded: the same seed and step function give the same
weights. Kept separate from :mod:`cliplab.train` (CLIP's image-text trainer, with its data sources and checkpoints):
these runs are short and their data is plain text.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch


@dataclass
class FitResult:
    steps: int
    losses: list[float] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def lr_at(step: int, steps: int, lr: float, warmup: int, min_lr: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from ``lr`` to ``min_lr`` at ``steps``."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def fit(params: Iterable[torch.nn.Parameter], step: Callable[[int], tuple[torch.Tensor, dict]], *, steps: int,
        lr: float = 1e-4, warmup: int = 0, weight_decay: float = 0.0, clip_norm: float | None = 1.0,
        min_lr: float = 0.0, seed: int = 0, progress: bool | None = None, log_every: int = 10,
        desc: str = "fit") -> FitResult:
    """Train ``params`` for ``steps`` steps of ``step(i) -> (loss, logs)`` (see the module docstring)."""
    from ..progress import Progress

    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires a gradient")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    result = FitResult(steps)
    t0 = time.perf_counter()
    window: list[float] = []
    with torch.random.fork_rng(devices=[]), Progress(total=steps, desc=desc, unit="step", enabled=progress) as bar:
        torch.manual_seed(seed)
        for i in range(steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(i, steps, lr, warmup, min_lr)
            loss, logs = step(i)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: the loss is {float(loss)} at step {i}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip_norm:
                torch.nn.utils.clip_grad_norm_(params, clip_norm)
            opt.step()
            value = float(loss.detach())
            result.losses.append(value)
            window.append(value)
            bar.update(1)
            if (i + 1) % log_every == 0 or i + 1 == steps:
                rec = {"step": i + 1, "loss": sum(window) / len(window), "lr": opt.param_groups[0]["lr"],
                       **{k: float(v) for k, v in logs.items()}}
                result.records.append(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
                window = []
    result.seconds = time.perf_counter() - t0
    return result


# --- the registry of text-representation trainers (``cliplab textrep train SLUG``) ---------------------------------
@dataclass(frozen=True)
class TextTrainer:
    """A method that trains a text embedder: ``train(model, texts, *, steps, batch_size=None, lr=None, seed=0,
    progress=False) -> TextEmbedder`` (``None`` means the method's own default; ``model`` a name or saved directory
    that :func:`cliplab.text.load_embedder` / :func:`cliplab.text.load_lm` read, or ``None`` for the method's
    default model). The result saves with ``.save(dir)`` and loads back with ``load_embedder(dir)``."""

    slug: str
    train: Callable
    default_model: str
    summary: str


_TRAINERS: dict[str, TextTrainer] = {}


def register_trainer(slug: str, default_model: str, summary: str):
    """Decorator on a method module's ``cli_train`` function (see :class:`TextTrainer`)."""

    def register(fn):
        if slug in _TRAINERS and _TRAINERS[slug].train.__module__ != fn.__module__:
            raise ValueError(f"text trainer {slug!r} registered twice")
        _TRAINERS[slug] = TextTrainer(slug, fn, default_model, summary)
        return fn

    return register


def list_trainers() -> list[TextTrainer]:
    """The registered trainers (import ``cliplab.textrep``'s modules first: ``cliplab.methods.import_capability``)."""
    return [_TRAINERS[k] for k in sorted(_TRAINERS)]


def get_trainer(slug: str) -> TextTrainer:
    if slug not in _TRAINERS:
        import difflib

        close = difflib.get_close_matches(slug, list(_TRAINERS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown text trainer {slug!r}{hint} (known: {', '.join(sorted(_TRAINERS)) or 'none'})")
    return _TRAINERS[slug]
