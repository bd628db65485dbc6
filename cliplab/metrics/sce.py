"""SCE: the Schur-complement decomposition of CLIP's joint text-image covariance and the Schur Complement Entropy.

Paper: *Dissecting CLIP: Decomposition with a Schur Complement-based Approach*, Azim Ospanov, Mohammad Jalali, Farzan
Farnia (CVPR 2025); official code aziksh-ospanov/scendi-score (``scendi/metric/algorithm_utils.py``: ``cov_rff``,
``rff_schur_complement``, ``schur_vendi_from_eigs``), read to understand, not copied.

The method (training-free; acts on the **final, projected joint-space embeddings** of both towers, after the last
LayerNorm and the projection, as ``encode_text`` / ``encode_image`` return them):

1. Paired features: text ``x_i`` and image ``y_i``, ``i = 1..n``. Kernel feature maps ``phi``: random Fourier
   features of the Gaussian kernel ``k(a, b) = exp(-|a - b|^2 / (2 sigma^2))``, ``phi(z) = [cos(z W), sin(z W)] /
   sqrt(D)`` with ``W ~ N(0, 1/sigma^2)`` of shape ``[d, D]``, **one W shared by text and image** (so the two
   feature spaces are the same space), ``sigma = 3.5``, ``D = rff_dim = 2500``. ``|phi(z)| = 1``, so ``tr C = 1``.
2. Uncentred covariances ``C_xx = Phi_x^T Phi_x / n``, ``C_yy``, ``C_xy = Phi_x^T Phi_y / n``.
3. Schur complement ``S = C_yy - C_xy^T (C_xx + 1e-12 I)^+ C_xy``: the image covariance that the text does not
   explain; ``E = C_xy^T (C_xx + 1e-12 I)^+ C_xy`` is the text-explained part, ``C_yy = S + E``.
4. Scores from eigenvalues ``l`` (clamped at ``1e-10``): ``exp(-sum_i l_i log(l_i / sum_j l_j))``, exactly as the
   code's ``schur_vendi_from_eigs``: the weights are the *raw* eigenvalues, the logarithm's argument is normalised.
   On ``S`` this is the **SCE** (image diversity beyond the prompts); on ``E`` the prompt-induced diversity. Since
   ``tr S <= tr C_yy = 1`` the raw weights make the SCE tend to 1 as ``S -> 0`` (all image variance explained).
5. Correction: ``Gamma = (C_xx + ridge I)^+ C_xy`` on linear features; ``y - x Gamma`` removes the text-predictable
   part of an image embedding (and with the roles swapped, the image-predictable part of a text embedding).

Choices that differ from the paper or its code, and why:

* **Normalised form.** ``normalized=True`` gives the Vendi form ``exp(-sum p log p)``, ``p = l / sum l`` (the notes
  ask for both; the code uses only the raw-weight form, which is the default here).
* **Kernels.** ``kernel="rff"`` is the code's Gaussian path. ``kernel="cosine"`` is the code's cosine path (cosine
  similarity between *feature dimensions*, over the samples, divided by ``d``), written as features with unit-norm
  columns. ``kernel="linear"`` (``phi(z) = z``, uncentred) is added for closed forms and the correction.
  ``kernel="gaussian"`` is the exact (non-RFF) variant of the notes: the joint Gram matrix ``K`` of the 2n points
  ``[x; y]`` factored as ``K = V V^T`` so that rows of ``V`` are exact feature vectors; the notes' Cholesky is
  replaced by a clamped eigendecomposition, because ``K`` of nearby points is numerically singular and Cholesky then
  fails; every factorisation gives the same covariance spectra (they differ by an orthogonal map of feature space).
* **Seeds and precision.** ``W`` comes from a seeded generator (the code draws it unseeded) and everything runs in
  float64 on the CPU (the code: float32 on the GPU); the scores move with the seed by RFF error only.
* **Unit-norm embeddings.** ``normalize=True`` (default) L2-normalises every text and image embedding before the
  kernel (cliplab's ``encode_text`` returns unnormalised projections; the code's CLIP feature extractors normalise).
  Then the linear kernel also has ``tr C = 1``, like the RFF one.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..eval.tasks import register_task
from ..methods import register_method

register_method("sce", "Dissecting CLIP: Decomposition with a Schur Complement-based Approach",
                "Schur-complement split of the joint text-image covariance; SCE = image diversity beyond the text",
                doc="docs/methods/sce.md")(__name__)

__all__ = ["KERNELS", "SCEDegenerateWarning", "SchurDecomposition", "SCEResult", "rff_features", "kernel_features", "schur_decomposition",
           "entropy_score", "schur_complement_entropy", "correction_map", "correct", "sce_of_embeddings",
           "sce_task"]

KERNELS = ("rff", "gaussian", "cosine", "linear")
SIGMA = 3.5
RFF_DIM = 2500
RIDGE = 1e-12  # the code's epsilon added to C_xx before the pseudo-inverse
EIG_FLOOR = 1e-10  # the code's clamp of eigenvalues before the logarithm


class SCEDegenerateWarning(UserWarning):
    """The text features can fit every image feature exactly (too few pairs for the feature dimension)."""


def _as64(z) -> torch.Tensor:
    z = torch.as_tensor(z).detach().to("cpu", torch.float64)
    if z.dim() != 2:
        raise ValueError(f"features must be a 2-D [n, d] array, got shape {tuple(z.shape)}")
    return z


def _paired(x, y) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _as64(x), _as64(y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{x.shape[0]} text rows for {y.shape[0]} image rows: pass one row per (text, image) pair")
    if x.shape[0] < 2:
        raise ValueError("the covariances need at least 2 pairs")
    return x, y


def rff_features(x, y, *, sigma: float = SIGMA, rff_dim: int = RFF_DIM, seed: int = 0,
                 omega: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random Fourier features ``[n, 2 rff_dim]`` of text and image with one shared frequency matrix ``omega``
    ``[d, rff_dim]`` (drawn as ``N(0, 1/sigma^2)`` from ``seed`` unless given)."""
    x, y = _as64(x), _as64(y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"the Gaussian kernel needs text and image in one space: dims {x.shape[1]} and {y.shape[1]}")
    if omega is None:
        gen = torch.Generator().manual_seed(int(seed))
        omega = torch.randn(x.shape[1], int(rff_dim), generator=gen, dtype=torch.float64) / sigma
    omega = torch.as_tensor(omega, dtype=torch.float64)

    def phi(z):
        p = z @ omega
        return torch.cat([p.cos(), p.sin()], dim=1) / math.sqrt(omega.shape[1])

    return phi(x), phi(y)


def _gaussian_joint_features(x, y, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    z = torch.cat([x, y])
    gram = torch.exp(-torch.cdist(z, z).pow(2) / (2 * sigma * sigma))
    vals, vecs = torch.linalg.eigh(gram)
    feats = vecs * vals.clamp(min=0).sqrt()  # rows: exact features, feats @ feats.T = gram (up to the clamp)
    n = x.shape[0]
    return feats[:n], feats[n:]


def _unit_rows(z) -> torch.Tensor:
    z = _as64(z)
    return z / z.norm(dim=1, keepdim=True).clamp(min=1e-300)


def _unit_columns(z: torch.Tensor) -> torch.Tensor:
    # the code's cosine "kernel" between feature dimensions, over samples, / d: columns of unit norm, scaled so that
    # phi^T phi / n = cos(columns) / d
    return z / z.norm(dim=0).clamp(min=1e-300) * math.sqrt(z.shape[0] / z.shape[1])


def kernel_features(x, y, *, kernel: str = "rff", sigma: float = SIGMA, rff_dim: int = RFF_DIM,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature maps ``(phi_x [n, m], phi_y [n, m'])`` of paired text ``x`` and image ``y`` for a kernel of
    :data:`KERNELS`; the covariances are ``phi^T phi / n``."""
    x, y = _paired(x, y)
    if kernel == "rff":
        return rff_features(x, y, sigma=sigma, rff_dim=rff_dim, seed=seed)
    if kernel == "gaussian":
        return _gaussian_joint_features(x, y, sigma)
    if kernel == "cosine":
        return _unit_columns(x), _unit_columns(y)
    if kernel == "linear":
        return x, y
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def _pinv_psd(c: torch.Tensor, ridge: float) -> tuple[torch.Tensor, int]:
    """The pseudo-inverse of ``c + ridge I`` (as ``torch.linalg.pinv(..., hermitian=True)``) and the rank of ``c``
    itself (the directions above both the cut-off and the ridge)."""
    vals, vecs = torch.linalg.eigh(c + ridge * torch.eye(c.shape[0], dtype=c.dtype))
    cutoff = vals.abs().max() * c.shape[0] * torch.finfo(c.dtype).eps
    keep = vals.abs() > cutoff
    inv = (vecs[:, keep] / vals[keep]) @ vecs[:, keep].T
    return inv, int((vals > torch.clamp(cutoff, min=2 * ridge)).sum())


@dataclass
class SchurDecomposition:
    """``C_yy = explained + schur``: ``explained = C_xy^T C_xx^+ C_xy`` (text-explained image covariance) and
    ``schur = C_yy - explained`` (the Schur complement); ``gamma = C_xx^+ C_xy`` maps text features to the best
    linear prediction of image features."""

    c_xx: torch.Tensor
    c_yy: torch.Tensor
    c_xy: torch.Tensor
    explained: torch.Tensor
    schur: torch.Tensor
    gamma: torch.Tensor

    def scores(self, *, normalized: bool = False) -> dict[str, float]:
        """``sce`` (of ``schur``), ``text_part`` (of ``explained``), ``image_total`` (of ``C_yy``) and
        ``text_total`` (of ``C_xx``), each :func:`entropy_score`."""
        return {"sce": entropy_score(self.schur, normalized=normalized),
                "text_part": entropy_score(self.explained, normalized=normalized),
                "image_total": entropy_score(self.c_yy, normalized=normalized),
                "text_total": entropy_score(self.c_xx, normalized=normalized)}


def schur_decomposition(phi_x: torch.Tensor, phi_y: torch.Tensor, *, ridge: float = RIDGE) -> SchurDecomposition:
    """The decomposition from feature maps (rows paired); ``ridge`` is added to ``C_xx`` before the pseudo-inverse."""
    phi_x, phi_y = _paired(phi_x, phi_y)
    n = phi_x.shape[0]
    c_xx, c_yy, c_xy = phi_x.T @ phi_x / n, phi_y.T @ phi_y / n, phi_x.T @ phi_y / n
    inv, rank = _pinv_psd(c_xx, ridge)
    if rank >= n:
        warnings.warn(f"the text features have rank {rank} >= {n} pairs: they interpolate any image features, so the "
                      "Schur complement is ~0 and SCE ~1; use more pairs, a smaller rff_dim or a larger ridge",
                      SCEDegenerateWarning, stacklevel=2)
    gamma = inv @ c_xy
    explained = c_xy.T @ gamma
    explained = (explained + explained.T) / 2  # symmetric in exact arithmetic; keep eigvalsh on a symmetric matrix
    return SchurDecomposition(c_xx, c_yy, c_xy, explained, c_yy - explained, gamma)


def entropy_score(matrix: torch.Tensor, *, normalized: bool = False, floor: float = EIG_FLOOR) -> float:
    """``exp(-sum l log(l / sum l))`` of the eigenvalues ``l`` of a symmetric PSD matrix, clamped at ``floor`` (the
    code's form); ``normalized=True``: the Vendi score ``exp(-sum p log p)``, ``p = l / sum l``."""
    vals = torch.linalg.eigvalsh(torch.as_tensor(matrix, dtype=torch.float64)).clamp(min=floor)
    logp = torch.log(vals / vals.sum())
    weights = vals / vals.sum() if normalized else vals
    return float(torch.exp(-(weights * logp).sum()))


@dataclass
class SCEResult:
    sce: float  # entropy score of the Schur complement: image diversity beyond the text
    text_part: float  # entropy score of the text-explained part
    image_total: float
    text_total: float
    kernel: str
    n: int
    decomposition: SchurDecomposition | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("sce", "text_part", "image_total", "text_total", "kernel", "n")}


def schur_complement_entropy(text, image, *, kernel: str = "rff", sigma: float = SIGMA, rff_dim: int = RFF_DIM,
                             seed: int = 0, normalized: bool = False, ridge: float = RIDGE, normalize: bool = True,
                             keep_decomposition: bool = False) -> SCEResult:
    """SCE of paired text features ``[n, d]`` and image features ``[n, d]`` (one row per pair; repeat an image for
    each of its captions). ``kernel`` / ``sigma`` / ``rff_dim`` / ``seed``: :func:`kernel_features`;
    ``normalized``: :func:`entropy_score`; ``ridge``: :func:`schur_decomposition`; ``normalize``: L2-normalise the
    embeddings first."""
    if normalize:
        text, image = _unit_rows(text), _unit_rows(image)
    phi_x, phi_y = kernel_features(text, image, kernel=kernel, sigma=sigma, rff_dim=rff_dim, seed=seed)
    dec = schur_decomposition(phi_x, phi_y, ridge=ridge)
    return SCEResult(**dec.scores(normalized=normalized), kernel=kernel, n=phi_x.shape[0],
                     decomposition=dec if keep_decomposition else None)


def correction_map(reference_x, reference_y, *, ridge: float = RIDGE) -> torch.Tensor:
    """``Gamma = (C_xx + ridge I)^+ C_xy`` ``[d_x, d_y]`` on linear features of a reference set of pairs."""
    return schur_decomposition(reference_x, reference_y, ridge=ridge).gamma


def correct(x, y, gamma: torch.Tensor) -> torch.Tensor:
    """``y - x Gamma``: ``y`` with the part that ``x`` predicts linearly removed (T2I: x text, y image; swap the
    roles for I2T), in float64."""
    x, y = _paired(x, y)
    return y - x @ gamma


def sce_of_embeddings(job, **options) -> SCEResult:
    """SCE of an embedded job (``cliplab embed`` output folder, or what :func:`cliplab.pipeline.read_embeddings`
    returns): the rows that have both a text and an image embedding. ``options``: :func:`schur_complement_entropy`."""
    if isinstance(job, (str, Path)):
        from ..pipeline import read_embeddings

        job = read_embeddings(job)
    both = torch.as_tensor(job.text_valid, dtype=torch.bool) & torch.as_tensor(job.image_valid, dtype=torch.bool)
    if int(both.sum()) < 2:
        raise ValueError("the job has fewer than 2 rows with both a caption and an image; embed image,caption pairs")
    return schur_complement_entropy(torch.as_tensor(job.text)[both], torch.as_tensor(job.image)[both], **options)


@register_task("sce", "captions")
def sce_task(data, encoder, kernel: str = "rff", sigma: float = SIGMA, rff_dim: int = RFF_DIM, seed: int = 0,
             normalized: bool = False, ridge: float = RIDGE, normalize: bool = True,
             shuffled_control: bool = True) -> dict[str, Any]:
    """Schur Complement Entropy of image given caption: every (caption, its image) pair; with a shuffled-pairing
    control (the same features, captions paired with random images)."""
    import time

    t0 = time.perf_counter()
    img = encoder.images(data.items)
    t1 = time.perf_counter()
    txt = encoder.texts(data.captions)
    t2 = time.perf_counter()
    pair_img = img[torch.as_tensor(data.caption_image, dtype=torch.long)]
    opts = dict(kernel=kernel, sigma=sigma, rff_dim=rff_dim, seed=seed, normalized=normalized, ridge=ridge,
                normalize=normalize)
    metrics = schur_complement_entropy(txt, pair_img, **opts).as_dict()
    if shuffled_control:
        perm = torch.randperm(txt.shape[0], generator=torch.Generator().manual_seed(int(seed)))
        metrics["shuffled_sce"] = schur_complement_entropy(txt[perm], pair_img, **opts).sce
    metrics["normalized"] = normalized
    return {"task": "sce", "num_images": len(data.items), "num_texts": len(data.captions), "metrics": metrics,
            "timing": {"image_s": round(t1 - t0, 3), "text_s": round(t2 - t1, 3),
                       "sce_s": round(time.perf_counter() - t2, 3)}}
