"""``backend="auto"`` / ``precision="auto"`` (the default of ``cliplab embed``): the fastest full-fidelity runtime the
machine offers, and a resumed job keeps whatever it was started with."""

import json

import pytest

from cliplab.pipeline import embed, runtime_choice
from cliplab.pipeline.runtime_choice import choose_runtime

pytestmark = pytest.mark.auto_runtime


@pytest.fixture
def machine(monkeypatch):
    """Pretend hardware and installed backends: ``machine(bf16=..., backends={...})``."""
    import cliplab.export.backends as backends
    import cliplab.models.hardware as hardware

    def set_(bf16: bool, offered: dict):
        monkeypatch.setattr(hardware, "native_bf16", lambda: bf16)
        monkeypatch.setattr(backends, "available_backends", lambda: offered)
    return set_


OV = {"torch": ("fp32", "bf16"), "openvino": ("fp32", "bf16", "int8"), "onnxruntime": ("fp32", "int8")}
NO_OV = {"torch": ("fp32", "bf16"), "onnxruntime": ("fp32", "int8")}
LOCAL = dict(engine="local", device="cpu", compile=False)


def test_explicit_settings_pass_through(machine):
    machine(True, OV)
    assert choose_runtime("torch", "fp32", **LOCAL) == ("torch", "fp32")
    assert choose_runtime("onnxruntime", "int8", **LOCAL) == ("onnxruntime", "int8")


@pytest.mark.parametrize("bf16, offered, expected", [
    (True, OV, ("openvino", "bf16")),
    (False, OV, ("openvino", "fp32")),
    (True, NO_OV, ("torch", "bf16")),
    (False, NO_OV, ("torch", "fp32")),
])
def test_auto_picks_openvino_and_native_bf16_where_present(machine, bf16, offered, expected):
    machine(bf16, offered)
    assert choose_runtime("auto", "auto", **LOCAL) == expected


def test_auto_backend_stays_torch_where_openvino_cannot_run_the_job(machine):
    machine(True, OV)
    assert choose_runtime("auto", "auto", engine="ray", device="cpu", compile=False) == ("torch", "bf16")
    assert choose_runtime("auto", "auto", engine="local", device="cpu", compile=True) == ("torch", "bf16")
    assert choose_runtime("auto", "auto", engine="local", device="cuda", compile=False) == ("torch", "fp32")
    # half auto: the explicit half is kept, the other fits it
    assert choose_runtime("onnxruntime", "auto", **LOCAL) == ("onnxruntime", "fp32")
    assert choose_runtime("auto", "int8", **LOCAL) == ("openvino", "int8")
    machine(True, NO_OV)
    assert choose_runtime("auto", "int8", **LOCAL) == ("onnxruntime", "int8")  # torch has no int8
    assert choose_runtime("torch", "auto", **LOCAL) == ("torch", "bf16")


def test_an_existing_job_keeps_its_runtime_unless_overwritten(machine, tmp_path):
    machine(True, OV)
    (tmp_path / "job.json").write_text(json.dumps({"options": {"what": "auto"}}))  # written before the options
    assert choose_runtime("auto", "auto", out_dir=tmp_path, **LOCAL) == ("torch", "fp32")
    assert choose_runtime("auto", "auto", out_dir=tmp_path, overwrite=True, **LOCAL) == ("openvino", "bf16")
    (tmp_path / "job.json").write_text(json.dumps({"options": {"backend": "onnxruntime", "precision": "int8"}}))
    assert choose_runtime("auto", "auto", out_dir=tmp_path, **LOCAL) == ("onnxruntime", "int8")
    (tmp_path / "job.json").write_text("{not json")
    assert choose_runtime("auto", "auto", out_dir=tmp_path, **LOCAL) == ("openvino", "bf16")


def test_auto_job_records_its_choice_and_resumes_with_it_on_another_machine(tmp_path, monkeypatch):
    pytest.importorskip("openvino")
    pytest.importorskip("onnx")
    monkeypatch.setattr(runtime_choice, "best_precision", lambda device: "fp32")  # bf16 emulated on some CPUs: slow
    out = tmp_path / "emb"
    first = embed("synthetic:6", out, "test-tiny", backend="auto", precision="auto", shard_size=3, progress=False)
    assert first.manifest["backend"] == "openvino" and first.manifest["precision"] == "fp32"
    assert first.manifest["runtime_chosen_automatically"] == ["backend", "precision"]
    # the same command where OpenVINO is gone: the job resumes as it was started, not as a mismatch
    monkeypatch.setattr(runtime_choice, "best_backend", lambda precision, **kw: "torch")
    again = embed("synthetic:6", out, "test-tiny", backend="auto", precision="auto", shard_size=3, progress=False)
    assert again.manifest["backend"] == "openvino" and again.shards_skipped == 2 and again.shards_written == 0
    fresh = embed("synthetic:6", tmp_path / "other", "test-tiny", backend="auto", precision="auto", progress=False)
    assert fresh.manifest["backend"] == "torch"


def test_cli_embed_defaults_to_auto_and_says_what_it_chose(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from cliplab.cli import main

    monkeypatch.setattr(runtime_choice, "best_precision", lambda device: "fp32")
    monkeypatch.setattr(runtime_choice, "best_backend", lambda precision, **kw: "torch")
    r = CliRunner().invoke(main, ["embed", "synthetic:3", "-o", str(tmp_path / "e"), "-m", "test-tiny",
                                  "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "(torch fp32, chosen automatically)" in r.output
    r = CliRunner().invoke(main, ["embed", "synthetic:3", "-o", str(tmp_path / "f"), "-m", "test-tiny",
                                  "--no-progress", "--backend", "torch", "--precision", "fp32", "--json"])
    d = json.loads(r.stdout)
    assert (d["backend"], d["precision"], d["runtime_chosen_automatically"]) == ("torch", "fp32", [])
