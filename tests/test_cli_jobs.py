"""The embedding job as a user meets it (issue #16): incremental runs, bad table text, one rule for image paths,
empty sources, Ctrl-C, precision, readable mismatch messages, and one-line errors."""

from __future__ import annotations

import json
import os
import signal
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import cliplab
from cliplab.cli import main
from cliplab.pipeline import JobMismatchError, embed, read_embeddings, read_rejects
from test_pipeline import _forked_job_crashing_at, rows_by_id

pytestmark = pytest.mark.filterwarnings("ignore::cliplab.pipeline.RandomWeightsWarning")


@pytest.fixture(scope="module")
def model():
    return cliplab.create_model("test-tiny", seed=0).eval()


def _png(path, seed: int, size=(24, 24)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _run(args):
    return CliRunner().invoke(main, args)


# --- incremental embedding -------------------------------------------------------------------------------------------
def test_rerun_on_a_grown_folder_embeds_only_the_new_files(tmp_path, model):
    src, out = tmp_path / "photos", tmp_path / "emb"
    for i in range(3):
        _png(src / f"a{i}.png", i)
    first = embed(src, out, model, shard_size=2, batch_size=2)
    before = rows_by_id(out)
    shard_times = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.parquet")}
    for i in range(3, 6):
        _png(src / f"b{i}.png", i)
    second = embed(src, out, model, shard_size=2, batch_size=2)
    assert first.rows == 3 and second.rows == 6 and second.changes["added"] == 3
    assert second.shards_skipped == 2 and second.shards_written == 2  # new items start new shards
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.parquet") if p.name in shard_times} \
        == shard_times  # committed shards untouched
    after = rows_by_id(out)
    assert set(after) == {f"a{i}.png" for i in range(3)} | {f"b{i}.png" for i in range(3, 6)}
    for k, row in before.items():
        assert np.array_equal(after[k]["image"], row["image"])
    fresh = rows_by_id(embed(src, tmp_path / "fresh", model, shard_size=2).out_dir)
    for k in after:  # the new rows equal a fresh job's
        np.testing.assert_allclose(after[k]["image"], fresh[k]["image"], atol=1e-6)
    third = embed(src, out, model, shard_size=2)
    assert third.changes["added"] == 0 and third.shards_written == 0


def test_changed_and_removed_files_are_reported_not_silently_kept(tmp_path, model):
    src, out = tmp_path / "photos", tmp_path / "emb"
    for i in range(4):
        _png(src / f"p{i}.png", i)
    embed(src, out, model)
    _png(src / "p1.png", 99, size=(30, 30))  # changed content
    (src / "p2.png").unlink()
    res = embed(src, out, model)
    ch = res.changes
    assert (ch["added"], ch["changed"], ch["removed"]) == (0, 1, 1)
    assert ch["changed_ids"] == ["p1.png"] and ch["removed_ids"] == ["p2.png"]
    assert json.loads((out / "manifest.json").read_text())["source_changes"]["removed_ids"] == ["p2.png"]
    r = _run(["embed", str(src), "-o", str(out), "-m", "test-tiny", "--no-progress"])
    assert r.exit_code == 0 and "1 item(s) changed and 1 were removed" in r.output and "p1.png" in r.output


def test_a_grown_table_embeds_the_new_rows(tmp_path, model):
    table, out = tmp_path / "caps.csv", tmp_path / "emb"
    table.write_text("caption\na red circle\na blue square\n")
    assert embed(table, out, model).rows == 2
    with table.open("a") as f:
        f.write("a green star\n")
    res = embed(table, out, model)
    assert res.rows == 3 and res.changes["added"] == 1
    assert read_embeddings(out).captions == ["a red circle", "a blue square", "a green star"]


def test_sigkill_while_growing_then_rerun_is_exactly_once(tmp_path, model):
    src, out = tmp_path / "photos", tmp_path / "emb"
    for i in range(6):
        _png(src / f"a{i}.png", i)
    embed(src, out, "test-tiny", shard_size=5, batch_size=4, workers=2)
    for i in range(6, 13):
        _png(src / f"b{i}.png", i)
    for crash in ("plan:grown", "shard:committed:1"):
        status = _forked_job_crashing_at(out, src, crash)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, crash
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = embed(src, out, "test-tiny", shard_size=5, batch_size=4, workers=2)
    got = rows_by_id(out)  # no duplicate ids
    assert len(got) == 13 and res.manifest["complete"] and res.manifest["counts"]["items"] == 13


# --- bad text is data ------------------------------------------------------------------------------------------------
def test_undecodable_csv_rows_are_rejected_with_file_and_line(tmp_path, model):
    table, out = tmp_path / "caps.csv", tmp_path / "emb"
    table.write_bytes(b"caption\na red circle\ncaf\xe9 au lait\na blue square\n")
    res = embed(table, out, model)
    assert res.rows == 2
    (rej,) = read_rejects(out)
    assert "caps.csv:3" in rej["reason"] and "0xe9" in rej["reason"]
    latin = embed(table, tmp_path / "latin", model, source_options={"encoding": "latin-1"})
    assert latin.rows == 3 and "café au lait" in read_embeddings(latin.out_dir).captions
    r = _run(["embed", str(table), "-o", str(tmp_path / "cli"), "-m", "test-tiny", "--encoding", "latin-1",
              "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["rows"] == 3


def test_jsonl_rows_that_do_not_decode_are_rejected(tmp_path, model):
    table = tmp_path / "caps.jsonl"
    table.write_bytes(b'{"caption": "a red circle"}\n{"caption": "caf\xe9"}\nnot json\n')
    res = embed(table, tmp_path / "emb", model)
    reasons = sorted(r["reason"] for r in read_rejects(tmp_path / "emb"))
    assert res.rows == 1 and any("caps.jsonl:2" in r for r in reasons) and any("caps.jsonl:3" in r for r in reasons)


# --- one rule for image paths ------------------------------------------------------------------------------------------
def test_table_image_paths_find_the_images_folder_beside_the_table(tmp_path, model):
    root = tmp_path / "data"
    for i in range(3):
        _png(root / "images" / f"{i}.png", i)
    (root / "captions.csv").write_text("image,caption\n" + "".join(f"{i}.png,picture {i}\n" for i in range(3)))
    res = embed(root / "captions.csv", tmp_path / "emb", model)
    assert res.rows == 3 and res.manifest["counts"]["images"] == 3
    assert res.manifest["source"]["resolved_image_root"] == str(root / "images")
    from cliplab.data.tables import image_root_for

    assert image_root_for(root / "captions.csv", ["0.png"], root)[0] == str(root)  # --image-root wins


def test_a_job_where_every_image_is_missing_fails_with_a_hint(tmp_path):
    (tmp_path / "t.csv").write_text("image,caption\nnope.png,a\nmissing.png,b\n")
    r = _run(["embed", str(tmp_path / "t.csv"), "-o", str(tmp_path / "emb"), "-m", "test-tiny", "--what", "image",
              "--no-progress"])
    assert r.exit_code == 1 and "all 2 input(s) were rejected" in r.output and "--image-root" in r.output


# --- empty sources, failed jobs, Ctrl-C -------------------------------------------------------------------------------
def test_empty_folder_is_an_error_naming_skipped_files(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "data.mat").write_text("x")
    r = _run(["embed", str(tmp_path / "in"), "-o", str(tmp_path / "emb"), "-m", "test-tiny"])
    assert r.exit_code == 2 and "nothing to embed" in r.output and "1 file(s) skipped" in r.output


def test_non_image_files_are_named(tmp_path, model):
    _png(tmp_path / "in" / "a.png", 0)
    (tmp_path / "in" / "notes.mat").write_text("x")
    res = embed(tmp_path / "in", tmp_path / "emb", model)
    assert res.manifest["source"]["skipped_files"] == ["notes.mat"]
    r = _run(["embed", str(tmp_path / "in"), "-o", str(tmp_path / "emb2"), "-m", "test-tiny", "--no-progress"])
    assert "notes.mat" in r.output


def test_a_failed_job_leaves_no_directory_behind(tmp_path, model):
    (tmp_path / "bad.csv").write_text("colour,size\nred,big\n")  # neither a path nor a caption column
    with pytest.raises(ValueError, match="neither an image path column"):
        embed(tmp_path / "bad.csv", tmp_path / "emb", model)
    assert not (tmp_path / "emb").exists()


def test_ctrl_c_exits_130_with_a_resume_hint(tmp_path, monkeypatch):
    import cliplab.pipeline as pipeline

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "embed", interrupted)
    r = _run(["embed", "synthetic:3", "-o", str(tmp_path / "emb"), "-m", "test-tiny"])
    assert r.exit_code == 130 and "run the same command again to resume" in r.output
    assert "Aborted" not in r.output


# --- precision, mismatches, errors -------------------------------------------------------------------------------------
def test_precision_is_recorded_and_part_of_the_job(tmp_path):
    out = tmp_path / "emb"
    r = _run(["embed", "synthetic:4", "-o", str(out), "-m", "test-tiny", "--precision", "bf16", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["precision"] == "bf16"
    assert json.loads((out / "manifest.json").read_text())["precision"] == "bf16"
    with pytest.raises(JobMismatchError) as e:
        embed("synthetic:4", out, "test-tiny")
    assert "options.precision: 'bf16' -> 'fp32'" in str(e.value) and "{" not in str(e.value)


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, monkeypatch):
    import cliplab.pipeline as pipeline

    def broken(*a, **k):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(pipeline, "embed", broken)
    r = _run(["embed", "synthetic:3", "-o", str(tmp_path / "emb")])
    assert r.exit_code == 1 and r.output.strip() == ("error: RuntimeError: disk on fire; second line "
                                                     "(cliplab --debug ... shows the traceback)")
    r = _run(["--debug", "embed", "synthetic:3", "-o", str(tmp_path / "emb")])
    assert isinstance(r.exception, RuntimeError)


def test_eval_and_train_tables_follow_the_same_rules(tmp_path):
    from cliplab.eval.datasets import captions_csv
    from cliplab.train.data import CaptionFolder

    root = tmp_path / "data"
    for i in range(3):
        _png(root / "images" / f"{i}.png", i)
    (root / "captions.csv").write_bytes(b"image,caption\n0.png,a red one\n1.png,caf\xe9\n2.png,a blue one\n")
    with pytest.warns(UserWarning, match="captions.csv:3: not valid utf-8"):
        data = captions_csv(str(root / "captions.csv"))
    assert data.captions == ["a red one", "a blue one"] and data.info["images"] == str(root / "images")
    model = cliplab.create_model("test-tiny", seed=0)
    with pytest.warns(UserWarning, match="captions.csv:3"):
        folder = CaptionFolder(model.preprocessor, str(root))
    assert folder.size == 2 and folder.root == str(root / "images")
    assert folder.pixels([0, 1]).shape[0] == 2
    (root / "captions.csv").write_text("image,caption\nnope.png,x\n")
    with pytest.raises(FileNotFoundError, match="captions.csv:2: image 'nope.png'"):
        captions_csv(str(root / "captions.csv"))


# --- names for real checkpoints, offline -------------------------------------------------------------------------------
def _fake_hf_cache(tmp_path, monkeypatch, repo="someorg/clip-tiny"):
    cache = tmp_path / "hub"
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text("abc123")
    model = cliplab.create_model("test-tiny", seed=3)
    cliplab.convert(model, "hf", repo_dir / "snapshots" / "abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import cliplab.models.hub as hub

    monkeypatch.setattr(hub, "find_cached", lambda rid: hub._snapshot(hub.hf_cache_dir() /
                                                                      f"models--{rid.replace('/', '--')}"))
    return model


def test_hub_ids_load_from_the_local_cache(tmp_path, monkeypatch):
    ref = _fake_hf_cache(tmp_path, monkeypatch)
    model = cliplab.load("someorg/clip-tiny")
    for k, v in ref.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    with pytest.raises(FileNotFoundError, match="not in the local cache .*hub"):
        cliplab.load("someorg/absent-model")
    r = _run(["models", "--json"])
    assert json.loads(r.stdout)["hf_cache"] == {"someorg/clip-tiny": str(tmp_path / "hub" / "models--someorg--clip-tiny"
                                                                         / "snapshots" / "abc123")}
    r = _run(["embed", "synthetic:3", "-o", str(tmp_path / "emb"), "-m", "someorg/clip-tiny", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["rows"] == 3


def test_openclip_arch_plus_pretrained_file(tmp_path):
    model = cliplab.create_model("test-tiny", seed=5)
    path = cliplab.convert(model, "openai", tmp_path / "w.safetensors")
    a = cliplab.load("test-tiny", pretrained=path)
    b = cliplab.load(path, arch="test-tiny")
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    with pytest.raises(FileNotFoundError, match="tags .* are not downloaded"):
        cliplab.load("test-tiny", pretrained="laion2b_s34b_b79k")
    r = _run(["embed", "synthetic:3", "-o", str(tmp_path / "emb"), "-m", "test-tiny", "--pretrained", str(path),
              "--json"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "emb" / "manifest.json").read_text())
    assert manifest["model"]["arch"] == "test-tiny" and manifest["model"]["source"] == str(path)
    from cliplab.pipeline import load_model_from_info  # a later search rebuilds the same weights

    again = load_model_from_info(manifest["model"])
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in a.state_dict().items())


def test_unknown_names_say_where_cliplab_looked_and_what_was_meant():
    with pytest.raises(FileNotFoundError) as e:
        cliplab.load("shapes-tiyn")
    assert "did you mean 'shapes-tiny'" in str(e.value) and "Hugging Face" in str(e.value)
    r = _run(["info", "shapes-tiyn"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "did you mean" in r.output


def test_models_lists_parameter_counts(tmp_path):
    data = json.loads(_run(["models", "--json"]).stdout)
    assert data["parameters"]["test-tiny"] == sum(p.numel() for p in cliplab.create_model("test-tiny").parameters())
    assert set(data["text_models"]) == {"all-MiniLM-L6-v2", "smollm2-135m"} and "shapes-tiny" in data["pretrained"]
    assert json.loads(_run(["models", "test-*", "--json"]).stdout)["architectures"] == ["test-tiny", "test-tiny-resnet"]


@pytest.mark.parametrize("content,expect", [
    (b"just some text\n", "neither a zip archive nor a pickle"),
    (b"PK\x03\x04 truncated zip", "damaged zip archive"),
])
def test_bad_checkpoint_files_get_our_own_words(tmp_path, content, expect):
    path = tmp_path / "x.bin"
    path.write_bytes(content)
    r = _run(["info", str(path)])
    assert r.exit_code == 2 and expect in r.output and "weights_only" not in r.output and r.output.count("\n") == 1


def test_pickles_with_objects_are_refused_in_our_words(tmp_path):
    import collections

    torch.save({"a": torch.zeros(1), "od": collections.OrderedDict(x=torch.zeros(1)),
                "f": _Unsafe()}, tmp_path / "obj.pt")
    r = _run(["info", str(tmp_path / "obj.pt")])
    assert r.exit_code == 2 and "refused" in r.output and "_Unsafe" in r.output and "weights_only=False" not in r.output


class _Unsafe:
    pass


# --- review fixes: growth keeps the job readable, honest and resumable ----------------------------------------------
def test_a_grown_job_keeps_its_schema(tmp_path, model):
    _png(tmp_path / "0.png", 0)
    table, out = tmp_path / "t.csv", tmp_path / "emb"
    table.write_text("image,caption\n,a cat\n")
    embed(table, out, model)
    with table.open("a") as f:
        f.write("0.png,a photo\n")
    res = embed(table, out, model)
    e = read_embeddings(out)  # one schema for every shard: readable
    assert res.rows == 2 and e.image is None and e.captions == ["a cat", "a photo"]


def test_an_unfinished_growth_is_not_reported_complete(tmp_path, model):
    src, out = tmp_path / "p", tmp_path / "emb"
    for i in range(5):
        _png(src / f"a{i}.png", i)
    embed(src, out, "test-tiny", shard_size=5, workers=2)
    for i in range(5, 9):
        _png(src / f"b{i}.png", i)
    status = _forked_job_crashing_at(out, src, "shard:start")
    assert os.WIFSIGNALED(status)
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] is False and m["counts"]["items"] == 9
    r = _run(["index", str(out)])
    assert r.exit_code == 2 and "unfinished" in r.output


def test_jobs_written_before_segments_resume_and_grow(tmp_path, model):
    import pyarrow.parquet as pq

    src, out = tmp_path / "p", tmp_path / "emb"
    for i in range(4):
        _png(src / f"a{i}.png", i)
    embed(src, out, model, shard_size=3)
    plan = pq.read_table(out / "plan.parquet").drop(["stamp", "segment"])  # the old plan format
    pq.write_table(plan, out / "plan.parquet")
    job = json.loads((out / "job.json").read_text())
    job.pop("columns")
    (out / "job.json").write_text(json.dumps(job))
    _png(src / "b.png", 9)
    res = embed(src, out, model, shard_size=3)
    assert res.rows == 5 and res.shards_skipped == 2 and sorted(rows_by_id(out)) == [
        "a0.png", "a1.png", "a2.png", "a3.png", "b.png"]


def test_a_deleted_image_does_not_change_a_table_jobs_identity(tmp_path, model):
    root = tmp_path / "data"
    for i in range(3):
        _png(root / "images" / f"{i}.png", i)
    (root / "c.csv").write_text("image,caption\n" + "".join(f"{i}.png,pic {i}\n" for i in range(3)))
    embed(root / "c.csv", tmp_path / "emb", model)
    (root / "images" / "0.png").unlink()
    res = embed(root / "c.csv", tmp_path / "emb", model)  # resumes: same job, nothing new
    assert res.rows == 3 and res.shards_written == 0


def test_embed_leaves_the_callers_model_alone(tmp_path, model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    embed("synthetic:3", tmp_path / "a", model, precision="bf16")
    assert model.dtype == torch.float32 and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    embed("synthetic:3", tmp_path / "a", model, precision="bf16")  # the same job again: resumes


def test_an_unbalanced_quote_is_one_bad_row_not_the_rest_of_the_file(tmp_path):
    from cliplab.data.tables import read_table_rows

    (tmp_path / "t.csv").write_text('image,caption\na.jpg,fine\nb.jpg,"unbalanced\nc.jpg,kept\nd.jpg,kept too\n')
    t = read_table_rows(tmp_path / "t.csv")
    assert [r.get("caption") for r in t.rows] == ["fine", None, "kept", "kept too"] and t.lines == [2, 3, 4, 5]
    assert "t.csv:3: a quote that is never closed" in t.errors[1]
    (tmp_path / "q.csv").write_text('image,caption\na.jpg,"the word "tree" inside"\nb.jpg,ok\n')
    assert len(read_table_rows(tmp_path / "q.csv").rows) == 2  # a stray inner quote is kept as text, as csv does
    (tmp_path / "t.tsv").write_text('image\tcaption\na.jpg\t"quoted" start\n')
    assert read_table_rows(tmp_path / "t.tsv").rows[0]["caption"] == '"quoted" start'
    with pytest.raises(ValueError, match="unknown text encoding"):
        read_table_rows(tmp_path / "t.csv", encoding="no-such-codec")


def test_train_ctrl_c_before_any_step_says_nothing_was_saved(tmp_path, monkeypatch):
    from cliplab.train import Trainer

    def interrupted(self, batch):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    r = _run(["train", "--preset", "tiny-smoke", "-o", str(tmp_path / "run"), "--steps", "5", "--no-progress"])
    assert r.exit_code == 130 and "nothing was saved" in r.output and "--resume" not in r.output


def test_root_usage_errors_are_one_line():
    r = _run(["--bogus"])
    assert r.exit_code == 2 and r.output.count("\n") == 1
    assert r.output.startswith("error: No such option '--bogus'. (see ") and "Usage" not in r.output
