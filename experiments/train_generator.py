"""Train the shipped ``scenes-32`` generator and its judge (cliplab/generation/pretrained/scenes-32/).

    python experiments/train_generator.py [--steps 3000] [--out cliplab/generation/pretrained/scenes-32]

The judge trains first (a minute); the generator saves its EMA weights every ``--checkpoint-every`` steps, so a long
run can be used while it goes on. At the end, samples for held-out prompts are judged and written to quality.json.
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
from cliplab.generation import (DenoiserConfig, DiffusionGenerator, GenerationScenes, GeneratorTrainConfig, SceneJudge, TextConditioner,  # noqa: E402
                                train_generator, train_judge)
from cliplab.generation.quality import judge_generator  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--judge-steps", type=int, default=600)
    ap.add_argument("--judge-only", action="store_true", help="Train (or retrain) the judge and stop.")
    ap.add_argument("--channels", default="16,32,64")
    ap.add_argument("--checkpoint-every", type=int, default=250)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resume-from", default=None,
                    help="Continue from a saved generator (its weights; a fresh schedule of --steps).")
    ap.add_argument("--seed", type=int, default=0, help="Sampling order of the run (scenes stay world seed 0).")
    ap.add_argument("--out", default=str(ROOT / "cliplab/generation/pretrained/scenes-32"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if args.judge_only or (args.judge_steps and not (out / "judge.json").is_file()):
        judge = train_judge(GenerationScenes(seed=1000), steps=args.judge_steps, progress=True)
        held = GenerationScenes(seed=2000)
        imgs, specs = held.batch(range(600))
        print("judge on clean held-out renders:", judge.score(imgs, specs), flush=True)
        judge.save(out)
        if args.judge_only:
            return
    model = cliplab.load("shapes-tiny")
    cond = TextConditioner(model, space="final")
    chans = tuple(int(c) for c in args.channels.split(","))
    cfg = GeneratorTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                               denoiser=DenoiserConfig(channels=chans, attn_levels=tuple(range(1, len(chans)))))
    info = {"text_model": "shapes-tiny", "space": "final"}

    def checkpoint(step, gen):
        gen.info.update(info)
        gen.save(out)
        print(f"step {step}: saved ({time.time() - t0:.0f} s)", flush=True)

    init = None
    if args.resume_from:
        init = DiffusionGenerator.load(args.resume_from)
        prior = init.info.get("train_history", []) + [{k: init.info.get(k) for k in ("train", "final_loss",
                                                                                       "train_seconds", "step")}]
        info["train_history"] = prior
    gen = train_generator(cond, GenerationScenes(seed=0), cfg, progress=True, info=info,
                          checkpoint_every=args.checkpoint_every, on_checkpoint=checkpoint, init=init)
    gen.save(out)
    if not (out / "judge.json").is_file():
        print("no judge yet: run with --judge-only, then `cliplab generate judge` for quality.json")
        return
    quality = judge_generator(gen, cond, SceneJudge.load(out), per_count=48, steps=25, seed=0)
    quality["train_seconds"] = gen.info.get("train_seconds")
    (out / "quality.json").write_text(json.dumps(quality, indent=2) + "\n")
    print(json.dumps(quality, indent=2))


if __name__ == "__main__":
    main()
