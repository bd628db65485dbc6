"""Load test of ``cliplab serve``: queries per second and p50/p99 latency at 1, 4 and 16 concurrent clients.

The server runs as its own process (``python -m cliplab serve``, uvicorn) over a flat index of ``--n`` (100,000)
random unit vectors recorded as made by ``ViT-B-32`` (random weights, so every query pays a full ViT-B/32 text-tower
pass and a 100k x 512 exact search). Clients are threads, each with one keep-alive connection, sending
``GET /api/search?q=CAPTION&k=10`` with real Flickr8k captions (random captions without ``../shared/data``) for a
fixed time after a warm-up. Each setting runs with micro-batching on (the default) and off (``--max-batch 1``),
in fp32 and bf16, so the table shows what batching buys. clip-retrieval's published numbers (about 20 QPS, 50 ms) are
quoted next to them; they were measured on other hardware and a different model, so they are context, not a
side-by-side result.

Run on a quiet machine::

    python benchmarks/serve_load.py --out benchmarks/results/serve-load-DATE.md
"""

from __future__ import annotations

import argparse
import http.client
import json
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_captions, write_report  # noqa: E402

CLIP_RETRIEVAL = "clip-retrieval back end (published): about 20 QPS, about 50 ms per query"


def build_index(directory: Path, n: int, arch: str) -> Path:
    from cliplab.index import Index
    from cliplab.pipeline.modelref import resolve_model

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = resolve_model(arch)
    dim = model.config.embed_dim
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((n, dim), dtype=np.float32)
    ix = Index.build(vecs, kind="flat", metadata={"ids": [f"v{i}" for i in range(n)]})
    ix.info["model"] = info
    return ix.save(directory)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, index_dir: Path, precision: str, max_batch: int, wait_ms: float):
        self.port = free_port()
        cmd = [sys.executable, "-m", "cliplab", "serve", str(index_dir), "--port", str(self.port), "--precision",
               precision, "--max-batch", str(max_batch), "--batch-wait-ms", str(wait_ms), "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server died: " + self.proc.stderr.read().decode()[-2000:])
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("server did not start")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(20)


def run_clients(port: int, captions: list[str], clients: int, seconds: float, warmup: float) -> dict:
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    start, stop_at = threading.Event(), [0.0, 0.0]

    def client(c: int):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        i = c * 9973
        start.wait()
        while True:
            now = time.perf_counter()
            if now >= stop_at[1]:
                break
            q = quote(captions[i % len(captions)])
            i += 1
            t0 = time.perf_counter()
            try:
                conn.request("GET", f"/api/search?q={q}&k=10")
                r = conn.getresponse()
                r.read()
                ok = r.status == 200
            except OSError:
                ok = False
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            t1 = time.perf_counter()
            if t0 >= stop_at[0]:  # after the warm-up
                latencies[c].append(t1 - t0)
                errors[c] += 0 if ok else 1
        conn.close()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    [t.start() for t in threads]
    t_start = time.perf_counter()
    stop_at[0], stop_at[1] = t_start + warmup, t_start + warmup + seconds
    start.set()
    [t.join() for t in threads]
    lat = np.array(sorted(x for row in latencies for x in row))
    return {"clients": clients, "requests": int(lat.size), "errors": int(sum(errors)),
            "qps": round(lat.size / seconds, 1),
            "p50_ms": round(1000 * float(np.percentile(lat, 50)), 1) if lat.size else None,
            "p99_ms": round(1000 * float(np.percentile(lat, 99)), 1) if lat.size else None}


def batch_stats(port: int) -> dict:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    vals = {}
    for line in text.splitlines():
        for key in ("cliplab_batch_size_sum", "cliplab_batch_size_count"):
            if line.startswith(key + '{kind="text"}'):
                vals[key] = float(line.split()[-1])
    return vals


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="vectors in the index")
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured time per setting")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--batch-wait-ms", default="4", help="comma-separated waits to compare (micro-batching on)")
    ap.add_argument("--out", type=Path, default=None, help="write a markdown table here (and .json next to it)")
    args = ap.parse_args(argv)
    captions = load_captions(5000)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        index_dir = build_index(Path(tmp) / "index", args.n, args.arch)
        print(f"index of {args.n:,} vectors built in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        for precision in args.precisions.split(","):
            settings = [(f"on, wait {w} ms", 32, float(w)) for w in args.batch_wait_ms.split(",")] + [("off", 1, 0.0)]
            for batching, max_batch, wait_ms in settings:
                server = Server(index_dir, precision, max_batch, wait_ms)
                try:
                    for clients in [int(c) for c in args.clients.split(",")]:
                        before = batch_stats(server.port)
                        r = run_clients(server.port, captions, clients, args.seconds, args.warmup)
                        after = batch_stats(server.port)
                        calls = after.get("cliplab_batch_size_count", 0) - before.get("cliplab_batch_size_count", 0)
                        items = after.get("cliplab_batch_size_sum", 0) - before.get("cliplab_batch_size_sum", 0)
                        r.update(precision=precision, batching=batching,
                                 mean_batch=round(items / calls, 2) if calls else None)
                        rows.append(r)
                        print(json.dumps(r), file=sys.stderr)
                finally:
                    server.stop()
    base = {(r["precision"], r["batching"]): r["qps"] for r in rows if r["clients"] == 1}
    lines = [f"# cliplab serve under load ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {platform.processor() or platform.machine()}, {__import__('os').cpu_count()} CPUs; "
             f"index: {args.n:,} x 512 flat (exact), model {args.arch} (random weights), k=10, real captions as "
             f"queries; {args.seconds:g} s measured per row after {args.warmup:g} s warm-up; server and clients on "
             "one machine.", "",
             "| precision | micro-batching | clients | QPS | x 1 client | p50 ms | p99 ms | mean batch | errors |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = r["qps"] / base[(r["precision"], r["batching"])] if base.get((r["precision"], r["batching"])) else 0
        lines.append(f"| {r['precision']} | {r['batching']} | {r['clients']} | {r['qps']} | {ratio:.2f} | "
                     f"{r['p50_ms']} | {r['p99_ms']} | {r['mean_batch']} | {r['errors']} |")
    lines += ["", f"For context: {CLIP_RETRIEVAL}."]
    write_report("\n".join(lines) + "\n", args.out, args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
