"""The embedding pipeline: rows equal direct model calls, bad input is rejected (never lost, never fatal), a job
killed with SIGKILL anywhere resumes to exactly-once rows, real photos run cleanly, and Ray gives the same rows."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cliplab
from cliplab.pipeline import FolderSource, JobMismatchError, embed, read_embeddings, read_rejects
from cliplab.pipeline.shards import ShardStore

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.filterwarnings("ignore::cliplab.pipeline.RandomWeightsWarning")


@pytest.fixture(scope="module")
def model():
    return cliplab.create_model("test-tiny", seed=0).eval()


# --------------------------------------------------------------------------------------------------------------------
# helpers


def _png_header_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width x height`` 1-bit pixels (far above Pillow's bomb limit)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


def _img(seed: int, size=(40, 30), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


def make_bad_folder(root: Path, n_extra_good: int = 0) -> tuple[set[str], dict[str, str]]:
    """Good files (ids relative to root) and bad files -> expected substring of the reject reason."""
    (root / "a" / "b").mkdir(parents=True)
    good = {}
    good["a/red.png"] = lambda p: _img(1).save(p)
    good["a/b/blue.jpg"] = lambda p: _img(2).save(p, format="JPEG")
    good["gif_named.jpg"] = lambda p: _img(3).convert("P").save(p, format="GIF")  # extension lies: content decides
    good["png_named.jpeg"] = lambda p: _img(4).save(p, format="PNG")
    good["cmyk.jpg"] = lambda p: _img(5).convert("CMYK").save(p, format="JPEG")
    good["gray16.png"] = lambda p: Image.fromarray((np.arange(600, dtype=np.uint16) * 97).reshape(20, 30)).save(p)
    good["la.png"] = lambda p: _img(6, mode="LA").save(p)
    good["wide.png"] = lambda p: _img(7, size=(300, 4)).save(p)
    good["UPPER.PNG"] = lambda p: _img(8).save(p)
    for i in range(n_extra_good):
        good[f"extra/{i:03d}.png"] = lambda p, i=i: _img(100 + i, size=(24, 24)).save(p)
    for name, make in good.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        make(root / name)
    jpeg = (root / "a/b/blue.jpg").read_bytes()
    bad = {
        "empty.png": "empty",
        "truncated.jpg": "truncated",
        "text.jpg": "not a recognised image",
        "bomb.png": "decompression",
        "broken_link.png": "no such file",
    }
    (root / "empty.png").write_bytes(b"")
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "text.jpg").write_text("this is not an image\n")
    (root / "bomb.png").write_bytes(_png_header_bomb(30000, 30000))
    os.symlink(root / "does-not-exist.png", root / "broken_link.png")
    (root / "notes.txt").write_text("not an image extension: skipped and counted, not rejected")
    _img(9).save(root / ".hidden.png")
    return set(good), bad


class VanishingFolder(FolderSource):
    """A folder source where some files disappear after listing, just before they are read."""

    def __init__(self, root, vanish: set[str]):
        super().__init__(root)
        self.vanish = vanish

    def image_input(self, item):
        if item.id in self.vanish and os.path.exists(item.path):
            os.remove(item.path)
        return super().image_input(item)


def rows_by_id(out) -> dict[str, dict]:
    e = read_embeddings(out)
    out_rows = {}
    for r, i in enumerate(e.ids):
        assert i not in out_rows, f"duplicate row {i}"
        out_rows[i] = {"image": None if e.image is None else e.image[r], "text": None if e.text is None else e.text[r],
                       "caption": e.captions[r], "path": e.paths[r], "index": int(e.index[r])}
    return out_rows


# --------------------------------------------------------------------------------------------------------------------
# correctness on generated scenes


def test_synthetic_rows_match_direct_model_calls(tmp_path, model):
    res = embed("synthetic:40", tmp_path / "out", model, shard_size=16, batch_size=8, text_batch_size=16, workers=2)
    assert (res.rows, res.rejects, res.shards_written, res.shards_skipped) == (40, 0, 3, 0)
    e = read_embeddings(tmp_path / "out")
    assert e.ids == [f"scene-{i:07d}" for i in range(40)] and list(e.index) == list(range(40))
    assert e.image.shape == e.text.shape == (40, 64) and e.image_valid.all() and e.text_valid.all()
    world = cliplab.data.SceneWorld(image_size=64, seed=0)
    scenes = [world.sample(i) for i in range(40)]
    assert e.captions == [s.short_caption for s in scenes]
    with torch.inference_mode():
        ref_img = model.encode_image(torch.stack([model.preprocess(s.render()) for s in scenes]), normalize=True)
        ref_txt = model.encode_texts(e.captions, normalize=True)
    np.testing.assert_allclose(e.image, ref_img.numpy(), atol=2e-5)
    np.testing.assert_allclose(e.text, ref_txt.numpy(), atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(e.image, axis=1), 1, atol=1e-5)

    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["complete"] and m["counts"]["rows"] == 40 and m["counts"]["shards"] == 3
    assert m["model"]["name"] == "test-tiny" and len(m["model"]["fingerprint"]) == 32
    assert m["preprocess"]["image_size"] == 32 and m["embedding"] == {
        "dim": 64, "dtype": "float32", "normalized": True, "image_column": "image_embedding",
        "text_column": "text_embedding", "columns": m["embedding"]["columns"]}
    assert {"cliplab", "torch", "numpy", "pillow", "pyarrow", "python"} <= set(m["versions"])
    assert m["source"] == {"kind": "synthetic", "n": 40, "seed": 0, "image_size": 64, "caption": "short",
                           "offset": 0}

    # a rerun of the finished job is a no-op; float16 storage is a different job (refused, then --overwrite)
    again = embed("synthetic:40", tmp_path / "out", model, shard_size=16)
    assert (again.shards_written, again.shards_skipped, again.rows) == (0, 3, 40)
    with pytest.raises(JobMismatchError, match="dtype"):
        embed("synthetic:40", tmp_path / "out", model, shard_size=16, dtype="float16")
    import fcntl

    from cliplab.pipeline import JobLockedError

    with open(tmp_path / "out" / ".lock") as f:  # another job writing to the same directory
        fcntl.flock(f, fcntl.LOCK_EX)
        with pytest.raises(JobLockedError):
            embed("synthetic:40", tmp_path / "out", model, shard_size=16)
    half = embed("synthetic:40", tmp_path / "out", model, shard_size=16, dtype="float16", overwrite=True)
    assert half.shards_written == 3
    np.testing.assert_allclose(read_embeddings(tmp_path / "out").image, e.image, atol=2e-3)


# --------------------------------------------------------------------------------------------------------------------
# bad input


def test_bad_files_are_rejected_with_reasons_and_good_ones_embedded(tmp_path, model):
    good, bad = make_bad_folder(tmp_path / "in")
    _img(10).save(tmp_path / "in" / "vanish.png")
    src = VanishingFolder(tmp_path / "in", vanish={"vanish.png"})
    res = embed(src, tmp_path / "out", model, shard_size=4, batch_size=3, workers=2)
    rows = rows_by_id(tmp_path / "out")
    assert set(rows) == good
    rejects = {r["id"]: r for r in read_rejects(tmp_path / "out")}
    assert set(rejects) == set(bad) | {"vanish.png"}
    for name, why in {**bad, "vanish.png": "no such file"}.items():
        assert why in rejects[name]["reason"].lower(), (name, rejects[name])
        assert rejects[name]["stage"] == "image" and rejects[name]["path"].endswith(name)
    assert res.rows + res.rejects == len(good) + len(bad) + 1
    m = res.manifest
    assert m["source"]["skipped_by_extension"] == 1  # notes.txt (hidden files are not candidates at all)
    for i, r in rows.items():  # a GIF named .jpg, CMYK, 16-bit grey, LA, 300x4: all embedded like load_image does
        with torch.inference_mode():
            ref = model.encode_image(model.preprocess(r["path"])[None], normalize=True)[0].numpy()
        np.testing.assert_allclose(r["image"], ref, atol=2e-5, err_msg=i)
    # per-shard reject files hold each reject exactly once
    per_shard = [json.loads(line)["id"] for p in sorted((tmp_path / "out" / "rejects").glob("part-*.jsonl"))
                 for line in p.read_text().splitlines()]
    assert sorted(per_shard) == sorted(rejects)


def test_tables_captions_and_truncation_policy(tmp_path, model):
    _img(1).save(tmp_path / "x.png")
    long = " ".join(["a very long caption about red circles and blue squares"] * 12)
    rows = [
        {"id": "a", "image": "x.png", "caption": "a red circle"},
        {"id": "b", "image": "x.png", "caption": long},            # same image: decoded once, embedded twice
        {"id": "c", "caption": "only a caption"},
        {"id": "d", "image": "missing.png", "caption": "its image is gone"},
        {"id": "e", "caption": 42},                                # not a string
        {"id": "f"},                                               # nothing at all
    ]
    table = tmp_path / "t.jsonl"
    table.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.warns(cliplab.models.tokenizer.TruncationWarning, match="1 caption"):
        res = embed(table, tmp_path / "o1", model, shard_size=4)
    r1 = rows_by_id(tmp_path / "o1")
    assert set(r1) == {"a", "b", "c"}
    np.testing.assert_array_equal(r1["a"]["image"], r1["b"]["image"])
    assert r1["c"]["image"] is not None and not r1["c"]["image"].any()  # caption-only row: null image
    e = read_embeddings(tmp_path / "o1")
    assert list(e.image_valid) == [True, True, False] and e.text_valid.all()
    assert res.manifest["counts"]["captions_truncated"] == 1 and res.manifest["counts"]["tokens_dropped"] > 0
    rej = {r["id"]: r for r in read_rejects(tmp_path / "o1")}
    assert set(rej) == {"d", "e", "f"}
    assert "no such file" in rej["d"]["reason"] and "not a string" in rej["e"]["reason"]
    assert "neither" in rej["f"]["reason"]

    res2 = embed(table, tmp_path / "o2", model, shard_size=4, truncate=False)
    assert set(rows_by_id(tmp_path / "o2")) == {"a", "c"}
    rej2 = {r["id"]: r for r in read_rejects(tmp_path / "o2")}
    assert rej2["b"]["stage"] == "caption" and "--no-truncate" in rej2["b"]["reason"]
    assert res2.manifest["counts"]["captions_too_long_rejected"] == 1
    assert res2.manifest["tokenizer"]["truncate"] is False


# --------------------------------------------------------------------------------------------------------------------
# kill -9 and resume


def _cli(out: Path, src: Path) -> subprocess.Popen:
    """The real command line in a fresh interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "CLIPLAB_CRASH_AT"}
    env["PYTHONWARNINGS"] = "ignore"
    cmd = [sys.executable, "-c", "from cliplab.cli import main; main()", "embed", str(src), "--out", str(out),
           "--model", "test-tiny", "--shard-size", "5", "--batch-size", "4", "--workers", "2", "--no-progress",
           "--backend", "torch", "--precision", "fp32"]  # another process: the conftest's exact default cannot reach it
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _forked_job_crashing_at(out: Path, src: Path, crash: str) -> int:
    """Run the job in a forked child (no second torch import) that SIGKILLs itself at ``crash``; its wait status."""
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        try:
            torch.set_num_threads(1)  # no OpenMP pool inherited across fork
            os.environ["CLIPLAB_CRASH_AT"] = crash
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                embed(src, out, "test-tiny", shard_size=5, batch_size=4, workers=2)
        finally:
            os._exit(3)  # reached only if the crash point was never hit
    _, status = os.waitpid(pid, 0)
    return status


def _shard_stamps(out: Path) -> dict[str, tuple[int, int]]:
    d = out / "shards"
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in d.glob("part-*.parquet")} if d.exists() else {}


def test_sigkill_at_any_point_then_rerun_gives_exactly_once_rows(tmp_path, model):
    good, bad = make_bad_folder(tmp_path / "in", n_extra_good=80)
    ref = tmp_path / "ref"
    embed(tmp_path / "in", ref, model, shard_size=5, batch_size=4)
    expected_rows = rows_by_id(ref)
    expected_rejects = sorted(r["id"] for r in read_rejects(ref))
    assert set(expected_rows) == good and set(expected_rejects) == set(bad)

    out = tmp_path / "out"
    # SIGKILL at each critical instant (after the plan, after job.json, between a shard's rejects file and its
    # Parquet file, between the temporary Parquet file and its rename, right after a commit), each run resuming
    # the previous one ...
    crashes = ["plan:written", "job:written", "shard:tmp-written:2", "shard:rejects-written:3", "shard:start:2",
               "shard:committed:2"]
    for crash in crashes:
        before = _shard_stamps(out)
        status = _forked_job_crashing_at(out, tmp_path / "in", crash)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (crash, status)
        after = _shard_stamps(out)
        assert all(after[k] == v for k, v in before.items()), f"a committed shard was rewritten ({crash})"
    assert len(_shard_stamps(out)) >= 3
    # ... then the real CLI in a fresh process, SIGKILLed from outside at random moments while writing shards
    rng = random.Random(1234)
    killed_mid_run = 0
    for _ in range(2):
        before = _shard_stamps(out)
        p = _cli(out, tmp_path / "in")
        t0 = time.time()
        while p.poll() is None and len(_shard_stamps(out)) <= len(before) and time.time() - t0 < 60:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.05))
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=60)
        killed_mid_run += p.returncode == -signal.SIGKILL
        after = _shard_stamps(out)
        assert all(after[k] == v for k, v in before.items()), "a committed shard was rewritten"
    assert killed_mid_run >= 1, "no random kill landed while the job was running"
    before = _shard_stamps(out)
    p = _cli(out, tmp_path / "in")
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr.decode()
    after = _shard_stamps(out)
    assert all(after[k] == v for k, v in before.items()), "finished shards were redone"
    assert not [q for q in out.rglob(".*tmp-*")], "temporary files left behind"

    got = rows_by_id(out)  # asserts no duplicate ids
    assert set(got) == set(expected_rows)
    for i, r in got.items():
        np.testing.assert_allclose(r["image"], expected_rows[i]["image"], atol=1e-5)
    assert sorted(r["id"] for r in read_rejects(out)) == expected_rejects
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] and m["counts"]["rows"] == len(good) and m["counts"]["rejects"] == len(bad)
    assert m["counts"]["shards"] == m["counts"]["shards_total"] == len(ShardStore(out).committed())


# --------------------------------------------------------------------------------------------------------------------
# real photos


def test_real_flickr_photos_and_captions_run_cleanly(tmp_path, model):
    root = SHARED_DATA / "flickr8k-1k"
    if not (root / "captions.csv").exists():
        pytest.skip(f"needs the project's real data at {root} (absent in a plain clone)")
    with open(root / "captions.csv") as f:
        rows = list(csv.DictReader(f))
    images = sorted({r["image"] for r in rows})[:100]
    keep = [r for r in rows if r["image"] in set(images)]
    table = tmp_path / "flickr100.csv"
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "caption"])
        w.writeheader()
        w.writerows(keep)
    res = embed(table, tmp_path / "out", model, source_options={"image_root": root / "images"},
                shard_size=100, batch_size=32)
    assert res.rejects == 0 and res.rows == len(keep) == 500
    e = read_embeddings(tmp_path / "out")
    assert e.image_valid.all() and e.text_valid.all()
    assert len({p for p in e.paths}) == 100
    by_path: dict[str, np.ndarray] = {}
    for p, v in zip(e.paths, e.image):
        if p in by_path:
            np.testing.assert_array_equal(by_path[p], v)
        by_path[p] = v
    with torch.inference_mode():
        ref = model.encode_image(model.preprocess(e.paths[0])[None], normalize=True)[0].numpy()
    np.testing.assert_allclose(e.image[0], ref, atol=2e-5)


# --------------------------------------------------------------------------------------------------------------------
# Ray


def test_ray_engine_gives_the_same_rows_as_local(tmp_path, model):
    from cliplab.pipeline.engines.ray_engine import ray_available

    ok, why = ray_available()
    if not ok:
        pytest.skip(why)
    import ray

    good, bad = make_bad_folder(tmp_path / "in", n_extra_good=6)
    local = embed(tmp_path / "in", tmp_path / "local", model, shard_size=6, batch_size=4)
    syn_local = embed("synthetic:15", tmp_path / "syn-local", model, shard_size=4, batch_size=4)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # one local cluster for both jobs
    try:
        ray_res = embed(tmp_path / "in", tmp_path / "ray", model, shard_size=6, batch_size=4, engine="ray")
        syn_ray = embed("synthetic:15", tmp_path / "syn-ray", model, shard_size=4, batch_size=3, engine="ray")
        assert ray.is_initialized()  # a cluster the engine did not start is left running
    finally:
        ray.shutdown()
    assert (ray_res.rows, ray_res.rejects) == (local.rows, local.rejects) == (len(good), len(bad))
    a, b = rows_by_id(tmp_path / "local"), rows_by_id(tmp_path / "ray")
    assert set(a) == set(b) == good
    for i in a:
        np.testing.assert_allclose(b[i]["image"], a[i]["image"], atol=1e-5)
        assert a[i]["index"] == b[i]["index"] and a[i]["path"] == b[i]["path"]
    ra = {r["id"]: r["reason"] for r in read_rejects(tmp_path / "local")}
    rb = {r["id"]: r["reason"] for r in read_rejects(tmp_path / "ray")}
    assert ra == rb
    assert ray_res.manifest["last_run"]["engine"] == "ray" and "ray" in ray_res.manifest["versions"]
    # images and captions together (text batches differ between the engines: results agree to fp tolerance)
    assert syn_ray.rows == syn_local.rows == 15
    a, b = read_embeddings(tmp_path / "syn-local"), read_embeddings(tmp_path / "syn-ray")
    assert a.ids == b.ids and a.captions == b.captions
    np.testing.assert_allclose(b.image, a.image, atol=1e-5)
    np.testing.assert_allclose(b.text, a.text, atol=1e-5)
