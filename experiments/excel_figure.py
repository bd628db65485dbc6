"""Figure for docs/methods/excel.md: held-out scenes, the control's and ExCEL's class map overlaid on the image, and
the pseudo masks each gives from the image-level labels (background threshold 0.8).

    python experiments/excel_figure.py   # writes docs/img/excel.png
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import torch

import cliplab
from cliplab.data.synthetic import SceneWorld
from cliplab.dense import SyntheticSegmentation
from cliplab.dense.excel import attribute_bank, class_descriptions, excel_cams, pseudo_masks

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "docs" / "img" / "excel.png"


def main() -> None:
    model = cliplab.load("shapes-tiny").eval()
    world = SceneWorld(image_size=64, seed=1)
    data = SyntheticSegmentation(world, n=3, by="shape")
    samples = list(data)
    names = list(data.classes[1:])
    with torch.no_grad():
        cls = model.encode_texts(names)
        bank = attribute_bank(model, class_descriptions(world, "shape"), 16)
        bg = model.encode_texts(["background"])
        pixels = torch.stack([model.preprocess(s.image) for s in samples])
        present = torch.zeros(len(samples), len(names), dtype=torch.bool)
        for i, s in enumerate(samples):
            for c in np.unique(s.label):
                if 0 < c < 255:
                    present[i, c - 1] = True
        arms = {"control (class name, plain cosine)": excel_cams(model, pixels, cls, layers=0, variant="clip"),
                "ExCEL": excel_cams(model, pixels, cls, bank=bank, layers=5, variant="surgery",
                                    background_features=bg)}
    fig, axes = plt.subplots(len(samples), 5, figsize=(11, 2.4 * len(samples)))
    for row, s in enumerate(samples):
        first = int(present[row].nonzero()[0, 0])
        axes[row, 0].imshow(s.image)
        axes[row, 0].set_title(f"labels: {', '.join(names[c] for c in present[row].nonzero()[:, 0])}", fontsize=7)
        axes[row, 0].imshow(np.ma.masked_where(s.label == 0, s.label), cmap="tab10", alpha=0.0)
        col = 1
        for arm, cams in arms.items():
            axes[row, col].imshow(s.image)
            axes[row, col].imshow(cams[row, first].numpy(), cmap="jet", alpha=0.5)
            axes[row, col].set_title(f"{arm.split(' (')[0]}: map of '{names[first]}'", fontsize=7)
            mask = pseudo_masks(cams[row:row + 1], present[row:row + 1], 0.8)[0].numpy()
            axes[row, col + 1].imshow(s.image)
            axes[row, col + 1].imshow(np.ma.masked_where(mask == 0, mask), cmap="tab10", vmin=0, vmax=9, alpha=0.6)
            axes[row, col + 1].contour(s.label > 0, levels=[0.5], colors="white", linewidths=0.7)
            axes[row, col + 1].set_title(f"{arm.split(' (')[0]}: pseudo mask", fontsize=7)
            col += 2
    for ax in axes.ravel():
        ax.axis("off")
    fig.suptitle("ExCEL vs the plain class-name map on shapes-tiny (held-out scenes; white outline = true objects)",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT, dpi=110)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
