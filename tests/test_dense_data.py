"""Segmentation data and metrics (``cliplab.dense``): labels from the renderer's exact masks; mIoU against a
brute-force count."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cliplab.data.synthetic import SceneWorld
from cliplab.dense import FolderSegmentation, SegmentationMeter, SyntheticSegmentation, segmentation_scores
from cliplab.dense.data import IGNORE
from cliplab.dense.metrics import confusion_matrix


def test_synthetic_labels_follow_each_visible_objects_attribute():
    world = SceneWorld(image_size=64, seed=3)
    for by in ("shape", "colour"):
        data = SyntheticSegmentation(world, n=6, by=by)
        for k in range(len(data)):
            sample = data[k]
            scene = world.sample(k)
            assert sample.label.shape == (64, 64) and sample.classes[0] == "background"
            covered = np.zeros((64, 64), bool)
            for obj, mask in zip(scene.objects, scene.masks):
                assert (sample.label[mask] == sample.classes.index(getattr(obj, by))).all()
                covered |= mask
            assert (sample.label[~covered] == 0).all()
            assert len(sample.boxes()) == sum(bool(m.any()) for m in scene.masks)


def test_miou_equals_a_brute_force_count():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 4, (2, 16, 16))
    label[0, :2] = IGNORE
    pred = np.where(rng.random((2, 16, 16)) < 0.7, label % 4, rng.integers(0, 4, (2, 16, 16)))
    pred[label == IGNORE] = 0
    meter = SegmentationMeter(("bg", "a", "b", "c"))
    for p, t in zip(pred, label):
        meter.update(p, t)
    got = meter.result()
    ious = []
    valid = label != IGNORE
    for c in range(4):
        tp = ((pred == c) & (label == c) & valid).sum()
        union = (((pred == c) | (label == c)) & valid).sum()
        ious.append(tp / union)
    assert got["miou"] == pytest.approx(np.mean(ious), abs=1e-12)
    assert got["pixel_acc"] == pytest.approx(((pred == label) & valid).sum() / valid.sum(), abs=1e-12)
    no_bg = segmentation_scores(meter.conf, include_background=False)
    assert no_bg["miou"] == pytest.approx(np.mean(ious[1:]), abs=1e-12)


def test_absent_classes_are_left_out_of_the_mean():
    conf = confusion_matrix(np.array([0, 1, 1]), np.array([0, 1, 0]), 3)  # class 2 never appears
    scores = segmentation_scores(conf, classes=("bg", "x", "y"))
    assert scores["iou"]["y"] is None and scores["miou"] == pytest.approx((0.5 + 0.5) / 2)


def test_folder_pairs_and_clear_errors(tmp_path):
    (tmp_path / "classes.txt").write_text("background\ncat\n")
    Image.new("RGB", (8, 6)).save(tmp_path / "a.png")
    mask = np.zeros((6, 8), np.uint8)
    mask[2:4, 3:5] = 1
    Image.fromarray(mask).save(tmp_path / "a.mask.png")
    data = FolderSegmentation(tmp_path)
    assert len(data) == 1 and data[0].boxes() == [(1, (3, 2, 5, 4))]
    Image.new("RGB", (8, 6)).save(tmp_path / "b.jpg")
    with pytest.raises(ValueError, match="b.mask.png"):
        FolderSegmentation(tmp_path)
    Image.fromarray(np.full((6, 8), 7, np.uint8)).save(tmp_path / "b.mask.png")
    with pytest.raises(ValueError, match="class index 7"):
        FolderSegmentation(tmp_path)[1]
