"""SigLIP: our model equals ``transformers.SiglipModel`` on the same random weights (tiny and base-sized), loads from
a ``save_pretrained`` directory, exposes tokens / hidden states / attention, exports to ONNX, runs in bf16, writes a
``SiglipModel`` directory, and trains through the ``siglip-tiny`` preset with its own logit bias."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import randomize_

import cliplab
from cliplab.models import CheckpointError
from cliplab.models.hooks import Hooks

transformers = pytest.importorskip("transformers")

TOL = 1e-4
PAD = 1  # SigLIP's </s>: its tokenizer pads every text to the full context length with it


def _hf_siglip(cfg: cliplab.ModelConfig, seed: int, fast_init: bool):
    """A ``SiglipModel`` of ``cfg``'s shape with every parameter perturbed. ``fast_init`` skips transformers'
    weight init (seconds at base size): LayerNorm gains start at 1, everything else at 0, then the perturbation."""
    from transformers.initialization import no_init_weights

    from cliplab.models.layouts.siglip import config_to_siglip

    hf_cfg = transformers.SiglipConfig.from_dict(config_to_siglip(cfg))
    torch.manual_seed(seed)
    if not fast_init:
        return randomize_(transformers.SiglipModel(hf_cfg).eval(), seed)
    with no_init_weights():
        model = transformers.SiglipModel(hf_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_gain = name.endswith("norm.weight") or name.endswith(("layer_norm1.weight", "layer_norm2.weight"))
            p.fill_(1.0 if is_gain else 0.0)
    return randomize_(model, seed, scale=0.05)


def _padded_ids(cfg: cliplab.ModelConfig, lengths: list[int], seed: int) -> torch.Tensor:
    """Fixed-length ids as SigLIP's tokenizer gives them: random tokens, then padding to the context length."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), cfg.text.context_length), PAD, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(2, cfg.text.vocab_size, (n,), generator=g)
    return ids


def _pixels(cfg: cliplab.ModelConfig, n: int, seed: int) -> torch.Tensor:
    s = cfg.vision.image_size
    return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=["siglip-tiny", pytest.param("ViT-B-16-SigLIP", marks=pytest.mark.slow)])
def pair(request, tmp_path_factory):
    cfg = cliplab.get_config(request.param)
    ref = _hf_siglip(cfg, seed=1, fast_init=request.param != "siglip-tiny")
    d = tmp_path_factory.mktemp("siglip") / request.param
    ref.save_pretrained(d)
    s = cfg.vision.image_size  # the tiny one resamples bilinearly: the loader must read it from the file
    transformers.SiglipImageProcessorPil(size={"height": s, "width": s},
                                         resample=2 if s < 100 else 3).save_pretrained(d)
    return ref, cliplab.load(d), d


@pytest.fixture(scope="module")
def reference(pair):
    """transformers' features and logits for two images and four fixed-length texts (one forward pass)."""
    ref, ours, _ = pair
    pixels = _pixels(ours.config, 2, seed=0)
    ids = _padded_ids(ours.config, [3, 10, 1, ours.config.text.context_length], seed=2)
    with torch.no_grad():
        out = ref(input_ids=ids, pixel_values=pixels)
    return {"pixels": pixels, "ids": ids, "image": out.vision_model_output.pooler_output,
            "text": out.text_model_output.pooler_output, "logits": out.logits_per_image}


@torch.no_grad()
def test_image_features_match_transformers(pair, reference):
    _, ours, _ = pair
    got = ours.encode_image(reference["pixels"])
    assert got.shape == reference["image"].shape == (2, ours.config.embed_dim)
    assert (got - reference["image"]).abs().max().item() <= TOL


@torch.no_grad()
def test_text_features_match_transformers_on_padded_ids(pair, reference):
    _, ours, _ = pair
    ids = reference["ids"]
    got = ours.encode_text(ids)
    assert (got - reference["text"]).abs().max().item() <= TOL
    # pooled at the last position and bidirectional: the padding changes the result (it is not cut away)
    assert (ours.encode_text(ids[:1, :4]) - got[:1]).abs().max().item() > 1e-3


@torch.no_grad()
def test_logits_with_bias_match_transformers(pair, reference):
    ref, ours, _ = pair
    got, per_text = ours(reference["pixels"], reference["ids"])
    assert got.shape == (2, 4) and torch.equal(per_text, got.t())
    assert (got - reference["logits"]).abs().max().item() <= TOL
    assert ours.logit_bias.item() == ref.logit_bias.item() != 0.0


def test_loaded_config_is_the_registered_siglip_architecture(pair):
    _, ours, d = pair
    cfg = ours.config
    assert cfg.family == "siglip" and cfg.name in cliplab.list_models("*siglip*")
    assert (cfg.vision.class_token, cfg.vision.pool, cfg.text.causal, cfg.text.pool) == (False, "map", False, "last")
    pre = json.loads((d / "preprocessor_config.json").read_text())
    assert cfg.preprocess.resize_mode == "squash" and cfg.preprocess.mean == tuple(pre["image_mean"]) == (0.5,) * 3
    assert cfg.preprocess.interpolation == {2: "bilinear", 3: "bicubic"}[pre["resample"]]


def test_list_models_lists_the_siglip_configs():
    assert {"siglip-tiny", "ViT-B-16-SigLIP", "ViT-B-16-SigLIP-256"} <= set(cliplab.list_models("*siglip*"))
    base = cliplab.get_config("ViT-B-16-SigLIP")
    assert (base.text.vocab_size, base.text.context_length, base.text.width, base.text.layers) == (32000, 64, 768, 12)
    assert base.layer_norm_eps == 1e-6 and base.init_logit_bias == -10.0
    assert base.init_logit_scale == pytest.approx(math.log(10))


@torch.no_grad()
def test_weights_file_alone_infers_the_architecture(pair):
    ref, ours, d = pair
    if ours.config.name != "ViT-B-16-SigLIP":
        pytest.skip("head count is inferred as width / 64: true of the base model, not of the 2-head tiny one")
    inferred = cliplab.load(d / "model.safetensors")
    assert inferred.config.name == "ViT-B-16-SigLIP"
    state = ours.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in inferred.state_dict().items())


# --- token-level view ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(pair):
    ref, ours, d = pair
    if ours.config.name != "siglip-tiny":
        pytest.skip("tiny-only check")
    return ref, ours, d


@torch.no_grad()
def test_rich_image_path_tokens_hidden_attn(tiny):
    ref, ours, _ = tiny
    cfg = ours.config.vision
    pixels = _pixels(ours.config, 2, seed=5)
    out = ours.encode_image(pixels, output=True)
    n = cfg.grid_size**2
    assert torch.equal(out.pooled, ours.encode_image(pixels))  # the rich path computes the plain path's bits
    assert torch.equal(out.tokens[:, 0], out.pooled)
    assert out.tokens.shape == (2, 1 + n, ours.config.embed_dim) and out.extras["grid"] == (4, 4)
    assert len(out.hidden) == cfg.layers + 1 and all(h.shape == (2, n, cfg.width) for h in out.hidden)
    assert len(out.attn) == cfg.layers and all(a.shape == (2, cfg.heads, n, n) for a in out.attn)
    head_attn = out.extras["head_attn"]
    assert head_attn.shape == (2, cfg.heads, 1, n) and torch.allclose(head_attn.sum(-1), torch.ones(2, cfg.heads, 1))
    # the last hidden state is transformers' encoder output; patch tokens are its value path through the head
    want_last = ref.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
    assert (out.hidden[-1] - want_last).abs().max().item() <= TOL
    head = ref.vision_model.head
    w = cfg.width
    y = ref.vision_model.post_layernorm(want_last)
    y = torch.nn.functional.linear(y, head.attention.in_proj_weight[2 * w:], head.attention.in_proj_bias[2 * w:])
    y = head.attention.out_proj(y)
    y = y + head.mlp(head.layernorm(y))
    assert (out.tokens[:, 1:] - y).abs().max().item() <= TOL


@torch.no_grad()
def test_noop_hooks_keep_and_prompts(tiny):
    _, ours, _ = tiny
    pixels = _pixels(ours.config, 2, seed=6)
    ids = _padded_ids(ours.config, [4, 9], seed=7)
    assert torch.equal(ours.encode_image(pixels, hooks=Hooks()).pooled, ours.encode_image(pixels))
    text = ours.encode_text(ids, output=True, hooks=Hooks())
    assert torch.equal(text.pooled, ours.encode_text(ids))
    assert text.pool_index.tolist() == [63, 63] and torch.equal(text.tokens[:, -1], text.pooled)
    assert all(h.shape == (2, 64, ours.config.text.width) for h in text.hidden)
    n = ours.config.vision.grid_size**2
    every = ours.encode_image(pixels, keep=torch.arange(n))
    assert (every.pooled - ours.encode_image(pixels)).abs().max().item() <= 1e-6
    some = ours.encode_image(pixels, keep=torch.tensor([0, 5, 9]), output="tokens")
    assert some.tokens.shape == (2, 4, ours.config.embed_dim)
    assert (some.pooled - ours.encode_image(pixels)).abs().max().item() > 1e-4  # fewer patches, another output
    prompted = ours.encode_image(pixels, prompts=torch.zeros(3, ours.config.vision.width), output="tokens")
    assert prompted.tokens.shape == (2, 1 + 3 + n, ours.config.embed_dim) and prompted.extras["n_prompts"] == 3


# --- writing, saving, precision, ONNX --------------------------------------------------------------------------------
@torch.no_grad()
def test_writes_a_siglipmodel_directory_and_saves_natively(tiny, tmp_path):
    ref, ours, _ = tiny
    out = cliplab.convert(ours, "hf", tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["model_type"] == "siglip"
    back = transformers.SiglipModel.from_pretrained(out).eval()
    ref_state = ref.state_dict()
    assert all(torch.equal(v, ref_state[k]) for k, v in back.state_dict().items())
    native = cliplab.load(ours.save(tmp_path / "native"))
    pixels, ids = _pixels(ours.config, 2, seed=8), _padded_ids(ours.config, [6, 3], seed=9)
    assert torch.equal(native.encode_image(pixels), ours.encode_image(pixels))
    assert torch.equal(native.encode_text(ids), ours.encode_text(ids))
    assert torch.equal(native.logit_bias, ours.logit_bias) and native.config.to_dict() == ours.config.to_dict()


@torch.no_grad()
def test_fast_mode_bf16_stays_close(tiny):
    _, ours, d = tiny
    fast = cliplab.load(d, precision="bf16")
    pixels, ids = _pixels(ours.config, 4, seed=10), _padded_ids(ours.config, [3, 7, 12, 30], seed=11)
    for got, want in ((fast.encode_image(pixels), ours.encode_image(pixels)),
                      (fast.encode_text(ids), ours.encode_text(ids))):
        assert got.dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(got, want).min().item() > 0.99


def test_onnx_export_parity(tiny, tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from cliplab.export import export_onnx, load_onnx

    _, ours, _ = tiny
    onnx_model = load_onnx(export_onnx(ours, tmp_path / "onnx"), threads=1)
    pixels, ids = _pixels(ours.config, 3, seed=12), _padded_ids(ours.config, [2, 20, 64], seed=13)
    with torch.no_grad():
        want_img, want_txt = ours.encode_image(pixels), ours.encode_text(ids)
        want_logits, _ = ours(pixels, ids)
    assert (onnx_model.encode_image(pixels) - want_img).abs().max().item() <= TOL
    assert (onnx_model.encode_text(ids) - want_txt).abs().max().item() <= TOL
    assert (onnx_model(pixels, ids)[0] - want_logits).abs().max().item() <= TOL  # the bias is in the manifest


# --- configs, preprocessing ------------------------------------------------------------------------------------------
def test_siglip_preprocessing_equals_transformers_processor():
    from PIL import Image

    from cliplab.models.preprocess import PreprocessConfig, Preprocessor

    cfg = cliplab.get_config("ViT-B-16-SigLIP")
    ours = Preprocessor(PreprocessConfig(**vars(cfg.preprocess)))
    processor = transformers.SiglipImageProcessorPil()
    rng = np.random.default_rng(0)
    for size in ((300, 200), (97, 411), (224, 224), (50, 60)):
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        want = processor(images=image, return_tensors="pt")["pixel_values"][0]
        assert torch.equal(ours(image), want), size


def test_siglip2_naflex_and_odd_configs_are_refused_clearly(tmp_path):
    from cliplab.models.layouts.siglip import config_from_siglip

    with pytest.raises(CheckpointError, match="siglip2.*NaFlex"):
        config_from_siglip({"model_type": "siglip2"})
    with pytest.raises(CheckpointError, match="vision_use_head"):
        config_from_siglip({"model_type": "siglip", "vision_config": {"vision_use_head": False}})
    with pytest.raises(CheckpointError, match="centre-crops"):
        config_from_siglip({"model_type": "siglip"}, {"do_center_crop": True})
    with pytest.raises(CheckpointError, match="only SigLIP's architecture"):
        cliplab.models.export_state(cliplab.create_model("test-tiny"), "siglip")


# --- training --------------------------------------------------------------------------------------------------------
def test_siglip_preset_trains_the_models_own_bias(tmp_path):
    from cliplab.cli import main

    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", "--preset", "siglip-tiny", "-o", str(out), "--steps", "40",
                                  "--set", "log_every=1", "--set", "checkpoint_every=0", "--set", "warmup_steps=5",
                                  "--no-progress"])
    assert r.exit_code == 0, r.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [rec["loss"] for rec in records]
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3]), losses
    model = cliplab.load(out / "final")
    assert model.config.family == "siglip" and model.logit_bias is not None
    # the loss read the model's bias (logged before each step's update), and the trained model carries it
    assert model.logit_bias.item() != -10.0 and records[0]["bias"] == -10.0
    assert abs(records[-1]["bias"] - model.logit_bias.item()) < 1e-2
