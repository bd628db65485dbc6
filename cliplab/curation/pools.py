"""Synthetic image-text pools for the curation methods' effect checks (scenes of ``cliplab.data``, written as a
pairs table with image files, so the check goes through the same table -> curate -> train path as real data).

* :func:`zipf_pool` (MetaCLIP): single-object scenes whose colour follows a Zipf law over the 8 colours (the head
  colour is common, the tail ones rare), captioned ``"a {size} {colour} {shape}"``.
* :func:`template_pool` (LaCLIP): single-object scenes captioned by a few fixed templates, and held-out phrasings
  for evaluation.
* :func:`web_pool` (VeCLIP): 1-3 object scenes whose alt-text is web-like: a brand name that stands for the main
  object's colour (as "Ferrari" stands for a red), boilerplate words, and the main object's shape only sometimes; the
  alt-text never names a colour.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["zipf_pool", "zipf_weights", "template_pool", "TRAIN_TEMPLATES", "HELDOUT_TEMPLATES", "web_pool",
           "BRANDS", "BOILERPLATE", "write_scene_pool"]


def zipf_weights(n: int, exponent: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** exponent
    return w / w.sum()


def write_scene_pool(directory: str | os.PathLike, scenes: Sequence, rows: Sequence[dict], name: str = "pairs.csv"
                     ) -> Path:
    """Render ``scenes`` to ``directory/images/NNNNNN.png`` and write ``rows`` (each given its ``image``) as the
    pairs table ``directory/name``; returns the table's path."""
    from .pairs_io import write_pairs

    d = Path(directory)
    (d / "images").mkdir(parents=True, exist_ok=True)
    out = []
    for i, (scene, row) in enumerate(zip(scenes, rows)):
        rel = f"{i:06d}.png"
        scene.render().save(d / "images" / rel)
        out.append({"image": rel, **row})
    path = d / name
    write_pairs(out, path)
    return path


def _world(image_size: int, seed: int, **kw):
    from ..data import SceneWorld

    return SceneWorld(image_size=image_size, seed=seed, clutter_prob=0.0, word_prob=0.0, **kw)


def zipf_pool(n: int, exponent: float = 1.6, seed: int = 0, image_size: int = 64):
    """``(scenes, rows, colour_order)``: ``n`` single-object scenes, colour ``colour_order[k]`` drawn with
    probability proportional to ``1 / (k + 1) ** exponent``; rows have ``caption`` and ``colour``."""
    from ..data.synthetic.vocabulary import COLOURS

    colours = list(COLOURS)
    rng = np.random.default_rng([seed, 0x21F])
    order = [colours[i] for i in rng.permutation(len(colours))]
    p = zipf_weights(len(order), exponent)
    world = _world(image_size, seed)
    scenes, rows = [], []
    for i in range(n):
        r = np.random.default_rng([seed, 0x21F, i])
        colour = order[int(r.choice(len(order), p=p))]
        scene = world.compose([{"colour": colour, "texture": "plain"}], r, brightness="normal", clutter=False,
                              word=False)
        o = scene.objects[0]
        scenes.append(scene)
        rows.append({"caption": f"a {o.size} {o.colour} {o.shape}", "colour": o.colour})
    return scenes, rows, order


TRAIN_TEMPLATES = ("a {colour} {shape}", "a {colour} {shape} on grey")
HELDOUT_TEMPLATES = ("the {shape} is {colour}", "one {shape}, coloured {colour}", "{colour} is the colour of this {shape}",
                     "look: {colour} {shape}")


def template_pool(n: int, seed: int = 0, image_size: int = 64, templates: Sequence[str] = TRAIN_TEMPLATES):
    """``(scenes, rows)``: ``n`` single-object scenes (uniform colour and shape) captioned by one of ``templates``."""
    world = _world(image_size, seed)
    scenes, rows = [], []
    for i in range(n):
        r = np.random.default_rng([seed, 0x7E3, i])
        scene = world.compose([{"texture": "plain"}], r, brightness="normal", clutter=False, word=False)
        o = scene.objects[0]
        t = templates[int(r.integers(len(templates)))]
        scenes.append(scene)
        rows.append({"caption": t.format(colour=o.colour, shape=o.shape), "colour": o.colour, "shape": o.shape})
    return scenes, rows


#: a brand per colour: the "named entity" of the web-like alt-texts (its visual identity is the colour)
BRANDS = {"red": "ferrari", "green": "heineken", "blue": "ikea", "yellow": "dhl", "purple": "cadbury",
          "orange": "fanta", "cyan": "tiffany", "pink": "barbie"}
BOILERPLATE = ("sale", "free", "shipping", "buy", "online", "new", "best", "price", "stock", "jpg", "2024", "shop",
               "official", "store", "deal")


def web_pool(n: int, seed: int = 0, image_size: int = 64, shape_prob: float = 0.3, max_objects: int = 2):
    """``(scenes, rows)``: scenes of 1..``max_objects`` objects (the first, the largest, is the main one); rows have
    ``caption`` (the alt-text: the main object's brand, 2-3 boilerplate words, its shape with probability
    ``shape_prob``), ``brand`` and ``colour`` (of the main object) and ``objects`` (the scene graph as JSON: each
    object's colour, shape and size; what :class:`cliplab.curation.captioners.SceneGraphCaptioner` reads)."""
    world = _world(image_size, seed)
    scenes, rows = [], []
    for i in range(n):
        r = np.random.default_rng([seed, 0x3EB, i])
        k = int(r.integers(1, max_objects + 1))
        specs = [{"size": "large", "texture": "plain"}] + [{"size": "small", "texture": "plain"}] * (k - 1)
        scene = world.compose(specs, r, brightness="normal", clutter=False, word=False)
        main = next(o for o in scene.objects if o.size == "large")
        words = [BRANDS[main.colour], *r.choice(BOILERPLATE, size=int(r.integers(2, 4)), replace=False).tolist()]
        if r.random() < shape_prob:
            words.insert(1, main.shape)
        scenes.append(scene)
        graph = [{"colour": o.colour, "shape": o.shape, "size": o.size} for o in scene.objects]
        rows.append({"caption": " ".join(words), "brand": BRANDS[main.colour], "colour": main.colour,
                     "objects": json.dumps(graph)})
    return scenes, rows
