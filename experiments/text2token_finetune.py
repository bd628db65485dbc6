"""Text2Token fine-tuning of a real text model (all-MiniLM-L6-v2 by default, or SmolLM2-135M: the paper's setting of a
decoder LM read through its own LM head) on unlabelled STS-B train sentences and Flickr8k training captions, against
the starting model and a same-compute shuffled-target control.

    OMP_WAIT_POLICY=PASSIVE python experiments/text2token_finetune.py --stage1-steps 150 --stage2-steps 150
    OMP_WAIT_POLICY=PASSIVE python experiments/text2token_finetune.py --model smollm2-135m --pooling prompteol \
        --stage1-steps 60 --stage2-steps 60 --batch-size 16 --no-control

Arms (both trained arms start from the real all-MiniLM-L6-v2 weights, see the same texts in the same order, with the
same seed, steps, head and schedule):
- ``before``: the starting model itself, with the same pooling (all-MiniLM-L6-v2, mean: the anchor, STS-B test 82.03,
  R@1 0.645, MRR 0.737);
- ``text2token``: stage 1 (data-driven target), evaluated, then stage 2 (model-derived target, from a frozen copy of
  the stage-1 model: a second ``train_text2token`` call on the stage-1 embedder with the head scale it ended at, so
  stage 2 sees the texts in the same batch order as stage 1), evaluated;
- ``shuffled``: the same two stages with every text trained on another text's targets (``shuffle_targets=True``),
  starting from the head scale calibrated for ``text2token``.
Training texts: the unique sentences of STS-B train (scores unused) and the captions of the Flickr8k training images
(``split_groups(..., held_out=1000, seed=0)[0]``); the held-out 1000 images' captions are never trained on.
Reported: STS-B dev and test Spearman x100 (the pooling trained) and held-out caption-to-caption R@1/R@5/R@10/MRR. Prints the
table and writes ``experiments/results/text2token-<model>-<tag>.json`` (``minilm`` or ``smollm2``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import torch

import cliplab.text as text
from cliplab.eval.paraphrase import read_caption_groups, retrieval_scores, split_groups
from cliplab.eval.sts import read_sts, sts_scores
from cliplab.textrep.text2token import top_tokens, train_text2token

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
PROBES = ["A man is playing a guitar on stage.", "Two dogs run through the snow.",
          "The stock market fell sharply on Monday."]


def score(emb, held, sts_sets, pooling):
    caps = [c for _, cs in held for c in cs]
    group_of = torch.tensor([g for g, (_, cs) in enumerate(held) for _ in cs])
    t0 = time.perf_counter()
    r = retrieval_scores(emb.encode(caps, pooling=pooling), group_of)
    out = {"r@1": r["r@1"], "r@5": r["r@5"], "r@10": r["r@10"], "mrr": r["mrr"]}
    for name, d in sts_sets.items():
        unique = list(dict.fromkeys(d.first + d.second))
        where = {s: i for i, s in enumerate(unique)}
        e = emb.encode(unique, pooling=pooling)
        out[f"sts_{name}"] = sts_scores(e[[where[x] for x in d.first]], e[[where[x] for x in d.second]],
                                        d.scores)["spearman"]
    print(f"  {json.dumps({k: round(v, 4) for k, v in out.items()})}  ({time.perf_counter() - t0:.0f}s)", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="all-MiniLM-L6-v2", help="all-MiniLM-L6-v2 or smollm2-135m")
    ap.add_argument("--pooling", default=None, help="[default: the model's own: mean for MiniLM, prompteol for SmolLM2]")
    ap.add_argument("--no-control", action="store_true", help="skip the shuffled-target arm")
    ap.add_argument("--stage1-steps", type=int, default=150)
    ap.add_argument("--stage2-steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--tau", type=float, default=1e-4)
    ap.add_argument("--background-size", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default=time.strftime("%Y-%m-%d"))
    ap.add_argument("--smoke", action="store_true", help="2+2 steps, 50 held-out images, 100 STS pairs; writes nothing")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    groups = read_caption_groups(DATA / "flickr8k-1k" / "all_captions.csv")
    train, held = split_groups(groups, held_out=1000, seed=0)
    assert not {g for g, _ in held} & {g for g, _ in train}
    sts_train = read_sts(DATA / "stsb" / "sts-train.csv")
    texts = list(dict.fromkeys(sts_train.first + sts_train.second)) + [c for _, cs in train for c in cs]
    random.Random(args.seed).shuffle(texts)
    sts_sets = {"dev": read_sts(DATA / "stsb" / "sts-dev.csv"), "test": read_sts(DATA / "stsb" / "sts-test.csv")}
    if args.smoke:
        held = held[:50]
        sts_sets = {k: v.subset(list(range(100))) for k, v in sts_sets.items()}
        args.stage1_steps = args.stage2_steps = 2
        args.background_size = 64
    print(f"train: {len(texts)} texts (STS-B train sentences + Flickr8k training captions); held out: "
          f"{sum(len(c) for _, c in held)} captions of {len(held)} images; STS-B dev {len(sts_sets['dev'])} / test "
          f"{len(sts_sets['test'])} pairs; args {vars(args)}", flush=True)

    base = text.load_embedder(args.model)
    pooling = args.pooling or base.default_pooling
    short = "minilm" if "minilm" in args.model.lower() else "smollm2" if "smollm2" in args.model.lower() else "model"
    results = {"args": vars(args), "n_train_texts": len(texts),
               "anchors": {"minilm_mean_sts_test": 82.03, "minilm_mean_r@1": 0.645, "minilm_mean_mrr": 0.737}}
    print(f"before ({args.model}, {pooling} pooling):", flush=True)
    results["before"] = score(base, held, sts_sets, pooling)

    start_scale = None  # the control starts from the scale calibrated for text2token, so only the targets differ
    arms = (("text2token", False),) if args.no_control else (("text2token", False), ("shuffled", True))
    for arm, shuffled in arms:
        kw = dict(pooling=pooling, batch_size=args.batch_size, lr=args.lr, tau=args.tau, background_size=args.background_size,
                  seed=args.seed, shuffle_targets=shuffled, progress=False, log_every=25)
        print(f"{arm}: stage 1 ({args.stage1_steps} steps)", flush=True)
        s1 = train_text2token(base, texts, stage1_steps=args.stage1_steps, stage2_steps=0, scale=start_scale, **kw)
        start_scale = s1.settings["start_scale"]
        for rec in s1.stage1.records:
            print("   ", {k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()}, flush=True)
        print(f"  start scale {s1.settings['start_scale']:.2f}, {s1.stage1.seconds:.0f}s", flush=True)
        print(f"  top tokens: {top_tokens(s1.embedder, s1.head, PROBES, k=8)}", flush=True)
        results[f"{arm}_stage1"] = score(s1.embedder, held, sts_sets, pooling)
        results[f"{arm}_stage1_train"] = {"records": s1.stage1.records, "seconds": s1.stage1.seconds, **s1.settings}
        # stage 2 from the stage-1 weights: a second call on the stage-1 embedder, with the same head scale
        print(f"{arm}: stage 2 ({args.stage2_steps} steps)", flush=True)
        s2 = train_text2token(s1.embedder, texts, stage1_steps=0, stage2_steps=args.stage2_steps,
                              scale=s1.head.scale, **kw)
        for rec in s2.stage2.records:
            print("   ", {k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()}, flush=True)
        print(f"  {s2.stage2.seconds:.0f}s; top tokens: {top_tokens(s2.embedder, s2.head, PROBES, k=8)}", flush=True)
        results[f"{arm}_stage2"] = score(s2.embedder, held, sts_sets, pooling)
        results[f"{arm}_stage2_train"] = {"records": s2.stage2.records, "seconds": s2.stage2.seconds, **s2.settings}
        del s1, s2

    print(f"\n{args.model}: STS-B Spearman x100 ({pooling} pooling) and held-out Flickr8k caption-to-caption retrieval (5000 captions)")
    print(f"{'model':<22} {'STS dev':>8} {'STS test':>9} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'MRR':>6}")
    for name in [n for n in ("before", "text2token_stage1", "text2token_stage2", "shuffled_stage1", "shuffled_stage2")
                 if n in results]:
        r = results[name]
        print(f"{name:<22} {r['sts_dev']:8.2f} {r['sts_test']:9.2f} {r['r@1']:6.3f} {r['r@5']:6.3f} "
              f"{r['r@10']:6.3f} {r['mrr']:6.3f}")
    print("anchor: all-MiniLM-L6-v2 mean pooling, STS-B test 82.03, R@1 0.645, MRR 0.737")
    if args.smoke:
        return
    out = REPO / "experiments" / "results" / f"text2token-{short}-{args.tag}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
