"""Long-CLIP: knowledge-preserved stretching of the text positional table, and primary component matching.

Paper: *Long-CLIP: Unlocking the Long-Text Capability of CLIP*, Beichen Zhang, Pan Zhang, Xiaoyi Dong, Yuhang Zang,
Jiaqi Wang (ECCV 2024, arXiv 2403.15378). Official code: ``beichenzbc/Long-CLIP`` (``model/longclip.py``
``load_from_clip``, ``model/model_longclip.py``, ``train/train.py``).

What is implemented:

* :func:`stretch_positions` (KPS, pure): the first ``keep`` rows of a positional table ``P`` ``[L, W]`` are kept, the
  rest are interpolated ``factor``-fold, and the last ``factor`` rows extrapolate past ``P[L-1]``; the new length is
  ``factor * L - (factor - 1) * keep`` (77 -> 248 for the defaults ``keep=20, factor=4``). The formula is the
  official ``load_from_clip`` one, including its order of floating-point operations (so rows equal it bit for bit)::

      new[i]                      = P[i]                                             i < keep
      new[keep + f*i + j]         = (f - j) * P[keep + i] / f + j * P[keep + i + 1] / f   i < L-1-keep, j < f
      new[f*L - (f-1)*keep - f + j] = P[L-1] + j * (P[L-1] - P[L-2]) / f                 j < f   (the tail)

  so ``new[keep + f*i] == P[keep + i]`` bit for bit (``i <= L-1-keep``: the tail's first row is ``P[L-1]``), and the
  midpoint ``j = f/2`` is ``(P[a] + P[b]) / 2`` exactly for even ``f``.
* :func:`to_long_clip` installs the stretched table with ``model.set_context_length``, so the context length, the
  model's tokenizer and the saved config follow (``model.save`` / ``cliplab.load`` keep 248). Works on any
  :class:`~cliplab.models.CLIP` (any checkpoint ``cliplab.load`` reads). Positions ``< keep`` are unchanged, so a
  text shorter than ``keep`` tokens gets bit-identical features.
* :func:`freeze_kept_positions`: the fine-tuning split, rows ``< keep`` frozen, rows ``>= keep`` trainable.
* :func:`pca_coarse` (PCM, pure): the coarse image feature of primary component matching, i.e. the rank-``r`` PCA
  reconstruction of the batch of L2-normalised features.
* Loss ``long_clip`` (:class:`LongCLIPLoss`) for ``cliplab.train``: ``CLIP(I_fine, T_long) + pcm_weight *
  CLIP(I_coarse, T_short)``, both symmetric InfoNCE with label smoothing 0.1; ``T_long`` is the row's caption as the
  trainer encoded it (the preset trains on long captions), ``T_short`` its first ``short_sentences`` sentences
  (:func:`short_text`, the paper's ``split(". ")[0]`` for 1), encoded by the loss. Its ``attach`` stretches a 77-token
  model before the optimizer is built (``stretch="kps"``, or ``"interpolate"``: :func:`interpolate_positions`, the
  naive control; ``"none"`` leaves the table), so the trainer's tokenizer follows and long captions are not cut,
  and freezes rows ``< keep`` (``freeze_kept``). Preset ``long_clip``: fine-tunes the shipped ``shapes-tiny``.

Choices (where the notes, the paper and this library differ):

* *Frozen rows.* The official code keeps two 248-row tables, a frozen one (``requires_grad=False``) read for
  positions < 20 and a trainable copy read for positions >= 20 (``mask1`` / ``mask2``). Here the model keeps one
  table (its checkpoint layout stays standard) and :func:`freeze_kept_positions` gives the same optimisation: a
  gradient hook zeroes the gradient of rows < keep, and, given the optimizer, a step post-hook copies the saved rows
  back after every step, because decoupled weight decay (AdamW, the paper uses wd 1e-2) or momentum would otherwise
  move rows whose gradient is zero. Call it after :func:`to_long_clip` (which replaces the parameter) and pass the
  optimizer that holds the new table.
* *PCA.* The current official code (``CLIP.PCA`` in ``model/model_longclip.py``) centres the batch and keeps the top
  right singular vectors of the centred batch (``torch.linalg.svd`` in float32; the first release took the top
  eigenvectors of ``Xc^T Xc`` with ``torch.linalg.eig``, the same subspace); here the same SVD, computed in float64
  for stability and cast back to the input dtype. Features are L2-normalised first (``normalize=True``), as the paper applies PCM to normalised
  image features; the mean is added back after the reconstruction.
* *Extrapolated tail.* As in the official code, the last ``factor`` rows continue the line through ``P[L-2], P[L-1]``;
  the paper's text describes only the interpolation.
* *Frozen rows in the trainer.* :class:`LongCLIPLoss` freezes rows ``< keep`` with the gradient hook only: the
  trainer puts positional tables in AdamW's no-decay group, and AdamW moves no entry whose gradient has always been
  exactly zero, so the rows stay bit-identical (tested).
* *Short captions.* The paper's short text is the long caption's first sentence. The synthetic world's first
  sentence says only how many objects there are and the lighting ("This image shows three objects in a normally lit
  scene"), so the ``long_clip`` preset uses the first three sentences (which add the background and the shapes),
  ``short_sentences=3``; the loss's default is the paper's 1.
* *Coarse features* are not re-normalised after the PCA reconstruction (as in the official forward).
* *Optimisation.* The paper's lr 1e-6 and 2 epochs of 1M pairs fit ViT-L/14; the preset uses the trainer's recipe
  at lr 1e-4 for a few hundred steps of the 10M-parameter ``shapes-tiny``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..methods import register_method
from ..train import BatchOutput, CLIPLoss, Loss, TrainConfig, register_loss, register_preset
from ..train import DataConfig

register_method(
    "long_clip",
    "Long-CLIP: Unlocking the Long-Text Capability of CLIP",
    "knowledge-preserved stretching of the text positions (77 -> 248), frozen first rows, PCA coarse features (PCM)",
    doc="docs/methods/long_clip.md",
)(__name__)

__all__ = ["KEEP", "FACTOR", "stretched_length", "stretch_positions", "to_long_clip", "freeze_kept_positions",
           "FrozenPositions", "pca_coarse", "interpolate_positions", "short_text", "LongCLIPLoss", "long_clip_preset"]

KEEP = 20  # positions kept as they are (the paper: CLIP's effective length is under 20 tokens)
FACTOR = 4  # interpolation factor for the positions after them


def stretched_length(length: int, keep: int = KEEP, factor: int = FACTOR) -> int:
    """Rows of the stretched table: ``factor * length - (factor - 1) * keep`` (77 -> 248)."""
    return factor * length - (factor - 1) * keep


def stretch_positions(table: torch.Tensor, keep: int = KEEP, factor: int = FACTOR) -> torch.Tensor:
    """Knowledge-preserved stretching of a positional table ``[L, W]`` (pure: returns a new tensor, same dtype).

    See the module docstring for the formula (the official code's, operation for operation)."""
    if table.dim() != 2:
        raise ValueError(f"expected a positional table [L, W], got shape {tuple(table.shape)}")
    length = table.shape[0]
    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be a positive int, got {factor!r}")
    if not 0 <= keep <= length - 1 or length < 2:
        raise ValueError(f"need 0 <= keep <= L-1 and L >= 2; got keep={keep}, L={length}")
    p = table.detach()
    a = p[keep:-1].unsqueeze(1)  # [L-1-keep, 1, W] left ends
    b = p[keep + 1:].unsqueeze(1)  # right ends
    j = torch.arange(1, factor, dtype=p.dtype, device=p.device).view(1, factor - 1, 1)
    # j = 0 is a copy of the left end (as in the official code), so it is exact for every factor, not only powers of 2
    middle = torch.cat([a, (factor - j) * a / factor + j * b / factor], dim=1).reshape(-1, p.shape[1])
    last, before = p[-1], p[-2]
    steps = torch.arange(factor, dtype=p.dtype, device=p.device).view(factor, 1)
    tail = last + steps * (last - before) / factor
    out = torch.cat([p[:keep], middle, tail], dim=0)
    assert out.shape[0] == stretched_length(length, keep, factor)
    return out


def to_long_clip(model, keep: int = KEEP, factor: int = FACTOR):
    """Stretch the model's text positional table in place (context 77 -> 248 by default); returns the model.

    ``model.set_context_length`` installs the table, so ``model.tokenize`` and the saved config follow. The new table
    is a fresh trainable parameter: build optimizers (and :func:`freeze_kept_positions`) after this call."""
    table = model.text.pos_embed.detach()
    model.set_context_length(stretch_positions(table, keep, factor))
    return model


class FrozenPositions:
    """Keeps rows ``< keep`` of a positional table fixed during training (see :func:`freeze_kept_positions`)."""

    def __init__(self, param: torch.nn.Parameter, keep: int, optimizer: torch.optim.Optimizer | None = None):
        if not 0 <= keep <= param.shape[0]:
            raise ValueError(f"keep={keep} outside a table of {param.shape[0]} rows")
        self.param = param
        self.keep = keep
        self.saved = param.detach()[:keep].clone()
        self._handles = [param.register_hook(self._zero_grad)]
        if optimizer is not None:
            if not any(p is param for g in optimizer.param_groups for p in g["params"]):
                raise ValueError("the optimizer does not hold this positional table (was it built before "
                                 "to_long_clip replaced the parameter?)")
            self._handles.append(optimizer.register_step_post_hook(self._restore))

    def _zero_grad(self, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[: self.keep] = 0
        return grad

    def _restore(self, optimizer, args, kwargs) -> None:
        with torch.no_grad():
            self.param[: self.keep].copy_(self.saved)

    def remove(self) -> None:
        """Unfreeze: drop the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []


def freeze_kept_positions(model, keep: int = KEEP, optimizer: torch.optim.Optimizer | None = None) -> FrozenPositions:
    """Freeze rows ``< keep`` of the text positional table; rows ``>= keep`` stay trainable (Long-CLIP's split).

    Their gradient is zeroed by a hook; with ``optimizer`` the rows are also copied back after every
    ``optimizer.step()`` (weight decay and momentum move rows even with a zero gradient). Returns a handle with
    ``remove()``."""
    return FrozenPositions(model.text.pos_embed, keep, optimizer)


def pca_coarse(features: torch.Tensor, rank: int = 32, normalize: bool = True) -> torch.Tensor:
    """Primary component matching's coarse features: rank-``rank`` PCA reconstruction of a batch ``[B, D]``.

    L2-normalise the rows (``normalize``), centre on the batch mean, keep the top ``rank`` right singular vectors of
    the centred batch, reconstruct and add the mean back. Pure and differentiable; output dtype = input dtype."""
    if features.dim() != 2:
        raise ValueError(f"expected features [B, D], got shape {tuple(features.shape)}")
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    x = F.normalize(features, dim=-1) if normalize else features
    xd = x.double()
    mean = xd.mean(0, keepdim=True)
    centred = xd - mean
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    basis = vh[: min(rank, vh.shape[0])]  # [r, D]
    out = (centred @ basis.T) @ basis + mean
    return out.to(x.dtype)


def interpolate_positions(table: torch.Tensor, length: int) -> torch.Tensor:
    """The naive control of KPS: every row linearly interpolated to ``length`` rows (``align_corners=True``: the
    first and the last row stay), nothing kept as it is."""
    if table.dim() != 2 or length < 2:
        raise ValueError(f"expected a table [L, W] and length >= 2, got {tuple(table.shape)}, {length}")
    out = F.interpolate(table.detach().t()[None], size=length, mode="linear", align_corners=True)[0].t()
    return out.contiguous()


def short_text(caption: str, sentences: int = 1) -> str:
    """The first ``sentences`` sentences of a caption (split at ``". "``; the paper's ``split(". ")[0]`` for 1)."""
    if sentences < 1:
        raise ValueError(f"sentences must be >= 1, got {sentences}")
    return ". ".join(caption.split(". ")[:sentences])


STRETCHES = ("kps", "interpolate", "none")


@register_loss("long_clip")
class LongCLIPLoss(Loss):
    """Long-CLIP's fine-tuning objective with primary component matching (see the module docstring)::

        loss = CLIP_ls(I, T_long) + pcm_weight * CLIP_ls(PCA_rank(I), T_short)

    ``attach`` prepares the model: ``stretch`` (``"kps"``: :func:`to_long_clip` with ``keep`` and ``factor``;
    ``"interpolate"``: :func:`interpolate_positions` to the same length; ``"none"``) when its context is the
    original one, then ``freeze_kept`` rows ``< keep``."""

    def __init__(self, pcm_weight: float = 1.0, rank: int = 32, label_smoothing: float = 0.1,
                 short_sentences: int = 1, stretch: str = "kps", keep: int = KEEP, factor: int = FACTOR,
                 freeze_kept: bool = True):
        super().__init__()
        if stretch not in STRETCHES:
            raise ValueError(f"stretch must be one of {STRETCHES}, got {stretch!r}")
        if pcm_weight < 0 or rank < 0 or short_sentences < 1:
            raise ValueError("need pcm_weight >= 0, rank >= 0 and short_sentences >= 1")
        self.pcm_weight, self.rank, self.short_sentences = float(pcm_weight), int(rank), int(short_sentences)
        self.stretch, self.keep, self.factor, self.freeze_kept = stretch, int(keep), int(factor), bool(freeze_kept)
        self.clip = CLIPLoss(label_smoothing)
        self.label_smoothing = float(label_smoothing)
        self._model: list = []  # a plain list: the model's parameters must not register in the loss
        self.frozen: FrozenPositions | None = None

    def attach(self, model) -> None:
        self._model = [model]
        length = model.config.text.context_length
        if self.stretch != "none" and length <= 77:  # a model stretched before (a resumed or saved run) stays
            target = stretched_length(length, self.keep, self.factor)
            if self.stretch == "kps":
                to_long_clip(model, self.keep, self.factor)
            else:
                model.set_context_length(interpolate_positions(model.text.pos_embed, target))
        if self.freeze_kept and self.stretch != "interpolate":
            self.frozen = freeze_kept_positions(model, self.keep)

    @property
    def model(self):
        if not self._model:
            raise RuntimeError("LongCLIPLoss.attach(model) must be called first (the trainer does)")
        return self._model[0]

    def forward(self, out: BatchOutput) -> tuple[torch.Tensor, dict[str, float]]:
        long_loss, logs = self.clip(out)
        values = {"loss_long": long_loss.item(), "acc_i2t": logs["acc_i2t"]}
        if not self.pcm_weight:
            return long_loss, values
        model = self.model
        texts = [short_text(t, self.short_sentences) for t in out.batch.texts]
        short = F.normalize(model.encode_text(model.tokenize(texts)).float(), dim=-1)
        coarse = pca_coarse(out.image_features, self.rank)
        short_loss, _ = self.clip(BatchOutput(coarse, short, out.logit_scale, out.batch))
        values["loss_short"] = short_loss.item()
        return long_loss + self.pcm_weight * short_loss, values

    def extra_repr(self) -> str:
        return (f"pcm_weight={self.pcm_weight}, rank={self.rank}, label_smoothing={self.label_smoothing}, "
                f"stretch={self.stretch!r}, keep={self.keep}, factor={self.factor}")


@register_preset("long_clip")
def long_clip_preset() -> TrainConfig:
    """Fine-tune the shipped ``shapes-tiny`` into a 248-token Long-CLIP on the synthetic long captions (which run
    past 77 tokens and name every colour at the end), with primary component matching against the first three
    sentences."""
    return TrainConfig(
        init_from="shapes-tiny",
        data=DataConfig(source="synthetic", caption="long"),
        loss="long_clip",
        loss_kwargs={"short_sentences": 3},
        batch_size=32,
        steps=300,
        lr=1e-4,
        min_lr=1e-5,
        warmup_steps=20,
        weight_decay=0.01,
        precision="fp32",
        threads=1,
        log_every=20,
        checkpoint_every=100,
        out_dir="runs/long_clip",
    )
