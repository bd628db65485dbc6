"""Figure for docs/methods/cloc.md: a held-out scene; the region-text similarity map of one object's noun phrase
(at each cell, the cosine between the phrase and the Prompter's embedding of a box of that object's size centred
there) overlaid on the image; and each object's box coloured by the phrase the Prompter names for it (mask panel:
the objects' visible pixels labelled by the retrieved phrase). Rows: the Prompter at initialisation on shapes-tiny,
and after CLOC training. Writes docs/img/cloc-regions.png."""

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import cliplab
from cliplab.data.synthetic import SceneWorld
from cliplab.dense.cloc import ClocConfig, ClocModel, _pixels, object_regions, train_cloc
from cliplab.dense.maps import upsample_maps
from cliplab.dense.segment import overlay_image

STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 100
OUT = Path(__file__).resolve().parents[1] / "docs" / "img" / "cloc-regions.png"


@torch.no_grad()
def panels(cm, scene):
    regions = object_regions(scene)
    phrases = [p for _, p in regions]
    text = F.normalize(cm.model.encode_texts(phrases), dim=-1)
    px = _pixels(cm.model, [scene.image])
    x0, y0, x1, y1 = regions[0][0]
    w, h = x1 - x0, y1 - y0
    centres = [(4 + 8 * c, 4 + 8 * r) for r in range(8) for c in range(8)]
    boxes = torch.tensor([[[max(0, cx - w / 2), max(0, cy - h / 2), min(64, cx + w / 2), min(64, cy + h / 2)]
                           for cx, cy in centres]], dtype=torch.float32)
    sims = F.normalize(cm.region_embeddings(px, boxes)[0], dim=-1) @ text[0]
    heat = upsample_maps(sims.view(1, 1, 8, 8), (64, 64))[0, 0]
    named = (F.normalize(cm.region_embeddings(px, torch.tensor([[b for b, _ in regions]], dtype=torch.float32))[0],
                         dim=-1) @ text.T).argmax(-1)
    mask = np.zeros((64, 64), dtype=np.int64)
    for (box, _), m, k in zip(regions, scene.masks, named.tolist()):
        mask[m] = k + 1
    labels = ("background", *phrases)
    return [overlay_image(scene.image, np.zeros((64, 64), dtype=np.int64), labels, heat=heat),
            overlay_image(scene.image, mask, labels)]


def main():
    world = SceneWorld(64, seed=1)
    scene = next(s for s in (world.sample(i) for i in range(100)) if len(object_regions(s)) >= 3)
    truth = np.zeros((64, 64), dtype=np.int64)
    regions = object_regions(scene)
    for k, m in enumerate(scene.masks[:len(regions)]):
        truth[m] = k + 1
    labels = ("background", *(p for _, p in regions))
    rows = [("init", ClocModel(cliplab.load("shapes-tiny"))),
            ("cloc", train_cloc(cliplab.load("shapes-tiny"), ClocConfig(steps=STEPS, pool_scenes=192)))]
    tiles = [[overlay_image(scene.image, truth, labels)] + panels(cm, scene) for _, cm in rows]
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
    print(f"wrote {OUT} (rows: Prompter at init, CLOC; columns: true objects, '{regions[0][1]}' region map, "
          "phrase named per box)")


if __name__ == "__main__":
    main()
