"""CenterCLIP: k-medoids token clustering inside the ViT (multi-segment clustering of frames' patch tokens).

Paper: S. Zhao, L. Zhu, X. Wang, Y. Yang, "CenterCLIP: Token Clustering for Efficient Text-Video Retrieval"
(SIGIR 2022; official code mzhaoshuai/CenterCLIP: ``modules/cluster/fast_kmeans.py``, ``cluster_utils.py``,
``spectral.py``, ``cluster.py``). Training-free here (the paper fine-tunes end to end; the clustering has no
parameters).

What it does, as the paper and its code: before block ``L`` (the code's ``target_frames_blocks``; ``12 x 6`` then
``6 x 6`` for ViT-B/32 reduces before the 7th of 12 blocks, i.e. ``layer=6``), on the *residual stream* (before the
block's ``ln_1``, no projection), the ``T`` frames of a video are split into ``segments`` groups of ``T / segments``
consecutive frames. Each group's patch tokens (``s * N``) are clustered into ``K`` clusters and only the ``K``
**medoids** are kept (the tokens themselves, not cluster means: the code's default ``aggregation=None``; the mean is
the option ``aggregation="mean"``); the group's CLS is the mean of its frames' CLS tokens. The remaining blocks run on
``1 + K`` tokens per segment; the video embedding is CLIP4Clip's mean pooling over the segment embeddings.

* **k-medoids** (:func:`kmedoids`): distance Euclidean (Minkowski ``p=2``, the paper's) or cosine; every point is its
  own nearest (the code lowers the diagonal by 1), so clusters are never empty and medoids stay distinct. KKZ
  initialisation (:func:`kkz_init`): first medoid the token of largest L2 norm, each next one the token farthest from
  its nearest chosen medoid. Iterate: assign each token to its nearest medoid; each cluster's new medoid is the member
  with the least summed distance to the members (ties: lowest index, as ``argmin``). Medoid indices are sorted
  ascending (``id_sort``), so the kept tokens keep their spatial / temporal order, and tokens are re-assigned to the
  sorted medoids.
* **Spectral** (``algorithm="spectral"``, :func:`spectral_embedding`): heat-kernel graph
  ``exp(-|x_i - x_j|^2 / 2 sigma^2)`` (``sigma=2``) or its symmetric k-nearest-neighbour sparsification
  (``graph="knn"``), ``L_sym = I - D^-1/2 W D^-1/2``, the eigenvectors of its ``K`` smallest eigenvalues, rows
  L2-normalised, then the same k-medoids on those rows; the kept tokens are the original tokens at the medoid rows.

Images: an image is a one-frame video (``T = 1``, one segment): the clustering runs over its ``N`` patch tokens, which
is :class:`CenterCLIP` as an ordinary :class:`~cliplab.vision_tokens.TokenReducer` in
:func:`~cliplab.vision_tokens.encode_image_reduced`. ``ratio=`` (share of patch tokens removed, as ToMe's) is offered
besides the paper's explicit ``k`` per segment.

Choices that differ from the paper / official code, and why:

* Stopping: the code stops when the summed medoid shift is below ``1e-6`` or after ``iters`` (80-100) steps; here the
  loop stops when no medoid changed in the whole batch (then the iteration is at a fixed point, the same result) or
  after ``iters`` steps, default 30 rather than 80 (k-medoids on 64-196 tokens converges in well under 30 steps on
  the shipped model; the cap bounds the cost at ViT-B-16 sizes). The final assignment is always recomputed for the
  final medoids, so the index map matches the kept tokens.
* The medoid update sums each member's distances with a ``[B, N, N]`` same-cluster mask, not the code's
  ``[B, K, N, N]`` repeat (memory); the result is the same argmin.
* Spectral: ``torch.linalg.eigh`` on the symmetric ``L_sym`` (ascending eigenvalues) instead of an SVD (the same
  vectors for a PSD matrix); the SVD sign correction is left out because flipping an eigenvector's sign changes no
  distance between rows, so no medoid.
* Videos whose segments hold more than one frame need a class token (its frames' CLS tokens are averaged); such
  segments run through :func:`encode_segments`, the tower's own blocks, and support reducers that need no attention
  or keys. One frame per segment goes through :func:`~cliplab.vision_tokens.encode_image_reduced` (every tower).
* The stem max-skip side path (``shapes-tiny``) takes its max over every patch a kept token stands for; a medoid
  stands for its whole cluster, so no patch leaves the max (dropping reducers remove their dropped patches from it).
* Not done: the learnable cluster / frame embeddings (``cluster_embedding``, off in the paper's main results), the
  spatio-temporal graph mask of spectral clustering, and training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..methods import register_method
from .forward import encode_image_reduced
from .reducer import IndexMap, TokenReducer, check_assignment, count_to_remove, keep_assignment, merge_tokens
from .registry import register_reducer

register_method(
    "centerclip",
    "CenterCLIP: Token Clustering for Efficient Text-Video Retrieval",
    "before a chosen ViT block, each segment of consecutive frames (or one image) keeps only the K medoid tokens of "
    "a KKZ-initialised k-medoids (or spectral) clustering of its patch tokens; CLS is the segments' mean",
    doc="docs/methods/centerclip.md",
)(__name__)

__all__ = ["CenterCLIP", "SparseSampling", "SegmentOutput", "pairwise_distances", "kkz_init", "kmedoids",
           "spectral_embedding", "clustering_flops", "encode_segments", "encode_video_centerclip"]

DISTANCES = ("euclidean", "cosine")


def pairwise_distances(x: torch.Tensor, distance: str = "euclidean", p: float = 2.0) -> torch.Tensor:
    """``[B, N, W]`` -> ``[B, N, N]`` float32 distances with an exact zero diagonal: Minkowski-``p`` (``p = 2``
    through one ``x @ x^T``) or cosine distance ``1 - cos``."""
    if distance not in DISTANCES:
        raise ValueError(f"unknown distance {distance!r}; choose 'euclidean' or 'cosine'")
    x = x.float()
    if distance == "cosine":
        unit = x / (x.norm(dim=-1, keepdim=True) + 1e-6)  # the official code's epsilon
        d = 1.0 - unit @ unit.transpose(1, 2)
    elif p == 2.0:
        sq = x.pow(2).sum(-1)
        d = (sq[:, :, None] + sq[:, None, :] - 2.0 * (x @ x.transpose(1, 2))).clamp_min(0.0).sqrt()
    else:
        d = torch.cdist(x, x, p=p)
    d = d.clone()
    d.diagonal(dim1=1, dim2=2).zero_()
    return d


def _self_nearest(d: torch.Tensor) -> torch.Tensor:
    """The distances with the diagonal at -1: a point is its own nearest even among exact duplicates (the code's
    ``self_nearest``)."""
    own = d.clone()
    own.diagonal(dim1=1, dim2=2).fill_(-1.0)
    return own


def kkz_init(x: torch.Tensor, d: torch.Tensor, k: int) -> torch.Tensor:
    """KKZ initial medoids ``[B, k]`` (in pick order): the token of largest L2 norm, then repeatedly the token whose
    distance to its nearest chosen medoid is largest (``d``: distances ``[B, N, N]``; ties: lowest index)."""
    b, n = d.shape[:2]
    if not 1 <= k <= n:
        raise ValueError(f"k-medoids needs 1 <= k <= {n} (the tokens it sees), got k={k}")
    own = _self_nearest(d)
    pick = x.float().norm(dim=-1).argmax(1)
    picks = [pick]
    nearest = _rows(own, pick[:, None])[:, 0]  # [B, N]: distance to the nearest chosen medoid (-1 once chosen)
    for _ in range(1, k):  # sequential by definition; K small steps of O(B N) each
        pick = nearest.argmax(1)
        picks.append(pick)
        nearest = torch.minimum(nearest, _rows(own, pick[:, None])[:, 0])
    return torch.stack(picks, 1)


def _rows(d: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``d[b, index[b, j], :]`` ``[B, K, N]`` (a gather: much faster than advanced indexing on CPU)."""
    return d.gather(1, index.unsqueeze(-1).expand(-1, -1, d.shape[-1]))


def _assign(own: torch.Tensor, medoids: torch.Tensor) -> torch.Tensor:
    """Each token's nearest medoid ``[B, N]`` (a cluster index into ``medoids``)."""
    return _rows(own, medoids).argmin(1)  # [B, K, N] -> [B, N]


def _update_medoids(d: torch.Tensor, assign: torch.Tensor, k: int) -> torch.Tensor:
    """Each cluster's member with the least summed distance to its cluster's members ``[B, k]``."""
    same = assign[:, :, None] == assign[:, None, :]
    cost = torch.where(same, d, 0.0).sum(-1)  # [B, N]
    member = assign[:, None, :] == torch.arange(k, device=d.device)[None, :, None]  # [B, k, N]
    return torch.where(member, cost[:, None, :], float("inf")).argmin(-1)


def kmedoids(x: torch.Tensor, k: int, *, distance: str = "euclidean", p: float = 2.0, iters: int = 30,
             sort: bool = True, return_steps: bool = False):
    """Batched k-medoids with KKZ initialisation on ``x`` ``[B, N, W]`` -> ``(assign [B, N], medoids [B, k])``:
    ``assign[b, i]`` is the cluster of token ``i``, cluster ``j``'s medoid is token ``medoids[b, j]`` (ascending with
    ``sort``). Stops at a fixed point or after ``iters`` update steps (``return_steps`` adds the count)."""
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    d = pairwise_distances(x, distance, p)
    own = _self_nearest(d)
    medoids = kkz_init(x, d, k)
    steps = 0
    for steps in range(1, iters + 1):
        new = _update_medoids(d, _assign(own, medoids), k)
        if torch.equal(new, medoids):
            break
        medoids = new
    if sort:
        medoids = medoids.sort(1).values
    assign = _assign(own, medoids)
    return (assign, medoids, steps) if return_steps else (assign, medoids)


def spectral_embedding(x: torch.Tensor, k: int, *, sigma: float = 2.0, graph: str = "heat",
                       knn: int = 10) -> torch.Tensor:
    """Rows ``[B, N, k]`` of the normalised-Laplacian eigenvectors of the ``k`` smallest eigenvalues, L2-normalised:
    the spectral-clustering embedding of the tokens (heat kernel ``exp(-d^2 / 2 sigma^2)``, or its symmetric
    ``knn``-nearest-neighbour sparsification with ``graph="knn"``)."""
    if graph not in ("heat", "knn"):
        raise ValueError(f"unknown spectral graph {graph!r}; choose 'heat' or 'knn'")
    n = x.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"spectral clustering needs 1 <= k <= {n}, got k={k}")
    w = torch.exp(-pairwise_distances(x).pow(2) / (2.0 * sigma**2))
    if graph == "knn":
        kth = w.topk(min(knn, n), dim=-1).values[..., -1:]
        near = w >= kth
        w = w * (near | near.transpose(1, 2))
    inv = w.sum(-1).clamp_min(1e-12).rsqrt()
    lsym = torch.eye(n, device=x.device) - inv[:, :, None] * w * inv[:, None, :]
    _, vectors = torch.linalg.eigh(lsym)  # ascending eigenvalues
    q = vectors[..., :k]
    return q / (q.norm(dim=-1, keepdim=True) + 1e-6)


def clustering_flops(n: int, width: int, k: int, algorithm: str = "kmedoids") -> int:
    """Matmul FLOPs of one clustering of ``n`` tokens of width ``width`` into ``k`` with the Euclidean (``p = 2``) or
    cosine distance: the Gram matrix ``x @ x^T``; spectral adds the k-medoids Gram matrix of its ``k``-wide
    embedding. The iterations (masks, sums, argmins), KKZ and the eigendecomposition are not matmuls and are not
    counted (they are ``O(N^2)`` per step, and ``O(N^3)`` for the eigendecomposition)."""
    return 2 * n * n * width + (2 * n * n * k if algorithm == "spectral" else 0)


class CenterCLIP(TokenReducer):
    """Keep ``k`` medoid tokens (or remove ``ratio`` of the tokens) per reduction, chosen by k-medoids with KKZ
    initialisation (``algorithm="kmedoids"``) or spectral clustering (``"spectral"``); every token is assigned to its
    cluster, so the index map knows which patches each medoid stands for.

    ``distance``: ``"euclidean"`` (Minkowski ``p``) or ``"cosine"``; ``iters``: update steps at most; ``sort``: keep
    medoids in ascending token order; ``aggregation``: ``"medoid"`` (the paper) or ``"mean"`` (the code's option: each
    cluster's size-weighted mean); ``pre_norm``: L2-normalise the tokens before clustering (the code's option);
    ``sigma`` / ``graph`` / ``knn``: the spectral graph."""

    def __init__(self, k: int | None = None, *, ratio: float | None = None, algorithm: str = "kmedoids",
                 distance: str = "euclidean", p: float = 2.0, iters: int = 30, sort: bool = True,
                 aggregation: str = "medoid", pre_norm: bool = False, sigma: float = 2.0, graph: str = "heat",
                 knn: int = 10):
        if (k is None) == (ratio is None):
            raise ValueError("CenterCLIP takes either k (tokens kept per reduction) or ratio (share removed)")
        if k is not None and k < 1:
            raise ValueError(f"CenterCLIP's k must be >= 1, got {k}")
        if ratio is not None:
            count_to_remove(ratio, 1)  # validates
        if algorithm not in ("kmedoids", "spectral"):
            raise ValueError(f"unknown CenterCLIP algorithm {algorithm!r}; choose 'kmedoids' or 'spectral'")
        if distance not in DISTANCES:
            raise ValueError(f"unknown distance {distance!r}; choose 'euclidean' or 'cosine'")
        if aggregation not in ("medoid", "mean"):
            raise ValueError(f"unknown aggregation {aggregation!r}; choose 'medoid' or 'mean'")
        if graph not in ("heat", "knn"):
            raise ValueError(f"unknown spectral graph {graph!r}; choose 'heat' or 'knn'")
        self.k, self.ratio, self.algorithm, self.distance, self.p = k, ratio, algorithm, distance, p
        self.iters, self.sort, self.aggregation, self.pre_norm = iters, sort, aggregation, pre_norm
        self.sigma, self.graph, self.knn = sigma, graph, knn

    def count(self, n: int) -> int:
        """Tokens kept out of ``n``."""
        k = self.k if self.k is not None else n - count_to_remove(self.ratio, n)
        if k > n:
            raise ValueError(f"CenterCLIP(k={k}) cannot keep more tokens than the {n} it sees; lower k")
        return max(k, 1)

    def cluster(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(assign [B, N], medoids [B, K])`` for ``tokens`` ``[B, N, W]``."""
        k = self.count(tokens.shape[1])
        x = tokens.float()
        if self.pre_norm:
            x = x / (x.norm(dim=-1, keepdim=True) + 1e-6)
        if self.algorithm == "spectral":
            x = spectral_embedding(x, k, sigma=self.sigma, graph=self.graph, knn=self.knn)
        return kmedoids(x, k, distance=self.distance, p=self.p, iters=self.iters, sort=self.sort)

    def reduce(self, tokens, attention, keys, text, *, sizes):
        assign, medoids = self.cluster(tokens)
        k = medoids.shape[1]
        if self.aggregation == "mean":
            return merge_tokens(tokens, sizes, assign, k), assign
        kept = tokens.gather(1, medoids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))  # a copy: the same bits
        return kept, assign


class SparseSampling(TokenReducer):
    """The paper's ``sparse_sampling`` baseline (eval mode): keep ``k`` tokens (or remove ``ratio``) at evenly spaced
    positions ``int(t / 2 + t * j)``, ``t = n / k``, and drop the rest."""

    def __init__(self, k: int | None = None, *, ratio: float | None = None):
        if (k is None) == (ratio is None):
            raise ValueError("SparseSampling takes either k (tokens kept) or ratio (share removed)")
        if ratio is not None:
            count_to_remove(ratio, 1)
        self.k, self.ratio = k, ratio

    def reduce(self, tokens, attention, keys, text, *, sizes):
        b, n, w = tokens.shape
        k = min(self.k, n) if self.k is not None else n - count_to_remove(self.ratio, n)
        tick = n / k
        keep = torch.tensor([int(tick / 2.0 + tick * j) for j in range(k)], device=tokens.device)
        keep = keep.expand(b, -1)
        return tokens.gather(1, keep.unsqueeze(-1).expand(-1, -1, w)), keep_assignment(keep, n)


@dataclass
class SegmentOutput:
    """What :func:`encode_segments` returns.

    * ``pooled`` ``[B, S, D]``: one embedding per segment (``S = segments``);
    * ``index_map``: an :class:`~cliplab.vision_tokens.IndexMap` with one row per segment (``B * S`` rows, video-major)
      over the segment's ``s * N`` patches, frame-major (patch ``i`` of the segment's frame ``f`` is column
      ``f * N + i``);
    * ``tokens_per_layer``: tokens (prefix included) in each sequence entering each block;
    * ``sequences_per_layer``: sequences per video in each block (``T`` before the reduction, ``S`` after).
    """

    pooled: torch.Tensor
    index_map: IndexMap
    tokens_per_layer: list[int]
    sequences_per_layer: list[int]


def _as_video(frames: torch.Tensor) -> torch.Tensor:
    if frames.ndim == 4:
        return frames[:, None]
    if frames.ndim != 5:
        raise ValueError(f"frames must be [B, T, 3, H, W] (a video batch) or [B, 3, H, W] (images), got "
                         f"{tuple(frames.shape)}")
    return frames


def encode_segments(model, frames: torch.Tensor, reducer: TokenReducer, layer: int, segments: int | None = None
                    ) -> SegmentOutput:
    """Encode a video batch ``[B, T, 3, H, W]`` (or images ``[B, 3, H, W]``, ``T = 1``) with ``reducer`` applied
    before block ``layer`` to each segment of ``T / segments`` consecutive frames (``segments=None``: ``T``, one frame
    per segment). Blocks before ``layer`` run on each frame alone; the segment's patch tokens are handed to the
    reducer together and its CLS is the mean of its frames' CLS tokens."""
    frames = _as_video(frames)
    b, t = frames.shape[:2]
    segments = t if segments is None else int(segments)
    if segments < 1 or t % segments:
        raise ValueError(f"segments must divide the {t} frames (e.g. {t} or 1), got {segments}")
    per = t // segments
    flat = frames.flatten(0, 1)
    depth = model.config.vision.layers
    if per == 1:  # one frame per segment: the image path, every tower and reducer
        out = encode_image_reduced(model, flat, reducer, layer)
        counts = out.extras["tokens_per_layer"]
        return SegmentOutput(out.pooled.view(b, t, -1), out.extras["index_map"], counts, [t] * len(counts))
    visual = model.visual
    if model.config.vision.is_resnet or visual.n_prefix != 1:
        raise ValueError("segments of several frames need a ViT image tower with a class token (its frames' CLS "
                         "tokens are averaged); use segments=T for other towers")
    if not isinstance(layer, int) or not 0 <= layer <= depth:
        raise ValueError(f"layer must be one int in [0, {depth}] for multi-frame segments, got {layer!r}")
    if reducer.needs:
        raise ValueError(f"multi-frame segments support reducers that need no {sorted(reducer.needs)}")
    blocks = visual.transformer.blocks
    x, skip = visual._embed(flat)
    x = visual.ln_pre(x + visual.pos_embed.to(x.dtype))
    for block in blocks[:layer]:
        x = block(x)
    n, w = x.shape[1] - 1, x.shape[2]
    x = x.view(b * segments, per, 1 + n, w)
    cls = x[:, :, :1].mean(1)  # the code's class-token fusion: the mean over the segment's frames
    patches = x[:, :, 1:].reshape(b * segments, per * n, w)
    reduced, step = reducer(patches)
    m = reduced.shape[1]
    if reduced.shape[0] != patches.shape[0] or reduced.shape[2] != w:
        raise ValueError(f"a reducer must return tokens [B, M', {w}], got {tuple(reduced.shape)}")
    check_assignment(step, patches, m)
    x = torch.cat([cls, reduced], dim=1)
    for block in blocks[layer:]:
        x = block(x)
    pooled = visual.pool(x)
    if skip is not None:  # the max-skip side path over every patch still represented in the segment
        skip = skip.reshape(b * segments, per * n, -1)
        dropped = step < 0
        pooled = pooled + visual.stem_skip((skip.masked_fill(dropped.unsqueeze(-1), float("-inf"))
                                            if bool(dropped.any()) else skip).amax(1))
    index_map = IndexMap.identity(b * segments, per * n, device=x.device).then(step, m)
    counts = [1 + n] * layer + [1 + m] * (depth - layer)
    return SegmentOutput(pooled.view(b, segments, -1), index_map, counts, [t] * layer + [segments] * (depth - layer))


def encode_video_centerclip(model, frames: torch.Tensor, *, segments: int | None = None, k: int | None = None,
                            ratio: float | None = None, layer: int | None = None, algorithm: str = "kmedoids",
                            distance: str = "euclidean", p: float = 2.0, iters: int = 30, sort: bool = True,
                            aggregation: str = "medoid", pre_norm: bool = False, sigma: float = 2.0,
                            graph: str = "heat", knn: int = 10, normalize: bool = False) -> torch.Tensor:
    """The CenterCLIP embedding ``[B, D]`` of a video batch ``[B, T, 3, H, W]`` (or of images ``[B, 3, H, W]``).

    Before block ``layer`` (default: half the depth, the paper's block 7 of 12), each of ``segments`` groups of
    consecutive frames (default ``T``: one frame each) keeps ``k`` medoid tokens (default: the patches of one frame,
    the paper's ``cluster_num`` = 49 for 49-patch frames) or removes ``ratio`` of its ``s * N`` patch tokens. One
    segment: its embedding; several: CLIP4Clip's mean pooling (the mean of the L2-normalised segment embeddings).
    ``normalize``: L2-normalise the result. The other keywords are :class:`CenterCLIP`'s."""
    frames = _as_video(frames)
    depth = model.config.vision.layers
    layer = depth // 2 if layer is None else layer
    if k is None and ratio is None:
        k = model.config.vision.grid_size**2
    reducer = CenterCLIP(k, ratio=ratio, algorithm=algorithm, distance=distance, p=p, iters=iters, sort=sort,
                         aggregation=aggregation, pre_norm=pre_norm, sigma=sigma, graph=graph, knn=knn)
    out = encode_segments(model, frames, reducer, layer, segments)
    pooled = out.pooled
    video = pooled[:, 0] if pooled.shape[1] == 1 else F.normalize(pooled, dim=-1).mean(1)
    return F.normalize(video, dim=-1) if normalize else video


@register_reducer("centerclip", default_layer=lambda depth: depth // 2,
                  summary="k-medoids (KKZ) clustering of the patch tokens; the medoids go on (paper: half depth)")
def _centerclip_reducer(keep: float, model) -> TokenReducer:
    return CenterCLIP(ratio=1.0 - keep)
