"""Token-level reading, input embeddings and interventions: exact properties on small random models."""

from __future__ import annotations

import pytest
import torch

import cliplab
from cliplab.tokens import (Intervention, InterventionSet, SiteError, intervene, parse_site, patch_text_similarity,
                            token_mask, word_scores)
from conftest import randomize_

TEXTS = ["a man and a woman", "a small red circle left of a big blue square", "dog"]


@pytest.fixture(scope="module")
def model():
    return randomize_(cliplab.create_model("test-tiny", seed=0), seed=1).eval()


@pytest.fixture(scope="module")
def batch(model):
    return model.tokenize(TEXTS)


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_reading_outputs_are_consistent(model, batch, pixels):
    with torch.no_grad():
        plain = model.encode_text(batch)
        out = model.encode_text(batch, output=True)
    assert torch.equal(out.pooled, plain)  # asking for more changes nothing
    n = int(batch.lengths.max())
    assert out.tokens.shape == (3, n, 64) and len(out.hidden) == 3 and len(out.attn) == 2
    assert torch.equal(out.pool_index, batch.eot_index)
    assert torch.equal(out.tokens[torch.arange(3), out.pool_index], out.pooled)
    a = out.attn[0]
    assert torch.allclose(a.sum(-1), torch.ones_like(a.sum(-1)))
    assert torch.all(a.triu(1) == 0)  # causal
    assert out.extras["batch"] is batch
    with torch.no_grad():
        img_plain = model.encode_image(pixels)
        img = model.encode_image(pixels, output=True)
    assert torch.equal(img.pooled, img_plain) and img.tokens.shape == (2, 17, 64) and img.extras["grid"] == (4, 4)
    assert torch.equal(img.tokens[:, 0], img.pooled)


@pytest.mark.parametrize("site", ["text.input", "text.pos", "text.layer[0].resid", "text.layer[*].resid",
                                  "text.tokens", "text.layer[1].attn"])
def test_noop_intervention_is_bit_exact(model, batch, site):
    with torch.no_grad():
        plain = model.encode_text(batch)
        out = model.encode_text(batch, hooks=InterventionSet([Intervention(site, lambda x: x)]))
    assert torch.equal(out.pooled, plain)


def test_zero_attention_bias_is_bit_exact(model, batch, pixels):
    with torch.no_grad():
        zero = Intervention("text.layer[*].attn_bias", lambda n: torch.zeros(n, n))
        assert torch.equal(model.encode_text(batch, hooks=InterventionSet([zero])).pooled, model.encode_text(batch))
        izero = Intervention("image.layer[-1].attn_bias", torch.zeros(17, 17))
        assert torch.equal(model.encode_image(pixels, hooks=InterventionSet([izero])).pooled,
                           model.encode_image(pixels))


def test_residual_edit_is_causal_and_local(model, batch):
    p = 3
    iv = Intervention("text.layer[0].resid", lambda h: h + 1.0, positions=[p])
    with torch.no_grad():
        base = model.encode_text(batch, output="hidden")
        edit = model.encode_text(batch, output="hidden", hooks=InterventionSet([iv]))
    for layer in (1, 2):
        assert torch.equal(base.hidden[layer][:, :p], edit.hidden[layer][:, :p])  # before p: untouched (causal)
        assert not torch.equal(base.hidden[layer][:, p:], edit.hidden[layer][:, p:])
    assert torch.allclose(edit.hidden[1][:, p] - base.hidden[1][:, p], torch.ones_like(base.hidden[1][:, p]), atol=1e-5)


def test_token_output_edit_touches_only_subject_and_is_linear(model, batch):
    mask = token_mask(batch, ["man", None, None])
    delta = torch.randn(64, generator=torch.Generator().manual_seed(2))
    outs = {}
    with torch.no_grad():
        base = model.encode_text(batch, output="tokens")
        for alpha in (1.0, 2.0):
            iv = Intervention("text.tokens", alpha * delta, positions=mask[:, : base.tokens.shape[1]], mode="add")
            outs[alpha] = model.encode_text(batch, output="tokens", hooks=InterventionSet([iv])).tokens
    keep = ~mask[:, : base.tokens.shape[1]]
    assert mask.sum() == 1 and torch.equal(outs[1.0][keep], base.tokens[keep])
    assert torch.allclose(outs[1.0][~keep] - base.tokens[~keep], delta[None], atol=1e-6)
    assert torch.allclose(outs[2.0][~keep] - base.tokens[~keep], 2 * (outs[1.0][~keep] - base.tokens[~keep]),
                          atol=1e-5)


def test_inputs_embeds_match_ids_and_carry_gradients(model, batch):
    n = int(batch.lengths.max())
    ids = batch.ids[:, :n]
    emb = model.text.token_embed(ids).detach().requires_grad_(True)
    out = model.encode_text(inputs_embeds=emb, eot_index=batch.eot_index)
    with torch.no_grad():
        assert torch.equal(out.pooled, model.encode_text(batch))
    out.pooled.sum().backward()
    assert emb.grad is not None and emb.grad[0, : int(batch.lengths[0])].abs().sum() > 0
    # causal: positions after a row's EOT get no gradient
    assert emb.grad[2, int(batch.lengths[2]):].abs().sum() == 0
    with pytest.raises(ValueError, match="eot_index"):
        model.encode_text(inputs_embeds=emb)


def test_patch_keep_and_visual_prompts(model, pixels):
    with torch.no_grad():
        full = model.encode_image(pixels, output="hidden")
        all_kept = model.encode_image(pixels, keep=torch.arange(16))
        assert torch.equal(all_kept.pooled, full.pooled)
        kept = torch.tensor([0, 5, 15])
        part = model.encode_image(pixels, keep=kept, output=["hidden", "tokens"])
    assert part.tokens.shape == (2, 4, 64)
    # ln_pre is per token: the kept tokens enter block 0 exactly as they would in the full grid (positions kept)
    assert torch.equal(part.hidden[0], full.hidden[0][:, torch.cat([torch.tensor([0]), kept + 1])])
    prompts = torch.zeros(3, 64, requires_grad=True)
    out = model.encode_image(pixels, prompts=prompts, output="tokens")
    assert out.tokens.shape == (2, 20, 64) and out.extras["n_prompts"] == 3
    out.pooled.sum().backward()
    assert prompts.grad.abs().sum() > 0


def test_attention_maps_are_differentiable(model, batch):
    import copy

    m64 = copy.deepcopy(model).double()  # float64 so the finite difference is not drowned in rounding
    out = m64.encode_text(batch, output="attn")
    grads = torch.autograd.grad(out.pooled[:, 0].sum(), out.attn)
    assert len(grads) == 2 and all(g.shape == a.shape for g, a in zip(grads, out.attn))
    # first-order check: bumping one attention probability moves the output by grad * eps
    layer, (b, h, i, j), eps = 1, (0, 0, 6, 2), 1e-6  # query row 6 = EOT of row 0, the pooled position

    def bump(a):
        a = a.clone()
        a[b, h, i, j] += eps
        return a

    with torch.no_grad():
        moved = m64.encode_text(batch, hooks=InterventionSet([Intervention(f"text.layer[{layer}].attn", bump)]))
    g = float(grads[layer][b, h, i, j])
    assert g != 0
    assert (moved.pooled[:, 0].sum() - out.pooled[:, 0].sum()).item() == pytest.approx(eps * g, rel=1e-4)


def test_intervene_context_stacks_and_restores(model, batch):
    with torch.no_grad():
        plain = model.encode_text(batch)
        a = Intervention("text.layer[0].resid", lambda h: h * 0.5)
        b = Intervention("text.layer[1].resid", lambda h: h * 0.5)
        with intervene(model, a):
            one = model.encode_text(batch).pooled
            with intervene(model, b):
                two = model.encode_text(batch).pooled
            again = model.encode_text(batch).pooled
        after = model.encode_text(batch)
        explicit = model.encode_text(batch, hooks=a + b).pooled
    assert not torch.equal(one, plain) and torch.equal(one, again) and torch.equal(two, explicit)
    assert torch.equal(after, plain) and isinstance(after, torch.Tensor)


def test_context_length_resize_keeps_short_texts_and_lifts_the_limit(tmp_path):
    model = randomize_(cliplab.create_model("test-tiny", seed=3), seed=4).eval()
    short = model.tokenize(TEXTS)
    with torch.no_grad():
        before = model.encode_text(short)
        old = model.text.pos_embed.detach()
        model.set_context_length(torch.cat([old, old[-1:].expand(23, -1)]))
        after = model.encode_text(model.tokenize(TEXTS))
    assert model.config.text.context_length == 100 and model.tokenizer.context_length == 100
    assert torch.equal(before, after)
    long_text = " ".join(["word"] * 95)
    assert model.tokenize([long_text]).truncated.sum() == 0
    model.save(tmp_path / "m")
    assert cliplab.load(tmp_path / "m").config.text.context_length == 100


def test_sites_parse_and_reject():
    assert parse_site("image.layer[-3:].attn").layers == slice(-3, None)
    assert parse_site("text.layer[2].resid").layers == 2
    for bad in ["txt.input", "text.layer[x].resid", "text.layer[1].mlp", "text.hidden"]:
        with pytest.raises(SiteError):
            parse_site(bad)
    with pytest.raises(ValueError, match="positions"):
        Intervention("text.layer[0].attn", lambda a: a, positions=[1])


def test_out_of_range_layer_and_position_are_errors(model, batch):
    with pytest.raises(IndexError, match="blocks"):
        model.encode_text(batch, hooks=InterventionSet([Intervention("text.layer[5].resid", lambda h: h)]))
    with pytest.raises(IndexError, match="position"):
        model.encode_text(batch, hooks=InterventionSet([Intervention("text.input", lambda h: h, positions=[40])]))


def test_readout_helpers(model, batch, pixels):
    mask = token_mask(batch, ["a", "circle", None], occurrence=0)  # the first "a" only
    assert mask[0].sum() == 1 and mask[1].sum() == 1 and mask[2].sum() == 0 and not mask[:, 0].any()
    assert mask.shape == (3, int(batch.lengths.max()))  # width: the longest row, what encode_text cuts to
    every = token_mask(batch, ["a", "a", None])  # default: every occurrence
    assert every[0].nonzero().flatten().tolist() == [1, 4] and every[1].sum() == 2
    with pytest.raises(ValueError):
        token_mask(batch, ["a", None, None], width=3)  # the width would cut the second "a"
    with pytest.raises(ValueError):
        token_mask(batch, "zebra")
    both = model.tokenize(["a woman and a man"])
    assert token_mask(both, "man")[0].nonzero().flatten().tolist() == [5]  # the word, not inside "woman"
    assert token_mask(both, "man", whole_word=False, occurrence=0)[0].nonzero().flatten().tolist() == [2]
    scores = torch.arange(batch.ids.shape[1], dtype=torch.float)
    words = word_scores(batch, 0, scores)
    assert [w for w, _ in words] == ["a", "man", "and", "a", "woman"] and words[1][1] == 2.0
    with torch.no_grad():
        img = model.encode_image(pixels, output="tokens")
        texts = model.encode_text(batch)
    maps = patch_text_similarity(img, texts)
    assert maps.shape == (2, 3, 4, 4)
    brute = torch.nn.functional.cosine_similarity(img.tokens[1, 1 + 4 * 2 + 3], texts[2], dim=0)
    assert maps[1, 2, 2, 3].item() == pytest.approx(brute.item(), abs=1e-6)


def test_plots_write_png(tmp_path, model, pixels):
    pytest.importorskip("matplotlib")
    from PIL import Image

    from cliplab.tokens.plots import similarity_overlay, token_bar_chart

    p1 = token_bar_chart(["a", "man", "and"], [0.1, -0.3, 0.05], tmp_path / "bars.png", title="t")
    p2 = similarity_overlay(Image.new("RGB", (32, 32), "red"), torch.rand(4, 4), tmp_path / "map.png")
    for p in (p1, p2):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(p).size[0] > 100
