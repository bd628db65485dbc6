"""Registry and model behaviour, parametrised over every registered architecture (timm style)."""

from __future__ import annotations

import pytest
import torch

import cliplab
from cliplab.models import CLIP
from conftest import CAPTIONS

ALL = cliplab.list_models()


def test_registry_lists_required_architectures():
    for name in ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "test-tiny"]:
        assert name in ALL
        assert name + "-quickgelu" in ALL or name == "test-tiny"
    assert cliplab.list_models("*l-14*") == ["ViT-L-14", "ViT-L-14-336", "ViT-L-14-336-quickgelu",
                                             "ViT-L-14-quickgelu"]
    assert cliplab.get_config("ViT-B-32-quickgelu").vision.act == "quick_gelu"
    assert cliplab.get_config("ViT-B-32").vision.act == "gelu"


def test_unknown_model_suggests_names():
    with pytest.raises(KeyError, match="ViT-B-32"):
        cliplab.get_config("vit-b-32")


@pytest.mark.parametrize("name", ALL)
def test_every_config_builds_with_expected_shapes(name):
    cfg = cliplab.get_config(name)
    with torch.device("meta"):  # shape-level forward: no memory, no compute
        model = CLIP(cfg)
        s = cfg.vision.image_size
        img = model.encode_image(torch.empty(2, 3, s, s))
        txt = model.text.transformer(torch.empty(2, cfg.text.context_length, cfg.text.width), causal=True)
    assert img.shape == (2, cfg.embed_dim) and txt.shape == (2, cfg.text.context_length, cfg.text.width)
    assert cfg.preprocess.image_size == cfg.vision.image_size


def test_param_counts_match_published_sizes():
    def count(name):
        with torch.device("meta"):
            return sum(p.numel() for p in CLIP(cliplab.get_config(name)).parameters())

    assert abs(count("ViT-B-32") - 151_277_313) < 1_000  # OpenAI ViT-B/32
    assert abs(count("ViT-L-14") - 427_616_513) < 1_000  # OpenAI ViT-L/14


def test_create_model_seeded_is_reproducible():
    a = cliplab.create_model("test-tiny", seed=3)
    b = cliplab.create_model("test-tiny", seed=3)
    c = cliplab.create_model("test-tiny", seed=4)
    assert torch.equal(a.text.token_embed.weight, b.text.token_embed.weight)
    assert not torch.equal(a.text.token_embed.weight, c.text.token_embed.weight)


@torch.no_grad()
def test_cutting_to_longest_is_exact_and_rows_are_independent():
    model = cliplab.create_model("test-tiny", seed=0).eval()
    batch = model.tokenize(CAPTIONS[:4])
    full = model.encode_text(batch)
    # each row alone (cut to its own length) gives the same features as in the padded batch
    for i in range(4):
        alone = model.encode_text(batch.ids[i : i + 1, : int(batch.lengths[i])])
        assert torch.allclose(alone[0], full[i], atol=1e-6)


@torch.no_grad()
def test_uniform_api():
    model = cliplab.create_model("test-tiny", seed=0).eval()
    from PIL import Image

    img = Image.new("RGB", (50, 40), (200, 30, 30))
    pixels = model.preprocess(img)
    assert pixels.shape == (3, 32, 32)
    feats = model.encode_image(pixels[None], normalize=True)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(1))
    txt = model.encode_texts(CAPTIONS, batch_size=3, normalize=True)
    assert txt.shape == (len(CAPTIONS), 64)
    assert torch.allclose(txt, model.encode_text(model.tokenize(CAPTIONS), normalize=True), atol=1e-5)
    assert model.logit_scale.item() == pytest.approx(cliplab.get_config("test-tiny").init_logit_scale)
    logits_img, logits_txt = model(pixels[None], model.tokenize(CAPTIONS[:2]))
    assert logits_img.shape == (1, 2) and torch.equal(logits_txt, logits_img.t())


def test_wrong_image_size_is_a_clear_error():
    model = cliplab.create_model("test-tiny", seed=0)
    with pytest.raises(ValueError, match="32x32"):
        model.encode_image(torch.zeros(1, 3, 64, 64))


def test_register_config_adds_an_architecture():
    cfg = cliplab.get_config("test-tiny").replace(name="test-tiny-wide", embed_dim=32)
    cliplab.register_config(cfg)
    assert "test-tiny-wide" in cliplab.list_models("test-*")
    assert cliplab.create_model("test-tiny-wide").encode_text(torch.tensor([[49406, 49407]])).shape == (1, 32)
    with pytest.raises(Exception, match="already registered"):
        cliplab.register_config(cfg)


@torch.no_grad()
def test_encode_texts_buckets_by_length_and_keeps_input_order():
    model = cliplab.create_model("test-tiny", seed=0).eval()
    texts = [CAPTIONS[i % len(CAPTIONS)] for i in (3, 0, 6, 1, 7, 2, 4, 0)]
    got = model.encode_texts(texts, batch_size=3)
    for i, t in enumerate(texts):  # each row equals the text encoded alone (padding never matters: causal + EOT)
        assert torch.allclose(got[i], model.encode_text(model.tokenize([t]))[0], atol=1e-5), i
    assert model.encode_texts([]).shape == (0, 64)
