"""UniME's two stages for a CLIP model: textual discriminative distillation, then hard-negative enhanced tuning.

Paper: *Breaking the Modality Barrier: Universal Embedding Learning with Multimodal LLMs* (UniME), Tiancheng Gu,
Kaicheng Yang, Ziyong Feng, Xingjun Wang, Yanzhao Zhang, Dingkun Long, Yingda Chen, Weidong Cai, Jiankang Deng
(arXiv 2504.17432); official code deepglint/UniME (its ``loss.py`` was read, not copied).

* **Stage 1, textual discriminative knowledge distillation** (:func:`similarity_kd_loss`, :func:`distill_text`, loss
  ``unime-kd``). For a batch of (query, positive) texts, the student's and the teacher's in-batch similarity
  matrices ``S = norm(q) @ norm(p).T / temperature`` are turned into row softmaxes and the student minimises
  ``KL(P_teacher || P_student)`` (mean over rows). Only the text side trains (the paper trains the MLLM's language
  model and freezes the rest; :func:`distill_text` freezes everything but ``model.text``).
* **Stage 2, hard-negative enhanced instruction tuning** (:func:`hard_negative_indices`,
  :func:`hard_negative_loss`, loss ``unime``). With ``S = x @ y.T`` of normalised queries and keys (the positive of
  row i is column i): candidates ``j != i`` with ``S[i, j] > S[i, i] + margin`` are dropped as false negatives, the
  ``k`` most similar remaining candidates are the hard negatives, and the loss is
  ``CE([S_ii, S_i,n1 .. S_i,nk] / temperature, target 0)``; the rest of the batch is not in the softmax.

Where it acts: on the joint-space embeddings, i.e. the text tower's EOT token after the final LayerNorm and after the
projection (and the image tower's pooled, projected output in stage 2), L2-normalised; UniME's embedding is the
MLLM's last-token hidden state, which has no projection after it. The projected embedding is what cliplab retrieves
with, so it is the one distilled and tuned.

Choices that differ from the paper or its code, and why:

* *Teacher.* all-MiniLM-L6-v2 (mean pooling, through :class:`cliplab.text.TextEmbedder`) instead of NV-Embed-v2
  (7B, not available here); the student is a CLIP text tower instead of an MLLM's language model.
* *Stage-1 temperature.* The released code has no stage-1 loss and the value is not known here; 0.1 (both
  distributions) is the default because it was measured: on Flickr8k pairs, KD beat the teacher-free control by
  0.071 Spearman at 0.1 and by 0.030 at 0.02 (the stage-2 value of the code), where MiniLM's in-batch softmax is
  nearly one-hot and KD comes close to plain InfoNCE (``experiments/results/unime_kd_effect.json``). The pairs are two captions of one image (Flickr8k gives five
  per photo) where the paper uses text retrieval pairs (query, positive passage). In the trainer (loss
  ``unime-kd``), a batch has one caption per image, so the loss compares the batch's captions with each other and
  masks the diagonal (a caption with itself is not a pair).
* *Margin sign.* Following the official code, a candidate is a false negative when it scores *above* the positive
  plus ``margin`` (0.1): ``margin`` may be negative to filter candidates within ``|margin|`` below the positive (the
  issue's wording, "above the positive's similarity minus a margin").
* *Fewer than k candidates.* The official code takes ``topk`` over the masked matrix and then recomputes the scores
  of the selected keys, so a row with fewer than ``k`` surviving candidates silently brings filtered false
  negatives (and itself) back into the softmax. Here such slots are masked out (-inf logits): the filter holds
  whatever the batch size, and ``k`` larger than ``B - 1`` is allowed.
* *Direction.* The code's loss is query -> key only. ``unime`` uses image -> text by default; ``symmetric=True``
  averages it with text -> image (an option, not the paper's).
* *Temperature.* Fixed (0.02, the code's), not the model's learnable ``logit_scale``; ``temperature=None`` uses the
  model's scale instead.
"""

from __future__ import annotations

import math
import random
from typing import Sequence

import torch
import torch.nn.functional as F

from ..eval.sts import spearman
from ..methods import register_method
from ..train import BatchOutput, Loss, TrainConfig, get_preset, register_loss, register_preset

__all__ = ["similarity_kd_loss", "hard_negative_indices", "hard_negative_loss", "distill_text", "teacher_agreement",
           "UniMEKDLoss", "UniMELoss"]

register_method(
    "unime",
    "Breaking the Modality Barrier: Universal Embedding Learning with Multimodal LLMs (UniME)",
    "text-side distillation of a teacher's similarity distributions, then top-k hard negatives with a "
    "false-negative filter",
    doc="docs/methods/unime.md",
)(__name__)

TEACHER = "all-MiniLM-L6-v2"


# --- stage 1 ---------------------------------------------------------------------------------------------------------
def similarity_kd_loss(student_sim: torch.Tensor, teacher_sim: torch.Tensor, temperature: float = 0.02,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """``KL(softmax(teacher_sim / t) || softmax(student_sim / t))`` over rows, averaged over rows.

    Both are ``[B, N]`` cosine similarities; ``mask`` (bool, ``True`` = excluded) leaves entries out of both
    distributions (the diagonal of a batch compared with itself). Zero exactly when the two agree."""
    if student_sim.shape != teacher_sim.shape:
        raise ValueError(f"student and teacher similarities differ in shape: {tuple(student_sim.shape)} vs "
                         f"{tuple(teacher_sim.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    s, t = student_sim.float() / temperature, teacher_sim.float().detach() / temperature
    if mask is not None:
        s, t = s.masked_fill(mask, -math.inf), t.masked_fill(mask, -math.inf)
    log_p_s, log_p_t = F.log_softmax(s, dim=1), F.log_softmax(t, dim=1)
    # masked entries have p_t = 0: their terms are 0 (not 0 * inf), so sum only where the teacher has mass
    terms = torch.where(log_p_t.isfinite(), log_p_t.exp() * (log_p_t - log_p_s), torch.zeros_like(s))
    return terms.sum(dim=1).mean()


def distill_text(model, teacher, queries: Sequence[str], positives: Sequence[str], steps: int = 100,
                 batch_size: int = 32, lr: float = 1e-4, temperature: float = 0.1, seed: int = 0,
                 ) -> list[float]:
    """Stage 1 on a CLIP ``model`` in place: ``steps`` AdamW steps of :func:`similarity_kd_loss` between the
    student's and ``teacher``'s (a :class:`cliplab.text.TextEmbedder`) query x positive similarities, on batches
    drawn from the aligned lists ``queries`` / ``positives``. Only ``model.text`` trains. ``teacher=None`` is the
    control without a teacher: the same steps with one-hot targets (in-batch InfoNCE, query -> positive, at the same
    temperature). Returns the loss per step."""
    if len(queries) != len(positives) or len(queries) < 2:
        raise ValueError(f"queries and positives must be aligned lists of >= 2 texts, got {len(queries)} and "
                         f"{len(positives)}")
    rng = random.Random(seed)
    params = [p for p in model.text.parameters()]
    flags = [(p, p.requires_grad) for p in model.parameters()]  # restored after: the caller's freezing stands
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    was_training = model.training
    model.train()
    losses, seen = [], {}
    for _ in range(steps):
        rows = rng.sample(range(len(queries)), min(batch_size, len(queries)))
        q_texts, p_texts = [queries[i] for i in rows], [positives[i] for i in rows]
        s_q = model.encode_text(model.tokenize(q_texts), normalize=True)
        s_p = model.encode_text(model.tokenize(p_texts), normalize=True)
        if teacher is None:
            loss = F.cross_entropy(s_q @ s_p.t() / temperature, torch.arange(len(rows), device=s_q.device))
        else:
            t_q, t_p = _teacher_rows(teacher, q_texts, seen), _teacher_rows(teacher, p_texts, seen)
            loss = similarity_kd_loss(s_q @ s_p.t(), (t_q @ t_p.t()).to(s_q.device), temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.train(was_training)
    for p, flag in flags:
        p.requires_grad_(flag)
    return losses


@torch.no_grad()
def _teacher_rows(teacher, texts: list[str], seen: dict[str, torch.Tensor]) -> torch.Tensor:
    """The teacher's normalised embeddings of ``texts``, each text encoded once per run (the teacher is frozen and
    its rows do not depend on their batch, so the memo changes no number)."""
    new = list(dict.fromkeys(t for t in texts if t not in seen))
    if new:
        seen.update(zip(new, teacher.encode(new, normalize=True)))
    return torch.stack([seen[t] for t in texts])


@torch.no_grad()
def teacher_agreement(model, teacher, texts: Sequence[str]) -> float:
    """Spearman's rho between the student's and the teacher's cosine similarities over all pairs of ``texts``
    (upper triangle): how far the student ranks text pairs as the teacher does."""
    s = model.encode_texts(list(texts), normalize=True)
    t = teacher.encode(list(texts), normalize=True)
    iu = torch.triu_indices(len(texts), len(texts), offset=1)
    return spearman((s @ s.t())[iu[0], iu[1]], (t @ t.t())[iu[0], iu[1]])


# --- stage 2 ---------------------------------------------------------------------------------------------------------
def hard_negative_indices(sim: torch.Tensor, k: int = 8, margin: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices [B, k'], valid [B, k'])`` with ``k' = min(k, N - 1)``: per row i of ``sim`` (``[B, N]``, the
    positive at column i), the columns of the ``k'`` most similar candidates after dropping column i and every
    ``j`` with ``sim[i, j] > sim[i, i] + margin``. ``valid`` is ``False`` for slots left when fewer survive."""
    b, n = sim.shape
    if n < b:
        raise ValueError(f"sim must have the positive of row i at column i (N >= B), got shape {tuple(sim.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, n - 1)
    with torch.no_grad():
        rows = torch.arange(b, device=sim.device)
        positive = sim[rows, rows].unsqueeze(1)
        dropped = sim > positive + margin
        dropped[rows, rows] = True
        masked = sim.detach().masked_fill(dropped, -math.inf)
        values, indices = masked.topk(k, dim=1)
    return indices, values.isfinite()


def hard_negative_loss(sim: torch.Tensor, k: int = 8, margin: float = 0.1, temperature: float = 0.02,
                       scale: torch.Tensor | float | None = None) -> torch.Tensor:
    """UniME's filtered top-k cross-entropy: mean over rows of ``CE([sim_ii, sim_i,n1 .. sim_i,nk] * scale,
    target 0)``, negatives from :func:`hard_negative_indices` (``k``, ``margin``); ``scale`` defaults to
    ``1 / temperature``."""
    if scale is None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        scale = 1.0 / temperature
    indices, valid = hard_negative_indices(sim, k, margin)
    rows = torch.arange(sim.shape[0], device=sim.device)
    negatives = sim.gather(1, indices).masked_fill(~valid, -math.inf)
    logits = torch.cat([sim[rows, rows].unsqueeze(1), negatives], dim=1) * scale
    return F.cross_entropy(logits, torch.zeros_like(rows))


# --- trainer losses --------------------------------------------------------------------------------------------------
@register_loss("unime-kd")
class UniMEKDLoss(Loss):
    """Stage 1 in the trainer: :func:`similarity_kd_loss` between the batch's captions as the student's text tower
    and ``teacher`` (a name for :func:`cliplab.text.load_embedder`, or an embedder) see them, the diagonal masked.
    Freeze the image tower in the config (``freeze=["visual.*", "logit_scale"]``): the paper trains only the text side."""

    def __init__(self, teacher: str = TEACHER, temperature: float = 0.1):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.teacher_name = teacher if isinstance(teacher, str) else getattr(teacher, "name", type(teacher).__name__)
        self._teacher = None if isinstance(teacher, str) else teacher

    @property
    def teacher(self):
        if self._teacher is None:
            from ..text import load_embedder  # the teacher loads on first use, not when the config is read

            self._teacher = load_embedder(self.teacher_name)
        return self._teacher

    def forward(self, out: BatchOutput) -> tuple[torch.Tensor, dict[str, float]]:
        texts = list(out.batch.texts)
        t = self.teacher.encode(texts, normalize=True).to(out.text_features.device)
        s = out.text_features
        eye = torch.eye(len(texts), dtype=torch.bool, device=s.device)
        loss = similarity_kd_loss(s @ s.t(), t @ t.t(), self.temperature, mask=eye)
        return loss, {"kd": loss.item()}

    def extra_repr(self) -> str:
        return f"teacher={self.teacher_name}, temperature={self.temperature}"


@register_loss("unime")
class UniMELoss(Loss):
    """Stage 2 in the trainer: :func:`hard_negative_loss` on the image -> text similarities (``symmetric``: the mean
    with text -> image). ``k`` hard negatives per row after the false-negative filter (``margin``; ``math.inf``
    turns the filter off); fixed ``temperature``, or the model's logit scale when it is ``None``."""

    def __init__(self, k: int = 8, margin: float = 0.1, temperature: float | None = 0.02, symmetric: bool = False):
        super().__init__()
        if k < 1 or (temperature is not None and temperature <= 0):
            raise ValueError(f"k must be >= 1 and temperature > 0 (or None), got k={k}, temperature={temperature}")
        self.k, self.margin, self.temperature, self.symmetric = int(k), float(margin), temperature, bool(symmetric)

    def forward(self, out: BatchOutput) -> tuple[torch.Tensor, dict[str, float]]:
        sim = out.similarity()
        scale = out.scale if self.temperature is None else 1.0 / self.temperature
        loss = hard_negative_loss(sim, self.k, self.margin, scale=scale)
        logs = {"hn_i2t": loss.item()}
        if self.symmetric:
            t2i = hard_negative_loss(sim.t(), self.k, self.margin, scale=scale)
            logs["hn_t2i"] = t2i.item()
            loss = (loss + t2i) / 2
        with torch.no_grad():
            _, valid = hard_negative_indices(sim, self.k, self.margin)
            logs["filtered"] = 1.0 - valid.float().mean().item()  # share of negative slots the filter emptied
        return loss, logs

    def extra_repr(self) -> str:
        return f"k={self.k}, margin={self.margin}, temperature={self.temperature}, symmetric={self.symmetric}"


@register_preset("unime-tiny")
def unime_tiny() -> TrainConfig:
    """``tiny-smoke`` with UniME's stage-2 loss (k = 8 filtered hard negatives, margin 0.1, temperature 0.02)."""
    return get_preset("tiny-smoke").replace(loss="unime", loss_kwargs={"k": 8, "margin": 0.1, "temperature": 0.02},
                                            out_dir="runs/unime-tiny")
