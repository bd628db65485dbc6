"""Contrastive losses as plug-ins.

A loss is an ``nn.Module`` registered by name::

    @register_loss("my-loss")
    class MyLoss(Loss):
        def forward(self, out: BatchOutput) -> tuple[torch.Tensor, dict[str, float]]:
            logits = out.logits()                  # scale * img @ txt.T, fp32
            ...
            return loss, {"my_value": float(...)}

It receives a :class:`BatchOutput` (L2-normalised fp32 image and text features, the model's ``logit_scale`` and
the raw :class:`~cliplab.train.data.Batch` for extras such as scene indices) and returns a scalar loss plus a dict of
floats that the trainer writes to the metrics log. A loss may own parameters (SigLIP's bias): the trainer optimises
them (no weight decay) and stores ``loss.state_dict()`` in every checkpoint; parameters whose shapes depend on the
model (a tag head on the image embedding) are created in :meth:`Loss.attach`, which the trainer calls first. The seed
papers' losses live in ``cliplab.objectives``; the registry imports that package when a name is missing.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .registry import Registry, import_training_plugins

__all__ = ["BatchOutput", "Loss", "CLIPLoss", "SigLIPLoss", "register_loss", "get_loss", "list_losses", "LOSSES"]


# Losses of the seed papers live in ``cliplab.objectives`` (a layer above this one) and register on import.
LOSSES: Registry[type] = Registry("loss", discover=import_training_plugins)


def register_loss(name: str, overwrite: bool = False):
    """Class decorator registering a :class:`Loss` subclass under ``name``."""
    return LOSSES.register(name, overwrite=overwrite)


def list_losses() -> list[str]:
    return LOSSES.names()


def get_loss(name: str, **kwargs: Any) -> "Loss":
    """An instance of the loss registered as ``name``; an unknown name raises ``KeyError`` listing the known ones."""
    return LOSSES.build(name, **kwargs)


@dataclass
class BatchOutput:
    """What a loss sees for one batch."""

    image_features: torch.Tensor  # [B, D] L2-normalised, fp32
    text_features: torch.Tensor  # [B, D] L2-normalised, fp32
    logit_scale: torch.Tensor  # scalar: log of 1/temperature (the model's parameter; gradients flow)
    batch: Any = None  # the raw cliplab.train.data.Batch (indices, texts, tokens, ...)
    # [N, D] L2-normalised fp32 features of the batch's hard-negative captions (extras["negative_texts"], row
    # extras["negative_rows"][k] for the k-th); None when the source gives none
    negative_text_features: torch.Tensor | None = None

    @property
    def scale(self) -> torch.Tensor:
        return self.logit_scale.to(self.image_features.dtype).exp()

    def similarity(self) -> torch.Tensor:
        """Cosine similarities ``[B_img, B_txt]``."""
        return self.image_features @ self.text_features.t()

    def logits(self) -> torch.Tensor:
        """``scale * img @ txt.T`` (rows: images, columns: texts)."""
        return self.scale * self.similarity()


class Loss(nn.Module, metaclass=ABCMeta):
    """Base class: ``forward(out: BatchOutput) -> (scalar loss, {name: float})``."""

    #: Whether ``forward`` reads ``out.negative_text_features``: the trainer encodes the batch's hard-negative
    #: captions only for such a loss, and refuses a source that gives none.
    uses_negatives: bool = False

    def attach(self, model: nn.Module) -> None:
        """Called once by the trainer with the model before the optimizer is built: a loss whose parameters depend
        on the model's sizes (a classification head on the image embedding) creates them here."""

    @abstractmethod
    def forward(self, out: BatchOutput) -> tuple[torch.Tensor, dict[str, float]]:
        """The scalar loss and the values to log."""


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(dim=1) == labels).float().mean().item()


@register_loss("clip")
class CLIPLoss(Loss):
    """Symmetric InfoNCE (CLIP): the mean of image->text and text->image cross-entropy over the batch, the matching
    pair on the diagonal. ``label_smoothing`` is passed to ``F.cross_entropy``."""

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)

    def forward(self, out: BatchOutput) -> tuple[torch.Tensor, dict[str, float]]:
        logits = out.logits()
        labels = torch.arange(logits.shape[0], device=logits.device)
        loss_i2t = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        loss_t2i = F.cross_entropy(logits.t(), labels, label_smoothing=self.label_smoothing)
        loss = (loss_i2t + loss_t2i) / 2
        with torch.no_grad():
            logs = {"loss_i2t": loss_i2t.item(), "loss_t2i": loss_t2i.item(),
                    "acc_i2t": _accuracy(logits, labels), "acc_t2i": _accuracy(logits.t(), labels)}
        return loss, logs

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}"


@register_loss("siglip")
class SigLIPLoss(Loss):
    """Pairwise sigmoid loss (SigLIP, Zhai et al. 2023)::

        z_ij = scale * <img_i, txt_j> + bias,   y_ij = +1 if i == j else -1
        loss = -1/B * sum_ij log sigmoid(y_ij * z_ij)

    ``scale`` is the model's ``exp(logit_scale)``. ``bias`` is the model's own ``logit_bias`` when it has one (a
    SigLIP architecture: the trained model carries its bias, and the trainer optimises it with the model's
    parameters); otherwise a learnable bias of this module (init ``init_bias``, -10), dropped in :meth:`attach` when
    the model has its own.
    """

    def __init__(self, init_bias: float = -10.0):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor(float(init_bias)))
        self._model_bias: list[nn.Parameter] = []  # a plain list: the model's parameter must not register here too

    def attach(self, model: nn.Module) -> None:
        model_bias = getattr(model, "logit_bias", None)
        if model_bias is not None:
            self._model_bias = [model_bias]
            self.bias = None  # unregisters the private bias: not optimised, not in the loss's state dict

    @property
    def logit_bias(self) -> torch.Tensor:
        """The bias in use: the model's ``logit_bias`` after :meth:`attach` to a model with one, else this module's."""
        return self._model_bias[0] if self._model_bias else self.bias

    def forward(self, out: BatchOutput) -> tuple[torch.Tensor, dict[str, float]]:
        bias = self.logit_bias
        logits = out.logits() + bias.to(out.image_features.dtype)
        n = logits.shape[0]
        signs = 2 * torch.eye(n, device=logits.device, dtype=logits.dtype) - 1
        loss = -F.logsigmoid(signs * logits).sum() / n
        with torch.no_grad():
            labels = torch.arange(n, device=logits.device)
            logs = {"bias": bias.item(), "acc_i2t": _accuracy(logits, labels),
                    "acc_t2i": _accuracy(logits.t(), labels)}
        return loss, logs


MAX_LOGIT_SCALE = math.log(100.0)  # OpenCLIP clamps the learnable temperature to at most 100 (1/0.01)
