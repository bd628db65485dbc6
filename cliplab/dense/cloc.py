"""CLOC: region-text contrastive training with a Prompter that turns a box into a region embedding.

Paper: *Contrastive Localized Language-Image Pre-Training*, Hong-You Chen, Zhengfeng Lai, Haotian Zhang, Xinze
Wang, Marcin Eichner, Keen You, Meng Cao, Bowen Zhang, Yinfei Yang, Zhe Gan (Apple, ICML 2025). No official code is
public; the method below follows the paper's description.

The method: CLIP's image-text loss plus a region-text InfoNCE between *region embeddings* and the text embeddings
of region captions. A region embedding comes from a lightweight *Prompter*: a one-layer transformer that reads the
image tower's tokens together with a box prompt (a positional encoding of the box added to a query) and outputs an
embedding in the joint space. One image forward then serves any number of boxes.

Where it acts, and the Prompter's design here (chosen so that the issue's exact property holds):

* The Prompter is a **copy of the image tower's last block**, plus a copy of its ``ln_post``, projection and (for
  the conv-stem models) the stem max-skip. Its input is the stream **entering the last block**
  (``output="hidden"``, ``hidden[-2]``), its query the **class token** there plus ``box_embed(box)``, a linear map of
  a sinusoidal encoding of the box's normalised corners, **zero at initialisation**.
* The query attends to itself and to the patch tokens, with an additive attention bias ``log(coverage)``: the
  fraction of each patch cell inside the box (``-inf`` outside it). The stem max-skip is max-pooled over the covered
  cells only. For a box covering the whole image the bias is zero everywhere and the max runs over every cell, so at
  initialisation the Prompter recomputes the class token's last block exactly: **the region embedding of the whole
  image equals the image embedding** (fp32 round-off, ``< 1e-5``). A smaller box at initialisation is RoI-masked CLS
  pooling, a sensible training-free start.
* Each query sees only the patches and itself (never other boxes' queries), so a region's embedding depends on its
  box and image only, not on the other boxes asked with it.

Differences from the paper, with the reason:

* The paper pre-trains from scratch at scale with pseudo-labelled boxes (VESL). Here the synthetic world gives exact
  boxes and each object's noun phrase ("a large red striped circle") stands in for VESL's region captions; CLOC
  *fine-tunes* a trained CLIP (``shapes-tiny``) for a few hundred steps.
* Trained parts: the last ``train_blocks`` blocks of the image tower (default 2, so the region loss reaches the
  tower's features through the Prompter's input), ``ln_post``/projection/max-skip and the Prompter; the text tower is
  frozen and the earlier image blocks too (their outputs are computed once), to fit a 2-core CPU.
* The grounding loss (predicting a box from a phrase, L1 + GIoU) is not implemented: it trains a separate decoder
  head that region-text retrieval does not use.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.synthetic import SceneWorld
from ..data.synthetic.captions import noun_phrase_text
from ..methods import register_method

__all__ = ["box_coverage", "box_encoding", "Prompter", "ClocModel", "ClocConfig", "object_regions", "train_cloc",
           "crop_embeddings", "region_retrieval", "zero_shot_accuracy", "inference_flops"]

register_method(
    "cloc",
    "Contrastive Localized Language-Image Pre-Training (CLOC)",
    "region-text contrastive training with a Prompter (box -> region embedding from the image tower's tokens); a "
    "whole-image box at initialisation gives the image embedding",
    doc="docs/methods/cloc.md",
)(__name__)

PROMPTER_FILE = "prompter.safetensors"
CLOC_CONFIG_FILE = "cloc.json"


def box_coverage(boxes: torch.Tensor, grid: tuple[int, int], image_size: int) -> torch.Tensor:
    """``boxes`` ``[..., 4]`` in pixels ``(x0, y0, x1, y1)`` (x1/y1 exclusive) -> ``[..., gh * gw]``: the fraction of
    each patch cell (row-major, as the tower flattens them) that lies inside the box."""
    gh, gw = grid
    ch, cw = image_size / gh, image_size / gw
    b = boxes.to(torch.float32)
    x0, y0, x1, y1 = b.unbind(-1)
    cols = torch.arange(gw, dtype=torch.float32, device=b.device) * cw
    rows = torch.arange(gh, dtype=torch.float32, device=b.device) * ch
    ox = ((torch.minimum(x1[..., None], cols + cw) - torch.maximum(x0[..., None], cols)).clamp(min=0) / cw)
    oy = ((torch.minimum(y1[..., None], rows + ch) - torch.maximum(y0[..., None], rows)).clamp(min=0) / ch)
    return (oy[..., :, None] * ox[..., None, :]).clamp(max=1.0).flatten(-2)


def box_encoding(boxes: torch.Tensor, image_size: int, frequencies: int = 8) -> torch.Tensor:
    """Sinusoidal encoding of each box's normalised corners: ``[..., 4]`` -> ``[..., 8 * frequencies]``."""
    c = boxes.to(torch.float32) / image_size
    freqs = (2.0 ** torch.arange(frequencies, dtype=torch.float32, device=c.device)) * math.pi
    angles = c[..., None] * freqs  # [..., 4, F]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)


class Prompter(nn.Module):
    """Box -> region embedding from the stream entering the image tower's last block (see the module docstring).

    Built from a CLIP ViT with a class token; ``forward(hidden, boxes, stem=None)``: ``hidden`` ``[B, 1 + N, W]``
    (class token then the ``N`` patches), ``boxes`` ``[B, R, 4]`` pixels, ``stem`` ``[B, N, C]`` the per-cell stem
    features for the max-skip (required when the model has one) -> ``[B, R, D]`` region embeddings (not normalised).
    """

    def __init__(self, model, frequencies: int = 8):
        super().__init__()
        vision = model.visual if hasattr(model, "visual") else None
        if vision is None or not hasattr(vision, "transformer") or not getattr(vision, "n_prefix", 0):
            raise ValueError("the CLOC Prompter needs a ViT image tower with a class token (CLIP-style); "
                             "ResNet and SigLIP towers are not supported")
        self.image_size = vision.cfg.image_size
        self.grid = (vision.cfg.grid_size, vision.cfg.grid_size)
        self.frequencies = int(frequencies)
        self.block = copy.deepcopy(vision.transformer.blocks[-1])
        self.ln_post = copy.deepcopy(vision.ln_post)
        self.proj = copy.deepcopy(vision.proj) if vision.proj is not None else None
        self.stem_skip = copy.deepcopy(vision.stem_skip) if vision.stem_skip is not None else None
        self.box_embed = nn.Linear(8 * self.frequencies, vision.cfg.width)
        nn.init.zeros_(self.box_embed.weight)  # zero: at initialisation the query is the class token itself
        nn.init.zeros_(self.box_embed.bias)

    def forward(self, hidden: torch.Tensor, boxes: torch.Tensor, stem: torch.Tensor | None = None) -> torch.Tensor:
        if boxes.dim() != 3 or boxes.shape[-1] != 4:
            raise ValueError(f"boxes must be [B, R, 4] (x0, y0, x1, y1 in pixels), got {tuple(boxes.shape)}")
        if self.stem_skip is not None and stem is None:
            raise ValueError("this model has a stem max-skip: pass stem= (see region_inputs)")
        cover = box_coverage(boxes, self.grid, self.image_size).to(hidden.dtype)  # [B, R, N]
        if (cover.sum(-1) <= 0).any():
            raise ValueError("every box must overlap the image (a box of zero area or outside it has no patches)")
        cls, patches = hidden[:, 0], hidden[:, 1:]
        query = cls[:, None] + self.box_embed(box_encoding(boxes, self.image_size, self.frequencies).to(hidden.dtype))
        attn = self.block.attn
        qq, kq, vq = attn.split_heads(self.block.ln_1(query))  # [B, H, R, d]
        _, kp, vp = attn.split_heads(self.block.ln_1(patches))  # [B, H, N, d]
        scale = qq.shape[-1] ** -0.5
        own = (qq * kq).sum(-1, keepdim=True) * scale
        bias = torch.where(cover > 0, cover.clamp(min=1e-12).log(), torch.full_like(cover, float("-inf")))
        others = (qq @ kp.transpose(-2, -1)) * scale + bias[:, None]
        probs = torch.cat([own, others], dim=-1).softmax(-1)
        mixed = probs[..., :1] * vq + probs[..., 1:] @ vp
        x = query + attn.merge_heads(mixed)
        x = x + self.block.mlp(self.block.ln_2(x))
        out = self.ln_post(x)
        out = out if self.proj is None else self.proj(out)
        if self.stem_skip is not None:
            masked = stem[:, None].masked_fill(~(cover > 0)[..., None], float("-inf"))  # [B, R, N, C]
            out = out + self.stem_skip(masked.amax(2))
        return out


def region_inputs(model, pixels: torch.Tensor, hidden_index: int = -2):
    """One image forward -> ``(image embedding [B, D], hidden [B, 1 + N, W] entering the last block, stem
    features [B, N, C] or None)``."""
    out = model.encode_image(pixels, output="hidden")
    stem = None
    if model.visual.stem_skip is not None:
        stem = model.visual.stem(pixels.to(model.visual.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
    return out.pooled, out.hidden[hidden_index], stem


class ClocModel(nn.Module):
    """A CLIP and its Prompter: ``region_embeddings(pixels, boxes)`` ``[B, R, D]``; ``save``/``load``."""

    def __init__(self, model, prompter: Prompter | None = None):
        super().__init__()
        self.model = model
        self.prompter = prompter if prompter is not None else Prompter(model)

    def region_embeddings(self, pixels: torch.Tensor, boxes: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        _, hidden, stem = region_inputs(self.model, pixels)
        out = self.prompter(hidden, boxes.to(hidden.device), stem)
        return F.normalize(out, dim=-1) if normalize else out

    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        self.model.save(directory / "clip")
        state = {k: v.detach().contiguous().cpu() for k, v in self.prompter.state_dict().items()}
        save_file(state, str(directory / PROMPTER_FILE), metadata={"format": "cliplab-cloc"})
        (directory / CLOC_CONFIG_FILE).write_text(json.dumps({"frequencies": self.prompter.frequencies}) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "ClocModel":
        from safetensors.torch import load_file

        from ..models import load

        directory = Path(directory)
        for name in ("clip", PROMPTER_FILE, CLOC_CONFIG_FILE):
            if not (directory / name).exists():
                raise ValueError(f"{directory}: not a saved CLOC model (no {name}; write one with ClocModel.save)")
        model = load(directory / "clip")
        meta = json.loads((directory / CLOC_CONFIG_FILE).read_text())
        prompter = Prompter(model, frequencies=int(meta["frequencies"]))
        prompter.load_state_dict(load_file(str(directory / PROMPTER_FILE)))
        return cls(model, prompter)


# ------------------------------------------------------------------ synthetic region data


def object_regions(scene) -> list[tuple[tuple[int, int, int, int], str]]:
    """``(box, noun phrase)`` of each visible object of a synthetic scene ("a large red striped circle")."""
    out = []
    for obj, mask in zip(scene.objects, scene.masks):
        if not mask.any():
            continue  # fully occluded: no region to name
        phrase = noun_phrase_text({"count": 1, "shape": obj.shape, "colour": obj.colour, "size": obj.size,
                                   "texture": obj.texture})
        x0, y0, x1, y1 = obj.box
        s = scene.image_size
        out.append(((max(0, x0), max(0, y0), min(s, x1), min(s, y1)), phrase))
    return out


@dataclass
class ClocConfig:
    """Fine-tuning recipe (see the module docstring); ``region_weight`` 0 trains the CLIP loss only."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.0
    region_weight: float = 1.0
    train_blocks: int = 2
    seed: int = 0
    world_seed: int = 0
    pool_scenes: int = 1024   # training scenes (fixed pool; the earlier blocks' outputs are computed once)

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 2 or self.train_blocks < 1 or self.pool_scenes < self.batch_size:
            raise ValueError(f"invalid CLOC config {asdict(self)}: need steps >= 1, batch_size >= 2, "
                             "train_blocks >= 1, pool_scenes >= batch_size")


def _tail_forward(vision, x: torch.Tensor, first: int) -> list[torch.Tensor]:
    """Run blocks ``first..`` of the image tower on ``x``; returns the stream entering each block from ``first``
    and the last block's output."""
    states = [x]
    for block in vision.transformer.blocks[first:]:
        states.append(block(states[-1]))
    return states


def _pixels(model, images) -> torch.Tensor:
    return torch.stack([model.preprocess(im) for im in images])


def _multi_positive_infonce(a: torch.Tensor, texts: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor):
    """Symmetric InfoNCE between rows of ``a`` ``[M, D]`` and unique texts ``[U, D]``; ``labels[m]`` is row m's text.
    Text -> region uses every region of that text as a positive (identical phrases occur in one batch)."""
    logits = scale * F.normalize(a, dim=-1) @ F.normalize(texts, dim=-1).T
    r2t = F.cross_entropy(logits, labels)
    pos = F.one_hot(labels, texts.shape[0]).T.bool()  # [U, M]
    lt = logits.T
    t2r = (torch.logsumexp(lt, -1) - torch.logsumexp(lt.masked_fill(~pos, float("-inf")), -1)).mean()
    return (r2t + t2r) / 2


def train_cloc(model, config: ClocConfig | None = None, *, arm: str = "cloc", log_every: int = 0) -> ClocModel:
    """Fine-tune ``model`` (modified in place) with CLOC (``arm="cloc"``: CLIP loss + ``region_weight`` x region-text
    InfoNCE through the Prompter) or the same-data control (``arm="crops"``: the CLIP loss on the images and, with the
    same weight, on crop -> noun phrase pairs, each crop encoded by the tower: plain crop-and-encode training). Same
    batches, steps and trained blocks in both arms. Returns the model with its Prompter."""
    cfg = config or ClocConfig()
    if arm not in ("cloc", "crops"):
        raise ValueError(f"arm must be 'cloc' or 'crops', got {arm!r}")
    torch.manual_seed(cfg.seed)
    vision = model.visual
    first = len(vision.transformer.blocks) - cfg.train_blocks
    if first < 0:
        raise ValueError(f"train_blocks={cfg.train_blocks} exceeds the tower's {len(vision.transformer.blocks)} blocks")
    world = SceneWorld(image_size=vision.cfg.image_size, seed=cfg.world_seed)
    scenes = [world.sample(i) for i in range(cfg.pool_scenes)]
    regions = [object_regions(s) for s in scenes]
    phrases = sorted({p for r in regions for _, p in r})
    phrase_index = {p: i for i, p in enumerate(phrases)}
    model.eval()
    with torch.no_grad():  # frozen parts, computed once: the text tower, the earlier image blocks, the stem
        captions = model.encode_texts([s.short_caption for s in scenes])
        phrase_emb = model.encode_texts(phrases)
        cache = _frozen_inputs(model, [s.image for s in scenes], first)
        crop_cache = None
        if arm == "crops":
            crops = [crop_image(s.image, box, vision.cfg.image_size) for s, r in zip(scenes, regions) for box, _ in r]
            crop_cache = _frozen_inputs(model, crops, first)
    prompter = Prompter(model)
    trained = [*vision.transformer.blocks[first:].parameters(), *vision.ln_post.parameters()]
    trained += [p for m in (vision.proj, vision.stem_skip) if m is not None for p in m.parameters()]
    if arm == "cloc":
        trained += list(prompter.parameters())
    opt = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
    offsets = np.cumsum([0, *(len(r) for r in regions)])
    rng = np.random.default_rng(cfg.seed)
    scale = model.logit_scale.exp().detach()
    model.train()
    for step in range(cfg.steps):
        idx = rng.choice(len(scenes), cfg.batch_size, replace=False)
        image_emb, states = _tail(model, cache, idx, first)
        loss = _multi_positive_infonce(image_emb, captions[idx], torch.arange(len(idx)), scale)
        labels = torch.tensor([phrase_index[p] for i in idx for _, p in regions[i]])
        uniq, inv = labels.unique(return_inverse=True)
        if arm == "cloc":
            boxes, owner = _batch_boxes(regions, idx)
            stem = cache["stem"][idx] if cache["stem"] is not None else None
            hidden = states[-2]  # the stream entering the last block
            emb = prompter(hidden[owner], boxes[:, None], stem[owner] if stem is not None else None)[:, 0]
        else:
            rows = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in idx])
            emb, _ = _tail(model, crop_cache, rows, first)
        region_loss = _multi_positive_infonce(emb, phrase_emb[uniq], inv, scale)
        total = loss + cfg.region_weight * region_loss
        opt.zero_grad()
        total.backward()
        opt.step()
        if log_every and (step % log_every == 0 or step == cfg.steps - 1):
            print(f"[{arm}] step {step}: clip {loss.item():.3f} region {region_loss.item():.3f}")
    model.eval()
    return ClocModel(model, prompter)


def _frozen_inputs(model, images, first: int) -> dict:
    """The stream entering block ``first`` and the stem features, for every image (in slices)."""
    vision = model.visual
    xs, stems = [], []
    for i in range(0, len(images), 128):
        px = _pixels(model, images[i:i + 128])
        out = model.encode_image(px, output="hidden")
        xs.append(out.hidden[first])
        if vision.stem_skip is not None:
            stems.append(vision.stem(px).flatten(2).transpose(1, 2))
    return {"x": torch.cat(xs), "stem": torch.cat(stems) if stems else None}


def _tail(model, cache: dict, idx, first: int):
    """Image embeddings of cached rows ``idx`` through the trained blocks (as ``encode_image`` computes them)."""
    vision = model.visual
    states = _tail_forward(vision, cache["x"][idx], first)
    pooled = vision.pool(states[-1])
    if cache["stem"] is not None:
        pooled = pooled + vision.stem_skip(cache["stem"][idx].amax(1))
    return pooled, states


def _batch_boxes(regions, idx) -> tuple[torch.Tensor, torch.Tensor]:
    boxes, owner = [], []
    for row, i in enumerate(idx):
        for box, _ in regions[i]:
            boxes.append(box)
            owner.append(row)
    return torch.tensor(boxes, dtype=torch.float32), torch.tensor(owner)


# ------------------------------------------------------------------ evaluation


def crop_image(image, box, size: int):
    """The box's pixels of a PIL image, resized to ``size`` x ``size`` (crop-and-encode's input)."""
    return image.crop(tuple(int(v) for v in box)).resize((size, size))


@torch.no_grad()
def crop_embeddings(model, image, boxes) -> torch.Tensor:
    """Crop-and-encode: each box cropped, resized to the model's input size and encoded: ``[R, D]``. Costs one full
    image forward per box."""
    size = model.visual.cfg.image_size
    return model.encode_image(_pixels(model, [crop_image(image, b, size) for b in boxes]))


@torch.no_grad()
def region_retrieval(scenes, embed_regions, embed_texts) -> dict:
    """Region -> noun phrase retrieval on synthetic scenes. ``embed_regions(scene, boxes) -> [R, D]``.

    ``within_scene``: top-1 among the scene's own distinct phrases (scenes with >= 2 distinct phrases; tests that
    the box picks the right object); ``pool``: top-1 among every distinct phrase of the evaluation set."""
    data = [(s, object_regions(s)) for s in scenes]
    phrases = sorted({p for _, r in data for _, p in r})
    text = F.normalize(embed_texts(phrases), dim=-1)
    index = {p: i for i, p in enumerate(phrases)}
    within, within_n, pool, pool_n = 0, 0, 0, 0
    for scene, regs in data:
        if not regs:
            continue
        emb = F.normalize(embed_regions(scene, [b for b, _ in regs]), dim=-1)
        sims = emb @ text.T
        truth = torch.tensor([index[p] for _, p in regs])
        pool += int((sims.argmax(-1) == truth).sum())
        pool_n += len(regs)
        own = sorted({index[p] for _, p in regs})
        if len(own) >= 2:
            local = sims[:, own].argmax(-1)
            within += int((torch.tensor(own)[local] == truth).sum())
            within_n += len(regs)
    return {"within_scene": within / max(within_n, 1), "within_scene_regions": within_n,
            "pool": pool / max(pool_n, 1), "pool_regions": pool_n, "pool_phrases": len(phrases)}


@torch.no_grad()
def zero_shot_accuracy(model, kind: str = "shape", n_per_class: int = 25, seed: int = 1) -> float:
    """Image-level zero-shot top-1 on single-object scenes (prompt ensembles of ``zero_shot_task``)."""
    from ..data.synthetic import zero_shot_task

    task = zero_shot_task(kind, n_per_class, seed=seed)
    protos = torch.stack([F.normalize(model.encode_texts(p, normalize=True).mean(0), dim=-1) for p in task.prompts])
    feats = model.encode_image(_pixels(model, task.images), normalize=True)
    return float(((feats @ protos.T).argmax(-1) == torch.tensor(task.labels)).float().mean())


def cloc_embedder(cloc: ClocModel):
    """``embed_regions`` for :func:`region_retrieval` through the Prompter (one image forward per scene)."""
    def embed(scene, boxes):
        px = _pixels(cloc.model, [scene.image])
        return cloc.region_embeddings(px, torch.tensor([boxes], dtype=torch.float32))[0]
    return embed


def inference_flops(config, regions: int) -> dict:
    """Matmul FLOPs (:mod:`cliplab.models.flops` conventions) to embed ``regions`` boxes of one image: the Prompter
    (one image forward, the patches' keys/values in its block once, then one query per box) and crop-and-encode
    (one full image forward per box)."""
    from ..models.flops import image_flops

    v, d = config.vision, config.embed_dim
    n, w = v.grid_size**2, v.width
    per_image = 2 * n * w * 2 * w  # the patches' k, v in the Prompter's block
    per_box = 2 * w * 4 * w + 2 * 2 * (n + 1) * w + 2 * 2 * w * v.mlp_dim + 2 * w * d  # qkv+out, attention, MLP, proj
    if v.stem_max_skip:
        per_box += 2 * v.stem_channels[-1] * d
    full = image_flops(config)
    return {"prompter": full + per_image + regions * per_box, "crop_and_encode": regions * full}


def crop_embedder(model):
    """``embed_regions`` for :func:`region_retrieval` by crop-and-encode."""
    return lambda scene, boxes: crop_embeddings(model, scene.image, boxes)
