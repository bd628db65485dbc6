"""DECOR: exact properties of the projection, the model wiring, and effect tests (stand-in + trained model)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import cliplab
from cliplab.text_edit.decor import (concept_basis, concept_vectors, decor_intervention, decor_project, projector,
                                     remove_concepts)
from cliplab.tokens import InterventionSet
from conftest import randomize_

G = lambda s: torch.Generator().manual_seed(s)  # noqa: E731


@pytest.fixture(scope="module")
def model():
    return randomize_(cliplab.create_model("test-tiny", seed=0), seed=1).eval()


# --- the projection ---------------------------------------------------------------------------------------------------
def test_alpha_one_removes_the_span_alpha_zero_is_identity():
    x = torch.randn(2, 9, 32, generator=G(0)) * 3  # per-token sequences [B, L, d]
    unwanted = torch.randn(3, 32, generator=G(1))
    v = concept_basis(unwanted)
    assert v.shape == (32, 3) and torch.allclose(v.T @ v, torch.eye(3, dtype=torch.float64), atol=1e-12)
    out = decor_project(x, unwanted, alpha=1.0)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert (out.double() @ v).abs().max() < 1e-6  # X'V = 0
    assert (out.double() @ unwanted.double().T).abs().max() < 1e-5  # orthogonal to every unwanted vector
    assert torch.equal(decor_project(x, unwanted, alpha=0.0), x)  # identity, bit for bit
    pooled = x[:, 0]  # pooled [B, d] works the same way
    assert (decor_project(pooled, unwanted).double() @ v).abs().max() < 1e-6


def test_projector_is_idempotent_symmetric_and_spans_the_unwanted():
    unwanted = torch.randn(4, 20, generator=G(2))
    p = projector(unwanted)
    assert torch.allclose(p @ p, p, atol=1e-12) and torch.allclose(p, p.T, atol=0)
    assert abs(float(torch.trace(p)) - 4) < 1e-10
    u = unwanted.double()
    assert torch.allclose(u @ p, u, atol=1e-12)  # P fixes the unwanted vectors
    ref = u.T @ torch.linalg.inv(u @ u.T) @ u  # brute force: the projector onto the row space
    assert torch.allclose(p, ref, atol=1e-10)


def test_components_orthogonal_to_the_span_are_unchanged():
    unwanted = torch.randn(2, 16, generator=G(3))
    p = projector(unwanted)
    x = torch.randn(10, 16, generator=G(4), dtype=torch.float64)
    perp, par = x - x @ p, x @ p
    for alpha in (0.0, 0.3, 1.0):
        assert torch.allclose(decor_project(perp, unwanted, alpha), perp, atol=1e-12)
        assert torch.allclose(decor_project(x, unwanted, alpha), perp + (1 - alpha) * par, atol=1e-12)


def test_rank_selection():
    a, b = torch.randn(2, 12, generator=G(5), dtype=torch.float64)
    dependent = torch.stack([a, b, a + b, 2 * a])  # rank 2
    assert concept_basis(dependent).shape == (12, 2)  # null directions are never used
    assert concept_basis(dependent, rank=5).shape == (12, 2)
    top = concept_basis(dependent, rank=1)
    _, _, vh = torch.linalg.svd(dependent)
    assert torch.allclose(top[:, 0].abs(), vh[0].abs(), atol=1e-10)  # the top right singular vector
    assert torch.equal(decor_project(a.unsqueeze(0), dependent, rank=0), a.unsqueeze(0))
    assert concept_basis(torch.zeros(2, 12)).shape == (12, 0)


def test_the_noise_tolerance_is_the_input_dtypes():
    """float32 concept vectors that are dependent up to float32 round-off: the rounding directions (singular values
    ~1e-7 of the largest) are noise at float32's epsilon, not at float64's (which would keep them)."""
    a, b = torch.randn(2, 64, generator=G(6))  # float32
    dependent = torch.stack([a, b, a + b, a - 3 * b, 0.1 * a + 0.7 * b])  # rank 2 in exact arithmetic
    s = torch.linalg.svdvals(dependent.double())
    assert s[2] > s[0] * max(dependent.shape) * torch.finfo(torch.float64).eps  # round-off above float64's noise
    assert concept_basis(dependent).shape == (64, 2)
    assert concept_basis(dependent.double()).shape == (64, 5)  # as float64 data the same values are full rank


def test_remove_concepts_passes_rank_and_alpha_on(model):
    with torch.no_grad():
        unwanted = concept_vectors(model, ["dog", "watercolor"])
        plain = model.encode_text(model.tokenize(TEXTS))
        for rank, alpha in ((1, 1.0), (2, 0.5)):
            got = remove_concepts(model, TEXTS, ["dog", "watercolor"], alpha=alpha, rank=rank)
            basis = concept_basis(unwanted, rank)
            assert basis.shape[1] == rank
            want = model.encode_text(model.tokenize(TEXTS), output=True, hooks=InterventionSet([decor_intervention(
                alpha=alpha, basis=basis)])).pooled
            assert torch.allclose(got, want, atol=1e-6)
        one, two = (remove_concepts(model, TEXTS, ["dog", "watercolor"], rank=r) for r in (1, 2))
        assert not torch.allclose(one, two, atol=1e-4) and not torch.allclose(one, plain, atol=1e-4)


def test_gradients_flow_through_the_projection():
    x = torch.randn(3, 8, generator=G(6), requires_grad=True)
    decor_project(x, torch.randn(1, 8, generator=G(7))).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# --- the model wiring -------------------------------------------------------------------------------------------------
TEXTS = ["a dog in watercolor style", "a red circle left of a blue square", "dog"]


def test_remove_concepts_pooled_matches_the_pure_projection(model):
    with torch.no_grad():
        plain = model.encode_text(model.tokenize(TEXTS))
        unwanted = concept_vectors(model, ["dog", "a photo of a dog"])
        got = remove_concepts(model, TEXTS, ["dog", "a photo of a dog"])
        assert torch.allclose(got, decor_project(plain, unwanted), atol=1e-5)
        assert (got.double() @ concept_basis(unwanted)).abs().max() < 1e-5
        assert torch.equal(remove_concepts(model, TEXTS, "dog", alpha=0.0), plain)  # alpha 0: bit-exact no-op
        normed = remove_concepts(model, TEXTS, "dog", normalize=True)
        assert torch.allclose(normed.norm(dim=-1), torch.ones(3))


def test_remove_concepts_tokens(model):
    with torch.no_grad():
        out = remove_concepts(model, TEXTS, ["dog"], output="tokens")
        plain = model.encode_text(model.tokenize(TEXTS), output="tokens")
        v = out.extras["decor_basis"]
        unwanted = concept_vectors(model, "dog", source="tokens")
        assert unwanted.shape == (1, 64)  # "dog" is one content token; SOT/EOT excluded
        assert torch.allclose(v.abs(), concept_basis(unwanted).abs(), atol=1e-12)
        assert out.tokens.shape == plain.tokens.shape and (out.tokens.double() @ v).abs().max() < 1e-5
        rows = torch.arange(3)
        assert torch.equal(out.pooled, out.tokens[rows, out.pool_index])  # pooled is read from the edited sequence
        assert torch.allclose(out.tokens, decor_project(plain.tokens, basis=v), atol=1e-6)
        padded = remove_concepts(model, TEXTS, ["dog"], output="tokens", keep_padding=True)
        assert padded.tokens.shape[1] == 77  # all context rows, as the paper edits the full sequence


def test_intervention_composes_with_intervene(model):
    from cliplab.tokens import intervene

    batch = model.tokenize(TEXTS)
    unwanted = concept_vectors(model, "dog").detach()
    with torch.no_grad():
        with intervene(model, decor_intervention(unwanted)):
            inside = model.encode_text(batch)
        direct = model.encode_text(batch, hooks=InterventionSet([decor_intervention(unwanted)])).pooled
    assert torch.equal(inside.pooled, direct) and (direct.double() @ concept_basis(unwanted)).abs().max() < 1e-5


# --- effect -----------------------------------------------------------------------------------------------------------
def _bag_of_words(model, texts):
    """Stand-in text encoder: mean of the (random, near-orthogonal) token embeddings of the content tokens, i.e. a
    compositional embedding where every word adds its own direction, as a trained CLIP approximately does."""
    batch = model.tokenize(texts)
    table = model.text.token_embed.weight.detach()
    return torch.stack([table[batch.ids[i, 1: int(batch.eot_index[i])]].mean(0) for i in range(len(texts))])


def test_effect_on_a_compositional_stand_in():
    """'a dog in watercolor style' minus 'dog': similarity to other dog texts drops sharply, similarity to other
    watercolor texts stays (within a margin); projecting out a random direction (a stub) does not remove the dog."""
    m = cliplab.create_model("test-tiny", seed=0)
    x = _bag_of_words(m, ["a dog in watercolor style"])
    dog_probe = _bag_of_words(m, ["a photo of a dog", "a dog running on the grass", "my dog"])
    wc_probe = _bag_of_words(m, ["a watercolor painting", "watercolor art", "soft watercolor"])
    cos = lambda a, b: F.cosine_similarity(a, b).mean().item()  # noqa: E731

    def drops(edited):
        return cos(x, dog_probe) - cos(edited, dog_probe), cos(x, wc_probe) - cos(edited, wc_probe)

    dog_drop, wc_drop = drops(decor_project(x, _bag_of_words(m, ["dog"])))
    assert dog_drop > 0.15 and wc_drop < 0.05, (dog_drop, wc_drop)
    for seed in range(5):  # the stub: a random direction
        stub_dog_drop, _ = drops(decor_project(x, torch.randn(1, 64, generator=G(100 + seed))))
        assert stub_dog_drop < 0.05 < dog_drop, stub_dog_drop


def test_effect_on_the_trained_model():
    """shapes-tiny: 'a red circle and a blue square' minus 'red' loses more of its preference for images with a red
    object than of its preference for images with a blue object, and more than a random direction removes.
    (Colour, not shape: the shipped model knows colours well and shapes poorly, see its model card.)"""
    if "shapes-tiny" not in cliplab.list_pretrained():
        pytest.skip("needs the trained shapes-tiny model (not in cliplab.list_pretrained() yet)")
    from cliplab.data.synthetic import SceneWorld, render

    model = cliplab.load("shapes-tiny").eval()
    world = SceneWorld(model.config.vision.image_size, seed=11, min_objects=2, max_objects=2, clutter_prob=0.0,
                       word_prob=0.0)
    scenes = [world.sample(i) for i in range(400)]
    with torch.no_grad():
        imgs = model.encode_images([render(s) for s in scenes], normalize=True)
        text = model.encode_text(model.tokenize(["a red circle and a blue square"]))
        red = concept_vectors(model, "red")
    has = lambda colour: torch.tensor([any(o.colour == colour for o in s.objects) for s in scenes])  # noqa: E731
    is_red, is_blue = has("red"), has("blue")

    def prefs(t):
        sim = imgs @ F.normalize(t, dim=-1).squeeze(0)
        return ((sim[is_red].mean() - sim[~is_red].mean()).item(), (sim[is_blue].mean() - sim[~is_blue].mean()).item())

    r0, b0 = prefs(text)
    r1, b1 = prefs(decor_project(text, red))
    rs, _ = prefs(decor_project(text, torch.randn(1, text.shape[1], generator=G(0))))
    print(f"red preference {r0:.3f} -> {r1:.3f} (random stub {rs:.3f}); blue preference {b0:.3f} -> {b1:.3f}")
    assert r0 > 0 and b0 > 0  # the trained model prefers red and blue things for this caption
    assert r1 < r0 and (r0 - r1) > (b0 - b1) and (r0 - r1) > 3 * abs(r0 - rs)


# --- conditioning spaces (space=) -------------------------------------------------------------------------------------
@pytest.mark.parametrize("space", ["final", "penultimate"])
def test_space_reads_and_edits_the_conditioning_site(model, space):
    """``space=`` reaches concept_vectors (the unwanted vectors are read in that space), decor_intervention (its
    site) and remove_concepts (the edited sequence is that space's, projected exactly)."""
    field = "final" if space == "final" else "penultimate"
    with torch.no_grad():
        concept = model.encode_text(model.tokenize(["dog", "a photo of a dog"]), output=field)
        seq = getattr(concept, field)
        pooled = concept_vectors(model, ["dog", "a photo of a dog"], space=space)
        assert torch.equal(pooled, seq[torch.arange(2), concept.pool_index])
        tokens = concept_vectors(model, "dog", source="tokens", space=space)
        assert torch.allclose(tokens, seq[0, 1:2], atol=1e-6)  # the one content token of "dog"
        assert decor_intervention(tokens, space=space).site == f"text.{space}"
        out = remove_concepts(model, TEXTS, ["dog"], output="tokens", space=space, rank=1, alpha=0.8)
        plain = model.encode_text(model.tokenize(TEXTS), output=("tokens", field))
        v = out.extras["decor_basis"]
        assert out.extras["space"] == space and torch.allclose(v.abs(), concept_basis(tokens).abs(), atol=1e-12)
        assert torch.allclose(getattr(out, field), decor_project(getattr(plain, field), alpha=0.8, basis=v),
                              atol=1e-5)
        if space == "final":  # the joint outputs are the projection of the edited final states
            assert torch.allclose(out.tokens, model.text.proj(out.final), atol=1e-5)
            pooled_only = remove_concepts(model, TEXTS, ["dog"], space=space, alpha=0.8, rank=1, source="tokens")
            assert torch.allclose(pooled_only, out.pooled, atol=1e-6)
        # a different edit from the joint space's: the orthogonal projection does not commute with the text projection
        joint = remove_concepts(model, TEXTS, ["dog"], output="tokens")
        assert not torch.allclose(out.tokens, joint.tokens, atol=1e-3)
