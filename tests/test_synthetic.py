"""Tests for cliplab.data.synthetic (the synthetic scene world)."""

from __future__ import annotations

import csv
import io
import math
import re
import time

import numpy as np
import pytest

from cliplab.data import synthetic as syn
from cliplab.data.synthetic import (
    COLOURS, SHAPES, VOCABULARY, SceneObject, SceneWorld, apply_brightness, caption_diff,
    cir_triplets, few_shot_split, make_foils, parse_caption, parse_long_caption,
    parse_modification, parse_short_caption, winoground_pairs, zero_shot_task,
)
from cliplab.data.synthetic.captions import long_caption_content, short_caption_content
from cliplab.data.synthetic.vocabulary import TEXTURE_SHADE

WORLD = SceneWorld(image_size=64, seed=0)


@pytest.fixture(scope="module")
def scenes():
    return [WORLD.sample(i) for i in range(3000)]


def bag(text: str) -> list[str]:
    return sorted(re.findall(r"[a-z]+", text))


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------ basics


def test_vocabulary_is_documented_and_disjoint():
    assert 6 <= len(VOCABULARY["shapes"]) <= 8
    assert len(VOCABULARY["colours"]) == 8
    assert VOCABULARY["sizes"].keys() == {"small", "medium", "large"}
    assert VOCABULARY["textures"] == ["plain", "striped", "dotted"]
    assert set(VOCABULARY["brightness"]) == {"dark", "normal", "bright"}
    assert set(VOCABULARY["relations"]) == {"left of", "right of", "above", "below"}
    words = [set(VOCABULARY[k]) for k in ("shapes", "colours", "sizes", "textures", "words")]
    for i, a in enumerate(words):
        for b in words[i + 1:]:
            assert not a & b
    cols = list(COLOURS.values())
    assert min(math.dist(a, b) for i, a in enumerate(cols) for b in cols[i + 1:]) > 100


def test_data_layer_imports_nothing_else_from_cliplab():
    import pathlib

    root = pathlib.Path(syn.__file__).parent.parent
    for path in root.rglob("*.py"):
        src = path.read_text()
        assert not re.search(r"^\s*(from|import)\s+cliplab\.(?!data)", src, re.M), path
        assert "torchvision" not in src and "import torch" not in src, path


def test_determinism_and_index_addressing():
    other = SceneWorld(image_size=64, seed=0)
    idx = [0, 7, 123, 9999, 5]
    for i in idx:
        a, b = WORLD.sample(i), other.sample(i)
        assert a == b
        assert png_bytes(a.render()) == png_bytes(b.render())
        assert a.short_caption == b.short_caption and a.long_caption == b.long_caption
    # scene i does not depend on what was sampled before
    fresh = SceneWorld(image_size=64, seed=0)
    assert png_bytes(fresh.sample(5).render()) == png_bytes(WORLD.sample(5).render())
    # different seeds give different data
    w1 = SceneWorld(image_size=64, seed=1)
    diff_png = sum(png_bytes(WORLD.sample(i).render()) != png_bytes(w1.sample(i).render()) for i in range(20))
    diff_cap = sum(WORLD.sample(i).short_caption != w1.sample(i).short_caption for i in range(20))
    assert diff_png == 20 and diff_cap >= 18
    # different indices differ too
    assert len({WORLD.sample(i).long_caption for i in range(50)}) == 50


def test_scene_statistics(scenes):
    ns = [len(s.objects) for s in scenes]
    assert set(ns) == {1, 2, 3, 4}
    assert {o.shape for s in scenes for o in s.objects} == set(SHAPES)
    assert {o.colour for s in scenes for o in s.objects} == set(COLOURS)
    assert {s.brightness for s in scenes} == {"dark", "normal", "bright"}
    assert 0.2 < np.mean([s.clutter for s in scenes]) < 0.4
    assert 0.15 < np.mean([s.word is not None for s in scenes]) < 0.35
    assert np.mean([max(s.counts.values()) >= 2 for s in scenes]) > 0.2  # repeated shapes are common
    for s in scenes[:300]:
        assert WORLD.layout_ok(s)
        img = s.render()
        assert img.mode == "RGB" and img.size == (64, 64)


# ------------------------------------------------------------------ captions


def test_short_captions_parse_back_exactly(scenes):
    for s in scenes:
        parsed = parse_short_caption(s.short_caption)
        assert parsed == short_caption_content(s), s.short_caption
        assert parse_caption(s.short_caption) == parsed
        # independent cross-check against the structured attributes
        attrs = s.attributes
        assert {p["shape"]: p["count"] for p in parsed["objects"]} == attrs["counts"]
        assert [p["shape"] for p in parsed["objects"]] == list(dict.fromkeys(o["shape"] for o in attrs["objects"]))
        for p in parsed["objects"]:
            members = [o for o in attrs["objects"] if o["shape"] == p["shape"]]
            for key in ("colour", "size", "texture"):
                vals = {o[key] for o in members}
                if p["count"] == 1:
                    assert p[key] == members[0][key]
                elif p[key] is not None:
                    assert vals == {p[key]}
                else:
                    assert len(vals) > 1 or (key == "texture" and vals == {"plain"})
        assert parsed["word"] == attrs["word"]
        rel = parsed["relation"]
        singles = [o for o in attrs["objects"] if attrs["counts"][o["shape"]] == 1]
        if len(singles) >= 2:
            i = attrs["objects"].index(singles[0])
            j = attrs["objects"].index(singles[1])
            assert (rel["subject"], rel["relation"], rel["object"]) == (singles[0]["shape"], s.relation(i, j), singles[1]["shape"])
            assert (i, rel["relation"], j) in attrs["relations"]
        else:
            assert rel is None


def test_short_caption_examples_and_counts():
    obj = lambda shape, colour, size="small", texture="plain", x=10.0, y=10.0: SceneObject(  # noqa: E731
        shape, colour, size, texture, x, y, syn.scene.object_radius(size, 64))
    s = syn.Scene(64, (obj("circle", "red", "large", "striped", 15, 30), obj("square", "blue", "small", "plain", 48, 32)))
    assert s.short_caption == "a large red striped circle to the left of a small blue square"
    s = syn.Scene(64, (obj("circle", "red", x=10, y=10), obj("square", "blue", x=50, y=50), obj("circle", "red", "medium", x=30, y=52)),
                  word="cat")
    assert s.short_caption == 'two red circles and a small blue square, and the word "cat"'
    assert parse_caption(s.short_caption)["objects"][0] == {"count": 2, "shape": "circle", "colour": "red", "size": None, "texture": None}
    with pytest.raises(syn.CaptionParseError):
        parse_short_caption("a red blue circle")
    with pytest.raises(syn.CaptionParseError):
        parse_short_caption("two circle")


def test_long_captions_parse_back_exactly(scenes):
    for s in scenes[:2000]:
        parsed = parse_long_caption(s.long_caption)
        assert parsed == long_caption_content(s)
        assert parse_caption(s.long_caption) == parsed
        attrs = s.attributes
        assert parsed["counts"] == attrs["counts"]
        assert parsed["brightness"] == attrs["brightness"] and parsed["clutter"] == attrs["clutter"]
        assert parsed["word"] == attrs["word"]
        for p, o in zip(parsed["objects"], attrs["objects"], strict=True):
            assert {k: p[k] for k in ("shape", "colour", "size", "texture", "region")} == {
                k: o[k] for k in ("shape", "colour", "size", "texture", "region")}
        for i, rel, j in parsed["relations"]:
            assert (i, rel, j) in attrs["relations"]


def test_long_captions_are_long_with_late_detail(scenes):
    colour_words = set(COLOURS)
    many = [s for s in scenes if len(s.objects) >= 3]
    assert len(many) > 500
    lengths = [len(s.long_caption.split()) for s in many]
    assert np.mean([n > 60 for n in lengths]) > 0.95
    for s in many:
        words = [w.strip('.,"') for w in s.long_caption.split()]
        n = len(words)
        colour_pos = [k for k, w in enumerate(words) if w in colour_words]
        # no colour at all in the first 60 words (beyond a 77-token window)
        assert min(colour_pos) >= 60
        # the last object's colour is the last word
        assert words[-1] == s.objects[-1].colour
        assert max(colour_pos) >= 0.9 * n
        if s.word:
            assert words.index(s.word) >= max(60, int(0.6 * n))


# ------------------------------------------------------------------ foils


def _check_short_foil(scene, foil):
    orig = parse_short_caption(scene.short_caption)
    new = parse_short_caption(foil.text)
    d = caption_diff(orig, new)
    ch = foil.changed
    if foil.kind == "attribute_swap":
        a, b = ch["shapes"]
        attr = ch["attribute"]
        assert d == {(attr, a), (attr, b)}
        pa = {p["shape"]: p for p in new["objects"]}
        po = {p["shape"]: p for p in orig["objects"]}
        assert (pa[a][attr], pa[b][attr]) == (po[b][attr], po[a][attr])
        assert bag(foil.text) == bag(scene.short_caption)
    elif foil.kind == "relation_swap":
        assert d == {("relation",)}
        if ch["mode"] == "swap_order":
            assert bag(foil.text) == bag(scene.short_caption)
    elif foil.kind == "count_change":
        assert d == {("count", ch["shape"])}
        true = scene.counts[ch["shape"]]
        assert {p["shape"]: p["count"] for p in new["objects"]}[ch["shape"]] != true
    elif foil.kind == "replaced_word":
        if ch["attribute"] == "colour":
            assert d == {("colour", ch["shape"])}
            assert ch["to"] not in {o.colour for o in scene.objects}
        elif ch["attribute"] == "shape":
            assert d == {("shape", ch["from"], ch["to"])}
            assert ch["to"] not in {o.shape for o in scene.objects}
        else:
            assert d == {("word",)} and new["word"] != scene.word and new["word"] in VOCABULARY["words"]
    else:  # pragma: no cover
        raise AssertionError(foil.kind)


def test_short_foils_change_exactly_the_intended_attribute(scenes):
    seen = set()
    for s in scenes[:800]:
        foils = make_foils(s)
        assert foils == make_foils(s)  # deterministic
        texts = [f.text for f in foils]
        assert s.short_caption not in texts
        for f in foils:
            _check_short_foil(s, f)
            seen.add((f.kind, f.changed.get("attribute", f.changed.get("mode"))))
    assert seen >= {("attribute_swap", "colour"), ("attribute_swap", "size"), ("attribute_swap", "texture"),
                    ("relation_swap", "flip"), ("relation_swap", "swap_order"), ("count_change", None),
                    ("replaced_word", "colour"), ("replaced_word", "shape"), ("replaced_word", "word")}


def test_long_foils_change_exactly_the_intended_attribute(scenes):
    kinds = set()
    for s in scenes[:300]:
        orig = parse_long_caption(s.long_caption)
        for f in make_foils(s, caption="long"):
            assert f.text != s.long_caption
            d = caption_diff(orig, parse_long_caption(f.text))
            ch = f.changed
            kinds.add(f.kind)
            if f.kind == "attribute_swap":
                a, b = ch["objects"]
                assert d == {(ch["attribute"], a), (ch["attribute"], b)}
            elif f.kind == "relation_swap":
                assert d == {("relation", ch["index"])}
            elif f.kind == "count_change":
                assert d == {("count", ch["shape"])}
            elif ch["attribute"] == "colour":
                assert d == {("colour", ch["object"])}
            else:
                assert d == {("word",)}
    assert kinds == set(syn.FOIL_KINDS)


def test_foil_subsampling():
    s = next(WORLD.sample(i) for i in range(100) if len(WORLD.sample(i).objects) == 4)
    few = make_foils(s, per_kind=1)
    assert len({f.kind for f in few}) == len(few)
    assert set(few) <= set(make_foils(s))


# ------------------------------------------------------------------ pixels


def test_masks_and_boxes_match_pixels(scenes):
    for s in scenes[:400]:
        arr = np.asarray(s.render()).astype(int)
        masks = s.masks
        assert masks.shape == (len(s.objects), 64, 64) and masks.dtype == bool
        assert masks.sum(0).max() <= 1  # disjoint
        for o, m, box in zip(s.objects, masks, s.boxes, strict=True):
            assert m.sum() > 0
            base = np.array(apply_brightness(COLOURS[o.colour], s.brightness))
            dark = np.array(apply_brightness([round(c * TEXTURE_SHADE) for c in COLOURS[o.colour]], s.brightness))
            px = arr[m]
            is_base = (np.abs(px - base) <= 1).all(1)
            is_dark = (np.abs(px - dark) <= 1).all(1)
            assert (is_base | is_dark).all()
            if o.texture == "plain":
                assert is_base.all()
            else:
                assert 0.1 < is_dark.mean() < 0.9
            ys, xs = np.nonzero(m)
            mbox = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert max(abs(a - b) for a, b in zip(mbox, box)) <= 1, (o, mbox, box)
        # everything outside the masks is grey (background, clutter, word)
        rest = arr[~masks.any(0)]
        assert (rest[:, 0] == rest[:, 1]).all() and (rest[:, 1] == rest[:, 2]).all()


def test_occlusion_order_in_masks():
    r = syn.scene.object_radius("large", 64)
    objs = (SceneObject("square", "red", "large", "plain", 28, 30, r),
            SceneObject("circle", "blue", "large", "plain", 36, 34, r))
    s = syn.Scene(64, objs)
    arr = np.asarray(s.render())
    m0, m1 = s.masks
    assert not (m0 & m1).any()
    assert (arr[m1] == COLOURS["blue"]).all() and (arr[m0] == COLOURS["red"]).all()
    assert m1.sum() > m0.sum() / 2 and (arr[30, 37] == COLOURS["blue"]).all()


def test_relations_and_counts_agree_with_geometry(scenes):
    for s in scenes[:1000]:
        centres = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in s.boxes]
        for i, rel, j in s.relations:
            dx = centres[i][0] - centres[j][0]
            dy = centres[i][1] - centres[j][1]
            expected = ("left of" if dx < 0 else "right of") if abs(dx) >= abs(dy) else ("above" if dy < 0 else "below")
            assert rel == expected
        counts = {}
        for o in s.attributes["objects"]:
            counts[o["shape"]] = counts.get(o["shape"], 0) + 1
        assert counts == s.counts and sum(s.counts.values()) == len(s.objects)


def test_brightness_is_a_global_pixel_map():
    s = next(WORLD.sample(i) for i in range(50) if WORLD.sample(i).clutter)
    variants = syn.brightness_variants(s)
    normal = np.asarray(variants["normal"].render()).astype(int)
    for level, v in variants.items():
        arr = np.asarray(v.render()).astype(int)
        p = VOCABULARY["brightness"][level]
        assert np.abs(arr - np.clip(np.round(p["scale"] * normal + p["offset"]), 0, 255)).max() <= 0
        assert (v.masks == s.masks).all()


def test_rendered_word_and_larger_images():
    w = SceneWorld(image_size=128, seed=3, word_prob=1.0, clutter_prob=0.0)
    for i in range(20):
        s = w.sample(i)
        assert s.word in VOCABULARY["words"]
        x0, y0, x1, y1 = s.word_box
        assert 0 < x0 < x1 < 128 and 0 < y0 < y1 < 128
        patch = np.asarray(s.render()).astype(int)[y0:y1, x0:x1]
        blank = np.asarray(s.replace(word=None).render()).astype(int)[y0:y1, x0:x1]
        assert (patch != blank).any(axis=-1).mean() > 0.1  # glyph ink inside the word box
        for o in s.objects:  # objects keep clear of the word
            bx = o.box
            assert bx[2] <= x0 or bx[0] >= x1 or bx[3] <= y0 or bx[1] >= y1
        assert parse_caption(s.short_caption)["word"] == s.word


# ------------------------------------------------------------------ tasks


def test_zero_shot_tasks():
    for kind, n_classes in (("colour", 8), ("shape", len(SHAPES)), ("colour_shape", 8 * len(SHAPES))):
        t = zero_shot_task(kind, n_per_class=2 if kind == "colour_shape" else 3, seed=1)
        assert len(t.classnames) == len(set(t.classnames)) == n_classes == len(t.prompts)
        assert len(t.images) == len(t.labels) == len(t.scenes)
        for scene, label in zip(t.scenes, t.labels):
            (o,) = scene.objects
            name = t.classnames[label]
            assert name == {"colour": o.colour, "shape": o.shape, "colour_shape": f"{o.colour} {o.shape}"}[kind]
        for prompts in t.prompts:
            for p in prompts:
                parse_short_caption(p)
    a = zero_shot_task("shape", 2, seed=5)
    b = zero_shot_task("shape", 2, seed=5)
    assert [png_bytes(x) for x in a.images] == [png_bytes(x) for x in b.images]


def test_winoground_pairs():
    pairs = winoground_pairs(40, seed=2)
    assert {p.kind for p in pairs} == {"colour", "size", "texture", "relation"}
    for p in pairs:
        assert p.caption0 != p.caption1
        assert bag(p.caption0) == bag(p.caption1)
        assert p.caption0 == p.scene0.short_caption and p.caption1 == p.scene1.short_caption
        assert png_bytes(p.image0) != png_bytes(p.image1)
        a0, b0 = p.scene0.objects
        a1, b1 = p.scene1.objects
        if p.kind == "relation":
            assert (a1.shape, b1.shape) == (b0.shape, a0.shape)
            assert (a1.x, a1.y, b1.x, b1.y) == (a0.x, a0.y, b0.x, b0.y)
        else:
            assert (getattr(a1, p.kind), getattr(b1, p.kind)) == (getattr(b0, p.kind), getattr(a0, p.kind))
            assert (a1.shape, b1.shape, a1.x, b1.x) == (a0.shape, b0.shape, a0.x, b0.x)
    assert [p.caption0 for p in winoground_pairs(8, seed=2)] == [p.caption0 for p in pairs[:8]]


def test_cir_triplets():
    trips = cir_triplets(40, seed=4)
    assert {t.change["op"] for t in trips} == {"recolour", "resize", "remove", "add"}
    for t in trips:
        ch = parse_modification(t.modification)
        assert ch == t.change
        ref, tgt = t.reference_scene, t.target_scene
        assert ref.replace(objects=()) == tgt.replace(objects=())  # scene-level attributes unchanged
        ro, to = list(ref.objects), list(tgt.objects)
        if ch["op"] == "add":
            assert to[:-1] == ro and ch["shape"] not in {o.shape for o in ro}
            new = to[-1]
            assert (new.shape, new.colour, new.size, new.texture) == (ch["shape"], ch["colour"], ch["size"], ch["texture"])
        elif ch["op"] == "remove":
            k = [o.shape for o in ro].index(ch["shape"])
            assert to == ro[:k] + ro[k + 1:]
        else:
            k = [o.shape for o in ro].index(ch["shape"])
            attr = "colour" if ch["op"] == "recolour" else "size"
            assert getattr(ro[k], attr) != ch[attr] and getattr(to[k], attr) == ch[attr]
            assert to[:k] + to[k + 1:] == ro[:k] + ro[k + 1:]
            assert (to[k].shape, to[k].x, to[k].y) == (ro[k].shape, ro[k].x, ro[k].y)
        assert png_bytes(t.reference_image) != png_bytes(t.target_image)


def test_few_shot_split():
    sp = few_shot_split(k=2, n_test=1, seed=3)
    base, new = set(sp.base_classes), set(sp.new_classes)
    assert base and new and not base & new
    assert len(base | new) == 8 * len(SHAPES)
    for part in (base, new):
        assert {c.split()[0] for c in part} == set(COLOURS)
        assert {c.split()[1] for c in part} == set(SHAPES)
    assert len(sp.train) == 2 * len(base) and len(sp.test_new) == len(new)
    for ex_list, classes in ((sp.train, sp.base_classes), (sp.test_base, sp.base_classes),
                             (sp.train_new, sp.new_classes), (sp.test_new, sp.new_classes)):
        for ex in ex_list:
            (o,) = ex.scene.objects
            assert classes[ex.label] == ex.classname == f"{o.colour} {o.shape}"
    train_imgs = {png_bytes(e.image) for e in sp.train}
    assert not train_imgs & {png_bytes(e.image) for e in sp.test_base}
    assert few_shot_split(k=2, n_test=1, seed=3).new_classes == sp.new_classes


def test_dataset_view_and_image_folder(tmp_path):
    ds = WORLD.dataset(10, offset=5)
    assert len(ds) == 10
    img, cap = ds[0]
    assert cap == WORLD.sample(5).short_caption and png_bytes(img) == png_bytes(WORLD.sample(5).render())
    assert ds[-1][1] == WORLD.sample(14).short_caption
    assert len(ds[2:5]) == 3 and ds[2:5][0][1] == WORLD.sample(7).short_caption
    assert WORLD.dataset(3, caption="long")[1][1] == WORLD.sample(1).long_caption
    with pytest.raises(IndexError):
        ds[10]
    path = WORLD.write_folder(tmp_path, 6, offset=2)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image", "caption", "long_caption"] and len(rows) == 6
    from PIL import Image

    for k, row in enumerate(rows):
        s = WORLD.sample(2 + k)
        assert row["caption"] == s.short_caption and row["long_caption"] == s.long_caption
        with Image.open(tmp_path / row["image"]) as im:
            assert (np.asarray(im.convert("RGB")) == np.asarray(s.render())).all()


def test_throughput_lower_bound():
    w = SceneWorld(image_size=64, seed=11)
    n = 300
    t0 = time.perf_counter()
    for i in range(n):
        s = w.sample(i)
        s.render()
        s.short_caption
        s.long_caption
    rate = n / (time.perf_counter() - t0)
    assert rate > 150, f"{rate:.0f} scenes/s"


def test_roundtrip_property_over_seeds_and_indices():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=150, deadline=None)
    @given(st.integers(0, 2**31 - 1), st.integers(0, 10**12), st.sampled_from([48, 64, 96]))
    def check(seed, index, size):
        s = SceneWorld(image_size=size, seed=seed).sample(index)
        assert parse_caption(s.short_caption) == short_caption_content(s)
        assert parse_caption(s.long_caption) == long_caption_content(s)
        assert s.masks.sum(0).max() <= 1 and all(m.any() for m in s.masks)

    check()


# ------------------------------------------------------------------ shape variants (minimal groups)


def test_shape_variants_differ_only_in_shapes(scenes):
    def without_shapes(scene):
        return scene.replace(objects=tuple(o.with_attrs(64, shape="circle") for o in scene.objects))

    complete = 0
    for i, scene in enumerate(scenes[:300]):
        group = WORLD.shape_variants(scene, 4, np.random.default_rng(i))
        assert group[0] is scene and 2 <= len(group) <= 4
        complete += len(group) == 4
        for v in group:
            assert without_shapes(v) == without_shapes(scene)  # colours, sizes, textures, positions, word, brightness
            assert WORLD.layout_ok(v)
            parsed = parse_short_caption(v.short_caption)
            assert {p["shape"]: p["count"] for p in parsed["objects"]} == v.attributes["counts"]
        for k in range(len(scene.objects)):  # every object has a different shape in every variant
            assert len({v.objects[k].shape for v in group}) == len(group)
    assert complete >= 290  # a layout that no redraw fits is rare
    again = WORLD.shape_variants(scenes[5], 4, np.random.default_rng(5))
    assert again == WORLD.shape_variants(scenes[5], 4, np.random.default_rng(5))
    with pytest.raises(ValueError, match="between 1 and the number of shapes"):
        WORLD.shape_variants(scenes[0], 9, np.random.default_rng(0))


# ------------------------------------------------------------------ attribute replacements (hard-negative captions)


@pytest.mark.parametrize("attribute", SceneWorld.REPLACEABLE)
def test_replace_attribute_swaps_one_present_value_for_an_absent_one(scenes, attribute):
    def other_attributes(scene):
        return [(o.x, o.y) + tuple(getattr(o, a) for a in SceneWorld.REPLACEABLE if a != attribute)
                for o in scene.objects]

    made = 0
    for i, scene in enumerate(scenes[:300]):
        foil = WORLD.replace_attribute(scene, attribute, np.random.default_rng(i))
        present = {getattr(o, attribute) for o in scene.objects}
        if foil is None:  # only when every value of the world is already present
            assert len(present) == len(getattr(WORLD, attribute + "s"))
            continue
        made += 1
        assert other_attributes(foil) == other_attributes(scene)  # positions and the other attributes stay
        changed = {(getattr(a, attribute), getattr(b, attribute))
                   for a, b in zip(scene.objects, foil.objects) if getattr(a, attribute) != getattr(b, attribute)}
        assert len(changed) == 1  # one value ...
        (old, new), = changed
        assert new not in present  # ... replaced by one no object had, so the foil is false of the image
        assert all(getattr(b, attribute) == new for a, b in zip(scene.objects, foil.objects)
                   if getattr(a, attribute) == old)  # in every object that had it
    assert made >= 150
    assert WORLD.replace_attribute(scenes[3], attribute, np.random.default_rng(3)) == \
        WORLD.replace_attribute(scenes[3], attribute, np.random.default_rng(3))
    for scene in scenes[:50]:  # all of them: each present value times each absent one, no two alike
        present = {getattr(o, attribute) for o in scene.objects}
        options = WORLD.attribute_replacements(scene, attribute)
        assert len(options) == len(present) * (len(getattr(WORLD, attribute + "s")) - len(present))
        assert len(set(options)) == len(options) and scene not in options


def test_replace_attribute_respects_excluded_pairs_and_reports_impossible():
    world = SceneWorld(image_size=64, seed=0, shapes=("circle", "square"), colours=("red", "blue"),
                       exclude_combos=[("red", "square")])
    red_circle = world.compose([{"shape": "circle", "colour": "red"}], np.random.default_rng(0))
    assert world.replace_attribute(red_circle, "shape", np.random.default_rng(0)) is None  # red square is excluded
    assert world.attribute_replacements(red_circle, "shape") == []
    blue = world.replace_attribute(red_circle, "colour", np.random.default_rng(0))
    assert [(o.colour, o.shape) for o in blue.objects] == [("blue", "circle")]
    with pytest.raises(ValueError, match="attribute must be one of"):
        world.replace_attribute(red_circle, "position", np.random.default_rng(0))
