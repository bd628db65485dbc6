"""Seeded evaluation/training task builders on top of :class:`SceneWorld`.

Every builder is a pure function of its arguments (``seed`` included): item
``k`` of a task uses its own generator ``default_rng([seed, tag, k, ...])``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .captions import noun_phrase_text, parse_noun_phrase
from .scene import Scene, SceneWorld
from .views import SceneDataset, write_image_folder  # re-exported: they were defined here
from .vocabulary import BRIGHTNESS, COLOURS, SHAPES, SIZES

__all__ = [
    "ZeroShotTask", "zero_shot_task",
    "WinogroundPair", "winoground_pairs",
    "CIRTriplet", "cir_triplets", "parse_modification", "modification_text", "apply_modification",
    "FewShotExample", "FewShotSplit", "few_shot_split",
    "SceneDataset", "write_image_folder", "brightness_variants",
]

_TAG_ZS, _TAG_WINO, _TAG_CIR, _TAG_FEW = 101, 102, 103, 104


def _world(image_size: int, seed: int, **kw: Any) -> SceneWorld:
    return SceneWorld(image_size=image_size, seed=seed, **kw)


# ---------------------------------------------------------------- zero-shot


@dataclass
class ZeroShotTask:
    """Single-object scenes labelled by ``kind`` ("colour", "shape" or "colour_shape").

    ``prompts[c]`` lists grammatical short captions describing class ``c``
    (average their text embeddings for a class prototype)."""

    kind: str
    classnames: list[str]
    prompts: list[list[str]]
    images: list[Image.Image]
    labels: list[int]
    scenes: list[Scene]


def zero_shot_task(
    kind: str = "colour_shape",
    n_per_class: int = 10,
    *,
    image_size: int = 64,
    seed: int = 0,
    brightness: str | None = "normal",
    clutter: bool | None = False,
    word: bool = False,
    shapes: Sequence[str] | None = None,
    colours: Sequence[str] | None = None,
) -> ZeroShotTask:
    shapes = list(shapes or SHAPES)
    colours = list(colours or COLOURS)
    if kind == "colour":
        classes = [{"colour": c} for c in colours]
        names = colours
        prompts = [[f"{noun_phrase_text({'count': 1, 'shape': s, 'colour': c})}" for s in shapes] for c in colours]
    elif kind == "shape":
        classes = [{"shape": s} for s in shapes]
        names = shapes
        prompts = [[noun_phrase_text({"count": 1, "shape": s, "colour": c}) for c in colours] for s in shapes]
    elif kind == "colour_shape":
        classes = [{"colour": c, "shape": s} for c in colours for s in shapes]
        names = [f"{c} {s}" for c in colours for s in shapes]
        prompts = [[noun_phrase_text({"count": 1, **cl})] for cl in classes]
    else:
        raise ValueError(f"unknown zero-shot kind {kind!r}")
    world = _world(image_size, seed, shapes=shapes, colours=colours)
    images, labels, scenes = [], [], []
    for label, spec in enumerate(classes):
        for k in range(n_per_class):
            rng = np.random.default_rng([seed, _TAG_ZS, label, k])
            scene = world.compose([spec], rng, brightness=brightness, clutter=clutter, word=word)
            scenes.append(scene)
            images.append(scene.render())
            labels.append(label)
    return ZeroShotTask(kind, list(names), prompts, images, labels, scenes)


# ---------------------------------------------------------------- winoground


@dataclass
class WinogroundPair:
    """Two scenes whose captions use the same words in a different arrangement."""

    kind: str  # "colour" | "size" | "texture" | "relation"
    image0: Image.Image
    caption0: str
    image1: Image.Image
    caption1: str
    scene0: Scene
    scene1: Scene


WINOGROUND_KINDS = ("colour", "size", "texture", "relation")


def winoground_pairs(
    n: int,
    *,
    kinds: Sequence[str] = WINOGROUND_KINDS,
    image_size: int = 64,
    seed: int = 0,
    clutter_prob: float = 0.3,
) -> list[WinogroundPair]:
    """``n`` pairs, cycling through ``kinds``.  Pair members share shapes and
    layout; ``colour``/``size``/``texture`` swap that attribute between the two
    objects, ``relation`` swaps the objects' positions (and caption order)."""
    for k in kinds:
        if k not in WINOGROUND_KINDS:
            raise ValueError(f"unknown Winoground kind {k!r}")
    world = _world(image_size, seed, clutter_prob=clutter_prob)
    out = []
    for p in range(n):
        kind = kinds[p % len(kinds)]
        rng = np.random.default_rng([seed, _TAG_WINO, p])
        for _ in range(200):
            s0, s1 = rng.choice(len(SHAPES), size=2, replace=False)
            specs = [world.fill_spec({"shape": SHAPES[s0]}, rng), world.fill_spec({"shape": SHAPES[s1]}, rng)]
            if kind in ("colour", "size", "texture") and specs[0][kind] == specs[1][kind]:
                continue
            scene0 = world.compose(specs, rng, word=False)
            a, b = scene0.objects
            if kind == "relation":
                objs1 = (b.moved(a.x, a.y), a.moved(b.x, b.y))
            else:
                objs1 = (a.with_attrs(image_size, **{kind: getattr(b, kind)}),
                         b.with_attrs(image_size, **{kind: getattr(a, kind)}))
            scene1 = scene0.replace(objects=objs1)
            if not world.layout_ok(scene1):
                continue
            c0, c1 = scene0.short_caption, scene1.short_caption
            if c0 != c1 and sorted(c0.split()) == sorted(c1.split()):
                break
        else:  # pragma: no cover
            raise RuntimeError("could not build a Winoground pair")
        out.append(WinogroundPair(kind, scene0.render(), c0, scene1.render(), c1, scene0, scene1))
    return out


# ---------------------------------------------------------------- composed retrieval


@dataclass
class CIRTriplet:
    """Reference image + modification text -> target image."""

    reference_image: Image.Image
    modification: str
    target_image: Image.Image
    reference_scene: Scene
    target_scene: Scene
    change: dict[str, Any]


CIR_KINDS = ("recolour", "resize", "remove", "add")

_MOD_RES = [
    (re.compile(r"^make the ([a-z]+) ([a-z]+)$"), "make"),
    (re.compile(r"^remove the ([a-z]+)$"), "remove"),
    (re.compile(r"^add (.+)$"), "add"),
]


def parse_modification(text: str) -> dict[str, Any]:
    """Parse a CIR modification text into a change dict."""

    for rx, op in _MOD_RES:
        m = rx.match(text.strip())
        if not m:
            continue
        if op == "make":
            shape, value = m.groups()
            if shape not in SHAPES:
                break
            if value in COLOURS:
                return {"op": "recolour", "shape": shape, "colour": value}
            if value in SIZES:
                return {"op": "resize", "shape": shape, "size": value}
            break
        if op == "remove":
            if m.group(1) not in SHAPES:
                break
            return {"op": "remove", "shape": m.group(1)}
        np_ = parse_noun_phrase(m.group(1))
        if np_["count"] != 1 or np_["colour"] is None or np_["size"] is None:
            break
        return {"op": "add", "shape": np_["shape"], "colour": np_["colour"], "size": np_["size"],
                "texture": np_["texture"]}
    raise ValueError(f"not a modification: {text!r}")


def modification_text(change: dict[str, Any]) -> str:
    """The modification sentence of a change dict (the inverse of :func:`parse_modification`)."""
    op = change["op"]
    if op == "recolour":
        return f"make the {change['shape']} {change['colour']}"
    if op == "resize":
        return f"make the {change['shape']} {change['size']}"
    if op == "remove":
        return f"remove the {change['shape']}"
    if op == "add":
        return "add " + noun_phrase_text({"count": 1, **{k: change[k] for k in ("shape", "colour", "size",
                                                                                 "texture")}})
    raise ValueError(f"unknown change op {op!r}")


def apply_modification(scene: Scene, change: dict[str, Any], world: SceneWorld,
                       rng: np.random.Generator | None = None) -> Scene | None:
    """The scene with ``change`` applied (other objects untouched); ``None``
    when the result would violate the layout rules."""
    objs = list(scene.objects)
    op = change["op"]
    if op == "add":
        spec = {k: change[k] for k in ("shape", "colour", "size", "texture")}
        placed = world.place([spec], rng if rng is not None else np.random.default_rng(0),
                             word_box=scene.word_box, fixed=objs)
        if placed is None:
            return None
        objs.append(placed[0])
    else:
        idx = [i for i, o in enumerate(objs) if o.shape == change["shape"]]
        if len(idx) != 1:
            raise ValueError("modification must refer to a unique shape")
        i = idx[0]
        if op == "remove":
            del objs[i]
        elif op == "recolour":
            objs[i] = objs[i].with_attrs(scene.image_size, colour=change["colour"])
        elif op == "resize":
            objs[i] = objs[i].with_attrs(scene.image_size, size=change["size"])
        else:
            raise ValueError(f"unknown op {op!r}")
    out = scene.replace(objects=tuple(objs))
    return out if world.layout_ok(out) else None


def cir_triplets(
    n: int,
    *,
    kinds: Sequence[str] = CIR_KINDS,
    image_size: int = 64,
    seed: int = 0,
    clutter_prob: float = 0.3,
    word_prob: float = 0.0,
) -> list[CIRTriplet]:
    """``n`` composed-image-retrieval triplets cycling through ``kinds``.
    References hold 1-3 objects of distinct shapes (2-3 for ``remove``)."""
    for k in kinds:
        if k not in CIR_KINDS:
            raise ValueError(f"unknown CIR kind {k!r}")
    world = _world(image_size, seed, clutter_prob=clutter_prob, word_prob=word_prob)
    out = []
    for p in range(n):
        kind = kinds[p % len(kinds)]
        rng = np.random.default_rng([seed, _TAG_CIR, p])
        for _ in range(200):
            n_obj = int(rng.integers(2 if kind == "remove" else 1, 4))
            shapes = [SHAPES[i] for i in rng.choice(len(SHAPES), size=n_obj, replace=False)]
            ref = world.compose([{"shape": s} for s in shapes], rng)
            t = int(rng.integers(n_obj))
            obj = ref.objects[t]
            if kind == "recolour":
                change = {"op": "recolour", "shape": obj.shape,
                          "colour": _choice(rng, [c for c in COLOURS if c != obj.colour])}
            elif kind == "resize":
                change = {"op": "resize", "shape": obj.shape,
                          "size": _choice(rng, [s for s in SIZES if s != obj.size])}
            elif kind == "remove":
                change = {"op": "remove", "shape": obj.shape}
            else:
                spec = world.fill_spec({"shape": _choice(rng, [s for s in SHAPES if s not in shapes])}, rng)
                change = {"op": "add", **spec}
            target = apply_modification(ref, change, world, rng)
            if target is not None:
                break
        else:  # pragma: no cover
            raise RuntimeError("could not build a CIR triplet")
        out.append(CIRTriplet(ref.render(), modification_text(change), target.render(), ref, target, change))
    return out


def _choice(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


# ---------------------------------------------------------------- few-shot


@dataclass
class FewShotExample:
    image: Image.Image
    label: int  # index into the split's base_classes or new_classes list
    classname: str
    scene: Scene


@dataclass
class FewShotSplit:
    """Base-to-new split over "colour shape" classes.

    ``train``/``test_base`` are labelled over ``base_classes``;
    ``train_new``/``test_new`` over ``new_classes``.  Every colour and every
    shape occurs in both class sets (new classes are new *combinations*)."""

    base_classes: list[str]
    new_classes: list[str]
    train: list[FewShotExample]
    test_base: list[FewShotExample]
    train_new: list[FewShotExample]
    test_new: list[FewShotExample]


def few_shot_split(
    k: int = 4,
    *,
    n_test: int = 5,
    new_fraction: float = 0.5,
    image_size: int = 64,
    seed: int = 0,
    colours: Sequence[str] | None = None,
    shapes: Sequence[str] | None = None,
    clutter_prob: float = 0.0,
) -> FewShotSplit:
    colours = list(colours or COLOURS)
    shapes = list(shapes or SHAPES)
    combos = [(c, s) for c in colours for s in shapes]
    n_new = int(round(new_fraction * len(combos)))
    if not 0 < n_new < len(combos):
        raise ValueError("new_fraction leaves an empty class set")
    rng = np.random.default_rng([seed, _TAG_FEW])
    for _ in range(1000):
        perm = rng.permutation(len(combos))
        new = sorted(perm[:n_new].tolist())
        base = sorted(perm[n_new:].tolist())
        covered = all(
            {combos[i][a] for i in part} == set(vals)
            for part in (new, base) for a, vals in ((0, colours), (1, shapes))
        )
        if covered:
            break
    world = _world(image_size, seed, colours=colours, shapes=shapes, clutter_prob=clutter_prob)

    def examples(class_ids: list[int], count: int, split_tag: int) -> list[FewShotExample]:
        out = []
        for label, ci in enumerate(class_ids):
            c, s = combos[ci]
            for j in range(count):
                r = np.random.default_rng([seed, _TAG_FEW, split_tag, ci, j])
                scene = world.compose([{"colour": c, "shape": s}], r, word=False,
                                      clutter=None if clutter_prob > 0 else False)
                out.append(FewShotExample(scene.render(), label, f"{c} {s}", scene))
        return out

    return FewShotSplit(
        base_classes=[f"{combos[i][0]} {combos[i][1]}" for i in base],
        new_classes=[f"{combos[i][0]} {combos[i][1]}" for i in new],
        train=examples(base, k, 0),
        test_base=examples(base, n_test, 1),
        train_new=examples(new, k, 0),
        test_new=examples(new, n_test, 1),
    )


# ---------------------------------------------------------------- datasets


def brightness_variants(scene: Scene) -> dict[str, Scene]:
    """The same scene at every brightness level (for robustness measurements)."""
    return {level: dataclasses.replace(scene, brightness=level) for level in BRIGHTNESS}

