"""Loading is safe, errors name what is wrong, and every source kind works."""

from __future__ import annotations

import json
import pickle
import zipfile

import pytest
import torch
from safetensors.torch import save_file

import cliplab
from cliplab.models import CheckpointError, ConfigError, export_state, read_state_dict
from conftest import CAPTIONS, randomize_


@pytest.fixture(scope="module")
def tiny():
    return randomize_(cliplab.create_model("test-tiny", seed=0), seed=1).eval()


class _RunsCode:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for any code a malicious checkpoint would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("protocol", ["zip", "legacy"])
def test_malicious_pickle_is_refused_without_running(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"visual.conv1.weight": torch.zeros(1), "evil": _RunsCode(marker)}
    torch.save(payload, path, _use_new_zipfile_serialization=(protocol == "zip"))
    with pytest.raises(CheckpointError, match="refused"):
        cliplab.load(path)
    assert not marker.exists(), "loading executed code from the checkpoint"


def test_raw_pickle_file_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(CheckpointError):
        cliplab.load(path)
    assert not marker.exists()


def test_torchscript_archive_is_refused(tmp_path):
    path = tmp_path / "jit.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(CheckpointError, match="TorchScript"):
        cliplab.load(path)


def test_missing_unexpected_and_misshaped_keys_are_named(tiny, tmp_path):
    state = export_state(tiny, "openai")
    state.pop("ln_final.bias")
    state["extra.tensor"] = torch.zeros(3)
    path = tmp_path / "broken.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError) as e:
        cliplab.load(path, arch="test-tiny")
    assert "ln_final.bias" in str(e.value) and "extra.tensor" in str(e.value)

    state = export_state(tiny, "openai")
    state["token_embedding.weight"] = state["token_embedding.weight"][:100].contiguous()
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"text\.token_embed\.weight: checkpoint \(100, 64\)"):
        cliplab.load(path, arch="test-tiny")


def test_unknown_layout_names_keys(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(CheckpointError, match="encoder.weight"):
        cliplab.load(path)


def test_nested_and_ddp_prefixed_checkpoints(tiny, tmp_path):
    state = {"module." + k: v for k, v in export_state(tiny, "openai").items()}
    path = tmp_path / "train.pt"
    torch.save({"epoch": 3, "state_dict": state}, path)
    back = cliplab.load(path, arch="test-tiny")
    assert all(torch.equal(a, b) for a, b in zip(tiny.state_dict().values(), back.state_dict().values()))


def test_hf_pytorch_bin_directory_and_file_alone(tiny, tmp_path):
    d = cliplab.convert(tiny, "hf", tmp_path / "hf")
    state = read_state_dict(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    torch.save(state, d / "pytorch_model.bin")
    ids = tiny.tokenize(CAPTIONS)
    want = tiny.encode_text(ids)
    assert torch.equal(cliplab.load(d).encode_text(ids), want)
    alone = cliplab.load(d / "pytorch_model.bin", arch="test-tiny")
    assert torch.equal(alone.encode_text(ids), want)
    assert alone.config.preprocess.crop_rounding == "floor"  # origin decides the crop convention


def test_bare_native_weights_need_arch(tiny, tmp_path):
    tiny.save(tmp_path / "m")
    with pytest.raises(CheckpointError, match="arch="):
        cliplab.load(tmp_path / "m" / "model.safetensors")
    assert cliplab.load(tmp_path / "m" / "model.safetensors", arch="test-tiny").config.name == "test-tiny"


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a pretrained name .*, an existing file or directory"):
        cliplab.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="cliplab.json"):
        cliplab.load(tmp_path / "empty")


def test_corrupt_safetensors(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x00\x01garbage")
    with pytest.raises(CheckpointError, match="safetensors"):
        cliplab.load(path)


def test_precision_bf16_close_to_fp32(tiny, tmp_path):
    tiny.save(tmp_path / "m")
    fast = cliplab.load(tmp_path / "m", precision="bf16")
    assert fast.dtype == torch.bfloat16
    ids = tiny.tokenize(CAPTIONS)
    cos = torch.nn.functional.cosine_similarity(fast.encode_text(ids).float(), tiny.encode_text(ids), dim=-1)
    assert cos.min() > 0.99
    with pytest.raises(ValueError, match="precision"):
        cliplab.load(tmp_path / "m", precision="int3")


def test_config_rejects_unknown_keys(tmp_path):
    cfg = cliplab.get_config("test-tiny").to_dict()
    cfg["vision"]["widht"] = 3
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="widht"):
        cliplab.ModelConfig.load(tmp_path / "c.json")


def test_jit_detection_does_not_flag_plain_zip_checkpoints(tiny, tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(export_state(tiny, "openai"), path)
    assert zipfile.is_zipfile(path)
    assert cliplab.load(path, arch="test-tiny").config.name == "test-tiny"


def test_loaded_model_gives_bit_identical_features(tiny, tmp_path):
    """Weights equal is not enough: unaligned buffers change matmul rounding, so compare features bit-exactly."""
    tiny.save(tmp_path / "m")
    back = cliplab.load(tmp_path / "m")
    assert all(p.data_ptr() % 64 == 0 for p in back.parameters()), "weights left in unaligned file buffers"
    batch = tiny.tokenize(CAPTIONS[:4])
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(back.encode_text(batch), tiny.encode_text(batch))
        assert torch.equal(back.encode_image(pixels), tiny.encode_image(pixels))


def test_save_in_fp16_halves_the_file_and_loads_as_fp32(tiny, tmp_path):
    tiny.save(tmp_path / "full")
    tiny.save(tmp_path / "half", dtype=torch.float16)
    full, half = (tmp_path / d / "model.safetensors" for d in ("full", "half"))
    assert half.stat().st_size < 0.51 * full.stat().st_size
    back = cliplab.load(tmp_path / "half")
    assert back.dtype == torch.float32
    for k, v in tiny.state_dict().items():
        assert torch.equal(back.state_dict()[k], v.half().float()), k
