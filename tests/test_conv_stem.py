"""The hybrid ViT: a convolutional stem in front of the CLIP vision transformer (``vision.stem_channels``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import cliplab
from cliplab.models import ConfigError, ModelConfig
from cliplab.models.layouts import CheckpointError
from cliplab.models.loading import config_to_hf, export_state
from cliplab.models.stem import ConvStem


def stem_config(channels=(8, 16, 32)) -> ModelConfig:
    cfg = cliplab.get_config("test-tiny")
    vision = dataclasses.replace(cfg.vision, image_size=64, patch_size=2 ** len(channels), stem_channels=channels)
    return cfg.replace(name="stem-tiny", vision=vision)


def stem_of(cfg: ModelConfig, channels=(32, 64, 128)) -> ModelConfig:
    return cfg.replace(vision=dataclasses.replace(cfg.vision, stem_channels=channels))


def test_stem_depth_must_match_the_patch_size():
    cfg = cliplab.get_config("test-tiny")
    with pytest.raises(ConfigError, match="pools by 8, not patch_size 16"):
        dataclasses.replace(cfg.vision, image_size=64, patch_size=16, stem_channels=(8, 16, 32)).validate()
    with pytest.raises(ConfigError, match="positive"):
        dataclasses.replace(cfg.vision, image_size=64, patch_size=4, stem_channels=(8, 0)).validate()
    with pytest.raises(ConfigError, match="list of channel counts"):
        ModelConfig.from_dict({"vision": {"image_size": 64, "patch_size": 4, "stem_channels": "32"}})


def test_config_round_trip_and_patch_configs_unchanged():
    cfg = stem_config()
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.vision.stem_channels == (8, 16, 32)
    assert cfg.to_dict()["vision"]["stem_channels"] == [8, 16, 32]
    plain = cliplab.get_config("ViT-B-32")
    assert "stem_channels" not in plain.to_dict()["vision"]  # standard ViTs' configs and checkpoints are unchanged
    assert not plain.same_architecture(plain.replace(vision=dataclasses.replace(plain.vision, stem_channels=(8,) * 5)))
    assert cliplab.get_config("shapes-tiny-stem").vision.stem_channels == (32, 64, 128)
    assert cliplab.get_config("shapes-tiny-stem").same_architecture(stem_of(cliplab.get_config("shapes-tiny-plain")))


@torch.no_grad()
def test_token_grid_and_rich_path_match_the_plain_path():
    model = cliplab.create_model(stem_config(), seed=0).eval()
    pixels = torch.randn(3, 3, 64, 64)
    out = model.visual.forward_rich(pixels, want=frozenset({"tokens"}))
    assert out.tokens.shape == (3, 1 + 8 * 8, model.config.embed_dim) and out.extras["grid"] == (8, 8)
    torch.testing.assert_close(out.pooled, model.visual(pixels), rtol=0, atol=1e-6)
    keep = torch.tensor([0, 9, 63])  # patch dropping still addresses the 8x8 token grid
    assert model.visual.forward_rich(pixels, keep=keep, want=frozenset({"tokens"})).tokens.shape[1] == 4


@torch.no_grad()
def test_stem_is_exactly_shift_equivariant_by_one_token():
    """Max-pool stages make the stem commute with shifts by a whole token (2**stages pixels): an object on a zero
    background moved 8 px right gives the same features one token to the right. (With the zero biases of
    ``init_weights`` the background stays exactly zero at every stage, like the convolutions' zero padding, so the
    image border cannot break the symmetry.)"""
    torch.manual_seed(0)
    stem = ConvStem((8, 16, 32))
    stem.init_weights()
    image = torch.zeros(1, 3, 64, 64)
    image[..., 20:34, 12:30] = torch.rand(1, 3, 14, 18)
    moved = torch.roll(image, shifts=8, dims=-1)
    a, b = stem(image), stem(moved)
    assert a.shape == (1, 32, 8, 8)
    torch.testing.assert_close(b[..., 1:], a[..., :-1], rtol=0, atol=1e-6)
    assert a.abs().sum() > 0 and not torch.allclose(a, b)


def test_only_the_native_layout_holds_a_stem(tmp_path):
    model = cliplab.create_model(stem_config(), seed=0)
    for layout in ("openai", "hf"):
        with pytest.raises(CheckpointError, match="convolutional stem"):
            export_state(model, layout)
    with pytest.raises(CheckpointError, match="convolutional stem"):
        config_to_hf(model.config)
    model.save(tmp_path / "m")
    again = cliplab.load(tmp_path / "m")
    assert again.config.vision.stem_channels == (8, 16, 32)
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_onnx_export_keeps_the_stem(tmp_path):
    pytest.importorskip("onnxruntime")
    from cliplab.export import export_onnx, load_onnx
    from cliplab.export.parity import check_parity

    model = cliplab.create_model(stem_config(), seed=0).eval()
    export_onnx(model, tmp_path / "onnx", towers="image")
    assert check_parity(model, load_onnx(tmp_path / "onnx"))["image"]["max_abs_diff"] < 1e-4


# --- the max-skip: a linear map of the max-pooled stem features added to the output ---------------------------------

def maxskip_config() -> ModelConfig:
    cfg = stem_config()
    return cfg.replace(name="maxskip-tiny", vision=dataclasses.replace(cfg.vision, stem_max_skip=True))


def stem_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """``[B, grid**2, C]``: the stem's feature map, one row per patch (row-major, like the tokens)."""
    return model.visual.stem(pixels).flatten(2).transpose(1, 2)


def test_max_skip_config():
    cfg = maxskip_config()
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["vision"]["stem_max_skip"] is True
    assert "stem_max_skip" not in stem_config().to_dict()["vision"]  # off: configs serialise as before
    with pytest.raises(ConfigError, match="needs a convolutional stem"):
        dataclasses.replace(cliplab.get_config("test-tiny").vision, stem_max_skip=True).validate()
    with pytest.raises(ConfigError, match="true or false"):
        dataclasses.replace(cfg.vision, stem_max_skip=1).validate()
    from click.testing import CliRunner

    from cliplab.cli import main

    r = CliRunner().invoke(main, ["info", "shapes-tiny"])
    assert r.exit_code == 0 and "conv stem 32-64-128 + max-skip" in r.output, r.output
    assert cliplab.get_config("shapes-tiny").same_architecture(  # the shipped default
        cliplab.get_config("shapes-tiny-stem").replace(
            vision=dataclasses.replace(cliplab.get_config("shapes-tiny-stem").vision, stem_max_skip=True)))


@torch.no_grad()
def test_max_skip_is_the_stem_model_plus_a_linear_map_of_the_max_pooled_stem_features():
    """Closed form: pooled = (the stem ViT's CLS output) + W max_p f_p, with the same weights; W = 0 gives the stem
    ViT bit for bit."""
    skip = cliplab.create_model(maxskip_config(), seed=0).eval()
    plain = cliplab.create_model(stem_config(), seed=0).eval()
    missing, unexpected = plain.load_state_dict(skip.state_dict(), strict=False)
    assert not missing and unexpected == ["visual.stem_skip.weight"]
    pixels = torch.randn(4, 3, 64, 64)
    expected = plain.visual(pixels) + stem_features(plain, pixels).amax(1) @ skip.visual.stem_skip.weight.t()
    torch.testing.assert_close(skip.visual(pixels), expected, rtol=0, atol=1e-6)
    assert (skip.visual(pixels) - plain.visual(pixels)).abs().max() > 1e-3  # the side path does contribute
    skip.visual.stem_skip.weight.zero_()
    assert torch.equal(skip.visual(pixels), plain.visual(pixels))


@torch.no_grad()
def test_max_skip_tokens_and_dropped_patches():
    """The rich path gives the plain path's pooled output; each patch token gains its own cell's stem feature; with
    ``keep=`` the max runs over the kept patches only."""
    model = cliplab.create_model(maxskip_config(), seed=0).eval()
    plain = cliplab.create_model(stem_config(), seed=0).eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    pixels = torch.randn(2, 3, 64, 64)
    w = model.visual.stem_skip.weight
    features = stem_features(model, pixels)
    out = model.visual.forward_rich(pixels, want=frozenset({"tokens"}))
    base = plain.visual.forward_rich(pixels, want=frozenset({"tokens"}))
    torch.testing.assert_close(out.pooled, model.visual(pixels), rtol=0, atol=1e-6)
    assert torch.equal(out.tokens[:, 0], out.pooled)
    torch.testing.assert_close(out.tokens[:, 1:], base.tokens[:, 1:] + features @ w.t(), rtol=0, atol=1e-6)
    keep = torch.tensor([3, 17, 40])
    kept = model.visual.forward_rich(pixels, keep=keep)
    base_kept = plain.visual.forward_rich(pixels, keep=keep)
    torch.testing.assert_close(kept.pooled, base_kept.pooled + features[:, keep].amax(1) @ w.t(), rtol=0, atol=1e-6)
    # with visual prompts after CLS as well: the kept patches' tokens, behind the prompts, gain their own features
    prompts = torch.randn(2, model.config.vision.width)
    both = model.visual.forward_rich(pixels, keep=keep, prompts=prompts, want=frozenset({"tokens"}))
    base_both = plain.visual.forward_rich(pixels, keep=keep, prompts=prompts, want=frozenset({"tokens"}))
    torch.testing.assert_close(both.tokens[:, 3:], base_both.tokens[:, 3:] + features[:, keep] @ w.t(), rtol=0,
                               atol=1e-6)
    torch.testing.assert_close(both.tokens[:, 1:3], base_both.tokens[:, 1:3], rtol=0, atol=0)


def test_max_skip_exports_and_reloads(tmp_path):
    model = cliplab.create_model(maxskip_config(), seed=0).eval()
    model.save(tmp_path / "m")
    again = cliplab.load(tmp_path / "m").eval()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(again.visual(pixels), model.visual(pixels))
    pytest.importorskip("onnxruntime")
    from cliplab.export import export_onnx, load_onnx
    from cliplab.export.parity import check_parity

    export_onnx(model, tmp_path / "onnx", towers="image")
    assert check_parity(model, load_onnx(tmp_path / "onnx"))["image"]["max_abs_diff"] < 1e-4
