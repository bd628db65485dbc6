"""On-disk inverted lists (index.ivfdata): the same lists and results as the in-memory IVF build, built from
several blocks, a relocatable saved folder, the automatic choice, quiet loading (clean --json), Ray."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from cliplab.cli import main
from cliplab.index import Index, ondisk, sizing
from cliplab.index.ondisk import ONDISK_FILE, ondisk_lists
from cliplab.pipeline import embed

from conftest import clustered, inverted_lists

faiss = pytest.importorskip("faiss", reason="faiss-cpu is not installed (pip install faiss-cpu)")



def assert_same_lists(a, b):
    la, lb = inverted_lists(a), inverted_lists(b)
    assert len(la) == len(lb)
    for (ids_a, codes_a), (ids_b, codes_b) in zip(la, lb):
        np.testing.assert_array_equal(ids_a, ids_b)
        np.testing.assert_array_equal(codes_a, codes_b)


def rows(ix, q, k=10):
    return [[h.row for h in hs] for hs in ix.search(q, k)]


@pytest.fixture(scope="module")
def data():
    return clustered(6000, 32, clusters=32), clustered(40, 32, seed=1, clusters=32)


@pytest.mark.parametrize("kind,extra", [("ivf", {}), ("ivfpq", {"pq_m": 8, "opq": False}),
                                        ("ivf", {"coarse": "hnsw"}), ("ivfsq", {})])
def test_on_disk_lists_equal_the_in_memory_build(data, kind, extra, monkeypatch, tmp_path):
    x, q = data
    # blocks of about 60 KB: the 6 chunks land in several blocks that are merged on disk
    monkeypatch.setattr(ondisk, "BLOCK_BYTES", 60_000)
    made = []
    real_mkdtemp = __import__("tempfile").mkdtemp
    monkeypatch.setattr("cliplab.index.core.tempfile.mkdtemp", lambda **kw: made.append(real_mkdtemp(**kw)) or made[-1])
    common = dict(kind=kind, nlist=24, add_chunk=1000, queries=q, recall_target=0.9, **extra)
    memory = Index.build(x, **common)
    disk = Index.build(x, on_disk=True, **common)
    lists = ondisk_lists(disk.faiss_index)
    assert lists is not None and ondisk_lists(memory.faiss_index) is None
    assert sorted(os.listdir(made[0])) == [ONDISK_FILE]  # the blocks were merged and removed
    code = faiss.extract_index_ivf(disk.faiss_index).code_size
    assert os.path.getsize(lists.filename) == len(x) * (code + 8)  # compact: no slack after the merge
    assert disk.faiss_index.ntotal == len(x)
    assert_same_lists(memory.faiss_index, disk.faiss_index)
    assert disk.info["params"].pop("on_disk") is True and disk.info["params"] == memory.info["params"]
    assert disk.info["recall_at_10"] == memory.info["recall_at_10"] and disk.info["plan"]["on_disk"]
    assert rows(disk, q) == rows(memory, q)


def test_a_saved_on_disk_index_can_be_moved_copied_and_saved_again(data, tmp_path):
    x, q = data
    ix = Index.build(x, kind="ivf", nlist=24, queries=q, recall_target=0.9, on_disk=True)
    want = rows(ix, q)
    first = ix.save(tmp_path / "a")
    assert sorted(os.listdir(first)) == ["index.faiss", ONDISK_FILE, "index.json", "metadata.arrow"]
    recorded = (first / "index.faiss").read_bytes()
    assert ONDISK_FILE.encode() in recorded and f"/{ONDISK_FILE}".encode() not in recorded  # its base name only
    del ix
    moved = tmp_path / "elsewhere" / "b"
    shutil.move(str(first), str(moved))
    for mmap in (True, False):
        loaded = Index.load(moved, mmap=mmap)
        assert loaded.info["loaded_with"] == f"{ONDISK_FILE} mapped"
        assert ondisk_lists(loaded.faiss_index).filename == str(moved / ONDISK_FILE)
        assert rows(loaded, q) == want
    copy = tmp_path / "c"
    shutil.copytree(moved, copy)
    shutil.rmtree(moved)
    loaded = Index.load(copy)
    assert rows(loaded, q) == want
    loaded.save(copy)  # saved again in place: the data file stays
    loaded.save(tmp_path / "d")  # and elsewhere: the data file goes with it
    del loaded
    shutil.rmtree(copy)
    again = Index.load(tmp_path / "d")
    assert rows(again, q) == want
    vec, exact = again.vector(3)
    assert exact and np.allclose(vec, x[3], atol=1e-6)


def test_an_in_memory_index_saved_over_an_on_disk_one_removes_its_data_file(data, tmp_path):
    x, q = data
    Index.build(x, kind="ivf", nlist=24, on_disk=True).save(tmp_path / "ix")
    Index.build(x, kind="ivf", nlist=24).save(tmp_path / "ix")
    assert not (tmp_path / "ix" / ONDISK_FILE).exists()
    assert Index.load(tmp_path / "ix").info["loaded_with"] != f"{ONDISK_FILE} mapped"


def test_the_on_disk_rule(monkeypatch):
    assert not sizing.plan_index(1_000_000, 512).on_disk  # 1.9 GB: in memory
    big = sizing.plan_index(10_000_000, 512)  # IVF-Flat, 19 GB, no budget
    assert big.kind == "ivf" and big.on_disk and any("exceeds 4.0 GB (no budget given)" in r for r in big.reasons)
    forced = sizing.plan_index(1_000_000, 512, kind="ivf", max_memory="1GB")
    assert forced.on_disk and any("exceeds the budget of 1.0 GB" in r for r in forced.reasons)
    assert not sizing.plan_index(1_000_000, 512, max_memory="1GB").on_disk  # auto fits the budget with codes
    assert not sizing.plan_index(10_000_000, 512, on_disk=False).on_disk  # asked
    monkeypatch.setattr(sizing, "ONDISK_ABOVE_BYTES", 10_000)
    assert sizing.plan_index(20_000, 64, kind="ivf").on_disk
    with pytest.raises(ValueError, match="need an IVF index"):
        sizing.plan_index(1000, 16, kind="hnsw", on_disk=True)


def test_loading_prints_nothing_on_stdout(data, tmp_path):
    x, q = data
    Index.build(x, kind="ivf", nlist=24, on_disk=True).save(tmp_path / "ix")
    np.save(tmp_path / "q.npy", q[:2])
    # a separate process whose stdout is a pipe (fully buffered by C stdio, as under `cliplab search --json | jq`)
    code = ("import sys, json, numpy as np; from cliplab.index import Index; ix = Index.load(sys.argv[1]); "
            "print(json.dumps([h.row for h in ix.search(np.load(sys.argv[2]), 3)[0]]))")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ix"), str(tmp_path / "q.npy")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)) == 3, r.stdout  # faiss's "IO_FLAG_ONDISK_SAME_DIR: updating ..." would break it


def test_cli_on_disk_index_and_search_report_memory(tmp_path):
    embed("synthetic:300", tmp_path / "emb", "test-tiny", batch_size=100)
    r = CliRunner().invoke(main, ["index", str(tmp_path / "emb"), "--kind", "ivf", "--on-disk", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["params"]["on_disk"] and d["plan"]["on_disk"]
    assert (tmp_path / "emb" / "index" / ONDISK_FILE).exists()
    r = CliRunner().invoke(main, ["search", str(tmp_path / "emb"), "a red circle", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["index_loaded_with"] == f"{ONDISK_FILE} mapped" and d["rss_mb"] > 0 and len(d["hits"]) == 10
    r = CliRunner().invoke(main, ["index", str(tmp_path / "emb"), "--kind", "hnsw", "--on-disk"])
    assert r.exit_code == 2 and "need an IVF index" in r.stderr


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster for the module's Ray builds (its workers stay warm between them)."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'cliplab[ray]')")
    from cliplab.index.distributed import ray_session

    with ray_session(2) as ray:
        yield ray


@pytest.mark.parametrize("kind,extra", [("ivf", {}), ("ivfpq", {"pq_m": 8, "opq": False})])
def test_a_ray_build_on_disk_equals_the_local_one(data, kind, extra, ray_cluster):
    x = data[0]
    common = dict(kind=kind, nlist=24, add_chunk=1000, recall_target=0.5, **extra)
    local = Index.build(x, **common)
    on_ray = Index.build(x, engine="ray", workers=2, on_disk=True, **common)
    assert on_ray.info["engine"] == "ray" and ondisk_lists(on_ray.faiss_index) is not None
    assert_same_lists(local.faiss_index, on_ray.faiss_index)
    assert rows(local, data[1]) == rows(on_ray, data[1])
