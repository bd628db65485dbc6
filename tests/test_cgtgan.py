"""CgT-GAN (cliplab.captioning.cgtgan) and the shared caption generator / SCST parts.

Exact: the CLIP-aggregation limits (t -> inf: the nearest caption, t = 0: the corpus mean) and brute-force parity,
the reward's closed forms, the SCST sign, the lam schedule, the generator's log-prob parity and identity mapper at
init, the vocabulary round trip. Keyword pass-through of every convenience function. Effect (shapes-tiny, synthetic
unpaired data, same seed and steps): CgT-GAN captions retrieve their images better than the maximum-likelihood-only
captioner, and the adversarial term keeps the grammar-parse rate above the reward-only ablation's.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cliplab.captioning import cgtgan as C
from cliplab.captioning.generator import CaptionGenerator, WordVocab, sequence_mask
from cliplab.captioning.scst import advantages, scst_loss

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny GRUs: one thread avoids oversubscription on a loaded machine (restored after the module)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------- exact properties
def test_aggregation_limits_and_brute_force():
    g = torch.Generator().manual_seed(0)
    img, corpus = torch.randn(5, 16, generator=g), torch.randn(40, 16, generator=g)
    cn = F.normalize(corpus, dim=-1)
    nearest = cn[(F.normalize(img, dim=-1) @ cn.T).argmax(1)]
    assert torch.allclose(C.clip_aggregate(img, corpus, math.inf), nearest, atol=1e-6)
    assert torch.allclose(C.clip_aggregate(img, corpus, 1e5), nearest, atol=1e-4)      # t -> inf
    assert torch.allclose(C.clip_aggregate(img, corpus, 0.0), cn.mean(0).expand(5, -1), atol=1e-6)
    w = C.aggregation_weights(img, corpus, 100.0)
    assert torch.allclose(w.sum(1), torch.ones(5), atol=1e-6)
    for i in range(5):  # brute force: explicit softmax of t * cosine, then the weighted sum
        cos = torch.tensor([float(F.cosine_similarity(img[i], corpus[j], dim=0)) for j in range(40)])
        wi = torch.exp(100 * cos - (100 * cos).max())
        wi = wi / wi.sum()
        assert torch.allclose(C.clip_aggregate(img[i:i + 1], corpus, 100.0, chunk=2)[0], (wi[:, None] * cn).sum(0),
                              atol=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        C.aggregation_weights(img, corpus, -1.0)


def test_semantic_reward_closed_forms():
    g = torch.Generator().manual_seed(1)
    gen, agg, img = (torch.randn(6, 8, generator=g) for _ in range(3))
    s = 20.0
    cos = lambda a, b: F.cosine_similarity(a, b, dim=-1)  # noqa: E731
    assert torch.allclose(C.semantic_reward(gen, agg, img, s, clip_weight=1.0), s * cos(img, gen), atol=1e-5)
    assert torch.allclose(C.semantic_reward(gen, agg, img, s, cos_weight=1.0), s * cos(agg, gen), atol=1e-5)
    l1 = s * (1 - (F.normalize(agg, dim=-1) - F.normalize(gen, dim=-1)).abs().mean(-1))
    assert torch.allclose(C.semantic_reward(gen, agg, img, s, cos_weight=0.0), l1, atol=1e-5)
    mix = 0.7 * (0.5 * s * cos(agg, gen) + 0.5 * l1) + 0.3 * s * cos(img, gen)
    assert torch.allclose(C.semantic_reward(gen, agg, img, s, cos_weight=0.5, clip_weight=0.3), mix, atol=1e-5)
    # a caption whose embedding equals the target gets the maximum s (cos 1, l1 distance 0)
    assert torch.allclose(C.semantic_reward(agg, agg, img, s), torch.full((6,), s), atol=1e-5)


def test_reward_weight_schedule():
    lam = [C.reward_weight(k, gan_steps=3, warm_steps=4, final=0.5) for k in range(10)]
    assert lam == [0, 0, 0, 0.125, 0.25, 0.375, 0.5, 0.5, 0.5, 0.5]
    assert C.reward_weight(0, 0, 0, 1.0) == 1.0   # the reward-only ablation


def _toy_generator(seed=0):
    torch.manual_seed(seed)
    vocab = WordVocab(["a", "red", "blue", "circle", "square"])
    return CaptionGenerator(vocab, cond_dim=6, hidden=16, embed=8, prefix_len=2, mapper_hidden=8)


def test_scst_sign_one_step():
    gen = _toy_generator()
    cond = torch.randn(1, 6)
    ids, _ = gen.sample(cond, n=3, max_len=5, generator=torch.Generator().manual_seed(3))
    before = gen.sequence_log_prob(cond.expand(3, -1), ids).detach()
    # sample 0 above the greedy baseline, sample 1 below, sample 2 equal
    rewards, baseline = torch.tensor([[2.0, -1.0, 0.5]]), torch.tensor([0.5])
    assert torch.equal(advantages(rewards, baseline), torch.tensor([1.5, -1.5, 0.0]))
    opt = torch.optim.SGD(gen.parameters(), lr=0.05)
    _, logp = gen.sample(cond, n=3, max_len=5, generator=torch.Generator().manual_seed(3))
    loss = scst_loss(logp, rewards, baseline)
    assert torch.allclose(loss, -(logp * torch.tensor([1.5, -1.5, 0.0])).mean())
    loss.backward()
    opt.step()
    after = gen.sequence_log_prob(cond.expand(3, -1), ids).detach()
    assert after[0] > before[0] and after[1] < before[1]


def test_scst_equal_reward_gives_no_gradient():
    gen = _toy_generator()
    _, logp = gen.sample(torch.randn(2, 6), n=2, max_len=4)
    scst_loss(logp, torch.full((2, 2), 3.0), torch.full((2,), 3.0)).backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in gen.parameters())


def test_generator_log_prob_parity_and_identity_mapper():
    gen = _toy_generator(1)
    cond = torch.randn(4, 6)
    assert torch.allclose(gen.map_condition(cond), F.normalize(cond, dim=-1))  # residual mapper: identity at init
    for reduce in ("mean", "sum"):
        ids, logp = gen.sample(cond, n=2, max_len=6, generator=torch.Generator().manual_seed(0), reduce=reduce)
        again = gen.sequence_log_prob(cond.repeat_interleave(2, 0), ids, reduce=reduce)
        assert torch.allclose(logp, again, atol=1e-5)
    assert (ids == gen.vocab.eos_id).sum(1).eq(1).all()   # every row ends exactly once (forced at max_len)
    assert torch.equal(sequence_mask(torch.tensor([[5, 2, 0, 0]]), 2), torch.tensor([[1.0, 1.0, 0.0, 0.0]]))


def test_generator_save_load_round_trip(tmp_path):
    gen = _toy_generator(2)
    gen.save(tmp_path / "gen.pt")
    back = CaptionGenerator.load(tmp_path / "gen.pt")
    assert back.vocab.words == gen.vocab.words and back.sizes == gen.sizes
    cond = torch.randn(3, 6)
    assert torch.equal(back.greedy(cond, max_len=5), gen.greedy(cond, max_len=5))


def test_vocab_round_trip_on_world_captions():
    from cliplab.data.synthetic import SceneWorld

    vocab = WordVocab.for_synthetic_world()
    world = SceneWorld(seed=3, word_prob=0.5)
    caps = [world[i].short_caption for i in range(60)]
    assert any('"' in c for c in caps) and any("," in c for c in caps)
    for c in caps:
        assert vocab.decode(vocab.encode(c)) == c
    with pytest.raises(ValueError, match="not in the vocabulary"):
        vocab.encode("a zebra")


def test_discriminator_loss_is_bce():
    torch.manual_seed(0)
    disc = C.TextDiscriminator(10, embed=4, hidden=8)
    real, fake = torch.tensor([[3, 4, 2], [5, 2, 0]]), torch.tensor([[6, 2], [7, 8]])
    logits = disc(torch.tensor([[3, 4, 2], [5, 2, 0], [6, 2, 0], [7, 8, 0]]))
    want = -(F.logsigmoid(logits[:2]).sum() + F.logsigmoid(-logits[2:]).sum()) / 4
    assert torch.allclose(C.discriminator_loss(disc, real, fake), want, atol=1e-6)
    # padding is ignored: the score of a sequence does not depend on trailing pads
    assert torch.allclose(disc(torch.tensor([[6, 2]])), disc(torch.tensor([[6, 2, 0, 0]])), atol=1e-6)


# ------------------------------------------------------------------------------------------- keyword pass-through
class _FakeCLIP:
    """Stands in for the CLIP model: deterministic text embeddings from the words, a fixed logit scale."""

    logit_scale = torch.tensor(math.log(10.0))

    def encode_texts(self, texts, batch_size=256, normalize=False):
        out = torch.zeros(len(texts), 6)
        for i, t in enumerate(texts):
            for w in t.split():
                out[i, hash(w) % 6] += 1.0
        return out + 1e-3


def test_train_cgtgan_every_keyword_reaches_the_step(monkeypatch):
    gen = _toy_generator()
    corpus = ["a red circle", "a blue square", "a red square"]
    seen = {}
    real_step, real_agg = C.cgtgan_step, C.clip_aggregate

    def spy_step(generator, disc, image_emb, agg, real_ids, encode, logit_scale, lam, cfg, rng):
        seen.setdefault("cfg", cfg)
        seen.setdefault("lams", []).append(lam)
        seen["batch"] = image_emb.shape[0]
        seen["real"] = real_ids.shape[0]
        return real_step(generator, disc, image_emb, agg, real_ids, encode, logit_scale, lam, cfg, rng)

    def spy_agg(image_emb, corpus_emb, temperature=100.0, chunk=1024):
        seen["temperature"] = temperature
        return real_agg(image_emb, corpus_emb, temperature, chunk)

    monkeypatch.setattr(C, "cgtgan_step", spy_step)
    monkeypatch.setattr(C, "clip_aggregate", spy_agg)
    values = dict(steps=3, batch_size=2, n_samples=3, max_len=7, lr=2e-3, disc_lr=3e-3, weight_decay=0.01,
                  grad_clip=0.7, temperature=42.0, cos_weight=0.3, clip_weight=0.2, reward_weight=0.8, gan_steps=1,
                  warm_steps=2, seed=5)
    assert set(values) == {f.name for f in dataclasses.fields(C.CgtganConfig)}
    hist = C.train_cgtgan(gen, _FakeCLIP(), torch.randn(4, 6), corpus, **values)
    assert dataclasses.asdict(seen["cfg"]) == values
    assert seen["temperature"] == 42.0 and seen["batch"] == 2 and seen["real"] == 6
    assert seen["lams"] == [0.0, 0.4, 0.8] == hist["lam"]


def test_step_passes_reward_weights_and_lengths(monkeypatch):
    gen = _toy_generator()
    seen = {}
    real_reward = C.semantic_reward

    def spy_reward(gen_emb, target_emb, image_emb, logit_scale, cos_weight=0.5, clip_weight=0.0):
        seen.update(cos_weight=cos_weight, clip_weight=clip_weight, logit_scale=logit_scale, rows=gen_emb.shape[0])
        return real_reward(gen_emb, target_emb, image_emb, logit_scale, cos_weight, clip_weight)

    monkeypatch.setattr(C, "semantic_reward", spy_reward)
    cfg = C.CgtganConfig(n_samples=4, max_len=3, cos_weight=0.9, clip_weight=0.6)
    disc = C.TextDiscriminator(len(gen.vocab))
    enc = C.CachedTextEncoder(_FakeCLIP())
    out = C.cgtgan_step(gen, disc, torch.randn(2, 6), torch.randn(2, 6), torch.tensor([[3, 2]] * 8), enc, 7.0, 0.25,
                        cfg, torch.Generator().manual_seed(0))
    assert seen == dict(cos_weight=0.9, clip_weight=0.6, logit_scale=7.0, rows=2 * 4 + 2)
    assert torch.allclose(out["G"], 0.25 * out["L_R"] + 0.75 * out["L_D"])


def test_init_and_control_keywords_reach_train_mle(monkeypatch):
    seen = []

    def spy(generator, cond, captions, steps=300, **kw):
        seen.append(dict(steps=steps, n=len(captions), rows=cond.shape[0], **kw))
        return [0.0]

    monkeypatch.setattr(C, "train_mle", spy)
    kw = dict(batch_size=7, lr=0.01, seed=3, max_len=9, noise=0.2)
    corpus = ["a red circle", "a blue square"]
    C.text_only_init(_toy_generator(), _FakeCLIP(), corpus, steps=11, **kw)
    C.train_mle_control(_toy_generator(), _FakeCLIP(), corpus, steps=12, corpus_emb=torch.randn(2, 6), **kw)
    assert seen == [dict(steps=11, n=2, rows=2, **kw), dict(steps=12, n=2, rows=2, **kw)]


def test_caption_images_passes_batch_size_and_max_len():
    seen = {}

    class Model:
        def encode_images(self, images, batch_size=64, normalize=False):
            seen.update(batch_size=batch_size, normalize=normalize)
            return torch.randn(len(images), 6)

    gen = _toy_generator()
    caps = C.caption_images(Model(), gen, [None] * 3, batch_size=5, max_len=2)
    assert seen == dict(batch_size=5, normalize=True)
    assert len(caps) == 3 and all(len(c.split()) <= 1 for c in caps)  # max_len 2: one word, then the forced <eos>


# ------------------------------------------------------------------------------------------------------- effect
# shapes-tiny, 1-2 object scenes, unpaired images/corpus; the control is the text-only init continued by maximum
# likelihood for the same number of steps. (The study in experiments/cgtgan_study.py runs the full-size version.)
EFFECT = dict(n_images=64, n_corpus=300, n_test=64, init_steps=100, steps=40, batch_size=16, lr=1e-3, gan_steps=0,
              warm_steps=10)


@pytest.fixture(scope="module")
def captions():
    import cliplab

    model = cliplab.load("shapes-tiny").eval()
    train, corpus, test, _ = C.synthetic_unpaired_data(EFFECT["n_images"], EFFECT["n_corpus"], EFFECT["n_test"])
    corpus_emb = C.CachedTextEncoder(model)(corpus)
    img, timg = model.encode_images(train, normalize=True), model.encode_images(test, normalize=True)
    gen = C.new_generator(img.shape[1], hidden=128, embed=64, mapper_hidden=128)
    C.text_only_init(gen, model, corpus, steps=EFFECT["init_steps"], corpus_emb=corpus_emb)
    control = copy.deepcopy(gen)
    C.train_mle_control(control, model, corpus, steps=EFFECT["steps"], corpus_emb=corpus_emb)
    C.train_cgtgan(gen, model, img, corpus, corpus_emb=corpus_emb, steps=EFFECT["steps"],
                   batch_size=EFFECT["batch_size"], lr=EFFECT["lr"], gan_steps=EFFECT["gan_steps"],
                   warm_steps=EFFECT["warm_steps"])
    return model, timg, {"mle": control.caption(timg), "cgtgan": gen.caption(timg)}


def test_effect_cgtgan_captions_retrieve_their_images_better_than_mle_only(captions):
    model, timg, caps = captions
    r_mle, r_gan = C.retrieval_r1(model, timg, caps["mle"]), C.retrieval_r1(model, timg, caps["cgtgan"])
    assert r_gan > r_mle + 0.15, (r_gan, r_mle)


# --------------------------------------------------------------------------------------------------------- docs
def test_doc_example_runs():
    text = (REPO / "docs" / "methods" / "cgtgan.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    exec(compile(blocks[0], "docs/methods/cgtgan.md", "exec"), {})
