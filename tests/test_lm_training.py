"""The shared small-LM trainer of issue 26: codecs, the next-token loss, bits per byte, parameter matching."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cliplab.models.tokenizer import CLIPTokenizer
from cliplab.textrep import lm_training as lt



pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per module


TEXTS = ["a black dog runs on the grass .", "two children play in the snow", "a man rides a red bike"]


def test_normalize_and_byte_codec_round_trip():
    assert lt.normalize_text("  A  Dog\tRUNS \n") == "a dog runs"
    codec = lt.ByteCodec()
    text = "a café , 37"
    assert codec.decode(codec.encode(text)) == text
    assert lt.encode_rows(codec, [text])[0][0] == codec.bos_id and lt.encode_rows(codec, [text])[0][-1] == codec.eos_id


def test_clip_bpe_ids_match_the_clip_tokenizer_on_words():
    tok = CLIPTokenizer()
    for word in ["hexagons", "supercalifragilistic", "skateboarder", "a", "4821"[:1], "café"]:
        assert lt.clip_bpe_ids(word.encode(), True) == tok.encode(word), word


def test_compact_clip_codec_is_lossless_for_unseen_words():
    codec = lt.CompactCLIPCodec(TEXTS)
    tok = CLIPTokenizer()
    text = "a zebra grazes near xylophones"  # words the cut vocabulary never saw
    ids = codec.encode(text)
    assert codec.spelled > 0
    spelled = b"".join(lt.clip_surface(codec.tokens[codec.clip_ids[i]])[0] for i in ids)
    reference = b"".join(lt.clip_surface(codec.tokens[i])[0] for i in tok.encode(text))
    assert spelled == reference
    # every cut-vocabulary token decomposes into itself (what ZeTT's identity relies on)
    surfaces = codec.surfaces()
    assert all(codec.decompose(*surfaces[i]) == [i] for i in range(codec.vocab_size - 3))


def test_bpe_codec_trains_and_decomposes_its_own_tokens():
    codec = lt.train_bpe_codec(TEXTS * 5, 80)
    assert codec.vocab_size <= 80
    surfaces = codec.surfaces()
    own = [i for i, s in enumerate(surfaces) if s is not None]
    assert sum(codec.decompose(*surfaces[i]) == [i] for i in own) == len(own)


def _nll_by_hand(model, ids, lengths, table=None):
    total = 0.0
    for b in range(ids.shape[0]):
        n = int(lengths[b])
        row = ids[b: b + 1, :n]
        if table is None:
            logits = model.logits(model(row).tokens)[0]
        else:
            logits = model(inputs_embeds=table[row]).tokens[0] @ table.T
        logp = F.log_softmax(logits.float(), -1)
        total += -sum(float(logp[t, row[0, t + 1]]) for t in range(n - 1))
    return total


def test_next_token_nll_matches_a_per_row_brute_force():
    torch.manual_seed(0)
    model = lt.tiny_lm(20, width=32, layers=2, seed=1)
    rows = [[1, 5, 7, 2], [1, 3, 2], [1, 9, 9, 9, 4, 2]]
    ids, lengths = lt.pad_rows(rows, 0)
    with torch.no_grad():
        total, count = lt.next_token_nll(model, ids, lengths)
        assert count == sum(len(r) - 1 for r in rows)
        assert float(total) == pytest.approx(_nll_by_hand(model, ids, lengths), rel=1e-5)
        # an outside table equal to the model's own tied table gives the same loss
        same, _ = lt.next_token_nll(model, ids, lengths, embeddings=model.token_embed.weight)
        assert float(same) == pytest.approx(float(total), rel=1e-5)
        # a per-row table [B, V, W] equals running each row with its own [V, W]
        tables = torch.randn(3, 20, 32)
        per_row, _ = lt.next_token_nll(model, ids, lengths, embeddings=tables)
        by_hand = sum(_nll_by_hand(model, ids[b: b + 1], lengths[b: b + 1], tables[b]) for b in range(3))
        assert float(per_row) == pytest.approx(by_hand, rel=1e-4)
        # padding is never scored: change it, the loss stays
        ids2 = ids.clone()
        ids2[1, 3:] = 11
        assert float(lt.next_token_nll(model, ids2, lengths)[0]) == pytest.approx(float(total), rel=1e-6)


def test_bits_per_byte_closed_form_and_uniform_model():
    texts = ["abcd", "xy"]
    assert lt.bits_per_byte(6 * math.log(2), texts) == pytest.approx(1.0)
    # a model with all-zero weights predicts uniformly: bpb = tokens * ln V / ln 2 / bytes
    codec = lt.ByteCodec()
    model = lt.tiny_lm(codec.vocab_size, width=32, layers=1)
    for p in model.parameters():
        torch.nn.init.zeros_(p)
    res = lt.evaluate_bpb(model, codec, texts)
    assert res["tokens"] == 4 + 1 + 2 + 1
    assert res["bpb"] == pytest.approx(8 * math.log(codec.vocab_size) / math.log(2) / 6, rel=1e-5)


def test_config_for_params_counts_exactly():
    for vocab, target in [(259, 1_200_000), (8000, 1_200_000)]:
        width = lt.config_for_params(vocab, target, layers=4)
        built = lt.count_params(lt.tiny_lm(vocab, width=width, layers=4))
        neighbours = [lt.count_params(lt.tiny_lm(vocab, width=w, layers=4)) for w in (width - 32, width + 32)]
        assert all(abs(built - target) <= abs(n - target) for n in neighbours)


def test_pack_stream_windows():
    windows = lt.pack_stream([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 4)
    assert windows.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]


def test_train_lm_passes_every_keyword_to_fit(monkeypatch):
    import cliplab.text.training as training

    seen = {}

    def fake_fit(params, step, **kw):
        seen.update(kw)
        step(0)
        return training.FitResult(kw["steps"])

    monkeypatch.setattr(training, "fit", fake_fit)
    model = lt.tiny_lm(12, width=32, layers=1)
    calls = []
    lt.train_lm(model, [[1, 2, 3]], pad_id=0, steps=7, batch_size=3, lr=0.5, warmup=2, weight_decay=0.3, seed=9,
                progress=True, loss_fn=lambda m, ids, lengths: (calls.append(ids.shape) or torch.ones(()), 1))
    assert seen == {"steps": 7, "lr": 0.5, "warmup": 2, "weight_decay": 0.3, "seed": 9, "progress": True,
                    "desc": "lm"}
    assert calls == [torch.Size([3, 3])]


def test_training_lowers_held_out_bpb():
    """Effect: 40 steps on a small caption set against the same model untrained (same seed and data)."""
    codec = lt.ByteCodec()
    train = [f"a {c} dog runs on the {g} grass" for c in ("black", "brown", "white", "small") for g in
             ("green", "short", "wet")]
    held = ["a brown dog runs on the wet grass", "a small dog runs on the green grass"]
    control = lt.tiny_lm(codec.vocab_size, width=32, layers=2, seed=0)
    model = lt.tiny_lm(codec.vocab_size, width=32, layers=2, seed=0)
    lt.train_lm(model, lt.encode_rows(codec, train), pad_id=codec.pad_id, steps=40, batch_size=8, lr=1e-2)
    before = lt.evaluate_bpb(control, codec, held)["bpb"]
    after = lt.evaluate_bpb(model, codec, held)["bpb"]
    assert before > 7.5 and after < before - 4.0


@pytest.mark.skipif(not lt.caption_path().is_file(), reason="Flickr8k captions (../shared/data) not available")
def test_caption_splits_hold_out_whole_images():
    from cliplab.eval.paraphrase import read_caption_groups, split_groups

    split = lt.load_caption_splits(held_out_images=200, seed=3)
    groups = read_caption_groups(lt.caption_path(), min_captions=1)
    _, held = split_groups(groups, held_out=200, seed=3)
    assert split.held_out == [lt.normalize_text(c) for _, caps in held for c in caps]
    assert len(split.train) + len(split.held_out) == 40455


def _caption_table(path):
    rows = ["image,caption"] + [f"img{i}.jpg,a dog number {i} runs on the grass" for i in range(12)] + \
           [f"img{i}.jpg,the dog {i} plays in the park" for i in range(12)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_cli_textrep_lm_passes_every_option_and_saves_the_model(tmp_path):
    import json

    from click.testing import CliRunner
    from safetensors.torch import load_file

    from cliplab.cli import main

    seen = {}

    @lt.register_lm_method("spy-lm")
    def spy(train, held, **kw):
        seen.update(kw, n_train=len(train), n_held=len(held))
        return {"bpb": 1.5}, torch.nn.Linear(2, 3)

    try:
        r = CliRunner().invoke(main, ["textrep", "lm", "spy-lm", "--captions", str(_caption_table(tmp_path / "c.csv")),
                                      "--held-out-images", "3", "--steps", "7", "--batch-size", "5", "--lr", "0.01",
                                      "--seed", "4", "--no-progress", "-o", str(tmp_path / "out"), "--json"])
    finally:
        lt._LM_METHODS.pop("spy-lm", None)
    assert r.exit_code == 0, r.output
    assert seen == {"steps": 7, "batch_size": 5, "lr": 0.01, "seed": 4, "progress": False, "n_train": 18, "n_held": 6}
    summary = json.loads(r.stdout)
    assert summary["bpb"] == 1.5 and json.loads((tmp_path / "out" / "lm.json").read_text()) == summary
    assert set(load_file(str(tmp_path / "out" / "model.safetensors"))) == {"weight", "bias"}
    r = CliRunner().invoke(main, ["textrep", "lm", "nope", "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "unknown LM method" in r.output
