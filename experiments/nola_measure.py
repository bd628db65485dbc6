"""NoLA on the blurred 8-shape task: label-free tuning against the zero-shot classifiers it starts from.

    python experiments/nola_measure.py              # ~15 min on 1 loaded CPU thread

Same model (shapes-tiny), same unlabelled training images (8 x 40, seed 11; labels never passed), same test images
(8 x 30, seed 12) for every arm:

* ``zero_shot_names``: the class names in the template "a {}" alone;
* ``zero_shot_cde``: the CDE classifier (names + world-vocabulary descriptions), NoLA's starting point;
* ``top_k_pseudo_label_accuracy``: how right the top-k pseudo-labels are (scored with the hidden labels);
* ``alignment``: the MLP on the shipped self-distilled encoder's features;
* ``nola``: the prompt-tuned CLIP with its head (the method);
* ``nola_without_ssl``: the same stage-4 tuning, with CLIP's own zero-shot argmax as the targets instead of the
  alignment module's (the control for the "DINO" part), same steps and seed.

Writes experiments/results/nola.json and docs/img/nola.png.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

import cliplab
from cliplab.data.synthetic import SceneWorld
from cliplab.zeroshot import ZeroShotClassifier
from cliplab.zeroshot import nola as N
from cliplab.zeroshot.ssl_encoder import images_to_pixels, load_shipped_ssl_encoder

ROOT = Path(__file__).resolve().parents[1]


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    return round(float((pred == y).float().mean()), 4)


def main(steps: int = 150, seeds: tuple[int, ...] = (0,)) -> dict:
    torch.set_num_threads(1)
    t0 = time.time()
    model = cliplab.load("shapes-tiny").eval()
    train, test = N.blurred_shape_task(40, seed=11), N.blurred_shape_task(30, seed=12)
    x, xt = images_to_pixels(train.images), images_to_pixels(test.images)
    y, yt = torch.tensor(train.labels), torch.tensor(test.labels)   # y: scoring only
    desc = N.world_descriptions(SceneWorld(), "shape")
    ssl = load_shipped_ssl_encoder()
    names_only = ZeroShotClassifier.from_classnames(model, train.classnames, ["a {}"])
    runs = []
    for seed in seeds:
        cfg = N.NoLAConfig(steps=steps, seed=seed)
        res = N.fit_nola(model, train.classnames, x, ssl, descriptions=desc, config=cfg,
                         on_log=lambda r: print(seed, r, flush=True))
        zs_train = N.zero_shot_probs(model, res.cde, x).argmax(1)
        control = N.NoLAClassifier(model, res.cde, cfg.n_prompts, seed=seed)
        N.train_prompts(control, x, zs_train, cfg)
        runs.append({
            "seed": seed,
            "k": res.k,
            "top_k_selected": len(res.top_k_indices),
            "top_k_pseudo_label_accuracy": accuracy(res.top_k_labels, y[res.top_k_indices]),
            "alignment_train_label_accuracy": accuracy(res.pseudo_labels, y),
            "zero_shot_names": accuracy(N.zero_shot_probs(model, names_only, xt).argmax(1), yt),
            "zero_shot_cde": accuracy(N.zero_shot_probs(model, res.cde, xt).argmax(1), yt),
            "alignment": accuracy(res.alignment(ssl.encode(xt)).argmax(1), yt),
            "nola": accuracy(res.classifier.predict(xt).argmax(1), yt),
            "nola_without_ssl": accuracy(control.predict(xt).argmax(1), yt),
            "history": res.history,
        })
        print({k: v for k, v in runs[-1].items() if k != "history"}, flush=True)
    result = {
        "task": "blurred_shape_task: 8 shapes, Gaussian blur 0.8 px; train 8x40 (seed 11, unlabelled), test 8x30 "
                "(seed 12)",
        "model": "shapes-tiny",
        "ssl_encoder": "dino-conv-shapes-blur (experiments/nola_train_ssl.py)",
        "config": {k: v for k, v in vars(N.NoLAConfig(steps=steps)).items() if k not in ("extra", "seed")},
        "runs": runs,
        "seconds": round(time.time() - t0, 1),
    }
    out = ROOT / "experiments" / "results" / "nola.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    figure(result, ROOT / "docs" / "img" / "nola.png")
    return result


def figure(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = ["zero_shot_names", "zero_shot_cde", "alignment", "nola_without_ssl", "nola"]
    means = [sum(r[a] for r in result["runs"]) / len(result["runs"]) for a in arms]
    fig, ax = plt.subplots(figsize=(6, 2.8), dpi=90)
    ax.bar(range(len(arms)), means, color=["#999", "#777", "#6a9", "#c96", "#369"])
    ax.set_xticks(range(len(arms)), ["names", "CDE", "SSL MLP", "tuned, CLIP\nlabels", "NoLA"], fontsize=8)
    for i, m in enumerate(means):
        ax.text(i, m + 0.01, f"{m:.2f}", ha="center", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("test accuracy")
    ax.set_title("blurred 8-shape task, shapes-tiny, no labels", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 150)
