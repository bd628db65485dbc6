"""Reachability of the LLM text tower (cliplab.text.llm_tower): a saved LLMTextCLIP directory is a normal model
for the services. ``tokenize`` / ``encode_text`` (the services' interface) against ``encode_texts`` and the
embedder itself, token counts against the embedder's, long texts read whole (and flagged exactly past the LLM's
context), ``resolve_model`` / ``load_model_from_info`` on a directory, ``cliplab embed`` / ``index`` / ``search`` /
``eval zeroshot`` / ``info`` on it."""

from __future__ import annotations

import csv
import json
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import cliplab
from cliplab.data import SceneWorld
from cliplab.cli import main
from cliplab.text.llm_tower import LLMTextBatch, LLMTextCLIP, is_llm_clip_dir, load_llm_clip
from cliplab.models.lm import BertConfig, BertEncoder, word_tokenizer
from cliplab.models.tokenizer import TruncationError, TruncationWarning
from cliplab.pipeline.modelref import fingerprint, load_model_from_info, resolve_model
from cliplab.text import EncoderEmbedder

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per module

WORDS = ("a an the two three four red green blue yellow purple orange cyan pink circle circles square squares "
         "triangle triangles star stars diamond diamonds small medium large striped solid above below left right "
         "of and on in with word").split()
MAX_TOKENS = 128
LONG = " ".join(WORDS[i % len(WORDS)] for i in range(100))  # 102 tokens with [CLS]/[SEP]: past CLIP's 77, within 128
TOO_LONG = " ".join(WORDS[i % len(WORDS)] for i in range(140))  # 142 tokens: 14 past the LLM's context
TEXTS = ["a red circle", "two blue squares above a green star", LONG, "a small striped diamond"]


def tiny_bert(seed=0):
    tok = word_tokenizer(WORDS, max_length=MAX_TOKENS)
    cfg = BertConfig(vocab_size=tok.vocab_size, width=32, layers=2, heads=4, mlp_dim=64, max_positions=MAX_TOKENS)
    return EncoderEmbedder("tiny-bert", BertEncoder(cfg).init_weights(seed=seed), tok, "mean")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved LLMTextCLIP (test-tiny image tower, tiny BERT embedder saved beside it, a perturbed adapter)."""
    root = tmp_path_factory.mktemp("llmreach")
    emb = tiny_bert()
    emb.save(root / "emb")
    model = LLMTextCLIP(cliplab.create_model("test-tiny", seed=0), emb)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # away from identity, so that a dropped adapter block would show
        for p in model.adapter.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.save(root / "m", embedder_ref=str(root / "emb"))
    return root, load_llm_clip(root / "m")


# --- the services' interface -----------------------------------------------------------------------------------
def test_tokenize_counts_tokens_as_the_embedder_reads_them(saved):
    _, model = saved
    tb = model.tokenize(TEXTS)
    assert isinstance(tb, LLMTextBatch) and tb.texts == TEXTS and tb.ids is tb
    expected = [model.embedder.count_tokens(t) for t in TEXTS]
    assert tb.lengths.tolist() == expected and expected[2] == 102  # [CLS] + 100 words + [SEP]
    assert not tb.truncated.any() and tb.n_dropped.tolist() == [0] * 4
    assert model.tokenize("a red circle").texts == ["a red circle"]
    assert model.config.text.context_length == MAX_TOKENS == model.max_tokens


def test_past_the_llm_context_is_flagged_exactly_or_refused(saved):
    _, model = saved
    with pytest.warns(TruncationWarning, match="1 of 2"):
        tb = model.tokenize(["a red circle", TOO_LONG])
    assert tb.truncated.tolist() == [False, True]
    assert tb.n_dropped.tolist() == [0, 142 - MAX_TOKENS] and tb.lengths.tolist() == [5, MAX_TOKENS]
    with pytest.raises(TruncationError, match="exceed the 128-token"):
        model.tokenize([TOO_LONG], truncate=False)
    model.tokenize([LONG], truncate=False)  # within the context: accepted


def test_encode_text_of_a_token_batch_equals_encode_texts_and_the_embedder(saved):
    _, model = saved
    with torch.no_grad():
        ref = model.adapter(model.embedder.encode(TEXTS, pooling="mean"))
        torch.testing.assert_close(model.encode_texts(TEXTS, cache=False), ref, atol=1e-5, rtol=1e-5)
        tb = model.tokenize(TEXTS)
        full = model.encode_text(tb)
        torch.testing.assert_close(full, ref, atol=1e-5, rtol=1e-5)
        rows = torch.tensor([3, 0, 2])
        torch.testing.assert_close(model.encode_text(tb.ids[rows]), full[rows], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.encode_text(tb[1:3]), full[1:3], atol=1e-5, rtol=1e-5)
        unit = model.encode_text(tb, normalize=True)
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(4))
    assert model.cache == {}  # a service's texts are not kept (an embedding job would fill memory)
    with pytest.raises(TypeError, match="CLIP token ids"):
        model.encode_text(model.clip.tokenize(TEXTS[:1]))
    with pytest.raises(TypeError, match="CLIP token ids"):
        model.encode_text(torch.zeros(1, 77, dtype=torch.long))


def test_a_long_text_is_read_whole(saved):
    """Two texts equal in their first 90 words (far past CLIP's 77 tokens) and different at the end encode
    differently; the CLIP tower of the same model cannot tell them apart."""
    _, model = saved
    head = " ".join(WORDS[i % len(WORDS)] for i in range(90))
    a, b = head + " red circle", head + " blue star"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        ours = model.encode_text(model.tokenize([a, b]))
        clip = model.clip.encode_text(model.clip.tokenize([a, b]))
    assert (ours[0] - ours[1]).abs().max() > 1e-3
    torch.testing.assert_close(clip[0], clip[1])


def test_precision_bookkeeping(saved):
    root, _ = saved
    model = load_llm_clip(root / "m")
    assert model.device == torch.device("cpu") and model.dtype == torch.float32 and model.precision == "fp32"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert model.set_precision("bf16") is model
    assert model.precision == "bf16" and model.adapter.proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert model.encode_text(model.tokenize(TEXTS[:2])).dtype == torch.float32


# --- model references ------------------------------------------------------------------------------------------
def test_resolve_model_reads_a_saved_directory(saved):
    root, model = saved
    assert is_llm_clip_dir(root / "m") and not is_llm_clip_dir(root / "emb") and not is_llm_clip_dir(None)
    got, info = resolve_model(str(root / "m"))
    assert isinstance(got, LLMTextCLIP) and info["kind"] == "path" and info["source"] == str(root / "m")
    assert info["fingerprint"] == fingerprint(model)
    assert info["name"] == "test-tiny+emb" and info["embed_dim"] == model.clip.config.embed_dim
    assert fingerprint(model) != fingerprint(model.clip)  # the tower is part of the identity
    back = load_model_from_info(info)
    with torch.no_grad():
        torch.testing.assert_close(back.encode_texts(TEXTS), model.encode_texts(TEXTS))
    same, obj = resolve_model(model)
    assert same is model and obj["kind"] == "object"


# --- the CLI ---------------------------------------------------------------------------------------------------
def run(*args):
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.stdout


def test_embed_index_search_on_a_saved_directory(saved, tmp_path):
    root, model = saved
    out = tmp_path / "emb"
    run("embed", "synthetic:12", "-m", root / "m", "-o", out)
    from cliplab.pipeline.embed import read_embeddings

    e = read_embeddings(out)
    assert e.manifest["tokenizer"]["name"] == model.tokenizer_id
    assert e.manifest["tokenizer"]["context_length"] == MAX_TOKENS
    with torch.no_grad():
        txt = model.encode_texts(e.captions, normalize=True, cache=False).numpy()
    np.testing.assert_allclose(e.text, txt, atol=1e-5)
    run("index", out, "--field", "text", "-o", out / "captions")
    hits = json.loads(run("search", out / "captions", e.captions[5], "-k", "3", "--json"))["hits"]
    assert hits[0]["caption"] == e.captions[5] and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    run("index", out, "-o", out / "images")  # images, queried by text through the LLM tower
    assert len(json.loads(run("search", out / "images", "a red circle", "-k", "2", "--json"))["hits"]) == 2


def test_embed_reads_long_captions_whole_and_counts_past_the_context(saved, tmp_path):
    root, model = saved
    table = tmp_path / "captions.csv"
    with table.open("w", newline="") as f:
        csv.writer(f).writerows([["caption"], [LONG], ["a red circle"], [TOO_LONG]])
    out = tmp_path / "emb"
    run("embed", table, "-m", root / "m", "-o", out)
    from cliplab.pipeline.embed import read_embeddings

    e = read_embeddings(out)
    counts = e.manifest["counts"]
    assert counts["captions_truncated"] == 1 and counts["tokens_dropped"] == 142 - MAX_TOKENS
    with torch.no_grad():
        np.testing.assert_allclose(e.text[:2], model.encode_texts([LONG, "a red circle"], normalize=True, cache=False).numpy(),
                                   atol=1e-5)
    strict = tmp_path / "strict"
    run("embed", table, "-m", root / "m", "-o", strict, "--no-truncate")
    assert read_embeddings(strict).manifest["counts"]["captions_too_long_rejected"] == 1


def test_eval_zeroshot_and_info_on_a_saved_directory(saved, tmp_path):
    root, model = saved
    out = tmp_path / "ev"
    run("eval", "zeroshot", "-m", root / "m", "--set", "n_per_class=2", "-o", out, "--cache-dir", tmp_path / "c")
    res = json.loads((out / "results.json").read_text())
    assert res["model"]["name"] == "test-tiny+emb" and res["num_images"] == 16
    info = json.loads(run("info", root / "m", "--json"))
    tower = info["text_tower"]
    assert tower["kind"] == "llm-embedder" and tower["embedder"] == str(root / "emb")
    assert (tower["embedder_dim"], tower["embed_dim"], tower["max_tokens"]) == (32, model.clip.config.embed_dim,
                                                                                 MAX_TOKENS)
    assert tower["adapter"] == model.adapter.config() and info["config"]["text"]["context_length"] == MAX_TOKENS
    text = run("info", root / "m")
    assert "text tower: " in text and "(mean pooling, 32-d, up to 128 tokens)" in text and "4 residual" in text


def test_classify_on_a_saved_directory(saved, tmp_path):
    root, model = saved
    scene = SceneWorld(image_size=64, seed=0).sample(0)
    scene.render().save(tmp_path / "a.png")
    labels = ["red circle", "blue square", "green star"]
    d = json.loads(run("classify", tmp_path / "a.png", "--labels", ",".join(labels), "--template", "a {}.",
                       "-m", root / "m", "--json"))
    with torch.no_grad():  # the classifier's class embeddings are the LLM tower's, through tokenize/encode_text
        img = model.encode_image(model.preprocess(tmp_path / "a.png")[None], normalize=True)
        txt = model.encode_texts([f"a {c}." for c in labels], normalize=True, cache=False)
    probs = (model.logit_scale.exp() * img @ txt.T).softmax(-1)[0]
    top = d["results"][0]["top"]
    assert [t["label"] for t in top] == [labels[int(k)] for k in probs.argsort(descending=True)]
    assert [t["prob"] for t in top] == pytest.approx(sorted(probs.tolist(), reverse=True), abs=1e-4)


def test_ray_engine_refuses_an_llm_tower_in_one_line():
    """Ray workers rebuild a plain CLIP from a weights blob, which cannot carry an LLM tower: refused up front (the
    embed command turns EngineUnavailable into a one-line error), never a failure inside an actor."""
    from types import SimpleNamespace

    from cliplab.pipeline.engines.ray_engine import EngineUnavailable, run_ray

    ctx = SimpleNamespace(model=SimpleNamespace(embedder=object()), options=None)
    with pytest.raises(EngineUnavailable, match="--engine local"):
        run_ray(ctx, [0])
