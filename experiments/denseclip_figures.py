"""Figure for docs/methods/denseclip.md: a held-out scene, its true mask, the DenseCLIP score map of one class
overlaid on it, and the predicted masks of the DenseCLIP head and of the training-free MaskCLIP baseline, for a
segmenter fitted on ``shapes-tiny`` (frozen image tower). Also saves the fitted segmenter (to show that the saved
directory is what ``cliplab segment --method denseclip --checkpoint DIR`` reads). Writes docs/img/denseclip.png.

    python experiments/denseclip_figures.py [STEPS] [SAVE_DIR]
"""

import sys
from pathlib import Path

import torch
from PIL import Image

import cliplab
from cliplab.dense import SyntheticSegmentation
from cliplab.dense.denseclip import fit_denseclip
from cliplab.dense.maps import upsample_maps
from cliplab.dense.segment import overlay_image, segment

STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 400
SAVE = Path(sys.argv[2]) if len(sys.argv) > 2 else None
OUT = Path(__file__).resolve().parents[1] / "docs" / "img" / "denseclip.png"


def main():
    torch.set_num_threads(1)
    clip = cliplab.load("shapes-tiny")
    train = SyntheticSegmentation(n=512, offset=0, by="shape")
    seg = fit_denseclip(clip, train, steps=STEPS, batch_size=16, seed=0)
    if SAVE is not None:
        seg.save(SAVE)
    test = SyntheticSegmentation(n=50, offset=100_000, by="shape")
    sample = next(s for s in test if len(s.scene.objects) >= 3)
    classes = test.classes
    k = int(max(set(sample.label.ravel().tolist()) - {0}))  # one class present in the scene
    with torch.no_grad():
        out = seg(clip.preprocessor.batch([sample.image]))
    heat = upsample_maps(out.score[:, k : k + 1], (64, 64))[0, 0]
    pred = torch.from_numpy(seg.segment([sample.image])[0])
    base = segment(clip, [sample.image], classes[1:], method="maskclip").masks[0]
    tiles = [overlay_image(sample.image, torch.from_numpy(sample.label), classes),
             overlay_image(sample.image, torch.zeros(64, 64, dtype=torch.long), classes, heat=heat),
             overlay_image(sample.image, pred, classes), overlay_image(sample.image, base, classes)]
    w = sum(t.width for t in tiles) + 10 * len(tiles)
    canvas = Image.new("RGB", (w, max(t.height for t in tiles)), (255, 255, 255))
    x = 0
    for t in tiles:
        canvas.paste(t, (x, 0))
        x += t.width + 10
    OUT.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(OUT)
    print(f"wrote {OUT} (true mask, '{classes[k]}' score map, DenseCLIP head, training-free MaskCLIP)")


if __name__ == "__main__":
    main()
