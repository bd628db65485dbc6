"""Accuracy of TCC on the shipped shapes-tiny at equal token counts: caption->image R@1 on synthetic-retrieval and
zero-shot top-1 on synthetic-zeroshot (shape), images encoded with encode_image_reduced, TCC (fixed-ratio mode) vs
ToMe, CLS-attention top-K and random dropping (KeepTopK) at keep ratios 0.75 / 0.5 / 0.25, reducing before block 2
and before block 4; plus TCC's adaptive mode per image (batch size 1) against the same controls at each image's
own count. About 2-3 min on a loaded CPU.

    python experiments/tcc_accuracy.py   # writes experiments/results/tcc_accuracy.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import cliplab
from cliplab.eval.datasets import load_dataset
from cliplab.vision_tokens import KeepTopK, ToMe, encode_image_reduced
from cliplab.vision_tokens.tcc_compress import TCCCompress

OUT = Path(__file__).resolve().parent / "results" / "tcc_accuracy.json"
KEEP = (0.75, 0.5, 0.25)
LAYERS = (2, 4)


def reducers(ratio: float) -> dict:
    return {"tcc": TCCCompress(ratio), "tome": ToMe(ratio=ratio, metric="tokens", proportional=True),
            "cls_topk": KeepTopK(ratio, "cls_attention"), "random": KeepTopK(ratio, "random")}


def encode(model, pixels, reducer, layer):
    out = [encode_image_reduced(model, chunk, reducer, layer, normalize=True) for chunk in pixels.split(128)]
    return torch.cat([o.pooled for o in out]), out[0].extras["tokens_per_layer"]


def r_at_1(images, texts) -> float:
    return (texts @ images.T).argmax(1).eq(torch.arange(len(texts))).float().mean().item()


def top1(images, classes, labels) -> float:
    return (images @ classes.T).argmax(1).eq(labels).float().mean().item()


@torch.no_grad()
def main() -> None:
    t0 = time.time()
    torch.manual_seed(0)
    model = cliplab.load("shapes-tiny").eval()
    ret = load_dataset("synthetic-retrieval", n=100, seed=0)
    zs = load_dataset("synthetic-zeroshot", kind="shape", n_per_class=15, seed=0)
    ret_px = torch.stack([model.preprocess(it.load()) for it in ret.items])
    zs_px = torch.stack([model.preprocess(it.load()) for it in zs.items])
    captions = model.encode_texts(ret.captions, normalize=True)
    classes = F.normalize(torch.stack([model.encode_texts(p, normalize=True).mean(0) for p in zs.prompts]), dim=-1)
    labels = torch.tensor(zs.labels)
    plain_ret, plain_zs = model.encode_image(ret_px, normalize=True), model.encode_image(zs_px, normalize=True)
    results = {"model": "shapes-tiny", "patches": 64, "retrieval": "synthetic-retrieval n=100 seed=0 (caption->image)",
               "zeroshot": "synthetic-zeroshot kind=shape n_per_class=15 (8 classes, dataset prompts)",
               "plain": {"r_at_1": r_at_1(plain_ret, captions), "zeroshot_top1": top1(plain_zs, classes, labels)},
               "fixed": [], "adaptive": []}
    for layer in LAYERS:
        for keep in KEEP:
            for name, reducer in reducers(1.0 - keep).items():
                img, counts = encode(model, ret_px, reducer, layer)
                zimg, _ = encode(model, zs_px, reducer, layer)
                results["fixed"].append({
                    "layer": layer, "keep": keep, "method": name, "tokens_per_layer": counts,
                    "r_at_1": r_at_1(img, captions), "zeroshot_top1": top1(zimg, classes, labels),
                    "cos_to_plain": (img * plain_ret).sum(-1).mean().item()})
                print(layer, keep, name, {k: round(v, 3) for k, v in results["fixed"][-1].items()
                                          if isinstance(v, float)}, flush=True)
    # adaptive mode: one image at a time (the paper's per-image count); controls at each image's own count
    for layer, threshold in [(4, 0.8), (4, 0.9)]:
        rows = {"tcc_adaptive": [], "cls_topk": [], "random": []}
        kept = []
        for i in range(len(ret_px)):
            px = ret_px[i:i + 1]
            tcc = TCCCompress(threshold=threshold)
            rows["tcc_adaptive"].append(encode_image_reduced(model, px, tcc, layer, normalize=True).pooled)
            k = int(tcc.last_counts[0])
            kept.append(k)
            ratio = 1.0 - k / 64
            rows["cls_topk"].append(encode_image_reduced(model, px, KeepTopK(ratio), layer, normalize=True).pooled)
            rows["random"].append(encode_image_reduced(model, px, KeepTopK(ratio, "random", seed=i), layer,
                                                       normalize=True).pooled)
        entry = {"layer": layer, "threshold": threshold, "mean_kept": sum(kept) / len(kept), "min_kept": min(kept),
                 "max_kept": max(kept)}
        for name, feats in rows.items():
            img = torch.cat(feats)
            entry[name] = {"r_at_1": r_at_1(img, captions), "cos_to_plain": (img * plain_ret).sum(-1).mean().item()}
        results["adaptive"].append(entry)
        print(entry, flush=True)
    results["seconds"] = round(time.time() - t0, 1)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=1))
    print(f"wrote {OUT} in {results['seconds']} s")


if __name__ == "__main__":
    main()
