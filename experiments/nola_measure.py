"""NoLA on the blurred 8-shape task: label-free tuning against the zero-shot classifiers it starts from.

    python experiments/nola_measure.py --seeds 0,1,2                    # ~5 min per seed on 1 CPU thread
    python experiments/nola_measure.py --ssl dino-conv-shapes-blur      # the first encoder (the negative result)
    python experiments/nola_measure.py --seeds 1 --out /tmp/s1.json     # one seed per process, then
    python experiments/nola_measure.py --merge /tmp/s0.json /tmp/s1.json --out experiments/results/nola.json

Same model (shapes-tiny), same unlabelled training images (8 x 40, seed 11; labels never passed), same test images
(8 x 30, seed 12) for every arm:

* ``zero_shot_names``: the class names in the template "a {}" alone;
* ``zero_shot_cde``: the CDE classifier (names + world-vocabulary descriptions), NoLA's starting point;
* ``top_k_pseudo_label_accuracy``: how right the top-k pseudo-labels are (scored with the hidden labels);
* ``alignment``: the MLP on the shipped self-distilled encoder's features;
* ``nola``: the prompt-tuned CLIP with its head (the method);
* ``nola_without_ssl``: the same stage-4 tuning, with CLIP's own zero-shot argmax as the targets instead of the
  alignment module's (the control for the "DINO" part), same steps and seed (``--no-clip-label-arm`` skips it).

The CDE control does not depend on the seed; the seed changes the alignment MLP's and the prompts' initialisation
and the tuning batches and augmentations. Writes experiments/results/nola.json (or ``--out``) and docs/img/nola.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import cliplab
from cliplab.data.synthetic import SceneWorld
from cliplab.zeroshot import ZeroShotClassifier
from cliplab.zeroshot import nola as N
from cliplab.zeroshot.ssl_encoder import SHIPPED_SSL_ENCODERS, images_to_pixels, load_shipped_ssl_encoder

ROOT = Path(__file__).resolve().parents[1]


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    return round(float((pred == y).float().mean()), 4)


def main(steps: int = 150, seeds: tuple[int, ...] = (0,), ssl_name: str = "dino-conv-shapes-objects",
         clip_label_arm: bool = True, out: Path | None = None) -> dict:
    torch.set_num_threads(1)
    t0 = time.time()
    model = cliplab.load("shapes-tiny").eval()
    train, test = N.blurred_shape_task(40, seed=11), N.blurred_shape_task(30, seed=12)
    x, xt = images_to_pixels(train.images), images_to_pixels(test.images)
    y, yt = torch.tensor(train.labels), torch.tensor(test.labels)   # y: scoring only
    desc = N.world_descriptions(SceneWorld(), "shape")
    ssl = load_shipped_ssl_encoder(ssl_name)
    names_only = ZeroShotClassifier.from_classnames(model, train.classnames, ["a {}"])
    runs = []
    for seed in seeds:
        cfg = N.NoLAConfig(steps=steps, seed=seed)
        res = N.fit_nola(model, train.classnames, x, ssl, descriptions=desc, config=cfg,
                         on_log=lambda r: print(seed, r, flush=True))
        if clip_label_arm:
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
            **({"nola_without_ssl": accuracy(control.predict(xt).argmax(1), yt)} if clip_label_arm else {}),
            "history": res.history,
        })
        print({k: v for k, v in runs[-1].items() if k != "history"}, flush=True)
    result = {
        "task": "blurred_shape_task: 8 shapes, Gaussian blur 0.8 px; train 8x40 (seed 11, unlabelled), test 8x30 "
                "(seed 12)",
        "model": "shapes-tiny",
        "ssl_encoder": f"{ssl_name} (experiments/nola_train_ssl.py)",
        "config": {k: v for k, v in vars(N.NoLAConfig(steps=steps)).items() if k not in ("extra", "seed")},
        "runs": runs,
        "seconds": round(time.time() - t0, 1),
    }
    return write(result, out)


def write(result: dict, out: Path | None) -> dict:
    """Add the per-arm mean and spread over seeds; write the JSON (and the figure, for the default output)."""
    arms = [k for k, v in result["runs"][0].items()
            if isinstance(v, float) and all(k in r for r in result["runs"])]   # an arm some seeds skipped: left out
    result["mean"] = {a: round(sum(r[a] for r in result["runs"]) / len(result["runs"]), 4) for a in arms}
    result["min_max"] = {a: [min(r[a] for r in result["runs"]), max(r[a] for r in result["runs"])] for a in arms}
    default = ROOT / "experiments" / "results" / "nola.json"
    out = Path(out or default)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    if out.resolve() == default.resolve():
        figure(result, ROOT / "docs" / "img" / "nola.png")
    print(json.dumps({"mean": result["mean"], "min_max": result["min_max"]}), flush=True)
    return result


def merge(files: list[Path], out: Path | None) -> dict:
    """One result from per-seed runs of the same setting (their runs concatenated, seeds in order)."""
    parts = [json.loads(Path(f).read_text()) for f in files]
    for key in ("task", "model", "ssl_encoder", "config"):
        if any(p[key] != parts[0][key] for p in parts):
            raise ValueError(f"cannot merge runs with different {key}")
    result = {**parts[0], "runs": sorted((r for p in parts for r in p["runs"]), key=lambda r: r["seed"]),
              "seconds": round(sum(p["seconds"] for p in parts), 1)}
    return write(result, out)


def figure(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in ["zero_shot_names", "zero_shot_cde", "alignment", "nola_without_ssl", "nola"]
            if a in result["mean"]]
    labels = {"zero_shot_names": "names", "zero_shot_cde": "CDE", "alignment": "SSL MLP",
              "nola_without_ssl": "tuned, CLIP\nlabels", "nola": "NoLA"}
    means = [result["mean"][a] for a in arms]
    fig, ax = plt.subplots(figsize=(6, 2.8), dpi=90)
    ax.bar(range(len(arms)), means, color=["#999", "#777", "#6a9", "#c96", "#369"])
    ax.set_xticks(range(len(arms)), [labels[a] for a in arms], fontsize=8)
    for i, m in enumerate(means):
        ax.text(i, m + 0.01, f"{m:.2f}", ha="center", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("test accuracy")
    ax.set_title(f"blurred 8-shape task, shapes-tiny, no labels ({len(result['runs'])} seeds, "
                 f"{result['ssl_encoder'].split()[0]})", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seeds", default="0", help="comma-separated, e.g. 0,1,2")
    ap.add_argument("--ssl", default="dino-conv-shapes-objects", choices=sorted(SHIPPED_SSL_ENCODERS))
    ap.add_argument("--no-clip-label-arm", action="store_true", help="skip the tuning-on-CLIP's-own-labels arm")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--merge", nargs="+", type=Path, default=None, help="merge per-seed result files instead")
    args = ap.parse_args()
    if args.merge:
        merge(args.merge, args.out)
    else:
        main(args.steps, tuple(int(s) for s in args.seeds.split(",")), args.ssl, not args.no_clip_label_arm,
             args.out)
