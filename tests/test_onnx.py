"""ONNX export and the ONNX Runtime backend: parity with the PyTorch model, dynamic shapes, int8, errors, CLI.

Two exports carry the whole file (the exporter costs seconds per tower): perturbed test-tiny weights through the
API, and the shipped shapes-tiny model through the CLI.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import warnings

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

from click.testing import CliRunner
from conftest import CAPTIONS, randomize_

import cliplab
from cliplab.cli import main
from cliplab.data.synthetic import SceneWorld
from cliplab.export import (
    MANIFEST_FILE,
    MissingDependencyError,
    OnnxCLIP,
    OnnxExportError,
    check_parity,
    export_onnx,
    load_onnx,
    quantize_onnx,
)

TOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """test-tiny with every parameter perturbed, exported once (with int8 graphs) from train mode."""
    model = randomize_(cliplab.create_model("test-tiny", seed=0), seed=1)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    directory = export_onnx(model, tmp_path_factory.mktemp("onnx") / "tiny", quantize="int8")
    after_modes = [m.training for m in model.modules()]
    model.eval()
    return {"model": model, "dir": directory, "before": before, "after_modes": after_modes,
            "onnx": load_onnx(directory, threads=1)}


def test_export_leaves_the_model_unchanged(tiny):
    assert all(tiny["after_modes"])  # train mode everywhere, as before the export
    for k, v in tiny["model"].state_dict().items():
        assert torch.equal(v, tiny["before"][k]), k


def test_export_directory_and_manifest(tiny):
    d = tiny["dir"]
    assert {p.name for p in d.iterdir()} == {"image.onnx", "text.onnx", "image.int8.onnx", "text.int8.onnx",
                                             "cliplab.json", MANIFEST_FILE}
    manifest = json.loads((d / MANIFEST_FILE).read_text())
    assert manifest["opset"] >= 17 and manifest["quantized"] and manifest["versions"]["torch"] == torch.__version__
    assert manifest["towers"]["text"]["inputs"] == [{"name": "input_ids", "shape": ["batch", "length"],
                                                     "dtype": "int64"}]
    assert manifest["towers"]["image"]["outputs"] == [{"name": "image_features", "shape": ["batch", 64],
                                                       "dtype": "float32"}]
    # cliplab.json is the model's own config: tokenizer and preprocessing come back from it
    assert tiny["onnx"].config.to_dict() == tiny["model"].config.to_dict()


@pytest.mark.parametrize("batch", [1, 5])
def test_image_parity_at_any_batch_size(tiny, batch):
    pixels = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        ref = tiny["model"].encode_image(pixels)
    out = tiny["onnx"].encode_image(pixels)
    assert out.shape == (batch, 64) and out.dtype == torch.float32
    assert (out - ref).abs().max() < TOL


@pytest.mark.parametrize("rows", [slice(0, 1), slice(0, 5)])
def test_text_parity_on_captions_of_different_lengths(tiny, rows):
    with pytest.warns(UserWarning, match="truncat"):  # CAPTIONS holds one caption longer than 77 tokens
        batch = tiny["model"].tokenize(CAPTIONS)
    ids = batch.ids[rows]
    with torch.no_grad():
        ref = tiny["model"].encode_text(ids)
    assert (tiny["onnx"].encode_text(ids) - ref).abs().max() < TOL


def test_graph_is_exact_for_any_padding_and_the_cut_changes_nothing(tiny):
    """The backend cuts each batch to its longest EOT; the graph itself must pool the same on the full 77."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = tiny["model"].tokenize(CAPTIONS)
    with torch.no_grad():
        ref = tiny["model"].encode_text(batch)
    session = tiny["onnx"].session("text")
    padded = torch.from_numpy(session.run(None, {"input_ids": batch.ids.numpy()})[0])
    short = batch.ids[[0, 6]]  # "a dog", "x": cut to 4 tokens by the backend
    assert (padded - ref).abs().max() < TOL
    assert (tiny["onnx"].encode_text(batch) - ref).abs().max() < TOL
    assert torch.allclose(tiny["onnx"].encode_text(short), padded[[0, 6]], atol=1e-5, rtol=0)


def test_encode_texts_restores_input_order(tiny):
    texts = [c for c in CAPTIONS if len(c) < 200] * 2
    texts = texts[::-1] + ["a red circle"]
    with torch.no_grad():
        ref = tiny["model"].encode_texts(texts, normalize=True)
    out = tiny["onnx"].encode_texts(texts, batch_size=3, normalize=True)
    assert (out - ref).abs().max() < TOL
    one = tiny["onnx"].encode_text(tiny["onnx"].tokenize(texts[4]), normalize=True)
    assert (out[4] - one[0]).abs().max() < 1e-5
    assert tiny["onnx"].encode_texts([]).shape == (0, 64)


def test_encode_images_and_the_front_ends_match(tiny):
    images = [s.render() for s in (SceneWorld(image_size=48, seed=3).sample(i) for i in range(3))]
    model, onnx_model = tiny["model"], tiny["onnx"]
    with torch.no_grad():
        ref = model.encode_images(images, batch_size=2, normalize=True)
    assert (onnx_model.encode_images(images, batch_size=2, normalize=True) - ref).abs().max() < TOL
    assert torch.equal(onnx_model.preprocess(images[0]), model.preprocess(images[0]))
    assert torch.equal(onnx_model.tokenize(["a dog"]).ids, model.tokenize(["a dog"]).ids)
    assert onnx_model.temperature == pytest.approx(model.temperature)
    logits, _ = onnx_model(model.preprocessor.batch(images), model.tokenize(["a dog", "a cat"]))
    with torch.no_grad():
        ref_logits, _ = model(model.preprocessor.batch(images), model.tokenize(["a dog", "a cat"]))
    assert (logits - ref_logits).abs().max() < 1e-3


def test_quick_gelu_exports_too(tmp_path):
    """test-tiny uses GELU; OpenAI's checkpoints use QuickGELU (exported as plain ops). One tower is enough."""
    cfg = cliplab.get_config("test-tiny")
    model = randomize_(cliplab.create_model(cfg.replace(vision=dataclasses.replace(cfg.vision, act="quick_gelu"))))
    onnx_model = load_onnx(export_onnx(model.eval(), tmp_path, towers="image"))
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (onnx_model.encode_image(pixels) - model.encode_image(pixels)).abs().max() < TOL
    assert onnx_model.towers == ("image",)


def test_int8_graphs_stay_close_in_cosine(tiny):
    report = check_parity(tiny["model"], load_onnx(tiny["dir"], quantized=True, threads=1), n=16)
    # measured on this export (min over 16 inputs): image 0.99973, text 0.99875
    assert report["image"]["min_cosine"] >= 0.999, report
    assert report["text"]["min_cosine"] >= 0.995, report
    fp32 = check_parity(tiny["model"], tiny["onnx"], n=16)
    assert fp32["image"]["max_abs_diff"] < TOL and fp32["text"]["max_abs_diff"] < TOL


def test_clear_errors_for_missing_directories_files_and_towers(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="no ONNX export directory"):
        load_onnx(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=MANIFEST_FILE):
        load_onnx(tmp_path)

    text_only = tmp_path / "text-only"
    shutil.copytree(tiny["dir"], text_only)
    manifest = json.loads((text_only / MANIFEST_FILE).read_text())
    del manifest["towers"]["image"]
    manifest["quantized"] = False
    (text_only / MANIFEST_FILE).write_text(json.dumps(manifest))
    model = load_onnx(text_only)
    assert model.towers == ("text",) and model.encode_texts(["a dog"]).shape == (1, 64)
    with pytest.raises(OnnxExportError, match="image tower was not exported"):
        model.encode_image(torch.zeros(1, 3, 32, 32))
    with pytest.raises(FileNotFoundError, match="quantize_onnx"):
        load_onnx(text_only, quantized=True)
    with pytest.raises(OnnxExportError, match="not exported"):
        quantize_onnx(text_only, towers=["image"])
    for wrong in (torch.zeros(1, 3, 64, 64), torch.zeros(3, 32, 32)):
        with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
            tiny["onnx"].encode_image(wrong)
    with pytest.raises(ValueError, match="context length"):
        model.encode_text(torch.ones(1, 78, dtype=torch.long))

    (text_only / "text.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="text.onnx"):
        load_onnx(text_only)
    with pytest.raises(ValueError, match="towers"):
        export_onnx(tiny["model"], tmp_path / "x", towers=("audio",))


def test_missing_onnxruntime_says_how_to_install(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install \"cliplab\[onnx\]\""):
        OnnxCLIP.load(tiny["dir"])
    r = CliRunner().invoke(main, ["export-onnx", "test-tiny", str(tiny["dir"].parent / "never")])
    assert r.exit_code == 1 and "cliplab[onnx]" in r.output and "Traceback" not in r.output


@pytest.mark.slow
def test_cli_exports_the_shipped_model_with_parity(tmp_path):
    out = tmp_path / "shapes"
    r = CliRunner().invoke(main, ["export-onnx", "shapes-tiny", str(out), "--int8", "--check", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    for tower in ("image", "text"):
        assert data["parity"]["fp32"][tower]["max_abs_diff"] < TOL
        assert data["parity"]["int8"][tower]["min_cosine"] >= 0.998  # measured: image 0.99988, text 0.99928
    assert json.loads((out / MANIFEST_FILE).read_text())["source"]["kind"] == "pretrained"

    # the shipped model on its own kind of input: rendered scenes and their captions
    model, onnx_model = cliplab.load("shapes-tiny"), load_onnx(out)
    scenes = [SceneWorld(image_size=64, seed=7).sample(i) for i in range(6)]
    with torch.no_grad():
        img = model.encode_images([s.render() for s in scenes])
        txt = model.encode_texts([s.short_caption for s in scenes])
    assert (onnx_model.encode_images([s.render() for s in scenes]) - img).abs().max() < TOL
    assert (onnx_model.encode_texts([s.short_caption for s in scenes]) - txt).abs().max() < TOL
