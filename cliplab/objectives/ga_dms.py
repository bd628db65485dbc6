"""GA-DMS: gradient-attention guided dual masking of caption tokens, for retrieval with noisy captions.

Paper: *Gradient-Attention Guided Dual-Masking Synergetic Framework for Robust Text-based Person Retrieval*, Tianlu
Zheng, Yifan Zhang, Xiang An, Ziyong Feng, Kaicheng Yang, Qichuan Ding (arXiv 2509.09118). Code announced at
``Multimodal-Representation-Learning-MRL/GA-DMS``; no training code was readable here, so this follows the paper's
text. The paper's other half (WebPerson-5M, captions written and filtered by multimodal LLMs) is data, not
reproducible here.

What is implemented:

* :func:`gradient_attention_scores` (where it acts: the text tower's last ``layers`` blocks, on the attention output
  *before* the output projection, at the EOT position). ``c_b = cos(image_b, text_b)`` for each pair. For each
  tracked block ``l``, ``g_l = dc/do_l[EOT]`` (the gradient of the similarity w.r.t. the block's attention output at
  the pooled position), and every token ``i`` gets::

      importance_l(i) = sum_d g_l[d] * v_l[i, d] * lambda_l(i)
      lambda_l(i)     = min-max over the caption of pool_{1,2}(cos(q_l[EOT], k_l[i]))

  with ``q, k, v`` the block's full-width projections (the heads concatenated: the paper's single-head
  recomputation) and ``pool_{1,2}`` the mean of the sequence average-pooled at scales 1 and 2. The score is
  ``s = min-max(ReLU(sum_l importance_l))`` over the caption's words: SOT, EOT and padding get 0 and are never
  masked. ``importance_l(i)`` is exactly the derivative of ``c`` along ``lambda_l(i) v_l[i]`` at ``o_l[EOT]`` (the
  tests compare it with a finite difference).
* :func:`dual_mask`: **noise masking** of the contrastive caption, probability
  ``0.2 / (1 + exp(-20 ((1 - s) - 0.9)))`` (low-importance words, up to 0.2), and **informative masking** for masked
  token prediction, ``0.3 / (1 + exp(-20 (s - 0.1)))`` (high-importance words, up to 0.3), both with BERT's 80/10/10
  replacement (:func:`cliplab.train.masking.bert_mask`).
* Loss ``ga_dms`` (:class:`GADMSLoss`): ``SDM(image, noise-masked caption) + mlm_weight * MTP``. SDM is IRRA's
  similarity distribution matching (:func:`sdm_loss`; identities are the source's scene indices); MTP predicts the
  informative-masked tokens from the masked caption's token features cross-attending to the image's tokens (a
  training-only head in the loss, logits tied to the model's token embedding). ``masking="random"`` masks words
  uniformly with the same expected count per caption (the control), ``"none"`` masks nothing.
* Source ``synthetic-noisy``: the synthetic stream with noise injected into its short captions
  (:func:`inject_noise`): the colour and shape of an object that is not in the image (the notes' "description of a
  different object", the default) or words unrelated to the world.

Choices that differ from the paper, and why:

* *When scores are computed.* The paper stores each sample's scores and uses them in the next epoch. The synthetic
  stream shows every scene once, so scores are computed in the same step from the current model (an extra forward
  and backward through the text tower), with the image features detached.
* *Attention modulation.* The paper further modulates each layer's map by the EOT-to-token attention and
  normalises by the summed importance; the exact form is not recoverable from the text, so the loosened
  ``lambda`` alone weights the value contributions (Grad-ECLIP's form).
* *Mask token.* CLIP's vocabulary has no ``[MASK]``: token 49405 (``"jekyll"``, never in synthetic captions) stands
  in (``mask_id``).
* *MTP head.* One cross-attention layer (4 heads) and an MLP, not IRRA's 4-layer transformer; logits through the
  tied token embedding instead of a new vocabulary-sized layer. SDM uses the model's own learned temperature, not
  IRRA's fixed 0.02.
* *No ID loss:* the synthetic world has no person identities beyond the scene.
* The trainer's text features (of the unmasked caption) are not used: the contrastive term needs the noise-masked
  caption, which this loss encodes itself.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..methods import register_method
from ..train import BatchOutput, Loss, SyntheticStream, TrainConfig, get_preset, register_loss, register_preset
from ..train import register_source
from ..train.masking import bert_mask, sigmoid_mask_probability

__all__ = ["text_forward", "valid_word_mask", "gradient_attention_scores", "dual_mask", "sdm_loss", "GADMSLoss",
           "NOISE_WORDS", "NOISE_KINDS", "inject_noise", "NoisySyntheticStream", "ga_dms_tiny", "MASK_ID"]

register_method(
    "ga_dms",
    "Gradient-Attention Guided Dual-Masking Synergetic Framework for Robust Text-based Person Retrieval",
    "gradient-attention token importance; masks low-importance (noise) words for the contrastive loss and predicts "
    "high-importance ones from the image",
    doc="docs/methods/ga_dms.md",
)(__name__)

MASK_ID = 49405  # "jekyll": stands in for BERT's [MASK], which CLIP's vocabulary lacks
MASKINGS = ("gradient", "random", "none")


# --------------------------------------------------------------------------------------------------------------------
# The text forward with the attention outputs in the graph


def text_forward(model, ids: torch.Tensor, track: Sequence[int] = (), deltas: dict[int, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, dict[int, dict[str, torch.Tensor]]]:
    """The text tower on ``ids`` ``[B, n]`` block by block (the same function as ``model.encode_text``), keeping
    for each block in ``track`` its full-width ``q``, ``k``, ``v`` and attention output ``o`` (before the output
    projection), each ``[B, n, W]``. ``deltas[l]`` ``[B, W]`` is added to ``o_l`` at the EOT position (for
    finite differences). Returns ``(pooled [B, D], eot [B], records)``."""
    text = model.text
    eot = text.eot_index(ids)
    n = ids.shape[1]
    x = text.token_embed(ids) + text.pos_embed[:n]
    mask = text.attn_mask(n, x)
    rows = torch.arange(ids.shape[0], device=ids.device)
    records: dict[int, dict[str, torch.Tensor]] = {}
    for layer, block in enumerate(text.transformer.blocks):
        q, k, v = block.attn.split_heads(block.ln_1(x))  # [B, H, n, d]
        scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        probs = (scores if mask is None else scores + mask).softmax(-1)
        b, h, _, d = q.shape
        o = (probs @ v).transpose(1, 2).reshape(b, n, h * d)
        if deltas and layer in deltas:
            o = o.index_put((rows, eot), o[rows, eot] + deltas[layer])
        if layer in track:
            merge = lambda t: t.transpose(1, 2).reshape(b, n, h * d)  # noqa: E731
            records[layer] = {"q": merge(q), "k": merge(k), "v": merge(v), "o": o}
        x = x + block.attn.out(o)
        x = x + block.mlp(block.ln_2(x))
    x = text.ln_final(x)
    return text.proj(x[rows, eot]), eot, records


def valid_word_mask(ids: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
    """``[B, n]`` bool: the caption's word positions, ``1 .. eot - 1`` (not SOT, not EOT, not padding)."""
    pos = torch.arange(ids.shape[1], device=ids.device)
    return (pos[None] >= 1) & (pos[None] < eot[:, None])


def _minmax(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each row over its valid positions (0 elsewhere; a constant row gives 0)."""
    big = torch.finfo(x.dtype).max
    lo = x.masked_fill(~valid, big).amin(1, keepdim=True)
    hi = x.masked_fill(~valid, -big).amax(1, keepdim=True)
    out = (x - lo) / (hi - lo).clamp_min(1e-12)
    return out.masked_fill(~valid, 0.0)


def _multiscale(x: torch.Tensor, scales: Sequence[int]) -> torch.Tensor:
    """The mean over ``scales`` of ``x`` ``[B, n]`` average-pooled along the sequence (window ``s``, stride 1, the
    window starting at each position and clipped at the end)."""
    outs = []
    for s in scales:
        if s == 1:
            outs.append(x)
            continue
        padded = F.pad(x[:, None], (0, s - 1), mode="replicate")
        outs.append(F.avg_pool1d(padded, s, stride=1)[:, 0])
    return torch.stack(outs).mean(0)


def loosened_attention(q: torch.Tensor, k: torch.Tensor, eot: torch.Tensor, valid: torch.Tensor,
                       scales: Sequence[int] = (1, 2)) -> torch.Tensor:
    """``lambda`` ``[B, n]``: cosine of the EOT query with each key, multi-scale pooled, min-max normalised over
    the caption's words."""
    rows = torch.arange(q.shape[0], device=q.device)
    sim = F.cosine_similarity(q[rows, eot][:, None], k, dim=-1)
    return _minmax(_multiscale(sim, scales), valid)


def gradient_attention_scores(model, ids: torch.Tensor, image_features: torch.Tensor, layers: int = 8,
                              scales: Sequence[int] = (1, 2), per_layer: bool = False):
    """Token importance ``s`` ``[B, n]`` in ``[0, 1]`` (0 on SOT, EOT and padding) from the last ``layers`` text
    blocks (all of them when the tower has fewer); see the module docstring. ``image_features`` ``[B, D]`` are the
    paired images' features (treated as constants). With ``per_layer``, also returns ``{layer: importance_l}``
    before the ReLU and the normalisation."""
    depth = len(model.text.transformer.blocks)
    track = list(range(max(0, depth - layers), depth))
    with torch.enable_grad():
        pooled, eot, rec = text_forward(model, ids, track)
        c = F.cosine_similarity(pooled.float(), image_features.detach().float().to(pooled.device), dim=-1)
        grads = torch.autograd.grad(c.sum(), [rec[layer]["o"] for layer in track])
    valid = valid_word_mask(ids, eot)
    rows = torch.arange(ids.shape[0], device=ids.device)
    per: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        total = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
        for layer, g in zip(track, grads):
            r = rec[layer]
            lam = loosened_attention(r["q"].detach(), r["k"].detach(), eot, valid, scales)
            imp = (r["v"].detach() * g[rows, eot][:, None]).sum(-1) * lam
            per[layer] = imp
            total += imp.float()
        scores = _minmax(total.clamp_min(0).masked_fill(~valid, 0.0), valid)
    return (scores, per) if per_layer else scores


# --------------------------------------------------------------------------------------------------------------------
# Dual masking and the losses


def dual_mask(ids: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor, generator: torch.Generator | None = None,
              *, masking: str = "gradient", mask_id: int = MASK_ID, vocab_size: int = 49408,
              noise_max: float = 0.2, noise_k: float = 20.0, noise_threshold: float = 0.9, info_max: float = 0.3,
              info_k: float = 20.0, info_threshold: float = 0.1, random_ids: torch.Tensor | None = None):
    """``(noise_ids, info_ids, info_chosen, noise_prob, info_prob)``: the caption with low-importance words masked
    (for the contrastive loss) and with high-importance words masked (for token prediction; ``info_chosen`` marks
    the positions to predict). ``masking="random"`` gives every word of a caption the caption's mean probability
    (the same expected count), ``"none"`` masks nothing."""
    if masking not in MASKINGS:
        raise ValueError(f"masking must be one of {MASKINGS}, got {masking!r}")
    noise_p = sigmoid_mask_probability(1.0 - scores, noise_max, noise_k, noise_threshold).masked_fill(~valid, 0.0)
    info_p = sigmoid_mask_probability(scores, info_max, info_k, info_threshold).masked_fill(~valid, 0.0)
    if masking != "gradient":
        count = valid.sum(1, keepdim=True).clamp_min(1)
        uniform = lambda p: (p.sum(1, keepdim=True) / count).expand_as(p).masked_fill(~valid, 0.0)  # noqa: E731
        noise_p, info_p = uniform(noise_p), uniform(info_p)
        if masking == "none":
            noise_p, info_p = torch.zeros_like(noise_p), torch.zeros_like(info_p)
    noise_ids, _ = bert_mask(ids, noise_p, valid, mask_id, vocab_size, generator, random_ids=random_ids)
    info_ids, chosen = bert_mask(ids, info_p, valid, mask_id, vocab_size, generator, random_ids=random_ids)
    return noise_ids, info_ids, chosen, noise_p, info_p


def sdm_loss(image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor | float,
             identities: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """IRRA's similarity distribution matching: ``KL(softmax(scale * cos) || q)`` in both directions, ``q`` the
    row-normalised same-identity matrix. Features are L2-normalised here."""
    img, txt = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
    logits = scale * img @ txt.t()
    same = (identities[:, None] == identities[None, :]).to(logits.dtype)
    target = same / same.sum(1, keepdim=True)
    i2t = F.softmax(logits, 1) * (F.log_softmax(logits, 1) - torch.log(target + eps))
    t2i = F.softmax(logits.t(), 1) * (F.log_softmax(logits.t(), 1) - torch.log(target.t() + eps))
    return i2t.sum(1).mean() + t2i.sum(1).mean()


class TokenPredictionHead(nn.Module):
    """Masked token prediction: caption token features (joint space) cross-attend to the image's tokens, then an
    MLP, then logits against the model's token embedding (tied)."""

    def __init__(self, embed_dim: int, text_width: int, heads: int = 4):
        super().__init__()
        self.cross = nn.MultiheadAttention(embed_dim, heads, batch_first=True)
        self.ln_q, self.ln_kv, self.ln_out = nn.LayerNorm(embed_dim), nn.LayerNorm(embed_dim), nn.LayerNorm(text_width)
        self.mlp = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, text_width))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, text_tokens: torch.Tensor, image_tokens: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        kv = self.ln_kv(image_tokens)
        h = text_tokens + self.cross(self.ln_q(text_tokens), kv, kv, need_weights=False)[0]
        return self.ln_out(self.mlp(h)) @ embedding.t() + self.bias


@register_loss("ga_dms")
class GADMSLoss(Loss):
    """GA-DMS's objective (see the module docstring); options reach it from ``loss_kwargs``."""

    def __init__(self, layers: int = 8, masking: str = "gradient", mlm_weight: float = 1.0, noise_max: float = 0.2,
                 noise_k: float = 20.0, noise_threshold: float = 0.9, info_max: float = 0.3, info_k: float = 20.0,
                 info_threshold: float = 0.1, mask_id: int = MASK_ID, heads: int = 4, seed: int = 0):
        super().__init__()
        if masking not in MASKINGS:
            raise ValueError(f"masking must be one of {MASKINGS}, got {masking!r}")
        if mlm_weight < 0 or layers < 1:
            raise ValueError("mlm_weight must be >= 0 and layers >= 1")
        self.layers, self.masking, self.mlm_weight = int(layers), masking, float(mlm_weight)
        self.noise_max, self.noise_k, self.noise_threshold = float(noise_max), float(noise_k), float(noise_threshold)
        self.info_max, self.info_k, self.info_threshold = float(info_max), float(info_k), float(info_threshold)
        self.mask_id, self.heads, self.seed = int(mask_id), int(heads), int(seed)
        self._model: list[nn.Module] = []  # a plain list: the model's parameters must not register in the loss

    def attach(self, model: nn.Module) -> None:
        self._model = [model]
        if self.mlm_weight:
            self.head = TokenPredictionHead(model.config.embed_dim, model.config.text.width, self.heads)

    @property
    def model(self) -> nn.Module:
        if not self._model:
            raise RuntimeError("GADMSLoss.attach(model) must be called first (the trainer does)")
        return self._model[0]

    def masks(self, ids: torch.Tensor, image_features: torch.Tensor, step: int):
        """Scores and both masked captions of a batch (see :func:`dual_mask`)."""
        model = self.model
        eot = model.text.eot_index(ids)
        valid = valid_word_mask(ids, eot)
        if self.masking == "none":
            scores = torch.zeros(ids.shape)
        else:  # the random control computes them too: the same compute, and its per-caption masking budget
            scores = gradient_attention_scores(model, ids, image_features, self.layers)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(step))
        return scores, dual_mask(ids, scores, valid, g, masking=self.masking, mask_id=self.mask_id,
                                 vocab_size=model.config.text.vocab_size, noise_max=self.noise_max,
                                 noise_k=self.noise_k, noise_threshold=self.noise_threshold, info_max=self.info_max,
                                 info_k=self.info_k, info_threshold=self.info_threshold)

    def forward(self, out: BatchOutput) -> tuple[torch.Tensor, dict[str, float]]:
        model, batch = self.model, out.batch
        ids = batch.ids
        scores, (noise_ids, info_ids, chosen, noise_p, _) = self.masks(ids, out.image_features, batch.step)
        txt = F.normalize(model.encode_text(noise_ids).float(), dim=-1)
        identities = torch.as_tensor(batch.indices)
        sdm = sdm_loss(out.image_features, txt, out.scale, identities)
        loss = sdm
        logs = {"sdm": sdm.item(), "noise_masked": float((noise_ids != ids).float().sum() / len(ids))}
        if self.mlm_weight and bool(chosen.any()):
            text_tokens = model.encode_text(info_ids, output="tokens").tokens.float()
            image_tokens = model.encode_image(batch.pixels, output="tokens").tokens.float()
            n = text_tokens.shape[1]
            logits = self.head(text_tokens[chosen[:, :n]][:, None], image_tokens[chosen[:, :n].nonzero()[:, 0]],
                               model.text.token_embed.weight)[:, 0]
            mtp = F.cross_entropy(logits.float(), ids[:, :n][chosen[:, :n]])
            loss = loss + self.mlm_weight * mtp
            logs.update(mtp=mtp.item(), mtp_acc=float((logits.argmax(-1) == ids[:, :n][chosen[:, :n]]).float().mean()))
        return loss, logs

    def extra_repr(self) -> str:
        return f"layers={self.layers}, masking={self.masking!r}, mlm_weight={self.mlm_weight}"


# --------------------------------------------------------------------------------------------------------------------
# Noisy captions


#: Words that never occur in the synthetic world's captions, each one CLIP token.
NOISE_WORDS = ("apple guitar cloud happy river window coffee music yesterday bicycle forest camera pizza ocean dance "
               "winter doctor garden money train pencil mountain soup kitten piano rocket jacket candle ladder "
               "bottle").split()
NOISE_KINDS = ("words", "objects")


def inject_noise(caption: str, rng: np.random.Generator, count: int = 1, kind: str = "objects",
                 scene=None) -> tuple[str, list[int]]:
    """``caption`` with ``count`` pieces of noise inserted at random word boundaries (after the first word); returns
    the new caption and the positions (0-based words of the new caption) of the inserted words.

    ``kind="objects"``: each piece is a colour and a shape word of an object that is not there (with ``scene``, a
    colour and a shape none of its objects has), a description of a different object. ``kind="words"``: each piece
    is one word unrelated to the world (:data:`NOISE_WORDS`)."""
    if kind not in NOISE_KINDS:
        raise ValueError(f"kind must be one of {NOISE_KINDS}, got {kind!r}")
    from ..data.synthetic.vocabulary import COLOURS, SHAPES

    out = caption.split()
    inserted: list[int] = []
    for _ in range(count):
        if kind == "words":
            piece = [str(NOISE_WORDS[int(rng.integers(len(NOISE_WORDS)))])]
        else:
            colours = [c for c in COLOURS if scene is None or c not in {o.colour for o in scene.objects}]
            shapes = [x for x in SHAPES if scene is None or x not in {o.shape for o in scene.objects}]
            piece = [str(colours[int(rng.integers(len(colours)))]), str(shapes[int(rng.integers(len(shapes)))])]
        pos = int(rng.integers(1, len(out) + 1))
        out[pos:pos] = piece
        inserted = [p + len(piece) if p >= pos else p for p in inserted] + list(range(pos, pos + len(piece)))
    return " ".join(out), sorted(inserted)


@register_source("synthetic-noisy")
class NoisySyntheticStream(SyntheticStream):
    """The ``synthetic`` source with noise injected into every short caption (:func:`inject_noise`: ``noise_count``
    pieces of kind ``noise``, by default one absent object's colour and shape); long captions are left as they are.
    The injection is a pure function of ``(noise_seed, scene index)``."""

    def __init__(self, preprocessor, noise_count: int = 1, noise: str = "objects", noise_seed: int = 0, **options):
        super().__init__(preprocessor, **options)
        if noise not in NOISE_KINDS:
            raise ValueError(f"noise must be one of {NOISE_KINDS}, got {noise!r}")
        self.noise_count, self.noise, self.noise_seed = int(noise_count), noise, int(noise_seed)

    def captions(self, indices: Sequence[int]) -> tuple[list[str], list[str | None]]:
        short, long = super().captions(indices)
        scenes = self._scenes(indices)
        noisy = [inject_noise(c, np.random.default_rng([self.noise_seed, self.offset + int(i)]), self.noise_count,
                              self.noise, scene)[0] for c, i, scene in zip(short, indices, scenes)]
        return noisy, long


@register_preset("ga_dms-tiny")
def ga_dms_tiny() -> TrainConfig:
    """``tiny-smoke``'s model and recipe on captions that each describe one absent object too, loss ``ga_dms``."""
    cfg = get_preset("tiny-smoke")
    return cfg.replace(loss="ga_dms", loss_kwargs={},
                       data={**cfg.data.__dict__, "source": "synthetic-noisy", "options": {"noise_count": 1, "noise": "objects"}},
                       out_dir="runs/ga_dms-tiny")
