"""Evaluation metrics: pure functions of features or scores, plus a registry per evaluation task.

Ties, everywhere a ranking is needed, are broken by index: candidates are ordered by descending score and then by
ascending index (a stable sort), so the rank of candidate ``j`` among scores ``s`` is
``#{k: s[k] > s[j]} + #{k < j: s[k] == s[j]}``. This is what ``argmax`` does for top-1 (first maximum wins), so
top-1 accuracy and the confusion matrix agree. Winoground scores use *strict* inequalities instead: a tie is a
failure (a model that scores everything equal gets 0, not 25% or 50%).

Registered metrics (``register_metric(name, task)``) are called with the task's inputs as keyword arguments and return
a dict of named values; :func:`compute_metrics` merges them:

* ``zeroshot``: ``logits [N, C]``, ``labels [N]``;
* ``retrieval``: ``similarity [I, T]`` (images x texts), ``caption_image [T]``;
* ``clipscore``: ``image_features [I, D]``, ``text_features [T, D]``, ``caption_image [T]`` (normalised features);
* ``winoground``: ``scores [P, 2, 2]`` (``scores[p, c, i]`` = similarity of caption c and image i), ``kinds [P]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "METRICS", "register_metric", "list_metrics", "compute_metrics",
    "target_ranks", "topk_accuracy", "confusion_matrix", "per_class_recall",
    "retrieval_ranks", "retrieval_recall", "clip_score", "ref_clip_score", "harmonic_mean", "winoground_scores",
    "chance_topk", "chance_i2t_recall", "sparse_confusion", "dense_confusion", "most_confused",
    "DENSE_CONFUSION_MAX_CLASSES",
]


@dataclass
class MetricEntry:
    name: str
    task: str
    fn: Callable[..., dict[str, Any]]


METRICS: dict[str, MetricEntry] = {}


def register_metric(name: str, task: str, *, overwrite: bool = False):
    """Decorator: ``fn(**inputs) -> {metric: value}`` computed for every evaluation of ``task``."""

    def deco(fn):
        key = f"{task}/{name}"
        if key in METRICS and not overwrite:
            raise ValueError(f"metric {key!r} is already registered")
        METRICS[key] = MetricEntry(name, task, fn)
        return fn

    return deco


def list_metrics(task: str | None = None) -> list[str]:
    return sorted(k for k, e in METRICS.items() if task is None or e.task == task)


def compute_metrics(task: str, **inputs) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in list_metrics(task):
        out.update(METRICS[key].fn(**inputs))
    return out


# --- ranking ---------------------------------------------------------------------------------------------------------
def target_ranks(scores: torch.Tensor, targets: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """0-based rank of ``scores[r, targets[r]]`` in row ``r`` (ties broken by lower index; module docstring)."""
    scores = torch.as_tensor(scores)
    targets = torch.as_tensor(targets, dtype=torch.long)
    n, m = scores.shape
    if targets.shape != (n,):
        raise ValueError(f"targets {tuple(targets.shape)} do not match {n} score rows")
    cols = torch.arange(m)
    out = torch.empty(n, dtype=torch.long)
    for s in range(0, n, chunk):
        sc, tg = scores[s: s + chunk], targets[s: s + chunk]
        t = sc.gather(1, tg[:, None])
        out[s: s + chunk] = (sc > t).sum(1) + ((sc == t) & (cols[None, :] < tg[:, None])).sum(1)
    return out


# --- classification --------------------------------------------------------------------------------------------------
def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    ranks = target_ranks(logits, labels)
    return {k: float((ranks < k).double().mean()) if len(ranks) else float("nan") for k in ks}


def predictions(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 class per row; the lowest index wins ties (like ``argmax`` in NumPy)."""
    logits = torch.as_tensor(logits)
    best = logits.max(dim=1, keepdim=True).values
    return (logits == best).int().argmax(dim=1)


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[C, C]`` counts; rows are true classes, columns predicted classes."""
    idx = torch.as_tensor(labels, dtype=torch.long) * num_classes + torch.as_tensor(preds, dtype=torch.long)
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_recall(confusion: torch.Tensor) -> torch.Tensor:
    """Recall of each class (NaN for a class with no samples)."""
    support = confusion.sum(1).double()
    recall = confusion.diagonal().double() / support
    return torch.where(support > 0, recall, torch.full_like(recall, float("nan")))


#: up to this many classes, results keep the dense ``confusion_matrix``; above it, the sparse ``confusion``
DENSE_CONFUSION_MAX_CLASSES = 50


def sparse_confusion(confusion) -> dict[str, Any]:
    """``{"format": "sparse", "num_classes": C, "cells": [[true, pred, count], ...]}``: only the nonzero cells, in
    row-major order (a 1000-class matrix is a million cells, almost all zero)."""
    cm = torch.as_tensor(confusion)
    nz = cm.nonzero()
    counts = cm[nz[:, 0], nz[:, 1]] if len(nz) else torch.zeros(0, dtype=torch.long)
    return {"format": "sparse", "num_classes": int(cm.shape[0]),
            "cells": torch.cat([nz, counts[:, None].to(nz.dtype)], 1).tolist()}


def dense_confusion(source) -> torch.Tensor:
    """The ``[C, C]`` count matrix from any stored form: a zero-shot ``metrics`` dict (its dense
    ``confusion_matrix`` or its sparse ``confusion``), a sparse dict, or a dense nested list."""
    if isinstance(source, dict) and "format" not in source:
        source = source["confusion_matrix"] if source.get("confusion_matrix") is not None else source["confusion"]
    if isinstance(source, dict):
        if source.get("format") != "sparse":
            raise ValueError(f"unknown confusion format {source.get('format')!r}")
        c = int(source["num_classes"])
        cm = torch.zeros(c, c, dtype=torch.long)
        for t, p, n in source["cells"]:
            cm[t, p] += n
        return cm
    cm = torch.as_tensor(source, dtype=torch.long)
    return cm.reshape(0, 0) if cm.numel() == 0 else cm


def most_confused(source, k: int = 10) -> list[tuple[int, int, int]]:
    """The ``k`` largest off-diagonal cells ``(true, pred, count)``, largest first (ties: row-major order)."""
    if isinstance(source, dict) and "format" not in source and source.get("confusion_matrix") is None:
        source = source["confusion"]
    if isinstance(source, dict) and source.get("format") == "sparse":
        cells = [tuple(c) for c in source["cells"]]
    else:
        cm = dense_confusion(source)
        cells = [(t, p, int(cm[t, p])) for t, p in cm.nonzero().tolist()]
    off = [c for c in cells if c[0] != c[1] and c[2] > 0]
    return sorted(off, key=lambda c: (-c[2], c[0], c[1]))[:k]


def chance_topk(num_classes: int, k: int) -> float:
    return min(k, num_classes) / num_classes


@register_metric("accuracy", "zeroshot")
def _zeroshot_accuracy(logits, labels, **_) -> dict[str, Any]:
    c = logits.shape[1]
    acc = topk_accuracy(logits, labels, (1, 5))
    return {"top1": acc[1], "top5": acc[5], "chance_top1": chance_topk(c, 1), "chance_top5": chance_topk(c, 5)}


@register_metric("per_class", "zeroshot")
def _zeroshot_per_class(logits, labels, **_) -> dict[str, Any]:
    cm = confusion_matrix(predictions(logits), labels, logits.shape[1])
    recall = per_class_recall(cm)
    present = recall[~recall.isnan()]
    out = {"mean_per_class_recall": float(present.mean()) if len(present) else float("nan"),
           "per_class_recall": [None if math.isnan(r) else r for r in recall.tolist()]}
    if cm.shape[0] <= DENSE_CONFUSION_MAX_CLASSES:
        out["confusion_matrix"] = cm.tolist()
    else:
        out["confusion"] = sparse_confusion(cm)
    return out


# --- retrieval -------------------------------------------------------------------------------------------------------
def retrieval_ranks(similarity: torch.Tensor, caption_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(i2t [I], t2i [T])`` 0-based ranks.

    ``i2t[i]``: position of image i's best-placed own caption in its ranking of all texts (a hit at k if ANY of its
    captions is in the top k). ``t2i[t]``: position of caption t's own image in its ranking of all images. An image
    without captions gets rank -1; recall leaves such images out of the image->text average."""
    sim = torch.as_tensor(similarity)
    owner = torch.as_tensor(caption_image, dtype=torch.long)
    n_img, n_txt = sim.shape
    if owner.shape != (n_txt,):
        raise ValueError(f"caption_image has {owner.numel()} entries for {n_txt} texts")
    t2i = target_ranks(sim.t(), owner)
    # rank of text t in the ranking of its own image's row; then the best over each image's captions
    per_caption = torch.empty(n_txt, dtype=torch.long)
    cols = torch.arange(n_txt)
    for s in range(0, n_txt, 1024):
        t = torch.arange(s, min(s + 1024, n_txt))
        rows = sim[owner[t]]
        v = rows.gather(1, t[:, None])
        per_caption[t] = (rows > v).sum(1) + ((rows == v) & (cols[None, :] < t[:, None])).sum(1)
    i2t = torch.full((n_img,), n_txt, dtype=torch.long).scatter_reduce(0, owner, per_caption, "amin")
    i2t[torch.bincount(owner, minlength=n_img) == 0] = -1
    return i2t, t2i


def retrieval_recall(similarity, caption_image, ks: Sequence[int] = (1, 5, 10)) -> dict[str, dict[str, float]]:
    i2t, t2i = retrieval_ranks(similarity, caption_image)
    i2t = i2t[i2t >= 0]  # images without captions cannot be retrieved for
    return {
        "image_to_text": {f"R@{k}": float((i2t < k).double().mean()) for k in ks},
        "text_to_image": {f"R@{k}": float((t2i < k).double().mean()) for k in ks},
    }


def chance_i2t_recall(n_texts: int, captions_per_image: Sequence[int], k: int) -> float:
    """Expected image->text R@k of a random ranking: mean over images of 1 - C(T-m, k) / C(T, k)."""
    if not captions_per_image:
        return float("nan")
    k = min(k, n_texts)
    return sum(1 - math.comb(n_texts - m, k) / math.comb(n_texts, k) for m in captions_per_image) / len(
        captions_per_image)


@register_metric("recall", "retrieval")
def _retrieval_recall(similarity, caption_image, **_) -> dict[str, Any]:
    n_img, n_txt = similarity.shape
    owner = torch.as_tensor(caption_image, dtype=torch.long)
    counts = torch.bincount(owner, minlength=n_img).tolist()
    ks = (1, 5, 10)
    out: dict[str, Any] = retrieval_recall(similarity, owner, ks)
    i2t, t2i = retrieval_ranks(similarity, owner)
    out["image_to_text"]["median_rank"] = float(i2t[i2t >= 0].double().quantile(0.5) + 1)
    out["text_to_image"]["median_rank"] = float(t2i.double().quantile(0.5) + 1)
    out["chance"] = {
        "image_to_text": {f"R@{k}": chance_i2t_recall(n_txt, [c for c in counts if c], k) for k in ks},
        "text_to_image": {f"R@{k}": min(k, n_img) / n_img for k in ks},
    }
    out["mean_recall"] = sum(out[d][f"R@{k}"] for d in ("image_to_text", "text_to_image") for k in ks) / (2 * len(ks))
    return out


# --- CLIPScore -------------------------------------------------------------------------------------------------------
def clip_score(image_features: torch.Tensor, text_features: torch.Tensor, w: float = 2.5) -> torch.Tensor:
    """Per-pair CLIPScore (Hessel et al. 2021): ``w * max(cos(image, caption), 0)`` on row-aligned features."""
    cos = (F.normalize(image_features.float(), dim=-1) * F.normalize(text_features.float(), dim=-1)).sum(-1)
    return w * cos.clamp_min(0)


def harmonic_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``2ab / (a + b)``, 0 where ``a + b == 0``."""
    a, b = torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)
    s = a + b
    return torch.where(s > 0, 2 * a * b / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))


def ref_clip_score(image_features: torch.Tensor, text_features: torch.Tensor,
                   references: Sequence[torch.Tensor], w: float = 2.5) -> torch.Tensor:
    """RefCLIPScore: harmonic mean of CLIPScore and ``max(max_r cos(caption, r), 0)`` over each caption's
    references (``references[n]``: ``[R_n, D]``). NaN where a caption has no reference."""
    cs = clip_score(image_features, text_features, w)
    t = F.normalize(text_features.float(), dim=-1)
    ref = torch.full_like(cs, float("nan"))
    for n, r in enumerate(references):
        if len(r):
            ref[n] = (F.normalize(torch.as_tensor(r).float(), dim=-1) @ t[n]).max().clamp_min(0)
    out = harmonic_mean(cs, torch.nan_to_num(ref))
    return torch.where(ref.isnan(), ref, out)


def _leave_one_out_refs(text_features: torch.Tensor, owner: torch.Tensor) -> list[torch.Tensor]:
    groups: dict[int, list[int]] = {}
    for t, i in enumerate(owner.tolist()):
        groups.setdefault(i, []).append(t)
    return [text_features[[u for u in groups[i] if u != t]] for t, i in enumerate(owner.tolist())]


@register_metric("clipscore", "clipscore")
def _clipscore(image_features, text_features, caption_image, w: float = 2.5, **_) -> dict[str, Any]:
    owner = torch.as_tensor(caption_image, dtype=torch.long)
    img = image_features[owner]
    cs = clip_score(img, text_features, w)
    refs = _leave_one_out_refs(text_features, owner)
    rcs = ref_clip_score(img, text_features, refs, w)
    valid = ~rcs.isnan()
    return {"clipscore": float(cs.double().mean()),
            "refclipscore": float(rcs[valid].double().mean()) if valid.any() else None,
            "refclipscore_captions": int(valid.sum()), "w": w,
            "clipscore_per_caption": cs.tolist()}


# --- Winoground ------------------------------------------------------------------------------------------------------
def winoground_scores(scores: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-pair booleans from ``scores[p, c, i]`` = s(caption c, image i), strict inequalities (ties fail):

    text: ``s(c0,i0) > s(c1,i0)`` and ``s(c1,i1) > s(c0,i1)``; image: ``s(c0,i0) > s(c0,i1)`` and
    ``s(c1,i1) > s(c1,i0)``; group: both."""
    s = torch.as_tensor(scores)
    text = (s[:, 0, 0] > s[:, 1, 0]) & (s[:, 1, 1] > s[:, 0, 1])
    image = (s[:, 0, 0] > s[:, 0, 1]) & (s[:, 1, 1] > s[:, 1, 0])
    return {"text": text, "image": image, "group": text & image}


@register_metric("winoground", "winoground")
def _winoground(scores, kinds=None, **_) -> dict[str, Any]:
    res = winoground_scores(scores)
    out: dict[str, Any] = {f"{k}_score": float(v.double().mean()) if len(v) else float("nan") for k, v in res.items()}
    out["chance"] = {"text_score": 0.25, "image_score": 0.25, "group_score": 1 / 6}
    if kinds is not None:
        by_kind = {}
        for kind in sorted(set(kinds)):
            m = torch.tensor([k == kind for k in kinds])
            by_kind[kind] = {f"{k}_score": float(v[m].double().mean()) for k, v in res.items()}
            by_kind[kind]["pairs"] = int(m.sum())
        out["by_kind"] = by_kind
    return out
