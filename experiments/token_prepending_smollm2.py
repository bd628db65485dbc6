"""Token Prepending on the real SmolLM2-135M-Instruct and STS-B: a measurement, not a test.

The official configurations run TP in the first blocks only and read an earlier layer (Llama-2-7B: TP before
blocks 1..6, ``exit=7`` of 32, readout layer 27). This script picks ``exit`` and the readout layer on STS-B **dev**
(PromptEOL, the official prompt) and reports the choice on **test**, each TP setting beside its control: the same
prompt, the same readout layer, no TP (``start == exit``: the vanilla forward without the slot is the plain
embedder, reported as well).

    python experiments/token_prepending_smollm2.py [--precision fp32] [--exits 3 7 30] [--layers -1 25 28]
    python experiments/token_prepending_smollm2.py --exit 3 --layer 28 --out experiments/results/x.json  # test only

Prints one line per setting (with Spearman per STS-B genre) and a JSON summary at the end; the runs quoted in
docs/text_models.md are in experiments/results/.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import cliplab.text as text
from cliplab.eval.sts import evaluate_sts, read_sts
from cliplab.text.causal import DecoderText
from cliplab.text_edit.token_prepending import TokenPrependingEmbedder

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "stsb"


class EarlyExit:
    """The plain decoder embedder read at ``layer`` (the control for a TP setting with the same readout)."""

    def __init__(self, embedder, layer: int):
        self.embedder, self.layer = embedder, layer
        self.name, self.default_pooling, self.dim = f"{embedder.name}@{layer}", "prompteol", embedder.dim

    @torch.no_grad()
    def encode(self, texts, pooling=None, normalize=False, batch_size=64):
        pool = text.get_pooling(pooling or "prompteol")
        lm = DecoderText(self.embedder.model)
        layer = self.layer % (lm.n_layers + 1)
        batch = self.embedder.tokenize(self.embedder.prepare_texts(texts, pool))
        out = torch.empty(len(texts), self.dim)
        for rows, sub in self.embedder.iter_batches(batch, batch_size):
            hidden = self.embedder.token_states(sub, output="hidden").hidden
            r = torch.arange(len(rows))
            out[rows] = lm.readout(hidden[layer][r, sub.last_index], layer).float()
        return out


def run(name, embedder, data, pooling="prompteol"):
    t = time.time()
    res = evaluate_sts(embedder, data, pooling)
    genres = "  ".join(f"{g.split('-')[-1]} {r['spearman']:.2f}" for g, r in res.get("by_genre", {}).items())
    print(f"{name:<44} spearman {res['spearman']:6.2f}  pearson {res['pearson']:6.2f}  [{genres}]  "
          f"({time.time() - t:.0f} s)", flush=True)
    return {"spearman": res["spearman"], "by_genre": {g: r["spearman"] for g, r in res.get("by_genre", {}).items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--exits", type=int, nargs="+", default=[3, 7, 30])
    ap.add_argument("--layers", type=int, nargs="+", default=[-1, 25, 28])
    ap.add_argument("--exit", type=int, default=None, help="skip the dev search: use this exit (with --layer)")
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--out", default=None, help="write the summary JSON here")
    args = ap.parse_args()
    emb = text.load_embedder("smollm2-135m", precision=args.precision)
    dev, test = read_sts(DATA / "sts-dev.csv"), read_sts(DATA / "sts-test.csv")
    summary = {"dev": {}, "test": {}}
    if args.exit is None:
        for layer in args.layers:
            summary["dev"][f"plain@{layer}"] = run(f"dev plain prompteol @{layer}", EarlyExit(emb, layer), dev)
            for ex in args.exits:
                tp = TokenPrependingEmbedder(emb, start=1, exit=ex, readout_layer=layer)
                summary["dev"][f"tp exit={ex}@{layer}"] = run(f"dev TP exit={ex} prompteol @{layer}", tp, dev)
        best = max((k for k in summary["dev"] if k.startswith("tp")), key=lambda k: summary["dev"][k]["spearman"])
        ex, layer = (int(v) for v in best[len("tp exit="):].split("@"))
        print(f"chosen on dev: exit={ex}, readout layer {layer}")
    else:
        ex, layer = args.exit, args.layer if args.layer is not None else -1
    summary["chosen"] = {"exit": ex, "layer": layer}
    # each TP setting beside its controls: no slot at all (the plain embedder), and the slot without TP
    # (start == exit: the slot is there but never overwritten)
    for pooling in ("prompteol", "last"):
        if pooling == "prompteol":
            summary["test"]["plain@-1 prompteol"] = run("test plain prompteol @-1", EarlyExit(emb, -1), test)
        summary["test"][f"plain@{layer} {pooling}"] = run(f"test plain {pooling} @{layer}", EarlyExit(emb, layer),
                                                         test, pooling)
        slot = TokenPrependingEmbedder(emb, start=1, exit=1, readout_layer=layer)
        summary["test"][f"slot only@{layer} {pooling}"] = run(f"test slot only {pooling} @{layer}", slot, test,
                                                             pooling)
        tp = TokenPrependingEmbedder(emb, start=1, exit=ex, readout_layer=layer)
        summary["test"][f"tp exit={ex}@{layer} {pooling}"] = run(f"test TP exit={ex} {pooling} @{layer}", tp, test,
                                                                pooling)
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
