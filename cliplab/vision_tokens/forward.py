"""The ViT forward pass with token reduction: blocks ``0..L-1`` on every token, a reducer, then the remaining blocks
on fewer tokens. Composed from the tower's public pieces (``_embed``/positions/``ln_pre``, its blocks, ``pool``);
it does not change the tower, and a reducer that keeps everything gives the plain forward bit for bit."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from ..models.hooks import TowerOutput, parse_output
from ..models.towers import slice_rows
from ..models.transformer import attention
from .reducer import IndexMap, TokenReducer, check_assignment, merge_tokens


def _layers(layer: int | Iterable[int], depth: int) -> list[int]:
    layers = sorted({int(layer)} if isinstance(layer, int) else {int(x) for x in layer})
    if not layers or layers[0] < 0 or layers[-1] > depth:
        raise ValueError(f"reduction layers must be in [0, {depth}] (L reduces before block L; {depth} = after the "
                         f"last block), got {layers}")
    return layers


def _block(block, x: torch.Tensor, bias: torch.Tensor | None, record: bool):
    """One residual block, the same arithmetic as ``ResidualBlock.forward``; also returns the keys and (with
    ``record``) the attention probabilities."""
    q, k, v = block.attn.split_heads(block.ln_1(x))
    probs = None
    if record:
        scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        probs = (scores if bias is None else scores + bias).softmax(-1)
    x = x + block.attn.merge_heads(attention(q, k, v, bias))
    return x + block.mlp(block.ln_2(x)), k, probs


def encode_image_reduced(model, pixels: torch.Tensor, reducer: TokenReducer, layer: int | Iterable[int] = 0, *,
                         text: torch.Tensor | None = None, output=False, normalize: bool = False) -> TowerOutput:
    """Encode images with ``reducer`` applied before block ``layer`` (an int, or several layers to reduce at each;
    ``layer == layers`` reduces after the last block, before pooling). The class token is never handed to the
    reducer and always kept; ``text`` is passed through to it (text-guided reducers).

    Pooled-only calls (``output=False``) at inference run a large batch in slices, as the plain ``encode_image`` does
    (``cliplab.models.towers.SLICE_TOKENS``), so a reducer that keeps everything gives ``encode_image``'s very bits at
    any batch size; a reducer then sees one slice at a time (``text`` rows follow their images).

    Returns a :class:`~cliplab.models.hooks.TowerOutput`: ``pooled`` ``[B, D]``; with ``output`` (``True`` or names
    from ``"tokens"``, ``"hidden"``, ``"attn"``) ``tokens`` ``[B, 1 + M, D]`` (row 0 the pooled output, then the ``M``
    reduced tokens in the joint space), ``hidden`` (the stream entering block 0, after a reduction at layer 0, then
    each block's output, before the reduction that follows it; token counts shrink), ``attn`` (each block's probabilities). ``extras``: ``"index_map"`` (an :class:`IndexMap` over the
    ``grid**2`` patches), ``"tokens_per_layer"`` (tokens entering each block, prefix included, for
    :func:`reduced_image_flops`), ``"grid"``.
    """
    visual = model.visual
    if model.config.vision.is_resnet:
        raise ValueError("token reduction needs a ViT image tower; this model's is a ResNet")
    want = parse_output(output)
    at = _layers(layer, len(visual.transformer.blocks))
    step = slice_rows(pixels.shape[0], visual.cfg.num_positions)
    if not want and pixels.shape[0] > step:  # pooled only: slice the batch as the plain forward does
        per_row = torch.is_tensor(text) and text.dim() >= 2 and text.shape[0] == pixels.shape[0]
        return _concat([_encode(model, pixels[i: i + step], reducer, at, text[i: i + step] if per_row else text, want,
                                normalize) for i in range(0, pixels.shape[0], step)])
    return _encode(model, pixels, reducer, at, text, want, normalize)


def _concat(outs: list[TowerOutput]) -> TowerOutput:
    """One pooled-only output from the slices' outputs. Adaptive reducers may keep different counts per slice: the
    index map's ``sizes`` are padded with zeros (no token) and ``tokens_per_layer`` is the largest over the slices."""
    maps = [o.extras["index_map"] for o in outs]
    m = max(im.sizes.shape[1] for im in maps)
    sizes = torch.cat([F.pad(im.sizes, (0, m - im.sizes.shape[1])) for im in maps])
    counts = [max(c) for c in zip(*(o.extras["tokens_per_layer"] for o in outs))]
    extras = {**outs[0].extras, "index_map": IndexMap(torch.cat([im.assign for im in maps]), sizes),
              "tokens_per_layer": counts}
    return TowerOutput(torch.cat([o.pooled for o in outs]), torch.cat([o.pool_index for o in outs]), None, None, None,
                       extras)


def _encode(model, pixels, reducer, at, text, want, normalize) -> TowerOutput:
    visual = model.visual
    depth = len(visual.transformer.blocks)
    x, skip = visual._embed(pixels)
    x = visual.ln_pre(x + visual.pos_embed.to(x.dtype))
    p = visual.n_prefix
    index_map = IndexMap.identity(x.shape[0], x.shape[1] - p, device=x.device)
    hidden = [] if "hidden" in want else None
    attn = [] if "attn" in want else None
    counts, keys, probs, bias = [], None, None, None
    for i in range(depth + 1):
        if i in at:
            x, index_map = _reduce(reducer, x, p, probs, keys, text, index_map)
            bias = _size_bias(index_map.sizes, p, x.dtype) if reducer.proportional else None
        if i == depth:
            break
        if i == 0 and hidden is not None:
            hidden.append(x)
        counts.append(x.shape[1])
        record = attn is not None or ("attention" in reducer.needs and i + 1 in at)
        x, keys, probs = _block(visual.transformer.blocks[i], x, bias, record)
        if hidden is not None:
            hidden.append(x)
        if attn is not None:
            attn.append(probs)
    pooled = visual.pool(x)
    if skip is not None:  # the max-skip side path: the max over the patches still represented
        dropped = index_map.dropped
        pooled = pooled + visual.stem_skip((skip.masked_fill(dropped.unsqueeze(-1), float("-inf"))
                                            if bool(dropped.any()) else skip).amax(1))
    tokens = None
    if "tokens" in want:
        tokens = visual._token_outputs(x, pooled)
        if skip is not None:  # each reduced token gains the mean stem feature of its patches
            m = x.shape[1] - p
            tokens[:, 1:] += visual.stem_skip(merge_tokens(skip, torch.ones_like(index_map.assign, dtype=torch.float),
                                                           index_map.assign, m))
        tokens[:, 0] = pooled
    if normalize:
        pooled = F.normalize(pooled, dim=-1)
    g = visual.cfg.grid_size
    extras = {"grid": (g, g), "index_map": index_map, "tokens_per_layer": counts}
    index = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    return TowerOutput(pooled, index, tokens, hidden, attn, extras)


def _reduce(reducer: TokenReducer, x, p, probs, keys, text, index_map: IndexMap):
    prefix, patches = x[:, :p], x[:, p:]
    reduced, step = reducer(patches, probs if "attention" in reducer.needs else None,
                            keys if "keys" in reducer.needs else None, text,
                            sizes=index_map.sizes)
    m = reduced.shape[1]
    if reduced.shape[0] != x.shape[0] or reduced.shape[2] != x.shape[2]:
        raise ValueError(f"a reducer must return tokens [B, M', {x.shape[2]}] for B = {x.shape[0]}, "
                         f"got {tuple(reduced.shape)}")
    check_assignment(step, patches, m)
    if reduced is patches:  # nothing reduced: keep the very tensor (no copy, the same bits)
        return x, index_map.then(step, m)
    return torch.cat([prefix, reduced], dim=1), index_map.then(step, m)


def _size_bias(sizes: torch.Tensor, p: int, dtype) -> torch.Tensor | None:
    """ToMe's proportional attention: ``log(size)`` on each key's logit, ``[B, 1, 1, P + M]``; None while every token
    is a single patch (then the blocks run exactly as unreduced)."""
    if bool((sizes == 1).all()):
        return None
    full = torch.cat([sizes.new_ones(sizes.shape[0], p), sizes], dim=1)
    return full.log().to(dtype)[:, None, None, :]
