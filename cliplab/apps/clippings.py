"""CLIPPINGS: multimodal record linkage with a pooled image + OCR-text CLIP embedding.

Paper: Arora, Dell et al., "Linking Representations with Multimodal Contrastive Learning" (CLIPPINGS; official code
dell-research-harvard/clippings). A record is an image and the OCR text found on it. Both CLIP towers embed it, the
two embeddings are pooled into ``e = normalize(w * img + (1 - w) * txt)``, the model is fine-tuned with a supervised
contrastive (SupCon) loss on ``e`` over batches drawn m-per-class with each anchor's nearest other-entity neighbours
put in the same batch (hard negatives), and records are linked by clustering ``e``: DBSCAN with ``min_samples=1``
(= single linkage cut at the same distance) on cosine distance, the threshold tuned for ARI on a validation split.

Where it acts: the joint space, after each tower's final LayerNorm and projection (``encode_image``/``encode_text``).

Differences from the paper / official code, and why:
- each tower's embedding is L2-normalised before pooling, so ``w`` is the share of each modality whatever the
  norms (not checked against the official code, which may pool unnormalised features);
- the measured runs freeze the image tower (``freeze_image=True``) to fit a CPU budget; the default trains both;
- no separate image-text CLIP pre-training stage on unlabelled pairs (the shipped model is already contrastively
  trained; the synthetic records have no unlabelled pool);
- hard negatives come from an exact k-NN on the current pooled embeddings (brute force instead of a FAISS index;
  same neighbours), refreshed at the start of every epoch;
- Adam with a small learning rate and a few hundred steps on a tiny model (the paper fine-tunes ViT-B/32 for
  epochs); only the clustering inference (option 2) is exposed, not the kNN-to-exemplar index (option 1).
"""

from __future__ import annotations

import copy
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..methods import register_method
from ..text.edit_distance import levenshtein as edit_distance  # re-exported: the string baseline's distance

register_method(
    "clippings",
    "Linking Representations with Multimodal Contrastive Learning (CLIPPINGS)",
    "record linkage on a pooled image + OCR-text CLIP embedding, fine-tuned with SupCon over m-per-class batches "
    "with kNN hard negatives, then clustered by DBSCAN(min_samples=1) = single linkage at a tuned threshold",
    doc="docs/methods/clippings.md",
)(__name__)

__all__ = ["pooled_embeddings", "supcon_loss", "hard_negative_classes", "m_per_class_batches", "train_linker",
           "cosine_distances", "cluster", "tune_threshold", "link_records", "string_match_clusters",
           "edit_distance", "string_match_distances", "adjusted_rand_index"]


def pooled_embeddings(model, images: Sequence, texts: Sequence[str], image_weight: float = 0.5,
                      batch_size: int = 64, grad: bool = False) -> torch.Tensor:
    """``normalize(w * normalize(img) + (1 - w) * normalize(txt))`` for each record, ``[n, d]``.

    ``images`` are PIL images, an already preprocessed pixel tensor ``[n, 3, H, W]``, or image embeddings
    ``[n, d]`` computed before (a frozen image tower)."""
    if not 0.0 <= image_weight <= 1.0:
        raise ValueError(f"image_weight must be in [0, 1], got {image_weight}")
    if len(images) != len(texts):
        raise ValueError(f"need one text per image, got {len(images)} images and {len(texts)} texts")
    ctx = torch.enable_grad() if grad else torch.no_grad()
    device = next(model.parameters()).device
    out = []
    with ctx:
        for s in range(0, len(texts), batch_size):
            chunk = images[s:s + batch_size]
            pixels = chunk if torch.is_tensor(chunk) else torch.stack([model.preprocess(im) for im in chunk])
            parts = []
            if image_weight > 0:  # a weight of 0 never runs the tower (image-only / text-only arms)
                img = F.normalize(pixels, dim=-1) if pixels.ndim == 2 else model.encode_image(pixels.to(device),
                                                                                              normalize=True)
                parts.append(image_weight * img.to(device))
            if image_weight < 1:
                tokens = model.tokenize(list(texts[s:s + batch_size]))
                parts.append((1.0 - image_weight) * model.encode_text(tokens, normalize=True))
            out.append(F.normalize(sum(parts), dim=-1))
    return torch.cat(out)


def supcon_loss(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al.) on L2-normalised ``embeddings``: for each anchor, the mean over
    its positives p of ``-log(exp(s_ap / t) / sum_{j != a} exp(s_aj / t))``; anchors without positives are left out."""
    n = embeddings.shape[0]
    sim = embeddings @ embeddings.T / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=embeddings.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~self_mask
    n_pos = pos.sum(1)
    has = n_pos > 0
    if not has.any():
        raise ValueError("supcon_loss needs at least two records of one entity in the batch")
    per_anchor = -(log_prob.masked_fill(~pos, 0.0).sum(1)[has] / n_pos[has])
    return per_anchor.mean()


def hard_negative_classes(embeddings: torch.Tensor | np.ndarray, labels: Sequence[int], k: int = 3) -> dict:
    """For each class, the classes of the ``k`` nearest other-class records of each of its records (cosine), nearest
    first, without repeats: the entities a batch should hold next to it."""
    e = F.normalize(torch.as_tensor(np.asarray(embeddings), dtype=torch.float32), dim=-1)
    lab = np.asarray(labels)
    sim = (e @ e.T).numpy()
    sim[lab[:, None] == lab[None, :]] = -np.inf  # same entity (and self) are not negatives
    out: dict[int, list[int]] = {}
    for i in range(len(lab)):
        nearest = np.argsort(-sim[i], kind="stable")[:k]
        bucket = out.setdefault(int(lab[i]), [])
        for j in nearest:
            if np.isfinite(sim[i, j]) and int(lab[j]) not in bucket:
                bucket.append(int(lab[j]))
    return out


def m_per_class_batches(labels: Sequence[int], m: int, batch_size: int, rng: np.random.Generator,
                        hard_negatives: dict | None = None) -> list[np.ndarray]:
    """One epoch of batches: every class once (no replacement), ``m`` of its records (all if fewer), classes in
    random order; with ``hard_negatives`` each class drawn pulls its not-yet-used hard-negative classes into the same
    batch. ``batch_size // m`` classes per batch."""
    if m < 2:
        raise ValueError(f"m must be >= 2 so that every anchor has a positive, got {m}")
    per_batch = batch_size // m
    if per_batch < 2:
        raise ValueError(f"batch_size must hold at least two classes of m={m} records, got {batch_size}")
    lab = np.asarray(labels)
    by_class = {int(c): np.flatnonzero(lab == c) for c in np.unique(lab)}
    order = [int(c) for c in rng.permutation(list(by_class))]
    used: set[int] = set()
    batches, current = [], []
    for c in order:
        queue = [c] + list((hard_negatives or {}).get(c, []))
        for q in queue:
            if q in used or len(current) >= per_batch:
                continue
            used.add(q)
            current.append(q)
        if len(current) >= per_batch:
            batches.append(current)
            current = []
    if len(current) >= 2:
        batches.append(current)
    return [np.concatenate([rng.permutation(by_class[c])[:m] for c in b]) for b in batches]


def train_linker(model, images: Sequence, texts: Sequence[str], labels: Sequence[int], image_weight: float = 0.5,
                 epochs: int = 5, batch_size: int = 24, m: int = 3, k_hard: int = 3, lr: float = 1e-4,
                 temperature: float = 0.1, seed: int = 0, hard_negatives: bool = True, freeze_image: bool = False):
    """A fine-tuned copy of ``model``: SupCon on the pooled embedding over m-per-class batches with kNN hard
    negatives refreshed at each epoch. ``freeze_image`` keeps the image tower fixed and embeds the images once
    (the text tower alone learns; a CPU budget choice). Returns ``(model, history)``, the mean loss of each epoch."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = copy.deepcopy(model).train()
    pixels = torch.stack([model.preprocess(im) for im in images])
    if freeze_image and image_weight == 1.0:
        raise ValueError("nothing to train: image_weight=1 uses only the image tower, which freeze_image fixes")
    if freeze_image:
        model.visual.requires_grad_(False)
        with torch.no_grad():
            pixels = model.eval().encode_image(pixels, normalize=True)  # [n, d]: pooled_embeddings reads these
        model.train()
    labels_t = torch.as_tensor(np.asarray(labels))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    history = []
    for _ in range(epochs):
        negs = None
        if hard_negatives and k_hard > 0:
            model.eval()
            negs = hard_negative_classes(pooled_embeddings(model, pixels, texts, image_weight), labels_t, k_hard)
            model.train()
        losses = []
        for idx in m_per_class_batches(labels_t.numpy(), m, batch_size, rng, negs):
            e = pooled_embeddings(model, pixels[idx], [texts[i] for i in idx], image_weight, grad=True)
            loss = supcon_loss(e, labels_t[idx], temperature)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        history.append(float(np.mean(losses)))
    return model.eval(), history


def cosine_distances(embeddings) -> np.ndarray:
    """``1 - cos`` between rows, symmetric with an exact zero diagonal."""
    e = F.normalize(torch.as_tensor(np.asarray(embeddings), dtype=torch.float64), dim=-1).numpy()
    d = np.clip(1.0 - e @ e.T, 0.0, 2.0)
    d = (d + d.T) / 2
    np.fill_diagonal(d, 0.0)
    return d


def cluster(embeddings=None, threshold: float = 0.1, method: str = "dbscan", distances=None) -> np.ndarray:
    """Cluster ids (0..k-1, in order of first appearance) linking records closer than ``threshold``.

    ``method="dbscan"``: DBSCAN(eps=threshold, min_samples=1) as in CLIPPINGS; ``"single"``: single linkage cut at
    ``threshold``. Both read the same distance matrix (cosine of ``embeddings``, or ``distances`` as given)."""
    if (embeddings is None) == (distances is None):
        raise ValueError("give exactly one of embeddings or distances")
    if threshold < 0:
        raise ValueError(f"threshold is a distance, so >= 0; got {threshold}")
    d = cosine_distances(embeddings) if distances is None else np.asarray(distances, dtype=np.float64)
    if len(d) == 1:
        return np.zeros(1, dtype=int)
    if method == "dbscan":
        from sklearn.cluster import DBSCAN

        eps = max(threshold, np.nextafter(0.0, 1.0))  # sklearn wants eps > 0; d <= 0 and d <= 5e-324 agree
        raw = DBSCAN(eps=eps, min_samples=1, metric="precomputed").fit_predict(d)
    elif method == "single":
        from scipy.cluster.hierarchy import fcluster, linkage
        from scipy.spatial.distance import squareform

        raw = fcluster(linkage(squareform(d, checks=False), method="single"), t=threshold, criterion="distance")
    else:
        raise ValueError(f"method must be 'dbscan' or 'single', got {method!r}")
    _, first = np.unique(raw, return_index=True)
    rank = {raw[i]: r for r, i in enumerate(sorted(first))}
    return np.array([rank[x] for x in raw])


def adjusted_rand_index(truth, predicted) -> float:
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(truth, predicted))


def tune_threshold(labels, embeddings=None, thresholds=None, method: str = "dbscan", distances=None):
    """``(threshold, ari)``: the threshold of ``thresholds`` (default 60 steps over the observed distances) with the
    best ARI against ``labels``; ties go to the smallest."""
    d = cosine_distances(embeddings) if distances is None else np.asarray(distances, dtype=np.float64)
    if thresholds is None:
        hi = float(np.max(d)) if d.size else 1.0
        thresholds = np.linspace(0.0, hi, 61)[1:]
    best = (None, -np.inf)
    for t in thresholds:
        ari = adjusted_rand_index(labels, cluster(distances=d, threshold=float(t), method=method))
        if ari > best[1]:
            best = (float(t), ari)
    return best


def link_records(model, images: Sequence, texts: Sequence[str], threshold: float = 0.1, image_weight: float = 0.5,
                 method: str = "dbscan", batch_size: int = 64) -> np.ndarray:
    """Cluster ids for records (image, OCR text): pooled embedding, then :func:`cluster`."""
    e = pooled_embeddings(model, images, texts, image_weight=image_weight, batch_size=batch_size)
    return cluster(e.numpy(), threshold=threshold, method=method)


def string_match_distances(texts: Sequence[str]) -> np.ndarray:
    """Edit distance divided by the longer length (0 = same string, 1 = nothing shared), lower-cased."""
    t = [s.lower() for s in texts]
    n = len(t)
    d = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            d[i, j] = d[j, i] = edit_distance(t[i], t[j]) / max(len(t[i]), len(t[j]), 1)
    return d


def string_match_clusters(texts: Sequence[str], threshold: float = 0.3, method: str = "dbscan") -> np.ndarray:
    """The string-matching baseline: normalised edit distance between texts, clustered like the embeddings."""
    return cluster(distances=string_match_distances(texts), threshold=threshold, method=method)
