"""CoOp on the shipped model: 16-shot learned context vs hand-prompt zero-shot and a few-shot linear probe.

Task ("template-shifted"): 64 colour x shape classes of single-object scenes, class names written with colour words
the model never saw in training ("crimson circle", cliplab.zeroshot.prompt_learning.UNSEEN_COLOUR_WORDS). Hand-prompt
zero-shot ("a photo of a {}.") can only read the shape. Arms (same cached image features, same test images):
zero-shot; CoOp (M=16 unified, random init; M=4 from "a photo of a"; M=16 class-specific) at 1/4/16 shots; a linear
probe at the same shots. Control task: the plain names ("red circle").

    python experiments/coop_effect.py   # experiments/results/coop-effect.json, docs/img/coop.png (a few minutes)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import cliplab
from cliplab.zeroshot import ZeroShotClassifier
from cliplab.zeroshot.coop import train_coop
from cliplab.zeroshot.prompt_learning import accuracy, fit_linear_probe, image_features, synthetic_prompt_task

ROOT = Path(__file__).resolve().parents[1]
OUT_JSON = ROOT / "experiments" / "results" / "coop-effect.json"
OUT_PNG = ROOT / "docs" / "img" / "coop.png"
STEPS, LR, BATCH, SEED = 250, 0.002, 128, 0
SHOTS = (1, 4, 16)


def first_shots(labels, shots):
    seen: dict[int, int] = {}
    keep = []
    for i, y in enumerate(labels):
        if seen.get(y, 0) < shots:
            keep.append(i)
            seen[y] = seen.get(y, 0) + 1
    return keep


def run_task(model, names: str) -> dict:
    task = synthetic_prompt_task(shots=16, n_test=8, names=names, seed=SEED)
    xtr, xte = image_features(model, task.train_images), image_features(model, task.test_images)
    ytr, yte = torch.tensor(task.train_labels), torch.tensor(task.test_labels)
    zs = ZeroShotClassifier.from_classnames(model, task.classnames, ["a photo of a {}."])
    out = {"classnames": task.classnames[:4] + ["..."], "num_classes": len(task.classnames),
           "test_images": len(yte), "zero_shot": accuracy(zs.predict(xte), yte), "coop_m16": {}, "linear_probe": {}}
    shot_list = SHOTS if names == "unseen-colours" else (16,)
    for k in shot_list:
        idx = first_shots(task.train_labels, k)
        t = time.time()
        run = train_coop(model, task.classnames, xtr[idx], ytr[idx], n_ctx=16, steps=STEPS, lr=LR,
                         batch_size=BATCH, seed=SEED)
        out["coop_m16"][k] = {"acc": accuracy(run.classifier().predict(xte), yte), "seconds": round(time.time() - t),
                              "final_loss": run.fit.losses[-1]}
        if k == 16:
            out["nearest_words_m16"] = [w[0] for w in run.prompts.experts[0].nearest_words(model)]
        probe = fit_linear_probe(xtr[idx], ytr[idx], len(task.classnames))
        out["linear_probe"][k] = accuracy(probe(xte).detach(), yte)
        print(names, k, out["coop_m16"][k], "probe", out["linear_probe"][k], flush=True)
    if names == "unseen-colours":
        for key, kw in (("coop_m4_init", {"n_ctx": 4, "ctx_init": "a photo of a"}),
                        ("coop_m16_csc", {"n_ctx": 16, "class_specific": True})):
            run = train_coop(model, task.classnames, xtr, ytr, steps=STEPS, lr=LR, batch_size=BATCH, seed=SEED, **kw)
            out[key] = {"acc": accuracy(run.classifier().predict(xte), yte), "shots": 16}
            print(key, out[key], flush=True)
    return out


def figure(res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = res["unseen-colours"]
    fig, ax = plt.subplots(figsize=(4.6, 3.0), dpi=110)
    ks = sorted(int(k) for k in r["coop_m16"])
    ax.plot(ks, [100 * r["coop_m16"][str(k)]["acc"] for k in ks], "o-", label="CoOp (M=16, unified)")
    ax.plot(ks, [100 * r["linear_probe"][str(k)] for k in ks], "s--", label="linear probe")
    ax.axhline(100 * r["zero_shot"], color="grey", ls=":", label="zero-shot 'a photo of a {}.'")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("shots per class")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("64 classes, unseen colour words (shapes-tiny)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    OUT_PNG.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT_PNG)


def main() -> None:
    import sys

    if "--figure-only" in sys.argv:  # redraw from the saved results
        figure(json.loads(OUT_JSON.read_text()))
        return
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    model = cliplab.load("shapes-tiny").eval()
    t0 = time.time()
    res = {"model": "shapes-tiny", "steps": STEPS, "lr": LR, "batch_size": BATCH, "optimizer": "sgd", "seed": SEED,
           "unseen-colours": run_task(model, "unseen-colours"), "plain": run_task(model, "plain")}
    res["seconds"] = round(time.time() - t0)
    OUT_JSON.parent.mkdir(parents=True, exist_ok=True)
    OUT_JSON.write_text(json.dumps(res, indent=2) + "\n")
    figure(json.loads(OUT_JSON.read_text()))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
