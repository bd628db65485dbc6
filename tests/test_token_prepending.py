"""Token Prepending: causal-dependency tests, vanilla parity, brute-force parity, early exit, a second causal model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cliplab
from cliplab.models.tokenizer import TruncationWarning
from cliplab.models.transformer import ResidualBlock
from cliplab.text_edit.token_prepending import (CausalTextModel, CLIPText, encode_text_tp, insert_slot,
                                                pst_embedding, token_prepending)
from conftest import randomize_

TEXTS = ["a small red circle to the left of a big blue square", "two green stars above a yellow triangle and a ring"]
J = 6  # the content position changed in the dependency tests (in the text without the slot)


@pytest.fixture(scope="module")
def model():
    cfg = cliplab.get_config("test-tiny")
    cfg.text.layers = 4  # deep enough to see start/exit in the middle
    return randomize_(cliplab.create_model(cfg, seed=0), seed=1).eval()


def _pair(model):
    """The batch and a copy whose token at position J differs (same length, same EOT)."""
    batch = model.tokenizer(TEXTS, context_length=model.config.text.context_length - 1)
    other = batch.ids.clone()
    other[:, J] = model.tokenizer.encode("purple")[0]
    assert not torch.equal(other, batch.ids) and int(batch.eot_index.min()) > J + 2
    return batch, other


def _tp_hidden(model, ids, eot, **kw):
    lm = CLIPText(model)
    n = int(eot.max()) + 1
    with torch.no_grad():
        return token_prepending(lm, lm.embed(ids[:, :n]), eot, pst_embedding(model), **kw)


def test_without_tp_earlier_positions_are_bit_identical(model):
    batch, other = _pair(model)
    with torch.no_grad():
        a = model.encode_text(batch.ids, output="hidden").hidden
        b = model.encode_text(other, output="hidden").hidden
    for layer in range(5):
        assert torch.equal(a[layer][:, :J], b[layer][:, :J])  # causal: i < j never sees token j
        assert not torch.equal(a[layer][:, J:], b[layer][:, J:])


@pytest.mark.parametrize("start", [1, 2])
def test_with_tp_earlier_positions_see_later_tokens(model, start):
    batch, other = _pair(model)
    a = _tp_hidden(model, batch.ids, batch.eot_index, start=start).hidden
    b = _tp_hidden(model, other, batch.eot_index, start=start).hidden
    j = J + 1  # position of the changed token in the sequence with the slot (slot at 1)
    for layer in range(5):
        assert torch.equal(a[layer][:, 0], b[layer][:, 0])  # before the slot (SOT): never affected
    for layer in range(start):  # layers < start: plain causal
        assert torch.equal(a[layer][:, :j], b[layer][:, :j])
    # after block start-1 the slot carries the summary (the EOT), which has seen token j
    assert torch.equal(a[start][:, 2:j], b[start][:, 2:j]) and not torch.equal(a[start][:, 1], b[start][:, 1])
    for layer in range(start + 1, 5):  # from then on, every position after the slot depends on token j
        for pos in range(2, j):
            assert not torch.equal(a[layer][:, pos], b[layer][:, pos]), (layer, pos)


def test_start_equal_exit_is_the_vanilla_forward_with_the_slot(model):
    batch, _ = _pair(model)
    eot = batch.eot_index
    n = int(eot.max()) + 1
    lm = CLIPText(model)
    with torch.no_grad():
        x = insert_slot(lm.embed(batch.ids[:, :n]), pst_embedding(model), 1)
        ref = model.encode_text(inputs_embeds=x, eot_index=eot + 1, output="hidden")
    for s in (1, 2, 4):
        out = _tp_hidden(model, batch.ids, eot, start=s, exit=s)
        assert torch.equal(out.embedding, ref.pooled)
        assert all(torch.equal(p, q) for p, q in zip(out.hidden, ref.hidden))
    full = _tp_hidden(model, batch.ids, eot, start=1)
    assert not torch.equal(full.embedding, ref.pooled)


def _brute_force(model, ids, eot, slot, start, exit, readout_layer):
    """Independent loop over the blocks with the overwrite written out (no hooks, no interventions)."""
    text = model.text
    n = int(eot.max()) + 1
    x = text.token_embed(ids[:, :n])
    x = torch.cat([x[:, :1], slot.expand(x.shape[0], 1, -1), x[:, 1:]], dim=1)
    x = x + text.pos_embed[: n + 1]
    mask = text.causal_mask(n + 1, x)
    rows, s = torch.arange(x.shape[0]), eot + 1
    states = [x]
    for layer, block in enumerate(text.transformer.blocks):
        if start <= layer < exit:
            x = x.clone()
            x[:, 1] = x[rows, s]
            states[-1] = x
        x = block(x, attn_mask=mask)
        states.append(x)
    return text.proj(text.ln_final(states[readout_layer][rows, s]))


@pytest.mark.parametrize("start,exit,readout", [(1, 4, 4), (1, 3, 4), (2, 4, 3), (1, 4, 2), (3, 3, 4)])
def test_parity_with_a_brute_force_loop(model, start, exit, readout):
    batch, _ = _pair(model)
    slot = pst_embedding(model)
    with torch.no_grad():
        ref = _brute_force(model, batch.ids, batch.eot_index, slot, start, exit, readout)
        got = _tp_hidden(model, batch.ids, batch.eot_index, start=start, exit=exit, readout_layer=readout)
    assert torch.allclose(got.embedding, ref, atol=1e-5, rtol=0)


def test_early_exit_reads_an_intermediate_layer(model):
    batch, _ = _pair(model)
    out = _tp_hidden(model, batch.ids, batch.eot_index, start=1)
    rows = torch.arange(2)
    with torch.no_grad():
        for k in (1, 2, 3):
            early = _tp_hidden(model, batch.ids, batch.eot_index, start=1, readout_layer=k)
            text = model.text
            assert torch.equal(early.embedding, text.proj(text.ln_final(out.hidden[k][rows, out.summary_index])))
        last = _tp_hidden(model, batch.ids, batch.eot_index, start=1, readout_layer=-1)
    assert torch.equal(last.embedding, out.embedding) and last.readout_layer == 4


def test_encode_text_tp_convenience(model):
    with torch.no_grad():
        feats = encode_text_tp(model, TEXTS, normalize=True)
        out = encode_text_tp(model, TEXTS, output=True)
    assert feats.shape == (2, 64) and torch.allclose(feats.norm(dim=-1), torch.ones(2))
    assert torch.equal(out.summary_index, out.extras["batch"].eot_index + 1)
    assert out.extras["batch"].ids.shape[1] == 76  # one position left for the slot
    with pytest.raises(ValueError):
        encode_text_tp(model, TEXTS, start=0)
    with pytest.raises(ValueError):
        encode_text_tp(model, TEXTS, start=2, exit=5)
    with pytest.warns(TruncationWarning):
        full = model.tokenize(["word " * 80])
    with pytest.raises(ValueError):
        encode_text_tp(model, full)  # a full 77-token row leaves no room
    assert not torch.equal(pst_embedding(model, 0), pst_embedding(model, 1))
    assert torch.equal(pst_embedding(model, 3), pst_embedding(model, 3))


# --- a second implementation of the protocol: a tiny decoder LM -----------------------------------------------------
class ToyDecoder(nn.Module):
    """A minimal causal LM (learned positions, pre-LN blocks, a final norm and a head) implementing the protocol."""

    def __init__(self, vocab=50, width=32, layers=3, seed=0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.tok = nn.Embedding(vocab, width)
            self.pos = nn.Parameter(torch.randn(40, width) * 0.1)
            self.blocks = nn.ModuleList(ResidualBlock(width, 2, 4 * width, "gelu", 1e-5) for _ in range(layers))
            self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, 16)
        self.n_layers = layers

    def embed(self, ids):
        return self.tok(ids)

    def run(self, embeds, layer_hooks):
        n = embeds.shape[1]
        x = embeds + self.pos[:n]
        mask = torch.full((n, n), float("-inf")).triu_(1)
        hidden = [x]
        for layer, block in enumerate(self.blocks):
            x = block(x, attn_mask=mask)
            if layer in layer_hooks:
                x = layer_hooks[layer](x)
            hidden.append(x)
        return hidden

    def readout(self, h, layer):
        return self.head(self.norm(h))


def test_protocol_serves_a_decoder_lm():
    lm = ToyDecoder().eval()
    assert isinstance(lm, CausalTextModel) and isinstance(CLIPText(cliplab.create_model("test-tiny", seed=0)),
                                                          CausalTextModel)
    ids = torch.randint(1, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    other = ids.clone()
    other[:, 8] = (other[:, 8] % 49) + 1
    last = torch.full((2,), 11)  # the sentence embedding is the last token, as in an LLM
    slot = torch.randn(32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = token_prepending(lm, lm.embed(ids), last, slot, slot_index=0, start=1)
        b = token_prepending(lm, lm.embed(other), last, slot, slot_index=0, start=1)
        v = token_prepending(lm, lm.embed(ids), last, slot, slot_index=0, start=2, exit=2)
        vb = token_prepending(lm, lm.embed(other), last, slot, slot_index=0, start=2, exit=2)
    j = 9  # changed token after the slot
    assert torch.equal(a.hidden[1][:, 1:j], b.hidden[1][:, 1:j])  # layer < start+1: causal
    assert not torch.equal(a.hidden[2][:, 1:j], b.hidden[2][:, 1:j])  # TP: early tokens see token j
    assert torch.equal(v.hidden[3][:, :j], vb.hidden[3][:, :j])  # no TP: they never do
    assert a.embedding.shape == (2, 16)


# --- every keyword reaches the core; the slot's scale ------------------------------------------------------------------
def _direct(model, texts, **kw):
    """token_prepending called by hand, as encode_text_tp should call it."""
    batch = model.tokenizer(texts, context_length=model.config.text.context_length - 1)
    lm = CLIPText(model)
    slot = kw.pop("slot", None)
    slot = pst_embedding(model, kw.pop("seed", 0)) if slot is None else slot
    n = int(batch.eot_index.max()) + 1
    with torch.no_grad():
        return token_prepending(lm, lm.embed(batch.ids[:, :n]), batch.eot_index, slot, slot_index=1, **kw).embedding


@pytest.mark.parametrize("kw", [{"start": 2}, {"exit": 2}, {"readout_layer": 2}, {"readout_layer": -2},
                                {"seed": 5}, {"start": 3, "exit": 3}])
def test_encode_text_tp_passes_every_keyword(model, kw):
    with torch.no_grad():
        default = encode_text_tp(model, TEXTS)
        got = encode_text_tp(model, TEXTS, **kw)
    assert torch.equal(got, _direct(model, TEXTS, **kw))
    assert not torch.equal(got, default), f"{kw} had no effect"


def test_encode_text_tp_slot_normalize_and_output(model):
    slot = torch.randn(model.text.cfg.width, generator=torch.Generator().manual_seed(9)) * 0.02
    with torch.no_grad():
        custom = encode_text_tp(model, TEXTS, start=2, slot=slot)
        normed = encode_text_tp(model, TEXTS, start=2, slot=slot, normalize=True)
        out = encode_text_tp(model, TEXTS, start=2, slot=slot, output=True)
    assert torch.equal(custom, _direct(model, TEXTS, start=2, slot=slot))
    assert not torch.equal(custom, encode_text_tp(model, TEXTS, start=2))
    assert torch.equal(normed, torch.nn.functional.normalize(custom, dim=-1))
    assert torch.equal(out.embedding, custom) and out.readout_layer == 4


def test_slot_vector_has_the_scale_of_the_token_table(model):
    table = model.text.token_embed.weight
    for seed in range(4):
        ratio = float(pst_embedding(model, seed).std() / table.detach().std())
        assert 0.8 < ratio < 1.25, ratio  # a slot 100x too large changes block 0 (positions are added before LN)


# --- Token Prepending on a real decoder: SmolLM2-135M ----------------------------------------------------------------
SENTENCES = ["A man is playing a guitar.", "Is it raining in Paris?", "two dogs"]


@pytest.fixture(scope="module")
def smol_embedder(smollm2):
    from cliplab.text import DecoderEmbedder

    return DecoderEmbedder("smollm2-135m", smollm2.model, smollm2.tokenizer, "prompteol")


def test_decoder_slot_goes_where_the_official_prompt_puts_it(smol_embedder):
    from cliplab.text import get_pooling
    from cliplab.text_edit.token_prepending import TokenPrependingEmbedder

    tp = TokenPrependingEmbedder(smol_embedder)
    batch, slot_index = tp.decoder_batch(SENTENCES, get_pooling("prompteol"))
    tok = smol_embedder.tokenizer
    for r in range(len(SENTENCES)):
        ids = batch.ids[r, : int(batch.lengths[r])].tolist()
        assert tok.decode(ids[:slot_index]) == "This sentence : "
        assert tok.decode(ids[slot_index:]) == f' "{batch.texts[r]}" means in one word:"'
    assert batch.texts[1] == "Is it raining in Paris."  # PromptEOL's clean-up
    plain, index = tp.decoder_batch(SENTENCES, get_pooling("last"))
    assert index == 0 and tok.decode(plain.ids[2, : int(plain.lengths[2])].tolist()) == "two dogs"


def test_decoder_tp_without_steps_is_the_forward_with_the_slot(smol_embedder):
    from cliplab.text import get_pooling
    from cliplab.text_edit.token_prepending import TokenPrependingEmbedder, insert_slot

    model = smol_embedder.model
    tp = TokenPrependingEmbedder(smol_embedder, start=4, exit=4)
    batch, slot_index = tp.decoder_batch(SENTENCES, get_pooling("prompteol"))
    slot = pst_embedding(model)
    with torch.no_grad():
        got = tp.encode(SENTENCES, pooling="prompteol")
        for r in range(len(SENTENCES)):  # brute force, one row at a time: insert the slot, run, read the last state
            ids = batch.ids[r : r + 1, : int(batch.lengths[r])]
            x = insert_slot(model.token_embed(ids), slot, slot_index)
            ref = model(inputs_embeds=x).tokens[0, -1]
            assert torch.allclose(got[r], ref, atol=1e-4)
        full = TokenPrependingEmbedder(smol_embedder).encode(SENTENCES, pooling="prompteol")
    assert not torch.allclose(full, got, atol=1e-3)  # TP from block 1 on changes the embedding


@pytest.mark.parametrize("kw", [{"exit": 3}, {"readout_layer": 20}, {"seed": 4}, {"start": 2}])
def test_decoder_tp_embedder_passes_every_keyword(smol_embedder, kw):
    from cliplab.text import get_pooling
    from cliplab.text.causal import DecoderText
    from cliplab.text_edit.token_prepending import TokenPrependingEmbedder

    texts = SENTENCES[:2]
    with torch.no_grad():
        default = TokenPrependingEmbedder(smol_embedder, exit=6).encode(texts, pooling="prompteol")
        tp = TokenPrependingEmbedder(smol_embedder, **{"exit": 6, **kw})
        got = tp.encode(texts, pooling="prompteol")
        batch, slot_index = tp.decoder_batch(texts, get_pooling("prompteol"))
        lm = DecoderText(smol_embedder.model)
        core = {k: v for k, v in {"exit": 6, **kw}.items() if k != "seed"}
        ref = token_prepending(lm, lm.embed(batch.ids), batch.last_index, pst_embedding(lm, kw.get("seed", 0)),
                               slot_index=slot_index, **core).embedding
    assert torch.allclose(got, ref, atol=1e-5)
    assert not torch.allclose(got, default, atol=1e-4), f"{kw} had no effect"


def test_tp_embedder_refuses_what_it_cannot_do(smol_embedder, minilm):
    from cliplab.text_edit.token_prepending import TokenPrependingEmbedder

    with pytest.raises(ValueError, match="bidirectional"):
        TokenPrependingEmbedder(minilm)
    with pytest.raises(ValueError, match="last token"):
        TokenPrependingEmbedder(smol_embedder).encode(["a"], pooling="mean")


# --- TokenPrependingEmbedder on CLIP: the same numbers as encode_text_tp, every keyword -------------------------------
@pytest.fixture(scope="module")
def clip_tp_base(model):
    from cliplab.text import CLIPTextEmbedder

    return CLIPTextEmbedder("tiny", model)


@pytest.mark.parametrize("kw", [{}, {"start": 2}, {"exit": 3}, {"readout_layer": 2}, {"seed": 3}])
def test_clip_tp_embedder_equals_encode_text_tp(clip_tp_base, model, kw):
    from cliplab.text_edit.token_prepending import TokenPrependingEmbedder

    texts = TEXTS + ["a tiny star", ""]
    with torch.no_grad():
        got = TokenPrependingEmbedder(clip_tp_base, **kw).encode(texts, batch_size=2)
        ref = encode_text_tp(model, texts, **kw)
    assert torch.allclose(got, ref, atol=1e-5)


def test_tp_embedder_slot_normalize_batch_size_and_refusals(clip_tp_base, model):
    from cliplab.text_edit.token_prepending import TokenPrependingEmbedder

    slot = torch.randn(model.text.cfg.width, generator=torch.Generator().manual_seed(2)) * 0.02
    texts = TEXTS + ["a tiny star"]
    with torch.no_grad():
        base = TokenPrependingEmbedder(clip_tp_base, start=2).encode(texts)
        custom = TokenPrependingEmbedder(clip_tp_base, start=2, slot=slot).encode(texts)
        normed = TokenPrependingEmbedder(clip_tp_base, start=2, slot=slot).encode(texts, normalize=True)
        one = TokenPrependingEmbedder(clip_tp_base, start=2, slot=slot).encode(texts, batch_size=1)
    assert torch.allclose(custom, encode_text_tp(model, texts, start=2, slot=slot), atol=1e-5)
    assert not torch.allclose(custom, base)
    assert torch.allclose(normed, torch.nn.functional.normalize(custom, dim=-1), atol=1e-6)
    assert torch.allclose(one, custom, atol=1e-5)
    with pytest.raises(ValueError, match="pooling 'last'"):
        TokenPrependingEmbedder(clip_tp_base).encode(texts, pooling="prompteol")
    with pytest.raises(ValueError, match="exit <= 4"):
        TokenPrependingEmbedder(clip_tp_base, exit=99)
    with pytest.raises(ValueError, match="start"):
        TokenPrependingEmbedder(clip_tp_base, start=0)


def test_decoder_tp_shortens_the_sentence_not_the_prompt(smol_embedder):
    from cliplab.models.tokenizer import TruncationWarning
    from cliplab.text import get_pooling
    from cliplab.text_edit.token_prepending import TokenPrependingEmbedder

    tok = smol_embedder.tokenizer
    limit = tok.max_length
    tok.max_length = 24
    try:
        with pytest.warns(TruncationWarning, match="1 of 2"):
            batch, slot_index = TokenPrependingEmbedder(smol_embedder).decoder_batch(
                ["It is raining heavily in the city and the streets are flooded again today", "short"],
                get_pooling("prompteol"))
    finally:
        tok.max_length = limit
    row = batch.ids[0, : int(batch.lengths[0])].tolist()
    assert len(row) + 1 <= 24 and batch.truncated.tolist() == [True, False]
    assert tok.decode(row[slot_index:]).endswith('" means in one word:"')
