"""``cliplab llm2clip`` / ``cliplab proclip``: an LLM embedder as CLIP's text tower, trained from the command line
(thin over :mod:`cliplab.longtext.llm2clip` and :mod:`cliplab.longtext.proclip`).

    cliplab llm2clip stage1 --embedder smollm2-135m --captions flickr8k/captions.csv -o runs/emb
    cliplab llm2clip stage2 --embedder runs/emb -o runs/llm2clip
    cliplab proclip --embedder all-MiniLM-L6-v2 -o runs/proclip

Stage 2 and ProCLIP train on scenes of the synthetic world (``--scenes``, their long or short captions) with the
CLIP model's image tower (``-m``, default the shipped ``shapes-tiny``). The saved model directory is a normal model:
``cliplab info DIR``, ``cliplab embed ... -m DIR``, ``cliplab eval zeroshot -m DIR``. Each run writes
``llmtower.json`` (its settings and losses) into ``--out``.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from .app import main
from .common import emit, fail, json_option, on_interrupt, progress_option, warnings_to_stderr



# --- shared pieces -------------------------------------------------------------------------------------------------
def _check_out(out_dir: str, overwrite: bool) -> Path:
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise click.UsageError(f"--out {out} is not empty (choose another folder, or --overwrite)")
    return out


def _message(e: Exception) -> str:
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)  # a KeyError's str() adds quotes


def _embedder_ref(spec: str) -> str:
    """How the saved model names its embedder: a directory by its absolute path (it loads from anywhere)."""
    return str(Path(spec).resolve()) if Path(spec).exists() else spec


def _load_embedder(spec: str):
    from ..models.lm import MissingDependency
    from ..text import load_embedder

    try:
        return load_embedder(spec)
    except (KeyError, FileNotFoundError, ValueError, MissingDependency) as e:
        fail(f"cannot load --embedder {spec}: {_message(e)}")


def _load_clip(spec: str | None):
    from ..pipeline.modelref import resolve_model

    try:
        model, _ = resolve_model(spec)
    except (FileNotFoundError, ValueError) as e:
        fail(f"cannot load --model {spec}: {e}")
    if not hasattr(model, "visual"):
        fail(f"--model {spec} is not a plain CLIP checkpoint (its image tower is what gets an LLM text tower)")
    return model


def _scenes(clip, n: int, caption: str, world_seed: int):
    """``(pixels, captions)`` of ``n`` synthetic scenes, preprocessed for ``clip``."""
    from ..data import SceneWorld

    world = SceneWorld(image_size=clip.config.vision.image_size, seed=world_seed)
    scenes = [world.sample(i) for i in range(n)]
    texts = [s.long_caption if caption == "long" else s.short_caption for s in scenes]
    return clip.preprocessor.batch([s.render() for s in scenes]), texts


def scene_options(f):
    """The CLIP model and the synthetic-world training data of stage 2 / ProCLIP."""
    for opt in reversed([
        click.option("--model", "-m", "model", default=None,
                     help="The CLIP model whose image tower is kept [default: shapes-tiny, the shipped model]."),
        click.option("--scenes", type=click.IntRange(min=2), default=300, show_default=True,
                     help="Synthetic-world scenes to train on."),
        click.option("--caption", type=click.Choice(["long", "short"]), default="long", show_default=True,
                     help="Which caption of each scene: long ones run past CLIP's 77 tokens."),
        click.option("--world-seed", type=int, default=0, show_default=True, help="Seed of the synthetic world."),
        click.option("--pooling", default=None, help="Embedder pooling [default: the embedder's own]."),
    ]):
        f = opt(f)
    return f


def _summary_line(d: dict) -> str:
    return (f"saved to {d['out']}; {d['text_tower']}\nuse: cliplab info {d['out']} | cliplab eval zeroshot -m "
            f"{d['out']} | cliplab embed SOURCE -m {d['out']} -o emb/")


# --- llm2clip ------------------------------------------------------------------------------------------------------
@main.group("llm2clip")
def llm2clip_group():
    """LLM2CLIP: stage 1 makes an LLM a caption embedder; stage 2 makes it CLIP's text tower (an adapter trained
    with the image tower)."""


@llm2clip_group.command("stage1")
@click.option("--embedder", "-e", required=True,
              help="The LLM embedder to tune: a name (smollm2-135m, all-MiniLM-L6-v2) or a saved embedder directory.")
@click.option("--captions", "captions_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="A CSV table with several captions per image (Flickr8k's captions.csv layout).")
@click.option("--image-column", default="image", show_default=True, help="The column naming each caption's image.")
@click.option("--caption-column", default="caption", show_default=True)
@click.option("--max-captions", type=click.IntRange(min=2), default=None, help="Use the first N captions only.")
@click.option("--tune-layers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Last transformer blocks to tune (the rest stays frozen).")
@click.option("--steps", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=2), default=32, show_default=True, help="Images per step.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True)
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.0, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=0.05, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for the tuned embedder (must not exist or be empty, unless --overwrite).")
@click.option("--overwrite", is_flag=True, help="Write into a non-empty --out.")
@progress_option()
@json_option(help="Print the run's summary as JSON.")
def stage1_cmd(embedder, captions_path, image_column, caption_column, max_captions, tune_layers, steps, batch_size,
               lr, weight_decay, warmup, temperature, seed, out_dir, overwrite, progress, as_json):
    """Stage 1: caption-contrastive tuning of the embedder's last blocks on captions of the same image.

    \b
    Examples:
      cliplab llm2clip stage1 -e smollm2-135m --captions flickr8k-1k/captions.csv --steps 200 -o runs/emb
      cliplab llm2clip stage2 -e runs/emb -o runs/llm2clip
    """
    import csv

    from ..longtext import llm2clip as l2c
    from ..longtext.presets import loss_summary, write_run_summary

    out = _check_out(out_dir, overwrite)
    texts, ids = [], []
    with open(captions_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in (image_column, caption_column) if c not in (reader.fieldnames or [])]
        if missing:
            fail(f"{captions_path}: no column {missing[0]!r} (columns: {reader.fieldnames}); name them with "
                 "--image-column / --caption-column")
        for row in reader:
            if row[caption_column] and row[caption_column].strip():
                texts.append(row[caption_column].strip())
                ids.append(row[image_column])
    if max_captions is not None:
        texts, ids = texts[:max_captions], ids[:max_captions]
    emb = _load_embedder(embedder)
    t0 = time.perf_counter()
    with warnings_to_stderr(), on_interrupt(f"nothing was saved to {out}; run the command again"):
        try:
            tuned, result = l2c.tune_last_layers(emb, texts, ids, tune_layers=tune_layers, steps=steps,
                                                 batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                                                 warmup=warmup, temperature=temperature, seed=seed, progress=progress)
        except ValueError as e:
            fail(str(e))
    tuned.save(out)
    summary = {"method": "llm2clip", "stage": 1, "embedder": embedder, "captions": str(captions_path),
               "n_captions": len(texts), "n_images": len(set(ids)), "tune_layers": tune_layers,
               "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "warmup": warmup,
               "temperature": temperature, "seed": seed, **loss_summary(result),
               "wall_seconds": round(time.perf_counter() - t0, 1), "out": str(out), "tuned": tuned.name}
    write_run_summary(out, summary)
    emit(summary, as_json, lambda d: click.echo(
        f"llm2clip stage 1: tuned the last {d['tune_layers']} block(s) of {d['embedder']} on {d['n_captions']} "
        f"captions of {d['n_images']} images, {d['steps']} steps (loss {d['first_loss']} -> {d['last_loss']}); "
        f"saved to {d['out']}\nnext: cliplab llm2clip stage2 --embedder {d['out']} -o MODEL_DIR"))


@llm2clip_group.command("stage2")
@click.option("--embedder", "-e", required=True,
              help="The (stage-1 tuned) embedder, frozen: a saved embedder directory or a name.")
@scene_options
@click.option("--adapter-blocks", type=click.IntRange(min=0), default=4, show_default=True,
              help="Residual MLP blocks of the adapter (LLM2CLIP's TextProj has 4).")
@click.option("--steps", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=2), default=32, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True)
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.05, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True)
@click.option("--freeze-image", is_flag=True, help="Train the adapter only (the image tower stays as it is).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for the model (must not exist or be empty, unless --overwrite).")
@click.option("--overwrite", is_flag=True, help="Write into a non-empty --out.")
@progress_option()
@json_option(help="Print the run's summary as JSON.")
def stage2_cmd(embedder, model, scenes, caption, world_seed, pooling, adapter_blocks, steps, batch_size, lr,
               weight_decay, warmup, freeze_image, seed, out_dir, overwrite, progress, as_json):
    """Stage 2: the frozen embedder + an adapter becomes the CLIP model's text tower; the adapter and the image
    tower train with the CLIP loss on synthetic scenes.

    \b
    Examples:
      cliplab llm2clip stage2 -e runs/emb --scenes 300 --steps 300 -o runs/llm2clip
      cliplab info runs/llm2clip
    """
    from ..longtext import llm2clip as l2c
    from ..longtext.presets import loss_summary, write_run_summary
    from ..text.llm_tower import LLMTextCLIP

    out = _check_out(out_dir, overwrite)
    clip = _load_clip(model)
    emb = _load_embedder(embedder)
    t0 = time.perf_counter()
    with warnings_to_stderr(), on_interrupt(f"nothing was saved to {out}; run the command again"):
        pixels, texts = _scenes(clip, scenes, caption, world_seed)
        try:
            net = LLMTextCLIP(clip, emb, pooling=pooling, adapter_blocks=adapter_blocks)
            result = l2c.train_llm_clip(net, pixels, texts, steps=steps, batch_size=batch_size, lr=lr,
                                        weight_decay=weight_decay, warmup=warmup, tune_image=not freeze_image,
                                        seed=seed, progress=progress)
        except (ValueError, KeyError) as e:
            fail(_message(e))
    net.save(out, embedder_ref=_embedder_ref(embedder))
    summary = {"method": "llm2clip", "stage": 2, "embedder": embedder, "model": model or "shapes-tiny",
               "scenes": scenes, "caption": caption, "world_seed": world_seed, "pooling": net.pooling,
               "adapter_blocks": adapter_blocks, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
               "warmup": warmup, "tune_image": not freeze_image, "seed": seed, **loss_summary(result),
               "wall_seconds": round(time.perf_counter() - t0, 1), "out": str(out), "text_tower": net.describe()}
    write_run_summary(out, summary)
    emit(summary, as_json, lambda d: click.echo(
        f"llm2clip stage 2: {d['steps']} steps on {d['scenes']} scenes (loss {d['first_loss']} -> "
        f"{d['last_loss']}); " + _summary_line(d)))


# --- proclip -------------------------------------------------------------------------------------------------------
@main.command("proclip")
@click.option("--embedder", "-e", required=True,
              help="The LLM embedder, frozen: a name (all-MiniLM-L6-v2, smollm2-135m) or a saved embedder directory.")
@scene_options
@click.option("--stage1-steps", type=click.IntRange(min=1), default=300, show_default=True,
              help="Steps distilling the CLIP text tower into the adapter.")
@click.option("--stage1-lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option("--stage1-batch-size", type=click.IntRange(min=2), default=64, show_default=True)
@click.option("--noise-drop", type=click.FloatRange(0, 1, max_open=True), default=0.15, show_default=True,
              help="Word-drop rate of the noisy caption copies in stage 1.")
@click.option("--structure-weight", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Weight of the embedding-structure alignment loss in stage 1.")
@click.option("--stage2-steps", type=click.IntRange(min=0), default=50, show_default=True,
              help="Contrastive steps with self-distillation (0: stop after stage 1).")
@click.option("--stage2-lr", type=click.FloatRange(min=0, min_open=True), default=1e-5, show_default=True)
@click.option("--stage2-batch-size", type=click.IntRange(min=2), default=32, show_default=True)
@click.option("--distill-weight", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Weight of the image self-distillation term in stage 2 (0: the ablation without it).")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.05, show_default=True,
              help="Stage 2's weight decay (stage 1 uses none).")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True, help="Warm-up steps per stage.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for the model (must not exist or be empty, unless --overwrite).")
@click.option("--overwrite", is_flag=True, help="Write into a non-empty --out.")
@progress_option()
@json_option(help="Print the run's summary as JSON.")
def proclip_cmd(embedder, model, scenes, caption, world_seed, pooling, stage1_steps, stage1_lr, stage1_batch_size,
                noise_drop, structure_weight, stage2_steps, stage2_lr, stage2_batch_size, distill_weight,
                weight_decay, warmup, seed, out_dir, overwrite, progress, as_json):
    """ProCLIP: distil the CLIP text tower into the LLM embedder's adapter (stage 1), then tune adapter and image
    tower contrastively with image self-distillation (stage 2), on synthetic scenes.

    \b
    Examples:
      cliplab proclip -e all-MiniLM-L6-v2 --scenes 300 -o runs/proclip
      cliplab proclip -e all-MiniLM-L6-v2 --distill-weight 0 -o runs/proclip-no-sd   # the ablation
    """
    from ..longtext import proclip as pc
    from ..longtext.presets import loss_summary, write_run_summary

    out = _check_out(out_dir, overwrite)
    clip = _load_clip(model)
    emb = _load_embedder(embedder)
    t0 = time.perf_counter()
    with warnings_to_stderr(), on_interrupt(f"nothing was saved to {out}; run the command again"):
        pixels, texts = _scenes(clip, scenes, caption, world_seed)
        try:
            net = pc.proclip_model(clip, emb, pooling=pooling)
            r1 = pc.distill_text(net, texts, steps=stage1_steps, batch_size=stage1_batch_size, lr=stage1_lr,
                                 warmup=warmup, noise_drop=noise_drop, structure_weight=structure_weight, seed=seed,
                                 progress=progress)
            r2 = None
            if stage2_steps:
                r2 = pc.contrastive_tune(net, pixels, texts, distill_weight=distill_weight, steps=stage2_steps,
                                         batch_size=stage2_batch_size, lr=stage2_lr, weight_decay=weight_decay,
                                         warmup=warmup, seed=seed, progress=progress)
        except (ValueError, KeyError) as e:
            fail(_message(e))
    net.save(out, embedder_ref=_embedder_ref(embedder))
    summary = {"method": "proclip", "embedder": embedder, "model": model or "shapes-tiny", "scenes": scenes,
               "caption": caption, "world_seed": world_seed, "pooling": net.pooling,
               "stage1": {**loss_summary(r1), "lr": stage1_lr, "batch_size": stage1_batch_size, "noise_drop": noise_drop,
                          "structure_weight": structure_weight},
               "stage2": None if r2 is None else {**loss_summary(r2), "lr": stage2_lr, "batch_size": stage2_batch_size,
                                                  "distill_weight": distill_weight, "weight_decay": weight_decay},
               "warmup": warmup, "seed": seed, "wall_seconds": round(time.perf_counter() - t0, 1), "out": str(out),
               "text_tower": net.describe()}
    write_run_summary(out, summary)

    def render(d):
        s1, s2 = d["stage1"], d["stage2"]
        two = "no stage 2" if s2 is None else (f"stage 2 {s2['steps']} steps (loss {s2['first_loss']} -> "
                                                f"{s2['last_loss']})")
        click.echo(f"proclip on {d['scenes']} scenes: stage 1 {s1['steps']} steps (loss {s1['first_loss']} -> "
                   f"{s1['last_loss']}), {two}; " + _summary_line(d))

    emit(summary, as_json, render)
