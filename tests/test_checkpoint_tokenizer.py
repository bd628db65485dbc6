"""Tokenizers shipped with a checkpoint (``tokenizer.json``), through ``cliplab.models.hf_tokenizer``.

References: the ``tokenizers`` library's own ``Tokenizer.encode`` (ids, offsets, its padding and truncation) on two
tokenizers built here (a SentencePiece-style Unigram with ``</s>`` appended, as SigLIP's, and a byte-level BPE in
CLIP's style), and transformers' ``CLIPTokenizerFast`` built offline from OpenAI's vocabulary against cliplab's
``CLIPTokenizer`` (skipped when ../shared/data is absent).
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

import cliplab
from cliplab.models import CheckpointError
from cliplab.models.hf_tokenizer import CheckpointTokenizer, attach_checkpoint_tokenizer
from cliplab.models.registry import create_model, get_config
from cliplab.models.tokenizer import CLIPTokenizer, TokenizedBatch, TruncationError, TruncationWarning
from cliplab.tokens.readout import token_mask, word_scores
from conftest import shared_path

SP_LENGTH = 16  # the SigLIP-style tokenizer pads to this fixed length (SigLIP: 64)
SP_PAD, SP_EOS, SP_UNK = 0, 1, 2
TEXTS = [
    "A photo of a Café",
    "two  red cubes and a blue sphere",
    "東京の夜景 naïve ﬁne İstanbul",
    "",
    "a dog on the grass by the river under a large tree with many green leaves in the morning sun",
    "Straße, 3 Hunde!",
]
CORPUS = ["a photo of a cat", "two red cubes and a blue sphere", "a dog on the grass by the river",
          "under a large tree with many green leaves", "in the morning sun", "naïve café straße hunde",
          "東京の夜景 istanbul fine photo"]


def _sentencepiece_style() -> Tokenizer:
    """Unigram + Metaspace, lower-casing NFKC normaliser, ``</s>`` appended, fixed padding with ``<pad>``: SigLIP's
    arrangement (vocabulary: specials, whole words, then single characters, each by hand)."""
    words = sorted({w for line in CORPUS for w in line.split()})
    chars = sorted({c for line in CORPUS for c in line.replace(" ", "")} | set("0123456789!,.-"))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [("▁" + w, -2.0 - 0.01 * k) for k, w in enumerate(words)] + [(c, -6.0) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=SP_UNK, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" {2,}", " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", SP_EOS)])
    tok.enable_padding(pad_id=SP_PAD, pad_token="<pad>", length=SP_LENGTH)
    tok.enable_truncation(max_length=SP_LENGTH)
    return tok


def _clip_style() -> Tokenizer:
    """Byte-level BPE with ``</w>``, OpenAI's pre-tokenisation pattern and ``<|startoftext|> ... <|endoftext|>``."""
    pattern = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), "removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  end_of_word_suffix="</w>", show_progress=False)
    tok.train_from_iterator(CORPUS * 5, trainer)
    tok.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])
    sot, eot = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(single="<|startoftext|> $A <|endoftext|>",
                                                       special_tokens=[("<|startoftext|>", sot),
                                                                       ("<|endoftext|>", eot)])
    return tok


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sp")
    _sentencepiece_style().save(str(d / "tokenizer.json"))
    (d / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<pad>",
                                                           "unk_token": "<unk>"}))
    return d


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("clipbpe")
    _clip_style().save(str(d / "tokenizer.json"))
    # LAION's HF CLIP tokenizers pad with "!" (the byte-level alphabet's first token), not with the EOS
    (d / "tokenizer_config.json").write_text(json.dumps({"pad_token": "!", "eos_token": "<|endoftext|>",
                                                         "model_max_length": 24}))
    return d


def _library(d: Path) -> Tokenizer:
    """The library reading the file as shipped (its own padding / truncation settings, if any)."""
    return Tokenizer.from_file(str(d / "tokenizer.json"))


# --------------------------------------------------------------------------- ids, padding, spans


def test_sentencepiece_ids_padding_and_spans_match_the_library(sp_dir):
    lib = _library(sp_dir)  # pads to 16 with <pad> and truncates to 16, as shipped
    tok = CheckpointTokenizer.from_dir(sp_dir, pool="last")
    assert (tok.context_length, tok.pad_id, tok.eot_id, tok.sot_id, tok.n_special) == (SP_LENGTH, SP_PAD, SP_EOS,
                                                                                         None, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        batch = tok(TEXTS)
    assert batch.ids.shape == (len(TEXTS), SP_LENGTH)
    for k, text in enumerate(TEXTS):
        ref = lib.encode(text)
        assert batch.ids[k].tolist() == ref.ids  # fixed-length padding and truncation exactly as the library's
        n = int(batch.lengths[k])
        assert n == sum(ref.attention_mask)
        assert batch.ids[k, n - 1] == SP_EOS and (batch.ids[k, n:] == SP_PAD).all()
        spans = batch.spans[k]
        assert len(spans) == n and spans[-1] == (len(text), len(text))  # </s>: empty span at the end
        assert spans[:-1] == [tuple(o) for o in ref.offsets[: n - 1]]
    # SigLIP pools at the last position of the padded row, whatever the text's length
    assert batch.eot_index.tolist() == [SP_LENGTH - 1] * len(TEXTS)
    assert batch.to("cpu").eot_index.tolist() == [SP_LENGTH - 1] * len(TEXTS)


def test_spans_point_at_the_right_substrings(sp_dir, clip_dir):
    sp = CheckpointTokenizer.from_dir(sp_dir)
    norm = _library(sp_dir).normalizer
    text = "東京の夜景  naïve Café, ﬁne"
    batch = sp(text)
    n = int(batch.lengths[0])
    for i in range(n - 1):
        a, b = batch.spans[0][i]
        piece = sp.tokenizer.id_to_token(int(batch.ids[0, i])).replace("▁", " ").strip()
        if piece:  # the normalised source of each token is the token (NFKC: "ﬁ" is "fi")
            assert norm.normalize_str(text[a:b]).strip() == piece, (i, text[a:b], piece)
    # byte-level BPE: a token holding part of a multi-byte character covers that whole character
    cb = CheckpointTokenizer.from_dir(clip_dir)
    text = "东京 naïve café"
    batch = cb(text)
    n = int(batch.lengths[0])
    assert batch.spans[0][0] == (0, 0) and batch.spans[0][n - 1] == (len(text), len(text))
    covered = set()
    for i in range(1, n - 1):
        a, b = batch.spans[0][i]
        assert 0 <= a < b <= len(text)
        raw = cb.token_strings([int(batch.ids[0, i])])[0]
        if "\ufffd" not in raw:  # whole characters: the span is exactly their source
            assert text[a:b].lower() == raw, (i, text[a:b], raw)
        covered.update(range(a, b))
    assert covered == {k for k, c in enumerate(text) if not c.isspace()}


def test_clip_style_ids_spans_pad_and_eot(clip_dir):
    lib = _library(clip_dir)
    tok = CheckpointTokenizer.from_dir(clip_dir)
    assert tok.context_length == 24  # tokenizer_config.json's model_max_length
    assert tok.pad_id == lib.token_to_id("!") != tok.eot_id == lib.token_to_id("<|endoftext|>")
    assert tok.sot_id == lib.token_to_id("<|startoftext|>") and tok.n_special == 2
    batch = tok(TEXTS[:4], context_length=40)
    assert batch.ids.shape == (4, 40)
    for k, text in enumerate(TEXTS[:4]):
        ref = lib.encode(text)
        n = len(ref.ids)
        assert batch.ids[k, :n].tolist() == ref.ids and int(batch.lengths[k]) == n
        assert (batch.ids[k, n:] == tok.pad_id).all()
        assert batch.spans[k] == [(0, 0)] + [tuple(o) for o in ref.offsets[1:-1]] + [(len(text), len(text))]
        assert tok.encode(text) == ref.ids[1:-1]
        assert tok.encode_with_offsets(text) == (ref.ids[1:-1], [tuple(o) for o in ref.offsets[1:-1]])
    assert (batch.ids[torch.arange(4), batch.eot_index] == tok.eot_id).all()  # EOT pooling: lengths - 1
    assert batch.eot_index.tolist() == (batch.lengths - 1).tolist()


def test_pad_id_and_length_come_from_the_files_in_order(sp_dir):
    shipped = (sp_dir / "tokenizer.json").read_text()
    bare = _sentencepiece_style()
    bare.no_padding()
    bare.no_truncation()
    bare = bare.to_str()
    # tokenizer.json's padding, then the config files' pad_token, then the closing special token
    assert CheckpointTokenizer(shipped).pad_id == SP_PAD
    assert CheckpointTokenizer(bare, {"tokenizer_config.json": json.dumps({"pad_token": "<unk>"})}).pad_id == SP_UNK
    assert CheckpointTokenizer(bare, {"special_tokens_map.json": json.dumps({"pad_token": {"content": "<unk>"}}),
                                      "tokenizer_config.json": json.dumps({"pad_token": "<pad>"})}).pad_id == SP_PAD
    assert CheckpointTokenizer(bare).pad_id == SP_EOS
    # the length: its fixed padding, else model_max_length, else CLIP's 77
    assert CheckpointTokenizer(shipped).context_length == SP_LENGTH
    assert CheckpointTokenizer(bare, {"tokenizer_config.json": '{"model_max_length": 33}'}).context_length == 33
    assert CheckpointTokenizer(bare, {"tokenizer_config.json": '{"model_max_length": 1e30}'}).context_length == 77
    with pytest.raises(ValueError, match="not a readable tokenizer.json"):
        CheckpointTokenizer('{"model": 3}')


# --------------------------------------------------------------------------- truncation


@pytest.mark.parametrize("which", ["sp", "clip"])
def test_truncation_is_reported_as_clip_tokenizer_reports_it(which, sp_dir, clip_dir):
    d = sp_dir if which == "sp" else clip_dir
    tok = CheckpointTokenizer.from_dir(d)
    lib = _library(d)
    L = 10
    lib.no_padding()
    lib.enable_truncation(max_length=L)  # the library's own rule: content cut, special tokens kept
    texts = ["a dog", TEXTS[4]]
    n_content = len(tok.encode(TEXTS[4]))
    assert n_content > L - tok.n_special
    with pytest.warns(TruncationWarning) as rec:
        batch = tok(texts, context_length=L)
    assert len(rec) == 1 and Path(rec[0].filename).resolve() == Path(__file__).resolve()  # points at the caller
    dropped = n_content - (L - tok.n_special)
    assert str(rec[0].message) == (f"1 of 2 text(s) truncated to context_length={L} ({dropped} content token(s) "
                                   f"dropped): row 1: {n_content} content tokens")  # CLIPTokenizer's words
    assert batch.truncated.tolist() == [False, True] and batch.n_dropped.tolist() == [0, dropped]
    assert batch.ids[1].tolist() == lib.encode(TEXTS[4]).ids  # same ids as the library's truncation
    assert int(batch.lengths[1]) == L and batch.ids[1, L - 1] == tok.eot_id
    kept_end = max(b for a, b in batch.spans[1] if b > a)
    with pytest.raises(ValueError, match="truncated part"):
        batch.token_positions(1, "leaves")
    assert kept_end <= TEXTS[4].index("leaves")
    with pytest.raises(TruncationError, match=r"1 of 2 text\(s\) exceed context_length=10 \(at most "
                                              rf"{L - tok.n_special} content tokens\): row 1: {n_content}"):
        tok(texts, context_length=L, truncate=False)


# --------------------------------------------------------------------------- token-level API, decoding


def test_token_positions_and_readout_on_a_sentencepiece_batch(sp_dir):
    tok = CheckpointTokenizer.from_dir(sp_dir, pool="last")
    batch = tok(["A photo of a Café", "two red cubes"])
    pos = batch.token_positions(0, "café")
    assert "".join(tok.token_strings(batch.ids[0, pos])).strip() == "café"
    assert batch.token_positions(0, "photo") == [1]
    assert batch.token_positions(1, "two") == [0]  # no start token: the first word is position 0
    mask = token_mask(batch, ["photo", "two"])  # a last-pooled batch is never cut: the mask spans the whole row
    assert mask.shape == (2, SP_LENGTH) and mask.nonzero().tolist() == [[0, 1], [1, 0]]
    scores = torch.arange(SP_LENGTH, dtype=torch.float)
    assert [w for w, _ in word_scores(batch, 1, scores)] == ["two", "red", "cubes"]
    assert word_scores(batch, 1, scores)[0] == ("two", 0.0)
    with pytest.raises(ValueError, match="not found"):
        batch.token_positions(0, "zebra")


def test_decode_token_strings_and_vocab(sp_dir, clip_dir):
    for d in (sp_dir, clip_dir):
        tok = CheckpointTokenizer.from_dir(d)
        lib = _library(d)
        text = "two red cubes and a naïve café"
        batch = tok(text, context_length=30)
        ref = lib.decode(lib.encode(text).ids, skip_special_tokens=True)
        assert tok.decode(batch.ids[0]) == ref.replace("</w>", " ").strip()  # transformers' CLIP decode rule
        assert tok.decode(batch.ids[0]) == text.lower()
        assert tok.vocab_size == lib.get_vocab_size(with_added_tokens=True)
        strings = tok.token_strings(batch.ids[0, : int(batch.lengths[0])])
        assert strings[int(batch.lengths[0]) - 1] == lib.id_to_token(tok.eot_id)  # special tokens by name
        with pytest.raises(ValueError, match="out of range"):
            tok.decode([tok.vocab_size])


# --------------------------------------------------------------------------- models


def _siglip_style_config(vocab: int):
    cfg = get_config("test-tiny")
    text = dataclasses.replace(cfg.text, vocab_size=vocab, context_length=SP_LENGTH, pool="last", causal=False)
    return cfg.replace(name="sp-tiny", text=text)


def test_model_saved_with_its_tokenizer_reloads_with_it(sp_dir, tmp_path):
    vocab = _library(sp_dir).get_vocab_size(with_added_tokens=True)
    small = create_model(_siglip_style_config(vocab - 1), seed=0)
    with pytest.raises(CheckpointError, match="not the model's"):  # ids beyond the embedding table
        attach_checkpoint_tokenizer(small, sp_dir)
    model = create_model(_siglip_style_config(vocab), seed=0)
    with pytest.raises(ValueError, match="set_tokenizer"):  # OpenAI's BPE ids would index past its embeddings
        model.tokenizer
    attach_checkpoint_tokenizer(model, sp_dir)
    texts = ["A photo of a Café", "two red cubes"]
    before = model.tokenize(texts)
    assert isinstance(model.tokenizer, CheckpointTokenizer) and before.pool == "last"
    assert before.ids.tolist() == [_library(sp_dir).encode(t).ids for t in texts]
    first = model.save(tmp_path / "a")
    assert json.loads((first / "cliplab.json").read_text())["config"]["tokenizer"] == "tokenizer.json"
    for name in ("tokenizer.json", "special_tokens_map.json"):
        assert (first / name).read_bytes() == (sp_dir / name).read_bytes()
    again = cliplab.load(first)
    second = again.save(tmp_path / "b")  # load -> save -> load keeps it
    back = cliplab.load(second)
    for m in (again, back):
        batch = m.tokenize(texts)
        assert isinstance(m.tokenizer, CheckpointTokenizer)
        assert torch.equal(batch.ids, before.ids) and batch.spans == before.spans and batch.pool == "last"
        assert torch.equal(m.encode_text(batch.ids), model.encode_text(before.ids))
        # the token-level API's pooled position is the one the (last-pooled) tower pools at
        assert torch.equal(m.encode_text(batch, output="tokens").pool_index.cpu(), batch.eot_index)
    # a longer positional table: the checkpoint's tokenizer follows the context length
    back.set_context_length(torch.randn(20, back.config.text.width))
    wider = back.tokenize(texts)
    assert isinstance(back.tokenizer, CheckpointTokenizer) and wider.ids.shape == (2, 20)
    assert wider.eot_index.tolist() == [19, 19] and torch.equal(wider.ids[:, :SP_LENGTH], before.ids)
    # the recorded file must be there
    (second / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        cliplab.load(second)


def test_hf_clip_directory_is_tokenized_by_its_tokenizer(clip_dir, tmp_path):
    lib = _library(clip_dir)
    eot = lib.token_to_id("<|endoftext|>")
    cfg = get_config("test-tiny")
    model = create_model(cfg.replace(text=dataclasses.replace(cfg.text, eot_token_id=eot)), seed=1)
    plain = cliplab.convert(model, "hf", tmp_path / "plain")
    assert isinstance(cliplab.load(plain).tokenizer, CLIPTokenizer)  # control: no tokenizer.json, OpenAI's BPE
    d = cliplab.convert(model, "hf", tmp_path / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(clip_dir / name, d / name)
    loaded = cliplab.load(d)
    texts = ["a photo of a cat", "naïve café by the river"]
    batch = loaded.tokenize(texts)
    assert isinstance(loaded.tokenizer, CheckpointTokenizer) and loaded.config.tokenizer == "tokenizer.json"
    for k, t in enumerate(texts):
        ref = lib.encode(t).ids
        assert batch.ids[k, : len(ref)].tolist() == ref and batch.ids.shape[1] == cfg.text.context_length
    assert batch.ids.tolist() != CLIPTokenizer()(texts).ids.tolist()  # not OpenAI's vocabulary
    assert torch.allclose(loaded.encode_text(batch), model.encode_text(batch.ids), atol=1e-6)
    out = loaded.encode_text(batch, output="tokens")
    assert torch.equal(out.pool_index.cpu(), batch.eot_index)
    again = cliplab.convert(loaded, "hf", tmp_path / "again")  # converting carries the tokenizer files along
    assert (again / "tokenizer.json").read_bytes() == (clip_dir / "tokenizer.json").read_bytes()
    assert torch.equal(cliplab.load(again).tokenize(texts).ids, batch.ids)
    # a tokenizer whose end token is not the one the tower pools at is refused
    cfg_bad = cfg.replace(text=dataclasses.replace(cfg.text, eot_token_id=eot - 1))
    bad = cliplab.convert(create_model(cfg_bad, seed=1), "hf", tmp_path / "bad")
    shutil.copy(clip_dir / "tokenizer.json", bad / "tokenizer.json")
    with pytest.raises(CheckpointError, match="pools at id"):
        cliplab.load(bad)


def test_tokenized_batch_pool_defaults_to_eot():
    batch = TokenizedBatch(ids=torch.zeros(2, 8, dtype=torch.long), lengths=torch.tensor([3, 5]), spans=[[], []],
                           truncated=torch.zeros(2, dtype=torch.bool), n_dropped=torch.zeros(2, dtype=torch.long),
                           texts=["", ""])
    assert batch.eot_index.tolist() == [2, 4]
    assert dataclasses.replace(batch, pool="last").eot_index.tolist() == [7, 7]


# --------------------------------------------------------------------------- transformers' CLIPTokenizerFast


def test_transformers_clip_tokenizer_json_matches_clip_tokenizer(tmp_path):
    vocab_gz = shared_path("clip-tokenizer", "bpe_simple_vocab_16e6.txt.gz")
    captions_csv = shared_path("flickr8k-1k", "captions.csv")
    transformers = pytest.importorskip("transformers")
    from cliplab.models.tokenizer import bytes_to_unicode

    lines = gzip.open(vocab_gz).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    src = tmp_path / "vocab"
    src.mkdir()
    (src / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (src / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    hf = transformers.CLIPTokenizerFast.from_pretrained(str(src), local_files_only=True)
    hf.save_pretrained(str(tmp_path / "saved"))
    ours = CheckpointTokenizer.from_dir(tmp_path / "saved", context_length=77)
    ref = CLIPTokenizer(context_length=77)
    with open(captions_csv, newline="") as f:
        captions = [row["caption"] for row in csv.DictReader(f)]
    # (no curly quotes or HTML entities: OpenAI's ftfy / html.unescape steps, which HF's tokenizer.json lacks, change
    # those)
    captions += ["Ein Hund läuft über die Straße", "東京の夜景", "naïve café — 'quoted' text…", "I'm can't you'll",
                 "Numbers 12345 and 3.14!", "emoji 🐶🐱 mixed", "UPPER lower MiXeD", "  spaced   out  "]
    a, b = ours(captions), ref(captions)
    assert ours.eot_id == ref.eot_id and ours.sot_id == ref.sot_id and ours.pad_id == ref.eot_id
    n = b.lengths
    assert torch.equal(a.lengths, n)
    mask = torch.arange(77) < n[:, None]
    assert torch.equal(a.ids[mask], b.ids[mask])  # the same tokens; padding differs (HF pads with EOT, OpenAI 0)
    assert a.spans == b.spans  # the library's offsets agree with cliplab's normalisation maps


def test_hf_siglip_directory_is_tokenized_by_its_tokenizer(sp_dir, tmp_path):
    from cliplab.models.registry import list_models

    if "siglip-tiny" not in list_models():
        pytest.skip("the SigLIP family (config siglip-tiny) is not registered")
    cfg = get_config("siglip-tiny")
    vocab = _library(sp_dir).get_vocab_size(with_added_tokens=True)
    text = dataclasses.replace(cfg.text, vocab_size=vocab, context_length=SP_LENGTH)
    model = create_model(cfg.replace(text=text), seed=2)
    d = cliplab.convert(model, "hf", tmp_path / "siglip")
    for name in ("tokenizer.json", "special_tokens_map.json"):
        shutil.copy(sp_dir / name, d / name)
    loaded = cliplab.load(d)
    texts = ["A photo of a Café", "two red cubes"]
    batch = loaded.tokenize(texts)
    assert isinstance(loaded.tokenizer, CheckpointTokenizer) and batch.pool == "last"
    assert batch.ids.tolist() == [_library(sp_dir).encode(t).ids for t in texts]  # padded to 16 with <pad>
    assert torch.allclose(loaded.encode_text(batch), model.encode_text(batch.ids), atol=1e-6)
    assert torch.equal(loaded.encode_text(batch, output="tokens").pool_index.cpu(), batch.eot_index)
    assert loaded.tokenizer.token_strings(batch.ids[0, batch.token_positions(0, "café")]) == ["café"]


def test_a_small_vocabulary_model_refuses_openai_bpe_and_takes_a_tokenizer(sp_dir, tmp_path):
    """A SigLIP-sized vocabulary without a shipped tokenizer must not be fed OpenAI's BPE ids (up to 49407, past its
    embedding table): tokenizing says what to do; ``set_tokenizer`` installs one, checked as loading checks it."""
    vocab = _library(sp_dir).get_vocab_size(with_added_tokens=True)
    small = create_model(_siglip_style_config(vocab - 1), seed=0)
    with pytest.raises(CheckpointError, match="not the model's"):
        small.set_tokenizer(sp_dir / "tokenizer.json")
    assert small.checkpoint_tokenizer is None and small.config.tokenizer == "openai-clip-bpe"  # left as it was
    with pytest.raises(ValueError, match="set_tokenizer"):
        small.tokenize(["a red circle"])
    model = create_model(_siglip_style_config(vocab), seed=0).set_tokenizer(sp_dir)
    batch = model.tokenize(["a photo of a cat"])
    assert batch.ids.tolist() == [_library(sp_dir).encode("a photo of a cat").ids]
    assert batch.ids.shape == (1, SP_LENGTH) and model.tokenizer_id.startswith("tokenizer.json:")
    assert torch.equal(cliplab.load(model.save(tmp_path / "saved")).tokenize(["a photo of a cat"]).ids, batch.ids)
