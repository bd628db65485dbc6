"""Named token reducers and reduction specs (``cliplab.vision_tokens.registry``): parsing, each method's default
layer, the reduced image encoder (keep-all is the plain encoder; its cache key differs), ``cliplab eval --reduce``
end to end, and the benchmark's method table built from the registry."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import cliplab
import cliplab.vision_tokens.registry as registry
from cliplab.cli import main
from cliplab.eval.cache import CachedEncoder
from cliplab.vision_tokens import ReducedImageEncoder, Reduction, list_reducers


@pytest.fixture(scope="module")
def model():
    return cliplab.create_model("test-tiny", seed=0).eval()


def test_every_method_and_baseline_is_registered():
    assert set(list_reducers()) >= {"tome", "keep-random", "keep-cls-attention", "centerclip", "tcc_compress",
                                    "recoverable_compression"}


@pytest.mark.parametrize("spec,name,keep,layer", [("tome", "tome", 0.5, None), ("centerclip:0.25", "centerclip", 0.25,
                                                   None), ("tcc_compress:0.75@2", "tcc_compress", 0.75, 2)])
def test_specs_parse(spec, name, keep, layer):
    assert Reduction.parse(spec) == Reduction(name, keep, layer)


@pytest.mark.parametrize("spec", ["", "tome:", "tome:0", "tome:1.5", "tome:0.5.5", "tome@x", "nope:0.5"])
def test_bad_specs_fail_with_one_clear_error(spec):
    with pytest.raises((ValueError, KeyError)):
        Reduction.parse(spec)


def test_default_layers_follow_the_papers(model):
    depth = len(model.visual.transformer.blocks)
    assert Reduction.parse("centerclip").canonical(model) == f"centerclip:0.5@{depth // 2}"
    assert Reduction.parse("tcc_compress").canonical(model) == f"tcc_compress:0.5@{depth}"
    assert Reduction.parse("recoverable_compression").canonical(model) == f"recoverable_compression:0.5@{depth - 1}"
    assert Reduction.parse("tome@0").canonical(model) == "tome:0.5@0"
    with pytest.raises(ValueError, match="outside"):
        Reduction.parse(f"tome@{depth + 1}").resolve(model)


@torch.no_grad()
@pytest.mark.parametrize("name", ["tome", "keep-random", "keep-cls-attention", "centerclip", "tcc_compress",
                                  "recoverable_compression"])
def test_each_reducer_runs_and_keep_all_is_the_plain_forward(model, name):
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    n = model.config.vision.grid_size ** 2
    enc = ReducedImageEncoder(model, f"{name}:0.75@1")
    out = cliplab.vision_tokens.encode_image_reduced(model, pixels, enc.reducer, layer=1)
    assert out.extras["tokens_per_layer"][1] == 1 + n - round(0.25 * n)  # keep 0.75 of the patches
    assert torch.isfinite(enc(pixels)).all()
    assert torch.equal(ReducedImageEncoder(model, f"{name}:1@1")(pixels), model.encode_image(pixels))


def test_the_reduction_joins_the_image_cache_key(model):
    plain = CachedEncoder(model).image_space.params
    reduced = CachedEncoder(model, image_encoder=ReducedImageEncoder(model, "tome:0.5@1")).image_space.params
    assert plain != reduced and reduced["reduction"] == "tome:0.5@1"


def test_eval_reduce_reaches_the_reducer(monkeypatch, tmp_path):
    seen = []
    real = registry.encode_image_reduced

    def spy(model, pixels, reducer, layer, **kw):
        seen.append((type(reducer).__name__, reducer.ratio, layer))
        return real(model, pixels, reducer, layer, **kw)

    monkeypatch.setattr(registry, "encode_image_reduced", spy)
    args = ["eval", "zeroshot", "-m", "test-tiny", "--random-init", "--set", "n_per_class=1", "--set",
            "image_size=32", "--no-cache", "--json", "-o", str(tmp_path), "--reduce", "centerclip:0.25@2"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    res = json.loads(result.stdout)
    assert res["model"]["reduction"] == "centerclip:0.25@2"
    assert seen and all(s == ("CenterCLIP", 0.75, 2) for s in seen)
    bad = CliRunner().invoke(main, args[:-1] + ["tome:2"])
    assert bad.exit_code == 2 and "--reduce" in bad.output
