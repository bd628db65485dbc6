"""un²CLIP on shapes-tiny: stage 1 trains the unCLIP generator (``unclip-32``), stage 2 fine-tunes the image tower
against it (the method) and against a trainable copy of it (the drifting control); ``--stage eval`` measures both.

    python experiments/un2clip_train.py --stage unclip   # -> cliplab/generation/pretrained/unclip-32/
    python experiments/un2clip_train.py --stage un2clip  # -> cliplab/objectives/pretrained/un2clip/{un2clip,drift}
    python experiments/un2clip_train.py --stage eval     # -> experiments/results/un2clip.json, docs/img/un2clip*.png
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cliplab  # noqa: E402
from cliplab.generation import load_judge, save_grid  # noqa: E402
from cliplab.generation.unclip import (UnclipTrainConfig, generator_view, image_conditioning, image_embeddings,  # noqa: E402
                                       load_unclip,
                                       save_unclip, train_unclip)
from cliplab.objectives import un2clip as U  # noqa: E402

UNCLIP_DIR = ROOT / "cliplab/generation/pretrained/unclip-32"
TOPS = ROOT / "cliplab/objectives/pretrained/un2clip"
RESULTS = ROOT / "experiments/results/un2clip.json"
SCRATCH = Path("/tmp/h_un2clip")


def stage_unclip(args) -> None:
    model = cliplab.load("shapes-tiny").float().eval()
    cfg = UnclipTrainConfig(steps=args.steps, lr=args.lr, n_images=args.n_images, seed=0,
                            context_tokens=args.context_tokens)
    gen = train_unclip(model, config=cfg, progress=True,
                       info={"made_by": "python experiments/un2clip_train.py --stage unclip "
                                        f"--steps {args.steps} --lr {args.lr} --n-images {args.n_images} "
                                        f"--context-tokens {args.context_tokens}"})
    save_unclip(gen, UNCLIP_DIR)
    print(json.dumps(gen.info, indent=1), flush=True)


def _quick_measures():
    """A cheap callback for the training curves: held-out pairs and zero-shot on fewer images than the final eval."""
    a, b, pa, pb = U.binding_pairs(100, seed=11)
    la, lb = U.position_pairs(100, seed=11)

    def callback(step, model):
        return {"binding": U.detail_scores(model, a, b, pa, pb), "position": U.detail_scores(model, la, lb),
                "zero_shot": U.coarse_zero_shot(model, 10, seed=12)}
    return callback


def stage_un2clip(args) -> None:
    model = cliplab.load("shapes-tiny").float().eval()
    gen = load_unclip(UNCLIP_DIR).frozen()
    curves = {}
    for arm, train_generator in (("un2clip", False), ("drift", True)):
        tuned, tuned_gen, log = U.un2clip_finetune(model, gen, progress=True, steps=args.steps,
                                                   lr=args.lr, n_images=args.n_images, layers=args.layers,
                                                   train_generator=train_generator, callback=_quick_measures(),
                                                   every=args.every)
        made = (f"python experiments/un2clip_train.py --stage un2clip --steps {args.steps} --lr {args.lr} "
                f"--n-images {args.n_images} --layers {args.layers}")
        U.save_image_top(tuned, TOPS / arm, layers=args.layers, info={
            "arm": arm, "train_generator": train_generator, "generator": "unclip-32", "made_by": made,
            "config": log["config"], "final_loss": sum(log["losses"][-50:]) / 50, "seconds": log["seconds"]})
        if train_generator:
            save_unclip(tuned_gen, SCRATCH / "drift-generator")
        curves[arm] = {"evals": log["evals"], "loss_every_50": [round(sum(log["losses"][i:i + 50]) / 50, 4)
                                                                for i in range(0, len(log["losses"]), 50)]}
        print(arm, json.dumps(log["evals"][-1]), flush=True)
    (SCRATCH / "curves.json").write_text(json.dumps(curves, indent=1))


@torch.no_grad()
def _judged_variations(gen, model, judge, n: int = 32, seed: int = 21) -> tuple[dict, torch.Tensor]:
    """unCLIP variations of two-object scenes from ``model``'s embeddings under ``gen``, judged against the scenes."""
    from cliplab.generation import GenerationScenes

    scenes = GenerationScenes(image_size=64, seed=seed, counts=(2,), weights=None)
    images, specs = scenes.batch(range(n))
    samples = gen.sample(image_conditioning(model, images), steps=20, seed=0)
    return judge.score(samples, specs), torch.cat([generator_view(images[:8], 32), samples[:8]])


@torch.no_grad()
def _generator_reads(gen, model, n: int = 64, repeats: int = 4) -> dict:
    """The frozen generator's denoising loss on scenes under their own embedding, their detail-swapped partner's
    (colours swapped / object moved), another scene's, and the null one: what it reads from the embedding."""
    a, b, _, _ = U.binding_pairs(n, seed=40)
    la, lb = U.position_pairs(n, seed=40)
    conds = {"own": image_embeddings(model, a), "colour_swapped": image_embeddings(model, b),
             "other_scene": image_embeddings(model, a).roll(1, 0), "null": torch.zeros(n, model.config.embed_dim)}
    pos = {"own": image_embeddings(model, la), "moved": image_embeddings(model, lb)}
    g = torch.Generator().manual_seed(0)
    out = {k: 0.0 for k in [*conds, *(f"position_{k}" for k in pos)]}
    for _ in range(repeats):
        t, noise = torch.randint(0, gen.timesteps, (n,), generator=g), torch.randn(n, 3, 32, 32, generator=g)
        for k, e in conds.items():
            out[k] += U.un2clip_loss(gen, e, a, t=t, noise=noise).item() / repeats
        for k, e in pos.items():
            out[f"position_{k}"] += U.un2clip_loss(gen, e, la, t=t, noise=noise).item() / repeats
    return {k: round(v, 5) for k, v in out.items()}


def stage_eval(args) -> None:
    base = cliplab.load("shapes-tiny").float().eval()
    gen = load_unclip(UNCLIP_DIR).frozen()
    judge = load_judge("scenes-32")
    arms = {"shapes-tiny": (base, gen), "un2clip": (U.load_image_top(base, TOPS / "un2clip"), gen)}
    drift_gen_dir = SCRATCH / "drift-generator"
    arms["drift"] = (U.load_image_top(base, TOPS / "drift"),
                     load_unclip(drift_gen_dir).frozen() if drift_gen_dir.is_dir() else gen)
    results, rows = {"generator_reads": _generator_reads(gen, base)}, []
    print("generator reads", results["generator_reads"], flush=True)
    for name, (model, g) in arms.items():
        r = U.measure(model, n_pairs=200, n_per_class=25)
        r["unclip_variations_judged"], grid = _judged_variations(g, model, judge)
        r["variations_generator"] = "drifted copy" if (name == "drift" and drift_gen_dir.is_dir()) else "unclip-32"
        results[name] = r
        rows.append(grid[8:] if rows else grid)
        print(name, json.dumps(r), flush=True)
    save_grid(torch.cat(rows), ROOT / "docs/img/un2clip.png", columns=8, scale=3)
    curves = json.loads((SCRATCH / "curves.json").read_text()) if (SCRATCH / "curves.json").is_file() else None
    tops = {arm: json.loads((TOPS / arm / "top.json").read_text()) for arm in ("un2clip", "drift")}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"made_by": "python experiments/un2clip_train.py --stage eval",
                                   "unclip": load_unclip(UNCLIP_DIR).info, "tops": tops, "generator_reads": results.pop("generator_reads"), "arms": results,
                                   "curves": curves}, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=["unclip", "un2clip", "eval"], required=True)
    ap.add_argument("--steps", type=int, default=None, help="default: 2400 (unclip), 400 (un2clip)")
    ap.add_argument("--lr", type=float, default=None, help="default: 2e-3 (unclip), 1e-4 (un2clip)")
    ap.add_argument("--n-images", type=int, default=None, help="default: 8000 (unclip), 4000 (un2clip)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--context-tokens", type=int, default=4, help="unCLIP generator's extra context tokens")
    ap.add_argument("--every", type=int, default=100)
    args = ap.parse_args()
    first = args.stage == "unclip"
    args.steps = args.steps or (2400 if first else 400)
    args.lr = args.lr or (2e-3 if first else 1e-4)
    args.n_images = args.n_images or (8000 if first else 4000)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    {"unclip": stage_unclip, "un2clip": stage_un2clip, "eval": stage_eval}[args.stage](args)
    print(f"done in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
