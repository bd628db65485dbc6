"""The text-representation shell: reading training text, ``cliplab textrep train/list`` and ``cliplab eval
paraphrase``."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cliplab.cli import main
from cliplab.text.corpus import read_texts
from cliplab.text.training import _TRAINERS, register_trainer


# --- reading training text -------------------------------------------------------------------------------------------
def test_lines_skip_blanks_drop_duplicates_and_report_bad_bytes(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes(b"a dog runs\n\n  a   dog runs \nbad \xff byte\na cat sleeps\n")
    c = read_texts(p)
    assert c.format == "lines" and c.texts == ["a dog runs", "a cat sleeps"]
    assert c.duplicates == 1 and [line for line, _ in c.skipped] == [4]
    assert read_texts(p, dedupe=False).texts == ["a dog runs", "a dog runs", "a cat sleeps"]
    assert read_texts(p, limit=1).texts == ["a dog runs"]
    with pytest.raises(ValueError, match="unknown text encoding"):
        read_texts(p, encoding="utf-9")
    (tmp_path / "notes").write_text("first\nsecond\n")  # no suffix: lines
    assert read_texts(tmp_path / "notes").texts == ["first", "second"]


def test_sts_files_give_both_sentences(tmp_path):
    p = tmp_path / "sts-train.csv"
    p.write_text("main-captions\tMSRvid\t2012test\t0001\t5.000\tA plane takes off.\tAn air plane is taking off.\n"
                 "main-news\theadlines\t2013\t0002\tx\tbad score\trow\n"
                 "main-captions\tMSRvid\t2012test\t0003\t1.0\tA man plays.\tA plane takes off.\n")
    c = read_texts(p)
    assert c.format == "sts"
    assert c.texts == ["A plane takes off.", "An air plane is taking off.", "A man plays."]
    assert c.duplicates == 1 and [line for line, _ in c.skipped] == [2]


def test_tables_read_the_text_column(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text("image,caption,note\n1.jpg,a red ball,x\n2.jpg,a blue cube,y\n")
    assert read_texts(p).texts == ["a red ball", "a blue cube"] and read_texts(p).format == "table"
    assert read_texts(p, column="note").texts == ["x", "y"]
    with pytest.raises(ValueError, match="no column 'nope'"):
        read_texts(p, column="nope")
    (tmp_path / "n.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="caption/text/sentence"):
        read_texts(tmp_path / "n.csv")
    (tmp_path / "e.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no text"):
        read_texts(tmp_path / "e.txt")
    with pytest.raises(ValueError, match="applies to a table"):
        read_texts(tmp_path / "e.txt", column="caption")


# --- cliplab textrep ---------------------------------------------------------------------------------------------------
class _Saved:
    name = "fake"

    def save(self, directory):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "weights").write_text("w")


@pytest.fixture
def fake_trainer():
    calls = []

    @register_trainer("fake_method", "some-default-model", "records its call")
    def train(model, texts, *, steps, batch_size=None, lr=None, seed=0, progress=False):
        calls.append(dict(model=model, texts=list(texts), steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                          progress=progress))
        return _Saved()

    yield calls
    _TRAINERS.pop("fake_method")


def test_textrep_train_passes_every_setting_and_saves(tmp_path, fake_trainer):
    texts = tmp_path / "t.txt"
    texts.write_text("one\ntwo\nthree\none\n")
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["textrep", "train", "fake_method", "--texts", str(texts), "--steps", "7",
                                  "--batch-size", "3", "--lr", "0.002", "--seed", "5", "--limit", "2", "-o", str(out),
                                  "--no-progress", "--json"])
    assert r.exit_code == 0, r.output
    assert fake_trainer == [dict(model="some-default-model", texts=["one", "two"], steps=7, batch_size=3, lr=0.002,
                                 seed=5, progress=False)]
    summary = json.loads(r.stdout)
    assert (out / "weights").exists() and json.loads((out / "textrep.json").read_text()) == summary
    assert summary["n_texts"] == 2 and summary["method"] == "fake_method"
    # -m reaches the trainer; a non-empty --out is refused unless --overwrite
    r = CliRunner().invoke(main, ["textrep", "train", "fake_method", "-m", "other", "--texts", str(texts),
                                  "--steps", "1", "-o", str(out)])
    assert r.exit_code == 2 and "not empty" in r.output and len(fake_trainer) == 1
    r = CliRunner().invoke(main, ["textrep", "train", "fake_method", "-m", "other", "--texts", str(texts),
                                  "--steps", "1", "-o", str(out), "--overwrite"])
    assert r.exit_code == 0, r.output
    assert fake_trainer[-1]["model"] == "other" and fake_trainer[-1]["texts"] == ["one", "two", "three"]


def test_textrep_train_unknown_method_is_one_line(tmp_path, fake_trainer):
    (tmp_path / "t.txt").write_text("x\n")
    r = CliRunner().invoke(main, ["textrep", "train", "fake_metod", "--texts", str(tmp_path / "t.txt"),
                                  "--steps", "1", "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "did you mean 'fake_method'" in r.output and len(r.output.strip().splitlines()) == 1


def test_textrep_list_shows_the_methods():
    r = CliRunner().invoke(main, ["textrep", "list", "--json"])
    assert r.exit_code == 0, r.output
    slugs = {t["slug"] for t in json.loads(r.stdout)}
    assert {"gem", "text2token", "dupmae"} <= slugs


# --- cliplab eval paraphrase -------------------------------------------------------------------------------------------
def test_eval_paraphrase_scores_the_held_out_split(tmp_path):
    import cliplab.text as text
    from cliplab.eval.paraphrase import caption_retrieval, read_caption_groups, split_groups

    # images 0-5: three copies of their own caption (always retrieved); images 6-11: the same three captions each
    # (never told apart): the score depends on which images the seed holds out
    own = [f"{c} {s}" for c, s in zip(["red", "blue", "green", "yellow", "red", "blue"],
                                        ["circle", "square", "triangle", "circle", "triangle", "circle"])]
    rows = [(f"{i}.jpg", own[i]) for i in range(6) for _ in range(3)]
    rows += [(f"{i}.jpg", c) for i in range(6, 12) for c in ("a big scene", "small things", "colours")]
    p = tmp_path / "caps.csv"
    p.write_text("image,caption\n" + "".join(f"{i},{c}\n" for i, c in rows))
    groups = read_caption_groups(p)
    emb = text.load_embedder("shapes-tiny")
    want = caption_retrieval(emb, split_groups(groups, held_out=5, seed=3)[1])
    assert want["mrr"] != caption_retrieval(emb, split_groups(groups, held_out=5, seed=0)[1])["mrr"]  # seeds differ
    r = CliRunner().invoke(main, ["eval", "paraphrase", "-m", "shapes-tiny", "--data", str(p), "--held-out", "5",
                                  "--seed", "3", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["images"] == 5 and res["n"] == 15
    assert res["r@1"] == pytest.approx(want["r@1"]) and res["mrr"] == pytest.approx(want["mrr"])
    r = CliRunner().invoke(main, ["eval", "paraphrase", "-m", "shapes-tiny", "--data", str(p), "--all", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["images"] == 12


# --- every registered method, end to end on its real default model ---------------------------------------------------
@pytest.mark.parametrize("method", ["gem", "text2token", "dupmae"])
def test_textrep_train_then_eval_sts_on_the_real_model(tmp_path, method):
    from cliplab.models.lm.pretrained import available

    missing = [name for name, ok in available().items() if not ok]
    if missing:
        pytest.skip(f"needs the real text models {missing}")
    if method == "gem":
        pytest.importorskip("gguf")
    texts = tmp_path / "t.txt"
    texts.write_text("a dog runs on the grass\ntwo children play in the snow\na man plays a guitar on stage\n"
                     "a woman rides a bike\n")
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["textrep", "train", method, "--texts", str(texts), "--steps", "2", "--batch-size",
                                  "2", "-o", str(out), "--no-progress", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["n_texts"] == 4
    sts = tmp_path / "sts.csv"
    sts.write_text("main-captions\tx\t2012\t1\t5.0\tA dog runs.\tA dog is running.\n"
                   "main-captions\tx\t2012\t2\t0.5\tA man plays a guitar.\tTwo children play in the snow.\n"
                   "main-captions\tx\t2012\t3\t3.0\tA woman rides a bike.\tA woman is on a bicycle.\n")
    r = CliRunner().invoke(main, ["eval", "sts", "-m", str(out), "--data", str(sts), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["n"] == 3 and method in res["embedder"]
    # a pooling the method's embedder adds itself reaches it by name
    own = {"gem": "gem_last", "text2token": "max", "dupmae": "dupmae_cls"}[method]
    r = CliRunner().invoke(main, ["eval", "sts", "-m", str(out), "--data", str(sts), "-p", own, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["pooling"] == own


def test_textrep_train_reports_unreadable_lines(tmp_path, fake_trainer):
    p = tmp_path / "t.txt"
    p.write_bytes(b"good one\n" + b"bad \xff\n" * 7 + b"good two\n")
    r = CliRunner().invoke(main, ["textrep", "train", "fake_method", "--texts", str(p), "--steps", "1",
                                  "-o", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert r.output.count("t.txt:") == 5 and "and 2 more unreadable line(s)" in r.output
    assert fake_trainer[-1]["texts"] == ["good one", "good two"]
