"""FDP trained on cluttered SceneTextWorld scenes against its controls, on a held-out cluttered gallery.

Per seed ``s`` (training scenes seed ``s + 1``, gallery seed ``s``), runs (same training scenes, seed, steps
and batches): ``fdp`` (focus bias + map loss + distractor KL, the paper's
trainable parts: prompts, cross-attention, focus head at lr 2e-3, last block attention + image projection at 1e-4),
``control`` (the same training without the focus bias/map loss and without the distractor loss), ``fdp_wide`` and
``control_wide`` (the whole last block, ``ln_post`` and the projection trainable at lr 1e-3: more than FDP unfreezes,
to see whether the null is only a capacity limit), ``fdp_no_map_loss`` (FDP without the balanced-BCE map loss: the
control for the focus map's AUC at finding text patches, also reported). Reference: plain CLIP with ``'the word "{q}"'``.
Writes experiments/results/fdp_retrieval.json.

    python experiments/fdp_retrieval.py [--train 600] [--steps 300] [--gallery 120] [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import cliplab
from cliplab.scenetext import fdp
from cliplab.scenetext.dataset import DICTIONARY, SceneTextWorld, font_note

ROOT = Path(__file__).resolve().parents[1]
RUNS = {
    "fdp": dict(),
    "control": dict(focus=False, distractor=False),
    "fdp_no_map_loss": dict(map_loss=False),
    "fdp_wide": dict(image_parts=("attn", "mlp", "ln", "proj"), image_lr=1e-3),
    "control_wide": dict(image_parts=("attn", "mlp", "ln", "proj"), image_lr=1e-3, focus=False, distractor=False),
}


def study(seed: int, n_train: int, steps: int, n_gallery: int) -> dict:
    train = SceneTextWorld(seed=seed + 1, cluttered=True).scenes(n_train)
    gallery = SceneTextWorld(seed=seed, cluttered=True).scenes(n_gallery)  # seed 0: fdp_baseline.py's gallery
    queries = fdp.gallery_queries(gallery, DICTIONARY)
    model = cliplab.load("shapes-tiny").eval()
    plain = fdp.plain_clip_scores(model, gallery, queries)
    out = {"queries": len(queries), "images": len(gallery),
           "plain_clip": fdp.retrieval_report(plain, queries, gallery),
           "random_ranking": fdp.retrieval_report(
               plain[:, torch.randperm(len(gallery), generator=torch.Generator().manual_seed(0))], queries, gallery)}
    print(seed, "plain", out["plain_clip"], flush=True)
    for name, kwargs in RUNS.items():
        model = cliplab.load("shapes-tiny").eval()  # each run starts from the shipped weights
        start = time.time()
        trained, log = fdp.train_fdp(model, train, vocabulary=DICTIONARY, steps=steps, seed=seed, **kwargs)
        feats = trained.encode_images(fdp.scene_pixels(model, gallery))
        report = fdp.retrieval_report(trained.scores(feats, queries), queries, gallery)
        if trained.focus.enabled:
            report["focus_map_auc"] = fdp.focus_map_auc(trained, gallery)
        last = torch.tensor([row[1:] for row in log[-20:]]).mean(0).tolist()
        out[name] = {**report, "options": {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()},
                     "final_loss_total_ce_kl_bce": last, "seconds_under_load": round(time.time() - start, 1)}
        print(seed, name, out[name], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=600)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--gallery", type=int, default=120)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = {"args": vars(args), "fonts": font_note(), "chance_ce": float(torch.log(torch.tensor(32.0))),
           "seeds": {str(s): study(s, args.train, args.steps, args.gallery) for s in args.seeds}}
    (ROOT / "experiments/results/fdp_retrieval.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
