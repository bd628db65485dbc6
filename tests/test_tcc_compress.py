"""TCC (token-level correlation-guided compression): the redundancy rule against a brute-force loop, the keep count
against the density formula on constructed tokens, duplicated patches going first, top-K of the CLS score, keep-all
as the plain forward bit for bit, keyword pass-through, and an effect check on the shipped model against random
dropping at the same token count."""

from __future__ import annotations

import inspect
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import randomize_

import cliplab
from cliplab.vision_tokens import KeepTopK, encode_image_reduced
from cliplab.vision_tokens import tcc_compress as tcc_module
from cliplab.vision_tokens.tcc_compress import (
    TCCCompress,
    information_density,
    redundant_tokens,
    tcc_compress,
    tcc_keep_count,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "methods" / "tcc_compress.md"


def _attention_with_cls_scores(scores: torch.Tensor, heads: int = 2) -> torch.Tensor:
    """``[B, H, 1 + n, 1 + n]`` probabilities whose CLS row gives ``scores`` to the patches (head mean)."""
    b, n = scores.shape
    attn = torch.full((b, heads, 1 + n, 1 + n), 1.0 / (1 + n))
    attn[:, :, 0, 1:] = scores.unsqueeze(1)
    attn[:, :, 0, 0] = 1.0 - scores.sum(-1, keepdim=True)
    return attn


def _tokens_with_duplicates(seed: int = 0):
    """12 tokens: 2..5 are copies of one token, 8 and 9 another; everything else distinct."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(1, 12, 16, generator=g)
    tokens[0, 3:6] = tokens[0, 2]
    tokens[0, 9] = tokens[0, 8]
    return tokens


def test_redundancy_matches_a_brute_force_loop():
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(4, 8, generator=g)
    metric = centres[torch.randint(0, 4, (2, 20), generator=g)] + 0.3 * torch.randn(2, 20, 8, generator=g)
    scores = torch.rand(2, 20, generator=g)
    scores[0, 5] = scores[0, 6]  # a tie: the lower index ranks above
    for threshold, limit in [(0.9, 1), (0.7, 2), (0.5, 3)]:
        got = redundant_tokens(metric, scores, threshold, limit)
        unit = torch.nn.functional.normalize(metric, dim=-1)
        for b in range(2):
            for i in range(20):
                above = [j for j in range(20) if j != i and float(unit[b, i] @ unit[b, j]) > threshold
                         and (scores[b, j] > scores[b, i] or (scores[b, j] == scores[b, i] and j < i))]
                assert bool(got[b, i]) == (len(above) >= limit), (threshold, limit, b, i)


def test_keep_count_follows_the_density_formula():
    tokens = _tokens_with_duplicates()
    scores = torch.linspace(0.01, 0.12, 12).unsqueeze(0)  # later tokens score higher: 5 and 9 represent groups
    redundant = redundant_tokens(tokens, scores, 0.99)
    assert redundant[0].nonzero().flatten().tolist() == [2, 3, 4, 8]
    density = information_density(tokens, scores, 0.99)
    assert density.tolist() == [1 - 4 / 12]
    assert tcc_keep_count(density, 12).tolist() == [8]
    assert tcc_keep_count(density, 12, density_scale=0.3).tolist() == [math.ceil(0.3 * 8)]
    assert tcc_keep_count(density, 12, density_scale=0.3, min_keep=5).tolist() == [5]
    assert tcc_keep_count(density, 12, density_scale=0.3, n_global=torch.tensor([6])).tolist() == [6]
    # more blank (duplicated) patches, lower density
    more = tokens.clone()
    more[0, 6] = more[0, 2]
    assert information_density(more, scores, 0.99) < density
    # the reducer keeps exactly that count in adaptive mode
    attn = _attention_with_cls_scores(scores)
    for scale, expected in [(1.0, 8), (0.5, 4)]:
        reducer = TCCCompress(metric="tokens", threshold=0.99, density_scale=scale, global_outliers=False)
        kept, step = reducer(tokens, attn)
        assert kept.shape == (1, expected, 16) and reducer.last_counts.tolist() == [expected]
        assert reducer.last_density.tolist() == [1 - 4 / 12]


def test_duplicated_patches_are_the_first_to_go():
    tokens = _tokens_with_duplicates()
    # the duplicates score *highest*: plain CLS top-K would keep them all
    scores = torch.tensor([[0.01, 0.02, 0.20, 0.19, 0.18, 0.17, 0.03, 0.04, 0.16, 0.15, 0.05, 0.06]])
    attn = _attention_with_cls_scores(scores)
    kept, step = TCCCompress(metric="tokens", threshold=0.99, global_outliers=False)(tokens, attn)
    survivors = (step[0] >= 0).nonzero().flatten().tolist()
    assert survivors == [0, 1, 2, 6, 7, 8, 10, 11]  # one representative of each group (its best-scoring member)
    assert torch.equal(kept[0], tokens[0, survivors])
    fixed, step = TCCCompress(4 / 12, metric="tokens", threshold=0.99, global_outliers=False)(tokens, attn)
    assert (step[0] >= 0).nonzero().flatten().tolist() == survivors
    # past the duplicates, the lowest CLS scores go next
    _, step = TCCCompress(6 / 12, metric="tokens", threshold=0.99, global_outliers=False)(tokens, attn)
    assert (step[0] >= 0).nonzero().flatten().tolist() == [2, 6, 7, 8, 10, 11]
    control, cstep = KeepTopK(4 / 12)(tokens, attn)
    assert set((cstep[0] >= 0).nonzero().flatten().tolist()) >= {2, 3, 4, 5}  # the control keeps the copies


def test_selection_is_the_top_k_of_the_cls_score_with_global_outliers_first():
    g = torch.Generator().manual_seed(4)
    tokens = torch.randn(3, 30, 16, generator=g)  # distinct: nothing redundant
    scores = torch.rand(3, 30, generator=g) * 0.02
    attn = _attention_with_cls_scores(scores)
    for ratio in (0.2, 0.5, 0.9):
        _, step = TCCCompress(ratio, metric="tokens")(tokens, attn)
        k = 30 - round(ratio * 30)
        for b in range(3):
            assert (step[b] >= 0).nonzero().flatten().tolist() == scores[b].topk(k).indices.sort().values.tolist()
    # a redundant token that is an IQR outlier of the CLS score still ranks above non-redundant ones
    tokens[0, 7] = tokens[0, 3]
    scores[0, 3], scores[0, 7] = 0.5, 0.4
    attn = _attention_with_cls_scores(scores)
    _, step = TCCCompress(29 / 30, metric="tokens", threshold=0.99)(tokens, attn)
    assert (step[0] >= 0).nonzero().flatten().tolist() == [3]
    _, step = TCCCompress(28 / 30, metric="tokens", threshold=0.99)(tokens, attn)
    assert (step[0] >= 0).nonzero().flatten().tolist() == [3, 7]
    _, step = TCCCompress(28 / 30, metric="tokens", threshold=0.99, global_outliers=False)(tokens, attn)
    assert 7 not in (step[0] >= 0).nonzero().flatten().tolist()


@pytest.fixture(scope="module")
def tiny():
    model = randomize_(cliplab.create_model("test-tiny", seed=0), seed=1).eval()
    return model, torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))


@torch.no_grad()
def test_keep_all_is_the_plain_forward_bit_for_bit(tiny):
    model, pixels = tiny
    plain = model.encode_image(pixels, output="tokens")
    depth = model.config.vision.layers
    for layer in range(1, depth + 1):
        for out in (tcc_compress(model, pixels, 0.0, layer, output="tokens"),
                    tcc_compress(model, pixels, None, layer, threshold=1.01, output="tokens")):  # rho = 1: K = n
            assert torch.equal(out.pooled, plain.pooled), layer
            assert torch.equal(out.tokens, plain.tokens), layer
    out = tcc_compress(model, pixels, 0.5, 1)
    assert out.extras["tokens_per_layer"] == [17, 9] and out.extras["tcc_counts"].tolist() == [8, 8, 8]
    assert tcc_compress(model, pixels, 0.5).extras["tokens_per_layer"] == [17, 17]  # default: after the last block
    with pytest.raises(ValueError, match="needs a block before it"):
        tcc_compress(model, pixels, 0.5, 0)


def test_every_keyword_of_tcc_compress_reaches_the_core(tiny, monkeypatch):
    model, pixels = tiny
    seen = {}
    real_init, real_encode = TCCCompress.__init__, tcc_module.encode_image_reduced

    def spy_init(self, ratio=None, **kw):
        seen["reducer"] = {"ratio": ratio, **kw}
        real_init(self, ratio, **kw)

    def spy_encode(model, pixels, reducer, layer=0, **kw):
        seen["encode"] = {"layer": layer, **kw}
        return real_encode(model, pixels, reducer, layer, **kw)

    monkeypatch.setattr(TCCCompress, "__init__", spy_init)
    monkeypatch.setattr(tcc_module, "encode_image_reduced", spy_encode)
    values = {"threshold": 0.7, "limit": 2, "density_scale": 0.6, "min_keep": 3, "metric": "tokens",
              "global_outliers": False, "whisker": 2.5}
    out = tcc_compress(model, pixels, 0.25, 2, output="tokens", normalize=True, **values)
    assert seen["reducer"] == {"ratio": 0.25, **values}
    assert seen["encode"] == {"layer": 2, "output": "tokens", "normalize": True}
    assert torch.allclose(out.pooled.norm(dim=-1), torch.ones(3))
    signature = set(inspect.signature(tcc_compress).parameters) - {"model", "pixels"}
    assert signature == set(values) | {"ratio", "layer", "output", "normalize"}
    reducer = TCCCompress(0.25, **values)
    assert [getattr(reducer, k) for k in values] == list(values.values())


def test_docs_page_runs():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert blocks
    ns: dict = {"__name__": "docs_tcc_compress"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"{DOC.name}[block {i}]", "exec"), ns)


@torch.no_grad()
def test_tcc_keeps_shapes_tiny_features_better_than_random_dropping():
    from cliplab.data.synthetic import SceneWorld

    model = cliplab.load("shapes-tiny").eval()
    world = SceneWorld(image_size=64, seed=7)
    pixels = torch.stack([model.preprocess(world.sample(i).render()) for i in range(64)])
    plain = model.encode_image(pixels, normalize=True)
    # 75% of the patches dropped before block 4 (CLS attention is not yet informative before block 2 here)
    tcc = encode_image_reduced(model, pixels, TCCCompress(0.75), 4, normalize=True)
    control = encode_image_reduced(model, pixels, KeepTopK(0.75, "random"), 4, normalize=True)
    assert tcc.extras["tokens_per_layer"] == control.extras["tokens_per_layer"] == [65, 65, 65, 65, 17, 17]
    cos_tcc = (tcc.pooled * plain).sum(-1).mean().item()
    cos_control = (control.pooled * plain).sum(-1).mean().item()
    assert cos_tcc > cos_control + 0.05, (cos_tcc, cos_control)
