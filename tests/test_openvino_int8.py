"""OpenVINO int8 by NNCF post-training quantisation (cliplab.export.openvino_int8): the graph it writes is the one the
int8 backend runs, texts run unquantised (bf16 where the CPU has it), calibration is reused only for the same images,
and a graph less exact than the bar on held-out calibration images is refused."""

import builtins

import numpy as np
import pytest
import torch

pytest.importorskip("openvino", reason="the OpenVINO backend needs 'openvino'")
pytest.importorskip("nncf", reason="OpenVINO int8 needs 'nncf'")
pytest.importorskip("onnxruntime", reason="the export's checks need 'onnxruntime'")

import cliplab  # noqa: E402
from cliplab.export import openvino_int8  # noqa: E402
from cliplab.export.backends import ensure_export, load_backend  # noqa: E402
from cliplab.export.deps import MissingDependencyError  # noqa: E402
from cliplab.export.manifest import read_manifest  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def scene_pixels(model, n, seed):
    from cliplab.data import SceneWorld

    world = SceneWorld(seed=seed)
    return model.preprocessor.batch([world.sample(i).image for i in range(n)])


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """test-tiny (random weights) exported, its image tower calibrated on 80 synthetic scenes (64 + 16 held out)."""
    model = cliplab.create_model("test-tiny", seed=0).eval()
    directory = ensure_export(model, tmp_path_factory.mktemp("ov8") / "export")
    record = openvino_int8.ensure_openvino_int8(directory, scene_pixels(model, 80, 0), min_cosine=0.0)
    return model, directory, record


def test_the_int8_graph_is_written_recorded_and_run(quantized):
    import openvino as ov

    model, directory, record = quantized
    target = openvino_int8.int8_file(directory, "image")
    assert target == directory / "image.ov-int8.xml" and target.is_file() and target.with_suffix(".bin").is_file()
    assert record["towers"] == {"image": "image.ov-int8.xml"} and "text" not in record["calibration"]
    assert record["calibration"]["image"]["samples"] == 64
    held = record["calibration"]["image"]["held_out"]
    assert held["images"] == 16 and 0 < held["min_cosine"] <= held["mean_cosine"] <= 1.0
    assert read_manifest(directory)["openvino_int8"] == record
    quantized_ops = {op.get_type_name() for op in ov.Core().read_model(str(target)).get_ops()}
    assert "FakeQuantize" in quantized_ops  # NNCF's int8 marks (the f32 export has none)
    assert "FakeQuantize" not in {op.get_type_name() for op in ov.Core().read_model(str(directory / "image.onnx")).get_ops()}

    x = scene_pixels(model, 8, 3)
    m8, f32 = load_backend(directory, "openvino", "int8"), load_backend(directory, "openvino", "fp32")
    # compiled as the backend runs it (OpenVINO's default is bf16 on AMX)
    direct = ov.Core().compile_model(str(target), "CPU", openvino_int8.EXACT)(x.numpy())[0]
    assert np.allclose(m8.encode_image(x).numpy(), direct, atol=1e-4)  # the backend runs that very graph
    assert not torch.allclose(m8.encode_image(x), f32.encode_image(x), atol=1e-6)
    cos = torch.nn.functional.cosine_similarity(m8.encode_image(x), model.encode_image(x))
    assert cos.min() > 0.99  # int8, not noise
    texts = ["a red circle", "two blue squares left of a green star"]
    from cliplab.models.hardware import native_bf16

    same = load_backend(directory, "openvino", "bf16") if native_bf16() else f32  # the text graph is not quantised
    assert torch.allclose(m8.encode_texts(texts), same.encode_texts(texts), atol=1e-5)
    assert m8.inference_precision("text") == ("bf16" if native_bf16() else "f32")


def test_calibration_is_reused_only_for_the_same_images(quantized, monkeypatch):
    model, directory, _ = quantized
    calls = []
    real = openvino_int8.quantize_openvino
    monkeypatch.setattr(openvino_int8, "quantize_openvino", lambda *a, **k: calls.append(1) or real(*a, **k))
    openvino_int8.ensure_openvino_int8(directory, scene_pixels(model, 80, 0), min_cosine=0.0)
    assert calls == []
    openvino_int8.ensure_openvino_int8(directory, scene_pixels(model, 40, 9), min_cosine=0.0)
    assert calls == [1]
    rec = read_manifest(directory)["openvino_int8"]["calibration"]["image"]
    assert rec["samples"] == 24 and rec["held_out"]["images"] == 16  # a fifth held out, at least 16


def fake_quantizers(path) -> int:
    import openvino as ov

    return sum(op.get_type_name() == "FakeQuantize" for op in ov.Core().read_model(str(path)).get_ops())


def test_accuracy_control_reaches_a_bar_that_plain_int8_misses(quantized, tmp_path):
    """Plain static int8 of test-tiny misses 0.9999 on held-out scenes; with accuracy control (the default at a
    bar above 0) operations go back to f32 until it holds there, and fewer quantizers are left."""
    model, directory, record = quantized
    plain = record["calibration"]["image"]["held_out"]["min_cosine"]
    assert plain < 0.9999
    controlled_dir = ensure_export(model, tmp_path / "export")
    rec = openvino_int8.ensure_openvino_int8(controlled_dir, scene_pixels(model, 80, 0), min_cosine=0.9999)
    image = rec["calibration"]["image"]
    assert image["held_out"]["min_cosine"] >= 0.9999 > plain
    control = image["accuracy_control"]
    assert control["min_cosine"] == 0.9999 and control["validation_min_cosine"] >= 0.9999
    left = fake_quantizers(openvino_int8.int8_file(controlled_dir, "image"))
    assert 0 < left == control["quantizers_left"] < fake_quantizers(openvino_int8.int8_file(directory, "image"))
    assert "accuracy_control" in rec["method"]


def control_that_restores_nothing(nncf, core, model, data, min_cosine, model_type, subset_size):
    """Stands in for an accuracy control that found nothing to put back (as when it stops at MAX_REVERTED)."""
    return nncf.quantize(model, nncf.Dataset(data), model_type=model_type, subset_size=subset_size), {}


def test_a_graph_below_the_fidelity_bar_is_refused(quantized, monkeypatch):
    model, directory, record = quantized
    held = record["calibration"]["image"]["held_out"]["min_cosine"]
    # nothing put back to f32: a bar above plain int8's held-out minimum must refuse
    monkeypatch.setattr(openvino_int8, "_quantize_controlled", control_that_restores_nothing)
    with pytest.raises(ValueError, match="not exact enough.*held-out"):
        openvino_int8.ensure_openvino_int8(directory, scene_pixels(model, 80, 0), min_cosine=min(1.0, held + 1e-6))


def test_clear_errors(tmp_path, monkeypatch):
    model = cliplab.create_model("test-tiny", seed=0).eval()
    directory = ensure_export(model, tmp_path / "export")
    with pytest.raises(FileNotFoundError, match="no OpenVINO int8 graphs.*quantize_openvino"):
        load_backend(directory, "openvino", "int8")
    with pytest.raises(ValueError, match="calibration= is for backend='openvino'"):
        load_backend(directory, "onnxruntime", "fp32", calibration=[])
    with pytest.raises(ValueError, match="calibration inputs"):
        openvino_int8.quantize_openvino(directory)
    real_import = builtins.__import__

    def no_nncf(name, *a, **k):
        if name == "nncf":
            raise ImportError("no nncf")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_nncf)
    monkeypatch.setattr(openvino_int8.importlib, "import_module",
                        lambda name: no_nncf(name) if name == "nncf" else real_import(name))
    with pytest.raises(MissingDependencyError, match="pip install nncf"):
        openvino_int8.quantize_openvino(directory, images=np.zeros((2, 3, 32, 32), np.float32))


def test_embed_calibrates_on_its_own_images_and_keeps_the_bar(tmp_path, monkeypatch):
    """`cliplab embed --backend openvino --precision int8`: calibration = the job's first images; the trained
    shapes-tiny misses the bar under plain static int8 (measured min cosine ~0.8-0.9); with the accuracy control held
    to nothing put back, the job stops with that line before writing anything."""
    from click.testing import CliRunner

    from cliplab.cli import main

    monkeypatch.setenv("CLIPLAB_CACHE", str(tmp_path / "cache"))
    seen = {}
    real = openvino_int8.ensure_openvino_int8

    def spy(directory, images, *a, **k):
        seen["images"] = len(images)
        return real(directory, images, *a, **k)

    monkeypatch.setattr(openvino_int8, "ensure_openvino_int8", spy)
    monkeypatch.setattr(openvino_int8, "_quantize_controlled", control_that_restores_nothing)
    res = CliRunner().invoke(main, ["embed", "--synthetic", "40", "-o", str(tmp_path / "emb"), "--backend", "openvino",
                                    "--precision", "int8"])
    assert seen["images"] == 40
    assert res.exit_code != 0 and "not exact enough" in res.output, res.output
    assert not (tmp_path / "emb" / "shards").exists() or not any((tmp_path / "emb" / "shards").iterdir())
