"""The token-reducer interface, the index map that says which patches each reduced token stands for, and two
building blocks every reducer uses: size-weighted merging by an assignment, and keeping the top-k tokens.

A reducer sees only the patch tokens (CLS / other prefix tokens are never handed to it and always kept) and returns
fewer tokens plus an *assignment*: for each input token, the output token it went into (``-1``: dropped). The
forward pass (:func:`cliplab.vision_tokens.encode_image_reduced`) composes these steps into an :class:`IndexMap` over
the original patches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class IndexMap:
    """Which original patches each reduced token stands for.

    * ``assign`` ``[B, N]`` long: patch ``i`` (row-major over the ``grid x grid`` patches) went into reduced token
      ``assign[b, i]`` in ``[0, M)``, or was dropped (``-1``);
    * ``sizes`` ``[B, M]`` float32: how many patches each reduced token stands for (a merged token's weight).
    """

    assign: torch.Tensor
    sizes: torch.Tensor

    @classmethod
    def identity(cls, batch: int, patches: int, device=None) -> IndexMap:
        assign = torch.arange(patches, device=device).expand(batch, -1).contiguous()
        return cls(assign, torch.ones(batch, patches, device=device))

    def then(self, step: torch.Tensor, m: int) -> IndexMap:
        """The map after one more reduction ``step`` ``[B, M] -> [-1, m)`` (an assignment of the current tokens)."""
        kept = self.assign >= 0
        assign = torch.where(kept, step.gather(1, self.assign.clamp(min=0)), self.assign)
        return IndexMap(assign, step_sizes(self.sizes, step, m))

    def members(self, b: int, token: int) -> torch.Tensor:
        """The patch indices reduced token ``token`` of image ``b`` stands for."""
        return (self.assign[b] == token).nonzero().flatten()

    @property
    def dropped(self) -> torch.Tensor:
        """``[B, N]`` bool: patches no reduced token stands for."""
        return self.assign < 0


def check_assignment(step: torch.Tensor, tokens_in: torch.Tensor, m: int) -> None:
    """One clear error for a reducer's malformed assignment."""
    if step.shape != tokens_in.shape[:2] or step.dtype != torch.long:
        raise ValueError(f"a reducer must return an assignment of dtype long and shape {tuple(tokens_in.shape[:2])} "
                         f"(one entry per input token), got {step.dtype} {tuple(step.shape)}")
    if step.numel() and (int(step.min()) < -1 or int(step.max()) >= m):
        raise ValueError(f"assignment entries must be in [-1, {m}) (-1 = dropped, else the output token)")
    hit = torch.zeros(step.shape[0], m + 1, dtype=torch.long, device=step.device)
    hit.scatter_add_(1, step + 1, torch.ones_like(step))
    if m and bool((hit[:, 1:] == 0).any()):
        raise ValueError("every output token must stand for at least one input token (an assignment left one empty)")


def step_sizes(sizes: torch.Tensor, step: torch.Tensor, m: int) -> torch.Tensor:
    """Sizes ``[B, m]`` after ``step``: each output token's total input size (dropped tokens count nowhere)."""
    out = torch.zeros(sizes.shape[0], m + 1, dtype=sizes.dtype, device=sizes.device)
    return out.scatter_add_(1, step + 1, sizes)[:, 1:]


def merge_tokens(tokens: torch.Tensor, sizes: torch.Tensor, step: torch.Tensor, m: int) -> torch.Tensor:
    """``[B, M, W]`` tokens -> ``[B, m, W]``: each output token the size-weighted mean of the inputs assigned to it
    (``-1`` = dropped). A token assigned alone comes out with the same bits (``x * s / s`` for ``s = 1``)."""
    b, _, w = tokens.shape
    weights = sizes.to(tokens.dtype).unsqueeze(-1)
    index = (step + 1).unsqueeze(-1).expand(-1, -1, w)
    total = tokens.new_zeros(b, m + 1, w).scatter_add_(1, index, tokens * weights)[:, 1:]
    return total / step_sizes(sizes, step, m).to(tokens.dtype).unsqueeze(-1)


def keep_assignment(keep: torch.Tensor, n: int) -> torch.Tensor:
    """Indices ``[B, K]`` of tokens to keep (any order) -> the assignment ``[B, n]`` that keeps them in their original
    order and drops the rest."""
    kept = torch.zeros(keep.shape[0], n, dtype=torch.bool, device=keep.device).scatter_(1, keep, True)
    return torch.where(kept, kept.long().cumsum(1) - 1, torch.full_like(kept, -1, dtype=torch.long))


class TokenReducer:
    """Base class of the vision token reducers run inside the ViT (see :func:`encode_image_reduced`).

    Subclasses implement :meth:`reduce` and say in ``needs`` which extra inputs they read (``"attention"`` costs an
    extra ``q @ k^T`` per reduction; keys are free). ``proportional = True`` asks the following blocks to add
    ``log(size)`` to the attention logits of each key (ToMe's proportional attention), so a merged token weighs as
    the patches it stands for.
    """

    needs: frozenset[str] = frozenset()
    proportional: bool = False

    def reduce(self, tokens: torch.Tensor, attention: torch.Tensor | None, keys: torch.Tensor | None,
               text: torch.Tensor | None, *, sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One reduction.

        * ``tokens`` ``[B, M, W]``: the current patch tokens (the residual stream; CLS / prefix tokens excluded);
        * ``attention`` ``[B, H, P + M, P + M]`` or None: probabilities of the block just run, the ``P`` prefix
          tokens first (``attention[:, :, 0, P:]`` is CLS's attention to the patches); None before block 0 or when
          ``"attention"`` is not in ``needs``;
        * ``keys`` ``[B, H, P + M, d]`` or None: that block's keys, prefix first (None before block 0);
        * ``text``: what the caller passed (e.g. text features ``[B, D]``), or None;
        * ``sizes`` ``[B, M]`` float32: patches each current token stands for.

        Returns ``(tokens [B, M', W], assignment [B, M] long)``: input token ``j`` went into output ``assignment[b, j]``
        in ``[0, M')`` or was dropped (``-1``). Use :func:`merge_tokens` and :func:`keep_assignment`.
        """
        raise NotImplementedError

    def __call__(self, tokens, attention=None, keys=None, text=None, *, sizes=None):
        if sizes is None:
            sizes = torch.ones(tokens.shape[:2], device=tokens.device)
        return self.reduce(tokens, attention, keys, text, sizes=sizes)


def count_to_remove(ratio: float, n: int) -> int:
    """Tokens to remove from ``n`` at ``ratio`` (rounded to nearest)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"a reduction ratio must be in [0, 1], got {ratio}")
    return round(ratio * n)


class KeepTopK(TokenReducer):
    """The generic pruning reducer: keep the ``1 - ratio`` share of tokens with the highest score, in their original
    order, and drop the rest. ``score``: ``"cls_attention"`` (the attention CLS pays each patch, averaged over heads;
    needs a block before it), ``"norm"`` (the token's L2 norm) or ``"random"`` (a seeded control: each call draws
    from ``seed`` afresh, so each slice of a sliced batch gets the same draws; average a few seeds for a control)."""

    def __init__(self, ratio: float, score: str = "cls_attention", seed: int = 0):
        if score not in ("cls_attention", "norm", "random"):
            raise ValueError(f"unknown KeepTopK score {score!r}; choose 'cls_attention', 'norm' or 'random'")
        count_to_remove(ratio, 1)  # validates
        self.ratio, self.score, self.seed = ratio, score, seed
        self.needs = frozenset({"attention"}) if score == "cls_attention" else frozenset()

    def reduce(self, tokens, attention, keys, text, *, sizes):
        b, n, _ = tokens.shape
        k = n - count_to_remove(self.ratio, n)
        if self.score == "cls_attention":
            if attention is None:
                raise ValueError("KeepTopK(score='cls_attention') needs a block before it (layer >= 1)")
            if attention.shape[-1] == n:
                raise ValueError("KeepTopK(score='cls_attention') needs a class token; use score='norm'")
            scores = attention[:, :, 0, attention.shape[-1] - n:].float().mean(1)
        elif self.score == "norm":
            scores = tokens.float().norm(dim=-1)
        else:
            g = torch.Generator().manual_seed(self.seed)
            scores = torch.rand(b, n, generator=g).to(tokens.device)
        keep = scores.topk(k, dim=1).indices.sort(dim=1).values
        kept = tokens.gather(1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))  # a copy: the same bits
        return kept, keep_assignment(keep, n)
