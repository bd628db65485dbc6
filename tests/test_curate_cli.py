"""``cliplab curate metaclip|laclip|veclip``: tables in and out, rejects, resume after a crash, exactly-once output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cliplab.cli import main
from cliplab.curation.pairs_io import read_output, rejects_path, work_dir, write_pairs

pytest.importorskip("ahocorasick", reason="metadata matching needs pyahocorasick: pip install 'cliplab[curate]'")

REPO = Path(__file__).resolve().parents[1]
CAPTIONS = ["a dog runs on the grass", "a black dog jumps", "two dogs play", "a cat sleeps", "a dog and a cat",
            "a red car", "a man rides a bike near the sea", "a dog swims in the sea"] * 5


def bad_table(path: Path) -> Path:
    """A CSV with good rows, an empty caption and a row whose bytes are not UTF-8."""
    lines = ["image,caption"] + [f"{i}.jpg,{c}" for i, c in enumerate(CAPTIONS)] + ["x.jpg,", "y.jpg,caf\xe9 latte"]
    path.write_bytes("\n".join(lines[:-1]).encode("utf-8") + b"\n" + lines[-1].encode("latin-1") + b"\n")
    return path


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


def test_metaclip_command_writes_kept_rows_and_rejects(tmp_path):
    src = bad_table(tmp_path / "pairs.csv")
    out = tmp_path / "curated.parquet"
    r = invoke("curate", "metaclip", src, "--out", out, "--t", 3, "--min-count", 3, "--no-progress", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    rows = read_output(out)
    assert data["pairs"] == len(CAPTIONS) and data["rows"] == len(rows) < len(CAPTIONS) and data["rejects"] == 2
    assert all(r["matched"] for r in rows) and {"image", "caption", "row", "matched"} <= set(rows[0])
    rejects = [json.loads(line) for line in rejects_path(out).read_text().splitlines()]
    assert [x["row"] for x in rejects] == [len(CAPTIONS), len(CAPTIONS) + 1]
    assert "empty caption" in rejects[0]["reason"] and "utf-8" in rejects[1]["reason"]
    assert data["entropy_after"] > data["entropy_before"]


def test_metaclip_options_reach_the_core(tmp_path, monkeypatch):
    from cliplab.curation import metaclip

    src = tmp_path / "p.csv"
    write_pairs([{"text": c} for c in CAPTIONS], src)
    meta = tmp_path / "meta.txt"
    meta.write_text("dog\ncat\n\ncat\n")
    seen = {}

    def fake(src_, out_, **kw):
        seen.update(kw, src=src_, out=out_)
        raise ValueError("stop here")

    monkeypatch.setattr(metaclip, "curate_table", fake)
    r = invoke("curate", "metaclip", src, "-o", tmp_path / "o.csv", "--metadata", meta, "--t", 7, "--seed", 3,
               "--case-sensitive", "--min-count", 2, "--caption-column", "text", "--encoding", "latin-1",
               "--chunk-size", 11, "--overwrite", "--no-progress")
    assert r.exit_code == 2 and "stop here" in r.output
    assert seen == {"src": str(src), "out": str(tmp_path / "o.csv"), "entries": ["dog", "cat"], "t": 7.0, "seed": 3,
                    "lowercase": False, "min_count": 2, "caption_column": "text", "encoding": "latin-1",
                    "chunk_size": 11, "progress": False, "overwrite": True}


def test_laclip_and_veclip_options_reach_the_core(tmp_path, monkeypatch):
    from cliplab.curation import laclip, veclip

    src = tmp_path / "p.csv"
    write_pairs([{"caption": c} for c in CAPTIONS], src)
    seen = []
    monkeypatch.setattr(laclip, "rewrite_table", lambda *a, **kw: seen.append((a, kw)) or (_ for _ in ()).throw(
        ValueError("stop")))
    invoke("curate", "laclip", src, "-o", tmp_path / "o.csv", "--rewrites", 2, "--seed", 5, "--chunk-size", 3,
           "--caption-column", "caption", "--overwrite", "--no-progress")
    (s, o, rw), kw = seen[0]
    assert type(rw).__name__ == "RuleRewriter" and rw.seed == 5
    assert kw == {"k": 2, "caption_column": "caption", "encoding": "utf-8", "chunk_size": 3, "progress": False,
                  "overwrite": True}
    seen.clear()
    monkeypatch.setattr(veclip, "enrich_table", lambda *a, **kw: seen.append((a, kw)) or (_ for _ in ()).throw(
        ValueError("stop")))
    invoke("curate", "veclip", src, "-o", tmp_path / "o.csv", "--drop-small", 0.25, "--seed", 4, "--fuser",
           "identity", "--no-progress")
    (s, o, cap, fu), kw = seen[0]
    assert (cap.drop_small, cap.seed, type(fu).__name__) == (0.25, 4, "IdentityFuser")
    invoke("curate", "veclip", src, "-o", tmp_path / "o.csv", "--captioner", "column", "--visual-column", "vis")
    assert seen[1][0][2].column == "vis"


def test_laclip_and_veclip_commands(tmp_path):
    src = tmp_path / "p.parquet"
    graph = json.dumps([{"colour": "red", "shape": "circle", "size": "large"}])
    write_pairs([{"image": f"{i}.png", "caption": c, "objects": graph} for i, c in enumerate(CAPTIONS[:6])]
                + [{"image": "z.png", "caption": "", "objects": graph}], src)
    r = invoke("curate", "laclip", src, "--out", tmp_path / "l.parquet", "--rewrites", 2, "--no-progress", "--json")
    assert r.exit_code == 0, r.output
    rows = read_output(tmp_path / "l.parquet")
    assert len(rows) == 6 and all(len(x["rewrites"]) == 2 for x in rows) and json.loads(r.output)["rejects"] == 1
    r = invoke("curate", "veclip", src, "--out", tmp_path / "v.csv", "--no-progress", "--json")
    assert r.exit_code == 0, r.output
    rows = read_output(tmp_path / "v.csv")
    assert rows[0]["visual_caption"] == "a red circle" and rows[0]["vec_caption"].startswith("a red circle, ")


def test_a_different_job_is_refused_until_overwrite(tmp_path):
    src = tmp_path / "p.csv"
    write_pairs([{"caption": c} for c in CAPTIONS], src)
    out = tmp_path / "o.csv"
    assert invoke("curate", "laclip", src, "-o", out, "--rewrites", 2, "--no-progress").exit_code == 0
    r = invoke("curate", "laclip", src, "-o", out, "--rewrites", 3, "--no-progress")
    assert r.exit_code == 1 and "different curation job" in r.output and "--overwrite" in r.output
    assert invoke("curate", "laclip", src, "-o", out, "--rewrites", 3, "--overwrite", "--no-progress").exit_code == 0
    assert all(len(x["rewrites"]) == 3 for x in read_output(out, list_columns=["rewrites"]))


@pytest.mark.parametrize("method,extra", [("laclip", ["--rewrites", "2"]), ("metaclip", ["--t", "4", "--min-count", "2"])])
def test_crash_and_resume_gives_exactly_once_output(tmp_path, method, extra):
    """Killed (SIGKILL) right after its 2nd chunk is committed, the rerun redoes only the missing chunks; the output
    equals an uninterrupted run's, every row once."""
    src = bad_table(tmp_path / "pairs.csv")
    args = [sys.executable, "-c", "from cliplab.cli import main; main()", "curate", method, str(src), "--chunk-size", "7", "--no-progress",
            *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "CLIPLAB_CRASH_AT": "shard:committed:2"}
    crashed = subprocess.run(args + ["--out", str(tmp_path / "a.parquet")], env=env, capture_output=True, text=True)
    assert crashed.returncode != 0 and not (tmp_path / "a.parquet").exists()
    assert len(list((work_dir(tmp_path / "a.parquet") / "shards").glob("part-*.parquet"))) == 2
    resumed = invoke(*args[3:], "--out", tmp_path / "a.parquet", "--json")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.output)["chunks_resumed"] == 2
    assert invoke(*args[3:], "--out", tmp_path / "b.parquet").exit_code == 0
    a, b = read_output(tmp_path / "a.parquet"), read_output(tmp_path / "b.parquet")
    assert a == b and len({r["row"] for r in a}) == len(a)
    assert rejects_path(tmp_path / "a.parquet").read_text() == rejects_path(tmp_path / "b.parquet").read_text()


def test_image_paths_follow_the_output_table(tmp_path):
    """Relative image paths of IN are rebased onto OUT's folder, so training on OUT finds the images."""
    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "images" / "a.png").write_bytes(b"x")
    src = tmp_path / "data" / "pairs.csv"
    write_pairs([{"image": "a.png", "caption": "a dog"}, {"image": "/abs/b.png", "caption": "a cat"}], src)
    out = tmp_path / "elsewhere" / "o.csv"
    assert invoke("curate", "laclip", src, "-o", out, "--rewrites", 1, "--no-progress").exit_code == 0
    rows = read_output(out)
    assert rows[0]["image"] == os.path.join("..", "data", "images", "a.png") and rows[1]["image"] == "/abs/b.png"
    assert (out.parent / rows[0]["image"]).exists()


@pytest.mark.parametrize("preset,source", [("laclip-tiny", "caption-versions"), ("veclip-tiny", "caption-versions"),
                                           ("tiny-smoke", "folder")])
def test_train_data_keeps_a_curation_presets_source(tmp_path, preset, source):
    table = tmp_path / "curated.csv"
    table.write_text("image,caption\na.jpg,a dog\n")
    r = invoke("train", "--preset", preset, "--data", table, "--show")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)["data"]
    assert data["source"] == source and data["options"]["path"] == str(table)
