"""ToMe's bipartite soft matching (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023): the shared
baseline reducer.

Tokens alternate into two sets, A (even positions) and B (odd). Each A token finds its most similar B token by cosine
similarity of the block's keys (averaged over heads, as ToMe does) or of the tokens themselves; the ``r`` A tokens with
the most similar matches merge into their match by a size-weighted average, and sizes add. Unlike ToMe's code, which
puts unmerged A tokens before B, the output keeps the surviving tokens in their original order, so with ``r = 0`` the
tokens come out unchanged, bit for bit.

Differences from the paper, said here: CLS is never handed to the reducer (ToMe masks it out of A instead); merging
happens between blocks (the paper merges between a block's attention and its MLP), so the keys are those of the
previous block's attention; proportional attention (``log(size)`` added to the logits) is optional, off by default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reducer import TokenReducer, count_to_remove, merge_tokens


class ToMe(TokenReducer):
    """Merge ``r`` tokens (or ``ratio`` of the current ones, rounded) per reduction; at most every A token merges.

    ``metric``: ``"keys"`` (the previous block's keys, averaged over heads), ``"tokens"`` (the residual stream), or
    ``"auto"``: keys where a block ran before, tokens before block 0. ``proportional``: ToMe's proportional attention
    in the blocks after a merge."""

    def __init__(self, r: int | None = None, *, ratio: float | None = None, metric: str = "auto",
                 proportional: bool = False):
        if (r is None) == (ratio is None):
            raise ValueError("ToMe takes either r (tokens merged per reduction) or ratio (a share of them)")
        if r is not None and r < 0:
            raise ValueError(f"ToMe's r must be >= 0, got {r}")
        if ratio is not None:
            count_to_remove(ratio, 1)  # validates
        if metric not in ("auto", "keys", "tokens"):
            raise ValueError(f"unknown ToMe metric {metric!r}; choose 'auto', 'keys' or 'tokens'")
        self.r, self.ratio, self.metric, self.proportional = r, ratio, metric, proportional
        self.needs = frozenset() if metric == "tokens" else frozenset({"keys"})

    def count(self, n: int) -> int:
        """Tokens merged away from ``n`` (at most the ``ceil(n / 2)`` A tokens)."""
        r = self.r if self.r is not None else count_to_remove(self.ratio, n)
        return min(r, (n + 1) // 2)

    def reduce(self, tokens, attention, keys, text, *, sizes):
        n = tokens.shape[1]
        r = self.count(n)
        metric = self._metric(tokens, keys)
        step = bipartite_assignment(metric, r)
        return merge_tokens(tokens, sizes, step, n - r), step

    def _metric(self, tokens: torch.Tensor, keys: torch.Tensor | None) -> torch.Tensor:
        if self.metric == "tokens" or (self.metric == "auto" and keys is None):
            return tokens
        if keys is None:
            raise ValueError("ToMe(metric='keys') needs a block before it (layer >= 1); use metric='auto' or 'tokens'")
        return keys[:, :, keys.shape[2] - tokens.shape[1]:].mean(1)  # patch keys, averaged over heads


def matching_flops(n: int, d: int, r: int) -> int:
    """Matmul FLOPs of one matching over ``n`` tokens with a metric of width ``d`` (the ``A @ B^T`` similarity; none
    when ``r = 0``). Keys' width is the head width ``W / heads``; tokens' is ``W``."""
    return 2 * ((n + 1) // 2) * (n // 2) * d if r else 0


def bipartite_assignment(metric: torch.Tensor, r: int) -> torch.Tensor:
    """ToMe's matching on ``metric`` ``[B, n, d]`` -> the assignment ``[B, n]`` into ``n - r`` tokens in original
    order: the ``r`` even-position tokens most similar (cosine) to an odd-position token go into their best match."""
    b, n, _ = metric.shape
    positions = torch.arange(n, device=metric.device).expand(b, -1)
    if r == 0:
        return positions.clone()
    metric = F.normalize(metric.float(), dim=-1)
    a, bset = metric[:, ::2], metric[:, 1::2]
    best, match = (a @ bset.transpose(1, 2)).max(-1)  # [B, nA]
    order = best.sort(dim=-1, descending=True, stable=True).indices
    merged = torch.zeros_like(best, dtype=torch.bool).scatter_(1, order[:, :r], True)
    # survivors: every B token and the A tokens not merged; each merged A token follows its match (odd position)
    survives = torch.ones(b, n, dtype=torch.bool, device=metric.device)
    survives[:, ::2] = ~merged
    new_index = survives.long().cumsum(1) - 1
    target = positions.clone()
    target[:, ::2] = torch.where(merged, 2 * match + 1, target[:, ::2])
    return new_index.gather(1, target)
