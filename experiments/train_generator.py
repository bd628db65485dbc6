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
    ap.add_argument("--card-only", action="store_true",
                    help="Judge the saved generator (unless quality.json exists) and write MODEL_CARD.md.")
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
    if args.card_only:
        gen = DiffusionGenerator.load(out)
        if not (out / "quality.json").is_file():
            quality = judge_generator(gen, cond, SceneJudge.load(out), per_count=48, steps=25, seed=0)
            (out / "quality.json").write_text(json.dumps(quality, indent=2) + "\n")
        write_card(out, gen, json.loads((out / "quality.json").read_text()))
        return
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
    write_card(out, gen, quality)
    print(json.dumps(quality, indent=2))


def write_card(out: Path, gen, quality: dict) -> None:
    """MODEL_CARD.md: what the generator reads, how it was trained, what it can and cannot draw (judged)."""
    train = gen.info.get("train", {})
    rows = "\n".join(f"| {n} | {q['colours']:.3f} | {q['shapes']:.3f} | {q['binding']:.3f} | {q['clean_binding']:.3f} |"
                     for n, q in quality.items() if isinstance(q, dict))
    params = sum(p.numel() for p in gen.denoiser.parameters())
    card = f"""# scenes-32: a small text-to-image generator on shapes-tiny's per-token states

* **Reads**: shapes-tiny's text tower, every token up to EOT after the final LayerNorm and before the projection
  (`space="final"`, Stable Diffusion 1.x's site), through cross-attention at 16 and 8 px.
* **Draws**: 32 x 32 RGB, 1-3 large plain objects (circle, square, triangle, cross; the world's 8 colours, distinct
  within a scene) on a plain grey background, in fixed slots (one centred, two side by side, three in a triangle, in
  the prompt's order). Prompts: "a red circle", "a red circle and a blue square", up to three objects.
* **Model**: U-Net, channels {gen.denoiser.config.channels}, {params:,} parameters; cosine schedule, 1000 steps,
  {gen.prediction}-prediction; DDIM sampling with classifier-free guidance {gen.guidance} against the empty prompt.
* **Training**: {train.get('steps')} steps of batch {train.get('batch_size')} (AdamW lr {train.get('lr')}, cosine,
  prompt dropout {train.get('cond_dropout')}, EMA {train.get('ema_decay')}) on {train.get('n_images')} scenes of
  world seed 0; {gen.info.get('train_seconds')} s on a shared 2-core CPU (`experiments/train_generator.py`).

## Judged quality (held-out prompts, 48 per object count, 25 DDIM steps, seed 0)

| objects | colours | shapes | binding | judge on clean renders |
|---|---|---|---|---|
{rows}

`colours` / `shapes`: the fractions of the prompt's colours / shapes drawn; `binding`: every object drawn with its own
colour and shape (see `cliplab.generation.SceneJudge`). The last column is the judge's own ceiling on clean renders.

## Cannot

Other shapes, sizes, textures, positions, backgrounds, words, relations ("left of"), counts beyond three, anything
outside the synthetic grammar. It is a stand-in that makes conditioning effects measurable, not an image model.
"""
    (out / "MODEL_CARD.md").write_text(card)


if __name__ == "__main__":
    main()
