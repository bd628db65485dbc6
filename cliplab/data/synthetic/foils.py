"""Hard-negative caption foils: minimal, grammar-level edits of a scene's caption.

Each foil is produced by editing the *structured* caption content and
re-rendering it with the caption grammar, so the foil is a well-formed caption
that differs from the original in exactly one intended respect (verifiable with
:func:`~cliplab.data.synthetic.captions.caption_diff`), and is false of the
scene's image.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .captions import (
    long_caption_content, long_caption_text, parse_long_caption, parse_short_caption,
    short_caption_content, short_caption_text,
)
from .vocabulary import COLOURS, NUMBER_WORDS, SHAPES, WORDS, opposite_relation

if TYPE_CHECKING:  # pragma: no cover
    from .scene import Scene

__all__ = ["Foil", "FOIL_KINDS", "make_foils"]

FOIL_KINDS = ("attribute_swap", "relation_swap", "count_change", "replaced_word")


@dataclass(frozen=True)
class Foil:
    kind: str
    text: str
    changed: dict[str, Any] = field(hash=False)


def _rng(scene: "Scene", seed: int | None, caption: str) -> np.random.Generator:
    extra = 0 if caption == "short" else 1
    if seed is not None:
        return np.random.default_rng([int(seed), extra])
    return np.random.default_rng([scene.seed or 0, scene.index or 0, 7919, extra])


def make_foils(
    scene: "Scene",
    caption: str = "short",
    *,
    kinds: tuple[str, ...] = FOIL_KINDS,
    per_kind: int | None = None,
    seed: int | None = None,
    words: tuple[str, ...] = WORDS,
) -> list[Foil]:
    """Foils of the scene's ``caption`` ("short" or "long").

    ``per_kind`` caps the number of foils of each kind (a seeded subset);
    ``None`` returns every candidate (replacement words are one seeded pick per
    slot).  Deterministic given the scene (its seed/index) or ``seed``.
    """
    if caption not in ("short", "long"):
        raise ValueError("caption must be 'short' or 'long'")
    rng = _rng(scene, seed, caption)
    build = _short_foils if caption == "short" else _long_foils
    by_kind = build(scene, rng, words)
    original = scene.short_caption if caption == "short" else scene.long_caption
    out: list[Foil] = []
    for kind in kinds:
        cands = [f for f in by_kind.get(kind, []) if f.text != original]
        if per_kind is not None and len(cands) > per_kind:
            pick = sorted(rng.choice(len(cands), size=per_kind, replace=False).tolist())
            cands = [cands[k] for k in pick]
        out.extend(cands)
    return out


def _pick(rng: np.random.Generator, options: list[str]) -> str | None:
    return options[int(rng.integers(len(options)))] if options else None


def _short_foils(scene: "Scene", rng: np.random.Generator, words) -> dict[str, list[Foil]]:
    content = short_caption_content(scene)
    objs = content["objects"]
    rel = content["relation"]
    out: dict[str, list[Foil]] = {k: [] for k in FOIL_KINDS}

    def emit(kind: str, c: dict[str, Any], changed: dict[str, Any]) -> None:
        text = short_caption_text(c)
        if parse_short_caption(text) == c:  # only foils the grammar states unambiguously
            out[kind].append(Foil(kind, text, changed))

    # attribute swaps between two mentioned phrases
    for a in range(len(objs)):
        for b in range(a + 1, len(objs)):
            for attr in ("colour", "size", "texture"):
                va, vb = objs[a][attr], objs[b][attr]
                if va is None or vb is None or va == vb:
                    continue
                if attr == "texture" and "plain" in (va, vb) and max(objs[a]["count"], objs[b]["count"]) > 1:
                    continue  # a counted group cannot state "plain"
                c = copy.deepcopy(content)
                c["objects"][a][attr], c["objects"][b][attr] = vb, va
                emit("attribute_swap", c, {"attribute": attr, "shapes": (objs[a]["shape"], objs[b]["shape"]),
                                           "values": (va, vb)})
    # relation swaps
    if rel is not None:
        c = copy.deepcopy(content)
        c["relation"]["relation"] = opposite_relation(rel["relation"])
        emit("relation_swap", c, {"mode": "flip", "from": rel["relation"], "to": c["relation"]["relation"]})
        c = copy.deepcopy(content)
        c["relation"]["subject"], c["relation"]["object"] = rel["object"], rel["subject"]
        if len(objs) == 2:  # direct form "A rel B" -> "B rel A"
            c["objects"] = c["objects"][::-1]
        emit("relation_swap", c, {"mode": "swap_order", "subject": rel["subject"], "object": rel["object"]})
    # count changes of counted groups
    for k, p in enumerate(objs):
        if p["count"] < 2:
            continue
        for new in (p["count"] + 1, p["count"] - 1):
            if 2 <= new < len(NUMBER_WORDS):
                c = copy.deepcopy(content)
                c["objects"][k]["count"] = new
                emit("count_change", c, {"shape": p["shape"], "from": p["count"], "to": new})
    # replaced words: colour / shape absent from the scene, rendered word
    present_colours = {o.colour for o in scene.objects}
    present_shapes = {o.shape for o in scene.objects}
    for k, p in enumerate(objs):
        if p["colour"] is not None:
            new = _pick(rng, [x for x in COLOURS if x not in present_colours])
            if new:
                c = copy.deepcopy(content)
                c["objects"][k]["colour"] = new
                emit("replaced_word", c, {"attribute": "colour", "shape": p["shape"], "from": p["colour"], "to": new})
        new = _pick(rng, [x for x in SHAPES if x not in present_shapes])
        if new:
            c = copy.deepcopy(content)
            c["objects"][k]["shape"] = new
            if c["relation"] is not None:
                for role in ("subject", "object"):
                    if c["relation"][role] == p["shape"]:
                        c["relation"][role] = new
            emit("replaced_word", c, {"attribute": "shape", "from": p["shape"], "to": new})
    if content["word"]:
        new = _pick(rng, [w for w in words if w != content["word"]])
        c = copy.deepcopy(content)
        c["word"] = new
        emit("replaced_word", c, {"attribute": "word", "from": content["word"], "to": new})
    return out


def _long_foils(scene: "Scene", rng: np.random.Generator, words) -> dict[str, list[Foil]]:
    content = long_caption_content(scene)
    objs = content["objects"]
    out: dict[str, list[Foil]] = {k: [] for k in FOIL_KINDS}

    def emit(kind: str, c: dict[str, Any], changed: dict[str, Any]) -> None:
        text = long_caption_text(c)
        if parse_long_caption(text) == c:
            out[kind].append(Foil(kind, text, changed))

    for a in range(len(objs)):
        for b in range(a + 1, len(objs)):
            for attr in ("colour", "size", "texture"):
                va, vb = objs[a][attr], objs[b][attr]
                if va == vb:
                    continue
                c = copy.deepcopy(content)
                c["objects"][a][attr], c["objects"][b][attr] = vb, va
                emit("attribute_swap", c, {"attribute": attr, "objects": (a, b), "values": (va, vb)})
    for k, (i, r, j) in enumerate(content["relations"]):
        c = copy.deepcopy(content)
        c["relations"][k] = (i, opposite_relation(r), j)
        emit("relation_swap", c, {"mode": "flip", "index": k, "from": r, "to": opposite_relation(r)})
        c = copy.deepcopy(content)
        c["relations"][k] = (j, r, i)
        emit("relation_swap", c, {"mode": "swap_order", "index": k})
    for shape, n in content["counts"].items():
        if n < 2:
            continue
        for new in (n + 1, n - 1):
            if 2 <= new < len(NUMBER_WORDS):
                c = copy.deepcopy(content)
                c["counts"][shape] = new
                emit("count_change", c, {"shape": shape, "from": n, "to": new})
    present = {o["colour"] for o in objs}
    for k, o in enumerate(objs):
        new = _pick(rng, [x for x in COLOURS if x not in present])
        if new:
            c = copy.deepcopy(content)
            c["objects"][k]["colour"] = new
            emit("replaced_word", c, {"attribute": "colour", "object": k, "from": o["colour"], "to": new})
    if content["word"]:
        new = _pick(rng, [w for w in words if w != content["word"]])
        c = copy.deepcopy(content)
        c["word"] = new
        emit("replaced_word", c, {"attribute": "word", "from": content["word"], "to": new})
    return out
