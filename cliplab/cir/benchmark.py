"""A synthetic composed image retrieval (CIR) benchmark and its evaluation task (``cliplab eval cir``).

A query is a reference image plus a modification text ("make the triangle blue", "make the circle small",
"remove the star", "add a large red ring"); the answer is the target image: the reference scene with that change
applied, everything else untouched (:func:`cliplab.data.synthetic.cir_triplets`). The gallery holds every
reference and every target image of the benchmark (``2n`` images); as in CIRR, a query's own reference image is
left out of its ranking, so the hardest distractors left are the other scenes and the references of other queries.
Metric: Recall@1/5/10 of the target, overall and per modification kind, with chance ``k / (2n - 1)``.

Query encoders (``query=``):

* ``"phi"``: projection-based zero-shot CIR (LinCIR/RTD inference, :func:`cliplab.cir.phi.composed_queries`): the
  text tower (``text_model``, default the evaluated model) on ``"a photo of $ that {modification}"`` with ``$`` =
  ``phi(E_I(reference))``;
* ``"image"``: the reference image alone; ``"text"``: the modification text alone; ``"sum"``: the normalised sum of
  both (the usual training-free baselines).

Training triplets for RTD are text only (:func:`cir_text_triplets`: reference caption, modification, target caption)
and come from another seed than the benchmark's scenes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.synthetic import modification_text
from ..eval.datasets import ImageItem
from ..eval.metrics import target_ranks
from ..eval.tasks import register_task

__all__ = ["CIRData", "TextTriplet", "synthetic_cir", "cir_text_triplets", "modification_text", "cir_recall",
           "evaluate_cir", "cir_task", "QUERY_MODES", "CIR_DATA_KIND"]

CIR_DATA_KIND = "cir"
QUERY_MODES = ("phi", "image", "text", "sum")
KS = (1, 5, 10)


@dataclass
class CIRData:
    """``gallery[reference[q]]`` + ``modifications[q]`` -> ``gallery[target[q]]``; ``kinds[q]`` the change's kind."""

    name: str
    gallery: list[ImageItem]
    reference: list[int]
    modifications: list[str]
    target: list[int]
    kinds: list[str]
    reference_captions: list[str] = field(default_factory=list)
    target_captions: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    kind = CIR_DATA_KIND

    def __len__(self) -> int:
        return len(self.modifications)

    @property
    def items(self) -> list[ImageItem]:  # the name other datasets use for their images
        return self.gallery

    def subset(self, queries: Sequence[int]) -> "CIRData":
        """The same gallery with only the given queries (their gallery indices unchanged)."""
        q = list(queries)
        pick = lambda xs: [xs[i] for i in q] if xs else []  # noqa: E731
        return CIRData(self.name, self.gallery, pick(self.reference), pick(self.modifications), pick(self.target),
                       pick(self.kinds), pick(self.reference_captions), pick(self.target_captions),
                       {**self.info, "queries": q})


def _kinds(kinds: Sequence[str] | str) -> list[str]:
    from ..data.synthetic.tasks import CIR_KINDS

    out = [k.strip() for k in kinds.split(",")] if isinstance(kinds, str) else list(kinds)
    bad = [k for k in out if k not in CIR_KINDS]
    if bad or not out:
        raise ValueError(f"unknown CIR kinds {bad}; pick from {list(CIR_KINDS)}")
    return out


def synthetic_cir(n: int = 100, seed: int = 0, image_size: int = 64,
                  kinds: Sequence[str] | str = ("recolour", "resize", "remove", "add"),
                  clutter_prob: float = 0.3) -> CIRData:
    """``n`` CIR queries of the synthetic world (:func:`cliplab.data.synthetic.cir_triplets`, cycling ``kinds``);
    the gallery is the ``n`` references followed by the ``n`` targets."""
    from ..data.synthetic import cir_triplets

    kinds = _kinds(kinds)
    triplets = cir_triplets(n, kinds=kinds, image_size=image_size, seed=seed, clutter_prob=clutter_prob)
    params = ",".join(f"{k}={v!r}" for k, v in sorted(
        {"seed": seed, "image_size": image_size, "kinds": tuple(kinds), "clutter_prob": clutter_prob}.items()))
    gallery = ([ImageItem(f"synthetic:cir_triplets:{params}:{i}:reference", t.reference_image)
                for i, t in enumerate(triplets)]
               + [ImageItem(f"synthetic:cir_triplets:{params}:{i}:target", t.target_image)
                  for i, t in enumerate(triplets)])
    return CIRData("synthetic-cir", gallery, list(range(n)), [t.modification for t in triplets],
                   list(range(n, 2 * n)), [t.change["op"] for t in triplets],
                   [t.reference_scene.short_caption for t in triplets],
                   [t.target_scene.short_caption for t in triplets],
                   info={"synthetic": {"n": n, "seed": seed, "image_size": image_size, "kinds": kinds,
                                       "clutter_prob": clutter_prob}})


# --- text triplets (RTD's training data) -------------------------------------------------------------------------
@dataclass(frozen=True)
class TextTriplet:
    reference: str
    modification: str
    target: str
    kind: str



def cir_text_triplets(n: int, seed: int = 1000, kinds: Sequence[str] | str = ("recolour", "resize", "remove", "add"),
                      caption: str = "short") -> list[TextTriplet]:
    """``n`` text-only CIR triplets (reference caption, modification, target caption) of the synthetic world, built
    as :func:`cliplab.data.synthetic.cir_triplets` builds its scenes but never rendered (cheap). Use a ``seed``
    other than the benchmark's."""
    from ..data.synthetic import COLOURS, SHAPES, SIZES, SceneWorld, apply_modification

    if caption not in ("short", "long"):
        raise ValueError("caption must be 'short' or 'long'")
    kinds = _kinds(kinds)
    world = SceneWorld(image_size=64, seed=seed, word_prob=0.0)
    out = []
    for p in range(n):
        kind = kinds[p % len(kinds)]
        rng = np.random.default_rng([seed, 7103, p])
        for _ in range(200):
            n_obj = int(rng.integers(2 if kind == "remove" else 1, 4))
            shapes = [SHAPES[i] for i in rng.choice(len(SHAPES), size=n_obj, replace=False)]
            ref = world.compose([{"shape": s} for s in shapes], rng)
            obj = ref.objects[int(rng.integers(n_obj))]
            if kind == "recolour":
                others = [c for c in COLOURS if c != obj.colour]
                change = {"op": "recolour", "shape": obj.shape, "colour": others[int(rng.integers(len(others)))]}
            elif kind == "resize":
                others = [s for s in SIZES if s != obj.size]
                change = {"op": "resize", "shape": obj.shape, "size": others[int(rng.integers(len(others)))]}
            elif kind == "remove":
                change = {"op": "remove", "shape": obj.shape}
            else:
                free = [s for s in SHAPES if s not in shapes]
                change = {"op": "add", **world.fill_spec({"shape": free[int(rng.integers(len(free)))]}, rng)}
            target = apply_modification(ref, change, world, rng)
            if target is not None:
                break
        else:  # pragma: no cover - the layout rules always leave room within 200 tries
            raise RuntimeError("could not build a CIR triplet")
        cap = (lambda s: s.short_caption) if caption == "short" else (lambda s: s.long_caption)
        out.append(TextTriplet(cap(ref), modification_text(change), cap(target), kind))
    return out


# --- metric ------------------------------------------------------------------------------------------------------
def cir_recall(scores: torch.Tensor, target: Sequence[int], reference: Sequence[int] | None = None,
               ks: Sequence[int] = KS) -> dict[str, float]:
    """Recall@k of ``target[q]`` in row ``q`` of ``scores`` ``[Q, G]``; the query's ``reference[q]`` column is left
    out of its ranking (CIRR's rule). Ties break towards the lower gallery index (:func:`target_ranks`)."""
    scores = torch.as_tensor(scores, dtype=torch.float32).clone()
    target = torch.as_tensor(list(target), dtype=torch.long)
    if reference is not None:
        ref = torch.as_tensor(list(reference), dtype=torch.long)
        if bool((ref == target).any()):
            raise ValueError("a query's reference is its own target; nothing to retrieve")
        scores[torch.arange(len(ref)), ref] = float("-inf")
    ranks = target_ranks(scores, target)
    return {f"R@{k}": float((ranks < k).double().mean()) if len(ranks) else float("nan") for k in ks}


# --- evaluation ----------------------------------------------------------------------------------------------------
def _load_phi(phi):
    from .phi import Phi

    if phi is None or isinstance(phi, Phi):
        return phi
    return Phi.load(phi)


def _load_text_model(text_model, model):
    if text_model is None:
        return model
    if isinstance(text_model, (str, Path)):
        from ..models import load

        return load(str(text_model)).eval()
    return text_model


def evaluate_cir(model, data: CIRData, *, query: str = "phi", phi=None, text_model=None,
                 template: str | None = None, encoder=None, ks: Sequence[int] = KS) -> dict[str, Any]:
    """R@k of ``data`` with ``model``'s image tower for the gallery and the ``query`` encoder (module docstring).

    ``phi``: a :class:`~cliplab.cir.phi.Phi` or a saved one (``Phi.save``), needed for ``query="phi"``;
    ``text_model``: the text tower used for composed queries (a model or a checkpoint, e.g. RTD's tuned copy;
    default ``model``); ``template``: default ``"a photo of $ that {}"``; ``encoder``: a
    :class:`~cliplab.eval.cache.CachedEncoder` (default: one without disk cache)."""
    from ..eval.cache import CachedEncoder
    from .phi import DEFAULT_TEMPLATE, composed_queries

    if query not in QUERY_MODES:
        raise ValueError(f"query must be one of {QUERY_MODES}, got {query!r}")
    if query == "phi" and phi is None:
        raise ValueError("query='phi' needs phi (a Phi or a file from Phi.save / train_phi); or use query='sum'")
    if query != "phi" and (phi is not None or text_model is not None or template is not None):
        raise ValueError("phi, text_model and template apply to query='phi' only")
    encoder = encoder if encoder is not None else CachedEncoder(model, None)
    t0 = time.perf_counter()
    gallery = encoder.images(data.gallery)
    t1 = time.perf_counter()
    ref_feats = gallery[torch.as_tensor(data.reference, dtype=torch.long)]
    if query == "image":
        q = ref_feats
    elif query in ("text", "sum"):
        txt = encoder.texts(list(data.modifications))
        q = txt if query == "text" else F.normalize(ref_feats + txt, dim=-1)
    else:
        q = composed_queries(_load_text_model(text_model, model), _load_phi(phi), ref_feats,
                             data.modifications, template=template or DEFAULT_TEMPLATE)
    t2 = time.perf_counter()
    scores = q @ gallery.t()
    metrics: dict[str, Any] = cir_recall(scores, data.target, data.reference, ks)
    kinds = sorted(set(data.kinds))
    metrics["by_kind"] = {}
    for k in kinds:
        rows = [i for i, kk in enumerate(data.kinds) if kk == k]
        metrics["by_kind"][k] = {"queries": len(rows), **cir_recall(
            scores[rows], [data.target[i] for i in rows], [data.reference[i] for i in rows], ks)}
    g = len(data.gallery)
    metrics["chance"] = {f"R@{k}": min(k, g - 1) / (g - 1) for k in ks}
    return {"task": "cir", "query": query, "template": template or (DEFAULT_TEMPLATE if query == "phi" else None),
            "num_queries": len(data), "num_images": g, "metrics": metrics,
            "timing": {"image_s": round(t1 - t0, 3), "query_s": round(t2 - t1, 3)}}


@register_task(CIR_DATA_KIND, CIR_DATA_KIND)
def cir_task(data: CIRData, encoder, query: str = "phi", phi=None, text_model=None,
             template: str | None = None) -> dict[str, Any]:
    """Composed image retrieval: reference image + modification text -> target image, R@1/5/10 (query: phi,
    image, text or sum)."""
    return evaluate_cir(encoder.model, data, query=query, phi=phi, text_model=text_model, template=template,
                        encoder=encoder)


def _register_dataset() -> None:
    from ..eval.datasets import DATASETS, register_dataset

    if "synthetic-cir" not in DATASETS:  # a re-imported module must not register twice
        register_dataset("synthetic-cir", CIR_DATA_KIND)(synthetic_cir)


_register_dataset()
