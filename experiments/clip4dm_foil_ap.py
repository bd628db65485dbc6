"""AP(F-CLIPScore) vs AP(CLIPScore) on the shipped model's synthetic foils (docs/methods/clip4dm.md).

FOIL protocol (naver-ai/CLIP4DM ``main.py``): ``AP(is_orig, score)`` over originals and their foils, per foil kind,
both decision modes; short captions of 120 scenes of ``SceneWorld(seed=123)`` without clutter or words.

    python experiments/clip4dm_foil_ap.py   # writes experiments/results/clip4dm_foil_ap.json
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

import cliplab
from cliplab.data.synthetic import FOIL_KINDS, SceneWorld, make_foils
from cliplab.metrics import detect_misalignment

OUT = Path(__file__).resolve().parents[1] / "experiments" / "results" / "clip4dm_foil_ap.json"
SCENES = 120


def average_precision(scores, positive) -> float:
    order = np.argsort(-np.asarray(scores), kind="stable")
    pos = np.asarray(positive, dtype=bool)[order]
    hits = np.cumsum(pos)
    return float((hits / np.arange(1, len(pos) + 1))[pos].mean())


def main() -> None:
    torch.set_num_threads(1)
    model = cliplab.load("shapes-tiny").eval()
    world = SceneWorld(image_size=model.config.vision.image_size, seed=123, clutter_prob=0.0, word_prob=0.0)
    out = {"model": "shapes-tiny", "scenes": SCENES, "kinds": {}}
    for kind in FOIL_KINDS:
        images, texts, is_orig = [], [], []
        for i in range(SCENES):
            scene = world.sample(i)
            foils = make_foils(scene, kinds=(kind,), per_kind=1)
            if foils:
                image = world.render(scene)
                images += [image, image]
                texts += [scene.short_caption, foils[0].text]
                is_orig += [True, False]
        row = {"pairs": len(texts) // 2}
        for mode in ("most_negative", "threshold"):
            res = []
            for j in range(0, len(texts), 32):
                res += detect_misalignment(model, images[j: j + 32], texts[j: j + 32], mode=mode)
            row[f"ap_f_clip_score_{mode}"] = average_precision([r.f_clip_score for r in res], is_orig)
            row["ap_clip_score"] = average_precision([r.clip_score for r in res], is_orig)
        out["kinds"][kind] = row
        print(kind, row, flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=2) + "\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
