"""ProCLIP: progressive alignment of CLIP's image encoder with an LLM-based embedder.

Paper: *ProCLIP: Progressive Vision-Language Alignment via LLM-based Embedder*, Xiaoxing Hu, Kaicheng Yang, Ziyang
Gong, Qi Ming, Zonghao Guo, Xiang An, Ziyong Feng, Junchi Yan, Xue Yang (arXiv 2510.18795). Official code:
``VisionXLab/ProCLIP`` (``training/train.py``: ``train_one_epoch_stage1`` / ``train_one_epoch_stage2``).

The text tower is a frozen LLM embedder plus an adapter (:class:`~cliplab.text.llm_tower.LLMTextCLIP`, built by
:func:`proclip_model`: the LLM embedding is L2-normalised, then one pre-LN residual MLP block of expansion 8, LayerNorm
and a Linear map to the CLIP dimension). Two stages:

* **Stage 1, representation inheritance** (:func:`distill_text`): only the adapter trains, to reproduce the CLIP text
  tower's normalised embeddings ``t`` with its own normalised outputs ``s``:
  ``MSE_sum(s, t) + MSE_sum(s_noise, t_noise) + SmoothL1_sum(pdist(s), pdist(t))`` -- the *instance semantic*
  alignment (:func:`instance_alignment_loss`) on the captions and on perturbed copies of them, and the *embedding
  structure* alignment (:func:`structure_alignment_loss`, pairwise Euclidean distances within the batch) on the
  captions. The teacher's embeddings are computed once.
* **Stage 2, contrastive tuning with self-distillation** (:func:`contrastive_tune`): the adapter and the image tower
  train with the CLIP InfoNCE plus ``w * [MSE_sum(I, I_0) + SmoothL1_sum(pdist(I), pdist(I_0))]``
  (:func:`self_distillation_loss`), where ``I_0`` are the normalised image features of the frozen original image
  tower: the term is exactly zero at the start and holds the image encoder near its pretrained space.

Where it acts: the adapter's output is the text feature in the joint space (after CLIP's projection's place); the
image side is the CLIP image tower's projected output, L2-normalised before every loss.

Choices that differ from the paper (and why):

* *Scale and data.* The paper distils into Llama-3-8B/LLM2Vec embeddings on tens of millions of captions and tunes
  EVA/OpenAI ViT-L; here MiniLM (or any :class:`~cliplab.text.TextEmbedder`) and the shipped ``shapes-tiny`` on the
  synthetic world, for a few hundred adapter steps and a few dozen image-tower steps (CPU).
* *Noisy texts.* The paper's stage-1 "noise" texts are perturbed captions from its data pipeline; here
  :func:`perturb_caption` drops words at random (seeded), or the caller passes its own ``noisy_texts``.
* *Adapter at identity.* The residual branch starts at zero (the official adapter starts random).
* *Logit scale* is fixed at the shipped model's value in stage 2 (the official code learns it, clamped at 100).
"""

from __future__ import annotations

import copy
import random
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F

from ..methods import register_method
from ..text.training import FitResult, fit
from ..text.llm_tower import LLMTextCLIP, TextAdapter

register_method(
    "proclip",
    "ProCLIP: Progressive Vision-Language Alignment via LLM-based Embedder",
    "distil CLIP's text embeddings into an LLM embedder + adapter (instance and structure losses), then contrastive "
    "tuning with image self-distillation",
    doc="docs/methods/proclip.md",
)(__name__)

__all__ = ["proclip_model", "instance_alignment_loss", "structure_alignment_loss", "self_distillation_loss",
           "perturb_caption", "clip_text_features", "distill_text", "contrastive_tune"]


def proclip_model(clip, embedder, pooling: str | None = None) -> LLMTextCLIP:
    """``clip``'s image tower with ``embedder`` (frozen) + ProCLIP's adapter (normalised input, 1 block of
    expansion 8) as its text tower."""
    adapter = TextAdapter(embedder.dim, clip.config.embed_dim, blocks=1, expansion=8, normalize_input=True)
    return LLMTextCLIP(clip, embedder, adapter, pooling=pooling)


# --- the losses (sums over the batch, as the official code's reduction='sum') ----------------------------------------
def instance_alignment_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``sum((s - t)^2)`` over the batch and dimensions (the inputs as given: pass normalised features)."""
    return F.mse_loss(student, teacher, reduction="sum")


def structure_alignment_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """SmoothL1 (beta 1), summed, between the batch's pairwise Euclidean distances ``pdist`` of student and teacher;
    zero iff the two distance matrices agree."""
    if len(student) < 2:
        return student.sum() * 0.0
    return F.smooth_l1_loss(F.pdist(student, p=2), F.pdist(teacher, p=2), reduction="sum")


def self_distillation_loss(image: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Stage 2's regulariser on normalised image features: instance + structure alignment to the frozen original."""
    return instance_alignment_loss(image, original) + structure_alignment_loss(image, original)


def perturb_caption(text: str, drop: float = 0.15, seed: int = 0) -> str:
    """A noisy copy of ``text``: each word dropped with probability ``drop`` (at least one word kept)."""
    words = text.split()
    rng = random.Random(f"{seed}:{text}")
    kept = [w for w in words if rng.random() >= drop]
    return " ".join(kept or words[:1])


@torch.no_grad()
def clip_text_features(clip, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """The teacher: the CLIP text tower's normalised embeddings (77 tokens, as CLIP reads them)."""
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # long texts are cut by the teacher: that is the teacher
        for k in range(0, len(texts), batch_size):
            out.append(clip.encode_text(clip.tokenize(list(texts[k:k + batch_size])), normalize=True).float())
    return torch.cat(out) if out else torch.empty(0, clip.config.embed_dim)


# --- stage 1 -------------------------------------------------------------------------------------------------------
def distill_text(model: LLMTextCLIP, texts: Sequence[str], *, noisy_texts: Sequence[str] | None = None,
                 teacher=None, steps: int = 300, batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 0.0,
                 warmup: int = 10, noise_drop: float = 0.15, structure_weight: float = 1.0, seed: int = 0,
                 progress: bool = False) -> FitResult:
    """Stage 1: train ``model.adapter`` so that the LLM tower reproduces ``teacher``'s (default ``model.clip``'s)
    text embeddings on ``texts`` and their noisy copies (``noisy_texts``, default :func:`perturb_caption` with
    ``noise_drop``). Teacher embeddings and LLM embeddings are computed once."""
    teacher = teacher if teacher is not None else model.clip
    texts = list(texts)
    noisy = list(noisy_texts) if noisy_texts is not None else [perturb_caption(t, noise_drop, seed) for t in texts]
    if len(noisy) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(noisy)} noisy texts")
    t_clean, t_noisy = clip_text_features(teacher, texts), clip_text_features(teacher, noisy)
    model.cache_texts(texts + noisy, progress=progress)
    e_clean, e_noisy = model.llm_embeddings(texts), model.llm_embeddings(noisy)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.adapter.parameters():
        p.requires_grad_(True)
    batch_size = min(batch_size, len(texts))
    gen = torch.Generator().manual_seed(seed)

    def step(i: int):
        idx = torch.randperm(len(texts), generator=gen)[:batch_size]
        s = F.normalize(model.adapter(e_clean[idx]), dim=-1)
        s_noise = F.normalize(model.adapter(e_noisy[idx]), dim=-1)
        inst = instance_alignment_loss(s, t_clean[idx]) + instance_alignment_loss(s_noise, t_noisy[idx])
        struct = structure_alignment_loss(s, t_clean[idx])
        return inst + structure_weight * struct, {"instance": inst.detach(), "structure": struct.detach()}

    model.adapter.train()
    result = fit(list(model.adapter.parameters()), step, steps=steps, lr=lr, warmup=warmup,
                 weight_decay=weight_decay, seed=seed, progress=progress, desc="proclip stage 1")
    model.eval()
    return result


# --- stage 2 -------------------------------------------------------------------------------------------------------
def contrastive_tune(model: LLMTextCLIP, pixels: torch.Tensor, texts: Sequence[str], *, distill_weight: float = 1.0,
                     steps: int = 50, batch_size: int = 32, lr: float = 1e-5, weight_decay: float = 0.05,
                     warmup: int = 5, seed: int = 0, progress: bool = False) -> FitResult:
    """Stage 2: CLIP InfoNCE on ``pixels`` / ``texts`` for the adapter and the image tower, plus ``distill_weight``
    times :func:`self_distillation_loss` against the image tower as it was at the call (its features computed once;
    ``distill_weight=0`` is the ablation without self-distillation)."""
    if len(pixels) != len(texts):
        raise ValueError(f"{len(pixels)} images but {len(texts)} captions")
    model.cache_texts(texts, progress=progress)
    feats = model.llm_embeddings(texts)
    with torch.no_grad():
        frozen = copy.deepcopy(model.clip.visual).eval()
        original = torch.cat([F.normalize(frozen(pixels[k:k + 64]).float(), dim=-1)
                              for k in range(0, len(pixels), 64)])
        del frozen
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(model.adapter.parameters()) + list(model.clip.visual.parameters())
    for p in params:
        p.requires_grad_(True)
    batch_size = min(batch_size, len(texts))
    gen = torch.Generator().manual_seed(seed)
    scale = model.clip.logit_scale.detach().exp()

    def step(i: int):
        idx = torch.randperm(len(texts), generator=gen)[:batch_size]
        img = F.normalize(model.clip.encode_image(pixels[idx]), dim=-1)
        txt = F.normalize(model.adapter(feats[idx].to(model.adapter.proj.weight)), dim=-1)
        logits = scale * img @ txt.T
        labels = torch.arange(len(idx))
        clip = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        sd = self_distillation_loss(img, original[idx])
        return clip + distill_weight * sd, {"clip": clip.detach(), "self_distill": sd.detach()}

    model.train()
    result = fit(params, step, steps=steps, lr=lr, warmup=warmup, weight_decay=weight_decay, seed=seed,
                 progress=progress, desc="proclip stage 2")
    model.eval()
    return result
