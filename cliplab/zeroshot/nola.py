"""NoLA: label-free tuning of CLIP's zero-shot classifier from an unlabelled image collection.

Paper: M. F. Imam, R. F. Marew, J. Hassan, M. Fiaz, A. F. Aji, H. Cholakkal, "CLIP meets DINO for Tuning Zero-Shot
Classifier using Unlabeled Image Collections" (NoLA, "No Labels Attached"; official code fazliimam/NoLA,
``trainers/NoLA.py``, ``utils/utils.py``). Four stages, all without labels:

1. **Class description embeddings** (:func:`cde_weights`): every description and every template prompt of a class
   is encoded by CLIP's text tower, L2-normalised, averaged and normalised again: ``W_cde`` ``[D, C]``.
2. **Pseudo-labels** (:func:`select_top_k`, :func:`nola_k`): CLIP's softmax over ``logit_scale * cos(image,
   W_cde)`` on every unlabelled training image; per class ``c`` the ``k`` most confident images whose argmax is
   ``c``, ``k = max(16, floor(0.2 N / C))``. As in the official ``top_k_indices_per_class2``, a class that is
   nobody's argmax takes its images from the second choice (then the third).
3. **Alignment (labelling) module** (:class:`AlignmentMLP`, :func:`train_alignment`): an MLP ``D_ssl -> 256 ->
   ReLU -> C`` on the frozen self-supervised encoder's features of the top-k images, cross-entropy on their
   pseudo-labels, Adam at its default lr.
4. **Prompt tuning** (:class:`NoLAClassifier`, :func:`fit_nola`): VPT-shallow, ``n_prompts`` learnable tokens
   inserted after CLS before ``ln_pre`` (uniform init ``+-sqrt(6 / (3 p^2 + W))``, ``p`` the patch size), plus
   every LayerNorm of the vision tower (``ln_pre``, each block's ``ln_1``/``ln_2``, ``ln_post``), plus a bias-free
   linear head initialised with ``W_cde`` acting on CLIP's **unnormalised** projected image feature (as the
   official ``cde_adapter``). Target: argmax of the alignment module on a weak view (resize only); input: a strong
   view (random resized crop, flip, colour jitter, blur) of every unlabelled image. Label-smoothing CE (0.1, timm's
   default in the official ``LabelSmoothingCrossEntropy``); AdamW lr 0.004, weight decay 0.01 on the prompts and
   the head, 0 on LayerNorm parameters.

Inference: ``head(encode_image(pixels, prompts=P))``.

Measured (experiments/nola_measure.py, docs/methods/nola.md; blurred 8-shape task, 3 seeds): with the object-crop
SSL encoder NoLA beats the CDE classifier it starts from (0.603 vs 0.538), but the same tuning on CLIP's own
zero-shot labels does about as well (0.585): the gain is stage 4's, not the "DINO"'s. The shipped SSL stand-ins label
images no better than CLIP (alignment MLP on the test images 0.40 with the first encoder, with which NoLA fell to
0.488, and 0.46 with the object-crop one), and CLIP's top-k labels are systematically wrong for three of the eight
shapes (a labeller with perfect shape clusters would reach 0.75).

With 0 prompts the prompted forward equals the plain one bit for bit on a batch that the plain path runs in one
inference slice (it slices large batches, the token path does not; within 1e-5 otherwise).

Where it acts on the shipped ``shapes-tiny``: the prompts enter the ViT after the patch embedding and positions,
before ``ln_pre``; the LayerNorms are all the ViT's; the head reads the pooled, projected output (CLS through
``ln_post`` and ``proj`` plus the max-skip term from the conv stem, which the prompts cannot change).

Choices that differ from the paper / official code, and why:

* The "DINO" is not DINO ViT-B/16 but a small CNN trained here by DINO self-distillation on unlabelled synthetic
  images (:mod:`cliplab.zeroshot.ssl_encoder`); any :class:`~cliplab.zeroshot.ssl_encoder.SSLImageEncoder` works.
* Descriptions are not GPT-3 text but attribute phrases built from the synthetic world's vocabulary
  (:func:`world_descriptions`: "a red star", "a small star", "a striped star", ...): the shipped text tower knows
  only that vocabulary. Templates are the world's noun-phrase form (``"a {}"``).
* ``n_prompts`` defaults to 16, not 50: the tiny ViT has 64 patches (ViT-B/16 has 196), and CPU time.
* Training runs a fixed number of steps (default 150, batch 64) instead of up to 50 epochs with early stopping: the
  official early stopping reads a labelled validation split, which a label-free method cannot have.
* The official code also puts the weak view through the TAAL for pseudo-labels of the whole train set; identical
  here. It builds the top-k set from the test transform; identical (the weak view).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..methods import register_method
from .classifier import ZeroShotClassifier
from .ssl_encoder import SSLImageEncoder, augment, images_to_pixels

register_method(
    "nola",
    "CLIP meets DINO for Tuning Zero-Shot Classifier using Unlabeled Image Collections (NoLA)",
    "label-free: description-based classifier -> top-k confident pseudo-labels -> an MLP on self-supervised "
    "features labels every image -> VPT-shallow prompts + visual LayerNorms + CDE-initialised head tuned on them",
    doc="docs/methods/nola.md",
)(__name__)

__all__ = ["NoLAConfig", "nola_k", "select_top_k", "world_descriptions", "cde_weights", "AlignmentMLP",
           "train_alignment", "NoLAClassifier", "NoLAResult", "fit_nola", "train_prompts", "clip_pixels",
           "zero_shot_probs", "vpt_init_bound", "blurred_shape_task", "unlabelled_scene_pixels",
           "is_nola_classifier_file", "nola_classifier_metadata"]


@dataclass
class NoLAConfig:
    """Hyper-parameters of :func:`fit_nola` (module docstring for the paper's values)."""

    n_prompts: int = 16
    k_min: int = 16
    k_fraction: float = 0.2
    mlp_hidden: int = 256
    mlp_epochs: int = 50
    mlp_lr: float = 1e-3
    mlp_batch_size: int = 32
    lr: float = 0.004
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    steps: int = 150
    batch_size: int = 64
    strong_scale: tuple[float, float] = (0.5, 1.0)
    seed: int = 0
    extra: dict = field(default_factory=dict)


# --- stage 1: class description embeddings -------------------------------------------------------------------------

def world_descriptions(world, by: str = "shape") -> dict[str, list[str]]:
    """Descriptions of each class from the synthetic world's attribute vocabulary (the stand-in for an LLM's):
    for a shape, ``"a red star"`` for every colour, ``"a small star"`` for every size, ``"a striped star"`` for
    every non-plain texture; for a colour, ``"a red circle"`` for every shape and so on."""
    if by == "shape":
        return {s: [f"a {c} {s}" for c in world.colours] + [f"a {z} {s}" for z in world.sizes]
                + [f"a {t} {s}" for t in world.textures if t != "plain"] for s in world.shapes}
    if by == "colour":
        return {c: [f"a {c} {s}" for s in world.shapes] + [f"a {z} {c} {s}" for z in world.sizes
                                                            for s in world.shapes[:1]] for c in world.colours}
    raise ValueError(f"by must be 'shape' or 'colour', got {by!r}")


def cde_weights(model, classnames: Sequence[str], descriptions: Mapping[str, Sequence[str]] | None = None,
                templates: Sequence[str] = ("a {}",), description_template: str = "{d}",
                batch_size: int = 256) -> ZeroShotClassifier:
    """The CDE classifier: per class the normalised mean of its normalised description and template embeddings
    (all pooled, each prompt weighing the same, as the official ``gen_emb``). ``.weights.T`` is ``W_cde``."""
    return ZeroShotClassifier.from_classnames(model, list(classnames), list(templates), descriptions,
                                              description_template=description_template, description_mode="pool",
                                              batch_size=batch_size)


# --- stage 2: top-k pseudo-labels ----------------------------------------------------------------------------------

def nola_k(n_train: int, n_classes: int, k_min: int = 16, fraction: float = 0.2) -> int:
    """The paper's ``k = max(16, floor(0.2 N / C))``."""
    if n_classes < 1 or n_train < 0:
        raise ValueError(f"need n_classes >= 1 and n_train >= 0, got {n_classes}, {n_train}")
    return max(k_min, int(math.floor(fraction * n_train / n_classes)))


def select_top_k(probs: torch.Tensor, k: int, fallback: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per class ``c``, the ``k`` rows of ``probs`` ``[N, C]`` with argmax ``c`` of highest ``probs[:, c]``, most
    confident first. Returns ``(indices, pseudo_labels, confidences)``, classes in order. ``fallback``: a class
    that is no row's argmax takes the rows whose 2nd (then 3rd) choice it is, by that probability; a row is kept
    once (first class wins), as the official ``drop_duplicates``."""
    if probs.ndim != 2 or k < 1:
        raise ValueError(f"need probs [N, C] and k >= 1, got {tuple(probs.shape)} and {k}")
    ranks = probs.topk(min(3, probs.shape[1]), dim=1)
    idx_out, lab_out, conf_out, seen = [], [], [], set()
    for c in range(probs.shape[1]):
        for r in range(ranks.indices.shape[1] if fallback else 1):
            rows = (ranks.indices[:, r] == c).nonzero().flatten()
            if len(rows):
                break
        conf = probs[rows, c]
        order = conf.argsort(descending=True, stable=True)[:k]
        for i, p in zip(rows[order].tolist(), conf[order].tolist()):
            if i not in seen:
                seen.add(i)
                idx_out.append(i)
                lab_out.append(c)
                conf_out.append(p)
    return torch.tensor(idx_out, dtype=torch.long), torch.tensor(lab_out, dtype=torch.long), torch.tensor(conf_out)


# --- stage 3: the alignment (labelling) module ---------------------------------------------------------------------

class AlignmentMLP(nn.Module):
    """``Linear(D, hidden) -> ReLU -> Linear(hidden, C)`` on frozen SSL features (the official ``AdapterMLP``)."""

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features)


def train_alignment(features: torch.Tensor, pseudo_labels: torch.Tensor, n_classes: int, *, hidden: int = 256,
                    epochs: int = 50, lr: float = 1e-3, batch_size: int = 32, seed: int = 0) -> AlignmentMLP:
    """Cross-entropy on (SSL features, pseudo-labels) of the top-k set, Adam, shuffled mini-batches."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    mlp = AlignmentMLP(features.shape[1], n_classes, hidden)
    opt = torch.optim.Adam(mlp.parameters(), lr=lr)
    for _ in range(epochs):
        for b in torch.randperm(len(features), generator=g).split(batch_size):
            loss = F.cross_entropy(mlp(features[b]), pseudo_labels[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return mlp.eval()


# --- stage 4: prompt-tuned CLIP with the CDE head ------------------------------------------------------------------

def clip_pixels(model, pixels: torch.Tensor) -> torch.Tensor:
    """``[0, 1]`` RGB ``[B, 3, H, W]`` -> the model's normalised input (resized to its size, bicubic)."""
    pre = model.config.preprocess
    s = pre.image_size
    if pixels.shape[-2:] != (s, s):
        pixels = F.interpolate(pixels, size=(s, s), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    mean = torch.tensor(pre.mean, dtype=pixels.dtype).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, dtype=pixels.dtype).view(1, 3, 1, 1)
    return (pixels - mean) / std


def vpt_init_bound(patch_size: int, width: int) -> float:
    """VPT's uniform init bound ``sqrt(6 / (3 p^2 + W))`` (a Xavier bound for the patch-embedding fan)."""
    return math.sqrt(6.0 / (3 * patch_size * patch_size + width))


class NoLAClassifier(nn.Module):
    """CLIP's vision tower with ``n_prompts`` VPT-shallow tokens and a bias-free linear head (``[C, D]``, rows
    initialised with ``W_cde``): ``logits = head(encode_image(x, prompts=P))``. The model is a private copy; only
    the prompts, the vision tower's LayerNorms and the head are trainable."""

    def __init__(self, model, cde: ZeroShotClassifier, n_prompts: int = 16, seed: int = 0, copy_model: bool = True):
        super().__init__()
        self.clip = copy.deepcopy(model) if copy_model else model
        self.clip.requires_grad_(False)
        self.classnames = list(cde.classnames)
        vis = self.clip.config.vision
        g = torch.Generator().manual_seed(seed)
        bound = vpt_init_bound(vis.patch_size, vis.width)
        self.prompts = nn.Parameter((torch.rand(n_prompts, vis.width, generator=g) * 2 - 1) * bound)
        self.head = nn.Linear(cde.weights.shape[1], len(self.classnames), bias=False)
        with torch.no_grad():
            self.head.weight.copy_(cde.weights)
        for p in self.layernorm_parameters():
            p.requires_grad_(True)

    def layernorm_parameters(self) -> list[nn.Parameter]:
        return [m_p for m in self.clip.visual.modules() if isinstance(m, nn.LayerNorm) for m_p in m.parameters()]

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised CLIP pixels -> the prompted, pooled, projected image feature (not normalised)."""
        return self.clip.encode_image(pixels, prompts=self.prompts).pooled

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixels))

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What tuning changed: prompts, head and the vision tower's LayerNorm parameters (names as in
        ``named_parameters``)."""
        return {n: p.detach().contiguous() for n, p in self.named_parameters() if p.requires_grad}

    def save(self, path: str | Path) -> Path:
        """The tuned parameters and class names as one safetensors file (the CLIP model is not stored: reload with
        :meth:`load` and the same model)."""
        import json

        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(self.trainable_state(), str(path), metadata={"classnames": json.dumps(self.classnames),
                                                               "model": str(self.clip.config.name)})
        return path

    @classmethod
    def load(cls, path: str | Path, model) -> "NoLAClassifier":
        """Rebuild a saved classifier on ``model`` (the CLIP it was tuned from)."""
        import json

        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            names = json.loads((f.metadata() or {})["classnames"])
            state = {k: f.get_tensor(k) for k in f.keys()}
        head = ZeroShotClassifier(state["head.weight"], names, normalize=False)
        clf = cls(model, head, n_prompts=state["prompts"].shape[0])
        missing = set(clf.trainable_state()) ^ set(state)
        if missing:
            raise ValueError(f"{path} does not match this model's NoLA parameters: {sorted(missing)[:3]}")
        clf.load_state_dict(state, strict=False)
        return clf.eval()

    @torch.no_grad()
    def classify(self, pixels: torch.Tensor, topk: int = 5, classnames: Sequence[str] | None = None
                 ) -> list[list[tuple[str, float]]]:
        """Pixels already in the model's input form (``model.preprocess``: ``[B, 3, S, S]``, normalised) -> for each
        image the ``topk`` classes with softmax probabilities, best first (the output of
        :meth:`~cliplab.zeroshot.ZeroShotClassifier.classify`). ``classnames``: the tuned classes, in any order,
        to choose which probabilities are reported for (the softmax runs over all of them either way)."""
        names = self.classnames
        if classnames is not None:
            classnames = [str(c) for c in classnames]
            if sorted(classnames) != sorted(names):
                raise ValueError(f"this NoLA classifier was tuned on {names}; asked for {classnames}: tune it on the "
                                 "same classes")
        was = self.training
        self.eval()
        probs = self(pixels.float()).softmax(dim=-1)
        self.train(was)
        order = torch.arange(len(names)) if classnames is None else torch.tensor([names.index(c) for c in classnames])
        values, indices = probs[:, order].topk(min(topk, len(names)), dim=-1)
        out_names = names if classnames is None else classnames
        return [[(out_names[j], float(v)) for v, j in zip(vs.tolist(), ix.tolist())]
                for vs, ix in zip(values, indices)]

    @torch.no_grad()
    def predict(self, pixels01: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
        """``[0, 1]`` RGB pixels -> ``[N, C]`` logits (eval mode)."""
        was = self.training
        self.eval()
        out = torch.cat([self(clip_pixels(self.clip, b)) for b in pixels01.split(batch_size)])
        self.train(was)
        return out


def is_nola_classifier_file(path: str | Path) -> bool:
    """Whether ``path`` is a file written by :meth:`NoLAClassifier.save` (safetensors with ``prompts``,
    ``head.weight`` and the class names), as opposed to learned text prompts (CoOp, MoCoOp) or anything else."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys, meta = set(f.keys()), f.metadata() or {}
    except Exception:  # not a safetensors file at all
        return False
    return {"prompts", "head.weight"} <= keys and "classnames" in meta


def nola_classifier_metadata(path: str | Path) -> dict:
    """``{"classnames": [...], "model": name or None}`` of a saved NoLA classifier, without loading a model."""
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return {"classnames": json.loads(meta["classnames"]), "model": meta.get("model")}


@torch.no_grad()
def zero_shot_probs(model, cde: ZeroShotClassifier, pixels01: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """CLIP's zero-shot softmax over the CDE classifier, ``[N, C]``."""
    feats = torch.cat([model.encode_image(clip_pixels(model, b)) for b in pixels01.split(batch_size)])
    return cde.predict(feats).softmax(dim=-1)


@dataclass
class NoLAResult:
    classifier: NoLAClassifier
    alignment: AlignmentMLP
    cde: ZeroShotClassifier
    k: int
    top_k_indices: torch.Tensor
    top_k_labels: torch.Tensor
    pseudo_labels: torch.Tensor          # the alignment module's labels of every training image (weak view)
    history: list[dict]


def _as_pixels(images) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected pixels [N, 3, H, W] in [0, 1], got {tuple(images.shape)}")
        return images.float()
    return images_to_pixels(list(images))


def fit_nola(model, classnames: Sequence[str], images, ssl_encoder: SSLImageEncoder, *,
             descriptions: Mapping[str, Sequence[str]] | None = None, templates: Sequence[str] = ("a {}",),
             config: NoLAConfig | None = None, on_log: Callable[[dict], None] | None = None) -> NoLAResult:
    """The whole label-free pipeline (module docstring) on unlabelled ``images`` (PIL images or ``[N, 3, H, W]``
    RGB in ``[0, 1]``): nothing here takes or reads a label. ``model`` is not modified."""
    cfg = config or NoLAConfig()
    if not isinstance(ssl_encoder, SSLImageEncoder):
        raise ValueError("ssl_encoder must implement SSLImageEncoder (encode, feature_dim, image_size, save)")
    x = _as_pixels(images)
    cde = cde_weights(model, classnames, descriptions, templates)
    probs = zero_shot_probs(model, cde, x)
    k = nola_k(len(x), len(classnames), cfg.k_min, cfg.k_fraction)
    top_idx, top_lab, _ = select_top_k(probs, k)
    ssl_feats = ssl_encoder.encode(x)
    mlp = train_alignment(ssl_feats[top_idx], top_lab, len(classnames), hidden=cfg.mlp_hidden,
                          epochs=cfg.mlp_epochs, lr=cfg.mlp_lr, batch_size=cfg.mlp_batch_size, seed=cfg.seed)
    with torch.no_grad():
        pseudo = mlp(ssl_feats).argmax(dim=1)
    clf = NoLAClassifier(model, cde, cfg.n_prompts, seed=cfg.seed)
    history = train_prompts(clf, x, pseudo, cfg, on_log=on_log)
    return NoLAResult(clf, mlp, cde, k, top_idx, top_lab, pseudo, history)


def train_prompts(clf: NoLAClassifier, pixels01: torch.Tensor, pseudo_labels: torch.Tensor,
                  config: NoLAConfig | None = None, on_log: Callable[[dict], None] | None = None) -> list[dict]:
    """Stage 4: label-smoothing CE of ``clf`` on strong views against the pseudo-labels (fixed per image, from the
    weak view); AdamW with weight decay on the prompts and the head only."""
    cfg = config or NoLAConfig()
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    ln = clf.layernorm_parameters()
    opt = torch.optim.AdamW([{"params": [clf.prompts, clf.head.weight], "weight_decay": cfg.weight_decay},
                             {"params": ln, "weight_decay": 0.0}], lr=cfg.lr)
    size = clf.clip.config.preprocess.image_size
    history = []
    clf.train()
    clf.clip.eval()  # no dropout / BatchNorm updates inside CLIP
    for step in range(cfg.steps):
        b = torch.randint(len(pixels01), (min(cfg.batch_size, len(pixels01)),), generator=g)
        strong = augment(pixels01[b], size, g, scale=cfg.strong_scale, blur=0.5)
        logits = clf(clip_pixels(clf.clip, strong))
        loss = F.cross_entropy(logits, pseudo_labels[b], label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == cfg.steps - 1:
            row = {"step": step, "loss": float(loss.detach())}
            history.append(row)
            if on_log is not None:
                on_log(row)
    return history


# --- the synthetic benchmark used in docs/methods/nola.md ----------------------------------------------------------

def blurred_shape_task(n_per_class: int, seed: int, blur: float = 0.8):
    """The 8-way shape task of :func:`~cliplab.data.synthetic.zero_shot_task` with every image Gaussian-blurred
    (radius ``blur`` px): a domain the shipped model's zero-shot handles poorly (about 54% at 0.8)."""
    from PIL import ImageFilter

    from ..data.synthetic import zero_shot_task

    task = zero_shot_task("shape", n_per_class=n_per_class, seed=seed)
    task.images = [im.filter(ImageFilter.GaussianBlur(blur)) for im in task.images]
    return task


def unlabelled_scene_pixels(n: int, seed: int, blur: float = 0.8, image_size: int = 64) -> torch.Tensor:
    """``n`` random single-object scenes of the synthetic world (blurred as :func:`blurred_shape_task`), as
    ``[n, 3, S, S]`` pixels in ``[0, 1]``: an unlabelled corpus (no attribute is returned)."""
    import numpy as np
    from PIL import ImageFilter

    from ..data.synthetic import SceneWorld

    world = SceneWorld(image_size=image_size, seed=seed)
    images = [world.compose([{}], np.random.default_rng([seed, 7919, i]), brightness="normal", clutter=False,
                            word=False).render().filter(ImageFilter.GaussianBlur(blur)) for i in range(n)]
    return images_to_pixels(images)


def folder_pixels(folder: str | Path, size: int) -> tuple[torch.Tensor, list[str], list[str]]:
    """Every image file under ``folder`` (sub-folders included; their names are not read) as ``[N, 3, size, size]``
    RGB in ``[0, 1]``: ``(pixels, paths, unreadable paths)``."""
    from PIL import Image

    from ..pipeline.sources import FolderSource

    images, paths, bad = [], [], []
    for item in FolderSource(str(folder)).iter_items():
        if item.path is None:
            continue
        try:
            with Image.open(item.path) as im:
                images.append(im.convert("RGB").resize((size, size), resample=Image.BICUBIC))
            paths.append(item.path)
        except (OSError, ValueError):
            bad.append(item.path)
    if not images:
        raise ValueError(f"no readable image in {folder}")
    return images_to_pixels(images), paths, bad


#: the shipped encoder NoLA's preset uses: the object-crop one (labels the task better than the first, 0.46 vs 0.40)
DEFAULT_SSL_ENCODER = "dino-conv-shapes-objects"

NOLA_PRESETS = {"nola": "NoLA label-free tuning of shapes-tiny on the blurred 8-shape task (or, with --data FOLDER "
                        "and --set classes=a,b,c, on your unlabelled images): description classifier, top-k "
                        "pseudo-labels, a self-supervised encoder's labeller, VPT + LayerNorms + head (a NoLA "
                        "classifier file); no labels read"}


def run_nola_preset(name: str = "nola", model=None, out=None, *, n_train: int = 40, n_test: int = 30,
                    task_seed: int = 11, ssl_encoder: str | None = None, data: str | None = None,
                    classes: str | Sequence[str] | None = None, descriptions: str | None = None,
                    templates: str | Sequence[str] | None = None, **options) -> dict:
    """Run preset ``name`` on ``model`` (default the shipped ``shapes-tiny``): fit NoLA on ``n_train`` unlabelled
    images per class of :func:`blurred_shape_task` (seed ``task_seed``), save the classifier to ``out`` (a
    ``.safetensors`` path, or a folder for ``nola.safetensors``) and score it on ``n_test`` held-out images per
    class against the description classifier it starts from. ``options``: :class:`NoLAConfig` fields;
    ``ssl_encoder``: a shipped encoder's name or a saved encoder's folder (default the shipped one).

    With ``data`` (a folder of images; nothing else in it is read) NoLA fits on those images instead, among
    ``classes`` (a list or ``"a,b,c"``), with ``descriptions`` (a JSON file ``{class: [sentence, ...]}``, optional)
    and ``templates`` (default ``"a photo of a {}."``); there is nothing to score, so the summary reports how the
    alignment module labelled the images."""
    if data is not None:
        return _run_nola_folder(name, model, out, data, classes, descriptions, templates, ssl_encoder, options)
    if classes is not None or descriptions is not None or templates is not None:
        raise ValueError("classes=, descriptions= and templates= go with --data FOLDER (the synthetic task has its "
                         "own)")
    from ..data.synthetic import SceneWorld
    from ..models import load as load_model

    if name not in NOLA_PRESETS:
        raise ValueError(f"unknown NoLA preset {name!r}; choose from {sorted(NOLA_PRESETS)}")
    model = load_model("shapes-tiny").eval() if model is None else model
    cfg = NoLAConfig(**options)
    ssl = _ssl_encoder(ssl_encoder)
    train, test = blurred_shape_task(n_train, seed=task_seed), blurred_shape_task(n_test, seed=task_seed + 1)
    x, xt = images_to_pixels(train.images), images_to_pixels(test.images)
    yt = torch.tensor(test.labels)  # scoring only: the fit never sees a label
    res = fit_nola(model, train.classnames, x, ssl, descriptions=world_descriptions(SceneWorld(), "shape"),
                   config=cfg)
    path = _classifier_path(out, name)
    res.classifier.save(path)

    def acc(pred):
        return round(float((pred == yt).float().mean()), 4)

    return {"preset": name, "steps": cfg.steps, "classes": len(train.classnames), "k": res.k, "classifier": str(path),
            "test_accuracy": acc(res.classifier.predict(xt).argmax(1)),
            "description_zero_shot_accuracy": acc(zero_shot_probs(model, res.cde, xt).argmax(1))}


def _ssl_encoder(spec: str | None) -> SSLImageEncoder:
    """A shipped encoder's name, a saved encoder's folder, or ``None`` for the default shipped one."""
    from .ssl_encoder import load_shipped_ssl_encoder, load_ssl_encoder

    if spec is None:
        return load_shipped_ssl_encoder(DEFAULT_SSL_ENCODER)
    return load_ssl_encoder(spec) if Path(spec).is_dir() else load_shipped_ssl_encoder(spec)


def _classifier_path(out, name: str) -> Path:
    path = Path(out or Path("runs") / name)
    path = path if path.suffix == ".safetensors" else path / "nola.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _run_nola_folder(name, model, out, data, classes, descriptions, templates, ssl_encoder, options) -> dict:
    """:func:`run_nola_preset` on a folder of the user's unlabelled images."""
    import json

    from ..models import load as load_model

    if isinstance(classes, str):
        classes = [c.strip() for c in classes.split(",") if c.strip()]
    if not classes or len(classes) < 2 or len(set(classes)) != len(classes):
        raise ValueError(f"--data needs classes=a,b,c (two or more distinct class names), got {classes!r}")
    if isinstance(templates, str):
        templates = [templates]
    desc = None
    if descriptions is not None:
        desc = json.loads(Path(descriptions).read_text(encoding="utf-8"))
        if not isinstance(desc, dict) or any(c not in desc for c in classes):
            raise ValueError(f"{descriptions} must be a JSON object with a list of sentences for every class")
    model = load_model("shapes-tiny").eval() if model is None else model
    cfg = NoLAConfig(**options)
    x, paths, bad = folder_pixels(data, model.config.preprocess.image_size)
    res = fit_nola(model, classes, x, _ssl_encoder(ssl_encoder), descriptions=desc,
                   templates=tuple(templates or ("a photo of a {}.",)), config=cfg)
    path = _classifier_path(out, name)
    res.classifier.save(path)
    counts = torch.bincount(res.pseudo_labels, minlength=len(classes)).tolist()
    return {"preset": name, "steps": cfg.steps, "classes": len(classes), "k": res.k, "classifier": str(path),
            "data": str(data), "images": len(paths), "unreadable": len(bad),
            "pseudo_label_counts": dict(zip(classes, counts))}
