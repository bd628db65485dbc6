"""GEM on the real SmolLM2-135M-Instruct: train on Flickr8k training captions, then measure STS-B test, held-out
caption-to-caption retrieval and held-out caption perplexity, against the same model without the method and against
the same training with the mask off. A measurement, not a test.

    OMP_WAIT_POLICY=PASSIVE python experiments/gem_smollm2.py --steps 100 --batch-size 8 --images 200 --ppl-images 300 \\
        --arms gem,control --out experiments/results/gem-smollm2-DATE.json | tee experiments/results/gem-smollm2-DATE.log

* ``base``: the untrained model. Caption retrieval with mean and last-token pooling of the plain text (and with
  ``--base-gem`` the GEM readout of the untrained, random special vectors); perplexity of the held-out captions. STS-B test of the base
  model is not re-run (``--base-sts`` re-runs it): the project's anchors (mean 37.15, last token 30.99) were measured
  with the same code, model and data.
* each arm of ``--arms`` starts from a fresh copy of the model and trains ``--steps`` steps of
  :func:`cliplab.textrep.gem.train_gem` (same seed, data order, splits, specials and steps): ``gem`` under the GEM
  mask, ``control`` under the plain causal mask (``use_mask=False``). Then STS-B test and retrieval with the GEM
  readouts (with ``--trained-plain`` mean / last pooling of the trained model too) and perplexity.
* all-MiniLM-L6-v2 (mean pooling) is scored on the same retrieval subset, so the subset's figures have an anchor.

The held-out captions are ``split_groups(read_caption_groups(all_captions.csv), held_out=1000, seed=0)[1]``; retrieval
uses the first ``--images`` of those images (5 captions each; the full 1,000 is too slow on 2 shared CPU cores), the
perplexity the first caption of each of the first ``--ppl-images``. Training uses only the other 7,091 images'
captions. A JSON summary is rewritten after every phase, so a run cut short keeps what it measured.

``--dev DIR`` instead scores a saved GEM embedder's two readouts on STS-B dev (where a readout may be chosen); with
``--trained-plain`` also its mean / last pooling on test, with ``--ppl-sts N`` the perplexity of the first N
distinct STS-B test sentences (out of the training domain) under the base model and the saved one.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import math
import time
from pathlib import Path

import torch

from cliplab import text
from cliplab.eval.paraphrase import read_caption_groups, retrieval_scores, split_groups
from cliplab.eval.sts import read_sts, sts_scores
from cliplab.textrep.gem import GEMEmbedder, build_batch, gem_forward, train_gem

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@torch.no_grad()
def gem_states(emb: GEMEmbedder, ids: list[list[int]]) -> torch.Tensor:
    """The specials' final states ``[B, n_special, W]`` after each row (what ``GEMEmbedder.embed_batch`` reads)."""
    b = build_batch(emb.model, emb.specials, ids, [len(r) for r in ids])
    states = gem_forward(emb.model, b).tokens
    return states[torch.arange(len(ids), device=states.device)[:, None], b.special_index]


@torch.no_grad()
def embeddings(emb, texts: list[str], plain: bool = True, gem: bool = True, batch_size: int = 64) -> dict:
    """Mean and last-token pooling of the plain text from one pass; both GEM readouts from one pass."""
    out = {}
    if plain:
        out = {p: torch.empty(len(texts), emb.dim) for p in ("mean", "last")}
        batch = emb.tokenize(texts)
        for rows, sub in emb.iter_batches(batch, batch_size):
            states = emb.token_states(sub).tokens
            for p in ("mean", "last"):
                out[p][rows] = text.get_pooling(p)(states, sub.mask).cpu()
    if gem:
        out.update({"gem_mean": torch.empty(len(texts), emb.dim), "gem_last": torch.empty(len(texts), emb.dim)})
        batch = emb.tokenizer(texts, max_length=emb.max_tokens - emb.n_special)
        for rows, sub in emb.iter_batches(batch, batch_size):
            ids = [r[:n] for r, n in zip(sub.ids.tolist(), sub.lengths.tolist())]
            at = gem_states(emb, ids)  # [B, n_special, W]: both readouts from one pass
            out["gem_mean"][rows] = at.mean(1).float().cpu()
            out["gem_last"][rows] = at[:, -1].float().cpu()
    return out


def sts(emb, plain: bool, gem: bool, limit: int | None = None, split: str = "test") -> dict:
    data = read_sts(DATA / "stsb" / f"sts-{split}.csv", limit=limit)
    unique = list(dict.fromkeys(data.first + data.second))
    where = {s: i for i, s in enumerate(unique)}
    t = time.time()
    res = {}
    for p, v in embeddings(emb, unique, plain, gem).items():
        a, b = v[[where[s] for s in data.first]], v[[where[s] for s in data.second]]
        res[p] = round(sts_scores(a, b, data.scores)["spearman"], 2)  # already x 100
    print(f"  STS-B {split} ({len(data)} pairs): " + "  ".join(f"{p} {s:.2f}" for p, s in res.items())
          + f"  ({time.time() - t:.0f} s)", flush=True)
    return res


def retrieval(emb, held, plain: bool = True, gem: bool = True) -> dict:
    texts = [c for _, caps in held for c in caps]
    group_of = torch.tensor([g for g, (_, caps) in enumerate(held) for _ in caps])
    t = time.time()
    if isinstance(emb, GEMEmbedder):
        vecs = embeddings(emb, texts, plain, gem)
    else:  # the MiniLM anchor
        vecs = {"mean": emb.encode(texts, pooling="mean")}
    res = {p: {k: round(v, 4) for k, v in retrieval_scores(x, group_of).items()} for p, x in vecs.items()}
    print(f"  caption retrieval ({len(held)} images, {len(texts)} captions): "
          + "  ".join(f"{p} R@1 {r['r@1']:.3f} MRR {r['mrr']:.3f}" for p, r in res.items())
          + f"  ({time.time() - t:.0f} s)", flush=True)
    return res


def perplexity(lm, texts: list[str], what: str = "held-out captions") -> float:
    t = time.time()
    total, count = lm.log_likelihood(texts)
    ppl = math.exp(-total / count)
    print(f"  perplexity of {len(texts)} {what}: {ppl:.3f} over {count} tokens ({time.time() - t:.0f} s)",
          flush=True)
    return round(ppl, 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", default="gem,control")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--n-special", type=int, default=4)
    ap.add_argument("--ntp-fraction", type=float, default=0.5)
    ap.add_argument("--images", type=int, default=200, help="held-out images for retrieval")
    ap.add_argument("--ppl-images", type=int, default=300, help="held-out images whose first caption is scored")
    ap.add_argument("--sts-limit", type=int, default=None, help="first N STS-B test pairs (default: all)")
    ap.add_argument("--base-sts", action="store_true")
    ap.add_argument("--trained-plain", action="store_true", help="also mean / last pooling of the trained model")
    ap.add_argument("--base-gem", action="store_true", help="also the GEM readout of the untrained model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save", default=None, help="save the gem arm's embedder here (and check it loads back)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--dev", default=None, help="only score the saved GEM embedder DIR on STS-B dev")
    ap.add_argument("--ppl-sts", type=int, default=0, help="with --dev: perplexity of N STS-B test sentences")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
          f"config {vars(args)}", flush=True)
    t_all = time.time()
    if args.dev:
        saved = text.load_embedder(args.dev)
        res = {"embedder": args.dev, "sts_dev": sts(saved, False, True, args.sts_limit, "dev")}
        if args.trained_plain:  # the trained model's plain poolings on the test split too
            res["sts_test_plain"] = sts(saved, True, False, args.sts_limit, "test")
        if args.ppl_sts:  # out-of-domain perplexity (STS-B test sentences), the base model and the saved one
            test = read_sts(DATA / "stsb" / "sts-test.csv")
            sentences = list(dict.fromkeys(test.first + test.second))[: args.ppl_sts]
            base_lm = text.load_lm("smollm2-135m")
            res["perplexity_sts_sentences"] = {"base": perplexity(base_lm, sentences, "STS-B sentences (base)"), "saved": perplexity(
                text.CausalLM(saved.name, saved.model, saved.tokenizer, base_lm.eos_id, base_lm.bos_id), sentences,
                "STS-B sentences (saved)")}
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
        return
    train, held = split_groups(read_caption_groups(DATA / "flickr8k-1k" / "all_captions.csv"), held_out=1000, seed=0)
    sub = held[: args.images]
    ppl_texts = [caps[0] for _, caps in held[: args.ppl_images]]
    captions = [c for _, caps in train for c in caps]
    summary: dict = {"config": vars(args), "n_train_images": len(train), "retrieval_images": len(sub),
                     "perplexity_captions": len(ppl_texts)}

    def dump():
        summary["seconds"] = round(time.time() - t_all, 1)
        if args.out:
            Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")

    print("all-MiniLM-L6-v2 (anchor):", flush=True)
    summary["minilm"] = {"retrieval": retrieval(text.load_embedder("all-MiniLM-L6-v2"), sub, plain=False, gem=False)}
    dump()

    print("base SmolLM2-135M (no training):", flush=True)
    lm = text.load_lm("smollm2-135m")
    emb = GEMEmbedder.from_lm(lm, n_special=args.n_special, seed=args.seed)
    base = {"retrieval": retrieval(emb, sub, plain=True, gem=args.base_gem), "perplexity": perplexity(lm, ppl_texts)}
    if args.base_sts:
        base["sts_test"] = sts(emb, True, True, args.sts_limit)
    summary["base"] = base
    dump()

    for arm in args.arms.split(","):
        print(f"arm {arm}: {args.steps} steps, mask {'on' if arm == 'gem' else 'off'}", flush=True)
        lm = text.load_lm("smollm2-135m")  # a fresh copy: every arm starts from the same weights
        emb = GEMEmbedder.from_lm(lm, n_special=args.n_special, seed=args.seed)
        t = time.time()
        fit = train_gem(emb, captions, steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                        ntp_fraction=args.ntp_fraction, seed=args.seed, use_mask=arm == "gem", log_every=10,
                        progress=False)
        for rec in fit.records:
            print(f"  step {rec['step']:4d}  loss {rec['loss']:.4f}"
                  + (f"  gem {rec['gem']:.4f}  ntp {rec['ntp']:.4f}" if "gem" in rec else ""), flush=True)
        res: dict = {"training": {"seconds": round(time.time() - t, 1), "records": fit.records}}
        print(f"  trained in {time.time() - t:.0f} s", flush=True)
        summary[arm] = res
        res["sts_test"] = sts(emb, args.trained_plain, True, args.sts_limit)
        dump()
        res["retrieval"] = retrieval(emb, sub, plain=args.trained_plain, gem=True)
        res["perplexity"] = perplexity(lm, ppl_texts)
        res["perplexity_change_pct"] = round(100 * (res["perplexity"] / base["perplexity"] - 1), 2)
        print(f"  perplexity change vs base: {res['perplexity_change_pct']:+.2f} %", flush=True)
        if arm == "gem" and args.save:
            emb.save(args.save)
            back = text.load_embedder(args.save)
            probe = ["A dog runs on the grass.", "Two men are playing chess."]
            res["saved_loads_back"] = bool(torch.allclose(back.encode(probe), emb.encode(probe), atol=1e-5))
            print(f"  saved to {args.save}; loads back with the same embeddings: {res['saved_loads_back']}", flush=True)
        dump()
    print(f"total {time.time() - t_all:.0f} s", flush=True)


if __name__ == "__main__":
    main()
