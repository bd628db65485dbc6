"""Train the shipped self-supervised encoder (DINO-style self-distillation, no labels) for NoLA.

    python experiments/nola_train_ssl.py            # ~10 min on 1 loaded CPU thread

Data: random single-object scenes of the synthetic world, Gaussian-blurred (radius 0.8 px), the domain of
``blurred_shape_task``; the trainer gets pixels only (no attribute of any scene is returned by
``unlabelled_scene_pixels``). Writes cliplab/zeroshot/pretrained/dino-conv-shapes-blur/ and
experiments/results/nola_ssl.json: the loss log, and a 5-NN shape accuracy of the features on a held-out labelled
task (labels used only to score) against the same network at its seeded initialisation.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cliplab.zeroshot.nola import blurred_shape_task, unlabelled_scene_pixels
from cliplab.zeroshot.ssl_encoder import SHIPPED_SSL_ENCODERS, DINOConfig, DINOConvEncoder, images_to_pixels, train_dino

ROOT = Path(__file__).resolve().parents[1]
CONFIG = DINOConfig(image_size=64, channels=(16, 32, 64), grayscale=True, n_prototypes=64, lr=2e-3,
                    momentum=0.99, global_scale=(0.36, 2.0), local_scale=(0.2, 0.6), local_size=32, steps=700,
                    batch_size=32, blur_sigma=(0.1, 2.0))


def knn_accuracy(feats: torch.Tensor, labels: torch.Tensor, k: int = 5) -> float:
    f = F.normalize(feats, dim=-1)
    sim = f @ f.t()
    sim.fill_diagonal_(-2)
    return float((labels[sim.topk(k, dim=1).indices].mode(dim=1).values == labels).float().mean())


def main(steps: int | None = None) -> dict:
    torch.set_num_threads(1)
    t0 = time.time()
    corpus = unlabelled_scene_pixels(1500, seed=99)
    cfg = CONFIG if steps is None else DINOConfig(**{**vars(CONFIG), "steps": steps})
    encoder, history = train_dino(corpus, cfg, log_every=50, on_log=lambda r: print(r, flush=True))
    train_s = time.time() - t0
    task = blurred_shape_task(30, seed=5)
    x, y = images_to_pixels(task.images), torch.tensor(task.labels)
    torch.manual_seed(cfg.seed)
    init = DINOConvEncoder(cfg)
    result = {
        "config": {k: v for k, v in vars(cfg).items() if k != "extra"},
        "corpus": "1500 random single-object scenes, blur 0.8 px, seed 99 (pixels only)",
        "history": history,
        "train_seconds": round(train_s, 1),
        "knn5_shape_accuracy": {"trained": knn_accuracy(encoder.encode(x), y),
                                "seeded_init": knn_accuracy(init.encode(x), y),
                                "test": "blurred_shape_task(30, seed=5): 8 shapes x 30"},
    }
    encoder.save(SHIPPED_SSL_ENCODERS["dino-conv-shapes-blur"])
    out = ROOT / "experiments" / "results" / "nola_ssl.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["knn5_shape_accuracy"]), f"{train_s:.0f} s")
    return result


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else None)
