"""Attribute control's learned direction against the shipped generator: train, ship, measure, draw.

    python experiments/attribute_control_learned.py            # learn + measure + figure
    python experiments/attribute_control_learned.py --measure  # measure the shipped delta only

1. Learns a red-vs-blue colour delta in the generator's conditioning space (shapes-tiny ``final`` states) with
   :func:`cliplab.text_edit.attribute_control_learned.learn_direction` on the four generator shapes, and ships it
   (``cliplab/text_edit/pretrained/attribute_control_learned/red-blue/``, with how it was made and which generator).
2. The control: the optimisation-free delta (:func:`find_direction`, ``space="final"``) from the same pairs and
   prefixes.
3. Measures, on held-out two-object prompts "a blue <subject> and a <colour> <other>": for each alpha, the judge's
   colour of the edited subject (P(red), share judged red, share still judged blue) and whether the other object
   keeps its colour and both shapes are drawn; same prompts, same seeds, same sampler for every arm.
   Numbers -> experiments/results/attribute_control_learned.json; figure -> docs/img/attribute_control_learned.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import cliplab
from cliplab.generation import (GEN_COLOURS, GEN_SHAPES, TextConditioner, load_generator, load_judge, prompt_for,
                                save_grid)
from cliplab.text_edit.attribute_control import find_direction
from cliplab.text_edit.attribute_control_learned import (AttributePrompt, attribute_readout, encode_with_direction,
                                                         generator_fingerprint, learn_direction, load_direction,
                                                         save_direction)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "cliplab" / "text_edit" / "pretrained" / "attribute_control_learned" / "red-blue"
RESULTS = ROOT / "experiments" / "results" / "attribute_control_learned.json"
FIGURE = ROOT / "docs" / "img" / "attribute_control_learned.png"

POSITIVE, NEGATIVE = "red", "blue"
ALPHAS = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0)
# the learned delta's prompts: target = the subject in its negative colour (every generator prompt names a colour);
# prefixes put the subject second in a two-object prompt, as in the evaluation
PREFIXES = ("", "a green cross and", "a yellow triangle and", "a purple square and", "a cyan circle and")


def prompts_for(shapes=GEN_SHAPES) -> list[AttributePrompt]:
    return [AttributePrompt(f"a {NEGATIVE} {s}", f"a {POSITIVE} {s}", f"a {NEGATIVE} {s}", s) for s in shapes]


def eval_prompts(n_per_subject: int = 6, seed: int = 0) -> list[tuple[str, str, str, str]]:
    """``(prompt, subject, other shape, other colour)``: "a blue <subject> and a <colour> <other>" (other colour
    neither red nor blue), and the subject second half of the time."""
    g = torch.Generator().manual_seed(seed)
    others = [c for c in GEN_COLOURS if c not in (POSITIVE, NEGATIVE)]
    rows = []
    for subject in GEN_SHAPES:
        shapes = [s for s in GEN_SHAPES if s != subject]
        for k in range(n_per_subject):
            other = shapes[int(torch.randint(len(shapes), (1,), generator=g))]
            colour = others[int(torch.randint(len(others), (1,), generator=g))]
            pairs = [(NEGATIVE, subject), (colour, other)]
            prompt = prompt_for(pairs if k % 2 == 0 else pairs[::-1])
            rows.append((prompt, subject, other, colour))
    return rows


@torch.no_grad()
def measure(gen, judge, conditioner, deltas: dict, rows, alphas=ALPHAS, steps: int = 20, seed: int = 0,
            keep_images: bool = False) -> tuple[dict, dict]:
    texts = [r[0] for r in rows]
    subjects = [r[1] for r in rows]
    out, images = {}, {}
    base = None  # alpha = 0 leaves the conditioning bit-identical (tested): one sampling run serves every arm
    for name, delta in deltas.items():
        curve = []
        for a in ((4.0,) if name == "zero" else alphas):
            if a == 0 and base is not None:
                x = base
            else:
                cond = encode_with_direction(conditioner, texts, subjects, delta, a)
                x = gen.sample(cond, steps=steps, seed=seed)
            base = x if a == 0 else base
            reads = [attribute_readout(judge, x[i:i + 1], s, POSITIVE, NEGATIVE) for i, s in enumerate(subjects)]
            parsed = judge.parse(x)
            other_kept = [p.get(r[3]) == r[2] for p, r in zip(parsed, rows)]
            other_present = [r[3] in p for p, r in zip(parsed, rows)]
            curve.append({"alpha": a, "edit_norm": round(float(a * delta.norm()), 3),
                          "red_share": round(float(torch.cat([r["share"] for r in reads]).mean()), 4),
                          "judged_red": round(float(torch.cat([r["positive"] for r in reads]).float().mean()), 4),
                          "judged_blue": round(float(torch.cat([r["negative"] for r in reads]).float().mean()), 4),
                          "other_colour_present": round(sum(other_present) / len(rows), 4),
                          "other_kept": round(sum(other_kept) / len(rows), 4)})
            if keep_images:
                images[(name, a)] = x
        out[name] = curve
    return out, images


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--measure", action="store_true", help="measure the shipped delta, do not learn")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--n", type=int, default=6, help="evaluation prompts per subject shape")
    args = ap.parse_args()
    torch.set_num_threads(1)
    gen = load_generator("scenes-32").frozen()
    judge = load_judge("scenes-32")
    model = cliplab.load(gen.info.get("text_model", "shapes-tiny")).float().eval()
    conditioner = TextConditioner(model, space=gen.info.get("space", "final"))
    gid = generator_fingerprint(gen)
    learn_cfg = dict(steps=args.steps, batch_size=8, scales_per_sample=4, samples_per_prompt=2, sample_steps=20,
                     seed=0)
    if not args.measure:
        t0 = time.time()
        learned = learn_direction(gen, conditioner, prompts_for(), PREFIXES, **learn_cfg)
        save_direction(learned, SHIPPED, info={"generator": "scenes-32", "generator_sha256_16": gid,
                                               "text_model": "shapes-tiny", "made_by":
                                               "experiments/attribute_control_learned.py",
                                               "seconds": round(time.time() - t0)})
    learned = load_direction(SHIPPED)
    naive = find_direction(model, [(f"{POSITIVE} {s}", f"{NEGATIVE} {s}") for s in GEN_SHAPES],
                           prefixes=["a"] + [f"{p} a" for p in PREFIXES if p], space=conditioner.space)
    deltas = {"learned": learned.delta, "optimisation-free": naive,
              "optimisation-free, learned norm": naive * (learned.delta.norm() / naive.norm()),
              "zero": torch.zeros_like(naive)}
    rows = eval_prompts(args.n)
    curves, images = measure(gen, judge, conditioner, deltas, rows, keep_images=True)
    result = {"generator": "scenes-32", "generator_sha256_16": gid, "space": conditioner.space,
              "attribute": f"{NEGATIVE} -> {POSITIVE}", "n_prompts": len(rows), "sample_steps": 20, "seed": 0,
              "delta_norms": {k: round(float(v.norm()), 3) for k, v in deltas.items()},
              "cosine_learned_vs_optimisation_free": round(float(torch.nn.functional.cosine_similarity(
                  learned.delta, naive, dim=0)), 4), "curves": curves,
              "learn_config": learned.config}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "learn_config"}, indent=1))
    # figure: 4 prompts (one per subject shape); for each, one row per arm, one column per alpha
    arms = ("learned", "optimisation-free", "optimisation-free, learned norm")
    picks = [i * args.n for i in range(len(GEN_SHAPES))]
    tiles = [images[(arm, a)][i] for i in picks for arm in arms for a in ALPHAS]
    save_grid(torch.stack(tiles), FIGURE, columns=len(ALPHAS), scale=2)
    print("figure rows: prompts", [rows[i][0] for i in picks], "x arms", arms, "; columns alpha", ALPHAS)


if __name__ == "__main__":
    main()
