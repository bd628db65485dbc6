"""ELLA on the shipped generator: train the Timestep-aware Semantic Connector (MiniLM tokens -> scenes-32's
conditioning) and the pooled-embedding control with the same steps, data and seed, ship both, and judge binding on
held-out 3-object prompts beside the shipped generator with its own shapes-tiny conditioning (the reference).

    python experiments/ella_train.py [--steps 1500] [--batch-size 16] [--eval-only]

Writes cliplab/t2i/pretrained/ella/{tsc,pooled}/, experiments/results/ella.json and docs/img/ella_samples.png.
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
import cliplab.t2i.ella as ella  # noqa: E402
import cliplab.text as text_models  # noqa: E402
from cliplab.generation import TextConditioner, load_generator, load_judge, save_grid  # noqa: E402
from cliplab.generation.quality import held_out_specs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generator", default="scenes-32")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--n-images", type=int, default=6000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arms", default="tsc,pooled")
    ap.add_argument("--eval-only", action="store_true", help="Judge the connectors already in --out.")
    ap.add_argument("--resume", action="store_true", help="Continue from the connectors already in --out.")
    ap.add_argument("--eval-n", type=int, default=96, help="Held-out prompts per object count.")
    ap.add_argument("--eval-counts", default="3,2")
    ap.add_argument("--eval-steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "cliplab/t2i/pretrained/ella"))
    ap.add_argument("--results", default=str(ROOT / "experiments/results/ella.json"))
    ap.add_argument("--figure", default=str(ROOT / "docs/img/ella_samples.png"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    arms = args.arms.split(",")
    cfg = ella.ELLATrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, n_images=args.n_images,
                               seed=args.seed)
    train_info = {}
    if not args.eval_only:
        for kind in arms:  # one after the other: same config, same seeded batches, timesteps and noise
            print(f"training {kind} ...", flush=True)
            wrapped, history = ella.train_ella(out / kind, kind=kind, generator=args.generator, config=cfg,
                                               log_every=100, init=out / kind if args.resume else None)
            train_info[kind] = wrapped.connector.info
            print(kind, train_info[kind], flush=True)

    gen = load_generator(args.generator).frozen()
    judge = load_judge(args.generator)
    minilm = ella.LMConditioner(text_models.load_embedder("all-MiniLM-L6-v2"))
    shapes_text = TextConditioner(cliplab.load(gen.info.get("text_model", "shapes-tiny")).float().eval(),
                                  space=gen.info.get("space", "final"))
    arms_eval = {"reference (scenes-32 on shapes-tiny tokens)": (gen, shapes_text)}
    for kind in arms:
        conn = ella.load_connector(out / kind)
        train_info.setdefault(kind, conn.info)
        arms_eval[kind] = (ella.ConnectedGenerator(gen, conn, text=minilm), minilm)
    scores, figure_rows = {}, []
    t0 = time.time()
    losses = {name: ella.held_out_loss(g, cond, count=3, n=256) for name, (g, cond) in arms_eval.items()}
    print("held-out denoising loss, 3 objects:", losses, flush=True)
    for count in [int(c) for c in args.eval_counts.split(",")]:
        scores[str(count)] = {}
        for name, (g, cond) in arms_eval.items():
            r = ella.judge_binding(g, cond, judge, count=count, n=args.eval_n, steps=args.eval_steps, seed=0,
                                   return_images=True)
            images = r.pop("images")
            r.pop("prompts")
            scores[str(count)][name] = r
            print(count, name, r, flush=True)
            if count == 3:
                figure_rows.append(images[:8])
    specs, clean = held_out_specs(3, 8)
    save_grid(torch.cat([clean] + figure_rows), args.figure, columns=8, scale=3)
    result = {
        "what": "binding on held-out prompts (judge of scenes-32), MiniLM tokens -> connector -> frozen scenes-32",
        "generator": args.generator, "generator_info_step": gen.info.get("step"),
        "train": {k: v for k, v in train_info.items()}, "eval": {"n": args.eval_n, "steps": args.eval_steps,
                                                                  "guidance": gen.guidance, "seed": 0},
        "held_out_loss_3_objects": {"n": 256, "seed": 0, "loss": losses},
        "scores": scores, "eval_seconds": round(time.time() - t0, 1),
        "figure": {"path": _shown(args.figure), "rows": ["clean render"] + list(arms_eval),
                   "prompts": [s.prompt for s in specs]},
    }
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(scores, indent=2))


def _shown(path: str) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


if __name__ == "__main__":
    main()
