"""Train the shipped point-prompt segmenter stand-in (cliplab/dense/pretrained/point-seg-64) on synthetic scenes of
world seed 0 and report its IoU on held-out scenes (world seed 1) with several points vs one positive point.

    python experiments/read_sasp_train_segmenter.py [--steps 500] [--batch-size 16]

About 5-8 minutes on 2 shared CPU cores.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from cliplab.data.synthetic import SceneWorld
from cliplab.dense.promptable import _example, image_tensor, train_point_segmenter

OUT = Path(__file__).resolve().parents[1] / "cliplab" / "dense" / "pretrained" / "point-seg-64"


def held_out_iou(model, n=300, seed=1):
    world, rng = SceneWorld(image_size=64, seed=seed), np.random.default_rng(5)
    multi, single = [], []
    for i in range(n):
        img, mask, pts, lab = _example(world, i, rng, "colour")
        target = torch.from_numpy(mask)
        for keep, out in ((slice(None), multi), (slice(int(np.nonzero(lab == 1)[0][0]), None), single)):
            p, l_ = torch.from_numpy(pts[keep]), torch.from_numpy(lab[keep])
            if out is single:
                p, l_ = p[:1], l_[:1]
            pred = model.predict(image_tensor(img), p[None], l_[None])[0] > 0.5
            out.append(((pred & target).sum() / (pred | target).sum()).item())
    return float(np.mean(multi)), float(np.mean(single))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    model = train_point_segmenter(steps=args.steps, batch_size=args.batch_size, seed=0, log_every=50)
    seconds = time.time() - t0
    model.save(OUT)
    multi, single = held_out_iou(model)
    result = {"steps": args.steps, "batch_size": args.batch_size, "train_seconds": round(seconds, 1),
              "held_out_iou_prompt_points": round(multi, 4), "held_out_iou_one_positive_point": round(single, 4)}
    print(json.dumps(result, indent=2))
    (Path(__file__).parent / "results" / "read_sasp-segmenter-2026-12-07.json").write_text(json.dumps(result, indent=2))
