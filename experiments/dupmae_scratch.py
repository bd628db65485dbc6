"""DupMAE pre-training of a small BERT from scratch on Flickr8k training captions, against MLM-only and RetroMAE-style
controls (the paper's regime, at toy scale).

    OMP_WAIT_POLICY=PASSIVE nohup python experiments/dupmae_scratch.py --steps 300 --batch-size 64 --lr 1e-3 \\
        --arms mlm_only,dupmae,retromae > experiments/results/dupmae-scratch-2026-12-06.log 2>&1 &   # what was run
    python experiments/dupmae_scratch.py --probe 4          # seconds per step of each arm, then exit

The encoder is a fresh ``BertEncoder(BertConfig(layers=4, width=256, heads=4, mlp_dim=1024, max_positions=64))``
(``init_weights(seed=0)``), wrapped as an ``EncoderEmbedder``. Arms, all from the same init, seed, batches and
encoder masks: (a) the untrained encoder; (b) MLM-only (``DupMAEConfig(dec_weight=0, bow_weight=0)``); (c)
RetroMAE-style (``DupMAEConfig(bow_weight=0)``: encoder MLM + [CLS] decoding); (d) DupMAE (``DupMAEConfig()``).
The vocabulary head starts at BERT's normal(0.02) (``head_init="normal"``, the paper's init from scratch; the
module's identity default is for MiniLM's trained embeddings); the untrained arm gets a fresh head of the same init.

Tokenizer: all-MiniLM-L6-v2's WordPiece, restricted (``--vocab corpus``, the default) to the 9,649 WordPiece tokens
that occur in the training captions, the held-out captions or STS-B test (plus the five special tokens), renumbered
in the original order. Greedy longest-match WordPiece over a subset that contains every piece the full vocabulary
produces on a text produces the same pieces, so every text here tokenizes identically (checked at start-up); the
only change is a 3x smaller softmax (and embedding table) for a CPU run. Tokens seen only in evaluation texts keep
their random embeddings in either case. ``--vocab full`` keeps all 30,522.

Evaluation: held-out caption-to-caption retrieval (``split_groups(..., held_out=1000, seed=0)[1]``, 5,000 captions;
R@1/5/10, MRR) and STS-B test Spearman, for the [CLS] part, the OT part (top-``k`` of ReLU of the max-pooled vocab
logits), the combined embedding (each part L2-normalised; ``pooling="dupmae"``) and the encoder's mean pooling.
Writes ``experiments/results/dupmae-scratch-<tag>.json`` after every arm.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

import cliplab.text as text
from cliplab.eval.paraphrase import read_caption_groups, retrieval_scores, split_groups
from cliplab.eval.sts import read_sts, sts_scores
from cliplab.models.lm import BertConfig, BertEncoder
from cliplab.models.lm.tokenizer import TextTokenizer
from cliplab.textrep.dupmae import DupMAEConfig, DupMAEEmbedder, pretrain

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
ARMS = {"mlm_only": DupMAEConfig(dec_weight=0.0, bow_weight=0.0), "retromae": DupMAEConfig(bow_weight=0.0),
        "dupmae": DupMAEConfig()}
NAMES = {"dupmae_cls": "cls", "dupmae_ot": "ot", "dupmae": "combined", "mean": "mean"}


def restricted_tokenizer(full: TextTokenizer, texts: list[str], max_length: int) -> TextTokenizer:
    """``full``'s WordPiece over only the tokens ``texts`` use (and the special tokens), ids renumbered in order."""
    tk = __import__("tokenizers")
    keep = {i for t in texts for i in full.encode(t)}
    keep |= {full.token_id(s) for s in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")}
    spec = json.loads(full.tokenizer.to_str())
    old = spec["model"]["vocab"]
    new_vocab = {tok: k for k, (tok, _) in enumerate(sorted(((t, i) for t, i in old.items() if i in keep),
                                                             key=lambda x: x[1]))}
    spec["model"]["vocab"] = new_vocab
    for a in spec["added_tokens"]:
        a["id"] = new_vocab[a["content"]]
    for name, st in spec["post_processor"]["special_tokens"].items():
        st["ids"] = [new_vocab[name]]
    tok = TextTokenizer(tk.Tokenizer.from_str(json.dumps(spec)), max_length=max_length,
                        pad_id=new_vocab["[PAD]"], add_special_tokens=True, name=f"{full.name}-corpus{len(new_vocab)}")
    # the same pieces on every text
    inv_old = {i: t for t, i in old.items()}
    inv_new = {i: t for t, i in new_vocab.items()}
    for t in texts:
        a, b = [inv_old[i] for i in full.encode(t)], [inv_new[i] for i in tok.encode(t)]
        assert a == b, (t, a, b)
    return tok


def score(emb, held, sts, top_k):
    caps = [c for _, cs in held for c in cs]
    group_of = torch.tensor([g for g, (_, cs) in enumerate(held) for _ in cs])
    unique = list(dict.fromkeys(sts.first + sts.second))
    where = {s: i for i, s in enumerate(unique)}
    t0 = time.perf_counter()
    out = {}
    for pooling, name in NAMES.items():
        c, s = emb.encode(caps, pooling=pooling, batch_size=128), emb.encode(unique, pooling=pooling, batch_size=128)
        r = retrieval_scores(c, group_of)
        sp = sts_scores(s[[where[x] for x in sts.first]], s[[where[x] for x in sts.second]], sts.scores)
        out[name] = {"r@1": r["r@1"], "r@5": r["r@5"], "r@10": r["r@10"], "mrr": r["mrr"],
                     "sts_spearman": sp["spearman"]}
        print(f"    {name:<9} R@1 {r['r@1']:.3f} MRR {r['mrr']:.3f} STS {sp['spearman']:6.2f}", flush=True)
    print(f"  (evaluated in {time.perf_counter() - t0:.0f}s)", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=float, default=0.1)
    ap.add_argument("--top-k", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--vocab", choices=("corpus", "full"), default="corpus")
    ap.add_argument("--arms", default="mlm_only,retromae,dupmae")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default=time.strftime("%Y-%m-%d"))
    ap.add_argument("--probe", type=int, default=0, help="time this many steps of each arm and exit")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()

    groups = read_caption_groups(DATA / "flickr8k-1k" / "all_captions.csv")
    train, held = split_groups(groups, held_out=1000, seed=0)
    assert not {g for g, _ in held} & {g for g, _ in train}
    texts = [c for _, cs in train for c in cs]
    sts = read_sts(DATA / "stsb" / "sts-test.csv")
    full = text.load_embedder("all-MiniLM-L6-v2").tokenizer
    if args.vocab == "corpus":
        every = texts + [c for _, cs in held for c in cs] + list(dict.fromkeys(sts.first + sts.second))
        tok = restricted_tokenizer(full, every, max_length=64)
    else:
        full.max_length = 64
        tok = full
    print(f"train: {len(texts)} captions of {len(train)} images; held out: {sum(len(c) for _, c in held)} captions "
          f"of {len(held)} images; STS-B test: {len(sts)} pairs; vocabulary {tok.vocab_size} ({tok.name})", flush=True)

    cfg = BertConfig(vocab_size=tok.vocab_size, width=args.width, layers=args.layers, heads=args.width // 64,
                     mlp_dim=4 * args.width, max_positions=64)
    enc = BertEncoder(cfg)
    enc.init_weights(seed=0)
    base = text.EncoderEmbedder("scratch-bert", enc, tok, "mean")
    print(f"encoder: {cfg} ({sum(p.numel() for p in enc.parameters()) / 1e6:.1f}M parameters)", flush=True)

    arms = [a for a in args.arms.split(",") if a]
    if args.probe:
        for arm in arms:
            res = pretrain(base, texts, steps=args.probe, batch_size=args.batch_size, lr=args.lr, config=ARMS[arm],
                           head_init="normal", top_k=args.top_k, seed=args.seed, log_every=1, progress=False)
            print(f"{arm}: {res.fit.seconds / args.probe:.2f} s/step; last {res.fit.records[-1]}", flush=True)
        return

    results = {"args": vars(args), "encoder": {k: getattr(cfg, k) for k in ("vocab_size", "width", "layers", "heads",
                                                                            "mlp_dim", "max_positions")},
               "tokenizer": tok.name, "head_init": "normal", "parts_normalised": True}
    out_path = REPO / "experiments" / "results" / f"dupmae-scratch-{args.tag}.json"

    def dump():
        results["wall_seconds"] = time.perf_counter() - t_start
        out_path.write_text(json.dumps(results, indent=2) + "\n")

    print("untrained encoder (fresh normal-init head):", flush=True)
    results["untrained"] = score(DupMAEEmbedder.from_encoder(base, head_init="normal", top_k=args.top_k),
                                 held, sts, args.top_k)
    dump()
    for arm in arms:
        print(f"pre-training {arm}: {ARMS[arm]}", flush=True)
        res = pretrain(base, texts, steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                       config=ARMS[arm], head_init="normal", top_k=args.top_k, seed=args.seed,
                       log_every=max(1, args.steps // 20), progress=False)
        for rec in res.fit.records:
            print("   ", {k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()}, flush=True)
        print(f"  {res.fit.seconds:.0f}s for {args.steps} steps ({res.fit.seconds / args.steps:.2f} s/step)",
              flush=True)
        results[arm] = score(res.embedder, held, sts, args.top_k)
        results[arm + "_train"] = {"seconds": res.fit.seconds, "records": res.fit.records, **res.config}
        dump()
        del res

    print("\nheld-out caption retrieval (1000 images, 5000 captions) and STS-B test Spearman x100")
    print(f"{'model':<10} {'embedding':<10} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'MRR':>6} {'STS':>7}")
    for model in ["untrained"] + arms:
        for name, r in results[model].items():
            print(f"{model:<10} {name:<10} {r['r@1']:6.3f} {r['r@5']:6.3f} {r['r@10']:6.3f} {r['mrr']:6.3f} "
                  f"{r['sts_spearman']:7.2f}")
    dump()
    print(f"wrote {out_path}; total {results['wall_seconds']:.0f}s")


if __name__ == "__main__":
    main()
