"""LightCLIP against plain CLIP, trained from scratch on the synthetic world (docs/methods/lightclip.md).

Every arm trains ``lightclip-tiny``'s model and recipe (``tiny-smoke``: a 64 px ViT with 16 px patches, batch 32,
fp32, one thread) with the same seed, data, steps and batch; only the loss differs. Arms: plain CLIP (``clip``), full
LightCLIP, and each LightCLIP term alone (softened labels, token alignment, MLM). Evaluated on held-out scenes
(another world seed): text->image and image->text R@1 over a gallery of short captions, zero-shot colour+shape
accuracy on single-object scenes, foil accuracy (the true short caption scores above a one-word foil), and word->patch
pointing (the patch most similar to a word's token output lies on the object; chance = the object's patch share).

    python experiments/lightclip_effect.py --steps 300 --seeds 0     # results/lightclip_effect.json (merges seeds)
    python experiments/lightclip_effect.py --steps 300 --seeds 1,2 --only "CLIP (control);token alignment only"
    python experiments/lightclip_effect.py --finetune 20             # adds: token term fine-tuning shapes-tiny
    python experiments/lightclip_effect.py --figure                  # docs/img/lightclip_effect.png from the json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import cliplab
from cliplab.data import SceneWorld
from cliplab.data.synthetic import make_foils, zero_shot_task
from cliplab.objectives.lightclip import lightclip_tiny, word_patch_pointing
from cliplab.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments/results/lightclip_effect.json"
FIGURE = ROOT / "docs/img/lightclip_effect.png"
ARMS = {
    "CLIP (control)": ("clip", {}),
    "LightCLIP (all three terms)": ("lightclip", {}),
    "softened labels only": ("lightclip", {"token_weight": 0.0, "mlm_weight": 0.0}),
    "token alignment only": ("lightclip", {"eps_max": 0.0, "mlm_weight": 0.0}),
    "MLM + fusion only": ("lightclip", {"eps_max": 0.0, "token_weight": 0.0}),
}


def train(loss: str, kwargs: dict, steps: int, seed: int, out: Path):
    cfg = lightclip_tiny()
    loss_kwargs = {"total_steps": steps, **kwargs} if loss == "lightclip" else {}
    cfg = cfg.replace(loss=loss, loss_kwargs=loss_kwargs, steps=steps, seed=seed, checkpoint_every=0,
                      progress=False, out_dir=str(out))
    t = time.time()
    result = Trainer(cfg).fit()
    return result, time.time() - t


@torch.no_grad()
def evaluate(model, n: int = 500) -> dict[str, float]:
    model.eval()
    world = SceneWorld(image_size=64, seed=7)
    scenes = [world.sample(i) for i in range(n)]
    pixels = model.preprocessor.batch([s.render() for s in scenes])
    img = F.normalize(model.encode_image(pixels).float(), dim=-1)
    txt = model.encode_text(model.tokenize([s.short_caption for s in scenes]), normalize=True)
    sim = txt @ img.T
    eye = torch.arange(n)
    res = {"t2i_r1": float((sim.argmax(1) == eye).float().mean()), "i2t_r1": float((sim.argmax(0) == eye).float().mean())}
    wins = []
    for k, s in enumerate(scenes[:200]):
        foils = [f.text for f in make_foils(s, "short", per_kind=1)]
        if foils:
            f = model.encode_text(model.tokenize(foils), normalize=True) @ img[k]
            wins += (sim[k, k] > f).tolist()
    res["foil_acc"] = float(np.mean(wins))
    task = zero_shot_task("colour_shape", 3, image_size=64, seed=11)
    protos = F.normalize(torch.stack([model.encode_text(model.tokenize(p), normalize=True).mean(0)
                                      for p in task.prompts]), dim=-1)
    zimg = F.normalize(model.encode_image(model.preprocessor.batch(task.images)).float(), dim=-1)
    res["zeroshot_colour_shape"] = float(((zimg @ protos.T).argmax(1) == torch.tensor(task.labels)).float().mean())
    res.update(pointing(model, task))
    return res


def pointing(model, task) -> dict[str, float]:
    """Word->patch pointing on single-object scenes (:func:`cliplab.objectives.lightclip.word_patch_pointing`)."""
    captions = [task.prompts[label][0] for label in task.labels]
    hits, chance = word_patch_pointing(model, task.images, captions, [s.masks[0] for s in task.scenes])
    return {"pointing": hits, "pointing_chance": chance}


def finetune(steps: int, batch: int = 16, lr: float = 1e-4, seed: int = 0) -> None:
    """Word->patch pointing after fine-tuning the shipped shapes-tiny with CLIP's loss or the token term alone."""
    torch.set_num_threads(1)
    task = zero_shot_task("colour_shape", 1, image_size=64, seed=11)
    res = {"args": {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "precision": "fp32"},
           "shapes-tiny (start)": pointing(cliplab.load("shapes-tiny"), task)}
    for name, loss, kwargs in [("CLIP (control)", "clip", {}),
                               ("token alignment only", "lightclip", {"eps_max": 0.0, "mlm_weight": 0.0})]:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = lightclip_tiny().replace(model="shapes-tiny", init_from="shapes-tiny", loss=loss, loss_kwargs=kwargs,
                                           steps=steps, batch_size=batch, lr=lr, warmup_steps=2, seed=seed,
                                           checkpoint_every=0, progress=False, out_dir=tmp)
            trainer = Trainer(cfg)
            trainer.fit()
            res[name] = pointing(trainer.model, task)
        print(name, res[name], flush=True)
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": {}}
    data["finetune_shapes_tiny"] = res
    RESULTS.write_text(json.dumps(data, indent=2) + "\n")


def figure(data: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["t2i_r1", "i2t_r1", "foil_acc", "zeroshot_colour_shape", "pointing"]
    arms = list(ARMS)
    fig, ax = plt.subplots(figsize=(8, 3.2))
    width = 0.8 / len(arms)
    for a, arm in enumerate(arms):
        runs = [run[arm] for run in data["runs"].values() if arm in run]
        vals = [np.mean([r[m] for r in runs]) for m in metrics]
        ax.bar(np.arange(len(metrics)) + a * width, vals, width, label=f"{arm} (n={len(runs)})")
    ax.set_xticks(np.arange(len(metrics)) + 0.4 - width / 2, metrics, fontsize=8)
    ax.set_ylabel("held-out score")
    ax.set_title(f"tiny-smoke from scratch, {data['args']['steps']} steps, mean over seeds", fontsize=9)
    ax.set_ylim(0, 1.0)
    ax.legend(fontsize=7, ncol=3, loc="upper left")
    fig.tight_layout()
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=90)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", default="0")
    p.add_argument("--only", default="", help="';'-separated arm names (default: all)")
    p.add_argument("--figure", action="store_true", help="only redraw the figure from the json")
    p.add_argument("--finetune", type=int, default=0, help="only: fine-tune shapes-tiny this many steps (pointing)")
    a = p.parse_args()
    if a.finetune:
        finetune(a.finetune)
        return
    if a.figure:
        figure(json.loads(RESULTS.read_text()))
        return
    torch.set_num_threads(1)
    seeds = [int(s) for s in a.seeds.split(",")]
    arms = [x for x in a.only.split(";") if x] or list(ARMS)
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": {}}
    data["args"] = {"steps": a.steps, "model": "lightclip-tiny (tiny-smoke)", "batch": 32}
    for seed in seeds:
        run = data["runs"].setdefault(str(seed), {})
        for arm in arms:
            loss, kwargs = ARMS[arm]
            with tempfile.TemporaryDirectory() as tmp:
                result, secs = train(loss, kwargs, a.steps, seed, Path(tmp))
                model = cliplab.load(str(Path(tmp) / "final"))
                scores = evaluate(model)
            run[arm] = {"seed": seed, "loss": loss, "loss_kwargs": kwargs, **scores,
                                    "train_seconds_under_load": round(secs, 1),
                                    "final_loss": result.losses[-1]}
            print(arm, seed, json.dumps(run[arm]), flush=True)
            RESULTS.write_text(json.dumps(data, indent=2) + "\n")
    figure(data)


if __name__ == "__main__":
    main()
