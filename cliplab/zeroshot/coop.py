"""CoOp: context optimisation -- learned prompt context for a frozen CLIP, from a few labelled images.

Paper: K. Zhou, J. Yang, C. C. Loy, Z. Liu, "Learning to Prompt for Vision-Language Models" (IJCV 2022; official code
KaiyangZhou/CoOp, ``trainers/coop.py``). ``M`` context vectors replace the words of a hand prompt: each class prompt
is ``[SOS][V1..VM][class tokens][.][EOT]`` (class at the ``end``; or ``middle``: ``M/2`` before the name and ``M/2``
after it; or ``front``: all after it), shared by all classes (unified) or one set per class (class-specific context,
CSC). The vectors start as N(0, 0.02²) or as the token embeddings of a phrase (``"a photo of a"``, ``M = 4``); the
frozen text tower encodes the prompts, the EOT feature after ``ln_final`` and the projection is the class embedding,
and the context is trained with the cross-entropy of ``exp(logit_scale) * cos(image, class)`` on few-shot labels.

Where it acts: the text tower's input, the token embeddings before the positional embeddings are added
(:class:`~cliplab.zeroshot.prompt_learning.PromptLearner`); the image tower is untouched.

Choices that differ from the paper or its code, and why:

* Image features are computed once from the frozen image tower, without the paper's random resized crop and flip:
  the tower is frozen, so caching is exact for un-augmented images, and it makes the CPU runs possible.
* The schedule is in steps, not epochs (SGD momentum 0.9, weight decay 5e-4, cosine, optional constant warm-up at
  1e-5, as the code's config). The default ``lr`` 0.002 and batch 32 are the paper's; the experiments use batches of
  128 (a step's cost is the text tower over all class prompts, so more images per step are nearly free) and 250
  steps, 31 epochs at 16 shots against the paper's 200 (CPU budget).
* The logit scale is the model's ``exp(logit_scale)`` capped at 100, as :class:`~cliplab.zeroshot.ZeroShotClassifier`
  uses it, so an initialised learner gives the hand prompt's classifier bit-for-bit.
* A phrase is split into BPE tokens (``M`` = its token count), not into words as the code does (``len(split(" "))``);
  the two agree when every word is one token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..methods import register_method
from .classifier import ZeroShotClassifier
from .prompt_learning import (
    FitResult,
    LearnedPrompts,
    PromptLearner,
    PromptMixture,
    fit_prompts,
    model_logit_scale,
    preset_summary,
    preset_task,
    register_prompt_preset,
)

register_method(
    "coop",
    "Learning to Prompt for Vision-Language Models (CoOp)",
    "learned context vectors (unified or class-specific, class token at end/middle/front, random or phrase init) "
    "replace the prompt words in the frozen text tower's input; trained by cross-entropy on few-shot image features",
    doc="docs/methods/coop.md",
)(__name__)

__all__ = ["coop_prompts", "train_coop", "coop_classifier", "CoOpRun", "coop_preset"]


def coop_prompts(model, classnames: Sequence[str], n_ctx: int = 16, *, ctx_init: str | None = None,
                 class_position: str = "end", class_specific: bool = False, init_std: float = 0.02,
                 seed: int = 0) -> PromptMixture:
    """A CoOp prompt learner as a one-expert :class:`~cliplab.zeroshot.prompt_learning.PromptMixture` (no router):
    ``n_ctx`` vectors (or ``ctx_init``'s tokens), ``class_position`` ``end``/``middle``/``front``, unified or
    ``class_specific``; suffix ``"."``."""
    learner = PromptLearner(model, classnames, n_ctx, ctx_init=ctx_init, class_position=class_position,
                            class_specific=class_specific, suffix=".", init_std=init_std, seed=seed)
    return PromptMixture([learner], router=False, logit_scale=model_logit_scale(model)).to(model.device)


class CoOpRun:
    """What :func:`train_coop` returns: the trained ``prompts`` (a :class:`PromptMixture`), the ``fit`` record, and
    :meth:`learned` / :meth:`save` / :meth:`classifier` for use."""

    def __init__(self, model, prompts: PromptMixture, fit: FitResult, config: dict):
        self.model, self.prompts, self.fit, self.config = model, prompts, fit, config

    def learned(self) -> LearnedPrompts:
        return LearnedPrompts.from_mixture(self.prompts, "coop", self.model, info=self.config)

    def save(self, path: str | Path) -> Path:
        return self.learned().save(path)

    def classifier(self):
        return ZeroShotClassifier.from_learned_prompts(self.model, self.prompts)


def train_coop(model, classnames: Sequence[str], features: torch.Tensor, labels: Sequence[int], *, n_ctx: int = 16,
               ctx_init: str | None = None, class_position: str = "end", class_specific: bool = False,
               init_std: float = 0.02, steps: int = 200, lr: float = 0.002, batch_size: int = 32,
               optimizer: str = "sgd", momentum: float = 0.9, weight_decay: float = 5e-4, warmup_steps: int = 0,
               warmup_lr: float = 1e-5, seed: int = 0, log_every: int = 0) -> CoOpRun:
    """Build CoOp prompts for ``classnames`` and fit them to cached image ``features`` ``[N, D]`` of ``model`` with
    ``labels`` (indices into ``classnames``). Returns a :class:`CoOpRun`."""
    prompts = coop_prompts(model, classnames, n_ctx, ctx_init=ctx_init, class_position=class_position,
                           class_specific=class_specific, init_std=init_std, seed=seed)
    fit = fit_prompts(model, prompts, features, labels, steps=steps, lr=lr, batch_size=batch_size,
                      optimizer=optimizer, momentum=momentum, weight_decay=weight_decay, warmup_steps=warmup_steps,
                      warmup_lr=warmup_lr, seed=seed, log_every=log_every)
    config = {"n_ctx": prompts.experts[0].n_ctx, "ctx_init": ctx_init, "class_position": class_position,
              "class_specific": class_specific, "steps": steps, "lr": lr, "batch_size": batch_size,
              "optimizer": optimizer, "seed": seed, "shots_total": len(labels)}
    return CoOpRun(model, prompts, fit, config)


def coop_classifier(model, prompts):
    """A :class:`~cliplab.zeroshot.ZeroShotClassifier` from CoOp prompts (a file, :class:`LearnedPrompts` or
    :class:`PromptMixture`)."""
    return ZeroShotClassifier.from_learned_prompts(model, prompts)


@register_prompt_preset("coop", "CoOp: 16 learned context vectors on a 16-shot synthetic colour x shape task "
                                "(shapes-tiny), written as a learned-prompts file")
def coop_preset(model, out: Path, **options) -> dict:
    """``cliplab train --preset coop``: :func:`train_coop` on :func:`synthetic_prompt_task` (task options
    ``shots``, ``n_test``, ``names``, ``colours``, ``shapes``, ``seed``, ...; training options as :func:`train_coop`'s
    keywords), then the file at ``out``."""
    task, xtr, ytr, xte, yte = preset_task(model, options)
    run = train_coop(model, task.classnames, xtr, ytr, **options)
    return preset_summary(model, run, task, xte, yte, out)
