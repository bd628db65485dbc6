"""The curation methods on real captions (Flickr8k, 40,455 captions of 8,091 images) and with the real LM:

* MetaCLIP: a metadata list built from the captions, matching throughput, head/tail statistics at several t.
* LaCLIP: rule-based rewrite throughput on all captions; SmolLM2-135M rewrites (LaCLIP's prompt, in-context pairs
  from two captions of the same Flickr8k image, the paper's "COCO" source) of a sample, with their throughput.
* VeCLIP: SmolLM2 fusions of synthetic web alt-texts with their visual captions: how often the brand survives.

    PYTHONPATH=. python experiments/curation_flickr.py [--llm-samples 6] [--threads 1]
Writes experiments/results/curation_flickr.json (timings measured under load on 2 shared cores).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from cliplab.curation import build_metadata, curate
from cliplab.curation.laclip import META_PAIRS, LLMRewriter, same_image_pairs
from cliplab.curation.matcher import SubstringMatcher
from cliplab.curation.rewriters import RuleRewriter, load_llm

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k-1k" / "all_captions.csv"


def coarse(captions) -> dict:
    """A coarse list (unigrams seen 100+ times, no bigrams): few entries per caption, so balancing bites."""
    entries = build_metadata(captions, min_count=100, bigram_min_count=10**9)
    matches = SubstringMatcher(entries, lowercase=True).match_many(captions)
    res = {"entries": len(entries), "mean_matches_per_caption": float(np.mean([len(m) for m in matches])),
           "unmatched_captions": sum(not m for m in matches), "by_t": {}}
    for t in (100, 300, 1000):
        cur = curate(captions, entries, t=t, seed=0, matches=matches)
        res["by_t"][t] = cur.stats()
    return res


def veclip_llm(lm, n: int) -> dict:
    """SmolLM2 fusions of ``n`` synthetic web alt-texts with their visual captions."""
    from cliplab.curation.captioners import SceneGraphCaptioner
    from cliplab.curation.pools import web_pool
    from cliplab.curation.veclip import LLMFuser

    _, web = web_pool(n, seed=5)
    visual = SceneGraphCaptioner(seed=0)([dict(r, image=str(i)) for i, r in enumerate(web)])
    fuser = LLMFuser(lm=lm, max_new_tokens=32)
    t0 = time.perf_counter()
    fused = fuser([r["caption"] for r in web], visual)
    dt = time.perf_counter() - t0
    res = {"seconds_per_fusion": dt / len(web),
           "brand_kept": float(np.mean([bool(f) and r["brand"] in f.lower() for f, r in zip(fused, web)])),
           "colour_kept": float(np.mean([bool(f) and r["colour"] in f.lower() for f, r in zip(fused, web)])),
           "samples": [{"alt_text": r["caption"], "visual": v, "fused": f} for r, v, f in zip(web, visual, fused)]}
    print(json.dumps(res, indent=1)[:1500], flush=True)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llm-samples", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (one is faster on a busy 2-core machine)")
    ap.add_argument("--out", default="experiments/results/curation_flickr.json")
    ap.add_argument("--only-veclip", action="store_true", help="only (re)run the VeCLIP fusion sample into --out")
    ap.add_argument("--only-coarse", action="store_true",
                    help="only (re)compute the coarse-metadata MetaCLIP statistics into an existing --out")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    with open(DATA, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    captions = [r["caption"] for r in rows]
    if args.only_veclip:
        out = json.loads(Path(args.out).read_text())
        out["veclip_llm"] = veclip_llm(load_llm(), args.llm_samples)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        return
    if args.only_coarse:
        out = json.loads(Path(args.out).read_text())
        out["metaclip_coarse"] = coarse(captions)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        print(json.dumps(out["metaclip_coarse"], indent=1))
        return
    out: dict = {"captions": len(captions)}

    t0 = time.perf_counter()
    entries = build_metadata(captions, min_count=5)
    t_meta = time.perf_counter() - t0
    t0 = time.perf_counter()
    matcher = SubstringMatcher(entries, lowercase=True)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    matches = matcher.match_many(captions)
    t_match = time.perf_counter() - t0
    metaclip = {"entries": len(entries), "bigram_entries": sum(" " in e for e in entries),
                "metadata_seconds": t_meta, "automaton_seconds": t_build, "match_seconds": t_match,
                "captions_per_second": len(captions) / t_match, "unmatched_captions": sum(not m for m in matches),
                "mean_matches_per_caption": float(np.mean([len(m) for m in matches])), "by_t": {}}
    for t in (100, 1000, 5000):
        cur = curate(captions, entries, t=t, seed=0, matches=matches)
        s = cur.stats()
        top = np.argsort(-cur.counts)[:8]
        metaclip["by_t"][t] = {**s, "top_entries": {entries[i]: int(cur.counts[i]) for i in top}}
    out["metaclip"] = metaclip
    out["metaclip_coarse"] = coarse(captions)
    print(json.dumps(metaclip, indent=1)[:1500], flush=True)

    rule = RuleRewriter(seed=0)
    t0 = time.perf_counter()
    rewrites = rule(captions, version=0)
    t_rule = time.perf_counter() - t0
    out["laclip_rule"] = {"captions_per_second": len(captions) / t_rule,
                          "changed_fraction": float(np.mean([a.lower().strip(" .") != b for a, b in zip(captions, rewrites)])),
                          "samples": [{"caption": c, "rewrite": r} for c, r in list(zip(captions, rewrites))[:6]]}

    by_image = defaultdict(list)
    for r in rows:
        by_image[r["image"]].append(r["caption"])
    pool = same_image_pairs(dict(list(by_image.items())[-200:]), rng=0)  # pairs from images not in the sample
    t0 = time.perf_counter()
    lm = load_llm()
    t_load = time.perf_counter() - t0
    samples = []
    for source, pairs in (("flickr_same_image", pool), ("cliplab_meta", META_PAIRS)):
        rw = LLMRewriter(lm=lm, meta_pairs=pairs, max_new_tokens=32)
        sample = captions[: args.llm_samples : 1] if source == "flickr_same_image" else captions[5: 5 + args.llm_samples // 2]
        t0 = time.perf_counter()
        outs = rw(sample)
        dt = time.perf_counter() - t0
        samples.append({"source": source, "seconds_per_rewrite": dt / len(sample), "parse_failures": rw.failures,
                        "unchanged": sum(o.strip(" .").lower() == c.strip(" .").lower() for o, c in zip(outs, sample)),
                        "rewrites": [{"caption": c, "rewrite": o} for c, o in zip(sample, outs)]})
        print(json.dumps(samples[-1], indent=1)[:1200], flush=True)
    out["laclip_llm"] = {"lm": "smollm2-135m", "load_seconds": t_load, "runs": samples}

    out["veclip_llm"] = veclip_llm(lm, args.llm_samples)
    out["note"] = "timings measured under load (2 shared cores, other jobs running)"
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
