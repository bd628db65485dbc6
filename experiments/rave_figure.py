"""RAVE on backlit synthetic scenes: the guided enhancer against identity, the unguided (reconstruction-only) control
and random-direction controls; the code's guidance target; r from paired data; r shifted by token removal; the
tokens nearest to r. Writes experiments/results/rave.json and docs/img/rave.png.

    python experiments/rave_figure.py            # ~9 min on one loaded CPU core
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import cliplab
from cliplab.enhance import rave
from cliplab.enhance.enhancer import to_pil

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN, N_TEST, SEED = 128, 64, 0
TRAIN = dict(steps=40, batch_size=16, lr=5e-3, guidance_weight=30.0, seed=SEED)  # the same in every arm


def token_report(model, vector, ids, tokens, n=10):
    def names(largest):
        idx = rave.nearest_tokens(vector, tokens, n, largest=largest)
        cos = F.normalize(tokens[idx], dim=-1) @ vector
        return [[name, round(float(c), 3)] for name, c in zip(rave.token_names(model, [ids[int(i)] for i in idx]), cos)]

    return {"clean_side": names(True), "degraded_side": names(False)}


def main():
    torch.set_num_threads(1)
    t0 = time.time()
    model = cliplab.load("shapes-tiny").eval()
    train = rave.synthetic_pairs(N_TRAIN, seed=SEED)
    test = rave.synthetic_pairs(N_TEST, seed=SEED + 1)
    half = N_TRAIN // 2
    unpaired = rave.compute_residual(model, train.clean[:half], train.degraded[half:])
    paired = rave.compute_residual(model, train.clean[half:], train.degraded[half:])
    ids = rave.vocabulary_ids(model)
    tokens = rave.token_embeddings(model, ids)
    words = {w: F.normalize(model.encode_texts([w]), dim=-1)[0] for w in ("dark", "bright", "circle", "star")}

    directions = {"rave": unpaired, "rave_paired_r": paired}
    gs, gs_idx = rave.remove_token_directions(unpaired.vector, tokens, 5, mode="gram_schmidt")
    off, _ = rave.remove_token_directions(unpaired.vector, tokens, 15, mode="official")
    directions["rave_shift_gram_schmidt_5"] = unpaired.with_vector(gs)
    directions["rave_shift_official_15"] = unpaired.with_vector(off)
    interp = {name: {"tokens": token_report(model, res.vector, ids, tokens),
                     "cos_words": {w: round(float(e @ res.vector), 3) for w, e in words.items()}}
              for name, res in (("unpaired", unpaired), ("paired", paired),
                                ("unpaired_shift_gram_schmidt_5", directions["rave_shift_gram_schmidt_5"]))}
    interp["removed_gram_schmidt_5"] = rave.token_names(model, [ids[int(i)] for i in gs_idx])

    # every arm is scored against the unpaired r (the RAVE arm's own direction)
    arms = {"identity": rave.evaluate_enhancer(model, None, test, unpaired)}
    outputs = {"identity": test.degraded}
    unguided, _ = rave.train_enhancer(model, train.degraded[half:], None, **TRAIN)
    arms["unguided_reconstruction_only"] = rave.evaluate_enhancer(model, unguided, test, unpaired)
    runs = [(name, res, "clean") for name, res in directions.items()]
    runs.append(("rave_code_target_threshold", unpaired, "threshold"))
    runs += [(f"random_direction_seed{s}", rave.random_residual(unpaired, seed=s), "clean") for s in range(3)]
    for name, res, target in runs:
        t = time.time()
        enhancer, hist = rave.train_enhancer(model, train.degraded[half:], res, target=target, **TRAIN)
        arms[name] = rave.evaluate_enhancer(model, enhancer, test, unpaired) | {"final_loss": hist[-1]}
        with torch.no_grad():
            outputs[name] = enhancer(test.degraded)
        print(f"{name}: psnr {arms[name]['psnr_enhanced']:.2f} cos {arms[name]['cos_enhanced']:.3f} "
              f"luma {arms[name]['luma_enhanced']:.3f} ({time.time() - t:.0f} s)", flush=True)

    result = {"setup": {"model": "shapes-tiny (frozen)", "n_train": N_TRAIN, "n_test": N_TEST, "world_seed_train": SEED,
                        "world_seed_test": SEED + 1, "degradation": "backlit: 0.3 * x**1.3 on objects, "
                        "0.7 * x**1.3 on background", "r": "clean first half vs degraded second half (unpaired)",
                        "train": TRAIN | {"target": "clean projection unless named"},
                        "threshold": unpaired.threshold, "clean_projection": unpaired.clean_projection,
                        "clean_center_norm": float(unpaired.clean_center.norm())},
              "arms": arms, "interpretation": interp, "seconds": round(time.time() - t0)}
    out = ROOT / "experiments" / "results" / "rave.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))

    # figure: 4 held-out scenes; columns clean, backlit input, RAVE, code target, random direction
    cols = [("clean", test.clean), ("backlit", test.degraded), ("RAVE", outputs["rave"]),
            ("thr target", outputs["rave_code_target_threshold"]), ("random r", outputs["random_direction_seed0"])]
    s, pad, top = 64 * 2, 4, 16
    grid = Image.new("RGB", (len(cols) * (s + pad), top + 4 * (s + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for c, (label, images) in enumerate(cols):
        draw.text((c * (s + pad) + 4, 2), label, fill="black")
        for r, im in enumerate(to_pil(images[:4])):
            grid.paste(im.resize((s, s), Image.NEAREST), (c * (s + pad), top + r * (s + pad)))
    img = ROOT / "docs" / "img" / "rave.png"
    img.parent.mkdir(parents=True, exist_ok=True)
    grid.save(img, optimize=True)
    print(f"wrote {out} and {img} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
