"""Accuracy of Recoverable Compression on the shipped shapes-tiny at equal token counts (fixed-count mode), reducing
before block 4, keep ratios 0.75 / 0.5 / 0.25, against ToMe, CLS-attention top-K and random dropping:

* zero-shot top-1 on synthetic-zeroshot (shape, 8 classes x 15): the text is the class prompt, so each image is
  encoded once per class with that class's text and scored against that class only;
* caption->image R@1 on the first 32 scenes of synthetic-retrieval: the text is the query caption, so every
  (caption, image) pair is encoded with that caption (32 x 32 encodes); the same 32 images for the controls;
* the same with ``text=None`` (visual keep + merge only), to isolate the text branch;
* the LOF-adaptive mode per image (batch size 1) on 100 scenes: mean token count and cosine to the plain embedding;
* a needle check: scenes with two large objects and one small one that the text names; the share of the small
  object's patches kept as themselves, vs the same method without text, CLS top-K and random/grid sampling.

About 3-4 min on a loaded CPU.

    python experiments/recoverable_accuracy.py   # writes experiments/results/recoverable_accuracy.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import cliplab
from cliplab.data.synthetic.scene import Scene, SceneObject, object_radius
from cliplab.data.synthetic.vocabulary import COLOURS, SHAPES
from cliplab.eval.datasets import load_dataset
from cliplab.vision_tokens import KeepTopK, ToMe, TokenReducer, encode_image_reduced, keep_assignment
from cliplab.vision_tokens.recoverable_compression import RecoverableCompression, token_projector

OUT = Path(__file__).resolve().parent / "results" / "recoverable_accuracy.json"
KEEP = (0.75, 0.5, 0.25)
LAYER = 4


class GridSample(TokenReducer):
    """Uniform grid sampling: every ``stride``-th token (a control for the needle check)."""

    def __init__(self, stride: int):
        self.stride = stride

    def reduce(self, tokens, attention, keys, text, *, sizes):
        keep = torch.arange(0, tokens.shape[1], self.stride, device=tokens.device).expand(tokens.shape[0], -1)
        return tokens[:, keep[0]], keep_assignment(keep, tokens.shape[1])


def pooled(model, pixels, reducer, text=None):
    return encode_image_reduced(model, pixels, reducer, LAYER, text=text, normalize=True)


@torch.no_grad()
def main() -> None:
    t0 = time.time()
    model = cliplab.load("shapes-tiny").eval()
    project = token_projector(model)
    zs = load_dataset("synthetic-zeroshot", kind="shape", n_per_class=15, seed=0)
    ret = load_dataset("synthetic-retrieval", n=100, seed=0)
    zs_px = torch.stack([model.preprocess(it.load()) for it in zs.items])
    ret_px = torch.stack([model.preprocess(it.load()) for it in ret.items])
    classes = F.normalize(torch.stack([model.encode_texts(p, normalize=True).mean(0) for p in zs.prompts]), dim=-1)
    labels = torch.tensor(zs.labels)
    captions = model.encode_texts(ret.captions, normalize=True)
    sub, sub_caps = ret_px[:32], captions[:32]
    target = torch.arange(32)
    plain_zs, plain_sub = model.encode_image(zs_px, normalize=True), model.encode_image(sub, normalize=True)
    results = {"model": "shapes-tiny", "layer": LAYER, "plain": {
        "zeroshot_top1": (plain_zs @ classes.T).argmax(1).eq(labels).float().mean().item(),
        "r_at_1_32": (sub_caps @ plain_sub.T).argmax(1).eq(target).float().mean().item()}, "fixed": []}
    for keep in KEEP:
        ratio = 1.0 - keep
        for name, make in [("recoverable", lambda: RecoverableCompression(ratio, project=project)),
                           ("recoverable_no_text", lambda: RecoverableCompression(ratio, project=project)),
                           ("tome", lambda: ToMe(ratio=ratio, metric="tokens", proportional=True)),
                           ("cls_topk", lambda: KeepTopK(ratio)), ("random", lambda: KeepTopK(ratio, "random"))]:
            text_guided = name == "recoverable"
            if text_guided:  # one encode per (image, class) and per (caption, image)
                logits = torch.stack([(pooled(model, zs_px, make(), classes[c].expand(len(zs_px), -1)).pooled
                                       * classes[c]).sum(-1) for c in range(len(classes))], dim=1)
                sims = torch.stack([(pooled(model, sub, make(), sub_caps[q].expand(32, -1)).pooled
                                     * sub_caps[q]).sum(-1) for q in range(32)])
                counts = pooled(model, sub[:1], make(), sub_caps[:1]).extras["tokens_per_layer"]
            else:
                out = pooled(model, zs_px, make())
                logits = out.pooled @ classes.T
                sims = sub_caps @ pooled(model, sub, make()).pooled.T
                counts = out.extras["tokens_per_layer"]
            row = {"keep": keep, "method": name, "tokens_per_layer": counts,
                   "zeroshot_top1": logits.argmax(1).eq(labels).float().mean().item(),
                   "r_at_1_32": sims.argmax(1).eq(target).float().mean().item()}
            results["fixed"].append(row)
            print(row, flush=True)
    # the paper's LOF-adaptive counts, one image at a time, text = the image's own caption
    plain_ret = model.encode_image(ret_px, normalize=True)
    counts, cos = [], []
    for i in range(len(ret_px)):
        out = pooled(model, ret_px[i:i + 1], RecoverableCompression(project=project), captions[i:i + 1])
        counts.append(out.extras["tokens_per_layer"][-1] - 1)
        cos.append(float((out.pooled * plain_ret[i]).sum()))
    results["adaptive"] = {"layer": LAYER, "mean_tokens": float(np.mean(counts)), "min_tokens": min(counts),
                           "max_tokens": max(counts), "mean_cos_to_plain": float(np.mean(cos))}
    print(results["adaptive"], flush=True)
    results["needle"] = needle(model, project)
    results["seconds"] = round(time.time() - t0, 1)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=1))
    print(f"wrote {OUT} in {results['seconds']} s")


def needle(model, project, n: int = 24) -> dict:
    """Share of the named small object's patches kept as themselves (not merged, not dropped) at 25% kept."""
    rng = np.random.default_rng(0)
    scenes, texts = [], []
    for _ in range(n):
        c, s = rng.permutation(list(COLOURS))[:3], rng.permutation(list(SHAPES))[:3]
        objs = (SceneObject(s[0], c[0], "large", "plain", 18.0, 20.0, object_radius("large", 64)),
                SceneObject(s[1], c[1], "large", "plain", 44.0, 42.0, object_radius("large", 64)),
                SceneObject(s[2], c[2], "small", "plain", 50.0, 12.0, object_radius("small", 64)))
        scenes.append(Scene(64, objs))
        texts.append(f"a small {c[2]} {s[2]}")
    pixels = torch.stack([model.preprocess(sc.render()) for sc in scenes])
    masks = torch.tensor(np.stack([sc.masks[2] for sc in scenes]))
    patch = masks.view(n, 8, 8, 8, 8).permute(0, 1, 3, 2, 4).reshape(n, 64, 64).float().mean(-1) > 0.25
    text = model.encode_texts(texts, normalize=True)
    out = {}
    for keep in (0.5, 0.25):
        ratio = 1.0 - keep
        for name, reducer, t in [("recoverable", RecoverableCompression(ratio, project=project), text),
                                 ("recoverable_no_text", RecoverableCompression(ratio, project=project), None),
                                 ("text_only_recovery", RecoverableCompression(ratio, project=project,
                                                                               vision_share=0.0), text),
                                 ("cls_topk", KeepTopK(ratio), None), ("random", KeepTopK(ratio, "random"), None),
                                 ("grid", GridSample(round(1 / keep)), None)]:
            imap = encode_image_reduced(model, pixels, reducer, LAYER, text=t).extras["index_map"]
            single = (imap.assign >= 0) & (imap.sizes.gather(1, imap.assign.clamp(min=0)) == 1)
            out[f"{name}@{keep}"] = ((single & patch).sum() / patch.sum()).item()
    # does the text score find the object at all? mean rank percentile of its patches (0 = top, 0.5 = chance)
    hidden = model.encode_image(pixels, output="hidden").hidden[LAYER][:, 1:]
    s = (F.normalize(project(hidden), dim=-1) @ text.unsqueeze(-1)).squeeze(-1)
    rank = s.argsort(1, descending=True).argsort(1).float() / 64
    out["text_score_rank_percentile_of_needle"] = rank[patch].mean().item()
    print(out, flush=True)
    return out


if __name__ == "__main__":
    main()
