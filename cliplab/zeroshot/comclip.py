"""ComCLIP: training-free compositional image-text matching (Jiang et al., "Prompting Large Vision-Language Models
for Compositional Reasoning" / "ComCLIP: Training-Free Compositional Image and Text Matching"; official code
eric-ai-lab/ComCLIP, ``winoground/comclip.py`` and ``helper_function.py``).

The caption is parsed into entities (a noun with its attributes) and relations (subject, predicate, object). Each
entity is matched to image regions; its *sub-image* keeps the matched regions' pixels and blacks out the rest
(several regions: their union; none: the whole image). A relation's sub-image is the union of its subject's and
object's sub-images (the whole image when either is unmatched). For every component word ``w`` with sub-image
``I_w`` (the official code's formula)::

    e_w = E_I(I_w) / |E_I(I_w)|
    s_w = exp(logit_scale) * cos(E_T(w), e_w)          # logits_per_text of the HF CLIP the code uses
    ŝ_w = s_w / Σ_v s_v                                 # sum-normalised (the paper's text says softmax)
    e*  = E_I(I) / |E_I(I)| + weight * Σ_w ŝ_w e_w
    score(caption, image) = cos(E_T(caption), e*)

Where it acts: on the joint (projected, L2-normalised) embeddings only; both towers run unchanged, the image tower
once per sub-image. Nothing is trained.

Differences from the paper / official code, and why:

* **Parser**: no LLM. :mod:`cliplab.zeroshot.caption_parse` gives the exact parse of the synthetic grammar and a
  rule-based parser for free text (the LLM's JSON has the same fields: objects with attributes, SVO connections).
* **Regions**: no GRiT dense captioner. A :class:`~cliplab.zeroshot.regions.RegionProposer` gives regions: on the
  synthetic world the renderer's objects (box, mask, shape label); elsewhere a grid. Entity-to-region matching (an
  LLM over dense captions in the paper) is exact label equality with the entity's head noun when regions carry
  labels, and otherwise the region whose sub-image is most similar to the noun's text embedding.
* **weight**: the paper adds the components with weight 1; ``weight`` scales their sum (``weight=0`` is plain CLIP,
  bit for bit, which the tests use as the control).
* ``normalization="sum"`` (default) divides the raw logits by their sum as the code does (negative logits, which a
  small model gives, included); a sum of exactly 0 gives zero weights instead of a division by zero.
  ``"softmax"`` is the paper's wording.
* ``cutout="box"`` (default) blacks out outside the region's box like the code; ``"mask"`` keeps only the region's
  mask pixels, which the synthetic world can offer.
* A rendered word in a synthetic caption (``, and the word "cat"``) is not an entity (no region names it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..methods import register_method
from .caption_parse import CaptionParts, CaptionParser, parse_caption
from .regions import GridRegionProposer, Region, RegionProposer, SceneRegionProposer, image_size_of

__all__ = ["Component", "ComCLIP", "comclip_scores", "winoground_comclip_scores", "combine_embeddings",
           "component_weights", "blackout", "caption_components", "NORMALIZATIONS", "CUTOUTS"]

register_method(
    "comclip",
    "ComCLIP: Training-Free Compositional Image and Text Matching",
    "caption parsed into entities and relations, each matched to an image region sub-image (outside blacked out); "
    "the global image embedding plus the text-matched, sum-normalised component embeddings is scored against the "
    "caption (training-free)",
    doc="docs/methods/comclip.md",
)(__name__)

NORMALIZATIONS = ("sum", "softmax")
CUTOUTS = ("box", "mask")


# --- the combination ------------------------------------------------------------------------------------------------
def component_weights(scores: torch.Tensor, normalization: str = "sum") -> torch.Tensor:
    """``ŝ`` from component logits ``s`` ``[K]``: ``s / Σ s`` (``"sum"``, the official code, negative logits
    included; a zero sum gives all-zero weights) or ``softmax(s)`` (``"softmax"``, the paper's text)."""
    if normalization == "softmax":
        return scores.softmax(-1)
    if normalization != "sum":
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    total = scores.sum(-1, keepdim=True)
    return torch.where(total != 0, scores / torch.where(total != 0, total, torch.ones_like(total)),
                       torch.zeros_like(scores))


def combine_embeddings(global_features: torch.Tensor, component_features: torch.Tensor,
                       component_scores: torch.Tensor, *, weight: float = 1.0,
                       normalization: str = "sum") -> torch.Tensor:
    """``e* = normalize(g + weight * Σ_k ŝ_k e_k)`` for a unit ``g`` ``[D]``, unit component embeddings ``[K, D]``
    and their logits ``[K]``. With no component, or a zero sum, ``g`` comes back unchanged (already unit: a second
    normalisation would only move its last bits)."""
    if component_features.shape[0] == 0:
        return global_features
    w = component_weights(component_scores, normalization)
    delta = weight * (w[:, None] * component_features).sum(0)
    if not bool(delta.any()):
        return global_features
    return F.normalize(global_features + delta, dim=-1)


# --- sub-images ------------------------------------------------------------------------------------------------------
def blackout(image, keep: np.ndarray | None):
    """A copy of ``image`` (PIL) with every pixel outside ``keep`` (bool ``[H, W]``) set to black; ``None`` keeps
    the whole image."""
    from PIL import Image

    rgb = image.convert("RGB")
    if keep is None:
        return rgb.copy()
    arr = np.asarray(rgb)
    if keep.shape != arr.shape[:2]:
        raise ValueError(f"keep mask {keep.shape} does not match the image {arr.shape[:2]}")
    out = np.zeros_like(arr)
    out[keep] = arr[keep]
    return Image.fromarray(out, "RGB")


@dataclass(frozen=True, eq=False)
class Component:
    """One component word and the pixels of its sub-image (``None``: the whole image)."""

    word: str
    keep: np.ndarray | None
    kind: str  # "entity" | "relation"


def _label_matches(label: str | None, name: str) -> bool:
    if not label:
        return False
    label, name = label.lower().strip(), name.lower().strip()
    return label == name or label.split()[-1] == name or label.rstrip("s") == name.rstrip("s")


def caption_components(parts: CaptionParts, regions: Sequence[Region], size: tuple[int, int], *,
                       cutout: str = "box",
                       match: Callable[[str, Sequence[Region]], list[int]] | None = None) -> list[Component]:
    """The components of one (caption, image): one per entity (its matched regions' union; whole image when
    unmatched) and one per relation (subject ∪ object; whole image when either is unmatched). Regions with labels
    match by label; otherwise ``match(name, regions) -> indices`` decides (none given: unmatched)."""
    if cutout not in CUTOUTS:
        raise ValueError(f"cutout must be one of {CUTOUTS}, got {cutout!r}")
    labelled = any(r.label for r in regions)
    keeps: dict[str, np.ndarray | None] = {}
    out = []
    for e in parts.entities:
        if labelled:
            idx = [k for k, r in enumerate(regions) if _label_matches(r.label, e.name)]
        else:
            idx = list(match(e.name, regions)) if match is not None and regions else []
        keep = None
        if idx:
            keep = np.zeros((size[1], size[0]), dtype=bool)
            for k in idx:
                keep |= regions[k].keep(size, cutout)
        keeps[e.name] = keep
        out.append(Component(e.phrase, keep, "entity"))
    for r in parts.relations:
        a, b = keeps.get(r.subject), keeps.get(r.object)
        out.append(Component(r.predicate, None if a is None or b is None else a | b, "relation"))
    return out


# --- scoring ---------------------------------------------------------------------------------------------------------
def _load(image):
    if isinstance(image, str) or hasattr(image, "__fspath__"):
        from PIL import Image

        return Image.open(image).convert("RGB")
    if hasattr(image, "masks") and hasattr(image, "image"):  # a synthetic scene
        return image.image
    return image


class ComCLIP:
    """ComCLIP scorer around a CLIP ``model`` (module docstring: formula and differences from the paper).

    ``proposer``: a :class:`RegionProposer` (default: :class:`SceneRegionProposer` for synthetic scenes,
    :class:`GridRegionProposer` for other images); ``parser``: ``str -> CaptionParts`` (default
    :func:`~cliplab.zeroshot.caption_parse.parse_caption`); ``weight``, ``normalization``, ``cutout``: see the
    module docstring; ``batch_size``: sub-images per image-tower batch."""

    def __init__(self, model, *, proposer: RegionProposer | None = None, parser: CaptionParser | None = None,
                 weight: float = 1.0, normalization: str = "sum", cutout: str = "box", batch_size: int = 64):
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        if cutout not in CUTOUTS:
            raise ValueError(f"cutout must be one of {CUTOUTS}, got {cutout!r}")
        self.model = model
        self.proposer = proposer
        self.parser = parser or parse_caption
        self.weight = float(weight)
        self.normalization = normalization
        self.cutout = cutout
        self.batch_size = int(batch_size)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().float().exp())

    def regions(self, images: Sequence[Any]) -> list[list[Region]]:
        out = []
        for im in images:
            proposer = self.proposer
            if proposer is None:
                proposer = SceneRegionProposer() if hasattr(im, "masks") else GridRegionProposer()
            out.append(list(proposer(im)))
        return out

    @torch.inference_mode()
    def _encode_images(self, pil_images: list) -> torch.Tensor:
        if not pil_images:
            return torch.empty(0, self.model.config.embed_dim)
        return self.model.encode_images(pil_images, batch_size=self.batch_size, normalize=True).float().cpu()

    @torch.inference_mode()
    def score(self, images: Sequence[Any], captions: Sequence[str], *, pairs: Sequence[tuple[int, int]] | None = None,
              regions: Sequence[Sequence[Region]] | None = None, image_features: torch.Tensor | None = None,
              text_features: torch.Tensor | None = None,
              text_encoder: Callable[[list[str]], torch.Tensor] | None = None) -> torch.Tensor:
        """ComCLIP scores of ``(caption c, image i)`` pairs: ``[C, I]`` for all pairs, or ``[len(pairs)]`` for
        ``pairs``. ``images``: PIL images, paths or synthetic scenes; ``regions``: per image (default: the
        proposer's); ``image_features``/``text_features``: the global unit embeddings, when already computed;
        ``text_encoder``: ``list[str] -> unit features`` (e.g. a :class:`~cliplab.eval.CachedEncoder`'s ``texts``)."""
        e_star, text = self.combined_features(images, captions, pairs=pairs, regions=regions,
                                              image_features=image_features, text_features=text_features,
                                              text_encoder=text_encoder)
        if pairs is None:
            return torch.einsum("cd,cid->ci", text, e_star)
        cs = torch.tensor([c for c, _ in pairs], dtype=torch.long)
        return (text[cs] * e_star).sum(-1)

    @torch.inference_mode()
    def combined_features(self, images, captions, *, pairs=None, regions=None, image_features=None,
                          text_features=None, text_encoder=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(e*, text)``: ``e*`` is ``[C, I, D]`` (all pairs) or ``[len(pairs), D]``; ``text`` the ``[C, D]``
        caption embeddings."""
        captions = list(captions)
        encode_text = text_encoder or (lambda t: self.model.encode_texts(t, normalize=True).float().cpu())
        pil = [_load(im) for im in images]
        if image_features is None:
            image_features = self._encode_images(pil)
        text = encode_text(captions) if text_features is None else text_features
        all_pairs = pairs is None
        pairs = [(c, i) for c in range(len(captions)) for i in range(len(pil))] if all_pairs else list(pairs)
        if regions is None:
            regions = self.regions(images)
        parsed = [self.parser(t) for t in captions]
        match = self._similarity_matcher(pil, encode_text)
        # components of every pair; sub-images are shared by pairs of the same image (deduplicated by pixels)
        comps, sub_index, sub_images, sub_key = [], [], [], {}
        for c, i in pairs:
            size = image_size_of(pil[i])
            cs = caption_components(parsed[c], regions[i], size, cutout=self.cutout,
                                    match=(lambda name, regs, i=i: match(i, name, regs)))
            idx = []
            for comp in cs:
                if comp.keep is None:
                    idx.append(-1 - i)  # the whole image: its global embedding
                    continue
                key = (i, comp.keep.tobytes())
                if key not in sub_key:
                    sub_key[key] = len(sub_images)
                    sub_images.append(blackout(pil[i], comp.keep))
                idx.append(sub_key[key])
            comps.append(cs)
            sub_index.append(idx)
        sub_feats = self._encode_images(sub_images)
        words = sorted({comp.word for cs in comps for comp in cs})
        word_feats = dict(zip(words, encode_text(words))) if words else {}
        scale = self.logit_scale
        rows = []
        for (c, i), cs, idx in zip(pairs, comps, sub_index):
            if not cs:
                rows.append(image_features[i])
                continue
            e = torch.stack([image_features[-1 - k] if k < 0 else sub_feats[k] for k in idx])
            t = torch.stack([word_feats[comp.word] for comp in cs])
            s = scale * (t * e).sum(-1)
            rows.append(combine_embeddings(image_features[i], e, s, weight=self.weight,
                                           normalization=self.normalization))
        e_star = torch.stack(rows) if rows else torch.empty(0, text.shape[-1])
        if all_pairs:
            e_star = e_star.view(len(captions), len(pil), -1)
        return e_star, text

    def _similarity_matcher(self, pil: list, encode_text):
        """For unlabelled regions: the one region whose sub-image is most similar to the entity's noun."""
        cache: dict[int, torch.Tensor] = {}

        def match(i: int, name: str, regs: Sequence[Region]) -> list[int]:
            if i not in cache:
                size = image_size_of(pil[i])
                cache[i] = self._encode_images([blackout(pil[i], r.keep(size, self.cutout)) for r in regs])
            return [int((cache[i] @ encode_text([name])[0]).argmax())]

        return match


def comclip_scores(model, images: Sequence[Any], captions: Sequence[str], *, pairs=None, regions=None,
                   proposer: RegionProposer | None = None, parser: CaptionParser | None = None, weight: float = 1.0,
                   normalization: str = "sum", cutout: str = "box", image_features: torch.Tensor | None = None,
                   text_features: torch.Tensor | None = None, text_encoder=None,
                   batch_size: int = 64) -> torch.Tensor:
    """One call: ``ComCLIP(model, ...).score(images, captions, ...)``; ``[C, I]`` scores (or ``[len(pairs)]``)."""
    scorer = ComCLIP(model, proposer=proposer, parser=parser, weight=weight, normalization=normalization,
                     cutout=cutout, batch_size=batch_size)
    return scorer.score(images, captions, pairs=pairs, regions=regions, image_features=image_features,
                        text_features=text_features, text_encoder=text_encoder)


def winoground_comclip_scores(data, encoder, *, image_features: torch.Tensor | None = None,
                              text_features: torch.Tensor | None = None, proposer: RegionProposer | None = None,
                              parser: CaptionParser | None = None, weight: float = 1.0, normalization: str = "sum",
                              cutout: str = "box", batch_size: int = 64) -> torch.Tensor:
    """``scores[p, c, i]`` of a :class:`~cliplab.eval.WinogroundData` by ComCLIP, through ``encoder`` (a
    :class:`~cliplab.eval.CachedEncoder`: global embeddings and word embeddings go through its cache). Regions come
    from the dataset's synthetic scenes (``data.scenes``) when it has them, else from ``proposer`` (default: a
    grid) on the images."""
    if image_features is None:
        image_features = encoder.images(data.items)
    if text_features is None:
        text_features = encoder.texts(data.captions)
    scenes = getattr(data, "scenes", None)
    images = list(scenes) if scenes is not None else [it.load() for it in data.items]
    p = len(data.kinds)
    pairs = [(2 * q + c, 2 * q + i) for q in range(p) for c in range(2) for i in range(2)]
    scorer = ComCLIP(encoder.model, proposer=proposer, parser=parser, weight=weight, normalization=normalization,
                     cutout=cutout, batch_size=batch_size)
    e_star, text = scorer.combined_features(images, data.captions, pairs=pairs, image_features=image_features,
                                            text_features=text_features, text_encoder=encoder.texts)
    t = text.view(p, 2, -1)
    e = e_star.view(p, 2, 2, -1)
    # per caption c, the plain path's very contraction einsum("pcd,pid->pci") on the images as caption c sees them,
    # keeping row c: identical inputs give identical bits, so weight=0 is plain CLIP exactly
    return torch.stack([torch.einsum("pcd,pid->pci", t, e[:, c])[:, c] for c in range(2)], dim=1)
