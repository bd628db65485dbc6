"""DPTR ablation on scene-text word crops: word accuracy after fine-tuning on images, at equal image steps, for a
decoder pre-trained on text only (with and without ORP) and the same decoder from scratch.

Image tower: the shipped ``shapes-tiny`` CLIP, frozen (tokens after ``ln_post`` and ``proj``); text memories from its
frozen text tower. Words: the synthetic world's 16 words drawn with DejaVu fonts (:func:`word_image`).
Writes experiments/results/dptr_ablation.json and docs/img/dptr_ablation.png.

    python experiments/dptr_ablation.py [--train-per-word 8] [--pretrain-steps 200] [--finetune-steps 200]
    python experiments/dptr_ablation.py --seed 1 --tag _seed1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import cliplab
from cliplab.data.synthetic import SceneWorld
from cliplab.data.synthetic.vocabulary import WORDS
from cliplab.scenetext import dptr as D
from cliplab.scenetext.dataset import font_note, word_image

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train-per-word", type=int, default=8)
    ap.add_argument("--test-per-word", type=int, default=3)
    ap.add_argument("--pretrain-steps", type=int, default=200)
    ap.add_argument("--finetune-steps", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="", help="suffix of the results file (e.g. _seed1); the figure only without it")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    model = cliplab.load("shapes-tiny").eval()
    words = list(WORDS)
    memory = D.word_memory(model, words)
    bank = D.orp_bank(model, [SceneWorld(seed=5, word_prob=0.0).sample(i).image for i in range(32)])
    train_words = [w for w in words for _ in range(args.train_per_word)]
    test_words = [w for w in words for _ in range(args.test_per_word)]
    visual_train = D.image_tokens(model, [word_image(w, i, seed=args.seed) for i, w in enumerate(train_words)])
    visual_test = D.image_tokens(model, [word_image(w, 10_000 + i, seed=args.seed) for i, w in enumerate(test_words)])
    # how well the stand-in CLIP reads these words at all: zero-shot choice among the 16 words on the test images
    with torch.no_grad():
        test_px = torch.stack([model.preprocess(word_image(w, 10_000 + i, seed=args.seed))
                               for i, w in enumerate(test_words)])
        text = model.encode_text(model.tokenize([D.TEMPLATE.format(w) for w in words]), normalize=True)
        picks = (model.encode_image(test_px, normalize=True) @ text.t()).argmax(-1).tolist()
    zero_shot = sum(words[p] == w for p, w in zip(picks, test_words)) / len(test_words)
    print("zero-shot CLIP word accuracy", zero_shot, flush=True)
    arms = {}
    for arm in ("dptr_orp", "dptr_no_orp", "scratch"):
        torch.manual_seed(args.seed)
        decoder, fmu = D.RecognitionDecoder(memory.shape[-1]), D.FeatureMergeUnit(memory.shape[-1])
        text_acc = None
        if arm != "scratch":
            D.pretrain_text_only(decoder, memory, words, steps=args.pretrain_steps, lr=args.lr, batch_size=32,
                                 bank=bank if arm == "dptr_orp" else None, seed=args.seed)
            text_acc = D.word_accuracy(decoder, None, memory, words)
        curve = []

        def evaluate(step: int) -> None:
            if step % args.eval_every == 0:
                curve.append({"step": step, "test_acc": D.word_accuracy(decoder, fmu, visual_test, test_words),
                              "train_acc": D.word_accuracy(decoder, fmu, visual_train, train_words)})
                decoder.train(), fmu.train()

        D.finetune_on_images(decoder, fmu, visual_train, train_words, steps=args.finetune_steps, lr=args.lr,
                             batch_size=32, seed=args.seed, on_step=evaluate)
        arms[arm] = {"text_only_acc": text_acc, "curve": curve}
        print(arm, text_acc, curve[-1], f"{time.time() - t0:.0f}s", flush=True)
    out = {"args": vars(args), "fonts": font_note(), "words": words, "zero_shot_clip_word_acc": zero_shot, "arms": arms,
           "note": "measured under load on a shared 2-core CPU; accuracies are exact-match on held-out renderings"}
    (ROOT / f"experiments/results/dptr_ablation{args.tag}.json").write_text(json.dumps(out, indent=1))
    if args.tag:
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(4, 3), dpi=100)
        for arm, res in arms.items():
            ax.plot([c["step"] for c in res["curve"]], [c["test_acc"] for c in res["curve"]], marker="o", label=arm)
        ax.set_xlabel("image fine-tuning steps")
        ax.set_ylabel("held-out word accuracy")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(ROOT / "docs/img/dptr_ablation.png")
    except ImportError:  # pragma: no cover
        print("matplotlib missing: no figure")


if __name__ == "__main__":
    main()
