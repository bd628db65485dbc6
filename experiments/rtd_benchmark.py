"""RTD on the synthetic CIR benchmark: phi + frozen text tower vs phi + RTD, and RTD's ablations.

Every RTD arm uses the same phi, the same text triplets, the same seeds and the same number of steps; only the switch
under test changes. Writes experiments/results/rtd_benchmark.json and docs/img/rtd_recall.png.

    python experiments/rtd_benchmark.py            # ~10 min on 2 loaded CPU cores
    python experiments/rtd_benchmark.py --quick    # smaller, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import cliplab
from cliplab.cir import cir_text_triplets, evaluate_cir, synthetic_cir, train_phi, train_rtd
from cliplab.eval.cache import CachedEncoder

ROOT = Path(__file__).resolve().parents[1]
ARMS = {
    "rtd": {},
    "no target anchor": {"anchor": False},
    "no hard negatives": {"hard_negatives": False},
    "naive concatenation": {"concat": "text"},
}


def recall(res) -> dict:
    m = res["metrics"]
    return {"R@1": m["R@1"], "R@5": m["R@5"], "R@10": m["R@10"],
            "by_kind_R@1": {k: v["R@1"] for k, v in m["by_kind"].items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--phi-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-4)
    args = ap.parse_args()
    if args.quick:
        args.queries, args.seeds, args.phi_steps, args.steps = 40, [0], 60, 20
    torch.set_num_threads(1)
    t_start = time.time()
    model = cliplab.load("shapes-tiny").eval()
    triplets = cir_text_triplets(1000, seed=1000)
    captions = sorted({t.reference for t in triplets} | {t.target for t in triplets})
    phi = train_phi(model, captions, steps=args.phi_steps, batch_size=64, seed=0)
    data = synthetic_cir(args.queries, seed=0)
    enc = CachedEncoder(model, None)  # the gallery is encoded once for every arm
    out = {"settings": {**vars(args), "train_triplets": len(triplets), "phi_captions": len(captions),
                        "benchmark": data.info["synthetic"], "model": "shapes-tiny"},
           "baselines": {q: recall(evaluate_cir(model, data, query=q, encoder=enc)) for q in ("image", "text", "sum")},
           "phi + frozen text tower": recall(evaluate_cir(model, data, query="phi", phi=phi, encoder=enc)), "arms": {}}
    for name, kw in ARMS.items():
        runs = []
        for seed in args.seeds:
            res = train_rtd(model, phi, triplets, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                            seed=seed, **kw)
            runs.append({"seed": seed, "final_loss": res.losses[-1],
                         **recall(evaluate_cir(model, data, query="phi", phi=phi, text_model=res.model,
                                                 encoder=enc))})
            print(name, seed, {k: runs[-1][k] for k in ("R@1", "R@5", "R@10")}, flush=True)
        out["arms"][name] = {"runs": runs, **{k: sum(r[k] for r in runs) / len(runs) for k in ("R@1", "R@5", "R@10")}}
    out["seconds"] = round(time.time() - t_start, 1)
    name = "rtd_benchmark_quick" if args.quick else "rtd_benchmark"
    path = ROOT / "experiments" / "results" / f"{name}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print("wrote", path)
    if not args.quick:
        figure(out, ROOT / "docs" / "img" / "rtd_recall.png")


def figure(out: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [(f"{q} (no phi)", out["baselines"][q]) for q in ("image", "text", "sum")]
    rows.append(("phi + frozen", out["phi + frozen text tower"]))
    rows += [(f"phi + {n}", a) for n, a in out["arms"].items()]
    fig = Figure(figsize=(7, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs = range(len(rows))
    for j, k in enumerate(("R@1", "R@5", "R@10")):
        ax.bar([x + (j - 1) * 0.27 for x in xs], [r[k] for _, r in rows], width=0.27, label=k)
    ax.set_xticks(list(xs), labels=[n for n, _ in rows], rotation=30, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("recall")
    ax.set_title(f"synthetic CIR, {out['settings']['queries']} queries, shapes-tiny", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    print("wrote", path)


if __name__ == "__main__":
    main()
