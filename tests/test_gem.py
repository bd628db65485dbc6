"""GEM (cliplab.textrep.gem): the mask against the paper's specification, the gradient bottleneck, the sequence
layout and targets, parity of the readout with a brute-force forward, keyword plumbing, save / load, the CLI entry
point, and an effect test against the mask-off control on a synthetic topic world."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cliplab import text
from cliplab.models.lm import LlamaConfig, LlamaDecoder
from cliplab.models.lm.tokenizer import TextTokenizer
from cliplab.textrep import gem
from cliplab.textrep.gem import (
    IGNORE,
    PAD,
    PREFIX,
    SPECIAL,
    SUFFIX,
    GEMEmbedder,
    build_batch,
    gem_allowed,
    gem_bias,
    gem_forward,
    gem_loss,
    sample_splits,
    train_gem,
)
from cliplab.tokens import Intervention, InterventionSet

P, S, X, D = PREFIX, SPECIAL, SUFFIX, PAD

# --- a tiny world: 4 topics, each with its own 6 words, plus 6 shared words ------------------------------------------
TOPICS = [[f"t{k}w{i}" for i in range(6)] for k in range(4)]
SHARED = [f"s{i}" for i in range(6)]
VOCAB = ["[PAD]", "[UNK]", *SHARED, *(w for ws in TOPICS for w in ws)]


def make_tokenizer(max_length: int = 32) -> TextTokenizer:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tk = Tokenizer(WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tk.pre_tokenizer = Whitespace()
    return TextTokenizer(tk, max_length=max_length, pad_id=0, add_special_tokens=False, empty_id=1, name="tiny-words")


def tiny_decoder(seed: int = 0, layers: int = 2) -> LlamaDecoder:
    cfg = LlamaConfig(vocab_size=len(VOCAB), width=32, layers=layers, heads=4, kv_heads=2, head_dim=8, mlp_dim=64,
                      max_positions=128)
    model = LlamaDecoder(cfg)
    model.init_weights(seed=seed)
    return model.eval()


def tiny_gem(seed: int = 0, n_special: int = 3, **kw) -> GEMEmbedder:
    return GEMEmbedder("tiny", tiny_decoder(seed), make_tokenizer(), n_special=n_special, seed=seed, **kw)


def topic_texts(n: int, seed: int, length: int = 12) -> tuple[list[str], list[int]]:
    """Texts of ``length`` words, each a word of the text's topic (probability 0.5) or a shared word."""
    g = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    for _ in range(n):
        k = int(torch.randint(len(TOPICS), (1,), generator=g))
        words = [TOPICS[k][int(torch.randint(6, (1,), generator=g))] if float(torch.rand(1, generator=g)) < 0.5
                 else SHARED[int(torch.randint(6, (1,), generator=g))] for _ in range(length)]
        texts.append(" ".join(words))
        labels.append(k)
    return texts, labels


# --- the mask ----------------------------------------------------------------------------------------------------------
def test_mask_matches_the_paper_on_a_small_case():
    # prefix p0 p1, specials e0 e1, suffix x0 x1, one padding slot
    allowed = gem_allowed(torch.tensor([P, P, S, S, X, X, D]))[0].int()
    expected = torch.tensor([
        # p0 p1 e0 e1 x0 x1 pad
        [1, 0, 0, 0, 0, 0, 0],  # p0: causal
        [1, 1, 0, 0, 0, 0, 0],  # p1: causal
        [1, 1, 1, 0, 0, 0, 0],  # e0: the prefix and itself
        [1, 1, 0, 1, 0, 0, 0],  # e1: the prefix and itself, not e0
        [0, 0, 1, 1, 1, 0, 0],  # x0: the specials and itself, no prefix
        [0, 0, 1, 1, 1, 1, 0],  # x1: the specials and the earlier suffix
        [0, 0, 0, 0, 0, 0, 1],  # padding: itself only
    ])
    assert torch.equal(allowed, expected)
    bias = gem_bias(torch.tensor([[P, P, S, S, X, X, D]]))
    assert bias.shape == (1, 1, 7, 7)
    assert torch.equal(bias[0, 0] == 0, expected.bool()) and bool(torch.isneginf(bias[0, 0][expected == 0]).all())


def test_plain_rows_get_the_causal_mask_and_the_plain_forward():
    assert torch.equal(gem_allowed(torch.tensor([P] * 5))[0], torch.ones(5, 5, dtype=torch.bool).tril())
    emb = tiny_gem()
    rows = [[2, 9, 10, 3, 11], [4, 12]]
    batch = build_batch(emb.model, emb.specials, rows, [None, None])
    with torch.no_grad():
        states = gem_forward(emb.model, batch).tokens
        for r, ids in enumerate(rows):
            plain = emb.model(torch.tensor([ids])).tokens[0]
            assert torch.allclose(states[r, : len(ids)], plain, atol=1e-5)


# --- the sequences -----------------------------------------------------------------------------------------------------
def test_layout_and_targets():
    emb = tiny_gem(n_special=2)
    rows = [[10, 11, 12, 13], [10, 11, 12, 13], [10, 11, 12, 13], [10, 11, 12, 13]]
    b = build_batch(emb.model, emb.specials, rows, [2, 0, 4, None])
    I = IGNORE
    assert b.segments.tolist() == [[P, P, S, S, X, X], [S, S, X, X, X, X], [P, P, P, P, S, S], [P, P, P, P, D, D]]
    assert b.ids.tolist() == [[10, 11, -1, -1, 12, 13], [-1, -1, 10, 11, 12, 13], [10, 11, 12, 13, -1, -1],
                              [10, 11, 12, 13, -1, -1]]
    # the prefix predicts the prefix, the last special the first suffix token, the suffix the next suffix token
    assert b.targets.tolist() == [[11, I, I, 12, 13, I], [I, 10, 11, 12, 13, I], [11, 12, 13, I, I, I],
                                  [11, 12, 13, I, I, I]]
    assert b.special_index.tolist() == [[2, 3], [0, 1], [4, 5], [-1, -1]]
    assert b.compressed.tolist() == [True, True, True, False]
    assert torch.equal(b.embeds[0, 2], emb.specials[0]) and torch.equal(b.embeds[0, 3], emb.specials[1])
    assert torch.equal(b.embeds[0, 4], emb.model.token_embed.weight[12].detach())
    no_prefix = build_batch(emb.model, emb.specials, rows[:1], [2], prefix_loss=False)
    assert no_prefix.targets.tolist() == [[I, I, I, 12, 13, I]]


def test_loss_is_the_cross_entropy_of_the_scored_positions():
    emb = tiny_gem()
    rows, splits = [[2, 9, 10, 3, 11], [4, 12, 13]], [2, None]
    for use_mask in (True, False):
        loss, logs = gem_loss(emb.model, emb.specials, rows, splits, use_mask=use_mask)
        b = build_batch(emb.model, emb.specials, rows, splits)
        if use_mask:
            states = emb.model(inputs_embeds=b.embeds, hooks=InterventionSet(
                [Intervention("text.layer[*].attn_bias", gem_bias(b.segments))])).tokens
        else:
            states = emb.model(inputs_embeds=b.embeds).tokens
        logp = torch.log_softmax(emb.model.logits(states), -1).detach()
        terms = [-logp[r, i, t] for r in range(2) for i, t in enumerate(b.targets[r].tolist()) if t != IGNORE]
        assert len(terms) == (2 - 1) + 1 + 2 + (3 - 1)  # prefix, last special, suffix, plain row
        assert math.isclose(float(loss.detach()), float(torch.stack(terms).mean()), rel_tol=1e-5)
    gem_terms = [-logp[0, i, t] for i, t in enumerate(b.targets[0].tolist()) if t != IGNORE]
    _, logs = gem_loss(emb.model, emb.specials, rows, splits, use_mask=False)
    assert math.isclose(float(logs["gem"]), float(torch.stack(gem_terms).mean()), rel_tol=1e-5)


def test_sample_splits():
    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 7, 3, 9, 2, 4, 6]
    for frac in (0.0, 0.25, 0.5, 1.0):
        for _ in range(20):
            s = sample_splits(lengths, g, frac)
            assert s[1] is None  # one token: nothing to split
            assert sum(k is None for i, k in enumerate(s) if i != 1) >= round(frac * 8) - 1
            assert all(k is None or 1 <= k <= t - 1 for k, t in zip(s, lengths))
    ks = {sample_splits([5], g, 0.0)[0] for _ in range(200)}
    assert ks == {1, 2, 3, 4}
    with pytest.raises(ValueError):
        sample_splits(lengths, g, 1.5)


# --- the bottleneck ------------------------------------------------------------------------------------------------------
def _suffix_grad(emb, use_mask: bool, cut_specials: bool) -> torch.Tensor:
    """Gradient of the suffix tokens' loss w.r.t. the prefix's input embeddings; ``cut_specials`` detaches the
    specials' residual stream after every block (their path)."""
    rows, k, s = [[2, 9, 10, 3, 11, 12, 13]], 3, emb.n_special
    b = build_batch(emb.model, emb.specials, rows, [k])
    b.embeds = b.embeds.detach().requires_grad_(True)
    hooks = InterventionSet([Intervention("text.layer[*].resid", lambda x: x.detach(), positions=list(range(k, k + s)))]
                            ) if cut_specials else None
    states = gem_forward(emb.model, b, use_mask=use_mask, hooks=hooks).tokens
    suffix = slice(k + s, b.embeds.shape[1] - 1)  # suffix positions that predict a suffix token
    loss = F.cross_entropy(emb.model.logits(states[0, suffix]), b.targets[0, suffix])
    (grad,) = torch.autograd.grad(loss, b.embeds)
    return grad[0, :k]


def test_suffix_gradients_reach_the_prefix_only_through_the_specials():
    emb = tiny_gem()
    assert _suffix_grad(emb, True, False).abs().sum() > 1e-6  # through the specials
    assert torch.equal(_suffix_grad(emb, True, True), torch.zeros(3, emb.dim))  # specials cut: exactly nothing
    assert _suffix_grad(emb, False, True).abs().sum() > 1e-6  # the causal control reads the prefix directly


def test_each_special_reads_the_text_alone_parity_with_brute_force():
    emb = tiny_gem(n_special=3)
    ids = [2, 9, 10, 3, 11]
    with torch.no_grad():
        got = emb.embed_batch([ids], "mean")[0]
        states = []
        for i in range(3):  # the text and only special i, at its own position
            x = torch.cat([emb.model.token_embed(torch.tensor(ids)), emb.specials[i:i + 1]])[None]
            pos = torch.tensor([*range(len(ids)), len(ids) + i])
            states.append(emb.model(inputs_embeds=x, positions=pos).tokens[0, -1])
        assert torch.allclose(got, torch.stack(states).mean(0), atol=1e-5)
        assert torch.allclose(emb.embed_batch([ids], "last")[0], states[-1], atol=1e-5)


def test_embeddings_do_not_depend_on_the_batch():
    emb = tiny_gem()
    texts, _ = topic_texts(6, seed=1)
    texts = [t[: 5 + 9 * i] for i, t in enumerate(texts)]  # varied lengths
    together = emb.encode(texts, batch_size=4)
    alone = torch.cat([emb.encode([t]) for t in texts])
    assert torch.allclose(together, alone, atol=1e-5)


# --- keywords reach the core -------------------------------------------------------------------------------------------
def test_embedder_keywords():
    assert tiny_gem().readout == "last"  # the default
    emb = tiny_gem(n_special=5, readout="mean", seed=3)
    assert emb.n_special == 5 and emb.readout == "mean"
    assert torch.equal(emb.specials, gem.init_specials(emb.model, 5, seed=3))
    texts = ["t0w1 s2 t0w3", "t1w0 t1w2 s1 s4"]
    rows = [emb.tokenizer.encode(t) for t in texts]
    assert torch.allclose(emb.encode(texts), emb.embed_batch(rows, "mean"), atol=1e-6)
    assert torch.allclose(emb.encode(texts, pooling="gem_last"), emb.embed_batch(rows, "last"), atol=1e-6)
    assert not torch.allclose(emb.encode(texts, pooling="gem_mean"), emb.encode(texts, pooling="gem_last"))
    plain = text.DecoderEmbedder("tiny", emb.model, emb.tokenizer, "mean")
    assert torch.allclose(emb.encode(texts, pooling="mean"), plain.encode(texts), atol=1e-6)
    assert torch.allclose(emb.encode(texts, normalize=True).norm(dim=-1), torch.ones(2), atol=1e-5)
    seen = []
    orig = emb.iter_batches
    emb.iter_batches = lambda batch, bs, progress=False: (seen.append((bs, progress)), orig(batch, bs, progress))[1]
    emb.encode(texts, batch_size=1, progress=False)
    assert seen == [(1, False)]
    lm = text.CausalLM("tiny", emb.model, emb.tokenizer, 1, None, None)
    e2 = GEMEmbedder.from_lm(lm, n_special=2, readout="mean", seed=4)
    assert e2.model is emb.model and e2.n_special == 2 and e2.readout == "mean"
    assert torch.equal(e2.specials, gem.init_specials(emb.model, 2, seed=4))


def test_train_gem_keywords_reach_fit_and_the_loss(monkeypatch):
    emb = tiny_gem()
    texts, _ = topic_texts(10, seed=0)
    calls = {}

    def fake_fit(params, step, **kw):
        calls["fit"] = kw
        calls["params"] = params
        step(0)
        return "result"

    def fake_loss(model, specials, rows, splits, **kw):
        calls["loss"] = (rows, splits, kw)
        return torch.zeros((), requires_grad=True), {}

    from cliplab.text import training

    monkeypatch.setattr(training, "fit", fake_fit)
    monkeypatch.setattr(gem, "gem_loss", fake_loss)
    from cliplab.models.tokenizer import TruncationWarning

    with pytest.warns(TruncationWarning, match="were cut to max_tokens=4"):  # the crop is said, not silent
        out = train_gem(emb, texts, steps=7, batch_size=5, lr=3e-3, ntp_fraction=1.0, prefix_loss=False,
                        use_mask=False, train_blocks=1, train_embeddings=True, max_tokens=4, warmup=2,
                        weight_decay=0.1, seed=9, progress=False, log_every=3)
    assert out == "result"
    fit_kw = calls["fit"]
    assert {k: fit_kw[k] for k in ("steps", "lr", "warmup", "weight_decay", "seed", "progress", "log_every")} == \
        {"steps": 7, "lr": 3e-3, "warmup": 2, "weight_decay": 0.1, "seed": 9, "progress": False, "log_every": 3}
    rows, splits, loss_kw = calls["loss"]
    assert len(rows) == 5 and max(map(len, rows)) == 4  # batch_size, max_tokens
    assert splits == [None] * 5  # ntp_fraction=1.0
    assert loss_kw == {"prefix_loss": False, "use_mask": False}
    ids = {id(p) for p in calls["params"]}
    assert id(emb.specials) in ids and id(emb.model.token_embed.weight) in ids  # train_embeddings
    assert all(id(p) in ids for p in emb.model.blocks[-1].parameters())  # train_blocks=1: the top block ...
    assert not any(id(p) in ids for p in emb.model.blocks[0].parameters())  # ... and not the first
    train_gem(emb, texts, steps=1, batch_size=4, ntp_fraction=0.0, train_blocks=0)
    assert {id(p) for p in calls["params"]} == {id(emb.specials)}
    assert all(k is not None for k in calls["loss"][1]) and calls["loss"][2] == {"prefix_loss": True, "use_mask": True}


def test_training_restores_flags_and_is_seeded():
    texts, _ = topic_texts(16, seed=0)
    a, b = tiny_gem(), tiny_gem()
    ra = train_gem(a, texts, steps=3, batch_size=4, lr=1e-2, seed=1)
    rb = train_gem(b, texts, steps=3, batch_size=4, lr=1e-2, seed=1)
    assert ra.losses == rb.losses and torch.equal(a.specials, b.specials)
    assert not a.specials.requires_grad and not a.model.training
    assert not torch.equal(a.specials, tiny_gem().specials)  # the specials were trained


# --- saving, the CLI entry point -------------------------------------------------------------------------------------------
def test_save_and_load_round_trip(tmp_path):
    emb = tiny_gem(n_special=2, readout="mean")
    train_gem(emb, topic_texts(8, seed=0)[0], steps=2, batch_size=4, lr=1e-2)
    emb.save(tmp_path / "g")
    back = text.load_embedder(str(tmp_path / "g"))
    assert isinstance(back, GEMEmbedder) and back.n_special == 2 and back.readout == "mean"
    texts = topic_texts(5, seed=2)[0]
    assert torch.allclose(back.encode(texts), emb.encode(texts), atol=1e-5)
    assert torch.allclose(back.encode(texts, pooling="mean"), emb.encode(texts, pooling="mean"), atol=1e-5)


def test_cli_train(monkeypatch, tmp_path):
    base = text.DecoderEmbedder("tiny", tiny_decoder(), make_tokenizer(), "mean")
    asked = []
    monkeypatch.setattr(text, "load_embedder", lambda name: asked.append(name) or base)
    texts = topic_texts(12, seed=0)[0]
    emb = gem.cli_train(None, texts, steps=2, batch_size=4, lr=1e-2, seed=0)
    assert asked == ["smollm2-135m"] and isinstance(emb, GEMEmbedder) and emb.model is base.model
    emb.save(tmp_path / "cli")
    monkeypatch.undo()
    back = text.load_embedder(str(tmp_path / "cli"))
    assert torch.allclose(back.encode(texts[:3]), emb.encode(texts[:3]), atol=1e-5)
    # every keyword reaches train_gem; None keeps its defaults; a saved GEM directory trains on
    seen = {}
    monkeypatch.setattr(gem, "train_gem", lambda e, t, **kw: seen.update(kw))
    out = gem.cli_train(str(tmp_path / "cli"), texts, steps=3, batch_size=6, lr=2e-3, seed=5, progress=True)
    assert isinstance(out, GEMEmbedder) and out.n_special == emb.n_special
    assert seen == {"steps": 3, "batch_size": 6, "lr": 2e-3, "seed": 5, "progress": True}
    seen.clear()
    gem.cli_train(str(tmp_path / "cli"), texts, steps=1)
    assert seen == {"steps": 1, "seed": 0, "progress": False}


# --- the effect, against the mask-off control ------------------------------------------------------------------------------
@torch.no_grad()
def _suffix_loss(emb, rows, k: int) -> float:
    """Held-out next-token loss of the suffix tokens, under the GEM mask, with the specials inserted after ``k``."""
    b = build_batch(emb.model, emb.specials, rows, [k] * len(rows))
    states = gem_forward(emb.model, b).tokens
    scored = (b.segments == SUFFIX) & (b.targets != IGNORE)
    return float(F.cross_entropy(emb.model.logits(states[scored]), b.targets[scored]))


def test_effect_specials_carry_the_prefix_against_the_mask_off_control():
    """Both arms: the same tiny model, seed, texts, splits and 100 steps; only the mask differs. On held-out texts,
    the specials (inserted after 6 of 12 words) are the suffix's only view of the prefix: replacing the prefix with one
    of another topic must raise the suffix loss when the specials summarise the prefix (GEM), and barely when they
    were never made to (the control)."""
    train, _ = topic_texts(400, seed=0)
    held, labels = topic_texts(200, seed=1)
    gain, own = {}, {}
    for arm, use_mask in (("gem", True), ("control", False)):
        emb = tiny_gem(seed=0)
        train_gem(emb, train, steps=100, batch_size=16, lr=1e-2, seed=0, use_mask=use_mask, train_embeddings=True)
        rows = [emb.tokenizer.encode(t) for t in held]
        other = [next(j for j in range(1, len(held)) if labels[(i + j) % len(held)] != labels[i])
                 for i in range(len(held))]
        swapped = [rows[(i + other[i]) % len(held)][:6] + rows[i][6:] for i in range(len(held))]
        own[arm] = _suffix_loss(emb, rows, 6)
        gain[arm] = _suffix_loss(emb, swapped, 6) - own[arm]
    # measured: gem gain 0.36-0.40 nats, control 0.03-0.07 (model seeds 0-2)
    assert gain["gem"] > 0.2 and gain["gem"] > 3 * max(gain["control"], 0.0), gain
    assert own["gem"] < own["control"] - 0.05, own


# --- the real SmolLM2 (skipped without it) -----------------------------------------------------------------------------------
def test_real_smollm2_plain_pooling_unchanged_and_bottleneck_exact(smollm2):
    emb = GEMEmbedder.from_lm(smollm2, n_special=4, seed=0)
    texts = ["A dog runs on the grass.", "Two men are playing chess in the park."]
    plain = text.DecoderEmbedder.from_lm(smollm2, "mean")
    assert torch.allclose(emb.encode(texts, pooling="mean"), plain.encode(texts), atol=1e-5)
    vecs = emb.encode(texts)
    assert vecs.shape == (2, emb.dim) and bool(torch.isfinite(vecs).all())
    rows, k, s = [smollm2.tokenizer.encode(texts[1])], 4, emb.n_special
    b = build_batch(emb.model, emb.specials, rows, [k])
    b.embeds = b.embeds.detach().requires_grad_(True)
    cut = InterventionSet([Intervention("text.layer[*].resid", lambda x: x.detach(), positions=list(range(k, k + s)))])
    for hooks, zero in ((None, False), (cut, True)):
        states = gem_forward(emb.model, b, hooks=hooks).tokens[0, k + s:-1]
        loss = F.cross_entropy(emb.model.logits(states), b.targets[0, k + s:-1])
        (grad,) = torch.autograd.grad(loss, b.embeds)
        assert (float(grad[0, :k].abs().max()) == 0.0) == zero
