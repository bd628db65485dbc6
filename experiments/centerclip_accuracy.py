"""CenterCLIP on the shipped shapes-tiny: retrieval R@1 and zero-shot accuracy on the synthetic tasks, and the small-
object ("needle") colour task, at keep ratios 0.75 / 0.5 / 0.25 of the 64 patch tokens, against ToMe and random /
evenly spaced token dropping at the same token count, one reduction before block 1 and before block 3 (the paper's
half depth). A fourth control, ``random_centres``, keeps random tokens but assigns every token to its nearest kept
one, as CenterCLIP does: every patch stays represented (the stem max-skip path of shapes-tiny still sees it), only
the choice of centres differs. Writes experiments/results/centerclip_accuracy.json.

    python experiments/centerclip_accuracy.py              # both layers (24 min wall on the loaded 2-core dev box)
    python experiments/centerclip_accuracy.py --layers 1   # half of it
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

import cliplab
from cliplab.eval import load_dataset, run_task
from cliplab.eval.cache import CachedEncoder
from cliplab.vision_tokens import IndexMap, KeepTopK, TokenReducer, bipartite_assignment, encode_image_reduced
from cliplab.vision_tokens import merge_tokens, reduced_image_flops
from cliplab.vision_tokens.centerclip import CenterCLIP, SparseSampling, clustering_flops, pairwise_distances
from cliplab.vision_tokens.reducer import count_to_remove

OUT = Path(__file__).resolve().parent / "results" / "centerclip_accuracy.json"
LAYERS = (1, 3)
REMOVE = (0.25, 0.5, 0.75)  # keep ratios 0.75 / 0.5 / 0.25


class ToMeTo(TokenReducer):
    """ToMe's bipartite matching (token metric, proportional attention) repeated at one layer until ``ratio`` of the
    tokens is merged away: one matching can merge at most half the tokens, so 75% takes two (32 then 16 merges)."""

    proportional = True

    def __init__(self, ratio: float):
        self.ratio = ratio

    def reduce(self, tokens, attention, keys, text, *, sizes):
        n = tokens.shape[1]
        target = n - count_to_remove(self.ratio, n)
        index = IndexMap(torch.arange(n).expand(tokens.shape[0], -1).contiguous(), sizes)
        while tokens.shape[1] > target:
            cur = tokens.shape[1]
            r = min(cur - target, (cur + 1) // 2)
            step = bipartite_assignment(tokens, r)
            tokens = merge_tokens(tokens, index.sizes, step, cur - r)
            index = index.then(step, cur - r)
        return tokens, index.assign


class RandomCentres(TokenReducer):
    """Control: ``1 - ratio`` of the tokens chosen at random (seeded) as centres, every token assigned to its nearest
    centre (Euclidean), the centres kept; CenterCLIP with the clustering replaced by chance."""

    def __init__(self, ratio: float, seed: int = 0):
        self.ratio, self.seed = ratio, seed

    def centres(self, b: int, n: int) -> torch.Tensor:
        k = n - count_to_remove(self.ratio, n)
        g = torch.Generator().manual_seed(self.seed)
        return torch.rand(b, n, generator=g).topk(k, dim=1).indices.sort(dim=1).values

    def reduce(self, tokens, attention, keys, text, *, sizes):
        b, n, w = tokens.shape
        centres = self.centres(b, n)
        d = pairwise_distances(tokens)
        d.diagonal(dim1=1, dim2=2).fill_(-1.0)  # a centre joins itself
        assign = d.gather(1, centres.unsqueeze(-1).expand(-1, -1, n)).argmin(1)
        return tokens.gather(1, centres.unsqueeze(-1).expand(-1, -1, w)), assign


class Reduced:
    """The model with ``encode_image`` replaced by a reduced forward, for cliplab.eval's encoder."""

    def __init__(self, model, reducer, layer):
        self._model, self._reducer, self._layer = model, reducer, layer

    def __getattr__(self, name):
        return getattr(self._model, name)

    def encode_image(self, pixels, normalize=False):
        return encode_image_reduced(self._model, pixels, self._reducer, self._layer, normalize=normalize).pooled


def arms(remove: float):
    return {
        "centerclip": CenterCLIP(ratio=remove),
        "centerclip_spectral": CenterCLIP(ratio=remove, algorithm="spectral"),
        "tome": ToMeTo(remove),
        "random": KeepTopK(remove, "random"),
        "sparse": SparseSampling(ratio=remove),
        "random_centres": RandomCentres(remove),
    }


def needle_set(model, n_per_colour=12):
    """One small object (colour decides the class) on a cluttered grey scene; its patches (>= 16 of 64 pixels)."""
    from cliplab.data.synthetic import COLOURS, SceneWorld
    from cliplab.data.synthetic.tasks import zero_shot_task
    from cliplab.zeroshot import ZeroShotClassifier

    world = SceneWorld(image_size=64, seed=0)
    pixels, labels, patches = [], [], []
    for c, colour in enumerate(COLOURS):
        for j in range(n_per_colour):
            scene = world.compose([{"colour": colour, "size": "small"}], np.random.default_rng([5, c, j]),
                                  brightness="normal", clutter=True, word=False)
            pixels.append(model.preprocess(scene.render()))
            labels.append(c)
            mask = torch.tensor(np.array(scene.masks[0]), dtype=torch.float32)
            patches.append(mask.view(8, 8, 8, 8).sum((1, 3)).flatten() >= 16)
    task = zero_shot_task("colour", 1)
    clf = ZeroShotClassifier.from_prompts(model, task.prompts, task.classnames)
    return torch.stack(pixels), torch.tensor(labels), torch.stack(patches), clf


@torch.no_grad()
def needle_scores(model, reducer, layer, needle):
    pixels, labels, on_object, clf = needle
    acc = (clf.predict(encode_image_reduced(model, pixels, reducer, layer).pooled).argmax(1) == labels)
    # is the object's own token among the kept ones? (a medoid, or a kept token; ToMe merges: its token survives
    # when it is not merged away as an A token)
    tokens = model.encode_image(pixels, output="hidden").hidden[layer][:, 1:]
    _, step = reducer(tokens)
    if isinstance(reducer, CenterCLIP):  # the kept tokens are the medoids / centres
        kept = torch.zeros_like(on_object).scatter_(1, reducer.cluster(tokens)[1], True)
    elif isinstance(reducer, RandomCentres):
        kept = torch.zeros_like(on_object).scatter_(1, reducer.centres(*tokens.shape[:2]), True)
    elif isinstance(reducer, ToMeTo):
        kept = torch.ones_like(on_object)  # merging keeps every patch represented; not a token-identity measure
    else:
        kept = step >= 0
    return float(acc.float().mean()), float((kept & on_object).any(1).float().mean())


def main(layers=LAYERS):
    torch.manual_seed(0)
    model = cliplab.load("shapes-tiny").eval()
    cfg = model.config
    n, width = cfg.vision.grid_size**2, cfg.vision.width
    t0 = time.perf_counter()
    tasks = {
        "retrieval_r1": ("retrieval", "synthetic-retrieval", {"n": 100, "seed": 7}),
        "zeroshot_colour": ("zeroshot", "synthetic-zeroshot", {"kind": "colour", "n_per_class": 10, "seed": 0}),
        "zeroshot_shape": ("zeroshot", "synthetic-zeroshot", {"kind": "shape", "n_per_class": 10, "seed": 0}),
    }
    needle = needle_set(model)

    data = {name: load_dataset(d, **opts) for name, (_, d, opts) in tasks.items()}
    base = CachedEncoder(model, None)  # texts once, shared by every arm

    def score(m):
        out = {}
        for name, (task, _, _) in tasks.items():
            encoder = CachedEncoder(m, None)
            encoder.text_space = base.text_space
            met = run_task(task, data[name], encoder)["metrics"]
            out[name] = met["text_to_image"]["R@1"] if task == "retrieval" else met["top1"]
        return out

    results = {"model": "shapes-tiny", "patches": n, "layers": list(layers), "rows": []}
    full = score(model)
    with torch.no_grad():
        acc = (needle[3].predict(model.encode_image(needle[0])).argmax(1) == needle[1]).float().mean().item()
    results["full"] = {**full, "needle_colour": acc, "gflops": reduced_image_flops(cfg, [n + 1] * 6) / 1e9}
    print("full", results["full"], flush=True)
    for layer in layers:
        for remove in REMOVE:
            keep = n - count_to_remove(remove, n)
            for name, reducer in arms(remove).items():
                row = {"layer": layer, "keep_ratio": 1 - remove, "tokens_kept": keep, "arm": name}
                row.update(score(Reduced(model, reducer, layer)))
                row["needle_colour"], row["needle_token_kept"] = needle_scores(model, reducer, layer, needle)
                counts = [n + 1] * layer + [keep + 1] * (cfg.vision.layers - layer)
                extra = clustering_flops(n, width, keep, reducer.algorithm) if isinstance(reducer, CenterCLIP) else 0
                row["gflops"] = (reduced_image_flops(cfg, counts) + extra) / 1e9
                results["rows"].append(row)
                print(row, flush=True)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=1))
    print("wrote", OUT, results["seconds"], "s")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=list(LAYERS), help="reduce before these blocks")
    main(tuple(parser.parse_args().layers))
