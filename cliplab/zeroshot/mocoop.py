"""MoCoOp: a mixture of learned prompts with an image-conditioned router, gate supervision from hand-prompt groups and
a text-to-text regulariser.

Paper: Y. Du et al., "Mixture of Prompt Learning for Vision Language Models" (official code dyabel/mocoop,
``prompting/moe.py``, ``prompting/losses.py``). Hand templates are split into semantic **groups**; expert ``i`` is a
soft prompt initialised from the first template of group ``i``, with context both before and after the class name
(the words left and right of ``{}``). A linear **router** on the normalised image feature picks the top-2 experts; their
logits are softmaxed and the image's class embeddings are the gate-weighted sums of the two experts' normalised class
features, plus a shared zero-initialised correction vector ``w`` before normalising. Losses:

* ``L_ce``: cross-entropy of ``exp(logit_scale) * img . text_c`` (:func:`~cliplab.zeroshot.prompt_learning.fit_prompts`);
* ``L_gate`` (:func:`gate_targets`, :func:`gate_loss`): the router's logits against ``softmax(t)``, where
  ``t_g = img . P_g(y)`` is the image's similarity to group ``g``'s prototype of its own class (the normalised mean of
  the group's normalised hand-prompt features) with +10 added to its top-2 entries;
* ``L_text`` (:func:`text_to_text_loss`): for each expert ``i``, its class features ``T_i(c)`` scored against group
  ``i``'s prototypes ``P_i(c')`` of every class -- base and new names when training on base classes -- with
  cross-entropy towards ``c' = c`` (a LASP-style text-to-text loss).

``L = L_ce + lambda_text L_text + lambda_gate L_gate`` (the configs: 5 and 1). Where it acts: the text tower's input
token embeddings (context vectors, as CoOp) and, for the router, the final normalised joint-space image feature.

Choices that differ from the paper or its code, and why:

* The model is frozen, including the image tower's LayerNorms that the code fine-tunes (``FINETUNE_VIT_LN``): the
  task keeps the model frozen, and cached image features make CPU runs possible (no augmentation either, as CoOp here).
* A template's final period is a fixed (not learned) token after the after-context; the code strips it from the
  learned prompt but keeps it in the references. With it, an expert at init is its hand template exactly, and one
  expert from ``"a photo of a {}."`` is CoOp's ``"a photo of a"`` learner.
* The text-to-text logits are raw cosines (scale 1), as in the code's ``moe_contrastive_loss`` (the paper's formula has
  a temperature); ``text_scale`` changes it. The code's 50%-probability Gaussian noise on the stored hand-prompt
  features is left out: in the code it is added to a buffer the loss never reads.
* The router is ``Linear(D, K)`` initialised with a seeded N(0, 0.02²) weight and zero bias (the code: PyTorch's default
  init). One expert (``K = 1``) is exactly CoOp with that template's words (the gate is 1, its loss 0).
* The synthetic world's template groups (:data:`SYNTHETIC_TEMPLATE_GROUPS`) stand in for the paper's per-dataset lists:
  one group per object size, a rendering factor the class names do not mention.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ..methods import register_method
from .classifier import ZeroShotClassifier, encode_prompts
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
from .templates import fill_template

register_method(
    "mocoop",
    "Mixture of Prompt Learning for Vision Language Models (MoCoOp)",
    "several soft prompts initialised from hand-template groups, an image router with top-2 gating supervised by the "
    "groups' prototypes, and a text-to-text loss that keeps each expert near its group's hand prompts",
    doc="docs/methods/mocoop.md",
)(__name__)

__all__ = ["SYNTHETIC_TEMPLATE_GROUPS", "mocoop_prompts", "group_prototypes", "gate_targets", "gate_loss",
           "text_to_text_loss", "mocoop_loss", "train_mocoop", "MoCoOpRun", "router_agreement", "mocoop_preset"]

#: Template groups for the synthetic world: one per object size (a "style" the class names do not say).
SYNTHETIC_TEMPLATE_GROUPS: dict[str, list[str]] = {
    "small": ["a small {}.", "a picture of a small {}.", "one small {}."],
    "medium": ["a medium {}.", "a picture of a medium {}.", "one medium {}."],
    "large": ["a large {}.", "a picture of a large {}.", "one large {}."],
}


def _groups(template_groups) -> list[list[str]]:
    groups = list(template_groups.values()) if isinstance(template_groups, dict) else list(template_groups)
    groups = [[g] if isinstance(g, str) else list(g) for g in groups]
    if not groups or any(not g for g in groups):
        raise ValueError("template_groups must be a non-empty list of non-empty template lists")
    return groups


def mocoop_prompts(model, classnames: Sequence[str], template_groups=SYNTHETIC_TEMPLATE_GROUPS, *, top_k: int = 2,
                   correction: bool = True, router_std: float = 0.02, seed: int = 0) -> PromptMixture:
    """One expert per template group, initialised from the group's first template (context before and after the
    class name); a seeded linear router (``K > 1``) with ``top_k`` gating; the correction vector if ``correction``."""
    groups = _groups(template_groups)
    experts = []
    for g in groups:
        template = g[0].rstrip()
        period = "." if template.endswith(".") else ""  # a fixed suffix, not learned (as the code strips it)
        experts.append(PromptLearner(model, classnames, ctx_init=template[: len(template) - len(period)],
                                     suffix=period))
    mixture = PromptMixture(experts, router=True, top_k=top_k, correction=correction,
                            embed_dim=model.config.embed_dim, logit_scale=model_logit_scale(model))
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        mixture.router.weight.copy_(torch.randn(mixture.router.weight.shape, generator=gen) * router_std)
        mixture.router.bias.zero_()
    return mixture.to(model.device)


@torch.no_grad()
def group_prototypes(model, classnames: Sequence[str], template_groups=SYNTHETIC_TEMPLATE_GROUPS,
                     batch_size: int = 256) -> torch.Tensor:
    """``[G, C, D]``: for each group and class, the normalised mean of the group's normalised hand-prompt features."""
    out = []
    for group in _groups(template_groups):
        texts = [fill_template(t, c) for t in group for c in classnames]
        feats = F.normalize(encode_prompts(model, texts, batch_size=batch_size), dim=-1)
        out.append(F.normalize(feats.view(len(group), len(classnames), -1).mean(0), dim=-1))
    return torch.stack(out)


def gate_targets(image_features: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor, *,
                 boost: float = 10.0, top: int = 2) -> torch.Tensor:
    """``softmax(t)`` with ``t[b, g] = norm(img_b) . P_g(y_b)`` plus ``boost`` on each row's top ``top`` entries."""
    img = F.normalize(image_features.float(), dim=-1)
    t = torch.einsum("bd,gbd->bg", img, prototypes[:, labels].to(img))
    top = min(int(top), t.shape[1])
    t = t + torch.zeros_like(t).scatter(1, t.topk(top, dim=1).indices, boost)
    return t.softmax(dim=1)


def gate_loss(router_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the router's logits against soft targets."""
    return F.cross_entropy(router_logits, targets)


def text_to_text_loss(expert_features: torch.Tensor, prototypes: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``[K, C, D]`` normalised expert class features vs ``[K, C, D]`` group prototypes: for each expert, cross-entropy
    of ``scale * T_k(c) . P_k(c')`` over ``c'`` with target ``c``, averaged over experts and classes."""
    if expert_features.shape != prototypes.shape:
        raise ValueError(f"expert features {tuple(expert_features.shape)} and prototypes "
                         f"{tuple(prototypes.shape)} differ: one prototype group per expert, same classes")
    k, c, _ = expert_features.shape
    logits = scale * torch.einsum("kcd,ked->kce", expert_features, prototypes.to(expert_features))
    target = torch.arange(c, device=logits.device).repeat(k)
    return F.cross_entropy(logits.reshape(k * c, c), target)


def _tied_learners(mixture: PromptMixture, model, classnames: Sequence[str]) -> list[PromptLearner]:
    """Learners over ``classnames`` that share each expert's context parameters (for the regulariser on all
    classes when training on base classes)."""
    out = []
    for e in mixture.experts:
        if e.class_specific:
            raise ValueError("the text-to-text loss over extra classes needs unified (not class-specific) context")
        learner = PromptLearner(model, classnames, n_before=e.n_before, n_after=e.n_after, suffix=e.suffix)
        learner.ctx = e.ctx  # the same Parameter: gradients reach the trained expert
        out.append(learner.to(e.token_embeds.device))
    return out


def mocoop_loss(model, mixture: PromptMixture, train_prototypes: torch.Tensor, *, text_weight: float = 5.0,
                gate_weight: float = 1.0, text_scale: float = 1.0, reg_classnames: Sequence[str] | None = None,
                reg_prototypes: torch.Tensor | None = None):
    """The extra-loss callback of :func:`~cliplab.zeroshot.prompt_learning.fit_prompts`: ``gate_weight * L_gate +
    text_weight * L_text``. ``train_prototypes`` ``[G, C, D]`` are the training classes' group prototypes;
    ``reg_classnames`` / ``reg_prototypes`` (all classes, base and new) widen the text-to-text loss."""
    tied = _tied_learners(mixture, model, reg_classnames) if reg_classnames is not None else None
    if tied is not None and reg_prototypes is None:
        raise ValueError("reg_classnames needs reg_prototypes (group_prototypes over those class names)")

    def extra(mix: PromptMixture, x: torch.Tensor, y: torch.Tensor, state: dict) -> dict[str, torch.Tensor]:
        terms = {}
        router_logits = state["extras"]["router_logits"]
        if gate_weight and router_logits is not None:
            terms["gate"] = gate_weight * gate_loss(router_logits, gate_targets(x, train_prototypes, y))
        if text_weight:
            if tied is None:
                feats, protos = state["expert_feats"], train_prototypes
            else:
                from .prompt_learning import encode_prompt_embeddings

                feats = torch.stack([encode_prompt_embeddings(model, *t()) for t in tied])
                if mix.correction is not None:
                    feats = feats + mix.correction
                feats, protos = F.normalize(feats, dim=-1), reg_prototypes
            terms["text"] = text_weight * text_to_text_loss(feats, protos, text_scale)
        return terms

    return extra


class MoCoOpRun:
    """What :func:`train_mocoop` returns: the trained ``prompts`` (a :class:`PromptMixture`), the ``fit`` record, and
    :meth:`learned` / :meth:`save` / :meth:`classifier`."""

    def __init__(self, model, prompts: PromptMixture, fit: FitResult, config: dict):
        self.model, self.prompts, self.fit, self.config = model, prompts, fit, config

    def learned(self) -> LearnedPrompts:
        return LearnedPrompts.from_mixture(self.prompts, "mocoop", self.model, info=self.config)

    def save(self, path: str | Path) -> Path:
        return self.learned().save(path)

    def classifier(self):
        return ZeroShotClassifier.from_learned_prompts(self.model, self.prompts)


def train_mocoop(model, classnames: Sequence[str], features: torch.Tensor, labels: Sequence[int],
                 template_groups=SYNTHETIC_TEMPLATE_GROUPS, *, all_classnames: Sequence[str] | None = None,
                 text_weight: float = 5.0, gate_weight: float = 1.0, text_scale: float = 1.0, top_k: int = 2,
                 correction: bool = True, steps: int = 200, lr: float = 0.002, batch_size: int = 32,
                 optimizer: str = "sgd", momentum: float = 0.9, weight_decay: float = 5e-4, warmup_steps: int = 0,
                 warmup_lr: float = 1e-5, seed: int = 0, log_every: int = 0) -> MoCoOpRun:
    """Build MoCoOp prompts (:func:`mocoop_prompts`) and fit them to cached image ``features`` with ``labels``.

    ``all_classnames``: every class name (base and new) for the text-to-text loss when ``classnames`` are the base
    classes; default ``classnames``."""
    groups = _groups(template_groups)
    prompts = mocoop_prompts(model, classnames, groups, top_k=top_k, correction=correction, seed=seed)
    train_protos = group_prototypes(model, classnames, groups).to(model.device)
    reg_names = None
    reg_protos = None
    if all_classnames is not None and list(all_classnames) != list(classnames):
        reg_names = list(all_classnames)
        reg_protos = group_prototypes(model, reg_names, groups).to(model.device)
    extra = mocoop_loss(model, prompts, train_protos, text_weight=text_weight, gate_weight=gate_weight,
                        text_scale=text_scale, reg_classnames=reg_names, reg_prototypes=reg_protos)
    fit = fit_prompts(model, prompts, features, labels, steps=steps, lr=lr, batch_size=batch_size,
                      optimizer=optimizer, momentum=momentum, weight_decay=weight_decay, warmup_steps=warmup_steps,
                      warmup_lr=warmup_lr, seed=seed, extra_loss=extra, log_every=log_every)
    config = {"template_groups": groups, "text_weight": text_weight, "gate_weight": gate_weight,
              "text_scale": text_scale, "top_k": top_k, "correction": correction, "steps": steps, "lr": lr,
              "batch_size": batch_size, "optimizer": optimizer, "seed": seed, "shots_total": len(labels),
              "all_classnames": reg_names}
    return MoCoOpRun(model, prompts, fit, config)


@torch.no_grad()
def router_agreement(mixture: PromptMixture, image_features: torch.Tensor, style: Sequence[int]) -> float:
    """The fraction of images whose top-1 routed expert is expert ``style[b]`` (expert ``i`` starts from group
    ``i``)."""
    logits, _ = mixture.gates(image_features)
    if logits is None:
        raise ValueError("this mixture has no router")
    return float((logits.argmax(-1).cpu() == torch.as_tensor(list(style))).float().mean())


@register_prompt_preset("mocoop", "MoCoOp: three size-group experts, top-2 router and text-to-text loss on a "
                                  "16-shot synthetic colour x shape task (shapes-tiny), written as a learned-prompts file")
def mocoop_preset(model, out: Path, **options) -> dict:
    """``cliplab train --preset mocoop``: :func:`train_mocoop` (lr 0.032, MoCoOp's) on :func:`synthetic_prompt_task`
    (task options as the coop preset's; training options as :func:`train_mocoop`'s keywords), then the file."""
    task, xtr, ytr, xte, yte = preset_task(model, options)
    options.setdefault("lr", 0.032)
    run = train_mocoop(model, task.classnames, xtr, ytr, **options)
    summary = preset_summary(model, run, task, xte, yte, out)
    summary["router_agreement"] = router_agreement(run.prompts, xte, task.test_style)
    return summary
