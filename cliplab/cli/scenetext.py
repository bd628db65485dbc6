"""``cliplab scenetext``: the scene-text world (:mod:`cliplab.scenetext`): render labelled scenes, and show FDP's
distracted-query candidates of a word."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .app import main
from .common import emit, json_option


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
@click.option("--k", type=click.IntRange(1), default=5, show_default=True,
              help="Candidates: the word and its nearest dictionary spellings, padded.")
@json_option()
def candidates_cmd(word, k, as_json):
    """FDP's distracted queries of WORD: its near-spellings in the scene-text dictionary, their edit distances and
    the soft target softmax(1 / (d + 0.1)) that the distractor loss trains towards.

    \b
    Example:
      cliplab scenetext candidates cat --k 5
    """
    from ..scenetext import DICTIONARY
    from ..scenetext.fdp import candidate_target, distracted_candidates

    pairs = distracted_candidates(word, DICTIONARY, k=k)
    target = candidate_target([d for _, d in pairs]).tolist()
    rows = [{"candidate": w, "distance": d, "target": round(t, 4)} for (w, d), t in zip(pairs, target)]
    emit(rows, as_json, lambda d: [click.echo(f"{r['candidate']:<16} d={r['distance']}  target {r['target']:.4f}")
                                   for r in d])
