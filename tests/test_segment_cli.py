"""``cliplab segment`` and ``cliplab eval segmentation``: the files and numbers are the Python API's, errors are one
line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import cliplab
from cliplab.cli import main
from cliplab.data.synthetic import SceneWorld
from cliplab.dense import SyntheticSegmentation, evaluate_segmentation, segment

LABELS = ["circle", "square", "star"]


@pytest.fixture(scope="module")
def model():
    return cliplab.load("shapes-tiny").eval()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("seg")
    world = SceneWorld(image_size=64, seed=1)
    world.sample(0).image.save(d / "a.png")
    world.sample(1).image.resize((96, 64)).save(d / "b.png")
    (d / "broken.png").write_bytes(b"not an image")
    return d


def _run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_segment_writes_the_apis_masks_and_overlays(images, tmp_path, model):
    r = _run("segment", str(images / "a.png"), str(images / "b.png"), "--labels", ",".join(LABELS),
             "--method", "sclip", "-o", str(tmp_path), "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["labels"] == ["background", *LABELS] and data["method"] == "sclip" and not data["errors"]
    api = segment(model, [Image.open(images / "a.png"), Image.open(images / "b.png")], LABELS, method="sclip")
    for row, mask, areas in zip(data["results"], api.masks, api.areas()):
        saved = np.asarray(Image.open(row["mask"]))
        assert saved.shape == tuple(mask.shape) and np.array_equal(saved, mask.numpy())
        assert row["areas"] == pytest.approx(areas) and sum(row["areas"].values()) == pytest.approx(1)
        overlay = Image.open(row["overlay"])
        assert overlay.mode == "RGB" and overlay.height >= 256 and overlay.width > overlay.height  # + legend
    assert data["results"][1]["size"] == [96, 64]


def test_segment_reports_unreadable_images_and_goes_on(images, tmp_path):
    r = CliRunner().invoke(main, ["segment", str(images / "a.png"), str(images / "broken.png"), "--labels", "ring",
                                  "-o", str(tmp_path)])
    assert r.exit_code == 1
    assert "broken.png" in r.output and "1 of 2 image(s) could not be read" in r.output
    assert (tmp_path / "a.mask.png").is_file() and (tmp_path / "a.overlay.png").is_file()


@pytest.mark.parametrize("args, message", [
    (["--labels", "a,,A"], "labels must be distinct"),
    (["--labels", " , "], "give one or more labels"),
    (["--labels", "a", "--background", "threshold"], "--threshold goes with --background threshold"),
    (["--labels", "a", "--method", "gradcam"], "Invalid value for '--method'"),
])
def test_segment_bad_input_is_one_line(images, tmp_path, args, message):
    r = CliRunner().invoke(main, ["segment", str(images / "a.png"), "-o", str(tmp_path), *args])
    assert r.exit_code == 2 and message in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_segment_with_no_readable_image_fails_before_loading_a_model(images, tmp_path):
    r = CliRunner().invoke(main, ["segment", str(images / "broken.png"), "--labels", "a", "-o", str(tmp_path)])
    assert r.exit_code == 2 and r.output.startswith("error: no readable image (") and "broken.png" in r.output
    assert not any(tmp_path.iterdir())


def test_eval_segmentation_gives_the_apis_numbers(model, tmp_path):
    r = _run("eval", "segmentation", "--synthetic", "4", "--by", "colour", "--method", "maskclip", "--json",
             "-o", str(tmp_path))
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    data = SyntheticSegmentation(SceneWorld(image_size=64, seed=1), n=4, by="colour")
    api = evaluate_segmentation(model, data, method="maskclip")
    for key in ("miou", "miou_foreground", "pixel_acc"):
        assert got[key] == pytest.approx(api[key], abs=1e-12)
    assert got["dataset"] == {"synthetic": 4, "by": "colour", "seed": 1}
    assert json.loads((tmp_path / "results.json").read_text())["miou"] == got["miou"]


def test_eval_segmentation_on_a_folder_and_its_errors(model, tmp_path):
    data = SyntheticSegmentation(SceneWorld(image_size=64, seed=4), n=2, by="shape")
    for i in range(2):
        data[i].image.save(tmp_path / f"s{i}.png")
        Image.fromarray(data[i].label.astype(np.uint8)).save(tmp_path / f"s{i}.mask.png")
    (tmp_path / "classes.txt").write_text("\n".join(data.classes) + "\n")
    r = _run("eval", "segmentation", "--folder", str(tmp_path), "--method", "naive", "--json")
    assert r.exit_code == 0, r.output
    with torch.no_grad():
        api = evaluate_segmentation(model, data, method="naive")
    assert json.loads(r.output)["pixel_acc"] == pytest.approx(api["pixel_acc"], abs=1e-12)
    r = CliRunner().invoke(main, ["eval", "segmentation", "--folder", str(tmp_path), "--synthetic", "3"])
    assert r.exit_code == 2 and "choose one dataset" in r.output
    (tmp_path / "classes.txt").unlink()
    r = CliRunner().invoke(main, ["eval", "segmentation", "--folder", str(tmp_path)])
    assert r.exit_code == 2 and "no classes.txt" in r.output and len(r.output.strip().splitlines()) == 1


@pytest.mark.parametrize("method", ["read_sasp", "excel"])
def test_segment_with_a_seed_paper_segmenter_writes_its_apis_masks(images, tmp_path, model, method):
    """``--method read_sasp`` (the shipped point segmenter prompted by SasP points) and ``--method excel`` (pseudo
    masks, every label taken as present) write exactly what their Python adapters return, at each image's size."""
    from cliplab.dense.excel import excel_segmentation
    from cliplab.dense.read_sasp import sasp_segmentation

    r = _run("segment", str(images / "a.png"), str(images / "b.png"), "--labels", ",".join(LABELS),
             "--method", method, "-o", str(tmp_path), "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["method"] == method and data["background"] == "threshold"
    adapter = sasp_segmentation if method == "read_sasp" else excel_segmentation
    api = adapter(model, [Image.open(images / "a.png"), Image.open(images / "b.png")], LABELS)
    assert data["threshold"] == api.threshold
    for row, mask in zip(data["results"], api.masks):
        saved = np.asarray(Image.open(row["mask"]))
        assert saved.shape == tuple(mask.shape) and np.array_equal(saved, mask.numpy())
    assert np.asarray(Image.open(data["results"][1]["mask"])).shape == (64, 96)
    r = CliRunner().invoke(main, ["segment", str(images / "a.png"), "--labels", "ring", "--method", method,
                                  "--templates", "single", "-o", str(tmp_path)])
    assert r.exit_code == 2 and "own background rule" in r.output
