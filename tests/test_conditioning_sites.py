"""The text tower's conditioning sites: ``text.final`` (after ``ln_final``, before the projection: SD 1.x) and
``text.penultimate`` (the stream after block L-2: SDXL), next to the joint space ``text.tokens``.

Exact: the recorded states equal a manual forward pass; no-op edits at the new sites are bit-exact and the plain path
never calls them; an additive edit at ``final`` equals the projected edit in the joint space (the projection is
linear); edits are local (final) or causal (penultimate); site names, space names and their errors.
"""

from __future__ import annotations

import pytest
import torch

import cliplab
from cliplab.models.hooks import Hooks, parse_output
from cliplab.tokens import (CONDITIONING_SPACES, Intervention, InterventionSet, SiteError, intervene, parse_site,
                            space_output, space_site, space_tokens)
from conftest import randomize_

TEXTS = ["a red circle left of a blue square", "two green triangles", "a small yellow star above a purple circle"]


@pytest.fixture(scope="module")
def model():
    """test-tiny with a joint space narrower than the text width, a projection bias and three text blocks, so a
    wrong space, a dropped bias or the wrong block shows."""
    cfg = cliplab.models.registry.get_config("test-tiny")
    cfg.embed_dim = 48
    cfg.text.layers = 3
    cfg.text.proj_bias = True
    return randomize_(cliplab.create_model(cfg, seed=0), seed=2).eval()


@pytest.fixture(scope="module")
def batch(model):
    return model.tokenize(TEXTS)


def _manual_stream(model, batch):
    """Every stream of the text tower by hand: the input (embeddings + positions), then after each block."""
    text = model.text
    ids = batch.ids[:, : int(batch.lengths.max())]
    x = text.token_embed(ids) + text.pos_embed[: ids.shape[1]]
    mask = text.causal_mask(ids.shape[1], x)
    streams = [x]
    for block in text.transformer.blocks:
        x = block(x, attn_mask=mask)
        streams.append(x)
    return streams


@torch.no_grad()
def test_final_and_penultimate_equal_a_manual_forward(model, batch):
    out = model.encode_text(batch, output=("final", "penultimate", "tokens"))
    streams = _manual_stream(model, batch)
    width, dim = model.config.text.width, model.config.embed_dim
    assert out.final.shape == (3, streams[0].shape[1], width) and out.tokens.shape[-1] == dim != width
    final = model.text.ln_final(streams[-1])
    assert torch.allclose(out.final, final, atol=1e-5)
    assert torch.equal(out.final, model.text.ln_final(out.hidden[-1]))  # the same tensor, no other step between
    assert len(out.hidden) == 4 and out.penultimate is out.hidden[-2]
    assert torch.allclose(out.penultimate, streams[-2], atol=1e-5)  # after block L-2, no final LayerNorm
    assert not torch.allclose(out.penultimate, streams[-1], atol=1e-3)
    # the joint space is the final states through the projection (bias included); the pooled output unchanged
    assert torch.allclose(out.tokens, model.text.proj(out.final), atol=1e-6)
    assert torch.equal(out.pooled, model.encode_text(batch))
    assert torch.equal(model.encode_text(batch, output="final").pooled, model.encode_text(batch))
    # output="penultimate" records the hidden states; True records everything
    assert model.encode_text(batch, output="penultimate").penultimate is not None
    assert model.encode_text(batch, output="tokens").final is None
    assert {"final", "penultimate", "hidden"} <= parse_output(True)
    assert model.encode_text(batch, output=True).final is not None


@torch.no_grad()
@pytest.mark.parametrize("site", ["text.final", "text.penultimate", "text.layer[-2].resid"])
def test_noop_edits_at_the_conditioning_sites_are_bit_exact(model, batch, site):
    plain = model.encode_text(batch)
    reference = model.encode_text(batch, output=("tokens", "final", "hidden"))
    out = model.encode_text(batch, output=("tokens", "final", "hidden"),
                            hooks=InterventionSet([Intervention(site, lambda x: x)]))
    assert torch.equal(out.pooled, plain)
    assert torch.equal(out.tokens, reference.tokens) and torch.equal(out.final, reference.final)
    assert all(torch.equal(a, b) for a, b in zip(out.hidden, reference.hidden))


class _Strict(Hooks):
    """A hook set that fails if the final site is called without being asked for."""

    def final(self, tower, x):
        raise AssertionError("final() called although edits_final() is False")


@torch.no_grad()
def test_final_site_is_called_only_when_edited(model, batch):
    out = model.encode_text(batch, hooks=_Strict(), output="final")
    assert torch.equal(out.pooled, model.encode_text(batch))


@torch.no_grad()
def test_an_additive_edit_at_final_equals_the_projected_edit_in_the_joint_space(model, batch):
    width = model.config.text.width
    d = torch.randn(width, generator=torch.Generator().manual_seed(3))
    w = model.text.proj.weight  # [D, W]; the bias is added once either way
    mask = torch.zeros(3, int(batch.lengths.max()), dtype=torch.bool)
    mask[0, 2] = mask[2, [3, 4]] = True  # "red"; "yellow star": never SOT or EOT
    base = model.encode_text(batch, output=("tokens", "final"))
    with intervene(model, Intervention("text.final", d, positions=mask, mode="add")):
        at_final = model.encode_text(batch, output=("tokens", "final"))
    with intervene(model, Intervention("text.tokens", w @ d, positions=mask, mode="add")):
        at_joint = model.encode_text(batch, output="tokens")
    assert torch.allclose(at_final.tokens, at_joint.tokens, atol=1e-5)
    assert torch.allclose(at_final.final[mask], base.final[mask] + d, atol=1e-6)
    assert torch.equal(at_final.final[~mask], base.final[~mask])  # local: nothing else moved
    assert torch.equal(at_final.pooled, base.pooled)  # EOT untouched
    # every row, EOT included: the pooled output is the projection of the edited EOT state
    with intervene(model, Intervention("text.final", d, mode="add")):
        every = model.encode_text(batch).pooled
    assert torch.allclose(every, base.pooled + w @ d, atol=1e-5)


@torch.no_grad()
def test_a_penultimate_edit_is_causal_and_flows_into_the_last_block(model, batch):
    d = torch.randn(model.config.text.width, generator=torch.Generator().manual_seed(4))
    p = 3
    base = model.encode_text(batch, output=("final", "hidden"))
    with intervene(model, Intervention("text.penultimate", d, positions=[p], mode="add")):
        out = model.encode_text(batch, output=("final", "hidden"))
    assert torch.allclose(out.penultimate[:, p], base.penultimate[:, p] + d, atol=1e-6)
    assert torch.equal(out.penultimate[:, :p], base.penultimate[:, :p])
    assert torch.equal(out.penultimate[:, p + 1:], base.penultimate[:, p + 1:])
    assert torch.equal(out.final[:, :p], base.final[:, :p])  # causal: earlier tokens never see it
    assert not torch.allclose(out.final[:, p + 1:], base.final[:, p + 1:], atol=1e-4)  # later ones do
    assert not torch.allclose(out.pooled, base.pooled, atol=1e-4)
    # the same edit as text.layer[-2].resid and text.layer[1].resid (three blocks)
    for site in ("text.layer[-2].resid", "text.layer[1].resid"):
        with intervene(model, Intervention(site, d, positions=[p], mode="add")):
            assert torch.equal(model.encode_text(batch).pooled, out.pooled)


def test_site_and_space_names():
    final = parse_site("text.final")
    assert (final.tower, final.place, final.layers) == ("text", "final", None)
    pen = parse_site("text.penultimate")
    assert (pen.tower, pen.place, pen.layers) == ("text", "resid", -2)
    for bad in ("image.final", "image.penultimate", "text.final[0]"):
        with pytest.raises(SiteError):
            parse_site(bad)
    assert CONDITIONING_SPACES == {"joint": "text.tokens", "final": "text.final", "penultimate": "text.penultimate"}
    assert [space_site(s) for s in ("joint", "final", "penultimate")] == list(CONDITIONING_SPACES.values())
    assert [space_output(s) for s in ("joint", "final", "penultimate")] == ["tokens", "final", "penultimate"]
    for fn in (space_site, space_output):
        with pytest.raises(ValueError, match="space must be one of"):
            fn("pooled")


@torch.no_grad()
def test_space_tokens_reads_each_space_and_refuses_what_was_not_recorded(model, batch):
    out = model.encode_text(batch, output=True)
    assert space_tokens(out, "joint") is out.tokens and space_tokens(out, "final") is out.final
    assert space_tokens(out, "penultimate") is out.hidden[-2]
    only_tokens = model.encode_text(batch, output="tokens")
    for space in ("final", "penultimate"):
        with pytest.raises(ValueError, match=f"output='{space}'"):
            space_tokens(only_tokens, space)


def test_models_without_a_final_layernorm_refuse_the_final_site(model, batch):
    class NoFinal:  # e.g. a language model tower: no ln_final before a projection
        text = object()
        missing_sites: dict = {}

        def tower_layers(self):
            return {"text": 2}

    with pytest.raises(ValueError, match="no final LayerNorm"):
        InterventionSet([Intervention("text.final", lambda x: x)]).bind(NoFinal())
    with pytest.raises(IndexError):  # a one-block tower has no block L-2 to edit after
        InterventionSet([Intervention("text.penultimate", lambda x: x)]).bind(_OneBlock())


class _OneBlock:
    text = object()
    missing_sites: dict = {}

    def tower_layers(self):
        return {"text": 1, "image": 1}


@torch.no_grad()
def test_siglip_text_tower_has_the_same_sites():
    """A bidirectional, last-pooled text tower (SigLIP): the final site is ``ln_final``'s output there too, the
    pooled output its projection at the last position, and a no-op edit is bit-exact."""
    model = randomize_(cliplab.create_model("siglip-tiny", seed=0), seed=3).eval()
    batch = model.tokenize(TEXTS[:2])
    plain = model.encode_text(batch)
    out = model.encode_text(batch, output=("final", "penultimate"))
    assert torch.equal(out.pooled, plain) and out.final.shape[1] == batch.ids.shape[1]  # never cut
    assert torch.equal(out.final, model.text.ln_final(out.hidden[-1]))
    assert torch.allclose(model.text.proj(out.final[:, -1]), plain, atol=1e-5)
    noop = InterventionSet([Intervention("text.final", lambda x: x), Intervention("text.penultimate", lambda x: x)])
    assert torch.equal(model.encode_text(batch, hooks=noop).pooled, plain)
