"""Index build and query at scale: clustered synthetic vectors (a mixture of Gaussians on the sphere, dimension 512,
generated in chunks into a memory-mapped file), indexed by each kind in its own process (so peak memory is that
build's), then queried one vector at a time.

Reports per kind: build seconds, peak memory of the build process (``ru_maxrss``, which counts the pages of the
memory-mapped input vectors it touched, and the peak of its anonymous memory, sampled: what the build itself
needs), index size on disk, recall@10 against exact search (measured by the build on 500 held-out queries), p50 /
p99 single-query latency at 1 and 8 threads, and, in a fresh process that opens the saved index the way a server
does (``Index.load``, memory-mapped), the resident memory after 200 queries. The machine's load (``uptime``) is
recorded before and after each kind: on a shared machine, timings move with it.

``--kinds`` (comma-separated): ``auto`` (the library's choice under ``--max-index-memory``), ``flat``, ``ivf``,
``ivfpq``, ``hnsw``; a ``:ondisk`` suffix keeps an IVF kind's lists on disk (``ivf:ondisk``). autofaiss's published
figures are quoted for context (other hardware).

    python benchmarks/index_scale.py --n 1000000 --kinds flat,auto,ivfpq,ivf:ondisk --out benchmarks/results/index-scale-1M-DATE.md
    python benchmarks/index_scale.py --n 100000 --kinds ivf --train-per-list 256   # the training-sample control
    python benchmarks/index_scale.py --n 1000000 --kinds ivf --kmeans one-level     # the two-level k-means control

Needs disk for the vectors (n x 512 x 4 bytes) and, with ``--rerank``, as much again. The work folder (vectors and
indexes) is deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_report  # noqa: E402

AUTOFAISS = ("autofaiss (published): 200M vectors in about 3 h with 15 GB of RAM, about 10 ms per query; users report "
             "an HNSW build of 1M x 512 taking 49 minutes (criteo/autofaiss#140)")


def make_vectors(path: Path, n: int, dim: int, clusters: int = 1000, seed: int = 0, chunk: int = 200_000):
    """``n`` unit vectors around ``clusters`` random centres (spread 0.6), written chunk by chunk."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = centres[rng.integers(0, clusters, m)] + 0.6 / np.sqrt(dim) * rng.standard_normal((m, dim)).astype(np.float32)
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()
    queries = centres[rng.integers(0, clusters, 500)] + 0.6 / np.sqrt(dim) * rng.standard_normal((500, dim)).astype(np.float32)
    return queries / np.linalg.norm(queries, axis=1, keepdims=True)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class AnonPeak:
    """The peak of this process's anonymous resident memory (``RssAnon``), sampled every 0.2 s: the memory a
    build needs, without the file pages of its memory-mapped input that ``ru_maxrss`` also counts."""

    def __init__(self):
        self.peak_kb, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, _status_kb("RssAnon"))
            self._stop.wait(0.2)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return round(max(self.peak_kb, _status_kb("RssAnon")) / 2**20, 2)


def _latency(ix, q, threads: int) -> tuple[float, float]:
    import faiss

    faiss.omp_set_num_threads(threads)
    times = []
    for row in q[:200]:
        t = time.perf_counter()
        ix.search(row, 10)
        times.append(1000 * (time.perf_counter() - t))
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def build_one(args) -> dict:
    """Runs in a child process: build one kind, save it, time single queries."""
    from cliplab.index import Index
    from cliplab.index.sources import ArraySource

    x = np.load(args.vectors, mmap_mode="r")
    q = np.load(args.queries)
    source = ArraySource(x)  # memory-mapped: chunks are paged in as they are added
    kind, _, where = args.kind.partition(":")
    anon = AnonPeak()
    t0 = time.perf_counter()
    ix = Index.build(source, kind=kind, max_memory=args.max_index_memory, queries=q, rerank=args.rerank,
                     train_per_list=args.train_per_list, on_disk=True if where == "ondisk" else None,
                     kmeans=args.kmeans)
    build_s = time.perf_counter() - t0
    peak_anon = anon.stop()
    path = ix.save(Path(args.out_dir) / args.kind.replace(":", "-"))
    size = sum(f.stat().st_size for f in path.iterdir())
    lat = {threads: _latency(ix, q, threads) for threads in (1, 8)}
    return {"kind": args.kind, "chosen": ix.kind, "factory": ix.info["plan"]["factory"], "n": ix.info["n"],
            "path": str(path), "build_s": round(build_s, 1),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "peak_anon_gb": peak_anon, "disk_gb": round(size / 2**30, 3), "recall_at_10": ix.info["recall_at_10"],
            "tuning": ix.info.get("tuning"), "reasons": ix.info["plan"]["reasons"],
            "steps_s": ix.info.get("build_steps_seconds"),
            "params": ix.info["params"], "p50_ms_1t": round(lat[1][0], 2), "p99_ms_1t": round(lat[1][1], 2),
            "p50_ms_8t": round(lat[8][0], 2), "p99_ms_8t": round(lat[8][1], 2)}


def serve_one(args) -> dict:
    """Runs in a fresh child process: open the saved index as a server does and query it (1 thread)."""
    from cliplab.index import Index, resident_memory_mb

    q = np.load(args.queries)
    before = resident_memory_mb()
    ix = Index.load(args.out_dir)
    opened = resident_memory_mb()
    p50, p99 = _latency(ix, q, 1)
    return {"loaded_with": ix.info["loaded_with"], "rss_mb_before": before, "rss_mb_opened": opened,
            "rss_mb_after_200_queries": resident_memory_mb(), "served_p50_ms": round(p50, 2),
            "served_p99_ms": round(p99, 2)}


def uptime() -> str:
    """The 1, 5 and 15 minute load averages (what ``uptime`` prints)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _same_vectors(work: Path, n: int, dim: int) -> bool:
    """Whether ``work`` holds the vectors and queries of an earlier run of the same size (written by the same
    seeded generator)."""
    try:
        return (np.load(work / "vectors.npy", mmap_mode="r").shape == (n, dim)
                and np.load(work / "queries.npy").shape == (500, dim))
    except (OSError, ValueError):
        return False


def _child(mode: str, args, work: Path, kind: str, out_dir: Path) -> dict:
    cmd = [sys.executable, __file__, mode, "--kind", kind, "--vectors", str(work / "vectors.npy"),
           "--queries", str(work / "queries.npy"), "--out-dir", str(out_dir), "--max-index-memory",
           args.max_index_memory, "--rerank", str(args.rerank), "--train-per-list", str(args.train_per_list),
           "--kmeans", args.kmeans]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        print(f"{kind} ({mode}): failed\n{r.stderr[-2000:]}", file=sys.stderr)
        return {"kind": kind, "error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "failed"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    from cliplab.index.sizing import TRAIN_PER_LIST

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--kinds", default="auto,flat,ivf,hnsw")
    ap.add_argument("--max-index-memory", default="4GB")
    ap.add_argument("--rerank", type=int, default=0)
    ap.add_argument("--train-per-list", type=int, default=TRAIN_PER_LIST)
    ap.add_argument("--kmeans", default="auto", choices=["auto", "one-level", "two-level"],
                    help="how IVF centroids are trained (auto: two levels from 2048 lists)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--workdir", default=None, help="where the vectors and indexes go [default: a temp dir]")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (vectors, indexes)")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse the vectors a --keep run left in --workdir (the same seed makes the same ones)")
    # child-process modes
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--serve-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--kind", help=argparse.SUPPRESS)
    ap.add_argument("--vectors", help=argparse.SUPPRESS)
    ap.add_argument("--queries", help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(build_one(args)))
        return 0
    if args.serve_child:
        print(json.dumps(serve_one(args)))
        return 0
    work = Path(args.workdir or tempfile.mkdtemp(prefix="index-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    t0 = time.perf_counter()
    if args.reuse and _same_vectors(work, args.n, args.dim):
        gen_s = 0.0
        print(f"{args.n:,} x {args.dim} vectors reused from {work}", file=sys.stderr)
    else:
        q = make_vectors(work / "vectors.npy", args.n, args.dim)
        np.save(work / "queries.npy", q)
        gen_s = time.perf_counter() - t0
        print(f"{args.n:,} x {args.dim} vectors written in {gen_s:.0f} s", file=sys.stderr)
    rows = []
    try:
        for kind in args.kinds.split(","):
            load_before = uptime()
            row = _child("--child", args, work, kind, work)
            if "error" not in row:
                row.update(_child("--serve-child", args, work, kind, Path(row["path"])))
            row.update(load_before=load_before, load_after=uptime())
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
            report(args, rows, started, gen_s)  # after every kind: an interrupted run keeps what it measured
    finally:
        if not args.keep:
            shutil.rmtree(work, True)
    return 0


def report(args, rows: list[dict], started: str, gen_s: float) -> None:
    made = "reused from an earlier --keep run" if args.reuse and not gen_s else f"written in {gen_s:.0f} s"
    lines = [f"# Index at scale: {args.n:,} x {args.dim} ({started})", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, **shared** with other jobs while this ran (load "
             f"averages 1/5/15 min before and after each kind are in the table: timings move with them). Clustered "
             f"unit vectors (1000 centres, {made}); 500 held-out queries for recall@10; latency "
             f"over 200 single queries (8 threads on {os.cpu_count()} cores oversubscribes). Budget for auto: "
             f"{args.max_index_memory}; rerank {args.rerank}; k-means sample {args.train_per_list} per list, k-means "
             f"{args.kmeans}. "
             f"Peak anon: the build's own memory (sampled RssAnon); peak RSS also counts the memory-mapped input "
             f"pages it touched (both include the ~0.2 GB of the imported libraries). Served: a fresh process "
             f"opens the saved index (`Index.load`) and runs the 200 queries at 1 thread; its resident memory "
             f"before opening and after the queries.", "",
             "| kind | index | build s (train / add / tune) | peak anon GB | peak RSS GB | disk GB | recall@10 | p50 ms (1 thr) | "
             "p99 ms (1 thr) | p50 ms (8 thr) | p99 ms (8 thr) | served: p50 ms, RSS MB before load -> after queries | "
             "load before / after |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kind']} | failed: {r['error'][:80]} | | | | | | | | | | | {r['load_before']} / "
                         f"{r['load_after']} |")
            continue
        served = (f"{r['served_p50_ms']}, {r['rss_mb_before']:.0f} -> {r['rss_mb_after_200_queries']:.0f}"
                  if "served_p50_ms" in r else r.get("error", ""))
        st = r.get("steps_s") or {}
        steps = " / ".join(f"{st.get(k, 0):.0f}" for k in ("train", "add", "tune"))
        lines.append(f"| {r['kind']} | {r['factory']} {r['params']} | {r['build_s']} ({steps}) | {r['peak_anon_gb']} | "
                     f"{r['peak_rss_gb']} | {r['disk_gb']} | {r['recall_at_10']} | {r['p50_ms_1t']} | "
                     f"{r['p99_ms_1t']} | {r['p50_ms_8t']} | {r['p99_ms_8t']} | {served} | {r['load_before']} / "
                     f"{r['load_after']} |")
    lines += ["", f"For context: {AUTOFAISS}."]
    write_report("\n".join(lines) + "\n", args.out, args, rows)


if __name__ == "__main__":
    sys.exit(main())
