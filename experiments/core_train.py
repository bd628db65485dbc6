"""CoRe vs plain textual inversion on the shipped ``scenes-32`` generator (``cliplab.t2i.core``).

The concept is a **purple triangle**, learned as ``S*`` from 8 renders of it alone (``render_spec``, seeds 0-7) with
the class word ``triangle``. Every arm runs the same two-stage schedule with the same seed, steps, learning rates and
diffusion batches: ``inversion`` (plain textual inversion, the control), ``rescale_only`` (the norm rescaling at the
stage boundary, no regulariser: an ablation) and ``core`` (the rescaling and the two context regularisers in stage 2, on
regularisation prompts built from 15 of the 21 context objects, colour not purple and shape not triangle). Judged with
the shipped judge on the 6 held-out context objects (and, separately, the 15 used for regularisation), both orders
("a S* and a blue square", "a blue square and a S*"), ``--samples`` samples each:

* ``context``: the judge's parse shows the context object (its colour drawn as its shape);
* ``concept``: it shows a purple triangle; ``both``; ``concept_alone``: the same for samples of "a S*" alone;
* ``emb_cos``: mean context-token cosine to the reference prompt ("a triangle and ...") on held-out prompts.

References: the same prompts written with the real words ("a purple triangle and a blue square") through the plain
conditioner. Writes ``experiments/results/core.json``, ``docs/img/core_samples.png`` and ships both learned tokens
(``cliplab/t2i/pretrained/core/{core,inversion}/``).

    python experiments/core_train.py            # ~15 min on a loaded 2-core CPU
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cliplab  # noqa: E402
from cliplab.generation import (GEN_COLOURS, GEN_SHAPES, TextConditioner, load_generator, load_judge,  # noqa: E402
                                render_spec, save_grid, shipped_generator_dir)
from cliplab.t2i import core  # noqa: E402

CONCEPT = ("purple", "triangle")
CLASS_WORD = "triangle"
PRETRAINED = ROOT / "cliplab" / "t2i" / "pretrained" / "core"


def context_split() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(regularisation contexts, held-out contexts): every fourth of the 21 context objects is held out (6, the
    shapes cycling circle, square, cross), so both sets hold every shape."""
    pairs = [(c, s) for c in GEN_COLOURS for s in GEN_SHAPES if c != CONCEPT[0] and s != CONCEPT[1]]
    held_out = pairs[0::4]
    return [p for p in pairs if p not in held_out], held_out


def concept_images(n: int = 8) -> torch.Tensor:
    return torch.stack([render_spec([CONCEPT], seed=k) for k in range(n)])


def generator_digest(name: str = "scenes-32") -> str:
    d = Path(name) if (Path(name) / "generator.json").is_file() else shipped_generator_dir(name)
    return hashlib.sha256((d / "generator.safetensors").read_bytes()).hexdigest()[:16]


@torch.no_grad()
def reference_scores(conditioner, generator, judge, prompts, steps, seed, samples) -> dict:
    """The same prompts with the concept's real words, through the plain conditioner (the ceiling)."""
    rows = [p.replace("S*", " ".join(CONCEPT)) for p in prompts for _ in range(samples)]
    ctx = [core._context_of(p, "S*") for p in prompts for _ in range(samples)]
    images = torch.cat([generator.sample(conditioner(rows[i:i + 32]), steps=steps, seed=seed + i)
                        for i in range(0, len(rows), 32)])
    seen = judge.parse(images)
    c = [float(s.get(x[0]) == x[1]) for x, s in zip(ctx, seen)]
    k = [float(s.get(CONCEPT[0]) == CONCEPT[1]) for s in seen]
    return {"context": sum(c) / len(c), "concept": sum(k) / len(k),
            "both": sum(a * b for a, b in zip(c, k)) / len(c)}


@torch.no_grad()
def embedding_cosine(token, prompts) -> float:
    return 1 - float(core.context_embedding_loss(token, prompts, CLASS_WORD))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage1-steps", type=int, default=150)
    ap.add_argument("--stage2-steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=0.005)
    ap.add_argument("--stage2-lr", type=float, default=0.003)
    ap.add_argument("--lambda-emb", type=float, default=0.001)
    ap.add_argument("--lambda-attn", type=float, default=0.5)
    ap.add_argument("--rescale", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--reg-batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--generator", default="scenes-32", help="shipped name or saved directory (and its judge)")
    ap.add_argument("--no-ship", action="store_true", help="do not write the shipped tokens, json and figure")
    ap.add_argument("--arms", default="inversion,rescale_only,core")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "core.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    generator = load_generator(args.generator).frozen()
    judge = load_judge(args.generator)
    model = cliplab.load(generator.info.get("text_model", "shapes-tiny")).float().eval()
    conditioner = TextConditioner(model, space=generator.info.get("space", "final"))
    reg_contexts, held_out = context_split()
    reg_prompts = core.context_prompts("S*", reg_contexts)
    eval_sets = {"held_out": core.context_prompts("S*", held_out), "regularised": reg_prompts}
    images = concept_images()
    common = dict(stage1_steps=args.stage1_steps, stage2_steps=args.stage2_steps, lr=args.lr,
                  stage2_lr=args.stage2_lr, batch_size=args.batch_size, seed=args.seed, progress=False)

    results = {"concept": list(CONCEPT), "class_word": CLASS_WORD, "concept_images": "render_spec seeds 0-7",
               "generator_sha256_16": generator_digest(args.generator), "generator_info": generator.info,
               "reg_contexts": reg_contexts, "held_out_contexts": held_out, "settings": vars(args), "arms": {}}
    arms = {
        "inversion": lambda: core.textual_inversion(model, generator, images, CLASS_WORD, **common),
        "rescale_only": lambda: core.learn_concept(model, generator, images, CLASS_WORD, lambda_emb=0.0,
                                                   lambda_attn=0.0, rescale=args.rescale, **common),
        "core": lambda: core.learn_concept(model, generator, images, CLASS_WORD, reg_prompts=reg_prompts,
                                           reg_batch=args.reg_batch, lambda_emb=args.lambda_emb,
                                           lambda_attn=args.lambda_attn, rescale=args.rescale, **common),
    }
    tokens, grids = {}, []
    for name in args.arms.split(","):
        run = arms[name]
        t0 = time.time()
        result = run()
        train_s = time.time() - t0
        token = tokens[name] = result.token
        entry = {"train_seconds_loaded": round(train_s, 1), "final_norm": round(token.vector.norm().item(), 4),
                 "history_tail": result.history[-3:]}
        for set_name, prompts in eval_sets.items():
            s = core.context_scores(token, generator, judge, CONCEPT, prompts, steps=args.sample_steps,
                                    seed=args.seed, samples=args.samples)
            if set_name == "held_out":
                grids.append(s["images"][: 2 * args.samples * 4: args.samples])
            entry[set_name] = {k: round(v, 4) for k, v in s.items() if k != "images"}
            entry[set_name]["emb_cos"] = round(embedding_cosine(token, prompts), 4)
        results["arms"][name] = entry
        print(name, json.dumps(entry, indent=None), flush=True)
    results["reference_real_words"] = {
        k: {m: round(v, 4) for m, v in reference_scores(conditioner, generator, judge, p, args.sample_steps,
                                                            args.seed, args.samples).items()}
        for k, p in eval_sets.items()}
    print("reference", results["reference_real_words"], flush=True)
    if args.no_ship:
        print(json.dumps(results, indent=2))
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    for name, token in tokens.items():
        if name not in ("core", "inversion"):
            continue
        token.save(PRETRAINED / name, info={"method": name, "class_word": CLASS_WORD, "concept": list(CONCEPT),
                                            "generator_sha256_16": results["generator_sha256_16"],
                                            "held_out_contexts": held_out,
                                            "made_by": "experiments/core_train.py", "settings": vars(args)})
    save_grid(torch.cat(grids), ROOT / "docs" / "img" / "core_samples.png", columns=len(grids[0]))
    print("wrote", out)


if __name__ == "__main__":
    main()
