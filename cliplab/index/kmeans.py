"""Training an IVF index's coarse quantiser: faiss's own k-means, or k-means in two levels for many lists.

One k-means over ``nlist`` centroids costs ``sample x nlist x dim`` per iteration, and the sample grows with
``nlist`` (:func:`cliplab.index.sizing.train_points`), so the cost grows with ``nlist`` squared: at 10M vectors
(12,649 lists, 809,536 training points) about 1e14 flops for faiss's 10 iterations, an hour on two cores. Two levels
(faiss's ``two_level_clustering`` idea, written here for the inner-product indexes cliplab builds) first cluster the
sample into ``sqrt(nlist)`` groups, then split each group into its share of the ``nlist`` centroids, in proportion
to its size. Each point then meets about ``2 sqrt(nlist)`` centroids per iteration instead of ``nlist``: about 56x
fewer flops at 10M. The price is centroids that never compete across groups (measured in docs/search.md).

The centroids are put into the IVF's quantiser (a flat one or an HNSW graph) before ``index.train``, which then
finds the quantiser trained and trains only the codes (PQ on the residuals). An OPQ rotation in front is trained
first and the centroids are computed in the rotated space, as the IVF sees it.
"""

from __future__ import annotations

import numpy as np

from .faiss_ops import load_faiss

__all__ = ["two_level_groups", "two_level_centroids", "train_ivf"]


def _kmeans(x: np.ndarray, k: int, *, niter: int, seed: int, spherical: bool, max_points_per_centroid: int):
    faiss = load_faiss()
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=spherical,
                      max_points_per_centroid=max_points_per_centroid)
    km.train(np.ascontiguousarray(x, np.float32))
    return km


def two_level_groups(nlist: int) -> int:
    """How many first-level groups the two-level k-means of ``nlist`` centroids makes: ``round(sqrt(nlist))``."""
    return max(1, min(int(round(nlist ** 0.5)), nlist))


def two_level_centroids(x: np.ndarray, nlist: int, *, seed: int = 0, niter: int = 10,
                        spherical: bool = True) -> np.ndarray:
    """``nlist`` centroids of ``x`` by k-means in two levels: ``round(sqrt(nlist))`` groups, then each group split
    into its share of ``nlist`` (proportional to the points it holds; never more centroids than points)."""
    n = len(x)
    if nlist > n:
        raise ValueError(f"{nlist} centroids need at least as many training points, got {n}")
    groups = two_level_groups(nlist)
    if groups == 1:
        return _kmeans(x, nlist, niter=niter, seed=seed, spherical=spherical, max_points_per_centroid=256).centroids
    # the first level sees a sample large enough for its few centroids (faiss caps it at 2000 per centroid)
    top = _kmeans(x, groups, niter=niter, seed=seed, spherical=spherical, max_points_per_centroid=2000)
    _, assign = top.assign(np.ascontiguousarray(x, np.float32))
    sizes = np.bincount(assign, minlength=groups)
    # shares proportional to group sizes that sum to exactly nlist (cumulative rounding), at most one per point
    bounds = np.cumsum(sizes) * nlist // n
    shares = np.minimum(np.diff(np.concatenate([[0], bounds])), sizes)
    short = nlist - int(shares.sum())  # only when a share was capped by its group's size: to the most spare points
    for g in np.argsort(-(sizes - shares), kind="stable")[:short]:
        shares[g] += 1
    if int(shares.sum()) != nlist:  # cannot happen with nlist <= n; kept as an invariant check
        raise RuntimeError(f"two-level k-means: shares sum to {shares.sum()}, not {nlist}")
    order = np.argsort(assign, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)])
    out = []
    for g in range(groups):
        k = int(shares[g])
        if k == 0:
            continue
        part = x[order[starts[g]:starts[g + 1]]]
        if k == len(part):  # as many centroids as points: the points themselves
            out.append(np.asarray(part, np.float32))
            continue
        out.append(_kmeans(part, k, niter=niter, seed=seed + 1 + g, spherical=spherical,
                           max_points_per_centroid=256).centroids)
    return np.ascontiguousarray(np.vstack(out), np.float32)


def train_ivf(index, sample: np.ndarray, *, two_level: bool, seed: int) -> None:
    """Train ``index`` (an IVF, possibly behind an OPQ rotation) on ``sample``: faiss's own k-means, or the coarse
    centroids by :func:`two_level_centroids` (with the IVF's iterations and sphericity) and then the codes."""
    if not two_level:
        index.train(sample)
        return
    faiss = load_faiss()
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):  # train the rotation, then cluster in the rotated space
        x = np.ascontiguousarray(sample, np.float32)
        for i in range(index.chain.size()):
            transform = index.chain.at(i)
            transform.train(x)
            x = transform.apply(x)
        train_ivf(index.index, x, two_level=True, seed=seed)
        index.is_trained = True
        return
    ivf = faiss.extract_index_ivf(index)
    centroids = two_level_centroids(sample, ivf.nlist, seed=seed, niter=ivf.cp.niter, spherical=ivf.cp.spherical)
    quantizer = faiss.downcast_index(ivf.quantizer)
    quantizer.reset()
    quantizer.add(centroids)
    quantizer.is_trained = True
    index.train(sample)  # the quantiser holds nlist centroids: faiss skips k-means and trains only the codes
