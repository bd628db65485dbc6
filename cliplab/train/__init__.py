"""Contrastive training for CLIP models (imports ``cliplab.models`` and ``cliplab.data`` only).

::

    from cliplab.train import Trainer, get_preset
    cfg = get_preset("tiny-smoke").replace(out_dir="runs/smoke")
    result = Trainer(cfg).fit()            # fit(resume=True) continues from the newest checkpoint
    model = cliplab.load("runs/smoke/final")

Plug-ins: ``@register_loss`` (``clip``, ``siglip``), ``@register_sampler`` (``random``, ``sequential``),
``@register_source`` (``synthetic``, ``folder``), ``@register_preset`` (``tiny-smoke``, ``shapes-tiny``).
See ``docs/training.md``.
"""

from .config import DataConfig, TrainConfig
from .data import (Batch, CaptionFolder, DataSource, SyntheticStream, TrainBatches, get_source, list_sources,
                   make_loader, register_source)
from .losses import BatchOutput, CLIPLoss, Loss, SigLIPLoss, get_loss, list_losses, register_loss
from .presets import get_preset, list_presets, register_preset, synthetic_tags
from .registry import UnknownNameError
from .samplers import (BatchSampler, RandomSampler, SequentialSampler, get_sampler, list_samplers,
                       register_sampler)
from .trainer import Trainer, TrainResult, WarmupCosine, freeze_parameters, latest_checkpoint, param_groups

__all__ = [
    "DataConfig", "TrainConfig",
    "Batch", "CaptionFolder", "DataSource", "SyntheticStream", "TrainBatches", "get_source", "list_sources",
    "make_loader", "register_source",
    "BatchOutput", "CLIPLoss", "Loss", "SigLIPLoss", "get_loss", "list_losses", "register_loss",
    "get_preset", "synthetic_tags", "list_presets", "register_preset",
    "UnknownNameError",
    "BatchSampler", "RandomSampler", "SequentialSampler", "get_sampler", "list_samplers", "register_sampler",
    "Trainer", "TrainResult", "WarmupCosine", "freeze_parameters", "latest_checkpoint", "param_groups",
]
