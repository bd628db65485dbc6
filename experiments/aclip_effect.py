"""A-CLIP: attentive against random patch removal at the same kept ratio (docs/methods/aclip.md).

1. Without training: the shipped ``shapes-tiny`` encodes held-out synthetic scenes from a share of their patches,
   chosen by its own class-token attention (averaged over layers and heads, 2x2 cells) or at random; text->image
   R@1 with short captions.
2. Training: ``shapes-tiny`` fine-tuned with the ``aclip`` loss, once with attentive masks and once with random masks,
   same seed, data, steps and batch; evaluated on the same held-out scenes with every patch.

    python experiments/aclip_effect.py --steps 150 --batch 32 --keep 0.25      # results/aclip_effect.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import cliplab
from cliplab.data import SceneWorld
from cliplab.train import DataConfig, TrainConfig, Trainer
from cliplab.train.masking import attentive_block_keep, cls_attention_over_layers, random_block_keep

ROOT = Path(__file__).resolve().parents[1]


def heldout(model, n: int, world_seed: int = 7):
    world = SceneWorld(image_size=model.config.vision.image_size, seed=world_seed)
    scenes = [world.sample(i) for i in range(n)]
    pixels = model.preprocessor.batch([s.render() for s in scenes])
    return pixels, [s.short_caption for s in scenes]


@torch.no_grad()
def recall_at_1(model, pixels, captions, keep=None) -> float:
    model.eval()
    txt = model.encode_text(model.tokenize(captions), normalize=True)
    img = model.encode_image(pixels) if keep is None else model.encode_image(pixels, keep=keep).pooled
    img = F.normalize(img.float(), dim=-1)
    return float(((txt @ img.T).argmax(1) == torch.arange(len(captions))).float().mean())


@torch.no_grad()
def masked_views(model, pixels, captions, ratios, seed: int = 0) -> dict:
    out = model.encode_image(pixels, output="attn")
    n = model.config.vision.grid_size ** 2
    scores = cls_attention_over_layers(out.attn, n)
    rows = {"all patches": recall_at_1(model, pixels, captions)}
    for r in ratios:
        rows[f"attentive {r}"] = recall_at_1(model, pixels, captions, attentive_block_keep(scores, r, 2))
        rows[f"random {r}"] = recall_at_1(model, pixels, captions,
                                          random_block_keep(len(pixels), n, r, 2, torch.Generator().manual_seed(seed)))
        rows[f"least attended {r}"] = recall_at_1(model, pixels, captions, attentive_block_keep(-scores, r, 2))
    return rows


def train_arm(mask: str, args, out_dir: str) -> tuple[object, float, list[dict]]:
    cfg = TrainConfig(init_from="shapes-tiny", data=DataConfig(source="synthetic", caption="short"),
                      loss="aclip", loss_kwargs={"mask": mask, "keep_ratio": args.keep, "total_steps": args.steps,
                                                 "crop_min": args.crop_min},
                      batch_size=args.batch, steps=args.steps, lr=args.lr, min_lr=args.lr / 10, warmup_steps=10,
                      weight_decay=0.1, precision="fp32", threads=1, log_every=20, checkpoint_every=0,
                      progress=False, seed=args.seed, out_dir=out_dir)
    t = time.time()
    result = Trainer(cfg).fit()
    return result.model, time.time() - t, result.records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--keep", type=float, default=0.25)
    p.add_argument("--crop-min", type=float, default=0.75)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout", type=int, default=400)
    p.add_argument("--out", default=str(ROOT / "experiments/results/aclip_effect.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    base = cliplab.load("shapes-tiny")
    pixels, captions = heldout(base, args.heldout)
    results = {"args": vars(args), "no_training": masked_views(base, pixels, captions, (0.25, 0.5))}
    print(json.dumps(results["no_training"]), flush=True)
    results["shapes-tiny, before fine-tuning"] = {"r1_all_patches": results["no_training"]["all patches"]}
    for mask in ("attentive", "random"):
        with tempfile.TemporaryDirectory() as out_dir:  # the run's checkpoints are not kept
            model, seconds, records = train_arm(mask, args, out_dir)
        row = {"r1_all_patches": recall_at_1(model, pixels, captions), "train_seconds_under_load": round(seconds, 1),
               "last_record": records[-1]}
        row.update({f"masked_{k}": v for k, v in masked_views(model, pixels, captions, (args.keep,)).items()
                    if k != "all patches"})
        results[f"fine-tuned, {mask} masks"] = row
        print(mask, json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
