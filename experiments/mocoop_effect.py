"""MoCoOp on the shipped model: (1) does the router separate the hidden "style" (object size)? (2) does the
text-to-text regulariser help on classes unseen in training (base-to-new)?

(1) 32 classes (4 colours x 8 shapes, plain names), sizes small/medium/large cycling, 12 shots; experts from the
    size template groups (SYNTHETIC_TEMPLATE_GROUPS). Router top-1 agreement with the size of held-out images:
    trained vs the same router at init (control); accuracy beside CoOp's (M=16) on the same features.
(2) Base = 4 colours x 4 shapes, new = the other 4 colours x the other 4 shapes (names never seen by the prompts),
    4 shots, one expert from "a photo of a {}." (so text_weight=0 is CoOp exactly), lr 0.032 (MoCoOp's), 300 steps;
    text_weight 5 (regulariser over base + new names) vs 0, three seeds (world and shots).

    python experiments/mocoop_effect.py   # experiments/results/mocoop-effect.json, docs/img/mocoop.png
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import cliplab
from cliplab.data.synthetic.vocabulary import COLOURS, SHAPES
from cliplab.zeroshot import ZeroShotClassifier
from cliplab.zeroshot.coop import train_coop
from cliplab.zeroshot.mocoop import mocoop_prompts, router_agreement, train_mocoop
from cliplab.zeroshot.prompt_learning import (
    LearnedPrompts,
    accuracy,
    image_features,
    synthetic_prompt_task,
)

ROOT = Path(__file__).resolve().parents[1]
OUT_JSON = ROOT / "experiments" / "results" / "mocoop-effect.json"
OUT_PNG = ROOT / "docs" / "img" / "mocoop.png"
SEEDS = (0, 1, 2)


def router_experiment(model) -> dict:
    task = synthetic_prompt_task(shots=12, n_test=6, colours=list(COLOURS)[:4], seed=0)
    xtr, xte = image_features(model, task.train_images), image_features(model, task.test_images)
    ytr, yte = torch.tensor(task.train_labels), torch.tensor(task.test_labels)
    init = mocoop_prompts(model, task.classnames, seed=0)
    t = time.time()
    run = train_mocoop(model, task.classnames, xtr, ytr, steps=300, lr=0.032, seed=0)
    seconds = round(time.time() - t)
    coop = train_coop(model, task.classnames, xtr, ytr, n_ctx=16, steps=300, lr=0.002, seed=0)
    logits, _ = run.prompts.gates(xte)
    confusion = torch.zeros(3, 3, dtype=torch.long)
    for s, e in zip(task.test_style, logits.argmax(-1).tolist()):
        confusion[s, e] += 1
    return {"num_classes": len(task.classnames), "styles": task.styles, "test_images": len(yte),
            "router_agreement_trained": router_agreement(run.prompts, xte, task.test_style),
            "router_agreement_init": router_agreement(init, xte, task.test_style),
            "style_by_top1_expert": confusion.tolist(),
            "acc_mocoop": accuracy(run.classifier().predict(xte), yte),
            "acc_coop_m16": accuracy(coop.classifier().predict(xte), yte),
            "acc_zero_shot": accuracy(ZeroShotClassifier.from_classnames(model, task.classnames, ["a photo of a {}."])
                                      .predict(xte), yte),
            "seconds": seconds}


def base_to_new(model, seed: int) -> dict:
    c, s = list(COLOURS), list(SHAPES)
    base = synthetic_prompt_task(shots=4, n_test=10, colours=c[:4], shapes=s[:4], seed=seed)
    new = synthetic_prompt_task(shots=0, n_test=10, colours=c[4:], shapes=s[4:], seed=seed)
    xtr, xb, xn = (image_features(model, im) for im in (base.train_images, base.test_images, new.test_images))
    ytr, yb, yn = (torch.tensor(v) for v in (base.train_labels, base.test_labels, new.test_labels))
    out = {"zero_shot": {}}
    for split, names, x, y in (("base", base.classnames, xb, yb), ("new", new.classnames, xn, yn)):
        out["zero_shot"][split] = accuracy(
            ZeroShotClassifier.from_classnames(model, names, ["a photo of a {}."]).predict(x), y)
    for tw in (0.0, 5.0):
        run = train_mocoop(model, base.classnames, xtr, ytr, [["a photo of a {}."]],
                           all_classnames=base.classnames + new.classnames, text_weight=tw, correction=False,
                           steps=300, lr=0.032, seed=seed)
        learned = LearnedPrompts.from_mixture(run.prompts, "mocoop", model)
        learned.classnames = list(new.classnames)  # the same context on the new class names
        acc_b = accuracy(run.classifier().predict(xb), yb)
        acc_n = accuracy(ZeroShotClassifier.from_learned_prompts(model, learned).predict(xn), yn)
        out[f"text_weight_{tw:g}"] = {"base": acc_b, "new": acc_n, "H": 2 * acc_b * acc_n / (acc_b + acc_n)}
    print(seed, out, flush=True)
    return out


def figure(res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(7.4, 2.9), dpi=110)
    conf = res["router"]["style_by_top1_expert"]
    axes[0].imshow(conf, cmap="Blues")
    for i, row in enumerate(conf):
        for j, v in enumerate(row):
            axes[0].text(j, i, str(v), ha="center", va="center", fontsize=8)
    styles = res["router"]["styles"]
    axes[0].set_xticks(range(3), styles, fontsize=7)
    axes[0].set_yticks(range(3), styles, fontsize=7)
    axes[0].set_xlabel("top-1 expert (initialised from that size's templates)", fontsize=7)
    axes[0].set_ylabel("object size of the test image", fontsize=7)
    axes[0].set_title(f"router top-1 vs hidden size: {100 * res['router']['router_agreement_trained']:.0f}%",
                      fontsize=8)
    seeds = [str(s) for s in res["seeds"]]
    new0 = [100 * res["base_to_new"][s]["text_weight_0"]["new"] for s in seeds]
    new5 = [100 * res["base_to_new"][s]["text_weight_5"]["new"] for s in seeds]
    zs = [100 * res["base_to_new"][s]["zero_shot"]["new"] for s in seeds]
    xs = range(len(seeds))
    axes[1].plot(xs, zs, "x:", color="grey", label="zero-shot")
    axes[1].plot(xs, new0, "o-", label="no L_text (CoOp)")
    axes[1].plot(xs, new5, "s-", label="L_text, weight 5")
    axes[1].set_xticks(list(xs), [f"seed {s}" for s in seeds], fontsize=7)
    axes[1].set_ylabel("new-class accuracy (%)", fontsize=8)
    axes[1].set_title("base-to-new: classes unseen in training", fontsize=8)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    OUT_PNG.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT_PNG)


def main() -> None:
    import sys

    if "--figure-only" in sys.argv:
        figure(json.loads(OUT_JSON.read_text()))
        return
    torch.set_num_threads(1)
    model = cliplab.load("shapes-tiny").eval()
    t0 = time.time()
    res = {"model": "shapes-tiny", "seeds": list(SEEDS), "router": router_experiment(model)}
    print(res["router"], flush=True)
    res["base_to_new"] = {str(s): base_to_new(model, s) for s in SEEDS}
    for arm in ("text_weight_0", "text_weight_5"):
        for split in ("base", "new", "H"):
            vals = [res["base_to_new"][str(s)][arm][split] for s in SEEDS]
            res.setdefault("mean", {}).setdefault(arm, {})[split] = sum(vals) / len(vals)
    res["mean"]["zero_shot_new"] = sum(res["base_to_new"][str(s)]["zero_shot"]["new"] for s in SEEDS) / len(SEEDS)
    res["seconds"] = round(time.time() - t0)
    OUT_JSON.parent.mkdir(parents=True, exist_ok=True)
    OUT_JSON.write_text(json.dumps(res, indent=2) + "\n")
    figure(res)
    print(json.dumps(res["mean"], indent=2))


if __name__ == "__main__":
    main()
