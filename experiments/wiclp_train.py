"""Train the shipped CLP and WiCLP projections for the ``scenes-32`` generator and judge them against the plain
generator (same held-out prompts, same sampling seeds).

    python experiments/wiclp_train.py [--steps 400] [--per-count 96] [--no-ship]

Both projections train with the same data, steps, batch, lr and seed (only ``kind`` differs), on two-object scenes of
world seed 7 with every (colour, shape) set of the judged held-out prompts left out. They are saved (unless
``--no-ship``) under ``cliplab/t2i/pretrained/wiclp/{clp,wiclp}/`` with the sha256 of the generator checkpoint they
were trained for; scores go to ``experiments/results/wiclp.json`` and a sample grid to ``docs/img/wiclp.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cliplab  # noqa: E402
from cliplab.generation import TextConditioner, load_generator, load_judge, save_grid, shipped_generator_dir  # noqa: E402
from cliplab.generation.quality import held_out_specs  # noqa: E402
from cliplab.t2i.wiclp import SwitchOffGenerator, apply_projection, judge_projection, shipped_dir, train_projection  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--n-images", type=int, default=1024)
    ap.add_argument("--kinds", default="clp,wiclp")
    ap.add_argument("--per-count", type=int, default=96, help="held-out two-object prompts judged")
    ap.add_argument("--seeds", default="0,1", help="sampling seeds for two-object prompts (each judges all)")
    ap.add_argument("--single-count", type=int, default=48, help="held-out one-object prompts judged (seed 0)")
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--arms", default="clp@-1,wiclp@-1,wiclp@500",
                    help="kind@threshold arms judged beside the plain generator (-1: projected at every step)")
    ap.add_argument("--generator", default="scenes-32", help="shipped generator name or a saved generator dir")
    ap.add_argument("--ship-threshold", type=int, default=-1, help="threshold stored with the shipped weights")
    ap.add_argument("--no-ship", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "experiments/results/wiclp.json"))
    ap.add_argument("--figure", default=str(ROOT / "docs/img/wiclp.png"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()

    gen = load_generator(args.generator).frozen()
    judge = load_judge(args.generator)
    cond_fn = TextConditioner(cliplab.load(gen.info.get("text_model", "shapes-tiny")).float().eval(),
                              space=gen.info.get("space", "final"))
    gen_dir = Path(args.generator) if Path(args.generator).is_dir() else shipped_generator_dir(args.generator)
    digest = hashlib.sha256((gen_dir / "generator.safetensors").read_bytes()).hexdigest()
    generator_info = {"sha256": digest, "step": gen.info.get("step"), "final_loss": gen.info.get("final_loss")}
    print("generator:", generator_info, flush=True)

    kinds = [k for k in args.kinds.split(",") if k]
    seeds = [int(s) for s in args.seeds.split(",")]
    arm_specs = [(a.split("@")[0], int(a.split("@")[1])) for a in args.arms.split(",") if a]
    projections, training = {}, {}
    for kind in kinds:
        trained = train_projection(gen, cond_fn, kind=kind, steps=args.steps, batch_size=args.batch_size,
                                   lr=args.lr, n_images=args.n_images, exclude_held_out=args.per_count,
                                   progress=True)
        losses = trained.losses
        k = max(1, len(losses) // 10)
        training[kind] = {"first_tenth_loss": round(sum(losses[:k]) / k, 5),
                          "last_tenth_loss": round(sum(losses[-k:]) / k, 5), **trained.info}
        print(kind, training[kind], flush=True)
        projections[kind] = trained.projection
        if not args.no_ship and args.generator == "scenes-32":
            trained.info["generator_sha256"] = digest
            trained.info["generator_step"] = gen.info.get("step")
            trained.save(shipped_dir(kind), threshold=args.ship_threshold)

    def judged(projection, threshold):
        per_seed = [judge_projection(gen, cond_fn, judge, projection, threshold=threshold, per_count=args.per_count,
                                     counts=(2,), steps=args.sample_steps, seed=s, batch_size=48)["2"] for s in seeds]
        two = {m: round(sum(r[m] for r in per_seed) / len(per_seed), 4)
               for m in ("binding", "colours", "shapes", "clean_binding")}
        two["binding_per_seed"] = [r["binding"] for r in per_seed]
        one = judge_projection(gen, cond_fn, judge, projection, threshold=threshold, per_count=args.single_count,
                               counts=(1,), steps=args.sample_steps, seed=0, batch_size=48)["1"]
        return {"1": one, "2": two}

    # the training objective on held-out scenes (fixed t and noise, the judged prompts): projection vs identity
    denoising = {}
    for count, n in (("1", args.single_count), ("2", args.per_count)):
        specs, images = held_out_specs(int(count), n)
        cond = cond_fn([s.prompt for s in specs])
        g = torch.Generator().manual_seed(0)
        t = torch.randint(0, gen.timesteps, (n,), generator=g)
        noise = torch.randn(images.shape, generator=g)
        with torch.no_grad():
            denoising[count] = {"plain": round(gen.loss(images, cond, t=t, noise=noise).item(), 6)}
            for kind in kinds:
                projected = apply_projection(projections[kind], cond)
                denoising[count][kind] = round(gen.loss(images, projected, t=t, noise=noise).item(), 6)
    print("held-out denoising loss", denoising, flush=True)

    arms = {"plain": judged(None, -1)}
    print("plain", arms["plain"], flush=True)
    for kind, thr in arm_specs:
        name = f"{kind}@{thr}"
        arms[name] = judged(projections[kind], thr)
        print(name, arms[name], flush=True)

    # figure: 8 held-out two-object prompts (columns), rows plain / each projection (always on), same noise
    specs, _ = held_out_specs(2, 8)
    cond = cond_fn([s.prompt for s in specs])
    rows = [gen.sample(cond, steps=args.sample_steps, seed=0)]
    rows += [SwitchOffGenerator(gen, projections[k], -1).sample(cond, steps=args.sample_steps, seed=0) for k in kinds]
    save_grid(torch.cat(rows), args.figure, columns=8)

    result = {
        "generator": generator_info,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "figure")},
        "training": training,
        "heldout_denoising_loss": denoising,
        "arms": arms,
        "figure": {"path": str(Path(args.figure).resolve()).replace(str(ROOT) + "/", ""), "rows": ["plain", *kinds],
                   "prompts": [s.prompt for s in specs]},
        "seconds": round(time.time() - t0, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(arms, indent=1))


if __name__ == "__main__":
    main()
