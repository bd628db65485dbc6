"""ExCEL pseudo-mask mIoU on held-out synthetic scenes (world seed 1) with image-level labels only, for the control
(plain patch-text cosine, class name alone) and the ExCEL arms, on the shipped shapes-tiny.

    python experiments/excel_pseudo_masks.py [--n 100]
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import cliplab
from cliplab.data.synthetic import SceneWorld
from cliplab.dense import SegmentationMeter, SyntheticSegmentation
from cliplab.dense.excel import attribute_bank, class_descriptions, excel_cams, pseudo_masks

ARMS = {  # name: (layers, use bank, variant)
    "clip (control)": (0, False, "clip"),
    "+SVC": (5, False, "clip"),
    "+TSE": (0, True, "clip"),
    "surgery sim": (0, False, "surgery"),
    "ExCEL (SVC+TSE+surgery)": (5, True, "surgery"),
}
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def run(model, by: str, n: int, n_clusters: int = 16):
    world = SceneWorld(image_size=64, seed=1)
    ds = SyntheticSegmentation(world, n=n, by=by)
    names = list(ds.classes[1:])
    with torch.no_grad():
        cls = model.encode_texts(names)
        bank = attribute_bank(model, class_descriptions(world, by), n_clusters)
        bg = model.encode_texts(["background"])
        samples = [ds[i] for i in range(n)]
        pixels = torch.stack([model.preprocess(s.image) for s in samples])
        present = torch.zeros(n, len(names), dtype=torch.bool)
        for i, s in enumerate(samples):
            for c in np.unique(s.label):
                if 0 < c < 255:
                    present[i, c - 1] = True
        out = {}
        for arm, (layers, use_bank, variant) in ARMS.items():
            cams = excel_cams(model, pixels, cls, bank=bank if use_bank else None, layers=layers, variant=variant,
                              background_features=bg)
            row = {}
            for t in THRESHOLDS:
                meter = SegmentationMeter(ds.classes)
                for s, m in zip(samples, pseudo_masks(cams, present, t)):
                    meter.update(m, s.label)
                row[str(t)] = round(meter.result()["miou"], 4)
            out[arm] = row
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = cliplab.load("shapes-tiny").eval()
    result = {"model": "shapes-tiny", "held_out": "SceneWorld(seed=1) scenes 0..n-1", "n": args.n,
              "metric": "pseudo-mask mIoU (background included) by background threshold",
              "descriptions": "synthetic grammar attribute phrases (no LLM)", "n_clusters": 16,
              "by": {by: run(model, by, args.n) for by in ("shape", "colour")}}
    print(json.dumps(result, indent=2))
    (Path(__file__).parent / "results" / "excel-2026-12-07.json").write_text(json.dumps(result, indent=2))
