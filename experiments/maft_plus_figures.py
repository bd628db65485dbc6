"""Figure for docs/methods/maft_plus.md: a held-out scene (a shape never trained on), the similarity of every patch
with the held-out class's CDT-refined embedding overlaid on the image, and the predicted mask, for the frozen model
and for MAFT+ (CDT + RC). Writes docs/img/maft_plus-heldout.png. About 2-4 minutes on 2 CPU cores."""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

import cliplab
from cliplab.data.synthetic import SceneWorld
from cliplab.dense import SyntheticSegmentation
from cliplab.dense.maft_plus import MaftConfig, MaftPlus, _scene_batch, class_embeddings, train_maft_plus
from cliplab.dense.maps import upsample_maps
from cliplab.dense.segment import overlay_image

STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 100
OUT = Path(__file__).resolve().parents[1] / "docs" / "img" / "maft_plus-heldout.png"


def panels(maft, sample, classes, held):
    px, masks, _ = _scene_batch(maft.model, [sample], (8, 8))
    with torch.no_grad():
        feats, grid = maft.dense_features(px)
        text = maft.transfer(class_embeddings(maft.model, classes), feats, grid)  # [1, K, D]
        k = classes.index(held)
        sims = F.normalize(feats, dim=-1) @ F.normalize(text[0, k], dim=-1)
        heat = upsample_maps(sims.view(1, 1, *grid), (64, 64))[0, 0]
        pred = maft.segment(px, masks, classes)[0]
    labels = ("background", *classes)
    return [overlay_image(sample.image, torch.zeros(64, 64, dtype=torch.long), labels, heat=heat),
            overlay_image(sample.image, pred, labels)]


def main():
    seen = MaftConfig().seen
    data = SyntheticSegmentation(SceneWorld(64, seed=1), n=60, by="shape")
    held = sorted((c for c in data.classes[1:] if c not in seen), key=lambda c: c != "diamond")  # diamond first
    sample = next(s for s in data if any(o.shape == held[0] for o in s.scene.objects) and len(s.scene.objects) >= 3)
    classes = list(data.classes[1:])
    rows = [("frozen", MaftPlus(cliplab.load("shapes-tiny")))]
    rows.append(("maft+", train_maft_plus(cliplab.load("shapes-tiny"), MaftConfig(steps=STEPS))))
    tiles = [[overlay_image(sample.image, torch.from_numpy(sample.label), ("background", *classes))]
             + panels(m, sample, classes, held[0]) for _, m in rows]
    w = sum(t.width for t in tiles[0]) + 10 * len(tiles[0])
    h = sum(max(t.height for t in r) for r in tiles) + 10 * len(tiles)
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    y = 0
    for r in tiles:
        x = 0
        for t in r:
            canvas.paste(t, (x, y))
            x += t.width + 10
        y += max(t.height for t in r) + 10
    OUT.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(OUT)
    print(f"wrote {OUT} (rows: frozen, MAFT+; columns: true mask, '{held[0]}' similarity, predicted mask)")


if __name__ == "__main__":
    main()
