"""CgT-GAN on the synthetic world with shapes-tiny: text-only init, then three arms with the same number of steps.

Arms: maximum likelihood only (the text-only init continued, the control), CgT-GAN (CLIP-agg reward + discriminator
reward, lam schedule), reward-only (lam = 1 from the start: no adversarial term). Metrics on held-out images:
caption -> image R@1 under shapes-tiny, the grammar-parse rate (the world's exact parser), the mean caption length.
Writes experiments/results/cgtgan_study.json (or --out); ``--set key=value`` overrides CgtganConfig fields.

    python experiments/cgtgan_study.py --steps 150 --seeds 0 1
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import cliplab
from cliplab.captioning import cgtgan as C

ROOT = Path(__file__).resolve().parent.parent


def metrics(model, timg, caps):
    return {"r1": C.retrieval_r1(model, timg, caps), "parse_rate": C.parse_rate(caps),
            "mean_words": sum(len(c.split()) for c in caps) / len(caps), "examples": caps[:5]}


def run(seed: int, args, overrides: dict) -> dict:
    model = cliplab.load("shapes-tiny").eval()
    train, corpus, test, test_caps = C.synthetic_unpaired_data(args.images, args.corpus, args.test, seed=seed,
                                                               max_objects=args.objects)
    corpus_emb = C.CachedTextEncoder(model)(corpus)
    img, timg = model.encode_images(train, normalize=True), model.encode_images(test, normalize=True)
    gen = C.new_generator(img.shape[1], seed=seed, hidden=args.hidden, embed=64, mapper_hidden=args.hidden)
    C.text_only_init(gen, model, corpus, steps=args.init_steps, corpus_emb=corpus_emb, seed=seed)
    out = {"ground_truth": metrics(model, timg, test_caps), "text_only_init": metrics(model, timg, gen.caption(timg))}
    t0 = time.time()
    control = copy.deepcopy(gen)
    C.train_mle_control(control, model, corpus, steps=args.steps, corpus_emb=corpus_emb, seed=seed)
    out["mle_only"] = metrics(model, timg, control.caption(timg))
    out["mle_only"]["seconds"] = time.time() - t0
    arms = {"cgtgan": {}, "reward_only": dict(reward_weight=1.0, gan_steps=0, warm_steps=0)}
    for name, kw in arms.items():
        t0 = time.time()
        g = copy.deepcopy(gen)
        hist = C.train_cgtgan(g, model, img, corpus, corpus_emb=corpus_emb, **{"steps": args.steps, "seed": seed,
                                                                                 **overrides, **kw})
        out[name] = metrics(model, timg, g.caption(timg))
        if name == "cgtgan" and args.save:
            g.save(args.save)  # the captioner for `cliplab caption --generator PATH`
        out[name]["seconds"] = time.time() - t0
        out[name]["last_reward"] = sum(hist["reward"][-10:]) / 10
        out[name]["last_critic"] = sum(hist["critic"][-10:]) / 10
        print(seed, name, {k: v for k, v in out[name].items() if k != "examples"}, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--init-steps", type=int, default=150)
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--corpus", type=int, default=500)
    ap.add_argument("--test", type=int, default=128)
    ap.add_argument("--objects", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--set", action="append", default=[], help="CgtganConfig field=value")
    ap.add_argument("--save", default="", help="save the (last seed's) CgT-GAN generator to this .pt file")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "cgtgan_study.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    types = {f: type(v) for f, v in vars(C.CgtganConfig()).items()}
    overrides = {k: types[k](v) for k, v in (s.split("=", 1) for s in args.set)}
    runs = {str(s): run(s, args, overrides) for s in args.seeds}
    summary = {arm: {m: sum(r[arm][m] for r in runs.values()) / len(runs) for m in ("r1", "parse_rate", "mean_words")}
               for arm in ("ground_truth", "text_only_init", "mle_only", "cgtgan", "reward_only")}
    result = {"config": {**vars(args), "overrides": overrides, "defaults": vars(C.CgtganConfig())},
              "summary": summary, "runs": runs, "note": "timings measured under load (2 shared cores)"}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
