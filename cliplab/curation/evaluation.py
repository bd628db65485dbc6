"""Small training and evaluation helpers for the curation methods' effect checks: train the ``tiny-smoke`` model on
a pairs table (one caption per row, or several versions drawn per visit), and score it by zero-shot classification
or text-to-image retrieval. Used by the tests and by ``experiments/curation_*.py``."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["train_on_table", "zero_shot_accuracy", "per_class_accuracy", "retrieval_r1"]


def train_on_table(path, out_dir, columns: Sequence[str] = ("caption",), steps: int = 100, seed: int = 0,
                   batch_size: int = 32, lr: float = 1e-3, versions: bool = True, **overrides):
    """A ``tiny-smoke`` run on the pairs table ``path``: with ``versions`` the ``caption-versions`` source and
    sampler over ``columns`` (one version drawn per visit), else the ``folder`` source (first of ``columns``).
    Returns the trained ``Trainer`` (its ``.model`` in eval mode, ``.result`` the fit's result)."""
    from ..train import DataConfig, Trainer, get_preset
    from . import multicaption  # noqa: F401  (registers the source and sampler)

    if versions:
        data = DataConfig(source="caption-versions", caption="short", options={"path": str(path),
                                                                              "columns": list(columns)})
        sampler = "caption-versions"
    else:
        data = DataConfig(source="folder", caption="short", options={"path": str(path),
                                                                    "caption_column": columns[0]})
        sampler = "random"
    cfg = get_preset("tiny-smoke").replace(data=data, sampler=sampler, steps=int(steps), seed=int(seed),
                                           batch_size=int(batch_size), lr=float(lr), progress=False,
                                           checkpoint_every=0, keep_checkpoints=0, log_every=max(1, int(steps)),
                                           out_dir=str(out_dir), **overrides)
    trainer = Trainer(cfg)
    trainer.result = trainer.fit()
    trainer.model.eval()
    return trainer


@torch.no_grad()
def _predict(model, images, prompts: Sequence[Sequence[str]]) -> np.ndarray:
    img = model.encode_images(images, normalize=True)
    protos = torch.stack([torch.nn.functional.normalize(model.encode_texts(list(p), normalize=True).mean(0), dim=-1)
                          for p in prompts])
    return (img @ protos.T).argmax(1).numpy()


def per_class_accuracy(model, images, labels: Sequence[int], prompts: Sequence[Sequence[str]]) -> np.ndarray:
    """Zero-shot accuracy of each class: images classified by the mean text embedding of each class's prompts."""
    pred = _predict(model, images, prompts)
    labels = np.asarray(labels)
    return np.array([float((pred[labels == c] == c).mean()) if (labels == c).any() else float("nan")
                     for c in range(len(prompts))])


def zero_shot_accuracy(model, images, labels: Sequence[int], prompts: Sequence[Sequence[str]]) -> float:
    return float((_predict(model, images, prompts) == np.asarray(labels)).mean())


@torch.no_grad()
def retrieval_r1(model, images, texts: Sequence[str]) -> float:
    """Text -> image recall@1: text ``i`` should retrieve image ``i`` among all the images."""
    img = model.encode_images(images, normalize=True)
    txt = model.encode_texts(list(texts), normalize=True)
    return float(((txt @ img.T).argmax(1) == torch.arange(len(texts))).float().mean())
