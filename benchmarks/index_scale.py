"""Index build and query at scale: clustered synthetic vectors (a mixture of Gaussians on the sphere, dimension 512,
generated in chunks into a memory-mapped file), indexed by each kind in its own process (so peak memory is that
build's), then queried one vector at a time.

Reports per kind: build seconds, peak resident memory (the build process's ``ru_maxrss``), index size on disk,
recall@10 against exact search (measured by the build on 500 held-out queries), and p50 / p99 single-query latency
at 1 and 8 threads. ``auto`` is the library's choice under ``--max-index-memory``; ``flat``, ``ivf`` and ``hnsw``
run where they fit (``--kinds``). autofaiss's published figures are quoted for context (other hardware).

    python benchmarks/index_scale.py --n 1000000 --out benchmarks/results/index-scale-1M-DATE.md
    python benchmarks/index_scale.py --n 10000000 --kinds auto --max-index-memory 4GB --out ...

Needs disk for the vectors (n x 512 x 4 bytes) and, with ``--rerank``, as much again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
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


def build_one(args) -> dict:
    """Runs in a child process: build one kind, save it, time single queries."""
    import faiss

    from cliplab.index import Index
    from cliplab.index.sources import ArraySource

    x = np.load(args.vectors, mmap_mode="r")
    q = np.load(args.queries)
    source = ArraySource(x)  # memory-mapped: chunks are paged in as they are added
    t0 = time.perf_counter()
    ix = Index.build(source, kind=args.kind, max_memory=args.max_index_memory, queries=q, rerank=args.rerank)
    build_s = time.perf_counter() - t0
    path = ix.save(Path(args.out_dir) / args.kind)
    size = sum(f.stat().st_size for f in path.iterdir())
    lat = {}
    for threads in (1, 8):
        faiss.omp_set_num_threads(threads)
        times = []
        for row in q[:200]:
            t = time.perf_counter()
            ix.search(row, 10)
            times.append(1000 * (time.perf_counter() - t))
        lat[threads] = (float(np.percentile(times, 50)), float(np.percentile(times, 99)))
    return {"kind": args.kind, "chosen": ix.kind, "factory": ix.info["plan"]["factory"], "n": ix.info["n"],
            "build_s": round(build_s, 1), "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                                               / 2**20, 2),
            "disk_gb": round(size / 2**30, 3), "recall_at_10": ix.info["recall_at_10"],
            "params": ix.info["params"], "p50_ms_1t": round(lat[1][0], 2), "p99_ms_1t": round(lat[1][1], 2),
            "p50_ms_8t": round(lat[8][0], 2), "p99_ms_8t": round(lat[8][1], 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--kinds", default="auto,flat,ivf,hnsw")
    ap.add_argument("--max-index-memory", default="4GB")
    ap.add_argument("--rerank", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--workdir", default=None, help="where the vectors and indexes go [default: a temp dir]")
    # child-process mode
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--kind", help=argparse.SUPPRESS)
    ap.add_argument("--vectors", help=argparse.SUPPRESS)
    ap.add_argument("--queries", help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(build_one(args)))
        return 0
    work = Path(args.workdir or tempfile.mkdtemp(prefix="index-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    q = make_vectors(work / "vectors.npy", args.n, args.dim)
    np.save(work / "queries.npy", q)
    print(f"{args.n:,} x {args.dim} vectors written in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    rows = []
    for kind in args.kinds.split(","):
        cmd = [sys.executable, __file__, "--child", "--kind", kind, "--vectors", str(work / "vectors.npy"),
               "--queries", str(work / "queries.npy"), "--out-dir", str(work), "--max-index-memory",
               args.max_index_memory, "--rerank", str(args.rerank)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            print(f"{kind}: failed\n{r.stderr[-2000:]}", file=sys.stderr)
            rows.append({"kind": kind, "error": r.stderr.strip().splitlines()[-1] if r.stderr else "failed"})
            continue
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr)
    lines = [f"# Index at scale: {args.n:,} x {args.dim} ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPUs. Clustered unit vectors (1000 centres); 500 "
             f"held-out queries for recall@10; latency over 200 single queries. Budget for auto: "
             f"{args.max_index_memory}; rerank {args.rerank}.", "",
             "| kind | index | build s | peak RSS GB | disk GB | recall@10 | p50 ms (1 thr) | p99 ms (1 thr) | "
             "p50 ms (8 thr) | p99 ms (8 thr) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kind']} | failed: {r['error'][:80]} | | | | | | | | |")
            continue
        lines.append(f"| {r['kind']} | {r['factory']} {r['params']} | {r['build_s']} | {r['peak_rss_gb']} | "
                     f"{r['disk_gb']} | {r['recall_at_10']} | {r['p50_ms_1t']} | {r['p99_ms_1t']} | "
                     f"{r['p50_ms_8t']} | {r['p99_ms_8t']} |")
    lines += ["", f"For context: {AUTOFAISS}."]
    write_report("\n".join(lines) + "\n", args.out, args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
