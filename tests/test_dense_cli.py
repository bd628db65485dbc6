"""``cliplab dense train|eval|regions``: each method's CLI run equals the Python API's for the same settings (bit-exact
weights, the same held-out metric), eval reads back what train wrote, region scores equal the Prompter's, and usage
errors are one line with exit 2. Tiny runs: 1 step on 4 scenes, 2 held-out scenes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import cliplab
from cliplab.cli import main
from cliplab.data.synthetic import SceneWorld

STEPS, SCENES, SEED, EVAL = 1, 4, 5, 2


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_usage_error(r):
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Each method trained once through the CLI: ``{method: (directory, summary)}``."""
    out = {}
    for method, extra in (("denseclip", ["--by", "colour"]), ("maft_plus", []), ("cloc", [])):
        d = tmp_path_factory.mktemp(method) / "run"
        r = run("dense", "train", method, "-o", d, "--steps", STEPS, "--scenes", SCENES, "--seed", SEED,
                "--eval-scenes", EVAL, "--no-progress", "--json", *extra)
        assert r.exit_code == 0, r.output
        out[method] = (d, json.loads(r.stdout))
    return out


def _same_state(a: dict, b: dict, lr: float):
    """Equal up to CPU round-off: two identical API runs in one process differ by up to ~1e-5 after 2 steps (matmul
    rounding that Adam's normalised first steps amplify up to the step size ``lr``). A wrong step count, seed or
    config moves the weights by far more (an init draw, or many steps)."""
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=lr, msg=k)


def _eval_json(method, directory):
    r = run("dense", "eval", method, directory, "--scenes", EVAL, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)["metric"]


def test_denseclip_matches_the_api_and_round_trips(trained):
    from cliplab.dense import SyntheticSegmentation
    from cliplab.dense.denseclip import DenseCLIPSegmenter, encode_segmentation, evaluate_segmenter, fit_denseclip

    d, summary = trained["denseclip"]
    assert (summary["steps"], summary["scenes"], summary["seed"], summary["by"]) == (STEPS, SCENES, SEED, "colour")
    api = fit_denseclip(cliplab.load("shapes-tiny"), SyntheticSegmentation(n=SCENES, offset=0, by="colour"),
                        steps=STEPS, seed=SEED)
    back = DenseCLIPSegmenter.load(d)
    assert back.classes == api.classes
    _same_state(back.own_state(), api.own_state(), lr=1e-3)
    # eval reads back what train scored, and both equal the module's evaluator on the API's model
    metric = _eval_json("denseclip", d)
    assert metric == summary["metric"]
    test = encode_segmentation(back.clip, SyntheticSegmentation(n=EVAL, offset=100_000, by="colour"))
    assert metric["miou"] == evaluate_segmenter(back, test)["miou"]
    assert metric["score_map_miou"] == evaluate_segmenter(back, test, use="score")["miou"]


def test_maft_plus_matches_the_api_and_round_trips(trained):
    from cliplab.dense.maft_plus import MaftConfig, MaftPlus, evaluate_open_vocab, train_maft_plus

    d, summary = trained["maft_plus"]
    cfg = MaftConfig(steps=STEPS, pool_scenes=SCENES, seed=SEED)
    assert summary["config"] == {**vars(cfg), "seen": list(cfg.seen)}
    api = train_maft_plus(cliplab.load("shapes-tiny"), cfg)
    back = MaftPlus.load(d)
    _same_state(back.cdt.state_dict(), api.cdt.state_dict(), cfg.lr)
    _same_state(back.model.state_dict(), api.model.state_dict(), cfg.lr)
    assert not torch.equal(back.model.visual.ln_post.weight, cliplab.load("shapes-tiny").visual.ln_post.weight)
    metric = _eval_json("maft_plus", d)
    assert metric == summary["metric"]
    ref = evaluate_open_vocab(back, cfg.seen, n=EVAL)
    assert (metric["unseen_miou"], metric["seen_miou"]) == (ref["unseen_miou"], ref["seen_miou"])


def test_cloc_matches_the_api_and_round_trips(trained):
    from cliplab.dense.cloc import ClocConfig, ClocModel, cloc_embedder, region_retrieval, train_cloc

    d, summary = trained["cloc"]
    cfg = ClocConfig(steps=STEPS, pool_scenes=SCENES, batch_size=SCENES, seed=SEED)  # a batch is at most the pool
    assert summary["config"] == vars(cfg)
    api = train_cloc(cliplab.load("shapes-tiny"), cfg)
    back = ClocModel.load(d)
    _same_state(back.prompter.state_dict(), api.prompter.state_dict(), cfg.lr)
    _same_state(back.model.state_dict(), api.model.state_dict(), cfg.lr)
    metric = _eval_json("cloc", d)
    assert metric == summary["metric"]
    scenes = [SceneWorld(64, seed=1).sample(i) for i in range(EVAL)]
    ref = region_retrieval(scenes, cloc_embedder(back), back.model.encode_texts)
    assert (metric["pool"], metric["within_scene"]) == (ref["pool"], ref["within_scene"])


def _api_scores(cloc, image, boxes, texts):
    with torch.no_grad():
        emb = cloc.region_embeddings(cloc.model.preprocess(image)[None], torch.tensor([boxes], dtype=torch.float32),
                                     normalize=True)[0]
        return emb @ F.normalize(cloc.model.encode_texts(texts), dim=-1).T


@pytest.mark.parametrize("with_checkpoint", [True, False], ids=["trained", "untrained"])
def test_regions_scores_equal_the_prompter(trained, tmp_path, with_checkpoint):
    from cliplab.dense.cloc import ClocModel, object_regions

    scene = SceneWorld(64, seed=1).sample(3)
    image = tmp_path / "scene.png"
    scene.image.save(image)
    boxes = [list(b) for b, _ in object_regions(scene)] + [[0, 0, 64, 64]]
    texts = sorted({p for _, p in object_regions(scene)}) + ["a blue star"]
    args = ["dense", "regions", image, "--boxes", ";".join(",".join(str(v) for v in b) for b in boxes),
            "--texts", ",".join(texts), "--json"]
    d = trained["cloc"][0]
    r = run(*args, *(["--checkpoint", d] if with_checkpoint else []))
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    cloc = ClocModel.load(d) if with_checkpoint else ClocModel(cliplab.load("shapes-tiny"))
    ref = _api_scores(cloc, scene.image, boxes, texts).numpy()
    assert [g["box"] for g in got["regions"]] == boxes
    scores = np.array([[g["scores"][t] for t in texts] for g in got["regions"]])
    np.testing.assert_allclose(scores, ref, rtol=0, atol=1e-6)
    assert [g["best"] for g in got["regions"]] == [texts[i] for i in ref.argmax(1)]
    assert got["prompter"].startswith("trained" if with_checkpoint else "untrained")
    if not with_checkpoint:
        assert "untrained" in r.stderr


def test_regions_boxes_follow_the_image_to_the_model_input(trained, tmp_path):
    """A 128x96 image is resized (no crop) to the 64x64 input, and its boxes with it: x by 1/2, y by 2/3."""
    from cliplab.dense.cloc import ClocModel
    from cliplab.dense.segment import prepare_images

    big = SceneWorld(64, seed=1).sample(3).image.resize((128, 96))
    path = tmp_path / "big.png"
    big.save(path)
    d = trained["cloc"][0]
    r = run("dense", "regions", path, "--boxes", "16,12,80,60;0,0,128,96", "--texts", "a circle,a red square",
            "--checkpoint", d, "--json")
    assert r.exit_code == 0, r.output
    got = np.array([[g["scores"][t] for t in ("a circle", "a red square")] for g in json.loads(r.stdout)["regions"]])
    cloc = ClocModel.load(d)
    pixels, _ = prepare_images(cloc.model, [big])
    with torch.no_grad():
        emb = cloc.region_embeddings(pixels, torch.tensor([[[8, 8, 40, 40], [0, 0, 64, 64]]], dtype=torch.float32),
                                     normalize=True)[0]
        ref = (emb @ F.normalize(cloc.model.encode_texts(["a circle", "a red square"]), dim=-1).T).numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("boxes, says", [("1,2,3", "four numbers"), ("a,b,c,d", "four numbers"),
                                        ("10,10,10,20", "empty"), ("20,5,10,30", "empty"),
                                        ("0,0,65,64", "outside the 64x64"), ("-1,0,10,10", "outside"),
                                        ("0,0,10,10;;", None), (";", "one or more boxes")])
def test_regions_bad_boxes_are_one_line(tmp_path, boxes, says):
    image = tmp_path / "scene.png"
    SceneWorld(64, seed=1).sample(0).image.save(image)
    r = run("dense", "regions", image, "--boxes", boxes, "--texts", "a circle", "--json")
    if says is None:  # a trailing ';' is not a box
        assert r.exit_code == 0, r.output
        return
    assert says in one_line_usage_error(r)


def test_usage_errors_are_one_line(trained, tmp_path):
    d = trained["cloc"][0]
    assert "--by does not apply to cloc" in one_line_usage_error(run("dense", "train", "cloc", "-o", tmp_path / "x",
                                                                     "--by", "shape"))
    assert "--by does not apply to maft_plus" in one_line_usage_error(
        run("dense", "train", "maft_plus", "-o", tmp_path / "x", "--by", "colour"))
    assert "not empty" in one_line_usage_error(run("dense", "train", "cloc", "-o", d, "--steps", 1))
    assert "holds a cloc model" in one_line_usage_error(run("dense", "eval", "denseclip", d))
    assert "not a saved MAFT+" in one_line_usage_error(run("dense", "eval", "maft_plus", tmp_path))
    image = tmp_path / "s.png"
    SceneWorld(64, seed=1).sample(0).image.save(image)
    assert "without --checkpoint" in one_line_usage_error(
        run("dense", "regions", image, "--boxes", "0,0,8,8", "--texts", "a", "--checkpoint", d, "-m", "shapes-tiny"))
    assert "one or more texts" in one_line_usage_error(
        run("dense", "regions", image, "--boxes", "0,0,8,8", "--texts", " , "))
    assert "steps" in one_line_usage_error(run("dense", "train", "cloc", "-o", tmp_path / "y", "--steps", 0))
