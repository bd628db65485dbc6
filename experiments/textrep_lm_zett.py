"""ZeTT on real captions and on the shipped CLIP (issue 26).

LM part: a tiny CLIP-BPE LM trained on Flickr8k training captions is frozen; a hypernetwork is trained over a pool of
BPE tokenizers; then the LM runs through an *unseen* BPE (2,000 tokens, trained with ``tokenizers`` on the training
captions, never in the pool). Bits per byte on held-out captions with random, mean-of-pieces and hypernetwork
embeddings (same LM, texts and tokenizer), and through the LM's own tokenizer.

CLIP part: shapes-tiny's text tower frozen; a hypernetwork trained by feature distillation over a pool of BPEs on
synthetic-world captions; then an unseen BPE. Cosine between each held-out caption's feature through the new
tokenizer and through CLIP's own, and text-to-text top-1 (does the new feature find its own caption's original
feature among the held-out ones).

    python experiments/textrep_lm_zett.py   # writes experiments/results/textrep_lm_zett.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import cliplab
from cliplab.data.synthetic import SceneWorld
from cliplab.data.synthetic.captions import short_caption
from cliplab.textrep import zett
from cliplab.textrep.lm_training import CompactCLIPCodec, encode_rows, load_caption_splits, tiny_lm, \
    train_bpe_codec, train_lm

OUT = Path(__file__).resolve().parent / "results" / "textrep_lm_zett.json"


def lm_part(args) -> dict:
    split = load_caption_splits(seed=args.seed)
    original = CompactCLIPCodec(split.train)
    lm = tiny_lm(original.vocab_size, width=128, layers=4, seed=args.seed)
    t0 = time.time()
    train_lm(lm, encode_rows(original, split.train), pad_id=original.pad_id, steps=args.lm_steps, batch_size=32,
             lr=3e-3, seed=args.seed)
    t_lm = time.time() - t0
    pool = zett.sample_tokenizers(split.train, args.pool, vocab_range=(500, 4000), exclude=(2000,), seed=args.seed)
    unseen = train_bpe_codec(split.train, 2000, name="unseen-bpe-2000")
    table = lm.token_embed.weight.detach()
    hn = zett.HyperNetwork(128, seed=args.seed)
    t0 = time.time()
    fit = zett.train_hypernet(hn, lm, original, pool, split.train, steps=args.hn_steps, warmup_steps=args.warmup,
                              batch_size=32, lr=1e-3, seed=args.seed)
    t_hn = time.time() - t0
    res = zett.transfer_bpb(lm, original, unseen, split.held_out, hypernet=hn, seed=args.seed)
    ident = zett.identity_pieces(table.shape[0])
    with torch.no_grad():
        cos = F.cosine_similarity(hn(table, ident.pieces, ident.mask), table).mean()
    dec = zett.codec_decomposition(unseen, original)
    return {"bpb_held_out": {k: round(v, 4) for k, v in res.items()}, "lm_steps": args.lm_steps,
            "hypernet_steps": args.hn_steps, "identity_warmup_steps": args.warmup,
            "pool_vocab_sizes": [c.vocab_size for c in pool], "unseen_vocab": unseen.vocab_size,
            "original_vocab": original.vocab_size, "unseen_tokens_shared_with_original": len(dec.shared),
            "mean_pieces_per_unseen_token": round(float(dec.mask.sum(1).float().mean()), 3),
            "identity_cosine_after_training": round(float(cos), 4),
            "final_hypernet_records": fit.records[-1:], "seconds_under_load": {"lm": round(t_lm), "hn": round(t_hn)}}


def clip_part(args) -> dict:
    model = cliplab.load("shapes-tiny").eval()
    world = SceneWorld(seed=args.seed)
    texts = [short_caption(world.sample(i)) for i in range(2000)]
    train, held = texts[:1800], texts[1800:]
    pool = zett.sample_tokenizers(train, args.clip_pool, vocab_range=(100, 400), exclude=(args.clip_unseen_vocab,),
                                  seed=args.seed)
    unseen = train_bpe_codec(train, args.clip_unseen_vocab, name=f"unseen-bpe-{args.clip_unseen_vocab}")
    hn = zett.HyperNetwork(model.text.token_embed.weight.shape[1], seed=args.seed)
    t0 = time.time()
    zett.train_clip_hypernet(hn, model, pool, train, steps=args.clip_steps, batch_size=32, lr=1e-3, seed=args.seed)
    seconds = time.time() - t0
    table = model.text.token_embed.weight.detach()
    dec = zett.clip_decomposition(unseen)
    out = {}
    with torch.no_grad():
        ref = model.encode_text(model.tokenizer(held), normalize=True)
        for name, emb in [("hypernet", zett.predict_embeddings(hn, table, dec)),
                          ("mean_of_pieces", zett.mean_of_pieces(table, dec)),
                          ("random", zett.random_embeddings(table, dec, seed=args.seed))]:
            feats = zett.encode_text_with_tokenizer(model, unseen, emb, held, normalize=True)
            top1 = (feats @ ref.T).argmax(1) == torch.arange(len(held))
            out[name] = {"cosine_to_own_tokenizer": round(float((feats * ref).sum(-1).mean()), 4),
                         "text_to_text_top1": round(float(top1.float().mean()), 4)}
    return {"model": "shapes-tiny", "n_train": len(train), "n_held_out": len(held), "steps": args.clip_steps,
            "pool_vocab_sizes": [c.vocab_size for c in pool], "unseen_vocab": unseen.vocab_size,
            "mean_pieces_per_unseen_token": round(float(dec.mask.sum(1).float().mean()), 3),
            "arms": out, "seconds_under_load": round(seconds)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lm-steps", type=int, default=300)
    ap.add_argument("--hn-steps", type=int, default=150)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--clip-steps", type=int, default=100)
    ap.add_argument("--pool", type=int, default=3)
    ap.add_argument("--clip-pool", type=int, default=4)
    ap.add_argument("--clip-unseen-vocab", type=int, default=120,
                    help="the unseen BPE for CLIP; the synthetic captions saturate a BPE at about 200 tokens, so a "
                         "smaller one differs from every pool tokenizer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=["lm", "clip"], default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    result = json.loads(OUT.read_text()) if OUT.is_file() else {}
    if args.only in (None, "clip"):
        result["clip"] = clip_part(args)
        print("clip", json.dumps(result["clip"]["arms"]), flush=True)
    if args.only in (None, "lm"):
        result["lm"] = lm_part(args)
        print("lm", json.dumps(result["lm"]["bpb_held_out"]), flush=True)
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
