"""The CLI is a thin shell: listing, describing and converting through the public API, with shell-style errors."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner

import cliplab
from cliplab.cli import main


def test_models_lists_and_filters():
    r = CliRunner().invoke(main, ["models", "*B-32*", "--json"])
    assert r.exit_code == 0
    assert json.loads(r.output)["architectures"] == ["ViT-B-32", "ViT-B-32-quickgelu"]


def test_convert_and_info_round_trip(tmp_path):
    model = cliplab.create_model("test-tiny", seed=0)
    model.save(tmp_path / "native")
    runner = CliRunner()
    r = runner.invoke(main, ["convert", str(tmp_path / "native"), str(tmp_path / "oa.safetensors"), "--to", "openai"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["convert", str(tmp_path / "oa.safetensors"), str(tmp_path / "hf"), "--to", "hf",
                             "--arch", "test-tiny"])
    assert r.exit_code == 0, r.output
    back = cliplab.load(tmp_path / "hf", arch="test-tiny")
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    r = runner.invoke(main, ["info", str(tmp_path / "hf"), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["embed_dim"] == 64


def test_errors_are_one_line_with_exit_code_2(tmp_path):
    r = CliRunner().invoke(main, ["info", str(tmp_path / "missing.pt")])
    assert r.exit_code == 2
    assert r.output.startswith("error:") and "Traceback" not in r.output
