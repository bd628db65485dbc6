"""The reference FDP has to beat: plain CLIP scene-text retrieval on clean and cluttered SceneTextWorld scenes.

Queries are the dictionary words present in the gallery; an image is relevant when the query is one of its words;
scores are cosines between the frozen ``shapes-tiny`` image embedding and the text embedding of
``'the word "{q}"'``. Also reports the confuser statistic FDP's distractor loss targets: for each query, how often an
image holding a near-spelling (edit distance 1, no exact match) outranks an image holding the query.
Writes experiments/results/fdp_baseline.json.

    python experiments/fdp_baseline.py [--images 120]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import cliplab
from cliplab.scenetext import fdp
from cliplab.scenetext.dataset import DICTIONARY, SceneTextWorld, font_note

ROOT = Path(__file__).resolve().parents[1]


def confuser_win_rate(scores: torch.Tensor, queries, scenes) -> float:
    wins, total = 0, 0
    for qi, q in enumerate(queries):
        pos = [i for i, s in enumerate(scenes) if q in s.words]
        conf = [i for i, s in enumerate(scenes) if q not in s.words and any(fdp.levenshtein(q, w) == 1 for w in s.words)]
        for p in pos:
            for c in conf:
                wins += int(scores[qi, c] > scores[qi, p])
                total += 1
    return wins / total if total else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=120)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = cliplab.load("shapes-tiny").eval()
    out = {"args": vars(args), "fonts": font_note(), "template": 'the word "{}"'}
    for cluttered in (False, True):
        scenes = SceneTextWorld(seed=args.seed, cluttered=cluttered, words_per_scene=(1, 2)).scenes(args.images)
        queries = [w for w in DICTIONARY if any(w in s.words for s in scenes)]
        with torch.no_grad():
            img = torch.cat([model.encode_image(torch.stack([model.preprocess(s.image) for s in scenes[i:i + 40]]),
                                                normalize=True) for i in range(0, len(scenes), 40)])
            txt = model.encode_text(model.tokenize([f'the word "{q}"' for q in queries]), normalize=True)
        scores = txt @ img.t()
        relevant = torch.tensor([[q in s.words for s in scenes] for q in queries])
        shuffled = scores[:, torch.randperm(len(scenes), generator=torch.Generator().manual_seed(0))]
        out["cluttered" if cluttered else "clean"] = {
            "queries": len(queries), "images": len(scenes),
            "plain_clip_mAP": fdp.mean_average_precision(scores, relevant),
            "random_ranking_mAP": fdp.mean_average_precision(shuffled, relevant),
            "confuser_outranks_true_rate": confuser_win_rate(scores, queries, scenes),
        }
        print(out["cluttered" if cluttered else "clean"], flush=True)
    (ROOT / "experiments/results/fdp_baseline.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
