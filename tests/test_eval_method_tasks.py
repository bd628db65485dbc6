"""`cliplab eval sce` and `cliplab eval fclipscore`: the tasks method modules register are reachable from the CLI,
every option reaches the method, and the summary renders their metrics."""

from __future__ import annotations

import json

from click.testing import CliRunner

import cliplab.metrics.clip4dm as clip4dm
import cliplab.metrics.sce as sce
from cliplab.cli import main


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


def test_eval_tasks_lists_the_method_tasks():
    tasks = json.loads(run("eval", "tasks", "--json").stdout)
    assert {"sce", "fclipscore"} <= set(tasks)


def test_eval_sce_passes_every_option(tmp_path, monkeypatch):
    seen = []
    real = sce.schur_complement_entropy

    def spy(text, image, **kw):
        seen.append(kw)
        return real(text, image, **kw)

    monkeypatch.setattr(sce, "schur_complement_entropy", spy)
    r = run("eval", "sce", "--set", "n=24", "--no-cache", "-o", tmp_path, "--kernel", "gaussian", "--sigma", 0.7,
            "--rff-dim", 32, "--normalized", "--json")
    res = json.loads(r.stdout)
    assert res["task"] == "sce" and res["metrics"]["kernel"] == "gaussian" and res["metrics"]["normalized"] is True
    assert len(seen) == 2  # the pairs and the shuffled control
    assert all(kw["kernel"] == "gaussian" and kw["sigma"] == 0.7 and kw["rff_dim"] == 32 and kw["normalized"]
               for kw in seen)
    text = run("eval", "sce", "--set", "n=24", "--no-cache", "-o", tmp_path / "t", "--kernel", "linear").stdout
    assert "shuffled_sce" in text and "24 images, 24 captions" in text


def test_eval_fclipscore_passes_every_option(tmp_path, monkeypatch):
    seen = []
    real = clip4dm.detect_misalignment

    def spy(model, images, captions, **kw):
        seen.append(kw)
        return real(model, images, captions, **kw)

    monkeypatch.setattr(clip4dm, "detect_misalignment", spy)
    r = run("eval", "fclipscore", "--set", "n=4", "--no-cache", "-o", tmp_path, "--mode", "most_negative",
            "--eps", -1e-3, "--template", "An image of ", "--start-layer", -2, "--clamp", "--json")
    res = json.loads(r.stdout)
    assert res["metrics"]["mode"] == "most_negative" and len(res["pairs"]) == 4
    assert seen and all(kw == {"mode": "most_negative", "eps": -1e-3, "template": "An image of ", "start_layer": -2,
                                "clamp": True, "w": 2.5} for kw in seen)
    md = (tmp_path / "summary.md").read_text()
    assert "| f_clip_score |" in md
