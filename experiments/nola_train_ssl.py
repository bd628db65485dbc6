"""Train a shipped self-supervised encoder for NoLA (DINO-style self-distillation, no labels).

    python experiments/nola_train_ssl.py                                   # dino-conv-shapes-objects, ~10 min
    python experiments/nola_train_ssl.py dino-conv-shapes-blur             # the first encoder, ~12 min
    python experiments/nola_train_ssl.py dino-conv-shapes-objects 400 n_local=4   # a trial, written under /tmp

Data: random single-object scenes of the synthetic world, Gaussian-blurred (radius 0.8 px), the domain of
``blurred_shape_task``; the trainer gets pixels only (no attribute of any scene is returned by
``unlabelled_scene_pixels``). Writes cliplab/zeroshot/pretrained/<name>/ and experiments/results/<result file>: the
loss log and how well the features group shapes, scored with labels that the training never saw:

* 5-NN shape accuracy on a held-out task (``blurred_shape_task(30, seed=5)``, leave-one-out) of the trained encoder,
  of the same network at its seeded initialisation, and of the encoder's own input view as raw pixels (for the
  object-crop encoder: the grayscale, standardised object crop; the control for "did training add anything");
* a linear probe (logistic regression on the features, trained on the seed-5 task's labels, scored on seed 6): how
  much shape information a labeller could read from them at best.

Encoders:

* ``dino-conv-shapes-blur``: the whole 64 px image, luminance only (the first shipped encoder; 5-NN 0.64).
* ``dino-conv-shapes-objects``: the same recipe on the object crop (``DINOConfig.object_crop``: the object centred at
  a fixed size, so position and size, which are not the class, are gone before the network sees the image), 32 px,
  wider channels, batch 64.
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
VARIANTS = {
    "dino-conv-shapes-blur": dict(
        config=DINOConfig(image_size=64, channels=(16, 32, 64), grayscale=True, n_prototypes=64, lr=2e-3,
                          momentum=0.99, global_scale=(0.36, 2.0), local_scale=(0.2, 0.6), local_size=32, steps=700,
                          batch_size=32, blur_sigma=(0.1, 2.0)),
        corpus=1500, result="nola_ssl.json"),
    "dino-conv-shapes-objects": dict(
        config=DINOConfig(image_size=32, channels=(32, 64, 128), grayscale=True, object_crop=True, n_prototypes=64,
                          lr=2e-3, momentum=0.99, global_scale=(0.5, 1.0), local_scale=(0.15, 0.4), local_size=16,
                          steps=600, batch_size=64, blur_sigma=(0.1, 2.0)),
        corpus=5000, result="nola_ssl_objects.json"),
}


def knn_accuracy(feats: torch.Tensor, labels: torch.Tensor, k: int = 5) -> float:
    """Leave-one-out k-NN (cosine) accuracy."""
    f = F.normalize(feats, dim=-1)
    sim = f @ f.t()
    sim.fill_diagonal_(-2)
    return float((labels[sim.topk(k, dim=1).indices].mode(dim=1).values == labels).float().mean())


def linear_probe_accuracy(train_feats, train_labels, test_feats, test_labels, epochs: int = 300) -> float:
    """Logistic regression on standardised features (Adam, full batch), scored on the test features."""
    torch.manual_seed(0)
    mu, sd = train_feats.mean(0), train_feats.std(0) + 1e-6
    a, b = (train_feats - mu) / sd, (test_feats - mu) / sd
    lin = torch.nn.Linear(a.shape[1], int(train_labels.max()) + 1)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(epochs):
        loss = F.cross_entropy(lin(a), train_labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((lin(b).argmax(1) == test_labels).float().mean())


def raw_view(encoder: DINOConvEncoder, pixels: torch.Tensor) -> torch.Tensor:
    """The encoder's input view (object crop or resized image, grayscale-standardised) flattened: raw pixels."""
    with torch.no_grad():
        return encoder.normalize_pixels(encoder.view(pixels)).flatten(1)


def main(name: str = "dino-conv-shapes-objects", steps: int | None = None, overrides: dict | None = None) -> dict:
    """Train variant ``name``; with ``steps`` or ``overrides`` (DINOConfig fields) it is a trial, written under
    /tmp instead of the shipped folder."""
    torch.set_num_threads(1)
    variant = VARIANTS[name]
    t0 = time.time()
    corpus = unlabelled_scene_pixels(variant["corpus"], seed=99)
    trial = steps is not None or bool(overrides)
    changes = {**(overrides or {}), **({"steps": steps} if steps is not None else {})}
    cfg = DINOConfig(**{**vars(variant["config"]), **changes}) if trial else variant["config"]
    encoder, history = train_dino(corpus, cfg, log_every=50, on_log=lambda r: print(r, flush=True))
    train_s = time.time() - t0
    task, probe_test = blurred_shape_task(30, seed=5), blurred_shape_task(30, seed=6)
    x, y = images_to_pixels(task.images), torch.tensor(task.labels)
    xp, yp = images_to_pixels(probe_test.images), torch.tensor(probe_test.labels)
    torch.manual_seed(cfg.seed)
    init = DINOConvEncoder(cfg)
    result = {
        "name": name,
        "config": {k: v for k, v in vars(cfg).items() if k != "extra"},
        "corpus": f"{variant['corpus']} random single-object scenes, blur 0.8 px, seed 99 (pixels only)",
        "history": history,
        "train_seconds": round(train_s, 1),
        "knn5_shape_accuracy": {"trained": knn_accuracy(encoder.encode(x), y),
                                "seeded_init": knn_accuracy(init.encode(x), y),
                                "raw_input_view": knn_accuracy(raw_view(encoder, x), y),
                                "test": "blurred_shape_task(30, seed=5): 8 shapes x 30, leave-one-out"},
        "linear_probe_shape_accuracy": {
            "trained": linear_probe_accuracy(encoder.encode(x), y, encoder.encode(xp), yp),
            "seeded_init": linear_probe_accuracy(init.encode(x), y, init.encode(xp), yp),
            "raw_input_view": linear_probe_accuracy(raw_view(encoder, x), y, raw_view(encoder, xp), yp),
            "test": "fit on blurred_shape_task(30, seed=5), scored on blurred_shape_task(30, seed=6)"},
    }
    tag = "-".join(f"{k}={v}" for k, v in changes.items()).replace(" ", "").replace("/", "_")
    out_dir = Path(f"/tmp/{name}-{tag}") if trial else SHIPPED_SSL_ENCODERS[name]
    encoder.save(out_dir)
    out = Path(f"/tmp/{name}-{tag}.json") if trial else ROOT / "experiments" / "results" / variant["result"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("knn5_shape_accuracy", "linear_probe_shape_accuracy")}),
          f"{train_s:.0f} s, encoder in {out_dir}, results in {out}")
    return result


if __name__ == "__main__":
    # name [steps] [field=json-value ...]: a trial with other settings, e.g. n_local=4 'blur_sigma=[0.5,2.5]'
    args = sys.argv[1:]
    extra = {k: json.loads(v) for k, _, v in (a.partition("=") for a in args[2:])}
    extra = {k: tuple(v) if isinstance(v, list) else v for k, v in extra.items()}
    main(args[0] if args else "dino-conv-shapes-objects", int(args[1]) if len(args) > 1 else None, extra)
