"""Sentence-embedding throughput: cliplab's all-MiniLM-L6-v2 against `transformers` and `sentence-transformers`,
side by side, same weights, same sentences, tokenization included everywhere.

    python benchmarks/text_embedders.py [--n 2758] [--rounds 3] [--out report.md]

The sentences are STS-B test's (both sides, file order; ``../shared/data/stsb``). Paths:

* ``transformers`` ``BertModel`` in fp32: batches in input order, each padded to its own longest sentence (the setting
  the issue names as its best), mean pooling over the attention mask; every batch size in ``--hf-batches`` is run
  and the fastest is reported;
* ``sentence-transformers`` ``SentenceTransformer.encode`` (which sorts by length itself), fp32, its default batch of
  32 and 64;
* cliplab exact (fp32) and fast (bf16) ``encode``: length-ordered batches in token-budget slices.

Each figure is the best of ``--rounds`` rounds in which the paths take turns, so a drift in machine speed affects
them alike. Fidelity is reported beside speed: the minimum cosine between each path's embeddings and the
transformers fp32 reference, and STS-B Spearman x 100 for each. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import cliplab.text as text
from cliplab.eval.sts import read_sts, sts_scores
from cliplab.models.lm.pretrained import minilm_dir

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "stsb" / "sts-test.csv"


def hf_path(model, tok, batch_size: int):
    @torch.no_grad()
    def run(texts):
        out = []
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i : i + batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt")
            states = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(states.dtype)
            out.append((states * m).sum(1) / m.sum(1))
        return torch.cat(out)
    return run


def st_path(model, batch_size: int):
    def run(texts):
        return model.encode(texts, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=False,
                            show_progress_bar=False)
    return run


def cliplab_path(emb):
    def run(texts):
        return emb.encode(texts)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=None, help="first N sentences (default: all of STS-B test)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hf-batches", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import transformers

    data = read_sts(DATA)
    texts = (data.first + data.second)[: args.n]
    d = minilm_dir()
    hf = transformers.BertModel.from_pretrained(str(d)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(d))
    paths = {f"transformers fp32, batch {b}": hf_path(hf, tok, b) for b in args.hf_batches}
    try:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(d), device="cpu")
        paths.update({f"sentence-transformers fp32, batch {b}": st_path(st, b) for b in (32, 64)})
    except ImportError:
        print("sentence-transformers not installed: its rows are skipped")
    exact = text.load_embedder("all-MiniLM-L6-v2")
    fast = text.load_embedder("all-MiniLM-L6-v2", precision="bf16")
    paths["cliplab exact (fp32)"] = cliplab_path(exact)
    paths["cliplab fast (bf16)"] = cliplab_path(fast)

    best = {k: float("inf") for k in paths}
    outputs = {}
    for name, fn in paths.items():  # warm-up (and the outputs for fidelity)
        outputs[name] = fn(texts[:64]).float()
    for r in range(args.rounds):
        for name, fn in paths.items():
            t = time.perf_counter()
            outputs[name] = fn(texts).float().cpu()
            best[name] = min(best[name], time.perf_counter() - t)
        print(f"round {r + 1}: " + ", ".join(f"{k}: {len(texts) / best[k]:.0f}/s" for k in paths), flush=True)

    ref_name = min((k for k in paths if k.startswith("transformers")), key=best.get)
    hf_best = best[ref_name]
    ref = outputs[ref_name]
    n_pairs = len(texts) // 2
    lines = [f"# Sentence-embedding throughput: all-MiniLM-L6-v2 ({len(texts)} STS-B test sentences)", "",
             f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
             f"{torch.__version__}, transformers {transformers.__version__}. Best of {args.rounds} interleaved rounds.",
             "", "| path | sentences/s | vs best transformers | min cosine vs transformers | STS-B Spearman |",
             "|---|---:|---:|---:|---:|"]
    for name in paths:
        out = outputs[name]
        cos = float(F.cosine_similarity(out, ref).min())
        sp = sts_scores(out[:n_pairs], out[n_pairs : 2 * n_pairs], data.scores[:n_pairs])["spearman"] \
            if args.n is None else float("nan")
        lines.append(f"| {name} | {len(texts) / best[name]:.0f} | {hf_best / best[name]:.2f}x | {cos:.6f} | "
                     f"{sp:.2f} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        Path(args.out).write_text(report)


if __name__ == "__main__":
    main()
