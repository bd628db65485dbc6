"""Every text embedder x every pooling on STS-B test (Spearman x 100 of cosine vs gold): the table in
docs/text_models.md. A measurement, not a test.

    python experiments/sts_table.py [--split test] [--embedders ...] [--out experiments/results/sts-table.json]

Poolings without a prompt share one forward pass per embedder (the token states are pooled every way); PromptEOL
runs its own pass, since it changes the input.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import cliplab.text as text
from cliplab.eval.sts import evaluate_sts, read_sts, sts_scores

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "stsb"


@torch.no_grad()
def pooled_every_way(emb, sentences: list[str], poolings: list[str]) -> dict[str, torch.Tensor]:
    """One forward pass, every prompt-free pooling."""
    batch = emb.tokenize(sentences)
    out = {p: torch.empty(len(sentences), emb.dim) for p in poolings}
    for rows, sub in emb.iter_batches(batch, 64):
        states = emb.token_states(sub).tokens
        for p in poolings:
            out[p][rows] = text.get_pooling(p)(states, sub.mask).float()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="test", choices=["train", "dev", "test"])
    ap.add_argument("--embedders", nargs="+", default=["all-MiniLM-L6-v2", "smollm2-135m", "shapes-tiny"])
    ap.add_argument("--out", default=None, help="write the table as JSON here")
    args = ap.parse_args()
    data = read_sts(DATA / f"sts-{args.split}.csv")
    unique = list(dict.fromkeys(data.first + data.second))
    where = {s: i for i, s in enumerate(unique)}
    plain = [p for p in text.list_poolings() if text.get_pooling(p).template is None]
    table = {}
    for name in args.embedders:
        emb = text.load_embedder(name)
        t = time.time()
        pooled = pooled_every_way(emb, unique, plain)
        row = {}
        for p, vecs in pooled.items():
            row[p] = sts_scores(vecs[[where[s] for s in data.first]], vecs[[where[s] for s in data.second]],
                                data.scores)["spearman"]
        row["prompteol"] = evaluate_sts(emb, data, "prompteol")["spearman"]
        table[name] = row
        print(name, {k: round(v, 2) for k, v in row.items()}, f"({time.time() - t:.0f} s)", flush=True)
    cols = plain + ["prompteol"]
    print(f"\n| embedder | {' | '.join(cols)} |\n|---|" + "---:|" * len(cols))
    for name, row in table.items():
        best = max(row.values())
        cells = [f"**{row[c]:.2f}**" if row[c] == best else f"{row[c]:.2f}" for c in cols]
        print(f"| {name} | {' | '.join(cells)} |")
    print(json.dumps(table, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(table, indent=2) + "\n")


if __name__ == "__main__":
    main()
