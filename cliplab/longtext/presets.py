"""``cliplab train`` presets for LLM2CLIP and ProCLIP: each runs the method's own training functions on the synthetic
world (or, for LLM2CLIP stage 1, a caption table), saves the result and returns a summary with a held-out score.

    cliplab train --preset llm2clip-stage1 -o runs/emb                  # SmolLM2's last 2 blocks, caption pairs
    cliplab train --preset llm2clip-stage2 --set embedder=runs/emb -o runs/llm2clip
    cliplab train --preset proclip-tiny -o runs/proclip                 # MiniLM: distil, then contrastive + SD
    cliplab train --preset proclip-stage1 --steps 100 -o runs/proclip-s1

Python: ``get_runner("llm2clip-stage2")({"steps": 50}, out="runs/x")``, or call :func:`run_llm2clip_stage1`,
:func:`run_llm2clip_stage2`, :func:`run_proclip` with keywords. Every option of a preset (``--set KEY=VALUE``) is
a keyword of its run function and reaches the method's function of the same name (:mod:`.llm2clip`:
``tune_last_layers``, ``LLMTextCLIP``, ``train_llm_clip``; :mod:`.proclip`: ``proclip_model``, ``distill_text``,
``contrastive_tune``); the data options (``scenes``, ``caption``, ``world_seed``, ``captions`` ...) choose what they
train on, and ``heldout`` / ``eval_scenes`` how many held-out images the summary is scored on (0: no score).

The runs are those of ``cliplab llm2clip stage1|stage2`` and ``cliplab proclip`` (same defaults, same output
folder layout, same ``llmtower.json`` summary), with two differences: stage 1 trains on the synthetic world's
caption pairs (each scene's short and long caption describe the same image) unless ``captions`` names a table, and
each run scores itself on held-out data (stage 1: CRA of the raw and the tuned embedder; stage 2 / ProCLIP:
text->image R@1 of the LLM tower and, as the control, of the CLIP model's own text tower).
"""

from __future__ import annotations

import copy
import csv
import json
import time
import warnings
from pathlib import Path
from typing import Sequence

import torch

from ..train.runners import register_runner

__all__ = ["RUN_FILE", "HELDOUT_OFFSET", "loss_summary", "write_run_summary", "load_embedder_spec", "load_clip_spec", "embedder_ref", "synthetic_scenes",
           "synthetic_caption_pairs", "read_caption_table", "heldout_text_to_image", "run_llm2clip_stage1",
           "run_llm2clip_stage2", "run_proclip", "LLM2CLIP_STAGE1", "LLM2CLIP_STAGE2", "PROCLIP"]

#: the summary file each run writes into its output folder (the name ``cliplab llm2clip`` / ``proclip`` use)
RUN_FILE = "llmtower.json"
#: held-out scenes are drawn from this index on: far from any training scene's
HELDOUT_OFFSET = 1_000_000


# --- loading and data ----------------------------------------------------------------------------------------------
def load_embedder_spec(spec: str):
    """A ``cliplab.text`` embedder by name or saved directory; an unknown one is a one-line ``ValueError``."""
    from ..models.lm import MissingDependency
    from ..text import load_embedder

    try:
        return load_embedder(str(spec))
    except (KeyError, FileNotFoundError, ValueError, MissingDependency) as e:
        why = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise ValueError(f"cannot load embedder {spec!r}: {why}") from None


def load_clip_spec(spec: str | None):
    """The CLIP model whose image tower is kept (``None``: the shipped ``shapes-tiny``)."""
    from ..pipeline.modelref import resolve_model

    try:
        clip, _ = resolve_model(spec)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"cannot load model {spec!r}: {e}") from None
    if not hasattr(clip, "visual"):
        raise ValueError(f"model {spec!r} is not a plain CLIP checkpoint (its image tower gets the LLM text tower)")
    return clip


def embedder_ref(spec: str) -> str:
    """How a saved model names its embedder: a directory by its absolute path (it then loads from anywhere)."""
    return str(Path(spec).resolve()) if Path(spec).exists() else str(spec)


def synthetic_scenes(clip, n: int, caption: str = "long", world_seed: int = 0, offset: int = 0):
    """``(pixels, captions)`` of scenes ``offset .. offset + n - 1`` of the synthetic world, preprocessed for
    ``clip``; ``caption``: ``"long"`` (past 77 tokens) or ``"short"``."""
    from ..data import SceneWorld

    if caption not in ("long", "short"):
        raise ValueError(f"caption must be 'long' or 'short', got {caption!r}")
    world = SceneWorld(image_size=clip.config.vision.image_size, seed=world_seed)
    scenes = [world.sample(offset + i) for i in range(n)]
    texts = [s.long_caption if caption == "long" else s.short_caption for s in scenes]
    return clip.preprocessor.batch([s.render() for s in scenes]), texts


def synthetic_caption_pairs(n: int, world_seed: int = 0, offset: int = 0) -> tuple[list[str], list[int]]:
    """Stage-1 pairs from the synthetic world: each scene's short and long caption, two captions of one image."""
    from ..data import SceneWorld

    world = SceneWorld(seed=world_seed)
    texts, ids = [], []
    for i in range(offset, offset + n):
        s = world.sample(i)
        texts += [s.short_caption, s.long_caption]
        ids += [i, i]
    return texts, ids


def read_caption_table(path, image_column: str = "image", caption_column: str = "caption",
                       max_captions: int | None = None) -> tuple[list[str], list[str]]:
    """``(captions, image ids)`` of a CSV table with several captions per image (Flickr8k's ``captions.csv``)."""
    texts, ids = [], []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in (image_column, caption_column) if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: no column {missing[0]!r} (columns: {reader.fieldnames}); name them with "
                             "--set image_column=... / caption_column=...")
        for row in reader:
            if row[caption_column] and row[caption_column].strip():
                texts.append(row[caption_column].strip())
                ids.append(row[image_column])
    if max_captions is not None:
        texts, ids = texts[:max_captions], ids[:max_captions]
    return texts, ids


def split_heldout_images(texts: Sequence[str], ids: Sequence, heldout: int):
    """``(train_texts, train_ids, test_texts, test_ids)``: the captions of the last ``heldout`` distinct images
    (in order of appearance) are held out."""
    images = list(dict.fromkeys(ids))
    if heldout and len(images) - heldout < 2:
        raise ValueError(f"{len(images)} images cannot spare {heldout} held-out ones; lower heldout (0: none)")
    test = set(images[len(images) - heldout:]) if heldout else set()
    train = [(t, i) for t, i in zip(texts, ids) if i not in test]
    held = [(t, i) for t, i in zip(texts, ids) if i in test]
    return [t for t, _ in train], [i for _, i in train], [t for t, _ in held], [i for _, i in held]


@torch.no_grad()
def heldout_text_to_image(model, clip, n: int, caption: str = "long", world_seed: int = 0) -> dict:
    """Text->image R@1 on ``n`` held-out scenes (each caption retrieves its image among the ``n``): of ``model``
    (the LLM tower) and, the control, of ``clip`` itself (its own text tower, 77 tokens) with ``clip``'s image
    tower (the images as the LLM tower's model was before training, when ``clip`` is the untrained copy)."""
    from ..eval.metrics import retrieval_recall

    pixels, texts = synthetic_scenes(clip, n, caption, world_seed, offset=HELDOUT_OFFSET)
    owner = torch.arange(n)
    model.eval()
    img = model.encode_image(pixels, normalize=True).float()
    txt = model.encode_texts(texts, normalize=True, cache=False).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CLIP tower cuts long captions: that is the control
        c_img = clip.encode_image(pixels, normalize=True).float()
        c_txt = clip.encode_text(clip.tokenize(texts), normalize=True).float()
    return {"scenes": n, "caption": caption, "chance": 1.0 / n,
            "llm_tower_R@1": retrieval_recall(img @ txt.T, owner, ks=(1,))["text_to_image"]["R@1"],
            "clip_tower_R@1": retrieval_recall(c_img @ c_txt.T, owner, ks=(1,))["text_to_image"]["R@1"]}


def loss_summary(result) -> dict:
    """``steps``, first and last loss, seconds of a training result (what every LLM-tower run records)."""
    losses = list(result.losses)
    return {"steps": result.steps, "first_loss": round(losses[0], 5) if losses else None,
            "last_loss": round(losses[-1], 5) if losses else None, "seconds": round(result.seconds, 1)}


def write_run_summary(out: Path, summary: dict) -> dict:
    """``summary`` as ``out/llmtower.json`` (the run file of every LLM-tower command and preset); returns it."""
    (Path(out) / RUN_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


# --- LLM2CLIP ------------------------------------------------------------------------------------------------------
LLM2CLIP_STAGE1 = {
    "out": "runs/llm2clip-stage1", "embedder": "smollm2-135m", "captions": None, "image_column": "image",
    "caption_column": "caption", "max_captions": None, "scenes": 300, "world_seed": 0, "heldout": 100,
    "tune_layers": 2, "steps": 200, "batch_size": 32, "lr": 1e-4, "weight_decay": 0.0, "warmup": 10,
    "temperature": 0.05, "seed": 0, "progress": None,
}


def _render_stage1(d: dict) -> str:
    cra = d["cra"]
    score = "" if cra is None else f"; held-out CRA {cra['raw']:.3f} (raw) -> {cra['tuned']:.3f} (tuned)"
    return (f"llm2clip-stage1: tuned the last {d['tune_layers']} block(s) of {d['embedder']} on {d['n_captions']} "
            f"captions, {d['steps']} steps (loss {d['first_loss']} -> {d['last_loss']}){score}; saved to "
            f"{d['out']}\nnext: cliplab train --preset llm2clip-stage2 --set embedder={d['out']} -o MODEL_DIR")


@register_runner("llm2clip-stage1", "LLM2CLIP stage 1: caption-contrastive tuning of an LLM's last blocks (default "
                 "smollm2-135m) on synthetic short/long caption pairs or --data captions.csv; a tuned embedder",
                 defaults=LLM2CLIP_STAGE1, doc="docs/methods/llm2clip.md", render=_render_stage1,
                 flags={"out": "out", "steps": "steps", "data": "captions", "progress": "progress"})
def run_llm2clip_stage1(*, out, embedder, captions, image_column, caption_column, max_captions, scenes, world_seed,
                        heldout, tune_layers, steps, batch_size, lr, weight_decay, warmup, temperature, seed,
                        progress) -> dict:
    """Stage 1 (:func:`~cliplab.longtext.llm2clip.tune_last_layers`) on ``captions`` (a CSV table; its last
    ``heldout`` images held out) or, without it, on the short/long caption pairs of ``scenes`` synthetic scenes
    (``heldout`` more scenes for the score). Saves the tuned embedder to ``out``; the summary has the held-out
    CRA of the raw embedder (mean pooling: the tuned one's step-0 identity) and of the tuned one."""
    from . import llm2clip as l2c

    t0 = time.perf_counter()
    if captions is not None:
        texts, ids = read_caption_table(captions, image_column, caption_column, max_captions)
        texts, ids, test_texts, test_ids = split_heldout_images(texts, ids, heldout)
    else:
        texts, ids = synthetic_caption_pairs(scenes, world_seed)
        test_texts, test_ids = synthetic_caption_pairs(heldout, world_seed, offset=HELDOUT_OFFSET)
    emb = load_embedder_spec(embedder)
    tuned, result = l2c.tune_last_layers(emb, texts, ids, tune_layers=tune_layers, steps=steps,
                                         batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup=warmup,
                                         temperature=temperature, seed=seed, progress=progress)
    cra = None
    if test_texts:
        cra = {"captions": len(test_texts),
               "raw": l2c.caption_retrieval_accuracy(emb.encode(test_texts, pooling="mean"), test_ids),
               "tuned": l2c.caption_retrieval_accuracy(tuned.encode(test_texts, pooling="mean"), test_ids)}
    target = Path(out)
    tuned.save(target)
    return write_run_summary(target, {
        "preset": "llm2clip-stage1", "method": "llm2clip", "stage": 1, "embedder": embedder,
        "data": str(captions) if captions is not None else f"synthetic ({scenes} scenes, world seed {world_seed})",
        "n_captions": len(texts), "n_images": len(set(ids)), "tune_layers": tune_layers, "batch_size": batch_size,
        "lr": lr, "weight_decay": weight_decay, "warmup": warmup, "temperature": temperature, "seed": seed,
        **loss_summary(result), "cra": cra, "wall_seconds": round(time.perf_counter() - t0, 1), "out": str(target),
        "tuned": tuned.name})


LLM2CLIP_STAGE2 = {
    "out": "runs/llm2clip-stage2", "embedder": "all-MiniLM-L6-v2", "model": "shapes-tiny", "scenes": 300,
    "caption": "long", "world_seed": 0, "pooling": None, "adapter_blocks": 4, "steps": 200, "batch_size": 32,
    "lr": 1e-4, "weight_decay": 0.05, "warmup": 10, "tune_image": True, "seed": 0, "eval_scenes": 100,
    "progress": None,
}


def _render_tower(d: dict) -> str:
    if d["method"] == "proclip":
        s1, s2 = d["stage1"], d["stage2"]
        trained = f"stage 1 {s1['steps']} steps (loss {s1['first_loss']} -> {s1['last_loss']}), " + (
            "no stage 2" if s2 is None else f"stage 2 {s2['steps']} steps (loss {s2['first_loss']} -> "
                                            f"{s2['last_loss']})")
    else:
        trained = f"{d['steps']} steps (loss {d['first_loss']} -> {d['last_loss']})"
    ev = d["heldout"]
    score = "" if ev is None else (f"; held-out text->image R@1 {ev['llm_tower_R@1']:.3f} (CLIP's own text tower "
                                   f"{ev['clip_tower_R@1']:.3f}, chance {ev['chance']:.3f}, {ev['caption']} captions)")
    return (f"{d['preset']} on {d['scenes']} scenes: {trained}{score}; saved to {d['out']}\n{d['text_tower']}\n"
            f"use: cliplab info {d['out']} | cliplab eval zeroshot -m {d['out']}")


@register_runner("llm2clip-stage2", "LLM2CLIP stage 2: a frozen LLM embedder (default all-MiniLM-L6-v2, or a stage-1 "
                 "folder) + adapter as shapes-tiny's text tower, trained with the image tower on long synthetic "
                 "captions", defaults=LLM2CLIP_STAGE2, doc="docs/methods/llm2clip.md", render=_render_tower,
                 flags={"out": "out", "steps": "steps", "init_from": "model", "progress": "progress"})
def run_llm2clip_stage2(*, out, embedder, model, scenes, caption, world_seed, pooling, adapter_blocks, steps,
                        batch_size, lr, weight_decay, warmup, tune_image, seed, eval_scenes, progress) -> dict:
    """Stage 2 (:func:`~cliplab.longtext.llm2clip.train_llm_clip`): ``embedder`` (frozen) + an adapter of
    ``adapter_blocks`` blocks becomes ``model``'s text tower; adapter (and image tower, ``tune_image``) train on
    ``scenes`` synthetic scenes. Saves the model to ``out`` (``cliplab.load``-able with ``-m out``)."""
    from . import llm2clip as l2c

    t0 = time.perf_counter()
    clip = load_clip_spec(model)
    reference = copy.deepcopy(clip) if eval_scenes else None  # the control keeps the untrained image tower
    emb = load_embedder_spec(embedder)
    pixels, texts = synthetic_scenes(clip, scenes, caption, world_seed)
    net = l2c.LLMTextCLIP(clip, emb, pooling=pooling, adapter_blocks=adapter_blocks)
    result = l2c.train_llm_clip(net, pixels, texts, steps=steps, batch_size=batch_size, lr=lr,
                                weight_decay=weight_decay, warmup=warmup, tune_image=tune_image, seed=seed,
                                progress=progress)
    heldout = heldout_text_to_image(net, reference, eval_scenes, caption, world_seed) if eval_scenes else None
    target = Path(out)
    net.save(target, embedder_ref=embedder_ref(embedder))
    return write_run_summary(target, {
        "preset": "llm2clip-stage2", "method": "llm2clip", "stage": 2, "embedder": embedder, "model": model,
        "scenes": scenes, "caption": caption, "world_seed": world_seed, "pooling": net.pooling,
        "adapter_blocks": adapter_blocks, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
        "warmup": warmup, "tune_image": tune_image, "seed": seed, **loss_summary(result), "heldout": heldout,
        "wall_seconds": round(time.perf_counter() - t0, 1), "out": str(target), "text_tower": net.describe()})


# --- ProCLIP -------------------------------------------------------------------------------------------------------
PROCLIP = {
    "out": "runs/proclip-tiny", "embedder": "all-MiniLM-L6-v2", "model": "shapes-tiny", "scenes": 300,
    "caption": "long", "world_seed": 0, "pooling": None, "stage1_steps": 300, "stage1_lr": 1e-3,
    "stage1_batch_size": 64, "noise_drop": 0.15, "structure_weight": 1.0, "stage2_steps": 50, "stage2_lr": 1e-5,
    "stage2_batch_size": 32, "distill_weight": 1.0, "weight_decay": 0.05, "warmup": 5, "seed": 0,
    "eval_scenes": 100, "progress": None,
}


def run_proclip(*, out, embedder, model, scenes, caption, world_seed, pooling, stage1_steps, stage1_lr,
                stage1_batch_size, noise_drop, structure_weight, stage2_steps, stage2_lr, stage2_batch_size,
                distill_weight, weight_decay, warmup, seed, eval_scenes, progress, preset: str = "proclip") -> dict:
    """ProCLIP on ``scenes`` synthetic scenes: :func:`~cliplab.longtext.proclip.distill_text` (stage 1, the
    adapter only), then, when ``stage2_steps`` > 0, :func:`~cliplab.longtext.proclip.contrastive_tune` with
    ``distill_weight`` (0: the ablation without self-distillation). Saves the model to ``out``."""
    from . import proclip as pc

    t0 = time.perf_counter()
    clip = load_clip_spec(model)
    reference = copy.deepcopy(clip) if eval_scenes else None
    emb = load_embedder_spec(embedder)
    pixels, texts = synthetic_scenes(clip, scenes, caption, world_seed)
    net = pc.proclip_model(clip, emb, pooling=pooling)
    r1 = pc.distill_text(net, texts, steps=stage1_steps, batch_size=stage1_batch_size, lr=stage1_lr, warmup=warmup,
                         noise_drop=noise_drop, structure_weight=structure_weight, seed=seed, progress=progress)
    r2 = None
    if stage2_steps:
        r2 = pc.contrastive_tune(net, pixels, texts, distill_weight=distill_weight, steps=stage2_steps,
                                 batch_size=stage2_batch_size, lr=stage2_lr, weight_decay=weight_decay,
                                 warmup=warmup, seed=seed, progress=progress)
    heldout = heldout_text_to_image(net, reference, eval_scenes, caption, world_seed) if eval_scenes else None
    target = Path(out)
    net.save(target, embedder_ref=embedder_ref(embedder))
    s1, s2 = loss_summary(r1), None if r2 is None else loss_summary(r2)
    return write_run_summary(target, {
        "preset": preset, "method": "proclip", "embedder": embedder, "model": model, "scenes": scenes,
        "caption": caption, "world_seed": world_seed, "pooling": net.pooling,
        "stage1": {**s1, "lr": stage1_lr, "batch_size": stage1_batch_size, "noise_drop": noise_drop,
                   "structure_weight": structure_weight},
        "stage2": None if s2 is None else {**s2, "lr": stage2_lr, "batch_size": stage2_batch_size,
                                           "distill_weight": distill_weight, "weight_decay": weight_decay},
        "warmup": warmup, "seed": seed, "heldout": heldout,
        "wall_seconds": round(time.perf_counter() - t0, 1), "out": str(target), "text_tower": net.describe()})


def run_proclip_tiny(**options) -> dict:
    return run_proclip(**options, preset="proclip-tiny")


def run_proclip_stage1(**options) -> dict:
    return run_proclip(**options, preset="proclip-stage1")


register_runner("proclip-tiny", "ProCLIP: distil shapes-tiny's text embeddings into a frozen LLM embedder (default "
                "all-MiniLM-L6-v2) + adapter, then contrastive tuning with image self-distillation (distill_weight)",
                defaults=PROCLIP, doc="docs/methods/proclip.md", render=_render_tower,
                flags={"out": "out", "init_from": "model", "progress": "progress"})(run_proclip_tiny)
register_runner("proclip-stage1", "ProCLIP stage 1 only: the adapter distils shapes-tiny's text embeddings "
                "(instance + structure alignment); --steps sets stage1_steps",
                defaults={**PROCLIP, "out": "runs/proclip-stage1", "stage2_steps": 0}, doc="docs/methods/proclip.md",
                render=_render_tower,
                flags={"out": "out", "steps": "stage1_steps", "init_from": "model", "progress": "progress"},
                )(run_proclip_stage1)
