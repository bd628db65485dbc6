"""GRAIN: region-grounded descriptions for zero-shot recognition, on the synthetic world.

Paper: *Grounding Descriptions in Images informs Zero-Shot Visual Recognition*, S. Halbe et al. (7 authors, arXiv,
December 2024; the issue's "Kumar et al." is not the official repository's author); official code
``shaunak27/grain-clip`` (read to understand, not copied).

What it does: CLIP pretraining in which a DETR-style *query decoder* reads the image tower's patch tokens. Of its
``num_regions + 1`` learned queries, the region queries predict a box each (3-layer MLP, sigmoid, ``cxcywh``) and a
region embedding (``obj_proj``); the last, global query gives the image embedding (``img_proj``). Three losses:

* CLIP's symmetric InfoNCE between the global embedding and the caption;
* box loss: Hungarian matching of region queries to the image's ground-truth boxes with the class cost excluded,
  cost ``5 L1 + 2 (-GIoU)`` (:mod:`cliplab.zeroshot.matching`), then ``L1 + (1 - GIoU)`` on the matched pairs,
  summed and divided by the number of boxes;
* region-description loss: each matched region embedding against every description of the batch, cross-entropy at
  the model's logit scale.

Zero-shot: a class's text embedding is the mean over templates x descriptors of the normalised embeddings of
``template.format(class) + " " + make_descriptor_sentence(descriptor)``; the image embedding is the global query's.

Where it acts: the decoder's memory is the image tower's patch tokens after ``ln_post`` and the projection (CLS
dropped), ``encode_image(output="tokens").tokens[:, 1:]``, as the official code's ``return_hidden_state``; a linear
map (no bias) takes them to the decoder width and a LayerNorm normalises them (pre-norm decoder). The model's image
embedding is the global query's output through ``img_proj``; the tower's own CLS embedding is not used.

Decoder (as the official ``Cross_Attention``/``ObjDecoder``): target starts at zero, the learned queries are added as
positions to queries and keys of self-attention and to the cross-attention query; memory has no extra positional
code (the tower's own positions are in the tokens); pre-norm layers, self-attention first, ReLU FFN, a final
LayerNorm, intermediate outputs kept; Xavier-uniform init of the decoder's matrices, ``obj_proj``/``img_proj``
``N(0, width^-1/2)``.

Differences from the paper and its code, with the reason:

* Data: the synthetic world (:mod:`cliplab.data.synthetic`) gives the paper's annotations exactly: per image <= 5
  boxes (one per visible object, clipped to the image), each described by a short phrase ("a red striped circle":
  colour, texture unless plain, shape), and the short caption. The paper uses LLaVA descriptions, OWLv2 boxes,
  CC3M/CC12M.
* Size: a tiny ViT and text tower (``grain-tiny``: 64 px, patch 8, width 64 x 2 layers) and a 2-layer decoder of
  width 64 with 4 heads, trained from scratch for a few hundred steps on a CPU; the paper uses ViT-B/16, a 6-layer
  512-wide decoder, 35 epochs at batch 128 x GPUs, lr 1e-3. Dropout stays 0.1.
* Duplicate descriptions in a batch (two "a red circle" regions) are merged into one class of the region CE, so an
  identical phrase is not a false negative; the official code keeps each copy as its own column.
* Auxiliary decoder-layer box losses: off by default (``aux_loss=False``). The official code computes them but its
  ``compute_box_loss`` keeps only the keys in ``weight_dict`` (the last layer's), so they never reach the loss; it
  also scales the box loss by 1.5 (``/ (len(weight_dict) / 3)``), left out here (weights 1 and 1, as the paper).
* The class embedding is the mean of normalised prompt embeddings without renormalising, as the official ``test``;
  the image embedding is normalised. ``renormalize=True`` gives CLIP's usual renormalised mean.
* :func:`make_descriptor_sentence` follows the official code's string tests, including its quirk that any
  descriptor whose first *letter* is "a" ("antennae") gets "which is"; ``strict_articles=True`` tests whole words.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.synthetic import SceneWorld
from ..data.synthetic.vocabulary import article
from ..methods import register_method
from .matching import box_cxcywh_to_xyxy, box_iou, generalized_box_iou, hungarian_match

__all__ = [
    "make_descriptor_sentence", "description_prompts", "class_text_embeddings", "QueryDecoderHead", "GrainModel",
    "GrainOutput", "region_annotations", "GrainData", "build_grain_data", "clip_loss", "box_loss",
    "region_description_loss", "grain_losses", "GrainConfig", "train_grain", "TrainHistory", "PartClassTask",
    "part_class_task", "zero_shot_accuracy", "box_mean_iou", "grain_tiny_model", "new_grain_model", "load_grain",
    "grain_classifier", "GRAIN_PRESETS", "run_grain_preset", "coarse_caption",
]

register_method(
    "grain",
    "Grounding Descriptions in Images informs Zero-Shot Visual Recognition (GRAIN)",
    "DETR-style region queries on the image tower's patch tokens: Hungarian-matched boxes (5 L1 + 2 GIoU), region "
    "embeddings vs the batch's descriptions, a global query for CLIP's loss; description-ensemble zero-shot",
    doc="docs/methods/grain.md",
)(__name__)

DESCRIPTOR_VERBS = ("has", "often", "typically", "may", "can")
DEFAULT_TEMPLATES = ("a photo of a {}.", "an image of a {}.")
HEAD_FILE = "grain_head.safetensors"
GRAIN_CONFIG_FILE = "grain.json"


# --------------------------------------------------------------------------------------------------------------------
# Descriptor sentences and the description-ensemble classifier


def make_descriptor_sentence(descriptor: str, strict_articles: bool = False) -> str:
    """The paper's rule (Menon & Vondrick's): "which is {d}" for a descriptor starting with "a"/"an" or "used",
    "which {d}" for one starting with "has"/"often"/"typically"/"may"/"can", otherwise "which has {d}".

    As the official code, the tests are plain string prefixes: "antennae" starts with "a" and gets "which is".
    ``strict_articles``: "a"/"an" only as whole first words."""
    first = descriptor.split(" ", 1)[0]
    if (first in ("a", "an")) if strict_articles else descriptor.startswith("a"):
        return f"which is {descriptor}"
    if descriptor.startswith(DESCRIPTOR_VERBS):
        return f"which {descriptor}"
    if descriptor.startswith("used"):
        return f"which is {descriptor}"
    return f"which has {descriptor}"


def description_prompts(classname: str, descriptors: Sequence[str] | None, templates: Sequence[str] = DEFAULT_TEMPLATES,
                        strict_articles: bool = False) -> list[str]:
    """Every ``template.format(classname) + " " + make_descriptor_sentence(d)`` (templates outer, descriptors inner);
    without descriptors, the plain class-name prompts."""
    if not templates:
        raise ValueError("no templates: pass at least one, e.g. ('a photo of a {}.',)")
    if not descriptors:
        return [t.replace("{}", classname) for t in templates]
    return [f"{t.replace('{}', classname)} {make_descriptor_sentence(d, strict_articles)}"
            for t in templates for d in descriptors]


@torch.no_grad()
def class_text_embeddings(encode_texts: Callable[[list[str]], torch.Tensor], classnames: Sequence[str],
                          descriptors: Sequence[Sequence[str]] | None = None,
                          templates: Sequence[str] = DEFAULT_TEMPLATES, renormalize: bool = False,
                          strict_articles: bool = False) -> torch.Tensor:
    """``[C, D]`` class embeddings: per class the mean of the normalised embeddings of its
    :func:`description_prompts` (``descriptors=None``: plain class-name prompts). ``renormalize`` normalises each
    mean (CLIP's recipe); GRAIN's evaluation does not."""
    if descriptors is not None and len(descriptors) != len(classnames):
        raise ValueError(f"{len(descriptors)} descriptor lists for {len(classnames)} classes")
    prompts = [description_prompts(c, None if descriptors is None else descriptors[i], templates, strict_articles)
               for i, c in enumerate(classnames)]
    flat = [p for ps in prompts for p in ps]
    emb = F.normalize(encode_texts(flat).float(), dim=-1)
    out, start = [], 0
    for ps in prompts:
        out.append(emb[start:start + len(ps)].mean(0))
        start += len(ps)
    weights = torch.stack(out)
    return F.normalize(weights, dim=-1) if renormalize else weights


def grain_classifier(model, classnames: Sequence[str], descriptors: Sequence[Sequence[str]] | None = None,
                     templates: Sequence[str] = DEFAULT_TEMPLATES, renormalize: bool = False,
                     strict_articles: bool = False):
    """A :class:`~cliplab.zeroshot.ZeroShotClassifier` whose class weights are :func:`class_text_embeddings` of
    ``model`` (a :class:`GrainModel` classifies with its global query; any CLIP works too)."""
    from .classifier import ZeroShotClassifier

    weights = class_text_embeddings(lambda t: model.encode_texts(t), classnames, descriptors, templates, renormalize,
                                    strict_articles)
    scale = min(math.exp(float(model.logit_scale.detach())), 100.0)
    return ZeroShotClassifier(weights, list(classnames), logit_scale=scale, model=model, normalize=False)


# --------------------------------------------------------------------------------------------------------------------
# The query decoder


class _DecoderLayer(nn.Module):
    """Pre-norm DETR decoder layer, self-attention first (the official ``forward_pre`` with ``sa_first``)."""

    def __init__(self, width: int, heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.linear1, self.linear2 = nn.Linear(width, ffn_dim), nn.Linear(ffn_dim, width)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.dropout = nn.Dropout(dropout)
        self.dropout1, self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        t = self.norm1(tgt)
        q = t + query_pos
        tgt = tgt + self.dropout1(self.self_attn(q, q, t, need_weights=False)[0])
        t = self.norm2(tgt)
        tgt = tgt + self.dropout2(self.cross_attn(t + query_pos, memory, memory, need_weights=False)[0])
        t = self.norm3(tgt)
        return tgt + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(t)))))


class _MLP(nn.Module):
    def __init__(self, dims: Sequence[int]):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


@dataclass
class GrainOutput:
    """``boxes`` ``[B, R, 4]`` normalised ``cxcywh``; ``region_embeds`` ``[B, R, D]`` and ``image_embeds`` ``[B, D]``
    (unnormalised, joint space); ``layer_boxes``: the boxes of every decoder layer's output (last = ``boxes``)."""

    boxes: torch.Tensor
    region_embeds: torch.Tensor
    image_embeds: torch.Tensor
    layer_boxes: list[torch.Tensor] = field(default_factory=list)


class QueryDecoderHead(nn.Module):
    """``num_regions`` region queries and one global query (last) decoding patch tokens ``[B, N, feature_dim]``."""

    def __init__(self, feature_dim: int, embed_dim: int, width: int = 64, heads: int = 4, layers: int = 2,
                 num_regions: int = 5, ffn_dim: int | None = None, dropout: float = 0.1):
        super().__init__()
        if num_regions < 1 or layers < 1 or width % heads:
            raise ValueError(f"need num_regions >= 1, layers >= 1 and width divisible by heads; got {num_regions}, "
                             f"{layers}, {width}/{heads}")
        self.num_regions = num_regions
        self.spec = {"feature_dim": feature_dim, "embed_dim": embed_dim, "width": width, "heads": heads,
                     "layers": layers, "num_regions": num_regions, "ffn_dim": ffn_dim or 4 * width, "dropout": dropout}
        self.input_proj = nn.Linear(feature_dim, width, bias=False)
        self.memory_norm = nn.LayerNorm(width)
        self.layers = nn.ModuleList(_DecoderLayer(width, heads, ffn_dim or 4 * width, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        for p in [*self.memory_norm.parameters(), *self.layers.parameters(), *self.norm.parameters()]:
            if p.dim() > 1:  # the official Cross_Attention's reset: Xavier on the decoder's matrices
                nn.init.xavier_uniform_(p)
        self.query_embed = nn.Parameter(torch.randn(num_regions + 1, width))  # nn.Embedding's N(0, 1)
        self.box_head = _MLP([width, width, width, 4])
        self.obj_proj = nn.Parameter(torch.randn(width, embed_dim) * width ** -0.5)
        self.img_proj = nn.Parameter(torch.randn(width, embed_dim) * width ** -0.5)

    def forward(self, tokens: torch.Tensor) -> GrainOutput:
        memory = self.memory_norm(self.input_proj(tokens))
        pos = self.query_embed.to(memory.dtype).expand(memory.shape[0], -1, -1)
        x = torch.zeros_like(pos)
        states = []
        for layer in self.layers:
            x = layer(x, memory, pos)
            states.append(self.norm(x))
        regions = [s[:, :-1] for s in states]
        layer_boxes = [self.box_head(r).sigmoid() for r in regions]
        last = states[-1]
        return GrainOutput(layer_boxes[-1], last[:, :-1] @ self.obj_proj, last[:, -1] @ self.img_proj, layer_boxes)


class GrainModel(nn.Module):
    """A CLIP (``clip``) with a :class:`QueryDecoderHead` (``head``) on its image tower's patch tokens.
    ``encode_image`` gives the global query's embedding; text goes through the CLIP's text tower."""

    def __init__(self, clip, head: QueryDecoderHead | None = None, **head_kwargs):
        super().__init__()
        self.clip = clip
        dim = clip.config.embed_dim
        self.head = head if head is not None else QueryDecoderHead(dim, dim, **head_kwargs)

    @property
    def config(self):
        return self.clip.config

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    def patch_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """The decoder's memory: every patch token through ``ln_post`` and the projection (CLS dropped)."""
        return self.clip.encode_image(pixels, output="tokens").tokens[:, 1:]

    def forward(self, pixels: torch.Tensor) -> GrainOutput:
        return self.head(self.patch_tokens(pixels))

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        emb = self.forward(pixels).image_embeds.float()
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_text(self, tokens, normalize: bool = False) -> torch.Tensor:
        return self.clip.encode_text(tokens, normalize)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256, normalize: bool = False) -> torch.Tensor:
        return self.clip.encode_texts(texts, batch_size=batch_size, normalize=normalize)

    def preprocess(self, image) -> torch.Tensor:
        return self.clip.preprocess(image)

    # the rest of the CLIP interface the zero-shot classifier and the CLI use
    @property
    def device(self) -> torch.device:
        return self.clip.device

    @property
    def tokenizer(self):
        return self.clip.tokenizer

    def tokenize(self, texts, truncate: bool = True):
        return self.clip.tokenize(texts, truncate=truncate)

    @torch.no_grad()
    def encode_images(self, images, batch_size: int = 64, normalize: bool = False) -> torch.Tensor:
        """Preprocess and encode PIL images or paths in batches (global-query embeddings)."""
        images = list(images)
        out = [self.encode_image(self.clip.preprocessor.batch(images[i:i + batch_size]).to(self.device), normalize)
               for i in range(0, len(images), batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.config.embed_dim)

    def save(self, directory) -> "Path":
        """``directory/clip`` (the CLIP's native format), ``grain_head.safetensors`` and ``grain.json`` (the head's
        shape); :func:`load_grain` reads it back exactly."""
        import json

        from safetensors.torch import save_file

        directory = Path(directory)
        self.clip.save(directory / "clip")
        save_file({k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()},
                  str(directory / HEAD_FILE))
        (directory / GRAIN_CONFIG_FILE).write_text(json.dumps({"format": "cliplab-grain", "head": self.head.spec},
                                                              indent=2) + "\n")
        return directory


def load_grain(directory) -> GrainModel:
    """A :class:`GrainModel` saved with :meth:`GrainModel.save`."""
    import json

    from safetensors.torch import load_file

    from ..models import load

    directory = Path(directory)
    if not (directory / GRAIN_CONFIG_FILE).is_file():
        raise FileNotFoundError(f"no {GRAIN_CONFIG_FILE} in {directory}: save the model with GrainModel.save")
    spec = json.loads((directory / GRAIN_CONFIG_FILE).read_text())["head"]
    head = QueryDecoderHead(**spec)
    head.load_state_dict(load_file(str(directory / HEAD_FILE)))
    return GrainModel(load(directory / "clip"), head).eval()


# --------------------------------------------------------------------------------------------------------------------
# Data: the synthetic world's exact boxes and region descriptions


def region_annotations(scene, max_boxes: int = 5) -> tuple[torch.Tensor, list[str]]:
    """``(boxes, descriptions)`` of a synthetic scene's visible objects (at most ``max_boxes``): boxes ``[T, 4]``
    normalised ``cxcywh`` of the object's box clipped to the image; descriptions "a red striped circle" (colour,
    texture unless plain, shape)."""
    s = scene.image_size
    boxes, descs = [], []
    for obj, mask in zip(scene.objects, scene.masks):
        if not mask.any():
            continue  # fully occluded: nothing to ground
        x0, y0, x1, y1 = obj.box
        x0, y0, x1, y1 = max(0, x0) / s, max(0, y0) / s, min(s, x1) / s, min(s, y1) / s
        boxes.append([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0])
        words = [obj.colour] + ([obj.texture] if obj.texture != "plain" else []) + [obj.shape]
        descs.append(f"{article(words[0])} {' '.join(words)}")
        if len(boxes) == max_boxes:
            break
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), descs


@dataclass
class GrainData:
    """Preprocessed training set: ``pixels`` ``[N, 3, S, S]``, ``captions`` (texts), per image its ``boxes`` and the
    indices of its region descriptions into ``descriptions`` (unique phrases)."""

    pixels: torch.Tensor
    captions: list[str]
    boxes: list[torch.Tensor]
    description_ids: list[list[int]]
    descriptions: list[str]

    def __len__(self) -> int:
        return len(self.captions)


def _pixels(images, image_size: int) -> torch.Tensor:
    """64 px synthetic renders are already the input size: scale to [0, 1] and normalise with CLIP's mean/std (what
    the preprocessor does at equal size, without a PIL round trip per image)."""
    from ..models.preprocess import PreprocessConfig

    cfg = PreprocessConfig()
    arr = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
    if arr.shape[1] != image_size:
        raise ValueError(f"images are {arr.shape[1]} px, the model takes {image_size}: render the world at that size")
    x = torch.from_numpy(arr).permute(0, 3, 1, 2)
    return (x - torch.tensor(cfg.mean)[:, None, None]) / torch.tensor(cfg.std)[:, None, None]


CAPTION_MODES = ("short", "no-colour")


def coarse_caption(caption: str) -> str:
    """The caption without its colour words ("a small red circle" -> "a small circle"): a caption that, like web
    alt-text, does not state the fine detail the region descriptions give."""
    from ..data.synthetic.vocabulary import COLOURS

    return " ".join(w for w in caption.split(" ") if w not in COLOURS)


def build_grain_data(n: int, world: SceneWorld | None = None, offset: int = 0, max_boxes: int = 5,
                     caption: str = "short") -> GrainData:
    """``n`` scenes ``offset..offset+n-1`` of ``world`` (default: 64 px, seed 0) as :class:`GrainData`.
    ``caption``: ``"short"`` (the world's short caption) or ``"no-colour"`` (:func:`coarse_caption`; the region
    descriptions keep their colours)."""
    if caption not in CAPTION_MODES:
        raise ValueError(f"caption must be one of {CAPTION_MODES}, got {caption!r}")
    world = world or SceneWorld(64, seed=0)
    scenes = [world.sample(offset + i) for i in range(n)]
    vocab: dict[str, int] = {}
    boxes, ids = [], []
    for s in scenes:
        b, d = region_annotations(s, max_boxes)
        boxes.append(b)
        ids.append([vocab.setdefault(p, len(vocab)) for p in d])
    captions = [s.short_caption if caption == "short" else coarse_caption(s.short_caption) for s in scenes]
    return GrainData(_pixels([s.image for s in scenes], world.image_size), captions, boxes, ids, list(vocab))


# --------------------------------------------------------------------------------------------------------------------
# Losses


def clip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE on normalised embeddings (``logit_scale`` already exponentiated)."""
    logits = logit_scale * F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def box_loss(pred_boxes: torch.Tensor, targets: Sequence[torch.Tensor],
             indices: Sequence[tuple[torch.Tensor, torch.Tensor]], l1_weight: float = 1.0,
             giou_weight: float = 1.0) -> torch.Tensor:
    """DETR's box loss on matched pairs: ``(l1_weight * sum |p - t|_1 + giou_weight * sum (1 - GIoU)) / n_boxes``,
    ``pred_boxes`` ``[B, R, 4]`` and targets ``cxcywh``."""
    src = torch.cat([pred_boxes[b, i] for b, (i, _) in enumerate(indices)])
    tgt = torch.cat([t[j] for t, (_, j) in zip(targets, indices)]).to(src)
    n = max(1, src.shape[0])
    if src.shape[0] == 0:
        return pred_boxes.sum() * 0.0
    l1 = (src - tgt).abs().sum()
    giou = torch.diagonal(generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)))
    return (l1_weight * l1 + giou_weight * (1 - giou).sum()) / n


def region_description_loss(region_embeds: torch.Tensor, indices: Sequence[tuple[torch.Tensor, torch.Tensor]],
                            target_ids: Sequence[torch.Tensor], description_embeds: torch.Tensor,
                            logit_scale: torch.Tensor) -> torch.Tensor:
    """Each matched region embedding against every description of the batch: cross-entropy of
    ``logit_scale * cos(region, descriptions)`` with its own description (``target_ids[b][j]``: the row of image
    ``b``'s target ``j`` in ``description_embeds``)."""
    src = torch.cat([region_embeds[b, i] for b, (i, _) in enumerate(indices)])
    if src.shape[0] == 0:
        return region_embeds.sum() * 0.0
    labels = torch.cat([ids[j] for ids, (_, j) in zip(target_ids, indices)]).to(src.device)
    logits = logit_scale * F.normalize(src, dim=-1) @ F.normalize(description_embeds, dim=-1).T
    return F.cross_entropy(logits, labels)


def grain_losses(out: GrainOutput, caption_embeds: torch.Tensor, targets: Sequence[torch.Tensor],
                 target_ids: Sequence[torch.Tensor], description_embeds: torch.Tensor | None,
                 logit_scale: torch.Tensor, *, clip_weight: float = 1.0, box_weight: float = 1.0,
                 region_weight: float = 1.0, cost_l1: float = 5.0, cost_giou: float = 2.0,
                 aux_loss: bool = False) -> dict[str, torch.Tensor]:
    """GRAIN's terms and their weighted sum (``"loss"``). Matching on the last decoder layer's boxes (class cost
    excluded); with ``aux_loss`` every earlier layer adds its own matched box loss. A weight of 0 skips its term."""
    terms: dict[str, torch.Tensor] = {"clip": clip_loss(out.image_embeds, caption_embeds, logit_scale)}
    total = clip_weight * terms["clip"]
    if box_weight or region_weight:
        indices = [hungarian_match(p, t, cost_l1, cost_giou) for p, t in zip(out.boxes.detach(), targets)]
        if box_weight:
            terms["box"] = box_loss(out.boxes, targets, indices)
            if aux_loss:
                for boxes in out.layer_boxes[:-1]:
                    aux = [hungarian_match(p, t, cost_l1, cost_giou) for p, t in zip(boxes.detach(), targets)]
                    terms["box"] = terms["box"] + box_loss(boxes, targets, aux)
            total = total + box_weight * terms["box"]
        if region_weight:
            if description_embeds is None:
                raise ValueError("region_weight > 0 needs description_embeds")
            terms["region"] = region_description_loss(out.region_embeds, indices, target_ids, description_embeds,
                                                      logit_scale)
            total = total + region_weight * terms["region"]
    terms["loss"] = total
    return terms


# --------------------------------------------------------------------------------------------------------------------
# Training


def grain_tiny_model() -> dict:
    """``test-tiny`` at 64 px with 8 px patches (64 patch tokens: enough to place boxes on 64 px scenes)."""
    from ..models import get_config

    cfg = get_config("test-tiny").to_dict()
    cfg["name"] = "grain-tiny"
    cfg["vision"].update(image_size=64, patch_size=8)
    cfg["preprocess"]["image_size"] = 64
    return cfg


@dataclass
class GrainConfig:
    """A GRAIN run; ``box_weight=0, region_weight=0`` is the CLIP-only control (same model, data and steps)."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 20
    weight_decay: float = 0.1
    clip_weight: float = 1.0
    box_weight: float = 1.0
    region_weight: float = 1.0
    cost_l1: float = 5.0
    cost_giou: float = 2.0
    aux_loss: bool = False
    num_regions: int = 5
    decoder_width: int = 64
    decoder_heads: int = 4
    decoder_layers: int = 2
    dropout: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    world_seed: int = 0
    train_scenes: int = 2048
    caption: str = "short"  # or "no-colour": captions without colour words (build_grain_data)
    threads: int | None = 1  # one thread: a model this small gains nothing from two on a busy machine

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 2 or self.train_scenes < self.batch_size:
            raise ValueError(f"need steps >= 1, batch_size >= 2 and train_scenes >= batch_size, got {self.steps}, "
                             f"{self.batch_size}, {self.train_scenes}")

    def control(self) -> "GrainConfig":
        """The same run with CLIP's loss only."""
        return replace(self, box_weight=0.0, region_weight=0.0)


@dataclass
class TrainHistory:
    steps: list[int] = field(default_factory=list)
    terms: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    def mean(self, key: str, first: int | None = None, last: int | None = None) -> float:
        vals = [t[key] for t in self.terms if key in t]
        vals = vals[:first] if first else vals[-last:] if last else vals
        return float(np.mean(vals)) if vals else float("nan")


def new_grain_model(config: GrainConfig, model: dict | str | None = None) -> GrainModel:
    """A fresh, seeded CLIP (``model``: a config dict or name; default :func:`grain_tiny_model`) with its head."""
    from ..models import create_model
    from ..models.config import ModelConfig

    torch.manual_seed(config.seed)
    spec = model or grain_tiny_model()
    clip = create_model(ModelConfig.from_dict(spec) if isinstance(spec, dict) else spec)
    return GrainModel(clip, width=config.decoder_width, heads=config.decoder_heads, layers=config.decoder_layers,
                      num_regions=config.num_regions, dropout=config.dropout)


def train_grain(config: GrainConfig | None = None, *, data: GrainData | None = None, model: GrainModel | None = None,
                log_every: int = 0) -> tuple[GrainModel, TrainHistory]:
    """Train a :class:`GrainModel` from scratch (or ``model``, modified in place) on ``data`` (default:
    ``build_grain_data(config.train_scenes)`` of ``SceneWorld(64, seed=config.world_seed)``). AdamW, linear warm-up
    then cosine, global gradient-norm clipping, ``logit_scale`` clamped to ``[0, ln 100]``. Batches are a pure
    function of ``config.seed``, so the control and GRAIN see the same images in the same order."""
    from ..train.trainer import WarmupCosine, param_groups

    cfg = config or GrainConfig()
    previous_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        if data is None:
            data = build_grain_data(cfg.train_scenes, SceneWorld(64, seed=cfg.world_seed), caption=cfg.caption)
        model = model if model is not None else new_grain_model(cfg)
        torch.manual_seed(cfg.seed)
        tokenizer = model.clip.tokenizer
        ctx = model.config.text.context_length
        caption_ids = tokenizer(data.captions, context_length=ctx).ids
        desc_ids = tokenizer(data.descriptions, context_length=ctx).ids if data.descriptions else None
        opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
        schedule = WarmupCosine(cfg.lr, cfg.steps, cfg.warmup_steps, cfg.min_lr)
        rng = np.random.default_rng(cfg.seed)
        history = TrainHistory()
        start = time.perf_counter()
        model.train()
        for step in range(cfg.steps):
            idx = rng.choice(len(data), cfg.batch_size, replace=False)
            schedule.apply(opt, step)
            out = model(data.pixels[idx])
            captions = model.clip.encode_text(caption_ids[idx])
            targets = [data.boxes[i] for i in idx]
            desc_emb, target_ids = None, [torch.zeros(len(data.boxes[i]), dtype=torch.long) for i in idx]
            if cfg.region_weight and desc_ids is not None:
                used = sorted({d for i in idx for d in data.description_ids[i]})
                row = {d: r for r, d in enumerate(used)}
                desc_emb = model.clip.encode_text(desc_ids[used])
                target_ids = [torch.tensor([row[d] for d in data.description_ids[i]], dtype=torch.long) for i in idx]
            scale = model.logit_scale.exp()
            terms = grain_losses(out, captions, targets, target_ids, desc_emb, scale, clip_weight=cfg.clip_weight,
                                 box_weight=cfg.box_weight, region_weight=cfg.region_weight, cost_l1=cfg.cost_l1,
                                 cost_giou=cfg.cost_giou, aux_loss=cfg.aux_loss)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            history.steps.append(step + 1)
            history.terms.append({k: float(v.detach()) for k, v in terms.items()})
            if log_every and (step % log_every == 0 or step == cfg.steps - 1):
                print(f"step {step + 1}/{cfg.steps} " + " ".join(f"{k} {v:.3f}" for k, v in history.terms[-1].items()),
                      flush=True)
        history.seconds = time.perf_counter() - start
        model.eval()
        return model, history
    finally:
        torch.set_num_threads(previous_threads)


# --------------------------------------------------------------------------------------------------------------------
# Evaluation: part-defined classes, box IoU

#: Opaque class names: words the training captions never contain, so a plain prompt carries no information.
OPAQUE_NAMES = ("zorp", "blick", "dax", "wug", "fep", "toma", "kiki", "bouba", "glorp", "snib")
DEFAULT_PARTS = (("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "star"))


@dataclass
class PartClassTask:
    """Classes defined by their parts: ``classnames[c]`` (opaque), ``descriptors[c]`` ("has a red circle", one per
    part), test ``pixels`` ``[N, 3, S, S]`` and ``labels`` ``[N]`` (each image shows exactly its class's parts, with
    random sizes, textures and positions)."""

    classnames: list[str]
    parts: list[tuple[tuple[str, str], ...]]
    descriptors: list[list[str]]
    pixels: torch.Tensor
    labels: torch.Tensor


def part_class_task(n_per_class: int = 30, parts: Sequence[tuple[str, str]] = DEFAULT_PARTS, parts_per_class: int = 2,
                    seed: int = 1234, image_size: int = 64) -> PartClassTask:
    """Every ``parts_per_class``-subset of ``parts`` (colour, shape) is a class with an opaque name; with the 4
    default parts and 2 per class: 6 classes, each part shared by 3 of them, so only both parts identify a class."""
    from itertools import combinations

    combos = list(combinations(parts, parts_per_class))
    if len(combos) > len(OPAQUE_NAMES):
        raise ValueError(f"{len(combos)} classes but only {len(OPAQUE_NAMES)} opaque names: use fewer parts")
    world = SceneWorld(image_size, seed=seed, clutter_prob=0.0, word_prob=0.0)
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for c, combo in enumerate(combos):
        for _ in range(n_per_class):
            specs = [{"colour": col, "shape": shape} for col, shape in combo]
            images.append(world.compose(specs, rng, word=False).image)
            labels.append(c)
    descriptors = [[f"has {article(col)} {col} {shape}" for col, shape in combo] for combo in combos]
    return PartClassTask(list(OPAQUE_NAMES[:len(combos)]), combos, descriptors, _pixels(images, image_size),
                         torch.tensor(labels))


@torch.no_grad()
def zero_shot_accuracy(model: GrainModel, task: PartClassTask, descriptions: bool = True,
                       templates: Sequence[str] = DEFAULT_TEMPLATES, renormalize: bool = False,
                       strict_articles: bool = False, batch_size: int = 256) -> float:
    """Top-1 of the global image embedding against class embeddings from plain class-name prompts
    (``descriptions=False``) or the description ensemble (:func:`class_text_embeddings`)."""
    model.eval()
    weights = class_text_embeddings(lambda t: model.encode_texts(t), task.classnames,
                                    task.descriptors if descriptions else None, templates, renormalize,
                                    strict_articles)
    feats = torch.cat([model.encode_image(task.pixels[i:i + batch_size], normalize=True)
                       for i in range(0, len(task.pixels), batch_size)])
    return float(((feats @ weights.T).argmax(-1) == task.labels).float().mean())


@torch.no_grad()
def box_mean_iou(model: GrainModel, data: GrainData, cost_l1: float = 5.0, cost_giou: float = 2.0,
                 batch_size: int = 256) -> float:
    """Mean IoU of Hungarian-matched (predicted, ground-truth) box pairs over ``data`` (held-out scenes)."""
    model.eval()
    ious = []
    for start in range(0, len(data), batch_size):
        out = model(data.pixels[start:start + batch_size])
        for pred, tgt in zip(out.boxes, data.boxes[start:start + batch_size]):
            i, j = hungarian_match(pred, tgt, cost_l1, cost_giou)
            if len(i):
                iou, _ = box_iou(box_cxcywh_to_xyxy(pred[i]), box_cxcywh_to_xyxy(tgt[j]))
                ious.append(torch.diagonal(iou))
    return float(torch.cat(ious).mean()) if ious else float("nan")


# --------------------------------------------------------------------------------------------------------------------
# The training preset (what ``cliplab train --preset grain-tiny`` runs)

#: preset name -> one-line summary (``cliplab train --list-presets``)
GRAIN_PRESETS = {"grain-tiny": "GRAIN from scratch on synthetic scenes: grain-tiny CLIP + query decoder, CLIP + box + "
                               "region-description losses, 300 x 32, about 5 minutes on 2 CPU cores"}


def run_grain_preset(name: str = "grain-tiny", out=None, *, control: bool = False, n_per_class: int = 50,
                     heldout: int = 300, log_every: int = 0, **options) -> dict:
    """Train the preset (``options``: :class:`GrainConfig` fields, e.g. ``steps=100``; ``control=True``: CLIP's loss
    only), save it to ``out`` (:meth:`GrainModel.save`; load with :func:`load_grain`) and evaluate: zero-shot top-1
    on :func:`part_class_task` with plain and description prompts, and held-out box mean IoU. Returns a summary."""
    if name not in GRAIN_PRESETS:
        raise ValueError(f"unknown GRAIN preset {name!r}; choose from {sorted(GRAIN_PRESETS)}")
    cfg = GrainConfig(**options)
    cfg = cfg.control() if control else cfg
    model, history = train_grain(cfg, log_every=log_every)
    saved = model.save(out) if out is not None else None
    task = part_class_task(n_per_class=n_per_class)
    held = build_grain_data(heldout, SceneWorld(64, seed=cfg.world_seed), offset=1_000_000)
    return {"preset": name, "control": control, "steps": cfg.steps, "out": str(saved) if saved else None,
            "seconds": round(history.seconds, 1), "last_losses": history.terms[-1],
            "zero_shot_plain": zero_shot_accuracy(model, task, descriptions=False),
            "zero_shot_descriptions": zero_shot_accuracy(model, task, descriptions=True),
            "box_mean_iou": box_mean_iou(model, held)}
