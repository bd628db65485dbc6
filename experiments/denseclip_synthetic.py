"""DenseCLIP on synthetic segmentation with the shipped ``shapes-tiny``: the full method against its controls.

Arms (same frozen image features, same training images, same batches, same seed, same steps for every trained arm):

* ``denseclip``: learnable context (8 tokens) + context decoder + score maps fed to the head + score-map loss (0.4);
* ``no_score_loss``: the same without the auxiliary score-map loss;
* ``fixed_prompts``: "a photo of a {}." prompts, no context tokens, no decoder (score maps fed to the head; the
  score-map loss has nothing to train with a frozen image tower);
* ``no_decoder``: learnable context + score-map loss, no context decoder;
* ``plain_head``: the head on the dense embeddings alone (no score maps, no prompts, no score-map loss);
* training-free baselines: ``naive`` and ``maskclip`` maps (:func:`cliplab.dense.segment.evaluate_segmentation`,
  "generic" templates, a "background" prompt competing).

For the trained arms both the head's mIoU and the score maps' own mIoU (argmax of ``s``) are reported.

    python experiments/denseclip_synthetic.py --by shape --steps 400
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import cliplab
from cliplab.dense import SyntheticSegmentation
from cliplab.dense.denseclip import encode_segmentation, evaluate_segmenter, fit_denseclip
from cliplab.dense.segment import evaluate_segmentation

ARMS = {
    "denseclip": {},
    "no_score_loss": {"aux_weight": 0.0},
    "fixed_prompts": {"n_ctx": 0, "context_decoder": False, "template": "a photo of a {}."},
    "no_decoder": {"context_decoder": False},
    "plain_head": {"n_ctx": 0, "context_decoder": False, "score_concat": False, "aux_weight": 0.0},
}
OUT = Path(__file__).parent / "results" / "denseclip-2026-12-07.json"


def _scores(r: dict) -> dict:
    return {"miou": round(r["miou"], 4), "pixel_acc": round(r["pixel_acc"], 4),
            "iou": {k: (None if v is None else round(v, 3)) for k, v in r["iou"].items()}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--by", choices=["shape", "colour"], default="shape")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--n-train", type=int, default=512)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arms", default=",".join(ARMS))
    args = ap.parse_args()
    torch.set_num_threads(1)  # tiny matmuls on shared cores
    clip = cliplab.load("shapes-tiny")
    train = SyntheticSegmentation(n=args.n_train, offset=0, by=args.by)
    test = SyntheticSegmentation(n=args.n_test, offset=100_000, by=args.by)
    t0 = time.perf_counter()
    enc_train, enc_test = encode_segmentation(clip, train), encode_segmentation(clip, test)
    print(f"encoded {len(train)} + {len(test)} images in {time.perf_counter() - t0:.0f} s", flush=True)
    results = {"by": args.by, "steps": args.steps, "batch_size": 16, "lr": 1e-3, "n_train": args.n_train,
               "n_test": args.n_test, "seed": args.seed, "model": "shapes-tiny", "backbone": "frozen", "arms": {}}
    for method in ("naive", "maskclip"):
        r = evaluate_segmentation(clip, test, method=method, templates="generic")
        results["arms"][f"training_free_{method}"] = _scores(r)
        print(f"{args.by} training-free {method}: mIoU {r['miou']:.4f}", flush=True)
    for name in args.arms.split(","):
        t = time.perf_counter()
        seg = fit_denseclip(clip, train, steps=args.steps, batch_size=16, lr=1e-3, seed=args.seed,
                            encoded=enc_train, **ARMS[name])
        head, score = evaluate_segmenter(seg, enc_test), evaluate_segmenter(seg, enc_test, use="score")
        results["arms"][name] = {**_scores(head), "score_map_miou": round(score["miou"], 4),
                                 "overrides": ARMS[name], "final_loss": seg.history[-1],
                                 "seconds": round(time.perf_counter() - t, 1)}
        print(f"{args.by} {name}: head mIoU {head['miou']:.4f}, score-map mIoU {score['miou']:.4f} "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    everything = json.loads(OUT.read_text()) if OUT.exists() else {}
    everything[f"{args.by}-seed{args.seed}-steps{args.steps}"] = results
    OUT.write_text(json.dumps(everything, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
