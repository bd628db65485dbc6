"""``cliplab llm2clip stage1|stage2`` and ``cliplab proclip`` (cliplab/cli/llmtower.py): every option reaches the
training function, the outputs are normal models (``cliplab info``, ``resolve_model``), ``--freeze-image`` keeps the
image tower bit-exact while the default tunes it, and errors are one line."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from click.testing import CliRunner

import cliplab
from cliplab.data import SceneWorld
import cliplab.longtext.llm2clip as l2c
import cliplab.longtext.proclip as pc
from cliplab.cli import main
from cliplab.text.llm_tower import LLMTextCLIP
from cliplab.models.lm import BertConfig, BertEncoder, word_tokenizer
from cliplab.pipeline.modelref import fingerprint, resolve_model
from cliplab.text import EncoderEmbedder
from cliplab.text.training import FitResult

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per module

WORDS = ("a an the two three red green blue yellow circle circles square squares triangle star stars small large "
         "above below left right of and on in with").split()
CAPTIONS = {"a": ["a red circle", "a red circle above a star"], "b": ["two blue squares", "blue squares and a star"],
            "c": ["a green triangle", "a small green triangle"]}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved tiny BERT embedder, a saved test-tiny CLIP and a caption table (3 images, 2 captions each)."""
    root = tmp_path_factory.mktemp("cli_llmtower")
    tok = word_tokenizer(WORDS, max_length=96)
    cfg = BertConfig(vocab_size=tok.vocab_size, width=32, layers=2, heads=4, mlp_dim=64, max_positions=96)
    EncoderEmbedder("tiny-bert", BertEncoder(cfg).init_weights(seed=0), tok, "mean").save(root / "emb")
    cliplab.create_model("test-tiny", seed=0).save(root / "clip")
    with (root / "caps.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["photo", "text"]] + [[k, c] for k, v in CAPTIONS.items() for c in v])
    return root


def invoke(*args, code=0):
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == code, res.output
    return res.stdout if code == 0 else res.output  # warnings go to stderr; --json output is stdout alone


def fake_fit(seen, name):
    def fake(*args, **kw):
        seen[name] = (args, kw)
        return FitResult(steps=kw.get("steps", 0), losses=[1.0, 0.5])
    return fake


# --- keyword pass-through -------------------------------------------------------------------------------------
def test_stage1_options_reach_tune_last_layers(files, tmp_path, monkeypatch):
    seen = {}

    def fake(emb, texts, ids, **kw):
        seen.update(kw, texts=texts, ids=ids)
        return emb, FitResult(steps=kw["steps"], losses=[2.0, 1.0])

    monkeypatch.setattr(l2c, "tune_last_layers", fake)
    out = json.loads(invoke("llm2clip", "stage1", "-e", files / "emb", "--captions", files / "caps.csv",
                            "--image-column", "photo", "--caption-column", "text", "--max-captions", 5,
                            "--tune-layers", 1, "--steps", 7, "--batch-size", 3, "--lr", 0.002,
                            "--weight-decay", 0.125, "--warmup", 2, "--temperature", 0.07, "--seed", 5,
                            "-o", tmp_path / "s1", "--json", "--progress"))
    assert {k: seen[k] for k in ("tune_layers", "steps", "batch_size", "lr", "weight_decay", "warmup",
                                 "temperature", "seed", "progress")} == {
        "tune_layers": 1, "steps": 7, "batch_size": 3, "lr": 0.002, "weight_decay": 0.125, "warmup": 2,
        "temperature": 0.07, "seed": 5, "progress": True}
    flat = [(k, c) for k, v in CAPTIONS.items() for c in v][:5]
    assert seen["texts"] == [c for _, c in flat] and seen["ids"] == [k for k, _ in flat]
    assert out["n_captions"] == 5 and out["n_images"] == 3 and (out["first_loss"], out["last_loss"]) == (2.0, 1.0)
    assert json.loads((tmp_path / "s1" / "llmtower.json").read_text())["seed"] == 5
    assert cliplab.text.load_embedder(str(tmp_path / "s1")).dim == 32  # the tuned embedder was saved


def test_stage2_options_reach_the_model_and_train_llm_clip(files, tmp_path, monkeypatch):
    seen = {}

    def fake(model, pixels, texts, **kw):
        seen.update(kw, model=model, pixels=pixels, texts=texts)
        return FitResult(steps=kw["steps"], losses=[1.0, 0.5])

    monkeypatch.setattr(l2c, "train_llm_clip", fake)
    invoke("llm2clip", "stage2", "-e", files / "emb", "-m", files / "clip", "--scenes", 5, "--caption", "short",
           "--world-seed", 3, "--pooling", "max", "--adapter-blocks", 2, "--steps", 9, "--batch-size", 4,
           "--lr", 0.003, "--weight-decay", 0.25, "--warmup", 1, "--freeze-image", "--seed", 6,
           "-o", tmp_path / "s2", "--progress")
    assert {k: seen[k] for k in ("steps", "batch_size", "lr", "weight_decay", "warmup", "tune_image", "seed",
                                 "progress")} == {
        "steps": 9, "batch_size": 4, "lr": 0.003, "weight_decay": 0.25, "warmup": 1, "tune_image": False,
        "seed": 6, "progress": True}
    net = seen["model"]
    assert net.pooling == "max" and len(net.adapter.blocks) == 2 and seen["pixels"].shape[0] == 5
    world = SceneWorld(image_size=net.clip.config.vision.image_size, seed=3)
    assert seen["texts"] == [world.sample(i).short_caption for i in range(5)]
    back, _ = resolve_model(str(tmp_path / "s2"))
    assert isinstance(back, LLMTextCLIP) and back.pooling == "max" and len(back.adapter.blocks) == 2


def test_proclip_options_reach_both_stages(files, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(pc, "distill_text", fake_fit(seen, "distill"))
    monkeypatch.setattr(pc, "contrastive_tune", fake_fit(seen, "tune"))
    out = json.loads(invoke("proclip", "-e", files / "emb", "-m", files / "clip", "--scenes", 4, "--world-seed", 2,
                            "--stage1-steps", 3, "--stage1-lr", 0.004, "--stage1-batch-size", 8,
                            "--noise-drop", 0.3, "--structure-weight", 0.5, "--stage2-steps", 4,
                            "--stage2-lr", 0.0002, "--stage2-batch-size", 2, "--distill-weight", 0.75,
                            "--weight-decay", 0.01, "--warmup", 1, "--seed", 9, "-o", tmp_path / "p", "--json",
                            "--progress"))
    (net, texts), kw1 = seen["distill"]
    assert kw1 == {"steps": 3, "batch_size": 8, "lr": 0.004, "warmup": 1, "noise_drop": 0.3,
                   "structure_weight": 0.5, "seed": 9, "progress": True}
    world = SceneWorld(image_size=net.clip.config.vision.image_size, seed=2)
    assert texts == [world.sample(i).long_caption for i in range(4)]
    assert len(net.adapter.blocks) == 1 and net.adapter.expansion == 8 and net.adapter.normalize_input
    (net2, pixels, texts2), kw2 = seen["tune"]
    assert net2 is net and texts2 == texts and pixels.shape[0] == 4
    assert kw2 == {"distill_weight": 0.75, "steps": 4, "batch_size": 2, "lr": 0.0002, "weight_decay": 0.01,
                   "warmup": 1, "seed": 9, "progress": True}
    assert out["stage2"]["distill_weight"] == 0.75 and out["stage1"]["noise_drop"] == 0.3
    seen.clear()
    out = json.loads(invoke("proclip", "-e", files / "emb", "-m", files / "clip", "--scenes", 4,
                            "--stage1-steps", 1, "--stage2-steps", 0, "-o", tmp_path / "p0", "--json"))
    assert "distill" in seen and "tune" not in seen and out["stage2"] is None


# --- real (tiny) runs ------------------------------------------------------------------------------------------
def test_stage1_then_stage2_give_a_normal_model(files, tmp_path):
    invoke("llm2clip", "stage1", "-e", files / "emb", "--captions", files / "caps.csv", "--image-column", "photo",
           "--caption-column", "text", "--tune-layers", 1, "--steps", 2, "--batch-size", 2, "-o", tmp_path / "s1")
    clip = cliplab.load(str(files / "clip"))
    for flag, image_moves in (("--freeze-image", False), (None, True)):
        out = tmp_path / f"s2{flag or ''}"
        args = ["llm2clip", "stage2", "-e", tmp_path / "s1", "-m", files / "clip", "--scenes", 6, "--steps", 2,
                "--batch-size", 3, "--warmup", 0, "--lr", 0.01, "-o", out, "--json"] + ([flag] if flag else [])
        d = json.loads(invoke(*args))
        assert d["tune_image"] is image_moves
        model, info = resolve_model(str(out))
        assert isinstance(model, LLMTextCLIP) and info["kind"] == "path"
        assert model.embedder_name == str((tmp_path / "s1").resolve())  # by absolute path: loads from anywhere
        assert (fingerprint(model.clip) != fingerprint(clip)) is image_moves
        visual_same = all(torch.equal(a, b) for a, b in zip(model.clip.visual.state_dict().values(),
                                                            clip.visual.state_dict().values()))
        assert visual_same is not image_moves
    text = invoke("info", tmp_path / "s2")
    assert "text tower: " in text and "+ adapter (4 residual blocks)" in text


def test_proclip_runs_and_saves(files, tmp_path):
    d = json.loads(invoke("proclip", "-e", files / "emb", "-m", files / "clip", "--scenes", 6, "--stage1-steps", 2,
                          "--stage2-steps", 1, "--stage1-batch-size", 4, "--stage2-batch-size", 3,
                          "-o", tmp_path / "p", "--json"))
    assert d["stage1"]["steps"] == 2 and d["stage2"]["steps"] == 1
    info = json.loads(invoke("info", tmp_path / "p", "--json"))["text_tower"]
    assert info["adapter"]["blocks"] == 1 and info["adapter"]["normalize_input"] is True


# --- errors ----------------------------------------------------------------------------------------------------
def test_errors_are_one_line(files, tmp_path):
    out = invoke("proclip", "-e", "no-such-embedder", "-m", files / "clip", "-o", tmp_path / "x", code=1)
    assert out.strip().startswith("error: cannot load --embedder no-such-embedder: unknown text embedder")
    assert len(out.strip().splitlines()) == 1
    out = invoke("llm2clip", "stage1", "-e", files / "emb", "--captions", files / "caps.csv", "-o", tmp_path / "y",
                 code=1)
    assert "no column 'image'" in out and "--image-column" in out and len(out.strip().splitlines()) == 1
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    out = invoke("llm2clip", "stage2", "-e", files / "emb", "-o", tmp_path / "full", code=2)
    assert "is not empty" in out
