"""Caption grammar (short and long forms), its exact parser, and a semantic diff.

Short caption grammar (one clause, no final period)::

    caption   := body [", and the word " QUOTE WORD QUOTE]
    body      := NP REL NP                       (exactly two single objects)
               | LIST [", with the " SHAPE " " REL " the " SHAPE]
    LIST      := NP | NP " and " NP | NP ", " NP ... " and " NP
    NP        := ("a"|"an") [SIZE] [COLOUR] [TEXTURE] SHAPE          (one object)
               | NUMBER [SIZE] [COLOUR] [TEXTURE] PLURAL             (2+ objects)
    REL       := "to the left of" | "to the right of" | "above" | "below"

Objects are grouped by shape in order of first appearance, so every shape is
mentioned once and a repeated shape is always counted ("two red circles and a
blue square").  A single object states its size and colour, and its texture
unless plain.  A counted group states only the attributes its members share
(texture only when shared and not plain).  The relation relates the first two
single-object groups (object ``i`` w.r.t. object ``j``).

Long caption: fixed sentence forms (see :func:`long_caption_text`), with all
colour information in the final sentence, preceded by the rendered word, so
that it falls beyond a 77-token context for 3-4 object scenes.
"""

from __future__ import annotations

import re
from typing import Any

from .protocols import SceneLike
from .vocabulary import (
    COLOURS, NUMBER_WORDS, ORDINALS, PLURALS, RELATIONS, SHAPES, SIZES, TEXTURES,
    article, opposite_relation,
)


__all__ = [
    "CaptionParseError",
    "short_caption_content",
    "short_caption_text",
    "short_caption",
    "long_caption_content",
    "long_caption_text",
    "long_caption",
    "parse_short_caption",
    "parse_long_caption",
    "parse_caption",
    "caption_diff",
    "canonical_relation",
]


class CaptionParseError(ValueError):
    """Text is not in the language of the caption grammar."""


_REL_TEXT = RELATIONS
_TEXT_REL = {v: k for k, v in RELATIONS.items()}
_REL_ALT = "|".join(re.escape(t) for t in sorted(_TEXT_REL, key=len, reverse=True))
_PLURAL_SHAPE = {v: k for k, v in PLURALS.items()}
_NUM = {w: i for i, w in enumerate(NUMBER_WORDS)}
_ORD = {w: i for i, w in enumerate(ORDINALS)}
_ORD["only"] = 0
_SIZES = frozenset(SIZES)
_COLOURS = frozenset(COLOURS)
_TEXTURES = frozenset(TEXTURES)
_SHAPES = frozenset(SHAPES)

# ======================================================================
# short captions
# ======================================================================


def short_caption_content(scene: SceneLike) -> dict[str, Any]:
    """What the short caption of ``scene`` states, in the parser's format."""
    groups: dict[str, list[int]] = {}
    for i, o in enumerate(scene.objects):
        groups.setdefault(o.shape, []).append(i)
    objects = []
    singles = []
    for shape, idx in groups.items():
        objs = [scene.objects[i] for i in idx]
        if len(objs) == 1:
            o = objs[0]
            objects.append({"count": 1, "shape": shape, "colour": o.colour, "size": o.size, "texture": o.texture})
            singles.append(idx[0])
        else:
            def shared(attr: str):
                vals = {getattr(o, attr) for o in objs}
                return vals.pop() if len(vals) == 1 else None

            texture = shared("texture")
            objects.append({
                "count": len(objs), "shape": shape, "colour": shared("colour"), "size": shared("size"),
                "texture": None if texture == "plain" else texture,
            })
    relation = None
    if len(singles) >= 2:
        i, j = singles[0], singles[1]
        relation = {"subject": scene.objects[i].shape, "relation": scene.relation(i, j),
                    "object": scene.objects[j].shape}
    return {"form": "short", "objects": objects, "relation": relation, "word": scene.word}


def noun_phrase_text(p: dict[str, Any]) -> str:
    words = [w for w in (p.get("size"), p.get("colour")) if w]
    tex = p.get("texture")
    if tex and tex != "plain":
        words.append(tex)
    n = p["count"]
    if n == 1:
        words.append(p["shape"])
        return f"{article(words[0])} {' '.join(words)}"
    words.append(PLURALS[p["shape"]])
    return f"{NUMBER_WORDS[n]} {' '.join(words)}"


def _join_list(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def short_caption_text(content: dict[str, Any]) -> str:
    """Render short-caption content (as returned by the parser) to text."""
    objs = content["objects"]
    rel = content.get("relation")
    nps = [noun_phrase_text(p) for p in objs]
    if (rel is not None and len(objs) == 2 and objs[0]["count"] == 1 and objs[1]["count"] == 1
            and rel["subject"] == objs[0]["shape"] and rel["object"] == objs[1]["shape"]):
        text = f"{nps[0]} {_REL_TEXT[rel['relation']]} {nps[1]}"
    else:
        text = _join_list(nps)
        if rel is not None:
            text += f", with the {rel['subject']} {_REL_TEXT[rel['relation']]} the {rel['object']}"
    if content.get("word"):
        text += f', and the word "{content["word"]}"'
    return text


def short_caption(scene: SceneLike) -> str:
    return short_caption_text(short_caption_content(scene))


_WORD_RE = re.compile(r', and the word "([a-z]+)"$')
_CLAUSE_RE = re.compile(rf", with the ([a-z]+) ({_REL_ALT}) the ([a-z]+)$")
_DIRECT_RE = re.compile(rf"^(.+?) ({_REL_ALT}) (.+)$")
_SPLIT_RE = re.compile(r", | and ")


def parse_noun_phrase(text: str) -> dict[str, Any]:
    toks = text.split()
    if len(toks) < 2:
        raise CaptionParseError(f"bad noun phrase {text!r}")
    head, *mods, noun = toks
    if head in ("a", "an"):
        count = 1
        if noun not in _SHAPES:
            raise CaptionParseError(f"expected a shape in {text!r}")
        shape = noun
        if head != article((mods or [noun])[0]):
            raise CaptionParseError(f"wrong article in {text!r}")
    elif head in _NUM and _NUM[head] >= 2:
        count = _NUM[head]
        if noun not in _PLURAL_SHAPE:
            raise CaptionParseError(f"expected a plural shape in {text!r}")
        shape = _PLURAL_SHAPE[noun]
    else:
        raise CaptionParseError(f"noun phrase must start with an article or number: {text!r}")
    slots: dict[str, Any] = {"size": None, "colour": None, "texture": None}
    order = ("size", "colour", "texture")
    last = -1
    for m in mods:
        kind = "size" if m in _SIZES else "colour" if m in _COLOURS else "texture" if m in _TEXTURES else None
        if kind is None or order.index(kind) <= last:
            raise CaptionParseError(f"unexpected modifier {m!r} in {text!r}")
        last = order.index(kind)
        slots[kind] = m
    if count == 1 and slots["texture"] is None:
        slots["texture"] = "plain"
    return {"count": count, "shape": shape, **slots}


def parse_short_caption(text: str) -> dict[str, Any]:
    """Invert :func:`short_caption_text`."""
    t = text.strip()
    word = None
    m = _WORD_RE.search(t)
    if m:
        word = m.group(1)
        t = t[: m.start()]
    relation = None
    m = _CLAUSE_RE.search(t)
    if m:
        relation = {"subject": m.group(1), "relation": _TEXT_REL[m.group(2)], "object": m.group(3)}
        t = t[: m.start()]
        objects = [parse_noun_phrase(p) for p in _SPLIT_RE.split(t)]
    else:
        m = _DIRECT_RE.match(t)
        if m:
            a, b = parse_noun_phrase(m.group(1)), parse_noun_phrase(m.group(3))
            if a["count"] != 1 or b["count"] != 1:
                raise CaptionParseError("a direct relation needs two single objects")
            objects = [a, b]
            relation = {"subject": a["shape"], "relation": _TEXT_REL[m.group(2)], "object": b["shape"]}
        else:
            objects = [parse_noun_phrase(p) for p in _SPLIT_RE.split(t)]
    shapes = [p["shape"] for p in objects]
    if len(set(shapes)) != len(shapes):
        raise CaptionParseError("a shape may be mentioned only once")
    if relation is not None:
        single = {p["shape"] for p in objects if p["count"] == 1}
        if relation["subject"] not in single or relation["object"] not in single or relation["subject"] == relation["object"]:
            raise CaptionParseError("relation must link two different single objects")
    return {"form": "short", "objects": objects, "relation": relation, "word": word}


# ======================================================================
# long captions
# ======================================================================

_BRIGHT_TEXT = {"dark": "dark", "normal": "normally lit", "bright": "bright"}
_TEXT_BRIGHT = {v: k for k, v in _BRIGHT_TEXT.items()}
_REGION_TEXT = {
    "top left": "in the top left corner of the image",
    "top": "at the top of the image",
    "top right": "in the top right corner of the image",
    "left": "on the left side of the image",
    "centre": "in the centre of the image",
    "right": "on the right side of the image",
    "bottom left": "in the bottom left corner of the image",
    "bottom": "at the bottom of the image",
    "bottom right": "in the bottom right corner of the image",
}
_TEXT_REGION = {v: k for k, v in _REGION_TEXT.items()}
_CLUTTER_TEXT = {False: "The background is plain.", True: "The background is cluttered with small grey marks."}


def long_caption_content(scene: SceneLike) -> dict[str, Any]:
    """What the long caption of ``scene`` states, in the parser's format."""
    n = len(scene.objects)
    return {
        "form": "long",
        "brightness": scene.brightness,
        "clutter": scene.clutter,
        "counts": scene.counts,
        "objects": [
            {"shape": o.shape, "size": o.size, "texture": o.texture, "region": scene.region(i), "colour": o.colour}
            for i, o in enumerate(scene.objects)
        ],
        "relations": [(i, scene.relation(i, i + 1), i + 1) for i in range(n - 1)],
        "word": scene.word,
    }


def long_caption_text(content: dict[str, Any]) -> str:
    """Render long-caption content to text.

    Sentence order: overview (count, brightness), background, shape counts,
    one sentence per object (size, texture, shape, region; *no colour*),
    relations of consecutive objects, the rendered word, and finally the
    colours of all objects.
    """
    objs = content["objects"]
    n = len(objs)

    def ordn(i: int) -> str:
        return "only" if n == 1 else ORDINALS[i]

    s = [f"This image shows {NUMBER_WORDS[n]} object{'s' if n != 1 else ''} in a "
         f"{_BRIGHT_TEXT[content['brightness']]} scene.", _CLUTTER_TEXT[bool(content["clutter"])]]
    counts = [f"{NUMBER_WORDS[c]} {shape if c == 1 else PLURALS[shape]}" for shape, c in content["counts"].items()]
    s.append(f"The scene contains {_join_list(counts)}.")
    for i, o in enumerate(objs):
        s.append(f"The {ordn(i)} object is {article(o['size'])} {o['size']} {o['texture']} {o['shape']} "
                 f"{_REGION_TEXT[o['region']]}.")
    for i, rel, j in content["relations"]:
        s.append(f"The {ordn(i)} object is {_REL_TEXT[rel]} the {ordn(j)} object.")
    if content.get("word"):
        s.append(f'The word "{content["word"]}" is written in the image.')
    s.append("In terms of colour, " + _join_list([f"the {ordn(i)} object is {o['colour']}" for i, o in enumerate(objs)]) + ".")
    return " ".join(s)


def long_caption(scene: SceneLike) -> str:
    return long_caption_text(long_caption_content(scene))


_L_INTRO = re.compile(r"^This image shows ([a-z]+) objects? in a (dark|normally lit|bright) scene\.$")
_L_COUNTS = re.compile(r"^The scene contains (.+)\.$")
_L_OBJECT = re.compile(r"^The ([a-z]+) object is an? ([a-z]+) ([a-z]+) ([a-z]+) (.+)\.$")
_L_REL = re.compile(rf"^The ([a-z]+) object is ({_REL_ALT}) the ([a-z]+) object\.$")
_L_WORD = re.compile(r'^The word "([a-z]+)" is written in the image\.$')
_L_COLOUR = re.compile(r"^In terms of colour, (.+)\.$")
_L_COLOUR_ITEM = re.compile(r"^the ([a-z]+) object is ([a-z]+)$")
_SENT_SPLIT = re.compile(r"(?<=\.) (?=[A-Z])")


def _ordinal(w: str) -> int:
    if w not in _ORD:
        raise CaptionParseError(f"bad ordinal {w!r}")
    return _ORD[w]


def parse_long_caption(text: str) -> dict[str, Any]:
    """Invert :func:`long_caption_text`."""
    out: dict[str, Any] = {"form": "long", "brightness": None, "clutter": None, "counts": {},
                           "objects": [], "relations": [], "word": None}
    n = None
    objects: dict[int, dict[str, Any]] = {}
    colours: dict[int, str] = {}
    clutter_text = {v: k for k, v in _CLUTTER_TEXT.items()}
    for sent in _SENT_SPLIT.split(text.strip()):
        if m := _L_INTRO.match(sent):
            n = _NUM.get(m.group(1))
            out["brightness"] = _TEXT_BRIGHT[m.group(2)]
        elif sent in clutter_text:
            out["clutter"] = clutter_text[sent]
        elif m := _L_WORD.match(sent):
            out["word"] = m.group(1)
        elif m := _L_COLOUR.match(sent):
            for item in _SPLIT_RE.split(m.group(1)):
                mi = _L_COLOUR_ITEM.match(item)
                if not mi or mi.group(2) not in _COLOURS:
                    raise CaptionParseError(f"bad colour item {item!r}")
                colours[_ordinal(mi.group(1))] = mi.group(2)
        elif m := _L_COUNTS.match(sent):
            for item in _SPLIT_RE.split(m.group(1)):
                num, noun = item.split(" ", 1)
                c = _NUM.get(num)
                shape = noun if c == 1 else _PLURAL_SHAPE.get(noun)
                if c is None or shape not in _SHAPES:
                    raise CaptionParseError(f"bad count item {item!r}")
                out["counts"][shape] = c
        elif m := _L_REL.match(sent):
            out["relations"].append((_ordinal(m.group(1)), _TEXT_REL[m.group(2)], _ordinal(m.group(3))))
        elif m := _L_OBJECT.match(sent):
            size, tex, shape, where = m.group(2, 3, 4, 5)
            if size not in _SIZES or tex not in _TEXTURES or shape not in _SHAPES or where not in _TEXT_REGION:
                raise CaptionParseError(f"bad object sentence {sent!r}")
            objects[_ordinal(m.group(1))] = {"shape": shape, "size": size, "texture": tex,
                                             "region": _TEXT_REGION[where]}
        else:
            raise CaptionParseError(f"unrecognised sentence {sent!r}")
    if n is None or sorted(objects) != list(range(n)) or sorted(colours) != list(range(n)):
        raise CaptionParseError("object sentences do not match the announced number of objects")
    out["objects"] = [{**objects[i], "colour": colours[i]} for i in range(n)]
    return out


def parse_caption(text: str) -> dict[str, Any]:
    """Parse a short or long caption (auto-detected) into structured attributes."""
    if text.startswith("This image shows "):
        return parse_long_caption(text)
    return parse_short_caption(text)


# ======================================================================
# semantic comparison
# ======================================================================


def canonical_relation(a, rel: str, b) -> tuple:
    """``(a, rel, b)`` and ``(b, opposite(rel), a)`` map to the same triple."""
    if (str(a), a) > (str(b), b):
        return (b, opposite_relation(rel), a)
    return (a, rel, b)


def caption_diff(a: dict[str, Any], b: dict[str, Any]) -> set[tuple]:
    """Semantic differences between two parsed captions of the same form.

    Short form (phrases aligned by shape, order-insensitive): ``(attr, shape)``
    for attr in count/colour/size/texture, ``("shape", old, new)`` for a single
    renamed shape, ``("missing", s)``/``("extra", s)``, ``("relation",)`` and
    ``("word",)``.  Long form (objects aligned by index): ``(attr, i)``,
    ``("count", shape)``, ``("relation", k)``, ``("brightness",)``,
    ``("clutter",)``, ``("word",)``, ``("n_objects",)``, ``("relations",)``.
    """
    if a["form"] != b["form"]:
        raise ValueError("cannot compare short and long captions")
    out: set[tuple] = set()
    if a.get("word") != b.get("word"):
        out.add(("word",))
    if a["form"] == "short":
        pa = {p["shape"]: p for p in a["objects"]}
        pb = {p["shape"]: p for p in b["objects"]}
        only_a = [s for s in pa if s not in pb]
        only_b = [s for s in pb if s not in pa]
        rename = {}
        pairs = [(s, s) for s in pa if s in pb]
        if len(only_a) == 1 and len(only_b) == 1:
            out.add(("shape", only_a[0], only_b[0]))
            rename[only_a[0]] = only_b[0]
            pairs.append((only_a[0], only_b[0]))
        else:
            out.update(("missing", s) for s in only_a)
            out.update(("extra", s) for s in only_b)
        for sa, sb in pairs:
            for attr in ("count", "colour", "size", "texture"):
                if pa[sa][attr] != pb[sb][attr]:
                    out.add((attr, sa))
        ra, rb = a.get("relation"), b.get("relation")
        ca = None if ra is None else canonical_relation(rename.get(ra["subject"], ra["subject"]), ra["relation"],
                                                        rename.get(ra["object"], ra["object"]))
        cb = None if rb is None else canonical_relation(rb["subject"], rb["relation"], rb["object"])
        if ca != cb:
            out.add(("relation",))
        return out
    for key in ("brightness", "clutter"):
        if a[key] != b[key]:
            out.add((key,))
    for shape in set(a["counts"]) | set(b["counts"]):
        if a["counts"].get(shape, 0) != b["counts"].get(shape, 0):
            out.add(("count", shape))
    if len(a["objects"]) != len(b["objects"]):
        out.add(("n_objects",))
    else:
        for i, (oa, ob) in enumerate(zip(a["objects"], b["objects"])):
            for attr in ("shape", "colour", "size", "texture", "region"):
                if oa[attr] != ob[attr]:
                    out.add((attr, i))
    if len(a["relations"]) != len(b["relations"]):
        out.add(("relations",))
    else:
        for k, (x, y) in enumerate(zip(a["relations"], b["relations"])):
            if canonical_relation(*x) != canonical_relation(*y):
                out.add(("relation", k))
    return out
