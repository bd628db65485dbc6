"""DupMAE pre-training of all-MiniLM-L6-v2 on Flickr8k training captions, against an MLM-only control.

    python experiments/dupmae_minilm.py --steps 250 --batch-size 16 --save-dir /tmp/dupmae-runs   # what was run

Both arms start from the real all-MiniLM-L6-v2 weights, see the same captions in the same order with the same
encoder masks (same seed), and train for the same number of steps; the control has only the encoder MLM loss
(``DupMAEConfig(dec_weight=0, bow_weight=0)``). The held-out 1000 images' captions
(``split_groups(..., held_out=1000, seed=0)[1]``) are never trained on. Reported, for each arm: held-out
caption-to-caption retrieval (R@1/5/10, MRR) and STS-B test Spearman for the [CLS] part, the OT part and the combined
embedding (each part L2-normalised; cosine of the combined = mean of the two cosines), and the trained encoder's own
mean pooling; for the encoder before pre-training, the same four (its OT part from a fresh identity-initialised
head). Prints the table and writes
``experiments/results/dupmae-minilm-<tag>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

import cliplab.text as text
from cliplab.eval.paraphrase import read_caption_groups, retrieval_scores, split_groups
from cliplab.eval.sts import read_sts, sts_scores
from cliplab.textrep.dupmae import DupMAEConfig, DupMAEEmbedder, pretrain

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def score(emb_fn, held, sts):
    """Retrieval on the held-out captions and STS-B test from ``emb_fn(texts) -> {name: [N, D]}``."""
    caps = [c for _, cs in held for c in cs]
    group_of = torch.tensor([g for g, (_, cs) in enumerate(held) for _ in cs])
    unique = list(dict.fromkeys(sts.first + sts.second))
    where = {s: i for i, s in enumerate(unique)}
    t0 = time.perf_counter()
    cap_embs, sts_embs = emb_fn(caps), emb_fn(unique)
    out = {}
    for name in cap_embs:
        r = retrieval_scores(cap_embs[name], group_of)
        e = sts_embs[name]
        s = sts_scores(e[[where[x] for x in sts.first]], e[[where[x] for x in sts.second]], sts.scores)
        out[name] = {"r@1": r["r@1"], "r@5": r["r@5"], "r@10": r["r@10"], "mrr": r["mrr"],
                     "sts_spearman": s["spearman"]}
    print(f"  (evaluated {list(out)} in {time.perf_counter() - t0:.0f}s)", flush=True)
    return out


def parts_of(emb, width):
    def fn(texts):
        both = emb.encode(texts, pooling="dupmae", batch_size=64)  # each part L2-normalised
        return {"cls": both[:, :width], "ot": both[:, width:], "combined": both,
                "mean": emb.encode(texts, pooling="mean", batch_size=64)}
    return fn


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--top-k", type=int, default=384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default=time.strftime("%Y-%m-%d"))
    ap.add_argument("--smoke", action="store_true", help="a quick check of the script: 2 steps, 50 held-out images, "
                    "100 STS pairs (writes nothing)")
    ap.add_argument("--save-dir", default=None, help="also save the trained embedders here (about 100 MB each)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    groups = read_caption_groups(DATA / "flickr8k-1k" / "all_captions.csv")
    train, held = split_groups(groups, held_out=1000, seed=0)
    held_images = {g for g, _ in held}
    assert not held_images & {g for g, _ in train}
    texts = [c for _, cs in train for c in cs]
    sts = read_sts(DATA / "stsb" / "sts-test.csv")
    if args.smoke:
        held, sts, args.steps = held[:50], sts.subset(list(range(100))), 2
    print(f"train: {len(texts)} captions of {len(train)} images; held out: {sum(len(c) for _, c in held)} captions "
          f"of {len(held)} images; STS-B test: {len(sts)} pairs", flush=True)

    base = text.load_embedder("all-MiniLM-L6-v2")
    width = base.model.cfg.width
    results = {"args": vars(args), "anchors": {"minilm_mean_sts": 82.03, "minilm_mean_r@1": 0.645,
                                               "minilm_mean_mrr": 0.737}}
    print("before pre-training (all-MiniLM-L6-v2):", flush=True)
    fresh = DupMAEEmbedder.from_encoder(base, top_k=args.top_k)  # the untrained (identity-initialised) head
    before = parts_of(fresh, width)
    results["before"] = score(before, held, sts)

    arms = {"dupmae": DupMAEConfig(), "mlm_only": DupMAEConfig(dec_weight=0.0, bow_weight=0.0)}
    for arm, cfg in arms.items():
        print(f"pre-training {arm}: {cfg}", flush=True)
        res = pretrain(base, texts, steps=args.steps, batch_size=args.batch_size, lr=args.lr, config=cfg,
                       top_k=args.top_k, seed=args.seed, log_every=10, progress=False)
        for rec in res.fit.records:
            print("   ", {k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()}, flush=True)
        print(f"  {res.fit.seconds:.0f}s for {args.steps} steps ({res.fit.seconds / args.steps:.2f} s/step)", flush=True)
        results[arm] = score(parts_of(res.embedder, width), held, sts)
        results[arm + "_train"] = {"seconds": res.fit.seconds, "records": res.fit.records, **res.config}
        if args.save_dir:
            res.embedder.save(Path(args.save_dir) / arm)
        del res

    print("\nheld-out caption retrieval (1000 images, 5000 captions) and STS-B test Spearman x100")
    print(f"{'model':<10} {'embedding':<10} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'MRR':>6} {'STS':>7}")
    for model in ("before", "mlm_only", "dupmae"):
        for name, r in results[model].items():
            print(f"{model:<10} {name:<10} {r['r@1']:6.3f} {r['r@5']:6.3f} {r['r@10']:6.3f} {r['mrr']:6.3f} "
                  f"{r['sts_spearman']:7.2f}")
    print("anchors: all-MiniLM-L6-v2 mean pooling R@1 0.645, MRR 0.737, STS 82.03")
    if args.smoke:
        return
    out = REPO / "experiments" / "results" / f"dupmae-minilm-{args.tag}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
