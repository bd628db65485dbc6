"""Text2Token (``cliplab.textrep.text2token``): the two target constructions on hand-made inputs, the loss and head in
closed form, every keyword reaching the core, and an effect against a shuffled-target control on a tiny encoder."""

from __future__ import annotations

import math
import random

import pytest
import torch

import cliplab.text as text
import cliplab.text.training as training
import cliplab.textrep.text2token as t2t
from cliplab.models.lm import BertConfig, BertEncoder, LlamaConfig, LlamaDecoder, word_tokenizer
from cliplab.text import DecoderEmbedder, EncoderEmbedder

# a synthetic language: 12 topics of 2 content words each, and filler stop words (all in NLTK's list)
TOPICS = [("red", "apple"), ("green", "frog"), ("blue", "boat"), ("old", "piano"), ("tall", "tree"),
          ("fast", "horse"), ("cold", "river"), ("small", "bird"), ("dark", "forest"), ("bright", "lamp"),
          ("wet", "street"), ("loud", "drum")]
STOPS = ["the", "a", "is", "on", "with", "and", "of", "it", "very", "there", "was", "by"]
WORDS = sorted({w for t in TOPICS for w in t} | set(STOPS) | {"cat", "dog", "hello"})


def sentence(topic, rng, fill=6):
    """A topic's two content words among ``fill`` random stop words, in random order."""
    words = list(topic) + [rng.choice(STOPS) for _ in range(fill)]
    rng.shuffle(words)
    return " ".join(words)


def tiny_encoder(seed=0, width=32, layers=2):
    tok = word_tokenizer(WORDS)
    cfg = BertConfig(vocab_size=tok.vocab_size, width=width, layers=layers, heads=4, mlp_dim=64, max_positions=64)
    return EncoderEmbedder("tiny-bert", BertEncoder(cfg).init_weights(seed=seed), tok, "mean")


def tiny_decoder(seed=0):
    tok = word_tokenizer(WORDS)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, width=32, layers=2, heads=4, kv_heads=2, head_dim=8, mlp_dim=64,
                      max_positions=64)
    return DecoderEmbedder("tiny-llama", LlamaDecoder(cfg).init_weights(seed=seed), tok, "last")


TEXTS = [sentence(TOPICS[i % len(TOPICS)], random.Random(i)) for i in range(48)]


def ids_of(tok, *words):
    return [tok.tokenizer.token_to_id(w) for w in words]


# --- stage 1: the data-driven target on hand-made inputs ------------------------------------------------------------
def test_meaningful_tokens_hand_made():
    tok = word_tokenizer(WORDS)
    assert t2t.meaningful_text("The dog, the DOG -- and a_cat!") == "dog DOG cat"
    # distinct, first-seen order, stop words and punctuation gone, special tokens never present
    assert t2t.meaningful_token_ids("The dog, the DOG and a cat!", tok) == ids_of(tok, "dog", "cat")
    assert t2t.meaningful_token_ids("there it was", tok) == ids_of(tok, "there", "it", "was")  # fallback
    assert t2t.meaningful_token_ids("there it was", tok, fallback=False) == []
    assert t2t.meaningful_token_ids("", tok) == [] and t2t.meaningful_token_ids("!!", tok) == []
    assert t2t.meaningful_token_ids("the dog", tok, stop_words={"dog"}) == ids_of(tok, "the")  # stop_words reach
    assert t2t.special_token_ids(tok) == frozenset({0, 1, 2, 3, 4})
    assert t2t.meaningful_token_ids("zebra dog", tok) == ids_of(tok, "dog")  # [UNK] is special: never a target


def test_data_target_exact():
    tok = word_tokenizer(WORDS)
    texts = ["The dog and the cat", "a cat, the dog: the DOG", "there it was", "", "there it was"]
    q = t2t.data_target(texts, tok)
    v = tok.vocab_size
    assert q.shape == (5, v)
    dog, cat = ids_of(tok, "dog", "cat")
    expect0 = torch.zeros(v)
    expect0[[dog, cat]] = 0.5
    assert torch.equal(q[0], expect0) and torch.equal(q[1], expect0)  # order and repeats do not matter
    assert torch.equal(q[2], q[4]) and q[2].sum() == pytest.approx(1.0) and (q[2] > 0).sum() == 3  # fallback
    assert torch.equal(q[3], torch.zeros(v))  # nothing to predict
    assert t2t.data_target(texts, tok, vocab_size=v + 5).shape == (5, v + 5)
    assert torch.equal(t2t.data_target(["there it was"], tok, fallback=False), torch.zeros(1, v))
    assert t2t.data_target(["the dog"], tok, stop_words={"dog"})[0, ids_of(tok, "the")[0]] == 1.0


def test_data_target_on_the_real_minilm_tokenizer(minilm):
    ids = t2t.meaningful_token_ids("A man is playing a guitar, isn't he?", minilm.tokenizer)
    words = [minilm.tokenizer.tokenizer.id_to_token(i) for i in ids]
    assert words == ["man", "playing", "guitar"]  # "a", "is", "isn", "t", "he" are NLTK stop words


# --- stage 2: the model-derived target -------------------------------------------------------------------------------
def test_model_target_closed_form():
    logits = torch.tensor([[2.0, 1.0, -1.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    background = torch.tensor([3.0, 0.0, -1.0, -1.0])
    tau = 0.3
    q = t2t.model_target(logits, background, tau=tau)
    p, theta = logits.softmax(-1), background.softmax(-1)
    for b in range(2):  # brute force, element by element
        r = [float(p[b, i] / (p[b, i] + theta[i] + 1e-8)) for i in range(4)]
        z = sum(math.exp(x / tau) for x in r)
        assert q[b].tolist() == pytest.approx([math.exp(x / tau) / z for x in r], rel=1e-5)
    # the frequent token 0 loses to token 1 although the text makes it likelier: the ratio discounts the background
    assert q[0].argmax() == 1
    sharp = t2t.model_target(logits, background)  # the paper's tau = 1e-4: (almost) one-hot on the best ratio
    assert sharp[0, 1] > 0.99 and torch.allclose(sharp.sum(-1), torch.ones(2))
    with pytest.raises(ValueError):
        t2t.model_target(logits, background, tau=0)


def test_kl_loss_matches_kldivloss_and_skips_empty_rows():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, generator=g)
    q = torch.rand(3, 7, generator=g).softmax(-1)
    ref = torch.nn.KLDivLoss(reduction="batchmean")(logits.log_softmax(-1), q)
    assert float(t2t.kl_loss(q, logits)) == pytest.approx(float(ref), rel=1e-6)
    assert float(t2t.kl_loss(q, q.log())) == pytest.approx(0.0, abs=1e-6)
    with_empty = torch.cat([q, torch.zeros(1, 7)])
    assert float(t2t.kl_loss(with_empty, torch.cat([logits, torch.randn(1, 7)]))) == pytest.approx(float(ref), rel=1e-6)
    sparse = torch.tensor([[0.5, 0.5, 0, 0, 0, 0, 0.0]])  # xlogy: zero-mass tokens add nothing
    assert float(t2t.kl_loss(sparse, logits[:1])) == pytest.approx(
        float(-(0.5 * logits[0].log_softmax(-1)[:2]).sum() - math.log(2)), rel=1e-6)
    logits.requires_grad_(True)
    t2t.kl_loss(q, logits).backward()
    assert torch.allclose(logits.grad, (logits.detach().softmax(-1) - q) / 3, atol=1e-6)  # d KL / d logits


# --- the head --------------------------------------------------------------------------------------------------------
def test_vocab_head_uses_the_models_own_table():
    enc, dec = tiny_encoder(), tiny_decoder()
    h = torch.randn(2, 32)
    head = t2t.VocabHead.for_model(enc.model, scale=3.0)
    assert head.weight is enc.model.token_embed.weight and head.log_scale.requires_grad
    assert torch.allclose(head(h), 3.0 * h @ enc.model.token_embed.weight.T, atol=1e-5)
    dhead = t2t.VocabHead.for_model(dec.model)
    assert dhead.weight is dec.model.lm_head.weight and not dhead.log_scale.requires_grad and dhead.scale == 1.0
    assert torch.allclose(dhead(h), dec.model.logits(h), atol=1e-5)  # exactly the LM head
    # calibrate_scale = brute-force argmin over its grid
    tok = enc.tokenizer
    q = t2t.data_target(TEXTS[:8], tok)
    states = torch.randn(8, 32) * 5
    best = t2t.calibrate_scale(head, states, q, grid=(0.5, 1.0, 2.0, 4.0))
    losses = {}
    for s in (0.5, 1.0, 2.0, 4.0):
        losses[s] = float(t2t.kl_loss(q, s * states @ head.weight.detach().T))
    assert best == min(losses, key=losses.get) and head.scale == pytest.approx(best)


def test_background_is_the_mean_logit_of_encode():
    enc = tiny_encoder()
    head = t2t.VocabHead.for_model(enc.model, scale=2.0)
    for pooling in ("mean", "max"):
        bg = t2t.background_logits(enc, head, TEXTS[:10], pooling=pooling, batch_size=3)
        ref = head(enc.encode(TEXTS[:10], pooling=pooling)).mean(0)
        assert torch.allclose(bg, ref, atol=1e-5)


# --- training: what reaches the core ---------------------------------------------------------------------------------
def test_training_leaves_the_input_and_the_table_alone_and_is_seeded():
    enc = tiny_encoder()
    before = {k: v.clone() for k, v in enc.model.state_dict().items()}
    res = t2t.train_text2token(enc, TEXTS, stage1_steps=3, stage2_steps=2, batch_size=8, lr=1e-3, seed=0)
    assert all(torch.equal(before[k], v) for k, v in enc.model.state_dict().items())
    after = res.embedder.model.state_dict()
    assert torch.equal(after["token_embed.weight"], before["token_embed.weight"])  # the head's table is frozen
    assert not torch.equal(after["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"])
    assert isinstance(res.embedder, EncoderEmbedder) and res.embedder.model is not enc.model
    again = t2t.train_text2token(enc, TEXTS, stage1_steps=3, stage2_steps=2, batch_size=8, lr=1e-3, seed=0)
    other = t2t.train_text2token(enc, TEXTS, stage1_steps=3, stage2_steps=2, batch_size=8, lr=1e-3, seed=1)
    assert all(torch.equal(v, again.embedder.model.state_dict()[k]) for k, v in after.items())
    qkv = "blocks.0.attn.qkv.weight"
    assert not torch.equal(after[qkv], other.embedder.model.state_dict()[qkv])
    zero = t2t.train_text2token(enc, TEXTS, stage1_steps=2, stage2_steps=2, batch_size=8, lr=0.0)
    assert all(torch.equal(before[k], v) for k, v in zero.embedder.model.state_dict().items())  # lr reaches AdamW


def test_every_keyword_reaches_the_core(monkeypatch):
    enc = tiny_encoder()
    seen = {"fit": [], "kl": [], "model_target": [], "background": [], "pool": set()}
    real_fit, real_kl, real_mt, real_bg, real_pool = (training.fit, t2t.kl_loss, t2t.model_target,
                                                      t2t.background_logits, t2t.pooled_states)

    def fit(params, step, **kw):
        seen["fit"].append(kw)
        return real_fit(params, step, **kw)

    def kl(q, logits):
        seen["kl"].append(q)
        return real_kl(q, logits)

    def mt(logits, background, tau=1e-4):
        seen["model_target"].append(tau)
        return real_mt(logits, background, tau)

    def bg(embedder, head, texts, pooling=None, batch_size=64):
        seen["background"].append(len(texts))
        return real_bg(embedder, head, texts, pooling, batch_size)

    def pool(embedder, batch, pooling):
        seen["pool"].add(text.get_pooling(pooling).name)
        return real_pool(embedder, batch, pooling)

    monkeypatch.setattr(training, "fit", fit)
    for name, fn in (("kl_loss", kl), ("model_target", mt), ("background_logits", bg), ("pooled_states", pool)):
        monkeypatch.setattr(t2t, name, fn)
    res = t2t.train_text2token(enc, TEXTS, stage1_steps=3, stage2_steps=2, batch_size=5, lr=2e-3, pooling="max",
                               tau=0.25, background_size=7, scale=6.0, seed=4, progress=False, log_every=2)
    f1, f2 = seen["fit"]
    assert (f1["steps"], f2["steps"]) == (3, 2) and f1["lr"] == f2["lr"] == 2e-3
    assert (f1["seed"], f2["seed"]) == (4, 5) and f1["progress"] is False and f1["log_every"] == 2
    assert [r["step"] for r in res.stage1.records] == [2, 3]
    assert all(q.shape[0] == 5 for q in seen["kl"]) and len(seen["kl"]) == 5
    assert seen["model_target"] == [0.25, 0.25] and seen["background"] == [7]
    assert seen["pool"] == {"max"} and res.embedder.default_pooling == "max"
    assert res.settings["start_scale"] == pytest.approx(6.0)
    assert res.settings["tau"] == 0.25 and res.settings["background_size"] == 7


def test_targets_of_each_stage(monkeypatch):
    """Stage 1 trains on each text's own data target (or another text's, shuffled); stage 2's target is that of the
    frozen stage-1 model, with the background of the stage-1 model."""
    enc = tiny_encoder()
    targets = []
    real_kl = t2t.kl_loss
    monkeypatch.setattr(t2t, "kl_loss", lambda q, logits: targets.append(q) or real_kl(q, logits))
    rows = t2t._Batches(len(TEXTS), 6, 0).next()
    own = t2t.data_target([TEXTS[r] for r in rows], enc.tokenizer)
    t2t.train_text2token(enc, TEXTS, stage1_steps=1, stage2_steps=0, batch_size=6, seed=0)
    assert torch.equal(targets[0], own)
    targets.clear()
    t2t.train_text2token(enc, TEXTS, stage1_steps=1, stage2_steps=0, batch_size=6, seed=0, shuffle_targets=True)
    link = t2t._derangement(len(TEXTS), torch.Generator().manual_seed(0))
    assert (link != torch.arange(len(TEXTS))).all() and sorted(link.tolist()) == list(range(len(TEXTS)))
    assert torch.equal(targets[0], t2t.data_target([TEXTS[int(link[r])] for r in rows], enc.tokenizer))
    assert not torch.equal(targets[0], own)

    targets.clear()
    s1 = t2t.train_text2token(enc, TEXTS, stage1_steps=3, stage2_steps=0, batch_size=6, lr=1e-3, seed=0)
    both = t2t.train_text2token(enc, TEXTS, stage1_steps=3, stage2_steps=1, batch_size=6, lr=1e-3, seed=0, tau=0.5)
    head = t2t.VocabHead.for_model(s1.embedder.model, scale=s1.head.scale)
    bg = t2t.background_logits(s1.embedder, head, TEXTS)
    assert torch.allclose(both.background, bg, atol=1e-5)
    rows2 = [int(r) for r in t2t._Batches(len(TEXTS), 6, 0).order[18:24]]  # the 4th batch: stage 2's first
    expect = t2t.model_target(head(s1.embedder.encode([TEXTS[r] for r in rows2])), bg, 0.5)
    assert torch.allclose(targets[-1], expect, atol=1e-5)


def test_decoder_uses_its_lm_head_and_round_trips(tmp_path):
    dec = tiny_decoder()
    res = t2t.train_text2token(dec, TEXTS, stage1_steps=2, stage2_steps=1, batch_size=8, lr=1e-3)
    assert isinstance(res.embedder, DecoderEmbedder) and res.head.scale == 1.0 and res.settings["start_scale"] == 1.0
    assert res.head.weight is res.embedder.model.lm_head.weight
    res.embedder.save(tmp_path / "dec")
    back = text.load_embedder(str(tmp_path / "dec"))
    assert torch.allclose(back.encode(TEXTS[:4]), res.embedder.encode(TEXTS[:4]), atol=1e-6)


def test_cli_train_passes_its_keywords_and_round_trips(monkeypatch, tmp_path):
    calls, loads = [], []
    real = t2t.train_text2token
    monkeypatch.setattr(text, "load_embedder", lambda name: loads.append(name) or tiny_encoder())
    monkeypatch.setattr(t2t, "train_text2token", lambda emb, texts, **kw: calls.append(kw) or real(emb, texts, **kw))
    emb = t2t.cli_train("some-model", TEXTS, steps=3, batch_size=4, lr=1e-3, seed=2, progress=False)
    assert loads == ["some-model"]
    assert calls[-1] == dict(stage1_steps=1, stage2_steps=2, batch_size=4, lr=1e-3, seed=2, progress=False)
    t2t.cli_train(None, TEXTS, steps=2, progress=True)
    assert loads[-1] == t2t.DEFAULT_MODEL == "all-MiniLM-L6-v2"
    assert calls[-1] == dict(stage1_steps=1, stage2_steps=1, batch_size=32, lr=5e-5, seed=0, progress=True)
    monkeypatch.undo()
    emb.save(tmp_path / "t2t")
    back = text.load_embedder(str(tmp_path / "t2t"))
    assert isinstance(back, EncoderEmbedder) and back.default_pooling == "mean"
    assert torch.allclose(back.encode(TEXTS[:5]), emb.encode(TEXTS[:5]), atol=1e-6)
    with pytest.raises(ValueError):
        t2t.cli_train(None, TEXTS, steps=0)


# --- effect against a control ----------------------------------------------------------------------------------------
def test_effect_against_shuffled_targets():
    """Paraphrases share their two content words and nothing else; each distractor shares the query's stop words
    exactly. Predicting the text's own meaningful tokens makes the embedding follow the content words; the control
    (same seed, steps, data, head; every text trained on another text's targets) must not."""
    rng = random.Random(0)
    train = [sentence(TOPICS[i % len(TOPICS)], rng) for i in range(240)]
    queries, keys, distractors = [], [], []
    for i, topic in enumerate(TOPICS):
        q = sentence(topic, random.Random(1000 + i))
        queries.append(q)
        keys.append(sentence(topic, random.Random(2000 + i)))
        other = TOPICS[(i + 1) % len(TOPICS)]  # the next topic's words in the query's places
        distractors.append(" ".join({topic[0]: other[0], topic[1]: other[1]}.get(w, w) for w in q.split()))

    def mrr(emb):
        qs = torch.nn.functional.normalize(emb.encode(queries), dim=-1)
        cand = torch.nn.functional.normalize(emb.encode(keys + distractors), dim=-1)
        sims = qs @ cand.T
        rank = (sims > sims[torch.arange(len(queries)), torch.arange(len(queries))][:, None]).sum(1)
        return float((1.0 / (rank + 1).float()).mean())

    enc = tiny_encoder(seed=0)
    kw = dict(stage1_steps=120, stage2_steps=0, batch_size=16, lr=3e-3, seed=0, scale=4.0)
    method = mrr(t2t.train_text2token(enc, train, **kw).embedder)
    control = mrr(t2t.train_text2token(enc, train, shuffle_targets=True, **kw).embedder)
    start = mrr(enc)
    print(f"paraphrase MRR: text2token {method:.3f}, shuffled control {control:.3f}, untrained {start:.3f}")
    assert method > control + 0.3 and method > start + 0.3, (method, control, start)
