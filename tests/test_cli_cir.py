"""`cliplab cir phi|rtd` and `cliplab eval cir`: the commands reach the library with every option, end to end."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import cliplab
from cliplab.cir.phi import Phi
from cliplab.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("cir")
    r = CliRunner().invoke(main, ["cir", "phi", "--triplets", "30", "--steps", "3", "--batch-size", "8", "--seed",
                                  "1", "-o", str(d / "phi.pt"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["steps"] == 3
    r = CliRunner().invoke(main, ["cir", "rtd", "--phi", str(d / "phi.pt"), "--triplets", "12", "--steps", "2",
                                  "--batch-size", "4", "--lr", "1e-4", "--no-anchor", "--no-hard-negatives",
                                  "--concat", "text", "--seed", "3", "-o", str(d / "rtd"), "--json"])
    assert r.exit_code == 0, r.output
    return d, json.loads(r.stdout)


def test_cir_training_commands_pass_their_options_on(trained):
    d, rtd = trained
    assert isinstance(Phi.load(d / "phi.pt"), Phi)
    assert {k: rtd[k] for k in ("steps", "batch_size", "lr", "anchor", "hard_negatives", "concat", "seed")} == {
        "steps": 2, "batch_size": 4, "lr": 1e-4, "anchor": False, "hard_negatives": False, "concat": "text",
        "seed": 3}
    tuned, base = cliplab.load(str(d / "rtd")), cliplab.load("shapes-tiny")
    changed = {n for (n, a), (_, b) in zip(tuned.state_dict().items(), base.state_dict().items())
               if not torch.equal(a, b)}
    assert changed and all(n.startswith("text.") for n in changed)  # only the text tower was tuned


def test_eval_cir_with_phi_and_the_tuned_text_tower(trained, tmp_path):
    d, _ = trained
    r = CliRunner().invoke(main, ["eval", "cir", "--phi", str(d / "phi.pt"), "--text-model", str(d / "rtd"),
                                  "--template", "a photo of $ that {}", "--set", "n=8", "--no-cache",
                                  "-o", str(tmp_path / "a"), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["query"] == "phi" and out["num_queries"] == 8 and 0 <= out["metrics"]["R@1"] <= 1
    r = CliRunner().invoke(main, ["eval", "cir", "--set", "n=8", "--no-cache", "-o", str(tmp_path / "b"), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["query"] == "sum"  # no phi: the summed baseline
    r = CliRunner().invoke(main, ["eval", "cir", "--query", "phi"])
    assert r.exit_code == 2 and "needs --phi" in r.output
    r = CliRunner().invoke(main, ["eval", "cir", "--query", "image", "--phi", str(d / "phi.pt")])
    assert r.exit_code == 2 and "apply to --query phi" in r.output
