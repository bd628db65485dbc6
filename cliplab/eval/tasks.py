"""Evaluation tasks: encode a dataset through the embedding cache, score it, and compute the task's metrics.

Registered tasks (``register_task``), each taking one kind of dataset:

========== ================ =============================================================================
task       dataset kind     what
========== ================ =============================================================================
zeroshot   classification   zero-shot classifier from class names x templates; top-1/5, per-class recall
retrieval  captions         image<->text R@1/5/10 (several captions per image)
clipscore  captions         CLIPScore and RefCLIPScore (references: the image's other captions)
winoground winoground       text / image / group scores over caption-image pairs
========== ================ =============================================================================

:func:`evaluate` is the one-call entry point (what ``cliplab eval`` runs): model + dataset + task -> results dict,
optionally written as ``results.json`` + ``summary.md`` (+ ``confusion.png``).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from .cache import CachedEncoder, EmbeddingCache, default_cache_dir, model_identity
from .datasets import CaptionData, ClassificationData, WinogroundData, load_dataset
from .metrics import compute_metrics

__all__ = ["TASKS", "register_task", "list_tasks", "run_task", "evaluate", "load_model", "align_classnames",
           "looks_like_id"]


@dataclass
class TaskEntry:
    name: str
    data_kind: str
    fn: Callable[..., dict[str, Any]]
    help: str


TASKS: dict[str, TaskEntry] = {}


def register_task(name: str, data_kind: str, help: str = ""):
    """Decorator: ``fn(data, encoder, **options) -> results`` for datasets of ``data_kind``."""

    def deco(fn):
        TASKS[name] = TaskEntry(name, data_kind, fn, help or (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return deco


def list_tasks() -> list[str]:
    return sorted(TASKS)


def run_task(task: str, data, encoder: CachedEncoder, **options) -> dict[str, Any]:
    if task not in TASKS:
        raise KeyError(f"unknown evaluation task {task!r}; known: {list_tasks()}")
    entry = TASKS[task]
    if data.kind != entry.data_kind:
        raise ValueError(f"task {task!r} needs a {entry.data_kind} dataset; {data.name!r} is {data.kind}")
    return entry.fn(data, encoder, **options)


# --- models ----------------------------------------------------------------------------------------------------------
def load_model(spec: str | None = None, random_init: bool = False, seed: int = 0, device: str = "cpu",
               precision: str = "fp32", arch=None, details: bool = False):
    """``(model, identity)`` (``(model, identity, info)`` with ``details``) for a model named as ``cliplab embed
    --model`` names it (:func:`cliplab.pipeline.resolve_model`): ``None`` for the shipped default, a pretrained
    name, a checkpoint path, a Hugging Face hub id in the local cache, a ``PretrainedRef(arch, file)``, or an
    architecture name (seeded random weights, ``seed``, with a ``RandomWeightsWarning``). ``arch`` gives the
    architecture of a checkpoint that cannot be inferred; ``random_init`` builds ``spec`` as a randomly initialised
    architecture on purpose (no warning). ``info`` records how the model was found (``kind``, ``source``, ``seed``,
    ``precision``)."""
    from ..models import create_model, load

    if (random_init or arch is not None) and spec is not None and not isinstance(spec, (str, os.PathLike)):
        raise ValueError(f"--random-init and --arch need a plain --model name or path, not {spec!r}")
    if random_init:
        if spec is None:
            raise ValueError("--random-init needs an architecture name: --model ARCH (see: cliplab models)")
        model = create_model(spec, seed=seed).to(device=device).set_precision(precision).eval()
        info = {"kind": "random", "source": spec, "seed": seed}
        ident = model_identity(model)
    elif arch is not None:
        if spec is None:
            raise ValueError("--arch needs a checkpoint: --model PATH")
        model = load(spec, arch=arch, precision=precision, device=device)
        info = {"kind": "path", "source": str(Path(spec).resolve()) if Path(spec).exists() else spec}
        ident = model_identity(model, spec if Path(spec).exists() else None)
    else:
        from ..pipeline.modelref import resolve_model

        model, found = resolve_model(spec, device=device, seed=seed)
        if precision != "fp32":
            model.set_precision(precision)
        info = {k: found[k] for k in ("kind", "source", "arch", "seed") if k in found}
        ident = model_identity(model, found["source"] if found["kind"] == "path" else None)
    info = {**info, "random_init": bool(random_init), "precision": precision}
    return (model, ident, info) if details else (model, ident)


# --- zero-shot -------------------------------------------------------------------------------------------------------
def align_classnames(dataset_names: Sequence[str], prompt_names: Sequence) -> list | None:
    """Prompt-file class names (or synonym lists) in the dataset's label order, matched by
    :func:`~cliplab.zeroshot.normalize_name` of any synonym; ``None`` when not every dataset class is found."""
    from ..zeroshot import normalize_name

    index: dict[str, Any] = {}
    for entry in prompt_names:
        for n in ([entry] if isinstance(entry, str) else entry):
            index.setdefault(normalize_name(n), entry)
    out = [index.get(normalize_name(n)) for n in dataset_names]
    return None if any(o is None for o in out) else out


def looks_like_id(name) -> bool:
    """True for a class name with no usable word for a text encoder: digits and at most single letters, like the
    WordNet ids of ImageNet folders (``n01440764``) or numbered folders (``003``)."""
    text = name if isinstance(name, str) else str(list(name)[0] if list(name) else "")
    words = re.findall(r"[^\W\d_]{2,}", text)
    return any(ch.isdigit() for ch in text) and not words


def _ids_error(names: Sequence) -> ValueError:
    shown = ", ".join(str(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
    return ValueError(f"the class names look like ids ({shown}), not words a text encoder can use; give the names in "
                      "folder order with --set classnames=FILE (one name per line, or a JSON list; the dataset option "
                      "classnames) or --templates FILE.json with a \"classes\" list (like CLIP's ImageNet file)")


@register_task("zeroshot", "classification")
def zeroshot_task(data: ClassificationData, encoder: CachedEncoder, templates=None,
                  descriptions: Mapping[str, Sequence[str]] | str | None = None, description_mode: str = "pool",
                  description_template: str | None = None, prompts: str | Path | None = None) -> dict[str, Any]:
    """Zero-shot classification: class names x templates (or the dataset's own prompts, or learned prompts: a file
    from ``cliplab train --preset coop``, which must cover the dataset's classes) -> top-1/5, recall."""
    from ..zeroshot import DEFAULT_DESCRIPTION_TEMPLATE, ZeroShotClassifier, load_descriptions, load_prompt_set

    from ..zeroshot.classifier import describe_duplicates, duplicate_classnames

    notes = []
    classnames: list = list(data.classnames)
    if prompts is not None:
        from ..zeroshot import load_prompts

        learned = load_prompts(prompts)
        prompt_info = {"source": "learned prompts", "file": str(prompts), "method": learned.method,
                       "experts": len(learned.experts), "count": len(learned.classnames) * len(learned.experts)}
        t0 = time.perf_counter()
        clf = ZeroShotClassifier.from_learned_prompts(encoder.model, learned, classnames=data.classnames)
    elif templates is None and data.prompts is not None:
        prompt_info = {"source": "dataset prompts", "count": sum(len(p) for p in data.prompts)}
        t0 = time.perf_counter()
        clf = ZeroShotClassifier.from_prompts(encoder.model, data.prompts, data.classnames,
                                              text_encoder=encoder.text_encoder())
    else:
        pset = load_prompt_set(templates if templates is not None else "generic")
        # names taken from folder names that are ids (ImageNet's n01440764): the words must come from elsewhere
        ids = data.info.get("names_from") == "folders" and bool(classnames) and all(map(looks_like_id, classnames))
        if pset.classes is not None:
            aligned = align_classnames(data.classnames, pset.classes)
            if aligned is not None:
                classnames = aligned
            elif ids:  # ImageNet-style id folders: the source's names are meant in folder order
                if len(pset.classes) != len(classnames):
                    what = "class folders" if data.info.get("folders") else "classes"
                    raise ValueError(f"{pset.source}: {len(pset.classes)} class names for {len(classnames)} {what}; "
                                     "the names must be given one per class, in folder order")
                classnames = list(pset.classes)
                notes.append(f"class names of {pset.source} taken in folder order (the dataset's class names look "
                             f"like ids, e.g. {data.classnames[0]})")
            else:
                notes.append(f"class names of {pset.source} do not match the dataset's; using the dataset's")
        if ids and classnames == list(data.classnames):
            raise _ids_error(classnames)
        descs = load_descriptions(descriptions) if isinstance(descriptions, (str, Path)) else descriptions
        prompt_info = {"source": pset.source, "dataset": pset.dataset, "templates": len(pset.templates),
                       "descriptions": None if descs is None else sum(len(v) for v in descs.values()),
                       "description_mode": description_mode if descs else None}
        t0 = time.perf_counter()
        clf = ZeroShotClassifier.from_classnames(
            encoder.model, classnames, pset.templates, descs, description_mode=description_mode,
            description_template=description_template or DEFAULT_DESCRIPTION_TEMPLATE,
            text_encoder=encoder.text_encoder())
    t_text = time.perf_counter() - t0
    dups = duplicate_classnames(clf.classnames)
    if dups:
        notes.append(describe_duplicates(dups))
    t0 = time.perf_counter()
    feats = encoder.images(data.items)
    t_img = time.perf_counter() - t0
    logits = clf.predict(feats)
    labels = torch.tensor(data.labels, dtype=torch.long)
    metrics = compute_metrics("zeroshot", logits=logits, labels=labels)
    return {
        "task": "zeroshot", "classnames": clf.classnames, "num_classes": clf.num_classes, "num_images": len(data),
        "prompts": prompt_info, "notes": notes, "duplicate_classnames": dups, "metrics": metrics,
        "timing": {"text_s": round(t_text, 3), "image_s": round(t_img, 3)},
    }


# --- retrieval and CLIPScore ----------------------------------------------------------------------------------------
def _encode_captions(data: CaptionData, encoder: CachedEncoder):
    t0 = time.perf_counter()
    img = encoder.images(data.items)
    t1 = time.perf_counter()
    txt = encoder.texts(data.captions)
    t2 = time.perf_counter()
    return img, txt, {"image_s": round(t1 - t0, 3), "text_s": round(t2 - t1, 3)}


@register_task("retrieval", "captions")
def retrieval_task(data: CaptionData, encoder: CachedEncoder) -> dict[str, Any]:
    """Image->text and text->image recall@1/5/10, several captions per image."""
    img, txt, timing = _encode_captions(data, encoder)
    metrics = compute_metrics("retrieval", similarity=img @ txt.t(),
                              caption_image=torch.tensor(data.caption_image, dtype=torch.long))
    return {"task": "retrieval", "num_images": len(data.items), "num_texts": len(data.captions),
            "metrics": metrics, "timing": timing}


@register_task("clipscore", "captions")
def clipscore_task(data: CaptionData, encoder: CachedEncoder, w: float = 2.5) -> dict[str, Any]:
    """CLIPScore of every (image, caption) pair and RefCLIPScore against the image's other captions."""
    img, txt, timing = _encode_captions(data, encoder)
    metrics = compute_metrics("clipscore", image_features=img, text_features=txt,
                              caption_image=torch.tensor(data.caption_image, dtype=torch.long), w=w)
    return {"task": "clipscore", "num_images": len(data.items), "num_texts": len(data.captions),
            "metrics": metrics, "timing": timing}


# --- Winoground ------------------------------------------------------------------------------------------------------
WINOGROUND_SCORINGS = ("clip", "comclip")


@register_task("winoground", "winoground")
def winoground_task(data: WinogroundData, encoder: CachedEncoder, scoring: str = "clip",
                    comclip: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Winoground text / image / group scores (strict inequalities: ties fail).

    ``scoring``: ``"clip"`` (cosine of the global embeddings) or ``"comclip"`` (:mod:`cliplab.zeroshot.comclip`:
    region sub-images of the parsed caption's entities and relations; ``comclip`` holds its options, e.g.
    ``{"weight": 1.0, "cutout": "mask"}``)."""
    if scoring not in WINOGROUND_SCORINGS:
        raise ValueError(f"scoring must be one of {WINOGROUND_SCORINGS}, got {scoring!r}")
    if comclip and scoring != "comclip":
        raise ValueError("comclip options need scoring='comclip'")
    img, txt, timing = _encode_captions(
        CaptionData(data.name, data.items, data.captions, list(range(len(data.items)))), encoder)
    p = len(data.kinds)
    i, t = img.view(p, 2, -1), txt.view(p, 2, -1)
    if scoring == "comclip":
        from ..zeroshot.comclip import winoground_comclip_scores

        t0 = time.perf_counter()
        scores = winoground_comclip_scores(data, encoder, image_features=img, text_features=txt,
                                           **dict(comclip or {}))
        timing["comclip_s"] = round(time.perf_counter() - t0, 3)
    else:
        scores = torch.einsum("pcd,pid->pci", t, i)  # scores[p, c, i] = cos(caption c, image i)
    metrics = compute_metrics("winoground", scores=scores, kinds=list(data.kinds))
    return {"task": "winoground", "scoring": scoring, "num_pairs": p, "metrics": metrics, "timing": timing}


# --- one call --------------------------------------------------------------------------------------------------------
def evaluate(task: str, model, dataset: str | Any, *, dataset_options: Mapping[str, Any] | None = None,
             model_id: str | None = None, cache_dir: str | Path | None = "default", out_dir: str | Path | None = None,
             batch_size: int = 64, text_batch_size: int = 256, progress: bool | None = False,
             model_info: Mapping | None = None, image_encoder=None,
             **task_options) -> dict[str, Any]:
    """Run ``task`` on ``dataset`` (a registered name + ``dataset_options``, or a data object) with ``model``.

    ``cache_dir``: ``"default"`` (:func:`default_cache_dir`), a path, or ``None`` for no disk cache. ``model_id``
    keys the cache (default: :func:`model_identity`). With ``out_dir``, writes ``results.json``, ``summary.md`` and,
    for zero-shot, ``confusion.png``. ``progress``: ``False`` silent, ``True`` bars, ``None`` bars on a terminal and
    plain lines every 10 s otherwise (:mod:`cliplab.progress`). ``image_encoder``: encodes images instead of
    ``model.encode_image`` (a :class:`cliplab.vision_tokens.ReducedImageEncoder`, say); recorded in the results.
    Returns the results dict."""
    from .report import write_report

    t0 = time.perf_counter()
    data = load_dataset(dataset, **dict(dataset_options or {})) if isinstance(dataset, str) else dataset
    if model_id is None:
        model_id = model_identity(model)
    cache = None
    if cache_dir is not None:
        cache = EmbeddingCache(default_cache_dir() if cache_dir == "default" else cache_dir, model_id)
    encoder = CachedEncoder(model, cache, batch_size=batch_size, text_batch_size=text_batch_size, progress=progress,
                            image_encoder=image_encoder)
    results = run_task(task, data, encoder, **task_options)
    results["dataset"] = {"name": data.name, **{k: v for k, v in data.info.items() if k != "dataset"}}
    results["model"] = {"name": model.config.name, "id": model_id, **dict(model_info or {}),
                        **(image_encoder.params if image_encoder is not None else {})}
    results["cache"] = {"dir": str(cache.root) if cache else None, **encoder.stats}
    results["timing"] = {**results.get("timing", {}), "total_s": round(time.perf_counter() - t0, 3)}
    if out_dir is not None:
        results["files"] = write_report(results, out_dir)
    return results
