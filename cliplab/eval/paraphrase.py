"""Caption-to-caption retrieval: do two captions of the same image land near each other?

Flickr8k gives five captions written independently for each photo: real paraphrases. For each caption of a held-out
set, the other captions of its image are the relevant ones among all held-out captions. Reported: R@1 / R@5 / R@10
(a relevant caption among the top k, the query itself excluded) and MRR (of the first relevant one).

    groups = read_caption_groups("../shared/data/flickr8k-1k/all_captions.csv")   # [(image, [captions]), ...]
    train, held_out = split_groups(groups, held_out=1000, seed=0)
    caption_retrieval(embedder, held_out)      # {"r@1": ..., "r@5": ..., "r@10": ..., "mrr": ..., "n": ...}
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F


def read_caption_groups(path: str | Path, image_column: str = "image", caption_column: str = "caption",
                        min_captions: int = 2) -> list[tuple[str, list[str]]]:
    """``[(image, captions), ...]`` in order of first appearance, from a table of ``image,caption`` rows (read by
    :func:`cliplab.data.tables.read_table_rows`: undecodable rows are skipped). Images with fewer than
    ``min_captions`` captions are left out (they have no paraphrase)."""
    from ..data.tables import read_table_rows

    table = read_table_rows(path)
    groups: dict[str, list[str]] = {}
    for row, error in zip(table.rows, table.errors):
        image, caption = row.get(image_column), row.get(caption_column)
        if error or not image or not caption or not caption.strip():
            continue
        groups.setdefault(image, []).append(caption.strip())
    return [(k, v) for k, v in groups.items() if len(v) >= min_captions]


def split_groups(groups: list[tuple[str, list[str]]], held_out: int = 1000, seed: int = 0):
    """``(train, held_out)``: a seeded shuffle of the images, the last ``held_out`` ones held out (whole groups, so no
    held-out image's caption is ever trained on)."""
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    cut = len(order) - int(held_out)
    if cut < 0:
        raise ValueError(f"held_out={held_out} > {len(groups)} groups")
    return [groups[i] for i in sorted(order[:cut])], [groups[i] for i in sorted(order[cut:])]


def retrieval_scores(emb: torch.Tensor, group_of: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """R@k and MRR for rows of ``emb`` ``[n, d]`` whose relevant rows share ``group_of`` ``[n]`` (self excluded)."""
    x = F.normalize(emb.float(), dim=-1)
    sims = x @ x.T
    sims.fill_diagonal_(float("-inf"))
    same = group_of[:, None] == group_of[None, :]
    same.fill_diagonal_(False)
    order = sims.argsort(dim=1, descending=True)
    hits = same.gather(1, order)  # [n, n]: relevant at rank r
    has = hits.any(1)
    first = torch.where(has, hits.float().argmax(1), torch.full((len(x),), len(x)))
    out = {f"r@{k}": float((first < k).float().mean()) for k in ks}
    out["mrr"] = float(torch.where(has, 1.0 / (first.float() + 1), torch.zeros(len(x))).mean())  # a miss counts 0
    out["n"] = len(x)
    return out


def caption_retrieval(embedder, groups: list[tuple[str, list[str]]], pooling=None, batch_size: int = 64) -> dict:
    """Embed every caption of ``groups`` with ``embedder`` (a :class:`cliplab.text.TextEmbedder`) and score
    caption-to-caption retrieval (module docstring)."""
    texts = [c for _, caps in groups for c in caps]
    group_of = torch.tensor([g for g, (_, caps) in enumerate(groups) for _ in caps])
    emb = embedder.encode(texts, pooling=pooling, batch_size=batch_size)
    return retrieval_scores(emb, group_of)
