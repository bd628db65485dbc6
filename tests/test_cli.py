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


# --- cliplab classify ------------------------------------------------------------------------------------------------
import csv  # noqa: E402
import re  # noqa: E402

import pytest  # noqa: E402
from PIL import Image  # noqa: E402


def _pngs(folder, n, colours=("red", "blue", "green")):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img{i:03d}.png"
        Image.new("RGB", (24, 24), colours[i % len(colours)]).save(p)
        paths.append(p)
    return paths


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_classify_writes_csv_and_caps_the_table(tmp_path):
    _pngs(tmp_path / "imgs", 25)
    out = tmp_path / "preds.csv"
    r = _run("classify", tmp_path / "imgs", "--labels", "red,blue,green", "-m", "test-tiny", "-k", "2",
             "-o", out, "--no-progress")
    assert r.exit_code == 0, r.output
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image", "rank", "label", "prob", "error"]
    assert len(rows) == 50 and [r_["rank"] for r_ in rows[:4]] == ["1", "2", "1", "2"]
    assert {r_["label"] for r_ in rows} <= {"red", "blue", "green"} and all(not r_["error"] for r_ in rows)
    assert all(0 < float(r_["prob"]) <= 1 for r_ in rows)
    # the table shows 20 images, then says how many more there are and where all of them are
    shown = {n for n in re.findall(r"img\d{3}\.png", r.stdout)}
    assert len(shown) == 20 and "img024.png" not in shown
    assert "5 more" in r.stdout and str(out) in r.stdout


def test_classify_reports_progress_without_a_terminal(tmp_path, monkeypatch):
    import cliplab.progress

    monkeypatch.setattr(cliplab.progress, "LINE_EVERY", 0.0)
    paths = _pngs(tmp_path, 3)
    r = _run("classify", *paths, "--labels", "red,blue", "-m", "test-tiny")
    assert r.exit_code == 0, r.output
    assert re.search(r"classify: 3/3 images", r.stderr) and "\r" not in r.stderr
    r = _run("classify", *paths, "--labels", "red,blue", "-m", "test-tiny", "--no-progress")
    assert r.exit_code == 0 and "classify:" not in r.stderr


def test_classify_grammar_top_k_model_precision(tmp_path):
    paths = _pngs(tmp_path, 2)
    for flag in ("-k", "--top-k", "--topk"):
        r = _run("classify", *paths, "--labels", "red,blue,green", "-m", "test-tiny", flag, "1", "--json",
                 "--no-progress")
        assert r.exit_code == 0, r.output
        assert all(len(x["top"]) == 1 for x in json.loads(r.stdout)["results"])
    r = _run("classify", *paths, "--labels", "red,blue,green", "--model", "test-tiny", "--precision", "bf16",
             "--json", "--no-progress")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["precision"] == "bf16"
    h = _run("classify", "--help").output
    assert "-k, --top-k" in h and "--topk" not in h and "-m, --model" in h and "--precision" in h
    assert "-o, --out" in h and "--progress / --no-progress" in h


def test_classify_counts_skipped_files_and_names_empty_folders(tmp_path):
    _pngs(tmp_path / "mixed", 2)
    (tmp_path / "mixed" / "notes.txt").write_text("x")
    (tmp_path / "mixed" / "labels.mat").write_bytes(b"\0")
    r = _run("classify", tmp_path / "mixed", "--labels", "red,blue", "-m", "test-tiny", "--json", "--no-progress")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["skipped"] == 2 and "skipped 2 non-image file(s)" in r.stderr
    (tmp_path / "empty").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("x")
    r = _run("classify", tmp_path / "empty", tmp_path / "docs", "--labels", "red,blue", "-m", "test-tiny")
    assert r.exit_code == 2 and r.output.count("\n") == 1 and r.output.startswith("error:")
    assert str(tmp_path / "empty") in r.output and str(tmp_path / "docs") in r.output
    assert "1 non-image file(s) skipped" in r.output and "--all-files" in r.output


def test_classify_duplicate_labels_are_named(tmp_path):
    paths = _pngs(tmp_path, 1)
    r = _run("classify", *paths, "--labels", "cat,dog,cat,fox,dog", "-m", "test-tiny")
    assert r.exit_code == 2 and "'cat' (0, 2)" in r.output and "'dog' (1, 4)" in r.output
    # spellings that differ only in case or punctuation are the same class to CLIP: a warning, not an error
    r = _run("classify", *paths, "--labels", "Sea otter,dog,sea-otter", "-m", "test-tiny", "--no-progress")
    assert r.exit_code == 0, r.output
    assert "warning: duplicate class names" in r.stderr and "(0, 2)" in r.stderr


# --- cliplab eval ----------------------------------------------------------------------------------------------------
EVAL_COMMANDS = ["zeroshot", "retrieval", "clipscore", "winoground", "datasets", "tasks"]


@pytest.mark.parametrize("cmd", EVAL_COMMANDS)
def test_eval_help_has_an_example_and_the_grammar(cmd):
    h = _run("eval", cmd, "--help").output
    assert "Example:" in h
    if cmd not in ("datasets", "tasks"):
        assert "-m, --model" in h and "-o, --out" in h and "--set KEY=VALUE" in h
        assert "--progress / --no-progress" in h
        for old in ("-O", "--option", "--quiet"):
            assert not re.search(rf"(^|[\s,]){old}[\s,]", h), old


def test_eval_model_accepts_what_embed_accepts(tmp_path):
    base = ["eval", "winoground", "--no-cache", "--json", "--no-progress"]
    # an architecture name: seeded random weights with a warning, as `cliplab embed` does
    r = _run(*base, "-m", "test-tiny", "--set", "n=4", "-o", tmp_path / "a")
    assert r.exit_code == 0, r.output
    assert "random weights" in r.stderr and json.loads(r.stdout)["model"]["kind"] == "random"
    # the shipped default when no model is named
    r = _run(*base, "--set", "n=4", "-o", tmp_path / "b")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["model"]["name"] == "shapes-tiny" and "random weights" not in r.stderr
    # old spellings still work; --random-init still works (and needs no warning: it was asked for)
    r = _run("eval", "winoground", "--model", "test-tiny", "--random-init", "--seed", "1", "-O", "n=4", "--option",
             "seed=2", "--quiet", "--no-cache", "--out", tmp_path / "c", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["model"]["random_init"] and res["model"]["seed"] == 1 and res["num_pairs"] == 4
    assert res["dataset"]["options"] == {"n": 4, "seed": 2} and "random weights" not in r.stderr
    r = _run(*base, "-m", "no-such-model", "-o", tmp_path / "d")
    assert r.exit_code == 2 and r.output.startswith("error:") and "no-such-model" in r.output


def test_eval_prints_a_plain_summary_and_plain_progress_lines(tmp_path, monkeypatch):
    import cliplab.progress

    monkeypatch.setattr(cliplab.progress, "LINE_EVERY", 0.0)
    out = tmp_path / "zs"
    r = _run("eval", "zeroshot", "-m", "test-tiny", "--set", "n_per_class=2", "--set", "image_size=32",
             "--cache-dir", tmp_path / "cache", "-o", out)
    assert r.exit_code == 0, r.output
    assert "![" not in r.stdout and "|---" not in r.stdout and "`" not in r.stdout and "#" not in r.stdout
    assert re.search(r"top-1 accuracy\s+\d+\.\d+%", r.stdout)
    assert str(out / "summary.md") in r.stdout and str(out / "confusion.png") in r.stdout
    assert "![confusion matrix](confusion.png)" in (out / "summary.md").read_text()  # the file keeps its Markdown
    assert re.search(r"encoding images: 16/16 images", r.stderr) and "\r" not in r.stderr
