"""Long-CLIP: fine-tuning the shipped model on long captions, against truncation at 77 and naive interpolation
(docs/methods/long_clip.md).

Every arm fine-tunes ``shapes-tiny`` with the same seed, data (synthetic long captions, 47-175 tokens, colours named
only at the end), steps, batch and learning rate, with the ``long_clip`` loss (label smoothing 0.1):

* ``truncate at 77``: the 77-token model, captions cut at 77 tokens, no PCM (the control);
* ``KPS + PCM``: Long-CLIP (positions stretched to 248, rows < 20 frozen, coarse image features against the first
  three sentences);
* ``interpolation + PCM``: every position interpolated to 248, nothing kept or frozen;
* ``KPS, no PCM`` (with ``--ablate-pcm``).

Evaluated on 400 held-out scenes: text->image R@1 with the full long captions (cut at the model's context) and with
short captions (what the original model was trained for; its drop is what the stretching should keep small), and
colour choice: for held-out scenes whose long caption runs past 77 tokens, how often the caption prefers its image
to copies with one colour replaced (the colours are named only after token 77).

    python experiments/long_clip_effect.py --steps 60 --batch 32        # results/long_clip_effect.json
    python experiments/long_clip_effect.py --steps 60 --batch 32 --only "KPS, no PCM"   # adds the PCM ablation
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import cliplab
from cliplab.data import SceneWorld
from cliplab.longtext.long_clip import interpolate_positions, to_long_clip
from cliplab.train import DataConfig, TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]


def heldout(n: int, seed: int = 7):
    world = SceneWorld(image_size=64, seed=seed)
    scenes = [world.sample(i) for i in range(n)]
    return scenes, [s.long_caption for s in scenes], [s.short_caption for s in scenes]


@torch.no_grad()
def recall_at_1(model, pixels, captions) -> float:
    model.eval()
    txt = model.encode_text(model.tokenize(captions), normalize=True)  # cut at the model's context (warns)
    img = F.normalize(model.encode_image(pixels).float(), dim=-1)
    return float(((txt @ img.T).argmax(1) == torch.arange(len(captions))).float().mean())


def colour_sets(scenes, model, variants: int = 3):
    """For scenes whose long caption runs past 77 tokens: the image and up to ``variants`` copies with one colour
    replaced (the caption is false of them only in its colour words, which come after token 77)."""
    world = SceneWorld(image_size=64, seed=7)
    rows = []
    for s in scenes:
        if len(model.tokenizer.encode(s.long_caption)) <= 77:
            continue
        others = world.attribute_replacements(s, "colour")[:variants]
        if others:
            rows.append((s.long_caption, model.preprocessor.batch([x.render() for x in [s, *others]])))
    return rows


@torch.no_grad()
def colour_choice(model, rows) -> float:
    """How often the long caption scores its own image above every colour-replaced copy (chance: 1 / (1 + k))."""
    model.eval()
    hits = 0
    for caption, pixels in rows:
        txt = model.encode_text(model.tokenize([caption]), normalize=True)
        img = F.normalize(model.encode_image(pixels).float(), dim=-1)
        hits += int((img @ txt[0]).argmax() == 0)
    return hits / len(rows)


def evaluate(model, pixels, long, short, rows) -> dict:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {"context": model.config.text.context_length, "r1_long": recall_at_1(model, pixels, long),
                "r1_short": recall_at_1(model, pixels, short), "colour_choice_long": colour_choice(model, rows)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout", type=int, default=400)
    p.add_argument("--ablate-pcm", action="store_true")
    p.add_argument("--only", default=None, help="run only these arms (';'-separated names) and add them to --out")
    p.add_argument("--out", default=str(ROOT / "experiments/results/long_clip_effect.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    base = cliplab.load("shapes-tiny")
    scenes, long, short = heldout(args.heldout)
    pixels = base.preprocessor.batch([s.render() for s in scenes])
    n_tokens = [len(base.tokenizer.encode(c)) for c in long]
    rows = colour_sets(scenes[:200], base)
    results = {"args": vars(args), "long caption tokens": {"min": min(n_tokens), "max": max(n_tokens),
                                                          "over 77": sum(n > 75 for n in n_tokens) / len(n_tokens)},
               "colour sets": len(rows),
               "shapes-tiny, no training": evaluate(base, pixels, long, short, rows),
               "shapes-tiny stretched (KPS), no training": evaluate(to_long_clip(cliplab.load("shapes-tiny")),
                                                                    pixels, long, short, rows)}
    naive = cliplab.load("shapes-tiny")
    naive.set_context_length(interpolate_positions(naive.text.pos_embed, 248))
    results["shapes-tiny interpolated to 248, no training"] = evaluate(naive, pixels, long, short, rows)
    print(json.dumps(results), flush=True)
    arms = {"truncate at 77": {"stretch": "none", "pcm_weight": 0.0, "freeze_kept": False},
            "KPS + PCM": {"short_sentences": 3},
            "interpolation + PCM": {"stretch": "interpolate", "short_sentences": 3}}
    if args.ablate_pcm or args.only:
        arms["KPS, no PCM"] = {"pcm_weight": 0.0}
    if args.only:
        arms = {k: v for k, v in arms.items() if k in args.only.split(";")}
        if Path(args.out).exists():  # keep the arms run before
            new = {k: v for k, v in results.items() if k != "args"}
            results = {**json.loads(Path(args.out).read_text()), **new}
            results.setdefault("extra runs", []).append(vars(args))
    for arm, kwargs in arms.items():
        out_dir = tempfile.mkdtemp()  # the run's checkpoints are not kept
        cfg = TrainConfig(init_from="shapes-tiny", loss="long_clip", loss_kwargs=kwargs,
                          data=DataConfig(source="synthetic", caption="long"), batch_size=args.batch,
                          steps=args.steps, lr=args.lr, min_lr=args.lr / 10, warmup_steps=10, weight_decay=0.01,
                          precision="fp32", threads=1, log_every=20, checkpoint_every=0, progress=False,
                          seed=args.seed, out_dir=out_dir)
        t = time.time()
        result = Trainer(cfg).fit()
        row = {"loss_kwargs": kwargs, "train_seconds_under_load": round(time.time() - t, 1),
               **evaluate(result.model, pixels, long, short, rows), "last_record": result.records[-1]}
        results[arm] = row
        shutil.rmtree(out_dir, ignore_errors=True)
        print(arm, json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
