"""The contrastive training loop: ``Trainer(config).fit(resume=False)``.

One step: encode images and texts (under ``torch.autocast("cpu", bfloat16)`` with ``precision="bf16"``), L2-normalise
the features in fp32, call the loss plug-in, back-propagate, clip the global gradient norm, AdamW step, clamp the
model's ``logit_scale`` to ``[0, ln 100]`` (as OpenCLIP), set the next learning rate (linear warm-up, then cosine).

Out directory layout::

    out/config.json                      the TrainConfig of the run
    out/metrics.jsonl                    one record every log_every steps
    out/checkpoints/step-0000500/model/  model.save(): model.safetensors + cliplab.json
    out/checkpoints/step-0000500/state.pt  optimizer, scheduler, loss module, sampler, data position, RNG states
    out/final/                           the final model; cliplab.load(out / "final")

``state.pt`` holds plain tensors, dicts, lists, strings and numbers only: ``torch.load(path, weights_only=True)``
reads it. ``fit(resume=True)`` continues from the newest complete checkpoint; because every batch is a pure function
of its step, a resumed fp32 run on the CPU with ``num_workers=0`` reproduces the uninterrupted run's losses exactly.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..models import CLIP, ConfigError, create_model, load
from .config import TrainConfig
from .data import TrainBatches, get_source, make_loader
from .losses import MAX_LOGIT_SCALE, BatchOutput, get_loss
from .samplers import get_sampler

__all__ = ["Trainer", "TrainResult", "WarmupCosine", "param_groups", "freeze_parameters", "latest_checkpoint",
           "STATE_FILE", "MODEL_DIR"]

STATE_FILE = "state.pt"
MODEL_DIR = "model"
CHECKPOINT_PREFIX = "step-"
STATE_FORMAT = "cliplab-train-state"
STATE_VERSION = 1


# --------------------------------------------------------------------------------------------------------------------
# Schedule, parameter groups, freezing


class WarmupCosine:
    """Learning rate for step ``s`` (0-based): ``lr * (s + 1) / warmup`` during warm-up, then a cosine from ``lr``
    down to ``min_lr`` at the last step. A pure function of the step; its state is the step count."""

    def __init__(self, lr: float, total: int, warmup: int = 0, min_lr: float = 0.0):
        self.lr, self.total, self.warmup, self.min_lr = float(lr), int(total), int(warmup), float(min_lr)
        self.last_step = 0

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        span = max(1, self.total - self.warmup - 1)
        t = min(1.0, (step - self.warmup) / span)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * t))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        self.last_step = int(step)
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "total": self.total, "warmup": self.warmup, "min_lr": self.min_lr,
                "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = int(state.get("last_step", 0))  # the schedule itself follows the (possibly new) config


def _no_decay_names(model: nn.Module) -> set[str]:
    """Biases, LayerNorm gains, embeddings (token, positional, class), logit_scale: everything with ndim < 2, the
    weights of ``nn.LayerNorm`` / ``nn.Embedding`` modules and parameters named ``*pos_embed*`` / ``*embedding*``.
    The patch "embedding" is a convolution, i.e. a linear map, and is decayed like other weights."""
    names = set()
    for mname, module in model.named_modules():
        if isinstance(module, (nn.LayerNorm, nn.Embedding)):
            names.update(f"{mname}.{p}" if mname else p for p, _ in module.named_parameters(recurse=False))
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim < 2 or "pos_embed" in leaf or "embedding" in leaf or name == "logit_scale":
            names.add(name)
    return names


def param_groups(model: nn.Module, weight_decay: float, extra: nn.Module | None = None) -> list[dict[str, Any]]:
    """AdamW parameter groups: ``decay`` (matrices) and ``no_decay`` (see :func:`_no_decay_names`), trainable
    parameters only; parameters of ``extra`` (the loss module) join ``no_decay``."""
    skip = _no_decay_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name in skip else decay).append(p)
    if extra is not None:
        no_decay.extend(p for p in extra.parameters() if p.requires_grad)
    groups = [{"name": "decay", "params": decay, "weight_decay": float(weight_decay)},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def freeze_parameters(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """Set ``requires_grad=False`` on parameters whose names match any shell pattern (``fnmatch``, case-sensitive);
    returns the frozen names. A pattern that matches nothing is an error (a typo must not train everything)."""
    patterns = list(patterns)
    frozen = []
    hit = {p: False for p in patterns}
    for name, param in model.named_parameters():
        for pat in patterns:
            if fnmatch.fnmatchcase(name, pat):
                hit[pat] = True
                param.requires_grad_(False)
                frozen.append(name)
                break
    missing = [p for p, h in hit.items() if not h]
    if missing:
        raise ConfigError(f"freeze patterns {missing} match no parameter (names look like "
                          f"'visual.transformer.blocks.0.attn.qkv.weight', 'text.token_embed.weight', 'logit_scale')")
    return frozen


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints


def _checkpoint_step(path: Path) -> int | None:
    name = path.name
    if not name.startswith(CHECKPOINT_PREFIX):
        return None
    try:
        return int(name[len(CHECKPOINT_PREFIX):])
    except ValueError:
        return None


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints under ``out_dir/checkpoints``, oldest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(s, p) for p in root.iterdir() if (s := _checkpoint_step(p)) is not None and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def _rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(py_version), "state": [int(v) for v in py_state],
                   "gauss": None if py_gauss is None else float(py_gauss)},
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


# --------------------------------------------------------------------------------------------------------------------
# Trainer


@dataclass
class TrainResult:
    model: CLIP
    out_dir: Path
    start_step: int  # 0, or the checkpoint step a resumed run started from
    steps: list[int] = field(default_factory=list)  # steps run in this call (1-based: step k = k-th update done)
    losses: list[float] = field(default_factory=list)  # the loss of each of those steps
    final_dir: Path | None = None
    records: list[dict[str, Any]] = field(default_factory=list)  # metrics records written in this call


def check_groups(source, sampler) -> None:
    """A source whose items come in groups (``group_size`` > 1, e.g. shape variants) needs every group whole in one
    batch: an order-keeping sampler, and a batch size and source size divisible by the group size."""
    k = source.group_size
    if k <= 1:
        return
    problems = []
    if not sampler.keeps_order:
        problems.append(f"the {type(sampler).__name__} does not keep consecutive items together (use sampler "
                        "'sequential')")
    if sampler.batch_size % k:
        problems.append(f"batch_size {sampler.batch_size} is not a multiple of {k}")
    if source.size is not None and source.size % k:
        problems.append(f"the source's size {source.size} is not a multiple of {k}")
    if problems:
        raise ConfigError(f"the data source yields groups of {k} items that must share a batch, but " +
                          "; ".join(problems))


class Trainer:
    """Build everything a run needs from a :class:`TrainConfig` (or its dict / JSON path) and train with ``fit``.

    ``model`` may be passed to train an existing model instead of building ``config.model``.
    """

    def __init__(self, config: TrainConfig | dict | str | os.PathLike, model: CLIP | None = None):
        if isinstance(config, dict):
            config = TrainConfig.from_dict(config)
        elif not isinstance(config, TrainConfig):
            config = TrainConfig.load(config)
        self.config = config.validate()
        c = self.config
        self.out_dir = Path(c.out_dir)
        if model is None:
            model = load(c.init_from) if c.init_from else create_model(c.model_config(), seed=c.seed)
        self.model = model.train()
        self.loss_fn = get_loss(c.loss, **c.loss_kwargs).train()
        with torch.random.fork_rng(devices=[]):  # a loss's own parameters are as reproducible as the model's
            torch.manual_seed(c.seed)
            self.loss_fn.attach(self.model)
        self.frozen = freeze_parameters(self.model, c.freeze)
        groups = param_groups(self.model, c.weight_decay, extra=self.loss_fn)
        if not groups:
            raise ConfigError("nothing to train: every parameter is frozen")
        self.trainable = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(groups, lr=c.lr, betas=c.betas, eps=c.eps, fused=True)
        self.schedule = WarmupCosine(c.lr, c.steps, c.warmup_steps, c.min_lr)
        self.source = get_source(c.data.source, self.model.preprocessor, **c.data.options)
        if self.loss_fn.uses_negatives and not self.source.has_negatives:
            raise ConfigError(f"loss {c.loss!r} needs hard-negative captions, which this {c.data.source!r} source "
                              "does not give: set the source's negatives (synthetic: --set "
                              "'data.options.hard_negatives=[\"shape\"]') or turn the loss's term off (hni_weight=0)")
        self.sampler = get_sampler(c.sampler, self.source.size, c.batch_size, seed=c.seed, **c.sampler_kwargs)
        check_groups(self.source, self.sampler)
        self.batches = TrainBatches(self.source, self.sampler, self.model.tokenizer, c.steps, caption=c.data.caption,
                                    long_prob=c.data.long_prob, seed=c.seed)
        self.step = 0  # updates done

    # --- one update ----------------------------------------------------------------------------------------------
    def forward(self, batch) -> BatchOutput:
        with contextlib.ExitStack() as stack:
            if self.config.attention == "math":
                # On the CPU, PyTorch's fused ("flash") attention kernel is 2-2.5x slower than the math path in
                # bf16 for these short sequences in training (forward + backward); see docs/training.md.
                stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
            stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.config.precision == "bf16"))
            img = self.model.encode_image(batch.pixels)
            negative_ids = batch.extras.get("negative_ids") if self.loss_fn.uses_negatives else None
            if negative_ids is None:
                txt, neg = self._encode_text(batch.ids), None
            else:  # one call, so captions and their negatives share the length buckets
                feats = self._encode_text(torch.cat([batch.ids, negative_ids]))
                txt, neg = feats[: len(batch.ids)], F.normalize(feats[len(batch.ids):].float(), dim=-1)
        return BatchOutput(F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1),
                           self.model.logit_scale, batch, negative_text_features=neg)

    def _encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Text features, encoding the batch as two length buckets when that saves at least 20% of the token
        positions. The text tower cuts each call to its longest row (nothing after EOT reaches the pooled token under
        causal attention), so a batch mixing 15-token and 77-token captions would otherwise pay 77 positions for
        every row. Rows are independent, so the result is the same function of each row."""
        eot = self.model.text.eot_index(ids)
        n = ids.shape[0]
        lengths, order = torch.sort(eot + 1, stable=True)
        longest = int(lengths[-1])
        k = torch.arange(1, n + 1)
        cost = k * lengths + (n - k) * longest  # rows order[:k] padded to lengths[k-1], the rest to the longest
        best = int(torch.argmin(cost))
        if not self.config.bucket_text or n < 2 or int(cost[best]) > 0.8 * n * longest or best == n - 1:
            return self.model.encode_text(ids)
        first, _ = torch.sort(order[: best + 1])
        second, _ = torch.sort(order[best + 1:])
        feats = torch.cat([self.model.encode_text(ids[first]), self.model.encode_text(ids[second])])
        inverse = torch.empty(n, dtype=torch.long)
        inverse[torch.cat([first, second])] = torch.arange(n)
        return feats[inverse]

    def train_step(self, batch) -> tuple[float, dict[str, float]]:
        """One optimiser update on ``batch``; returns the loss and the values to log."""
        lr = self.schedule.apply(self.optimizer, self.step)
        out = self.forward(batch)
        loss, logs = self.loss_fn(out)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"loss is {value} at step {self.step + 1}; the last checkpoint is intact "
                                     "(lower lr or raise warmup_steps, then resume)")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.config.clip_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, clip if clip else float("inf"))
        self.optimizer.step()
        if self.model.logit_scale.requires_grad:
            with torch.no_grad():
                self.model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
        self.step += 1
        return value, {**logs, "lr": lr, "grad_norm": grad_norm.item()}

    # --- checkpoints ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        c = self.config
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "loss": {"name": c.loss, "state": dict(self.loss_fn.state_dict())},
            "sampler": {"name": c.sampler, "state": self.sampler.state_dict()},
            "data": {"step": self.step, "samples": self.step * c.batch_size},
            "rng": _rng_state(),
            "config": json.loads(json.dumps(c.to_dict())),
        }

    def save_checkpoint(self) -> Path:
        root = self.out_dir / "checkpoints"
        final = root / f"{CHECKPOINT_PREFIX}{self.step:07d}"
        tmp = root / (final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save(tmp / MODEL_DIR)
        torch.save(self.state_dict(), tmp / STATE_FILE)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        keep = self.config.keep_checkpoints
        if keep:
            for old in list_checkpoints(self.out_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        from safetensors.torch import load_file

        path = Path(path)
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        if state.get("format") != STATE_FORMAT:
            raise ConfigError(f"{path / STATE_FILE}: not a cliplab training state")
        self.model.load_state_dict(load_file(str(path / MODEL_DIR / "model.safetensors")))
        if state["loss"]["name"] != self.config.loss:
            raise ConfigError(f"{path}: checkpoint was trained with loss {state['loss']['name']!r}, "
                              f"config says {self.config.loss!r}")
        self.loss_fn.load_state_dict(state["loss"]["state"])
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as e:
            raise ConfigError(f"{path}: optimizer state does not fit this run (freeze patterns changed?): {e}") from e
        self.schedule.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"]["state"])
        _set_rng_state(state["rng"])
        self.step = int(state["step"])

    # --- the loop ------------------------------------------------------------------------------------------------
    def fit(self, resume: bool | str | os.PathLike = False) -> TrainResult:
        """Train up to ``config.steps`` updates. ``resume=True`` continues from the newest checkpoint in the out
        directory (from scratch when there is none); a path resumes from that checkpoint directory."""
        c = self.config
        if resume:
            ckpt = latest_checkpoint(self.out_dir) if resume is True else Path(resume)
            if ckpt is not None:
                self.load_checkpoint(ckpt)
            else:
                warnings.warn(f"no checkpoint under {self.out_dir / 'checkpoints'}: starting from step 0")
        elif self.step == 0 and latest_checkpoint(self.out_dir) is not None:
            raise ConfigError(f"{self.out_dir} already holds checkpoints of another run: resume it (resume=True, "
                              "cliplab train --resume) or choose another out_dir")
        start = self.step
        self.out_dir.mkdir(parents=True, exist_ok=True)
        c.save(self.out_dir / "config.json")
        metrics_path = self.out_dir / "metrics.jsonl"
        self._trim_metrics(metrics_path, start)
        result = TrainResult(self.model, self.out_dir, start)

        threads = torch.get_num_threads()
        if c.threads:
            torch.set_num_threads(int(c.threads))
        self.model.train()
        try:
            self._loop(result, metrics_path)
        finally:
            torch.set_num_threads(threads)
            self.model.eval()
        if self.step >= c.steps:
            result.final_dir = self.model.save(self.out_dir / "final")
        return result

    def _loop(self, result: TrainResult, metrics_path: Path) -> None:
        from ..progress import Progress

        c = self.config
        if self.step >= c.steps:
            return
        loader = make_loader(self.batches, self.step, c.data.num_workers, c.data.prefetch)
        bar = Progress(total=c.steps, initial=self.step, enabled=c.progress, unit="step", desc="train")
        window: dict[str, list[float]] = {}
        n_trunc = n_long = n_rows = 0
        data_wait = 0.0
        t_window = time.perf_counter()
        last_ckpt = None
        try:
            with open(metrics_path, "a", encoding="utf-8") as log:
                t_fetch = time.perf_counter()
                for batch in loader:
                    data_wait += time.perf_counter() - t_fetch
                    loss, logs = self.train_step(batch)
                    result.steps.append(self.step)
                    result.losses.append(loss)
                    window.setdefault("loss", []).append(loss)
                    for k, v in logs.items():
                        window.setdefault(k, []).append(float(v))
                    n_rows += len(batch)
                    n_trunc += batch.n_truncated
                    n_long += int(batch.is_long.sum())
                    bar.update(1)
                    if (c.log_every and self.step % c.log_every == 0) or self.step == c.steps:
                        dt = time.perf_counter() - t_window
                        n = len(window["loss"])
                        rec = {"step": self.step, "epoch": round(self.sampler.epoch(self.step), 4),
                               "loss": float(np.mean(window.pop("loss"))), "lr": window.pop("lr")[-1],
                               "temperature": math.exp(-self.model.logit_scale.item()),
                               "logit_scale": self.model.logit_scale.item(),
                               "samples_per_s": n_rows / dt, "steps_per_s": n / dt,
                               "data_wait_frac": data_wait / dt, "truncated": n_trunc, "long_frac": n_long / n_rows}
                        rec.update({k: float(np.mean(v)) for k, v in window.items()})
                        log.write(json.dumps(rec) + "\n")
                        log.flush()
                        result.records.append(rec)
                        bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}",
                                        samples_s=f"{rec['samples_per_s']:.0f}", T=f"{rec['temperature']:.4f}")
                        window, n_trunc, n_long, n_rows, data_wait = {}, 0, 0, 0, 0.0
                        t_window = time.perf_counter()
                    if self.step == c.steps or (c.checkpoint_every and self.step % c.checkpoint_every == 0):
                        self.save_checkpoint()
                        last_ckpt = self.step
                    t_fetch = time.perf_counter()
        except KeyboardInterrupt as e:
            if self.step > 0 and last_ckpt != self.step:
                last_ckpt, path = self.step, self.save_checkpoint()
                bar.write(f"interrupted: checkpoint at step {self.step} in {path}")
            # what a command line tells the user (cliplab.cli): only what was really saved
            e.cliplab_message = (f"a checkpoint of step {last_ckpt} is in {self.out_dir / 'checkpoints'}; run the "
                                 "same command with --resume to continue" if last_ckpt else
                                 "interrupted before the first step: nothing was saved")
            raise
        finally:
            bar.close()

    @staticmethod
    def _trim_metrics(path: Path, step: int) -> None:
        """Keep the records up to ``step`` (a resumed run rewrites what came after its checkpoint)."""
        if not path.exists():
            return
        if step == 0:
            path.unlink()
            return
        keep = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue
        path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
