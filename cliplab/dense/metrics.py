"""Segmentation metrics from a confusion matrix: mean IoU over classes and pixel accuracy.

A class's IoU is ``TP / (TP + FP + FN)``; classes that appear in neither the predictions nor the labels of the whole
evaluation are left out of the mean (their IoU is undefined), as in mmsegmentation. Pixels labelled ``IGNORE`` (255)
count nowhere. Whether the background class enters the mean is the caller's choice (``include_background``).
"""

from __future__ import annotations

import numpy as np
import torch

from .data import IGNORE

__all__ = ["confusion_matrix", "segmentation_scores", "SegmentationMeter"]


def _flat(x) -> np.ndarray:
    return (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)).astype(np.int64).ravel()


def confusion_matrix(pred, target, num_classes: int) -> np.ndarray:
    """``[num_classes, num_classes]`` counts, rows the true class, columns the predicted one."""
    p, t = _flat(pred), _flat(target)
    if p.shape != t.shape:
        raise ValueError(f"prediction and label sizes differ: {np.shape(pred)} vs {np.shape(target)}")
    keep = t != IGNORE
    p, t = p[keep], t[keep]
    if len(t) and (t.max() >= num_classes or t.min() < 0 or p.max() >= num_classes or p.min() < 0):
        raise ValueError(f"class indices must lie in [0, {num_classes}); got labels {t.min()}..{t.max()}, "
                         f"predictions {p.min()}..{p.max()}")
    return np.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def segmentation_scores(conf: np.ndarray, include_background: bool = True,
                        classes: tuple[str, ...] | None = None) -> dict:
    """``{"miou", "pixel_acc", "iou": {class: IoU or None}}`` of a confusion matrix (see the module docstring)."""
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    scored = iou[0 if include_background else 1:]
    names = classes or tuple(str(k) for k in range(len(conf)))
    total = conf.sum()
    return {"miou": float(np.nanmean(scored)) if np.isfinite(scored).any() else float("nan"),
            "pixel_acc": float(tp.sum() / total) if total else float("nan"),
            "iou": {names[k]: (None if np.isnan(v) else float(v)) for k, v in enumerate(iou)}}


class SegmentationMeter:
    """Accumulates a confusion matrix over many images: ``update(pred, label)`` then ``result()``."""

    def __init__(self, classes: tuple[str, ...], include_background: bool = True):
        self.classes = tuple(classes)
        self.include_background = include_background
        self.conf = np.zeros((len(self.classes), len(self.classes)), dtype=np.int64)

    def update(self, pred, label) -> None:
        self.conf += confusion_matrix(pred, label, len(self.classes))

    def result(self) -> dict:
        return segmentation_scores(self.conf, self.include_background, self.classes)
