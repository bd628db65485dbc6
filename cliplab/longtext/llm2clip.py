"""LLM2CLIP: an LLM, made a caption embedder, as CLIP's text tower.

Paper: *LLM2CLIP: Powerful Language Model Unlocks Richer Visual Representation*, Weiquan Huang, Aoqi Wu, Yifan Yang,
Xufang Luo, Yuqing Yang, Liang Hu, Qi Dai, Xiyang Dai, Dongdong Chen, Chong Luo, Lili Qiu (arXiv 2411.04997).
Official code: ``microsoft/LLM2CLIP``.

What is implemented:

* **Stage 1, caption contrastive (CC) fine-tuning** (:func:`tune_last_layers`): the LLM becomes a caption embedder
  with mean pooling, trained with the supervised-SimCSE loss of LLM2Vec (:func:`caption_contrastive_loss`):
  two captions of the same image are anchor and positive, the other images' captions in the batch are negatives
  (temperature 0.05, i.e. LLM2Vec's scale 20; one direction, anchor -> positives, as LLM2Vec's loss). Any caption of
  the anchor's image found among the batch's positives is masked out of the negatives (``image_ids``). The metric is
  the paper's **CRA** (:func:`caption_retrieval_accuracy`): top-1 accuracy of retrieving another caption of the same
  image among all the other captions.
* **Stage 2** (:func:`train_llm_clip`): the stage-1 embedder, frozen, with LLM2CLIP's adapter (``TextProj``:
  :class:`~cliplab.text.llm_tower.TextAdapter`, 4 pre-LN residual MLP blocks of expansion 2, LayerNorm, Linear to
  the CLIP dimension) replaces the CLIP text tower (:class:`~cliplab.text.llm_tower.LLMTextCLIP`); the LLM
  embeddings of all training captions are computed once and cached (the paper pre-extracts them offline), and the
  adapter plus the CLIP image tower are trained with the symmetric CLIP InfoNCE.

Where it acts: stage 1 changes the last ``tune_layers`` transformer blocks of the LLM (and, for a Llama decoder, its
final RMSNorm); the sentence embedding is the mean over real tokens of the final (normed) token states. Stage 2
reads that embedding and maps it into the joint space after the image tower's projection.

Choices that differ from the paper (and why):

* *Last-layers tuning instead of LoRA.* The paper tunes the LLM with LoRA; it notes that tuning only the last layers
  is an alternative. On this CPU we tune the last ``tune_layers`` blocks (default 2) in full, on cached hidden states
  of the block below them (:func:`cache_hidden_states`): the frozen lower blocks run once per caption, never inside
  the training loop. At step 0 the tuned embedder equals the raw LLM with mean pooling (tested).
* *Causal attention, no MNTP.* LLM2Vec (the paper's stage-1 recipe) switches the decoder to bidirectional attention
  and warms it up with masked next-token prediction; turning attention bidirectional in only the tuned last blocks
  would break the step-0 identity, and MNTP needs a corpus pass per step, so the decoder stays causal. Mean pooling
  is kept, as in the paper.
* *Data.* The paper mixes CC3M captions with Wikitext-103; here Flickr8k's 5 human captions per photo give the
  positive pairs (``../shared/data/flickr8k-1k``) and no plain-text mix is used.
* *Stage 2 scale.* The paper trains EVA02/CLIP ViT-L with layer-decay 0.85, lr 1e-5, 20 epochs on CC3M+CC12M; here
  the shipped ``shapes-tiny`` image tower and the adapter train for a few hundred steps on the synthetic world with
  AdamW (no layer decay). The CLIP logit scale stays fixed at the shipped model's value.
* *Adapter at identity.* The paper's ``TextProj`` is randomly initialised; here its residual branches start at zero
  (the blocks are the identity) so that training starts from a linear read-out of the LLM embedding.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F

from ..methods import register_method
from ..text.pooling import get_pooling
from ..text.training import FitResult, fit
from ..text.llm_tower import LLMTextCLIP, TextAdapter

register_method(
    "llm2clip",
    "LLM2CLIP: Powerful Language Model Unlock Richer Visual Representation",
    "caption-contrastive tuning of an LLM's last blocks (CRA metric), then the frozen LLM + adapter as CLIP's text "
    "tower with the image tower tuned against it",
    doc="docs/methods/llm2clip.md",
)(__name__)

__all__ = ["caption_retrieval_accuracy", "caption_contrastive_loss", "cache_hidden_states", "top_block_states",
           "pad_states", "tune_last_layers", "train_llm_clip", "clip_contrastive_loss", "LLMTextCLIP", "TextAdapter",
           "TEMPERATURE"]

#: LLM2Vec's supervised-SimCSE scale 20 (``HardNegativeNLLLoss``)
TEMPERATURE = 0.05


# --- the metric and the loss -------------------------------------------------------------------------------------
def caption_retrieval_accuracy(embeddings: torch.Tensor, image_ids: Sequence) -> float:
    """CRA: the fraction of captions whose most similar *other* caption (cosine) describes the same image. Captions
    of images with a single caption have no positive and are not counted."""
    ids = torch.as_tensor([hash(i) for i in image_ids]) if not torch.is_tensor(image_ids) else image_ids
    if embeddings.shape[0] != len(ids):
        raise ValueError(f"{embeddings.shape[0]} embeddings but {len(ids)} image ids")
    e = F.normalize(embeddings.float(), dim=-1)
    sim = e @ e.T
    sim.fill_diagonal_(float("-inf"))  # a caption does not retrieve itself
    same = ids[:, None] == ids[None, :]
    has_pair = same.sum(1) > 1
    if not bool(has_pair.any()):
        raise ValueError("no image has two captions: CRA needs caption pairs")
    hit = same[torch.arange(len(ids)), sim.argmax(1)]
    return float(hit[has_pair].float().mean())


def caption_contrastive_loss(anchors: torch.Tensor, positives: torch.Tensor, image_ids: Sequence | None = None,
                             temperature: float = TEMPERATURE) -> torch.Tensor:
    """Supervised SimCSE (LLM2Vec): row ``i`` of ``anchors`` should pick row ``i`` of ``positives`` (cosine /
    ``temperature``) against the other rows. With ``image_ids``, another row from the anchor's own image is not a
    negative (it is masked out)."""
    if anchors.shape != positives.shape:
        raise ValueError(f"anchors {tuple(anchors.shape)} and positives {tuple(positives.shape)} differ")
    logits = F.normalize(anchors, dim=-1) @ F.normalize(positives, dim=-1).T / temperature
    if image_ids is not None:
        ids = torch.as_tensor([hash(i) for i in image_ids]) if not torch.is_tensor(image_ids) else image_ids
        n = len(ids)
        false_neg = (ids[:, None] == ids[None, :]) & ~torch.eye(n, dtype=torch.bool)
        logits = logits.masked_fill(false_neg.to(logits.device), float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


# --- stage 1: last-layers tuning on cached states ------------------------------------------------------------------
def _start_layer(model, tune_layers: int) -> int:
    n = len(model.blocks)
    if not 1 <= tune_layers <= n:
        raise ValueError(f"tune_layers must be in 1..{n} for this {n}-block model, got {tune_layers}")
    return n - tune_layers


@torch.no_grad()
def cache_hidden_states(embedder, texts: Sequence[str], start: int, batch_size: int = 64,
                        progress: bool = False) -> list[torch.Tensor]:
    """The residual stream entering block ``start`` (``hidden[start]``) of each text, ``[len_i, W]`` fp32, real
    tokens only, in input order: what the frozen blocks below ``start`` compute, once."""
    batch = embedder.tokenize(list(texts))
    out: list[torch.Tensor] = [None] * len(batch)  # type: ignore[list-item]
    for rows, sub in embedder.iter_batches(batch, batch_size, progress):
        hidden = embedder.token_states(sub, output="hidden").hidden[start].float().cpu()
        for j, r in enumerate(rows.tolist()):
            out[r] = hidden[j, : int(sub.lengths[j])].clone()
    return out


def pad_states(states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``[len_i, W]`` states into ``[B, n, W]`` and the mask of real tokens ``[B, n]``."""
    lengths = torch.tensor([len(s) for s in states])
    x = torch.nn.utils.rnn.pad_sequence(states, batch_first=True)
    return x, torch.arange(x.shape[1]) < lengths[:, None]


def top_block_states(model, states: torch.Tensor, mask: torch.Tensor, start: int) -> torch.Tensor:
    """Final token states from the stream entering block ``start`` (``[B, n, W]``, right-padded, ``mask`` of real
    tokens): blocks ``start..`` of a :class:`~cliplab.models.lm.LlamaDecoder` (then its final norm) or of a
    :class:`~cliplab.models.lm.BertEncoder` (padding masked), exactly as the full forward pass runs them."""
    from ..models.hooks import NO_HOOKS
    from ..models.lm import BertEncoder, LlamaDecoder
    from ..models.lm.llama import rotary_tables

    hooks = NO_HOOKS.bind(model)
    x = states.to(model.dtype)
    b, n, _ = x.shape
    if isinstance(model, LlamaDecoder):
        cos, sin = rotary_tables(torch.arange(n, device=x.device), model.cfg.head_dim, model.cfg.rope_theta, x.dtype)
        for layer in range(start, len(model.blocks)):
            x, _ = model.blocks[layer](x, cos=cos, sin=sin, layer=layer, hooks=hooks, record=False, cache=None,
                                       causal_mask=None)
        return model.norm(x)
    if isinstance(model, BertEncoder):
        bias = None
        if not bool(mask.all()):
            bias = torch.zeros(b, 1, 1, n, dtype=x.dtype, device=x.device).masked_fill_(
                ~mask.to(x.device)[:, None, None, :], float("-inf"))
        for layer in range(start, len(model.blocks)):
            x, _ = model.blocks[layer](x, mask=bias, layer=layer, hooks=hooks, record=False)
        return x
    raise TypeError(f"last-layers tuning supports Llama decoders and BERT encoders, not {type(model).__name__}")


def _trainable_top(model, start: int) -> list[torch.nn.Parameter]:
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for blk in model.blocks[start:] for p in blk.parameters()]
    if hasattr(model, "norm"):  # a decoder's final RMSNorm sits between the last block and the pooling
        params += list(model.norm.parameters())
    for p in params:
        p.requires_grad_(True)
    return params


def tune_last_layers(embedder, texts: Sequence[str], image_ids: Sequence, *, tune_layers: int = 2,
                     steps: int = 200, batch_size: int = 32, lr: float = 1e-4, weight_decay: float = 0.0,
                     warmup: int = 10, temperature: float = TEMPERATURE, seed: int = 0, progress: bool = False,
                     states: list[torch.Tensor] | None = None):
    """Stage 1: caption-contrastive tuning of ``embedder``'s last ``tune_layers`` blocks on captions ``texts`` of
    images ``image_ids`` (two or more captions per image). Each step draws ``batch_size`` distinct images and two
    distinct captions of each. ``states`` (from :func:`cache_hidden_states` at ``len(blocks) - tune_layers``) skips
    the frozen forward pass. Returns ``(tuned_embedder, fit_result)``: a new embedder of the same class with mean
    pooling (the input embedder is left unchanged); it saves with ``.save(dir)``."""
    if len(texts) != len(image_ids):
        raise ValueError(f"{len(texts)} captions but {len(image_ids)} image ids")
    groups: dict = {}
    for i, g in enumerate(image_ids):
        groups.setdefault(g, []).append(i)
    pairs = [v for v in groups.values() if len(v) >= 2]
    if len(pairs) < 2:
        raise ValueError("stage 1 needs at least two images with two or more captions each")
    batch_size = min(batch_size, len(pairs))
    model = copy.deepcopy(embedder.model).float()
    start = _start_layer(model, tune_layers)
    if states is None:
        states = cache_hidden_states(embedder, texts, start, progress=progress)
    if len(states) != len(texts) or states[0].shape[-1] != model.cfg.width:
        raise ValueError("states do not match the captions: compute them with cache_hidden_states(embedder, "
                         f"texts, start={start})")
    params = _trainable_top(model, start)
    model.train()
    mean = get_pooling("mean")
    gen = torch.Generator().manual_seed(seed)

    def step(i: int):
        chosen = torch.randperm(len(pairs), generator=gen)[:batch_size].tolist()
        a_idx, p_idx = [], []
        for c in chosen:
            two = torch.randperm(len(pairs[c]), generator=gen)[:2].tolist()
            a_idx.append(pairs[c][two[0]])
            p_idx.append(pairs[c][two[1]])
        x, mask = pad_states([states[j] for j in a_idx + p_idx])
        pooled = mean(top_block_states(model, x, mask, start), mask)
        loss = caption_contrastive_loss(pooled[:batch_size], pooled[batch_size:], temperature=temperature)
        return loss, {}

    result = fit(params, step, steps=steps, lr=lr, warmup=warmup, weight_decay=weight_decay, seed=seed,
                 progress=progress, desc="llm2clip stage 1")
    for p in model.parameters():
        p.requires_grad_(False)
    tuned = type(embedder).__new__(type(embedder))
    tuned.__dict__.update({k: v for k, v in embedder.__dict__.items() if k != "lm"})
    tuned.model = model.eval()
    tuned.default_pooling = "mean"
    tuned.name = f"{embedder.name}+llm2clip"
    return tuned, result


# --- stage 2: the frozen LLM as CLIP's text tower ------------------------------------------------------------------
def clip_contrastive_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE on L2-normalised features, the CLIP loss of stage 2."""
    logits = logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def train_llm_clip(model: LLMTextCLIP, pixels: torch.Tensor, texts: Sequence[str], *, steps: int = 200,
                   batch_size: int = 32, lr: float = 1e-4, weight_decay: float = 0.05, warmup: int = 10, tune_image: bool = True, seed: int = 0,
                   progress: bool = False) -> FitResult:
    """Stage 2: train ``model``'s adapter (and, ``tune_image``, its CLIP image tower) on preprocessed ``pixels``
    ``[N, 3, S, S]`` and their captions ``texts`` with the CLIP loss. The LLM runs once per caption (cached); no
    gradient reaches it. The CLIP logit scale stays fixed. With ``tune_image=False`` only the adapter trains and
    the image features are computed once."""
    if len(pixels) != len(texts):
        raise ValueError(f"{len(pixels)} images but {len(texts)} captions")
    model.cache_texts(texts, progress=progress)
    feats = model.llm_embeddings(texts)  # [N, D], computed once, frozen
    batch_size = min(batch_size, len(texts))
    for p in model.clip.parameters():
        p.requires_grad_(False)
    params = list(model.adapter.parameters())
    if tune_image:
        for p in model.clip.visual.parameters():
            p.requires_grad_(True)
        params += list(model.clip.visual.parameters())
    frozen_images = None
    if not tune_image:  # a frozen image tower runs once per image, not inside the loop
        with torch.no_grad():
            model.clip.eval()
            frozen_images = torch.cat([model.clip.encode_image(pixels[k:k + 64]) for k in range(0, len(pixels), 64)])
    gen = torch.Generator().manual_seed(seed)
    model.train()
    if not tune_image:
        model.clip.eval()

    def step(i: int):
        idx = torch.randperm(len(texts), generator=gen)[:batch_size]
        img = frozen_images[idx] if frozen_images is not None else model.clip.encode_image(pixels[idx])
        txt = model.adapter(feats[idx].to(model.adapter.proj.weight))
        return clip_contrastive_loss(img, txt, model.clip.logit_scale.detach()), {}

    result = fit(params, step, steps=steps, lr=lr, warmup=warmup, weight_decay=weight_decay, seed=seed,
                 progress=progress, desc="llm2clip stage 2")
    model.eval()
    return result
