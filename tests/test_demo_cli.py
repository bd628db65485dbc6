"""The job commands as a shell user meets them: help everywhere, JSON output, exit codes and one-line errors;
``cliplab classify`` and ``cliplab demo`` end to end."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import cliplab
from cliplab.cli import main
from cliplab.data import SceneWorld

pytestmark = pytest.mark.filterwarnings("ignore::cliplab.pipeline.RandomWeightsWarning")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("cmd", [[], ["embed"], ["index"], ["search"], ["classify"], ["demo"]])
def test_help_everywhere(cmd):
    r = run(*cmd, "--help")
    assert r.exit_code == 0 and "Usage:" in r.output
    assert "--json" in r.output or not cmd
    if cmd:
        assert "-h, --help" in r.output


def test_embed_cli_json_strict_and_errors(tmp_path):
    w = SceneWorld(image_size=64, seed=0)
    (tmp_path / "imgs").mkdir()
    for i in range(5):
        w.sample(i).render().save(tmp_path / "imgs" / f"{i}.png")
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "emb"
    r = run("embed", tmp_path / "imgs", "--out", out, "--model", "test-tiny", "--shard-size", "2", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output[r.output.index("{"):])  # warnings (random weights) go to stderr, mixed in here
    assert (data["rows"], data["rejects"], data["images"], data["texts"]) == (5, 1, 5, 0)
    assert data["shards_written"] == 3 and Path(data["manifest"]).exists()
    assert json.loads(Path(data["rejects_file"]).read_text())["id"] == "broken.png"
    # rerun resumes (nothing to do); --strict turns rejects into exit status 1
    r = run("embed", tmp_path / "imgs", "--out", out, "--model", "test-tiny", "--shard-size", "2", "--strict")
    assert r.exit_code == 1 and "0 written, 3 already done" in r.output and "1 input(s) rejected" in r.output
    # a different job in the same directory is refused with a one-line error, exit 2
    r = run("embed", tmp_path / "imgs", "--out", out, "--model", "test-tiny", "--shard-size", "3")
    assert r.exit_code == 2 and r.output.count("error:") == 1 and "--overwrite" in r.output
    assert "Traceback" not in r.output
    # synthetic via --synthetic N, text-only
    r = run("embed", "--synthetic", 6, "--out", tmp_path / "syn", "--model", "test-tiny", "--what", "text",
            "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output[r.output.index("{"):])["texts"] == 6
    # usage errors: exit 2
    assert run("embed", "--out", tmp_path / "x", "--model", "test-tiny").exit_code == 2
    assert run("embed", "synthetic:3", "--synthetic", 3, "--out", tmp_path / "x").exit_code == 2
    assert run("embed", "synthetic:3").exit_code == 2  # --out is required
    r = run("embed", tmp_path / "nope", "--out", tmp_path / "x", "--model", "test-tiny")
    assert r.exit_code == 2 and "no such file" in r.output
    r = run("embed", "synthetic:3", "--out", tmp_path / "x", "--model", "no-such-model")
    assert r.exit_code == 2 and "no-such-model" in r.output
    r = run("embed", tmp_path / "imgs", "--out", tmp_path / "x", "--model", "test-tiny", "--path-column", "p")
    assert r.exit_code == 2 and "do not all apply" in r.output
    if "shapes-tiny" not in cliplab.list_pretrained():  # the default model must never silently be random
        r = run("embed", "synthetic:3", "--out", tmp_path / "x")
        assert r.exit_code == 2 and "not shipped" in r.output


def test_classify_cli(tmp_path):
    w = SceneWorld(image_size=64, seed=0)
    paths = []
    for i in range(3):
        p = tmp_path / f"s{i}.png"
        w.sample(i).render().save(p)
        paths.append(p)
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    labels = "red circle,blue square,green star"
    r = run("classify", *paths, "--labels", labels, "--model", "test-tiny", "--topk", "2", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output[r.output.index("{"):])
    assert data["labels"] == labels.split(",") and data["failed"] == 0 and len(data["results"]) == 3
    for res in data["results"]:
        probs = [t["prob"] for t in res["top"]]
        assert len(probs) == 2 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert {t["label"] for t in res["top"]} <= set(labels.split(","))
    # the same result as the Python API
    from cliplab.zeroshot import ZeroShotClassifier

    model = cliplab.create_model("test-tiny", seed=0).eval()
    api = ZeroShotClassifier.from_classnames(model, labels.split(","), "generic").classify([str(p) for p in paths],
                                                                                          topk=2)
    for res, ref in zip(data["results"], api):
        assert [t["label"] for t in res["top"]] == [lab for lab, _ in ref]
        np.testing.assert_allclose([t["prob"] for t in res["top"]], [p for _, p in ref], atol=1e-5)

    # labels from a file, a template given inline, a directory argument; an unreadable image -> exit 1, others shown
    lf = tmp_path / "labels.txt"
    lf.write_text("# colours\nred\nblue\n\ngreen\n")
    r = run("classify", tmp_path, "--labels-file", lf, "--template", "a {} shape", "--model", "test-tiny")
    assert r.exit_code == 1
    assert "bad.jpg" in r.output and "not a recognised image" in r.output and "s2.png" in r.output
    assert "error: 1 of 4 image(s) could not be read" in r.output
    # usage errors
    assert run("classify", *paths, "--model", "test-tiny").exit_code == 2  # no labels
    assert run("classify", *paths, "--labels", "one", "--model", "test-tiny").exit_code == 2  # one label
    assert run("classify", "--labels", "a,b").exit_code == 2  # no images
    r = run("classify", tmp_path / "missing.png", "--labels", "a,b", "--model", "test-tiny")
    assert r.exit_code == 1 and "no such file" in r.output


def test_demo_cli_writes_a_self_contained_report(tmp_path):
    out = tmp_path / "demo"
    r = run("demo", "--model", "test-tiny", "--out", out, "--n", 60, "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.output[r.output.index("{"):])
    assert s["model"] == "test-tiny" and s["random_weights"] and s["gallery"] == 60 and s["rows"] == 60
    assert s["index"]["n"] == 60 and set(s["zero_shot"]) == {"colour", "shape"}
    assert 0 <= s["retrieval"]["text_to_image_r@5"] <= 1 and len(s["text_queries"]) >= 6
    report = Path(s["report"])
    assert report == out / "report.html" and json.loads((out / "summary.json").read_text())["gallery"] == 60
    html = report.read_text()
    assert "random weights" in html and "http://" not in html and "https://" not in html  # offline, self-contained
    uris = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)
    assert len(uris) >= 20
    from io import BytesIO

    assert Image.open(BytesIO(base64.b64decode(uris[0]))).size == (64, 64)
    try:
        import matplotlib  # noqa: F401

        assert "Zero-shot colour" in html and "Retrieval over the 60-scene gallery" in html
    except ImportError:
        assert "matplotlib is not installed" in html
    # the human summary
    r = run("demo", "--model", "test-tiny", "--out", out, "--n", 30)
    assert r.exit_code == 0 and "report:" in r.output and "zero-shot colour" in r.output
    if "shapes-tiny" not in cliplab.list_pretrained():
        r = run("demo", "--out", tmp_path / "d2")
        assert r.exit_code == 2 and "error:" in r.output and "--model" in r.output
