"""CLOC on the synthetic world: region -> noun-phrase retrieval and image-level zero-shot, against crop-and-encode.

Arms (same start shapes-tiny, same seed, scenes, steps, batches and trained blocks where trained):
  plain crop-and-encode | plain + Prompter at initialisation (RoI-masked class token, no training)
  | crops control: fine-tuned with the CLIP loss on images and on crop -> phrase pairs, evaluated by crop-and-encode
  | CLOC: fine-tuned with the CLIP loss + region-text loss through the Prompter.
Writes experiments/results/cloc-2026-12-07.json."""

import json
import sys
import time
from pathlib import Path

import cliplab
from cliplab.data.synthetic import SceneWorld
from cliplab.dense.cloc import (ClocConfig, ClocModel, cloc_embedder, crop_embedder, region_retrieval, train_cloc,
                                zero_shot_accuracy)

STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 150
POOL = int(sys.argv[2]) if len(sys.argv) > 2 else 256
N_EVAL = 100


def main():
    scenes = [SceneWorld(64, seed=1).sample(i) for i in range(N_EVAL)]
    res = {"steps": STEPS, "pool_scenes": POOL, "eval_scenes": N_EVAL}
    t = time.time()

    def record(name, model, embed):
        r = region_retrieval(scenes, embed, lambda texts: model.encode_texts(texts))
        r["zero_shot_shape"] = zero_shot_accuracy(model, "shape", 20)
        r["zero_shot_colour"] = zero_shot_accuracy(model, "colour", 20)
        res[name] = r
        print(name, {k: round(v, 4) for k, v in r.items()}, round(time.time() - t), flush=True)

    plain = cliplab.load("shapes-tiny")
    record("plain crop-and-encode", plain, crop_embedder(plain))
    record("plain + prompter at init", plain, cloc_embedder(ClocModel(plain)))
    cfg = ClocConfig(steps=STEPS, pool_scenes=POOL)
    crops = train_cloc(cliplab.load("shapes-tiny"), cfg, arm="crops")
    record("crops control (crop-and-encode)", crops.model, crop_embedder(crops.model))
    cloc = train_cloc(cliplab.load("shapes-tiny"), cfg, arm="cloc")
    record("cloc (prompter)", cloc.model, cloc_embedder(cloc))
    res["seconds"] = round(time.time() - t, 1)
    (Path(__file__).parent / "results" / "cloc-2026-12-07.json").write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
