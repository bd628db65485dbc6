"""Recoverable Compression: batched LOF against scikit-learn, the kept union (visual keep + text recovery) and the
merge formula against reference loops on constructed tokens, injected outliers surviving, a needle named by the text
surviving where uniform sampling of the same count loses it, keep-all as the plain forward bit for bit, keyword
pass-through, and an effect check on the shipped model against random dropping at the same token count."""

from __future__ import annotations

import inspect
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_

import cliplab
from cliplab.vision_tokens import KeepTopK, encode_image_reduced
from cliplab.vision_tokens import recoverable_compression as rc_module
from cliplab.vision_tokens.recoverable_compression import RecoverableCompression, recoverable_compression
from cliplab.vision_tokens.saliency import local_outlier_factor, lof_outlier_fraction

DOC = Path(__file__).resolve().parents[1] / "docs" / "methods" / "recoverable_compression.md"


def _attention(scores: torch.Tensor, heads: int = 2) -> torch.Tensor:
    b, n = scores.shape
    attn = torch.full((b, heads, 1 + n, 1 + n), 1.0 / (1 + n))
    attn[:, :, 0, 1:] = scores.unsqueeze(1)
    attn[:, :, 0, 0] = 1.0 - scores.sum(-1, keepdim=True)
    return attn


def _world(n: int = 40, seed: int = 0, batch: int = 1, cls_out=(5, 17, 30), text_out=(11, 23)):
    """Constructed tokens ``[B, n, 16]``, keys ``[B, 2, 1 + n, 8]``, CLS scores with injected outliers at
    ``cls_out``, and a text feature that the tokens at ``text_out`` point along."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, n, 16, generator=g)
    text = F.normalize(torch.randn(batch, 16, generator=g), dim=-1)
    # random tokens, but a few point along the text (at distinct strengths: LOF is ill-conditioned on ties)
    strength = torch.linspace(3.0, 2.0, len(text_out)).view(1, -1, 1)
    tokens[:, list(text_out)] = strength * text.unsqueeze(1) + 0.3 * torch.randn(batch, len(text_out), 16, generator=g)
    scores = 0.01 + 0.002 * torch.randn(batch, n, generator=g).abs()
    scores[:, list(cls_out)] = torch.linspace(0.08, 0.1, len(cls_out))
    keys = torch.randn(batch, 2, 1 + n, 8, generator=g)
    return tokens, keys, _attention(scores), scores, text


def test_batched_lof_matches_scikit_learn():
    sklearn = pytest.importorskip("sklearn.neighbors")
    g = torch.Generator().manual_seed(0)
    points = torch.randn(3, 60, generator=g)
    points[:, :4] += 6.0
    for k in (5, 20):
        lof = local_outlier_factor(points, k)
        for b in range(3):
            ref = sklearn.LocalOutlierFactor(n_neighbors=k).fit(points[b].double().numpy()[:, None])
            assert torch.allclose(lof[b], torch.from_numpy(-ref.negative_outlier_factor_), atol=1e-9)
            flagged = int((ref.fit_predict(points[b].double().numpy()[:, None]) == -1).sum())
            assert math.isclose(float(lof_outlier_fraction(points[b:b + 1], k)), flagged / 60)


def test_injected_outliers_are_lof_outliers():
    g = torch.Generator().manual_seed(5)
    scores = torch.randn(4, 100, generator=g)
    scores[:, [3, 50, 77]] = torch.tensor([9.0, 10.0, -11.0])
    lof = local_outlier_factor(scores, 20)
    assert bool((lof[:, [3, 50, 77]] > 1.5).all())
    assert all(set(row.topk(3).indices.tolist()) == {3, 50, 77} for row in lof)  # the most outlying of all


@pytest.mark.parametrize("seed, cls_out, text_out", [(0, (5, 17, 30), (11, 23)),
                                                     (1, (0, 3, 5, 8, 17, 21, 30, 33, 36, 39), (11, 23, 28))])
def test_kept_tokens_are_the_union_of_visual_keep_and_text_recovery(seed, cls_out, text_out):
    # the second case keeps many tokens visually, so floor(r_t * (n - n_v)) differs from floor(r_t * n)
    tokens, keys, attn, scores, text = _world(seed=seed, cls_out=cls_out, text_out=text_out)
    reducer = RecoverableCompression(merge=False)
    out, step = reducer(tokens, attn, keys, text)
    n = tokens.shape[1]
    n_v = math.floor(float(lof_outlier_fraction(scores, 20)) * n)
    sim = F.cosine_similarity(tokens, text.unsqueeze(1), dim=-1) * 16 ** -0.5
    by_vision = scores[0].topk(n_v).indices.tolist()
    rest = [j for j in range(n) if j not in by_vision]
    n_t = math.floor(float(lof_outlier_fraction(sim[:, rest], 20)) * len(rest))
    by_text = [rest[j] for j in sim[0, rest].topk(n_t).indices.tolist()]
    kept = sorted(by_vision + by_text)
    assert (step[0] >= 0).nonzero().flatten().tolist() == kept
    assert set(cls_out) <= set(by_vision) and set(text_out) <= set(kept)  # injected outliers survive
    assert len(set(text_out) - set(by_vision)) <= n_t  # ... the text ones by recovery
    assert reducer.last_counts["vision"].tolist() == [n_v] and reducer.last_counts["text"].tolist() == [n_t]
    assert torch.equal(out[0], tokens[0, kept])
    # without the text only the visual keep is left
    _, step = RecoverableCompression(merge=False)(tokens, attn, keys, None)
    assert (step[0] >= 0).nonzero().flatten().tolist() == sorted(by_vision)


def _reference(tokens, keys, scores, text, n_v, n_t, n_c, cluster_size, text_weight=50.0):
    """The paper's algorithm for one image, by loops."""
    n = tokens.shape[0]
    sim = F.cosine_similarity(tokens, text.unsqueeze(0), dim=-1) * tokens.shape[-1] ** -0.5
    by_vision = sorted(range(n), key=lambda j: -float(scores[j]))[:n_v]
    by_text = sorted((j for j in range(n) if j not in by_vision), key=lambda j: -float(sim[j]))[:n_t]
    kept = sorted(by_vision + by_text)
    remaining = [j for j in range(n) if j not in kept]
    centres = sorted(remaining, key=lambda j: -float(scores[j]))[:n_c]
    kcat = F.normalize(keys[:, 1:].transpose(0, 1).reshape(n, -1), dim=-1)
    merged = []
    for c in centres:
        others = [j for j in remaining if j != c]
        affinity = {j: float(kcat[c] @ kcat[j]) + text_weight * float(sim[j]) for j in others}
        members = sorted(others, key=lambda j: -affinity[j])[:cluster_size]
        merged.append(tokens[c] + sum(scores[j] * tokens[j] for j in members))
    extra = sum(scores[j] * tokens[j] for j in remaining if j not in centres)
    return torch.stack([*tokens[kept], *merged, extra]), kept, centres


def test_merge_formula_matches_a_reference_loop():
    tokens, keys, attn, scores, text = _world(n=32, seed=3, batch=2)
    for ratio, cluster_size in [(0.5, 4), (0.75, 32)]:
        reducer = RecoverableCompression(ratio, cluster_size=cluster_size, centre_share=0.25)
        out, step = reducer(tokens, attn, keys, text)
        m = 32 - round(ratio * 32)
        n_c = round(0.25 * m)
        kept_count = m - n_c - 1
        n_v = kept_count - round(0.5 * kept_count)
        assert out.shape == (2, m, 16)
        for b in range(2):
            expected, kept, centres = _reference(tokens[b], keys[b], scores[b], text[b], n_v, kept_count - n_v, n_c,
                                                 cluster_size)
            assert torch.allclose(out[b], expected, atol=1e-5), (ratio, b)
            assert step[b, kept].tolist() == list(range(kept_count))
            assert step[b, centres].tolist() == list(range(kept_count, kept_count + n_c))
            others = [j for j in range(32) if j not in kept and j not in centres]
            assert step[b, others].tolist() == [m - 1] * len(others)  # the extra token stands for the rest


def test_a_needle_named_by_the_text_survives_where_uniform_sampling_loses_it():
    g = torch.Generator().manual_seed(7)
    n, needle = 64, 45
    text = F.normalize(torch.randn(1, 16, generator=g), dim=-1)
    tokens = torch.randn(1, n, 16, generator=g)
    tokens = tokens - (tokens @ text.unsqueeze(-1)) * text.unsqueeze(1)
    tokens[0, needle] += 2.0 * text[0]  # the small object the caption names
    scores = torch.full((1, n), 0.004)
    scores[0, 8:20] = 0.05  # a large salient object elsewhere
    scores[0, needle] = 0.001  # the needle draws no CLS attention
    keys = torch.randn(1, 2, 1 + n, 8, generator=g)
    attn = _attention(scores)

    def keeps_needle(step):
        return bool(step[0, needle] >= 0) and int((step[0] == step[0, needle]).sum()) == 1  # kept as itself

    ratio = 0.75  # 16 tokens out of 64
    _, step = RecoverableCompression(ratio)(tokens, attn, keys, text)
    assert keeps_needle(step)
    _, step = RecoverableCompression(ratio)(tokens, attn, keys, None)  # the stub without the text branch
    assert not keeps_needle(step)
    grid = torch.arange(0, n, 4)  # uniform sampling of 16 tokens
    assert needle not in grid.tolist()
    lost = sum(not keeps_needle(KeepTopK(ratio, "random", seed=s)(tokens)[1]) for s in range(20))
    assert lost >= 12


@pytest.fixture(scope="module")
def tiny():
    model = randomize_(cliplab.create_model("test-tiny", seed=0), seed=1).eval()
    return model, torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))


@torch.no_grad()
def test_keep_all_is_the_plain_forward_bit_for_bit(tiny):
    model, pixels = tiny
    plain = model.encode_image(pixels, output="tokens")
    text = model.encode_texts(["a red circle", "a blue square", "two stars"], normalize=True)
    for layer in range(1, model.config.vision.layers + 1):
        out = recoverable_compression(model, pixels, text, 0.0, layer, output="tokens")
        assert torch.equal(out.pooled, plain.pooled) and torch.equal(out.tokens, plain.tokens), layer
    out = recoverable_compression(model, pixels, "a red circle", 0.5, 1)
    assert out.extras["tokens_per_layer"] == [17, 9]
    assert recoverable_compression(model, pixels, None, 0.5).extras["tokens_per_layer"] == [17, 9]  # depth - 1
    with pytest.raises(ValueError, match="needs a block before it"):
        recoverable_compression(model, pixels, text, 0.5, 0)


def test_every_keyword_of_recoverable_compression_reaches_the_core(tiny, monkeypatch):
    model, pixels = tiny
    seen = {}
    real_init, real_encode = RecoverableCompression.__init__, rc_module.encode_image_reduced

    def spy_init(self, ratio=None, **kw):
        seen["reducer"] = {"ratio": ratio, **kw}
        real_init(self, ratio, **kw)

    def spy_encode(model, pixels, reducer, layer=0, **kw):
        seen["encode"] = {"layer": layer, **kw}
        return real_encode(model, pixels, reducer, layer, **kw)

    monkeypatch.setattr(RecoverableCompression, "__init__", spy_init)
    monkeypatch.setattr(rc_module, "encode_image_reduced", spy_encode)
    values = {"vision_neighbors": 7, "text_neighbors": 9, "centre_neighbors": 4, "lof_threshold": 1.3,
              "cluster_size": 5, "text_weight": 20.0, "vision_share": 0.7, "centre_share": 0.2, "merge": False}
    text = model.encode_texts(["a red circle"] * 3, normalize=True)
    out = recoverable_compression(model, pixels, text, 0.25, 1, output="tokens", normalize=True, **values)
    assert {k: v for k, v in seen["reducer"].items() if k != "project"} == {"ratio": 0.25, **values}
    assert callable(seen["reducer"]["project"])
    assert seen["encode"]["layer"] == 1 and seen["encode"]["output"] == "tokens" and seen["encode"]["normalize"]
    assert torch.equal(seen["encode"]["text"], text)
    assert torch.allclose(out.pooled.norm(dim=-1), torch.ones(3))
    # strings are encoded with the model's text tower
    recoverable_compression(model, pixels, ["a red circle"] * 3, 0.25, 1)
    assert torch.allclose(seen["encode"]["text"], text)
    signature = set(inspect.signature(recoverable_compression).parameters) - {"model", "pixels", "text"}
    assert signature == set(values) | {"ratio", "layer", "output", "normalize"}
    reducer = RecoverableCompression(0.25, **values)
    assert [getattr(reducer, k) for k in values] == list(values.values())


def test_docs_page_runs():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert blocks
    ns: dict = {"__name__": "docs_recoverable_compression"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"{DOC.name}[block {i}]", "exec"), ns)


@torch.no_grad()
def test_recoverable_compression_keeps_shapes_tiny_features_better_than_random_dropping():
    from cliplab.data.synthetic import SceneWorld

    model = cliplab.load("shapes-tiny").eval()
    world = SceneWorld(image_size=64, seed=7)
    scenes = [world.sample(i) for i in range(32)]
    pixels = torch.stack([model.preprocess(s.render()) for s in scenes])
    text = model.encode_texts([s.short_caption for s in scenes], normalize=True)
    plain = model.encode_image(pixels, normalize=True)
    rc = recoverable_compression(model, pixels, text, 0.75, 4, normalize=True)
    control = encode_image_reduced(model, pixels, KeepTopK(0.75, "random"), 4, normalize=True)
    assert rc.extras["tokens_per_layer"] == control.extras["tokens_per_layer"] == [65, 65, 65, 65, 17, 17]
    cos_rc = (rc.pooled * plain).sum(-1).mean().item()
    cos_control = (control.pooled * plain).sum(-1).mean().item()
    assert cos_rc > cos_control + 0.05, (cos_rc, cos_control)
