"""``cliplab scenetext``: the scene-text world (:mod:`cliplab.scenetext`): render labelled scenes, and show FDP's
distracted-query candidates of a word."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .app import main
from .common import emit, fail, json_option, model_option, top_k_option, warnings_to_stderr


@main.group("scenetext")
def scenetext_group():
    """Scene text: synthetic scenes with words and boxes; FDP's near-spelling candidates (docs/methods/fdp.md)."""


@scenetext_group.command("render")
@click.option("--n", "count", type=click.IntRange(1), default=16, show_default=True, help="Scenes to render.")
@click.option("--cluttered", is_flag=True, help="Stray letters and strokes, no cleared patch behind the words.")
@click.option("--image-size", type=click.IntRange(32), default=64, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "-o", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Folder for the PNGs and scenes.json (words and their boxes per image).")
@json_option()
def render_cmd(count, cluttered, image_size, seed, out_dir, as_json):
    """Render COUNT scene-text scenes: PNG images plus scenes.json with each image's words and word boxes
    (x0, y0, x1, y1; x1/y1 exclusive).

    \b
    Example:
      cliplab scenetext render --n 100 --cluttered -o scenes/
    """
    from ..scenetext import SceneTextWorld
    from ..scenetext.dataset import font_note

    world = SceneTextWorld(image_size=image_size, seed=seed, cluttered=cluttered)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(count):
        scene = world.sample(i)
        name = f"scene_{i:05d}.png"
        scene.image.save(out / name)
        records.append({"image": name, "words": list(scene.words), "boxes": [list(b) for b in scene.boxes]})
    (out / "scenes.json").write_text(json.dumps({"seed": seed, "cluttered": cluttered, "image_size": image_size,
                                                 "fonts": font_note(), "scenes": records}, indent=1))
    emit({"out": str(out), "scenes": count, "cluttered": cluttered, "fonts": font_note()}, as_json,
         lambda d: click.echo(f"rendered {d['scenes']} {'cluttered ' if d['cluttered'] else ''}scenes -> "
                              f"{d['out']} (scenes.json: words and boxes; {d['fonts']})"))


@scenetext_group.command("candidates")
@click.argument("word")
@top_k_option(default=5, help="Candidates: the word and its nearest dictionary spellings, padded.")
@json_option()
def candidates_cmd(word, top_k, as_json):
    """FDP's distracted queries of WORD: its near-spellings in the scene-text dictionary, their edit distances and
    the soft target softmax(1 / (d + 0.1)) that the distractor loss trains towards.

    \b
    Example:
      cliplab scenetext candidates cat -k 5
    """
    from ..scenetext import DICTIONARY
    from ..scenetext.fdp import candidate_target, distracted_candidates

    pairs = distracted_candidates(word, DICTIONARY, k=top_k)
    target = candidate_target([d for _, d in pairs]).tolist()
    rows = [{"candidate": w, "distance": d, "target": round(t, 4)} for (w, d), t in zip(pairs, target)]
    emit(rows, as_json, lambda d: [click.echo(f"{r['candidate']:<16} d={r['distance']}  target {r['target']:.4f}")
                                   for r in d])


@scenetext_group.command("fdp-train")
@model_option()
@click.option("--scenes", type=click.IntRange(2), default=600, show_default=True,
              help="Cluttered training scenes (world seed SEED + 1).")
@click.option("--steps", type=click.IntRange(1), default=300, show_default=True)
@click.option("--gallery", type=click.IntRange(1), default=120, show_default=True,
              help="Held-out cluttered scenes (world seed SEED) to report mAP on, next to plain CLIP retrieval.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "-o", "out_file", type=click.Path(dir_okay=False), required=True,
              help="Where to save the trained FDP (for `cliplab scenetext search --fdp`).")
@json_option()
def fdp_train_cmd(model, scenes, steps, gallery, seed, out_file, as_json):
    """Train FDP (focus map, function/content prompts, distractor loss) for MODEL on cluttered scene-text scenes and
    report held-out mAP and how often a near-spelling outranks the true image, against plain CLIP.

    \b
    Example:
      cliplab scenetext fdp-train -o fdp.pt --steps 300
    """
    from ..pipeline.modelref import resolve_model
    from ..scenetext import DICTIONARY, SceneTextWorld
    from ..scenetext import fdp as F

    with warnings_to_stderr():
        net, info = resolve_model(model)
        net.eval()
        held_out = SceneTextWorld(seed=seed, cluttered=True).scenes(gallery)
        queries = F.gallery_queries(held_out, DICTIONARY)
        plain = F.retrieval_report(F.plain_clip_scores(net, held_out, queries), queries, held_out)
        trained, log = F.train_fdp(net, SceneTextWorld(seed=seed + 1, cluttered=True).scenes(scenes),
                                   vocabulary=DICTIONARY, steps=steps, seed=seed)
        report = F.retrieval_report(trained.scores(trained.encode_images(F.scene_pixels(net, held_out)), queries),
                                    queries, held_out)
    Path(out_file).parent.mkdir(parents=True, exist_ok=True)
    trained.save(out_file, model_name=info.get("source") or "shapes-tiny")
    data = {"fdp": str(out_file), "steps": steps, "queries": len(queries), "gallery": gallery, "fdp_report": report,
            "plain_clip_report": plain, "final_loss": log[-1][1] if log else None}
    emit(data, as_json, lambda d: click.echo(
        f"FDP -> {d['fdp']}\n  held-out mAP {d['fdp_report']['mAP']:.3f} (plain CLIP "
        f"{d['plain_clip_report']['mAP']:.3f}); a near-spelling outranks the true image "
        f"{d['fdp_report']['confuser_outranks_true_rate']:.0%} of the time (plain CLIP "
        f"{d['plain_clip_report']['confuser_outranks_true_rate']:.0%})"))


@scenetext_group.command("search")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--query", "-q", required=True, help="The word to find (a word of the FDP's vocabulary).")
@click.option("--fdp", "fdp_path", type=click.Path(exists=True, dir_okay=False), required=True,
              help="A trained FDP from `cliplab scenetext fdp-train`.")
@top_k_option(default=10, help="Results to print.")
@json_option()
def search_cmd(images, query, fdp_path, top_k, as_json):
    """Rank IMAGES by how likely they show the word QUERY, with a trained FDP (rank, score, path).

    \b
    Example:
      cliplab scenetext search scenes/*.png -q cat --fdp fdp.pt
    """
    import torch
    from PIL import Image

    from ..scenetext.fdp import FDP

    try:
        pictures = [Image.open(p).convert("RGB") for p in images]
    except OSError as e:
        fail(f"cannot read an image: {e}", 1)
    with warnings_to_stderr():
        f = FDP.load(fdp_path)
        if query not in f.index:
            fail(f"{query!r} is not in this FDP's vocabulary; retrain it with the word (cliplab scenetext fdp-train)", 2)
        pixels = torch.stack([f.clip.preprocess(p) for p in pictures])
        scores = f.scores(f.encode_images(pixels), [query])[0]
    order = torch.argsort(scores, descending=True, stable=True)[:top_k].tolist()
    rows = [{"rank": r + 1, "score": round(float(scores[i]), 4), "path": images[i]} for r, i in enumerate(order)]
    emit(rows, as_json, lambda d: [click.echo(f"{r['rank']:>3}  {r['score']:.4f}  {r['path']}") for r in d])
