"""DupMAE (RetroMAE v2, ``cliplab.textrep.dupmae``): exact properties on a tiny random BERT and a toy WordPiece
vocabulary, keyword plumbing, the save/load round trip, an effect test against the MLM-only control, and one check
on the real all-MiniLM-L6-v2."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import cliplab.text as text
from cliplab.models.lm import BertConfig, BertEncoder, word_tokenizer
from cliplab.text import EncoderEmbedder
from cliplab.textrep import dupmae as dm
from cliplab.textrep.dupmae import (DupMAE, DupMAEBatch, DupMAECollator, DupMAEConfig, DupMAEEmbedder,
                                    EnhancedDecoderLayer, MLMHead, bow_loss, bow_target, cli_train,
                                    decoder_visibility, mlm_corrupt, ot_vector, pretrain, sparsify,
                                    whole_word_mask)

WORDS = ["a", "dog", "cat", "runs", "on", "the", "grass", "red", "ball", "play", "##ing", "##s", "man", "woman",
         "blue", "sky", "sits", "in", "park", "green"]
SPECIAL = (2, 3, 0)  # [CLS], [SEP], [PAD] of word_tokenizer
TOK = word_tokenizer(WORDS)
V = 5 + len(WORDS)


def tiny_encoder(seed: int = 0, width: int = 16) -> BertEncoder:
    enc = BertEncoder(BertConfig(vocab_size=V, width=width, layers=2, heads=2, mlp_dim=2 * width, max_positions=32))
    enc.init_weights(seed=seed)
    return enc


def tiny_embedder(seed: int = 0) -> EncoderEmbedder:
    return EncoderEmbedder("tiny", tiny_encoder(seed), TOK, "first")


def perturbed_head(width: int = 16, seed: int = 0) -> MLMHead:
    head = MLMHead(width, V, init="normal", seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return head


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- masking: the ratios, whole words, the decoder's attention pattern --------------------------------------------
def test_encoder_mask_takes_round_ratio_n_tokens_never_special_or_padding():
    tb = TOK(["a dog runs on the grass", "a dog"])  # n = 8 and 4 (specials counted, as HF does)
    for seed in range(20):
        for ratio, want in ((0.3, (2, 1)), (0.5, (4, 2)), (0.15, (1, 1))):
            m = whole_word_mask(tb.ids, tb.mask, ratio, gen(seed), SPECIAL)
            assert m.sum(1).tolist() == list(want)
            assert not m[:, 0].any() and not m[0, 7] and not m[1, 3:].any()  # [CLS], [SEP], padding
    assert not whole_word_mask(tb.ids, tb.mask, 0.0, gen(), SPECIAL).any()


def test_whole_word_masking_keeps_wordpieces_together():
    tb = TOK(["playing dogs"])  # [CLS] play ##ing dog ##s [SEP]: n = 6, budget round(0.5 * 6) = 3
    assert tb.ids[0].tolist() == [2, TOK.token_id("play"), TOK.token_id("##ing"), TOK.token_id("dog"),
                                  TOK.token_id("##s"), 3]
    cont = dm._continuation_table(TOK)
    for seed in range(20):
        m = whole_word_mask(tb.ids, tb.mask, 0.5, gen(seed), SPECIAL, cont)[0]
        assert int(m.sum()) == 2 and bool(m[1]) == bool(m[2]) and bool(m[3]) == bool(m[4])  # one whole word fits
        assert int(whole_word_mask(tb.ids, tb.mask, 0.5, gen(seed), SPECIAL)[0].sum()) == 3  # token-level


def test_decoder_visibility_pattern():
    tb = TOK(["a dog runs on the grass in the park", "a red ball"])  # n = 11 and 5
    vis = decoder_visibility(tb.ids, tb.mask, 0.5, gen(3), SPECIAL)
    n = 11
    budget = round(0.5 * n)  # 6 (5.5 rounds to even: Python's round, as HF)
    assert vis.shape == (2, n, n)
    assert not vis[0].diagonal().any() and not vis[1, :5, :5].diagonal().any()  # a row never sees itself
    assert vis[0, 1:, 0].all() and vis[1, 1:5, 0].all()  # every other row sees [CLS]
    assert vis[0, :n - 1, n - 1].all() and vis[1, :4, 4].all()  # [SEP] is never masked
    assert not vis[1, :, 5:].any()  # padding is never seen
    # the [CLS] row is not a mask candidate: it hides exactly the budget (plus itself)
    assert int((~vis[0, 0]).sum()) == budget + 1 and int((~vis[1, 0, :5]).sum()) == round(0.5 * 5) + 1
    # an ordinary row hides budget positions drawn for it, plus itself (which the draw may already include)
    hidden = (~vis[0, 1:n - 1, :n]).sum(1)
    assert ((hidden == budget) | (hidden == budget + 1)).all()
    assert len({tuple(r.tolist()) for r in vis[0, 1:n - 1]}) > 1  # each row draws its own mask


def test_collator_uses_the_paper_ratios_and_labels():
    texts = ["a dog runs on the grass in the park", "a red ball"]
    coll = DupMAECollator(TOK, V)
    assert (coll.config.encoder_mask, coll.config.decoder_mask) == (0.3, 0.5)
    b = coll(texts, gen(1))
    chosen = b.enc_labels != -100
    assert chosen.sum(1).tolist() == [round(0.3 * 11), round(0.3 * 5)]
    assert torch.equal(b.enc_labels[chosen], b.ids[chosen]) and torch.equal(b.enc_ids[~chosen], b.ids[~chosen])
    assert int((~b.visible[0, 0]).sum()) == round(0.5 * 11) + 1
    # decoder labels: every real token but [CLS] and the closing [SEP]
    want = b.ids.masked_fill(~b.mask, -100)
    want[:, 0] = -100
    want[0, 10] = want[1, 4] = -100
    assert torch.equal(b.dec_labels, want)
    assert torch.allclose(b.bow, bow_target(b.ids, b.mask, V, SPECIAL))
    # the config's ratios and whole_word reach the collator
    b2 = DupMAECollator(TOK, V, DupMAEConfig(encoder_mask=0.5, decoder_mask=0.2))(texts, gen(1))
    assert (b2.enc_labels != -100).sum(1).tolist() == [round(0.5 * 11), round(0.5 * 5)]
    assert int((~b2.visible[0, 0]).sum()) == round(0.2 * 11) + 1
    pieces = ["playing dogs"] * 8
    ww = DupMAECollator(TOK, V, DupMAEConfig(encoder_mask=0.5))(pieces, gen(2)).enc_labels != -100
    tw = DupMAECollator(TOK, V, DupMAEConfig(encoder_mask=0.5, whole_word=False))(pieces, gen(2)).enc_labels != -100
    assert ww.sum(1).tolist() == [2] * 8 and tw.sum(1).tolist() == [3] * 8


def test_mlm_corrupt_is_80_10_10():
    ids = torch.randint(5, 1000, (200, 100), generator=gen(0))
    chosen = torch.rand(ids.shape, generator=gen(1)) < 0.5
    out, labels = mlm_corrupt(ids, chosen, 4, 1000, gen(2))
    assert torch.equal(labels, ids.masked_fill(~chosen, -100)) and torch.equal(out[~chosen], ids[~chosen])
    c = chosen.sum().item()
    masked = ((out == 4) & chosen).sum().item() / c
    same = ((out == ids) & chosen).sum().item() / c
    assert abs(masked - 0.8) < 0.015 and abs(same - 0.1) < 0.015 and abs(1 - masked - same - 0.1) < 0.015


# --- the losses' pieces: closed forms -----------------------------------------------------------------------------
def test_bow_target_closed_form():
    tb = TOK(["a dog a", "cat"])
    q = bow_target(tb.ids, tb.mask, V, SPECIAL)
    a, dog, cat = (TOK.token_id(w) for w in ("a", "dog", "cat"))
    want = torch.zeros(2, V)
    want[0, a] = want[0, dog] = 1 / 3  # L = 3 tokens; a repeated token gets 1/L once (the code's bag_word_weight)
    want[1, cat] = 1.0
    assert torch.equal(q, want)


def test_ot_vector_bow_loss_and_sparsify_closed_forms():
    logits = torch.randn(2, 5, 7, generator=gen(0))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    ot = ot_vector(logits, mask)
    assert torch.equal(ot[0], logits[0, 1:].amax(0)) and torch.equal(ot[1], logits[1, 1:3].amax(0))
    logits[:, 0] = 100.0  # [CLS] is not an ordinary token
    logits[1, 3:] = 100.0  # nor is padding
    assert torch.equal(ot_vector(logits, mask), ot)
    target = torch.rand(2, 7, generator=gen(1))
    want = sum(-sum(target[b, v] * math.log(math.exp(ot[b, v]) / sum(math.exp(x) for x in ot[b].tolist()))
                    for v in range(7)) for b in range(2)) / 2
    assert bow_loss(ot, target).item() == pytest.approx(want, rel=1e-5)
    x = torch.tensor([[3.0, -1.0, 2.0, 0.5, -4.0]])
    assert sparsify(x, 2).tolist() == [[3.0, 0.0, 2.0, 0.0, 0.0]]
    assert sparsify(x, None).tolist() == [[3.0, 0.0, 2.0, 0.5, 0.0]] == sparsify(x, 99).tolist()
    with pytest.raises(ValueError):
        sparsify(x, 0)


# --- the shallow decoder ------------------------------------------------------------------------------------------
def test_enhanced_decoder_equals_brute_force_attention():
    torch.manual_seed(0)
    layer = EnhancedDecoderLayer(8, 2, 16, seed=1)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn(p.shape))
    b, n, w, h = 2, 5, 8, 2
    query, context = torch.randn(b, n, w), torch.randn(b, n, w)
    visible = torch.rand(b, n, n, generator=gen(4)) < 0.5
    visible[:, :, 0] = True
    out = layer(query, context, visible)
    d = w // h
    for bi in range(b):
        for i in range(n):
            heads = []
            for hi in range(h):
                sl = slice(hi * d, (hi + 1) * d)
                q = layer.q(query[bi, i])[sl]
                kv = layer.kv(context[bi])
                k, v = kv[:, :w][:, sl], kv[:, w:][:, sl]
                cols = visible[bi, i].nonzero().flatten()
                att = torch.softmax(k[cols] @ q / math.sqrt(d), 0)
                heads.append(att @ v[cols])
            x = layer.ln_1(query[bi, i] + layer.out(torch.cat(heads)))
            want = layer.ln_2(x + layer.fc2(F.gelu(layer.fc1(x))))
            assert torch.allclose(out[bi, i], want, atol=1e-5)
    # a row does not depend on the context it may not see
    poked = context.clone()
    poked[0, 1:] += 5 * (~visible[0, 2, 1:, None]).float()
    assert torch.allclose(layer(query, poked, visible)[0, 2], out[0, 2], atol=1e-6)
    assert not torch.allclose(layer(query, poked, visible)[0], out[0], atol=1e-3)


def test_decoder_streams_are_the_papers():
    """Query ``LN(cls + pos_i + type_0)``; keys/values ``[cls; LN(tok_j + pos_j + type_0)]`` of the clean ids."""
    enc = tiny_encoder(1)
    with torch.no_grad():
        enc.ln_embed.weight.add_(0.5), enc.ln_embed.bias.add_(0.3), enc.type_embed.weight.normal_()
    model = DupMAE(enc)
    seen = {}

    def spy(query, context, visible):
        seen.update(query=query, context=context, visible=visible)
        return query

    model.decoder.forward = spy
    tb = TOK(["a dog runs on the grass", "a cat"])
    cls = torch.randn(2, 16)
    vis = torch.ones(2, tb.ids.shape[1], tb.ids.shape[1], dtype=torch.bool)
    model.decode(cls, tb.ids, vis)
    n = tb.ids.shape[1]
    pos, typ = enc.pos_embed.weight[:n], enc.type_embed.weight[0]
    assert torch.allclose(seen["query"], enc.ln_embed(cls[:, None] + pos + typ))
    assert torch.equal(seen["context"][:, 0], cls)
    assert torch.allclose(seen["context"][:, 1:], enc.ln_embed(enc.token_embed(tb.ids) + pos + typ)[:, 1:])
    assert seen["visible"] is vis


# --- the whole objective ------------------------------------------------------------------------------------------
def _brute_force_losses(model: DupMAE, b: DupMAEBatch):
    enc = model.encoder
    states = enc(b.enc_ids, b.mask).tokens  # the corrupted input
    logits = model.head(states, enc.token_embed.weight)
    mlm = F.cross_entropy(logits[b.enc_labels != -100], b.enc_labels[b.enc_labels != -100])
    q = b.bow
    lengths = b.mask.sum(1)
    ot = torch.stack([logits[r, 1:int(lengths[r])].amax(0) for r in range(len(q))])
    bow = (-(q * ot.log_softmax(-1)).sum(-1)).mean()
    out = model.decode(states[:, 0], b.ids, b.visible)
    dec_logits = model.head(out, enc.token_embed.weight)
    terms = [F.cross_entropy(dec_logits[r, j][None], b.ids[r, j][None])
             for r in range(len(q)) for j in range(1, int(lengths[r]) - 1)]
    return mlm, torch.stack(terms).mean(), bow


def test_forward_equals_brute_force_and_every_weight_reaches():
    texts = ["a dog runs on the grass", "a red ball in the park", "the man sits"]
    cfg = DupMAEConfig(mlm_weight=0.7, dec_weight=1.3, bow_weight=0.25)
    model = DupMAE(tiny_encoder(2), cfg, head_init="normal", seed=5)
    with torch.no_grad():  # weights large enough that every input of the decoder shows in the losses
        for p in model.decoder.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=gen(8)))
        model.head.ln.weight.fill_(30.0)  # the word embeddings are normal(0.02): scale the logits up
    b = DupMAECollator(TOK, V, cfg)(texts, gen(7))
    assert not torch.equal(b.enc_ids, b.ids)
    parts = model(b)
    mlm, dec, bow = _brute_force_losses(model, b)
    assert torch.allclose(parts["mlm"], mlm, atol=1e-5) and torch.allclose(parts["dec"], dec, atol=1e-5)
    assert torch.allclose(parts["bow"], bow, atol=1e-5)
    assert torch.allclose(parts["loss"], 0.7 * mlm + 1.3 * dec + 0.25 * bow, atol=1e-5)
    # the MLM-only control: the same MLM loss, no decoder, no bag of words
    model.config = DupMAEConfig(dec_weight=0, bow_weight=0)
    ctrl = model(b)
    assert ctrl["dec"] == 0 and ctrl["bow"] == 0 and torch.allclose(ctrl["loss"], mlm, atol=1e-5)
    assert DupMAEConfig().bow_weight == 0.1 and DupMAEConfig().dec_weight == 1.0  # the code's weights


def test_heads_and_inits():
    eye = MLMHead(8, V)  # identity transform by default
    assert torch.equal(eye.dense.weight, torch.eye(8)) and eye.init == "identity"
    h = torch.randn(3, 8)
    E = torch.randn(V, 8)
    assert torch.allclose(eye(h, E), F.layer_norm(F.gelu(h), (8,), eps=1e-12) @ E.T, atol=1e-5)
    normal = MLMHead(8, V, init="normal", seed=3)
    assert abs(normal.dense.weight.std().item() - 0.02) < 0.01
    assert torch.equal(normal.dense.weight, MLMHead(8, V, init="normal", seed=3).dense.weight)
    assert not torch.equal(normal.dense.weight, MLMHead(8, V, init="normal", seed=4).dense.weight)
    with pytest.raises(ValueError):
        MLMHead(8, V, init="zeros")
    with pytest.raises(TypeError):
        DupMAE(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError):
        DupMAEConfig(encoder_mask=1.0)


# --- the embedder: the combined representation, its parts, save/load -----------------------------------------------
def test_representation_equals_brute_force():
    enc, head = tiny_encoder(3), perturbed_head(seed=1)
    texts = ["a dog runs on the grass", "a cat", "the blue sky over the green park"]
    emb = DupMAEEmbedder("t", enc, TOK, head, top_k=4)
    tb = TOK(texts)
    states = enc(tb.ids, tb.mask).tokens
    cls = states[:, 0]
    ot = sparsify(ot_vector(head(states, enc.token_embed.weight), tb.mask), 4)
    assert ((ot > 0).sum(1) <= 4).all() and (ot > 0).any()
    got = emb.encode(texts)
    assert got.shape == (3, 16 + V) and emb.dim == 16 + V
    assert torch.allclose(got, torch.cat([F.normalize(cls, dim=-1), F.normalize(ot, dim=-1)], -1), atol=1e-5)
    assert torch.allclose(emb.encode(texts, pooling="dupmae_cls"), F.normalize(cls, dim=-1), atol=1e-5)
    assert torch.allclose(emb.encode(texts, pooling="dupmae_ot"), F.normalize(ot, dim=-1), atol=1e-5)
    # the inner product of two representations is cos([CLS]) + cos(OT)
    ip = got[0] @ got[2]
    assert ip.item() == pytest.approx((F.cosine_similarity(cls[0], cls[2], 0) + F.cosine_similarity(ot[0], ot[2], 0))
                                      .item(), abs=1e-5)
    raw = DupMAEEmbedder("t", enc, TOK, head, top_k=4, normalize_parts=False).encode(texts)
    assert torch.allclose(raw, torch.cat([cls, ot], -1), atol=1e-4)
    wide = DupMAEEmbedder("t", enc, TOK, head, top_k=None).encode(texts, pooling="dupmae_ot")
    assert ((wide > 0).sum(1) > 4).any()
    # plain poolings of the same encoder, batch independence, the default part
    assert torch.allclose(emb.encode(texts, pooling="mean"), EncoderEmbedder("t", enc, TOK, "mean").encode(texts))
    assert torch.allclose(emb.encode(texts[1:2]), got[1:2], atol=1e-5)
    part = DupMAEEmbedder("t", enc, TOK, head, part="dupmae_ot")
    assert part.dim == V and part.default_pooling == "dupmae_ot"
    with pytest.raises(ValueError):
        DupMAEEmbedder("t", enc, TOK, head, part="mean")


def test_save_load_round_trip(tmp_path):
    emb = DupMAEEmbedder("tiny+dupmae", tiny_encoder(4), TOK, perturbed_head(seed=2), top_k=3,
                         normalize_parts=False, part="dupmae_cls")
    texts = ["a dog runs on the grass", "a cat", "playing dogs"]
    back = text.load_embedder(str(emb.save(tmp_path / "saved")))
    assert isinstance(back, DupMAEEmbedder)
    assert (back.name, back.top_k, back.normalize_parts, back.default_pooling) == ("tiny+dupmae", 3, False,
                                                                                   "dupmae_cls")
    for part in ("dupmae", "dupmae_cls", "dupmae_ot", "mean"):
        assert torch.allclose(back.encode(texts, pooling=part), emb.encode(texts, pooling=part), atol=1e-6), part
    assert torch.allclose(back.encode(texts), emb.encode(texts, pooling="dupmae_cls"), atol=1e-6)


# --- pre-training: every keyword reaches the core ---------------------------------------------------------------------
TEXTS = ["a dog runs on the grass", "a red ball in the park", "the man sits", "a woman and a cat",
         "the blue sky", "playing dogs in the green park", "a man runs", "the cat sits on a red ball"]


def test_pretrain_keywords_reach_the_core(monkeypatch):
    seen, rows = {}, []
    real_fit, real_call = dm.fit, DupMAECollator.__call__

    def spy_fit(params, step, **kw):
        seen.update(kw)
        return real_fit(params, step, **kw)

    def spy_call(self, texts, generator):
        rows.append((list(texts), self.config))
        return real_call(self, texts, generator)

    monkeypatch.setattr(dm, "fit", spy_fit)
    monkeypatch.setattr(DupMAECollator, "__call__", spy_call)
    base = tiny_embedder(5)
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    cfg = DupMAEConfig(encoder_mask=0.4, bow_weight=0.3)
    res = pretrain(base, TEXTS, steps=4, batch_size=3, lr=2e-3, warmup=0.5, weight_decay=0.05, config=cfg,
                   head_init="normal", top_k=7, seed=3, progress=False, log_every=2, name="named")
    assert {k: seen[k] for k in ("steps", "lr", "warmup", "weight_decay", "seed", "progress", "log_every")} == \
        dict(steps=4, lr=2e-3, warmup=2, weight_decay=0.05, seed=3, progress=False, log_every=2)
    assert len(rows) == 4 and all(len(t) == 3 and c is cfg for t, c in rows)
    assert res.model.config is cfg and res.model.head.init == "normal" and len(res.fit.records) == 2
    assert (res.embedder.name, res.embedder.top_k) == ("named", 7)
    assert res.embedder.model is res.model.encoder and res.embedder.head is res.model.head
    assert all(torch.equal(v, base.model.state_dict()[k]) for k, v in before.items())  # input untouched
    assert not torch.equal(res.embedder.model.token_embed.weight, base.model.token_embed.weight)
    # the seed picks the batches and masks: same seed, same weights; another seed, other weights
    a = pretrain(base, TEXTS, steps=2, batch_size=3, seed=0).embedder.model.token_embed.weight
    b = pretrain(base, TEXTS, steps=2, batch_size=3, seed=0).embedder.model.token_embed.weight
    c = pretrain(base, TEXTS, steps=2, batch_size=3, seed=1).embedder.model.token_embed.weight
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError):
        pretrain(base, [], steps=1)


def test_pretrain_continues_a_dupmae_embedders_head():
    emb = DupMAEEmbedder("t", tiny_encoder(6), TOK, perturbed_head(seed=3))
    res = pretrain(emb, TEXTS, steps=1, batch_size=2, lr=0.0, head_init="normal")  # lr 0: nothing moves
    assert all(torch.equal(a, b) for a, b in zip(res.model.head.state_dict().values(), emb.head.state_dict().values()))
    assert res.model.head is not emb.head


def test_cli_train_keywords_and_round_trip(monkeypatch, tmp_path):
    loaded, seen = [], {}
    monkeypatch.setattr(text, "load_embedder", lambda name: loaded.append(name) or tiny_embedder(7))
    real = dm.pretrain

    def spy(embedder, texts, **kw):
        seen.update(kw)
        return real(embedder, texts, **kw)

    monkeypatch.setattr(dm, "pretrain", spy)
    emb = cli_train(None, TEXTS, steps=2, batch_size=3, lr=5e-4, seed=2, progress=False)
    assert loaded == ["all-MiniLM-L6-v2"] and isinstance(emb, DupMAEEmbedder)
    assert {k: seen[k] for k in ("steps", "batch_size", "lr", "seed", "progress")} == \
        dict(steps=2, batch_size=3, lr=5e-4, seed=2, progress=False)
    cli_train("some-dir", TEXTS, steps=1)
    assert loaded[-1] == "some-dir" and (seen["batch_size"], seen["lr"], seen["seed"]) == (32, 1e-4, 0)
    monkeypatch.undo()
    back = text.load_embedder(str(emb.save(tmp_path / "cli")))
    assert torch.allclose(back.encode(TEXTS), emb.encode(TEXTS), atol=1e-6)


def test_cli_train_rejects_a_decoder(monkeypatch):
    from cliplab.models.lm import LlamaConfig, LlamaDecoder

    dec = LlamaDecoder(LlamaConfig(vocab_size=V, width=16, layers=1, heads=2, kv_heads=1, mlp_dim=32))
    monkeypatch.setattr(text, "load_embedder", lambda name: text.DecoderEmbedder("d", dec, TOK, "last"))
    with pytest.raises(TypeError, match="BERT encoder"):
        cli_train("smollm2-135m", TEXTS, steps=1)


# --- the effect, against the MLM-only control ---------------------------------------------------------------------
EFFECT_WORDS = [f"w{i}" for i in range(40)]
EFFECT_TOK = word_tokenizer(EFFECT_WORDS)


def _bags(seed: int, n: int) -> list[str]:
    import random

    r = random.Random(seed)
    return [" ".join(r.sample(EFFECT_WORDS, r.randint(4, 7))) for _ in range(n)]


def _paraphrase(t: str, seed: int) -> str:
    import random

    words = t.split()
    random.Random(seed).shuffle(words)
    return " ".join(words[:-1])  # the same words in another order, one dropped


@pytest.fixture(scope="module")
def effect_arms():
    """Both arms: the same tiny BERT, the same 400 texts in the same order with the same encoder masks, 100 steps;
    the control has only the encoder MLM loss."""
    def base():
        enc = BertEncoder(BertConfig(vocab_size=5 + len(EFFECT_WORDS), width=32, layers=2, heads=4, mlp_dim=64,
                                     max_positions=32))
        enc.init_weights(seed=0)
        return EncoderEmbedder("toy", enc, EFFECT_TOK, "first")

    train = _bags(0, 400)
    arms = {name: pretrain(base(), train, steps=100, batch_size=16, lr=3e-3, config=cfg, top_k=8, seed=0).embedder
            for name, cfg in (("dupmae", DupMAEConfig()), ("mlm", DupMAEConfig(dec_weight=0, bow_weight=0)))}
    arms["before"] = DupMAEEmbedder.from_encoder(base(), top_k=8)
    return arms


def test_effect_bag_of_words_and_paraphrase_retrieval_beat_mlm_only(effect_arms):
    held = _bags(1, 200)  # texts never trained on
    paras = [_paraphrase(t, i) for i, t in enumerate(held)]
    ids = EFFECT_TOK(held).ids

    def recall(emb):  # share of a text's words among the top-L entries of its OT vector
        ot = emb.encode(held, pooling="dupmae_ot")
        out = []
        for b in range(len(held)):
            want = set(ids[b].tolist()) - {0, 1, 2, 3, 4}
            out.append(len(want & set(ot[b].topk(len(want)).indices.tolist())) / len(want))
        return sum(out) / len(out)

    def r1(emb):
        s = emb.encode(held) @ emb.encode(paras).T
        return (s.argmax(1) == torch.arange(len(held))).float().mean().item()

    rec = {k: recall(e) for k, e in effect_arms.items()}
    hit = {k: r1(e) for k, e in effect_arms.items()}
    # measured: recall dupmae 0.90, MLM-only 0.36, before 0.61; R@1 0.945, 0.85, 0.50
    assert rec["dupmae"] > 0.8 and rec["dupmae"] > rec["mlm"] + 0.3 and rec["dupmae"] > rec["before"] + 0.2, rec
    assert hit["dupmae"] > hit["mlm"] + 0.05 and hit["dupmae"] > hit["before"] + 0.3, hit


# --- the real all-MiniLM-L6-v2 ------------------------------------------------------------------------------------
def test_on_minilm_cls_part_is_first_pooling_and_the_identity_head_reads_the_words(minilm):
    texts = ["A dog runs across the grass.", "Two children play football on a beach."]
    emb = DupMAEEmbedder.from_encoder(minilm)  # a fresh, identity-initialised head; the same weights
    assert emb.model is minilm.model and emb.dim == 384 + 30522
    assert torch.allclose(emb.encode(texts, pooling="dupmae_cls"), minilm.encode(texts, pooling="first",
                                                                                 normalize=True), atol=1e-5)
    ot = emb.encode(texts, pooling="dupmae_ot")
    assert ((ot > 0).sum(1) == 384).all()  # top_k=384 by default
    for row, words in zip(ot, (("dog", "grass"), ("children", "football", "beach"))):
        top = set(row.topk(20).indices.tolist())
        assert all(minilm.tokenizer.token_id(w) in top for w in words), words
