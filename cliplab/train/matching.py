"""Token matching between two sets of tokens (words and patches): the relaxed and the strict bipartite assignment,
and the image-text score they give.

A similarity matrix ``sim`` ``[W, P]`` holds one row per word and one column per patch.

* **relaxed** (:func:`relaxed_matching`): every word takes its most similar patch; a patch may serve several words.
  This is bipartite matching with the "each patch at most once" constraint dropped, which is what makes it cheap and
  differentiable almost everywhere (the matched similarity is a ``max``).
* **strict** (:func:`hungarian_matching`): a one-to-one assignment maximising the summed similarity (the Hungarian
  method, ``scipy.optimize.linear_sum_assignment``); with more words than patches only ``P`` words are matched.

:func:`token_match_scores` scores every (image, text) pair of a batch by the mean similarity of the matched word-patch
pairs, with padding and special tokens left out by masks. The assignment is computed without gradients; gradients
flow through the matched similarities. Used by ``cliplab.objectives.lightclip`` (LightCLIP's token-level alignment).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["MATCHINGS", "relaxed_matching", "hungarian_matching", "matching_pairs", "matched_similarity",
           "token_match_scores"]

MATCHINGS = ("relaxed", "hungarian")


def _linear_sum_assignment():
    """scipy's solver, imported on first use: scipy is an optional dependency and only the strict matching needs it."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as err:  # pragma: no cover - scipy is installed wherever the tests run
        raise ImportError("the Hungarian matching needs scipy: pip install scipy (or use mode='relaxed')") from err
    return linear_sum_assignment


def relaxed_matching(sim: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The patch index ``[..., W]`` each word takes: the argmax of its row of ``sim`` ``[..., W, P]`` over the
    patches where ``patch_mask`` (bool, ``True`` = a real patch; ``sim``'s shape without the word axis, or
    broadcastable to it) holds; ties go to the first patch."""
    if sim.dim() < 2:
        raise ValueError(f"sim must be [..., words, patches], got shape {tuple(sim.shape)}")
    if patch_mask is not None:
        if not bool(patch_mask.any(-1).all()):
            raise ValueError("every patch_mask row needs at least one True patch")
        sim = sim.masked_fill(~patch_mask.unsqueeze(-2), float("-inf"))
    return sim.detach().argmax(-1)


def hungarian_matching(sim: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A one-to-one assignment ``(words, patches)`` (index arrays of length ``min(W, P)``, sorted by word) that
    maximises ``sim[words, patches].sum()`` for one ``[W, P]`` matrix."""
    values = sim.detach().cpu().double().numpy() if isinstance(sim, torch.Tensor) else np.asarray(sim, float)
    if values.ndim != 2:
        raise ValueError(f"sim must be one [words, patches] matrix, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError("sim must be finite (drop padded rows and columns before matching)")
    rows, cols = _linear_sum_assignment()(values, maximize=True)
    return rows, cols


def matching_pairs(sim: torch.Tensor, mode: str = "relaxed") -> tuple[torch.Tensor, torch.Tensor]:
    """The matched ``(word, patch)`` index pairs of one ``[W, P]`` matrix under ``mode`` (see :data:`MATCHINGS`)."""
    if mode not in MATCHINGS:
        raise ValueError(f"mode must be one of {MATCHINGS}, got {mode!r}")
    if mode == "relaxed":
        return torch.arange(sim.shape[0], device=sim.device), relaxed_matching(sim)
    rows, cols = hungarian_matching(sim)
    return torch.as_tensor(rows, device=sim.device), torch.as_tensor(cols, device=sim.device)


def matched_similarity(sim: torch.Tensor, mode: str = "relaxed") -> torch.Tensor:
    """The mean similarity of the matched pairs of one ``[W, P]`` matrix (differentiable in ``sim``)."""
    words, patches = matching_pairs(sim, mode)
    return sim[words, patches].mean()


def token_match_scores(patches: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor,
                       patch_mask: torch.Tensor | None = None, mode: str = "relaxed") -> torch.Tensor:
    """Scores ``[B_img, B_txt]``: for image ``i`` and text ``j``, the mean over text ``j``'s real words of the
    similarity to its matched patch of image ``i``.

    ``patches`` ``[B_img, P, D]`` and ``words`` ``[B_txt, L, D]`` are compared by dot product (normalise them first
    for cosines); ``word_mask`` ``[B_txt, L]`` and ``patch_mask`` ``[B_img, P]`` (bool, ``True`` = real token) say which
    tokens take part. Every text needs at least one real word."""
    if mode not in MATCHINGS:
        raise ValueError(f"mode must be one of {MATCHINGS}, got {mode!r}")
    if patches.dim() != 3 or words.dim() != 3 or patches.shape[-1] != words.shape[-1]:
        raise ValueError(f"patches [B, P, D] and words [B, L, D] must share D, got {tuple(patches.shape)} and "
                         f"{tuple(words.shape)}")
    if word_mask.shape != words.shape[:2]:
        raise ValueError(f"word_mask must be {tuple(words.shape[:2])}, got {tuple(word_mask.shape)}")
    counts = word_mask.sum(-1)
    if bool((counts == 0).any()):
        raise ValueError("every text needs at least one real word in word_mask")
    sim = torch.einsum("ipd,tld->itlp", patches, words)  # [B_img, B_txt, L, P]
    if mode == "relaxed":
        best = relaxed_matching(sim, None if patch_mask is None else patch_mask[:, None, :])  # [B_img, 1, P]
        matched = sim.gather(-1, best.unsqueeze(-1)).squeeze(-1)  # [B_img, B_txt, L]
        matched = matched.masked_fill(~word_mask.unsqueeze(0), 0.0)
        return matched.sum(-1) / counts.unsqueeze(0).to(matched.dtype)
    return _hungarian_scores(sim, word_mask, patch_mask)


def _hungarian_scores(sim: torch.Tensor, word_mask: torch.Tensor, patch_mask: torch.Tensor | None) -> torch.Tensor:
    """The strict assignment per (image, text) pair on the real rows and columns; the scores are gathered from
    ``sim`` so gradients flow through the matched entries."""
    b_img, b_txt, _, n_patch = sim.shape
    values = sim.detach().cpu().double().numpy()
    word_idx = [np.flatnonzero(m) for m in word_mask.cpu().numpy()]
    patch_idx = [np.arange(n_patch)] * b_img if patch_mask is None else [np.flatnonzero(m) for m in
                                                                           patch_mask.cpu().numpy()]
    solve = _linear_sum_assignment()
    img, txt, rows, cols = [], [], [], []
    for i in range(b_img):
        for j in range(b_txt):
            w, p = word_idx[j], patch_idx[i]
            r, c = solve(values[i, j][np.ix_(w, p)], maximize=True)
            img += [i] * len(r)
            txt += [j] * len(r)
            rows += w[r].tolist()
            cols += p[c].tolist()
    dev = sim.device
    img_t, txt_t = torch.tensor(img, device=dev), torch.tensor(txt, device=dev)
    picked = sim[img_t, txt_t, torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)]
    flat = img_t * b_txt + txt_t
    total = torch.zeros(b_img * b_txt, dtype=sim.dtype, device=dev).index_add(0, flat, picked)
    count = torch.zeros(b_img * b_txt, dtype=sim.dtype, device=dev).index_add(0, flat, torch.ones_like(picked))
    return (total / count).view(b_img, b_txt)
