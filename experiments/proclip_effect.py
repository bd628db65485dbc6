"""ProCLIP on the synthetic world with MiniLM as the LLM embedder and the shipped shapes-tiny.

    python experiments/proclip_effect.py --train 400 --test 100 --distill-steps 300 --tune-steps 40

Stage 1 (adapter only) distils shapes-tiny's text embeddings of short captions into MiniLM + adapter; stage 2 tunes
adapter + image tower on long captions with the CLIP loss, with self-distillation (``--weight``) and without (0),
same seed/data/steps. Held-out metrics: short- and long-caption text->image R@1 with the LLM tower; the shipped
text tower's short-caption R@1 against the tuned image tower (how much the image side drifted from CLIP's space);
mean cosine of tuned to original image features. Writes experiments/results/proclip_effect.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import cliplab
import cliplab.text as text
from cliplab.data import SceneWorld
from cliplab.longtext.proclip import contrastive_tune, distill_text, proclip_model

ROOT = Path(__file__).resolve().parents[1]


def r1(t, i):
    return float(((F.normalize(t, dim=-1) @ F.normalize(i, dim=-1).T).argmax(1) == torch.arange(len(t))).float().mean())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--test", type=int, default=100)
    ap.add_argument("--distill-steps", type=int, default=300)
    ap.add_argument("--tune-steps", type=int, default=40)
    ap.add_argument("--tune-lr", type=float, default=3e-5)
    ap.add_argument("--weight", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="proclip_effect.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    world = SceneWorld(image_size=64, seed=11)
    base = cliplab.load("shapes-tiny").eval()
    train = [world.sample(i) for i in range(args.train)]
    test = [world.sample(100_000 + i) for i in range(args.test)]
    train_px = base.preprocessor.batch([s.render() for s in train])
    test_px = base.preprocessor.batch([s.render() for s in test])
    short = [s.short_caption for s in test]
    long = [s.long_caption for s in test]
    res = {k: v for k, v in vars(args).items()}
    res["note"] = "MiniLM as the LLM embedder; measured under load (shared 2-core machine)"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img0 = base.encode_image(test_px)
        clip_short = base.encode_text(base.tokenize(short))
        res["clip_text_tower"] = {"short_r1": r1(clip_short, img0),
                                  "long_r1_cut_at_77": r1(base.encode_text(base.tokenize(long)), img0)}
    print(res["clip_text_tower"], flush=True)
    emb = text.load_embedder("all-MiniLM-L6-v2")
    model = proclip_model(copy.deepcopy(base), emb)
    model.cache_texts(short + long)

    def measure(m):
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = m.encode_image(test_px)
            return {"short_r1": r1(m.encode_texts(short), img), "long_r1": r1(m.encode_texts(long), img),
                    "shipped_text_tower_short_r1": r1(clip_short, img),
                    "image_cos_to_original": float((F.normalize(img, dim=-1) * F.normalize(img0, dim=-1))
                                                   .sum(-1).mean())}

    res["untrained_adapter"] = measure(model)
    fit1 = distill_text(model, [s.short_caption for s in train] + [s.long_caption for s in train],
                        steps=args.distill_steps, batch_size=64, lr=2e-3, progress=True)
    res["stage1"] = measure(model) | {"final_loss": sum(fit1.losses[-10:]) / 10}
    print("stage1", res["stage1"], flush=True)
    train_long = [s.long_caption for s in train]
    for name, w in (("stage2_self_distill", args.weight), ("stage2_no_self_distill", 0.0)):
        m = copy.deepcopy(model)
        m.embedder = emb
        fit2 = contrastive_tune(m, train_px, train_long, distill_weight=w, steps=args.tune_steps,
                                batch_size=args.batch_size, lr=args.tune_lr, progress=True)
        res[name] = measure(m) | {"final_loss": sum(fit2.losses[-5:]) / 5}
        print(name, res[name], flush=True)
    res["seconds"] = time.time() - t0
    print(json.dumps(res, indent=2))
    (ROOT / "experiments" / "results" / args.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
