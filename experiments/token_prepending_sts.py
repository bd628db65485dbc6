"""Token Prepending on an STS-like proxy from the synthetic caption grammar: a measurement, not a test.

Two numbers per setting (vanilla CLIP text tower, vanilla with the slot present, TP with several start/exit layers,
TP with early exit):

* **paraphrase R@1**: each short caption retrieves its paraphrase (same meaning, objects listed in the other order
  and the relation flipped: "a red circle to the left of a blue square" <-> "a blue square to the right of a red
  circle") among the paraphrases of all captions;
* **STS Spearman**: over pairs (caption, paraphrase / foil / unrelated caption), the Spearman correlation between
  cosine similarity and the graded similarity ``-len(caption_diff(a, b))`` (0 for paraphrases, 1 for one-edit foils,
  more for unrelated captions).

Uses ``shapes-tiny`` when ``cliplab.list_pretrained()`` has it (or ``--model PATH``); otherwise a random ``test-tiny``,
whose numbers mean nothing beyond showing that the pipeline runs (the script says so).

    python experiments/token_prepending_sts.py [--model PATH] [--n 300] [--seed 0]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import cliplab
from cliplab.data.synthetic import SceneWorld, caption_diff, make_foils, parse_caption, short_caption_content
from cliplab.data.synthetic.captions import short_caption_text
from cliplab.data.synthetic.vocabulary import opposite_relation
from cliplab.text_edit.token_prepending import encode_text_tp


def paraphrase(content: dict) -> str | None:
    """The same short caption with the object order reversed and the relation stated from the other side."""
    objs = content["objects"]
    if len(objs) < 2:
        return None
    rel = content.get("relation")
    new = dict(content, objects=list(reversed(objs)))
    if rel is not None:
        new["relation"] = {"subject": rel["object"], "relation": opposite_relation(rel["relation"]),
                           "object": rel["subject"]}
    return short_caption_text(new)


def build(image_size: int, n: int, seed: int):
    world = SceneWorld(image_size, seed=seed, min_objects=2, max_objects=3, word_prob=0.0)
    caps, paras, foils = [], [], []
    i = 0
    while len(caps) < n:
        scene = world.sample(i)
        i += 1
        a = short_caption_text(short_caption_content(scene))
        b = paraphrase(short_caption_content(scene))
        if b is None or b == a or caption_diff(parse_caption(a), parse_caption(b)):
            continue
        fs = [f.text for f in make_foils(scene, "short", per_kind=1, seed=seed + i)]
        caps.append(a)
        paras.append(b)
        foils.append(fs)
    return caps, paras, foils


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    def ranks(v):
        order = v.argsort(kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for val in np.unique(v):  # average ranks for ties
            idx = v == val
            r[idx] = r[idx].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    return float(np.corrcoef(rx, ry)[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a checkpoint path or name (default: shapes-tiny if available)")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    if args.model:
        model, name = cliplab.load(args.model), args.model
    elif "shapes-tiny" in cliplab.list_pretrained():
        model, name = cliplab.load("shapes-tiny"), "shapes-tiny"
    else:
        model, name = cliplab.create_model("test-tiny", seed=0), "test-tiny (random init)"
        print("NOTE: shapes-tiny is not available; running on a random test-tiny: the numbers are meaningless, "
              "this only shows the pipeline runs.")
    model.eval()
    n_layers = len(model.text.transformer.blocks)
    caps, paras, foils = build(model.config.vision.image_size, args.n, args.seed)

    rng = np.random.default_rng(args.seed)
    pairs, grades = [], []
    for k, a in enumerate(caps):
        others = [paras[k]] + foils[k] + [caps[int(j)] for j in rng.choice(len(caps), size=2, replace=False) if j != k]
        for b in others:
            pairs.append((a, b))
            grades.append(-len(caption_diff(parse_caption(a), parse_caption(b))))
    grades = np.asarray(grades, dtype=float)
    texts = sorted({t for p in pairs for t in p} | set(caps) | set(paras))
    index = {t: i for i, t in enumerate(texts)}

    settings = {"vanilla": None, "vanilla + slot (start=exit)": dict(start=n_layers, exit=n_layers)}
    for start in range(1, n_layers):
        settings[f"TP start={start} exit={n_layers}"] = dict(start=start)
    if n_layers > 2:
        settings[f"TP start=1 exit={n_layers - 1}"] = dict(start=1, exit=n_layers - 1)
        settings[f"TP start=1, early exit at {n_layers - 1}"] = dict(start=1, readout_layer=n_layers - 1)

    print(f"model: {name} ({n_layers} text blocks); {len(caps)} captions, {len(pairs)} graded pairs")
    print(f"{'setting':40s} {'paraphrase R@1':>15s} {'STS Spearman':>13s}")
    with torch.no_grad():
        for label, kw in settings.items():
            feats = []
            for i in range(0, len(texts), 256):
                chunk = texts[i: i + 256]
                if kw is None:
                    feats.append(model.encode_text(model.tokenize(chunk), normalize=True))
                else:
                    feats.append(encode_text_tp(model, chunk, normalize=True, **kw))
            f = torch.cat(feats)
            a = f[[index[t] for t in caps]]
            b = f[[index[t] for t in paras]]
            r1 = float(((a @ b.T).argmax(1) == torch.arange(len(caps))).float().mean())
            cos = np.asarray([float(f[index[x]] @ f[index[y]]) for x, y in pairs])
            print(f"{label:40s} {r1:15.3f} {spearman(cos, grades):13.3f}")


if __name__ == "__main__":
    main()
