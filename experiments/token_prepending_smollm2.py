"""Token Prepending on the real SmolLM2-135M-Instruct and STS-B: a measurement, not a test.

The official configurations run TP in the first blocks only and read an earlier layer (Llama-2-7B: TP before
blocks 1..6, ``exit=7`` of 32, readout layer 27). This script picks ``exit`` and the readout layer on STS-B **dev**
(PromptEOL, the official prompt) and reports the choice on **test**, each TP setting beside its control: the same
prompt, the same readout layer, no TP (``start == exit``: the vanilla forward without the slot is the plain
embedder, reported as well).

    python experiments/token_prepending_smollm2.py [--precision fp32] [--exits 3 7 30] [--layers -1 25 28]

Prints one line per setting and a JSON summary at the end (docs/text_models.md quotes it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import cliplab.text as text
from cliplab.eval.sts import evaluate_sts, read_sts, sts_scores
from cliplab.text.causal import DecoderText
from cliplab.text_edit.token_prepending import TokenPrependingEmbedder

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "stsb"


class EarlyExit:
    """The plain decoder embedder read at ``layer`` (the control for a TP setting with the same readout)."""

    def __init__(self, embedder, layer: int):
        self.embedder, self.layer = embedder, layer
        self.name, self.default_pooling, self.dim = f"{embedder.name}@{layer}", "prompteol", embedder.dim

    @torch.no_grad()
    def encode(self, texts, pooling=None, normalize=False, batch_size=64, progress=False):
        pool = text.get_pooling(pooling or "prompteol")
        lm = DecoderText(self.embedder.model)
        layer = self.layer % (lm.n_layers + 1)
        batch = self.embedder.tokenize([pool.wrap(t) for t in texts])
        out = torch.empty(len(texts), self.dim)
        for rows, sub in self.embedder.iter_batches(batch, batch_size):
            hidden = self.embedder.token_states(sub, output="hidden").hidden
            r = torch.arange(len(rows))
            out[rows] = lm.readout(hidden[layer][r, sub.last_index], layer).float()
        return out


def run(name, embedder, data, pooling="prompteol"):
    t = time.time()
    res = evaluate_sts(embedder, data, pooling)
    print(f"{name:<40} spearman {res['spearman']:6.2f}  pearson {res['pearson']:6.2f}  ({time.time() - t:.0f} s)",
          flush=True)
    return res["spearman"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--exits", type=int, nargs="+", default=[3, 7, 30])
    ap.add_argument("--layers", type=int, nargs="+", default=[-1, 25, 28])
    args = ap.parse_args()
    emb = text.load_embedder("smollm2-135m", precision=args.precision)
    dev, test = read_sts(DATA / "sts-dev.csv"), read_sts(DATA / "sts-test.csv")
    summary = {"dev": {}, "test": {}}
    for layer in args.layers:
        summary["dev"][f"plain@{layer}"] = run(f"dev plain prompteol @{layer}", EarlyExit(emb, layer), dev)
        for ex in args.exits:
            tp = TokenPrependingEmbedder(emb, start=1, exit=ex, readout_layer=layer)
            summary["dev"][f"tp exit={ex}@{layer}"] = run(f"dev TP exit={ex} prompteol @{layer}", tp, dev)
    best = max((k for k in summary["dev"] if k.startswith("tp")), key=summary["dev"].get)
    ex, layer = (int(v) for v in best[len("tp exit="):].split("@"))
    print(f"chosen on dev: exit={ex}, readout layer {layer}")
    summary["chosen"] = {"exit": ex, "layer": layer}
    summary["test"]["plain@-1 prompteol"] = run("test plain prompteol @-1", EarlyExit(emb, -1), test)
    summary["test"][f"plain@{layer} prompteol"] = run(f"test plain prompteol @{layer}", EarlyExit(emb, layer), test)
    tp = TokenPrependingEmbedder(emb, start=1, exit=ex, readout_layer=layer)
    summary["test"][f"tp exit={ex}@{layer} prompteol"] = run(f"test TP exit={ex} prompteol @{layer}", tp, test)
    tp_last = TokenPrependingEmbedder(emb, start=1, exit=ex, readout_layer=layer)
    summary["test"][f"tp exit={ex}@{layer} last"] = run(f"test TP exit={ex} last @{layer}", tp_last, test, "last")
    summary["test"][f"plain@{layer} last"] = run(f"test plain last @{layer}", EarlyExit(emb, layer), test, "last")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
