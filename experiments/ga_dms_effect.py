"""GA-DMS: fine-tuning on noisy captions with gradient-attention dual masking, random masking, or none
(docs/methods/ga_dms.md).

Every training caption (synthetic short captions) also names the colour and shape of an object that is not in the
image (``synthetic-noisy``, ``noise="objects"``). Three arms fine-tune the shipped ``shapes-tiny`` with the same
seed, data, steps and batch: SDM alone with no masking, SDM + token prediction with random masks (the same expected
count per caption), and GA-DMS. Evaluated on held-out scenes: text->image R@1 with noisy and with clean captions,
and the AUC of the importance scores (injected noise words below the caption's real attribute words).

    python experiments/ga_dms_effect.py --steps 60 --batch 32         # results/ga_dms_effect.json
    python experiments/ga_dms_effect.py --steps 60 --batch 32 \
        --only "GA-DMS noise masking only (no MTP);random noise masking only (no MTP)"    # adds two arms
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import cliplab
from cliplab.data import SceneWorld
from cliplab.data.synthetic.vocabulary import COLOURS, SHAPES, SIZES, TEXTURES
from cliplab.objectives.ga_dms import gradient_attention_scores, inject_noise, valid_word_mask
from cliplab.train import DataConfig, TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
ARMS = {"no masking (SDM only)": {"masking": "none", "mlm_weight": 0.0},
        "random masking": {"masking": "random"},
        "GA-DMS": {"masking": "gradient"},
        "GA-DMS noise masking only (no MTP)": {"masking": "gradient", "mlm_weight": 0.0},
        "random noise masking only (no MTP)": {"masking": "random", "mlm_weight": 0.0}}
FIRST_RUN = ("no masking (SDM only)", "random masking", "GA-DMS")


def heldout(model, n: int, seed: int = 7):
    world = SceneWorld(image_size=64, seed=seed)
    scenes = [world.sample(i) for i in range(n)]
    rng = np.random.default_rng(1)
    noisy, positions = zip(*(inject_noise(s.short_caption, rng, 1, "objects", s) for s in scenes))
    pixels = model.preprocessor.batch([s.render() for s in scenes])
    return pixels, [s.short_caption for s in scenes], list(noisy), list(positions)


@torch.no_grad()
def recall_at_1(model, pixels, captions) -> float:
    model.eval()
    txt = model.encode_text(model.tokenize(captions), normalize=True)
    img = F.normalize(model.encode_image(pixels).float(), dim=-1)
    return float(((txt @ img.T).argmax(1) == torch.arange(len(captions))).float().mean())


def noise_auc(model, pixels, clean, noisy) -> float:
    """AUC of importance: injected (colour, shape) tokens below the caption's own attribute tokens."""
    model.eval()
    with torch.no_grad():
        img = model.encode_image(pixels)
    ids = model.tokenize(noisy).ids
    scores = gradient_attention_scores(model, ids, img, layers=8)
    valid = valid_word_mask(ids, model.text.eot_index(ids))
    base = model.tokenize(clean).ids
    is_noise = torch.zeros_like(ids, dtype=torch.bool)
    for r in range(len(ids)):  # the two inserted words are the first tokens where the captions differ
        i = int((base[r] != ids[r]).nonzero()[0])
        is_noise[r, i: i + 2] = True
    words = list(SHAPES) + list(COLOURS) + list(SIZES) + list(TEXTURES) + [s + "s" for s in SHAPES] + \
        [s + "es" for s in SHAPES]
    content_ids = set(model.tokenize(words).ids[:, 1].tolist())
    is_content = torch.tensor([[t in content_ids for t in row] for row in ids.tolist()]) & ~is_noise
    a, b = scores[valid & is_noise], scores[valid & is_content]
    return float((a[:, None] < b[None]).float().mean() + 0.5 * (a[:, None] == b[None]).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout", type=int, default=400)
    p.add_argument("--out", default=str(ROOT / "experiments/results/ga_dms_effect.json"))
    p.add_argument("--only", default=None, help="run only these arms (';'-separated names) and add them to --out")
    args = p.parse_args()
    torch.set_num_threads(1)
    base = cliplab.load("shapes-tiny")
    pixels, clean, noisy, _ = heldout(base, args.heldout)
    results = {"args": vars(args), "shapes-tiny (start)": {
        "r1_noisy": recall_at_1(base, pixels, noisy), "r1_clean": recall_at_1(base, pixels, clean),
        "noise_auc": noise_auc(base, pixels, clean, noisy)}}
    print(json.dumps(results), flush=True)
    arms = {k: ARMS[k] for k in (args.only.split(";") if args.only else FIRST_RUN)}
    if args.only and Path(args.out).exists():  # keep the arms run before
        results = {**json.loads(Path(args.out).read_text()), "extra runs": [vars(args)]}
    for arm, kwargs in arms.items():
        out_dir = tempfile.mkdtemp()  # the run's checkpoints are not kept
        cfg = TrainConfig(init_from="shapes-tiny", loss="ga_dms", loss_kwargs=kwargs,
                          data=DataConfig(source="synthetic-noisy", caption="short",
                                          options={"noise_count": 1, "noise": "objects"}),
                          batch_size=args.batch, steps=args.steps, lr=args.lr, min_lr=args.lr / 10, warmup_steps=10,
                          weight_decay=0.1, precision="fp32", threads=1, log_every=20, checkpoint_every=0,
                          progress=False, seed=args.seed, out_dir=out_dir)
        t = time.time()
        result = Trainer(cfg).fit()
        model = result.model
        row = {"loss_kwargs": kwargs, "train_seconds_under_load": round(time.time() - t, 1),
               "r1_noisy": recall_at_1(model, pixels, noisy), "r1_clean": recall_at_1(model, pixels, clean),
               "noise_auc": noise_auc(model, pixels, clean, noisy), "last_record": result.records[-1]}
        results[arm] = row
        shutil.rmtree(out_dir, ignore_errors=True)
        print(arm, json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
