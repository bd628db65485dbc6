"""Scene-text data: determinism, exact word boxes and masks, clean vs cluttered variants, the font fallback."""

from __future__ import annotations

import numpy as np
import pytest

from cliplab.scenetext import dataset as ds


def test_scenes_are_pure_functions_of_seed_and_index():
    a, b = ds.SceneTextWorld(seed=3).sample(5), ds.SceneTextWorld(seed=3).sample(5)
    assert a.words == b.words and a.boxes == b.boxes
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert ds.SceneTextWorld(seed=4).sample(5).boxes != a.boxes


@pytest.mark.parametrize("cluttered", [False, True])
def test_boxes_are_tight_disjoint_and_hold_the_mask(cluttered):
    world = ds.SceneTextWorld(seed=0, words_per_scene=(2, 3), cluttered=cluttered)
    for i in range(12):
        scene = world.sample(i)
        assert 2 <= len(scene.words) <= 3 and set(scene.words) <= set(ds.DICTIONARY)
        inside = np.zeros_like(scene.text_mask)
        for k, (x0, y0, x1, y1) in enumerate(scene.boxes):
            box = scene.text_mask[y0:y1, x0:x1]
            # tight: ink touches all four sides of the box
            assert box[0].any() and box[-1].any() and box[:, 0].any() and box[:, -1].any()
            inside[y0:y1, x0:x1] = True
            for (u0, v0, u1, v1) in scene.boxes[k + 1:]:
                assert u1 <= x0 or x1 <= u0 or v1 <= y0 or y1 <= v0  # disjoint
        assert not (scene.text_mask & ~inside).any()  # stray letters are not in the text mask


def test_forced_words_and_the_clean_patch():
    scene = ds.SceneTextWorld(seed=1).sample(0, words=["cat", "cut"])
    assert scene.words == ("cat", "cut")
    arr = np.asarray(scene.image)[..., 0]
    ink = arr[scene.text_mask]
    assert len(set(ink.tolist())) == 1 or set(ink.tolist()) <= {15, 240}  # ink is one of the two shades


def test_cluttered_variant_adds_distractors():
    clean, busy = ds.SceneTextWorld(seed=2).sample(4), ds.SceneTextWorld(seed=2, cluttered=True).sample(4)
    assert busy.cluttered and not clean.cluttered
    # the cluttered image has ink outside the words and the objects: more distinct grey levels off the words
    off = ~busy.text_mask
    assert len(np.unique(np.asarray(busy.image)[off].reshape(-1, 3), axis=0)) > \
        len(np.unique(np.asarray(clean.image)[~clean.text_mask].reshape(-1, 3), axis=0))


def test_word_image_and_glyph_mask():
    a, b = ds.word_image("fish", 3), ds.word_image("fish", 3)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and a.size == (64, 64)
    assert not np.array_equal(np.asarray(a), np.asarray(ds.word_image("fish", 4)))
    m = ds.glyph_mask("the", 12)
    assert m[0].any() and m[-1].any() and m[:, 0].any() and m[:, -1].any()
    with pytest.raises(ValueError, match="does not fit"):
        ds.word_image("thethethethe", 0, image_size=32, font_sizes=(13,))


def test_bitmap_fallback_is_stated(monkeypatch):
    monkeypatch.setattr(ds, "FONT_DIR", ds.Path("/nonexistent-fonts"))
    ds.load_font.cache_clear()
    try:
        assert ds.available_fonts() == () and "bitmap" in ds.font_note()
        with pytest.warns(UserWarning, match="bitmap"):
            font = ds.load_font(12)
        assert font.getbbox("cat")[2] > 0
    finally:
        ds.load_font.cache_clear()
