"""Time to build a zero-shot classifier: C classes x T templates on a random ViT-B-32 (CPU by default).

Not a test; prints one Markdown table row for the record.

    python benchmarks/zeroshot_build.py [--arch ViT-B-32-quickgelu] [--classes 1000] [--templates 80] [--batch-size 256]

Class names and templates are ImageNet's (../shared/data/clip-prompts/imagenet_classes_templates.json) when present,
else made-up names with cliplab's generic templates repeated with suffixes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import cliplab
from cliplab.zeroshot import ZeroShotClassifier, load_templates

IMAGENET = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "clip-prompts" / "imagenet_classes_templates.json"


def prompts(n_classes: int, n_templates: int) -> tuple[list[str], list[str]]:
    if IMAGENET.exists():
        data = json.loads(IMAGENET.read_text())
        classes, templates = data["classes"], data["templates"]
    else:
        classes = [f"object number {i}" for i in range(1000)]
        base = load_templates("generic")
        templates = [f"{t} (variant {i})" for i in range(7) for t in base]
    return classes[:n_classes], templates[:n_templates]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="ViT-B-32-quickgelu")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--templates", type=int, default=80)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()

    classes, templates = prompts(args.classes, args.templates)
    model = cliplab.create_model(args.arch, seed=0).to(args.device).eval()
    t0 = time.perf_counter()
    clf = ZeroShotClassifier.from_classnames(model, classes, templates, batch_size=args.batch_size,
                                             progress=args.progress)
    if args.device != "cpu":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    n = len({t.replace("{}", c) for c in classes for t in templates})  # what is encoded after de-duplication
    print("| arch | classes x templates | unique prompts | device | threads | seconds | prompts/s |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.arch} | {len(classes)} x {len(templates)} | {n} | {args.device} | {torch.get_num_threads()} "
          f"| {dt:.1f} | {n / dt:.0f} |")
    assert clf.weights.shape == (len(classes), model.config.embed_dim)


if __name__ == "__main__":
    main()
