"""LightCLIP: progressively softened negative labels, relaxed bipartite word-patch alignment, and image-fused MLM.

Paper: *LightCLIP: Learning Multi-Level Interaction for Lightweight Vision-Language Models*, Ying Nie, Wei He, Kai
Han, Yehui Tang, Tianyu Guo, Fanyi Du, Yunhe Wang (arXiv 2312.00674). No official code was found; the objective
below follows the abstract and the method notes (``../shared/methods``), and the values marked *unconfirmed* are
this module's defaults, not numbers read in the paper.

One step of loss ``lightclip`` (:class:`LightCLIPLoss`) is
``L = L_itc(soft, eps_t) + token_weight * L_tok + mlm_weight * L_mlm``:

1. **Instance level, softened labels** (:func:`softened_clip_loss`). The symmetric InfoNCE of CLIP, with the target
   row of each sample ``(1 - eps) * onehot + eps * uniform over the other N - 1 samples`` (the diagonal keeps
   ``1 - eps``: unlike ``label_smoothing``, no mass goes back to the positive). ``eps`` rises from 0 at step 0 to
   ``eps_max`` at ``total_steps`` (:func:`softening_epsilon`; linear by default, *unconfirmed*; ``eps_max`` 0.1,
   *unconfirmed*). With ``eps = 0`` the hard-label ``F.cross_entropy`` of :class:`cliplab.train.CLIPLoss` runs, so
   the loss is CLIP's bit for bit.
2. **Token level, relaxed bipartite matching** (:func:`token_alignment_loss`, matching in
   :mod:`cliplab.train.matching`). Words are the caption's tokens between SOT and EOT (special tokens and padding
   out); patches are the image tokens after the class token. Both are the towers' per-token outputs **after the final
   LayerNorm and after the projection** (the joint space), L2-normalised. Each word takes its most similar patch
   (patches may be reused; ``matching="hungarian"`` is the strict one-to-one assignment); the image-text score is the
   mean matched cosine, and ``L_tok`` is the symmetric InfoNCE over the batch on those scores, at the model's logit
   scale.
3. **MLM with image fusion** (:class:`ImageFusion`, :func:`mlm_positions`). A share ``mask_prob`` (0.15, BERT's) of
   each caption's words (at least one) is replaced by a learned ``[MASK]`` embedding; after each text block listed
   in ``fusion_layers`` (default: every block) a fusion block adds cross-attention from the masked text's residual
   stream to the **unmasked** image's tokens (joint space, CLS included); a head on the text tower's per-token output
   (``Linear -> GELU -> LayerNorm``, decoder tied to the token embedding) predicts the masked ids.
   The fusion blocks, the mask embedding and the MLM head belong to the loss, not the model: the saved model has the
   same parameters (and inference cost) as without them.

Choices that differ from the paper, and why:

* *Causal text tower.* cliplab's CLIP text tower is causal; the MLM forward keeps that mask, so a masked word is
  predicted from the words before it, itself masked, and the image. The paper does not say how its shortened text
  encoder is masked for MLM; removing the causal mask would train the tower in a regime that the contrastive path
  never uses.
* *No 80/10/10 corruption.* Every chosen position gets ``[MASK]`` (a learned vector; the CLIP vocabulary has none).
* *Token features.* Per-token joint-space outputs (the same head as the pooled feature), as FILIP-style token losses
  use them; the paper's exact feature site for the token loss is not confirmed here.
* *Extra forwards.* The trainer encodes the batch once for every loss; with a token or MLM term on, this loss runs
  its own token-level forwards (image and caption, fp32, outside the trainer's autocast) and the masked-caption
  forward, and computes ``L_itc`` from its own pooled outputs (the same function as the trainer's). With both terms at
  weight 0 it uses the trainer's features and adds no forward.
* *Weights.* ``token_weight`` 1 and ``mlm_weight`` 1 (*unconfirmed*).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..methods import register_method
from ..models.hooks import Hooks
from ..train import BatchOutput, Loss, TrainConfig, get_preset, register_loss, register_preset
from ..train.matching import MATCHINGS, token_match_scores

__all__ = ["SCHEDULES", "softening_epsilon", "soft_targets", "softened_clip_loss", "word_mask", "mlm_positions",
           "token_alignment_loss", "ImageFusion", "LightCLIPLoss", "lightclip_tiny", "word_patch_pointing"]

register_method(
    "lightclip",
    "LightCLIP: Learning Multi-Level Interaction for Lightweight Vision-Language Models",
    "CLIP's loss with progressively softened negative labels, a relaxed bipartite word-patch alignment loss, and "
    "masked language modelling through an image-fusion module that is dropped at inference",
    doc="docs/methods/lightclip.md",
)(__name__)

SCHEDULES = ("linear", "cosine", "constant")


# --- instance level ------------------------------------------------------------------------------------------------
def softening_epsilon(step: int, total_steps: int, eps_max: float, schedule: str = "linear") -> float:
    """The negatives' share ``eps`` at ``step``: 0 at step 0, ``eps_max`` from ``total_steps`` on (``linear`` or a
    half-cosine ``cosine`` ramp in between); ``constant`` or ``total_steps <= 0`` gives ``eps_max`` throughout."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not 0.0 <= eps_max < 1.0:
        raise ValueError(f"eps_max must be in [0, 1), got {eps_max}")
    if schedule == "constant" or total_steps <= 0:
        return float(eps_max)
    t = min(max(step, 0) / total_steps, 1.0)
    ramp = t if schedule == "linear" else (1.0 - math.cos(math.pi * t)) / 2
    return float(eps_max * ramp)


def soft_targets(n: int, eps: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """``[n, n]`` targets: ``1 - eps`` on the diagonal, ``eps / (n - 1)`` elsewhere (one-hot for ``n == 1``)."""
    if n == 1:
        return torch.ones(1, 1, device=device, dtype=dtype)
    off = torch.full((n, n), eps / (n - 1), device=device, dtype=dtype)
    return off.fill_diagonal_(1.0 - eps)


def softened_clip_loss(logits: torch.Tensor, eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, loss_i2t, loss_t2i)``: the symmetric InfoNCE on ``logits`` ``[B, B]`` (images x texts, positives on
    the diagonal) against :func:`soft_targets`; ``eps == 0`` is CLIP's hard-label loss, computed as CLIP computes it."""
    n = logits.shape[0]
    if logits.shape != (n, n):
        raise ValueError(f"logits must be square [B, B], got {tuple(logits.shape)}")
    if eps == 0.0:
        target = torch.arange(n, device=logits.device)
    else:
        target = soft_targets(n, eps, logits.device, logits.dtype)  # symmetric, so it serves both directions
    loss_i2t = F.cross_entropy(logits, target)
    loss_t2i = F.cross_entropy(logits.t(), target)
    return (loss_i2t + loss_t2i) / 2, loss_i2t, loss_t2i


# --- token level -----------------------------------------------------------------------------------------------------
def word_mask(ids: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` bool: the caption's word tokens, i.e. positions after SOT (0) and before EOT (``eot``)."""
    pos = torch.arange(ids.shape[1], device=ids.device)
    return (pos >= 1) & (pos < eot.to(ids.device).unsqueeze(1))


def token_alignment_loss(patches: torch.Tensor, words: torch.Tensor, words_mask: torch.Tensor, scale: torch.Tensor,
                         matching: str = "relaxed") -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, scores)``: the symmetric InfoNCE over ``scale * scores``, where ``scores`` ``[B, B]`` are
    :func:`cliplab.train.matching.token_match_scores` of the L2-normalised ``patches`` ``[B, P, D]`` and ``words``
    ``[B, L, D]`` (``words_mask`` picks the real words)."""
    scores = token_match_scores(F.normalize(patches, dim=-1), F.normalize(words, dim=-1), words_mask, mode=matching)
    loss, _, _ = softened_clip_loss(scale * scores, 0.0)
    return loss, scores


@torch.no_grad()
def word_patch_pointing(model, images, captions, object_masks) -> tuple[float, float]:
    """``(hits, chance)``: the share of caption words whose most similar patch (cosine of the towers' joint-space
    token outputs) touches the object, and the mean share of patches touching it (what a random patch scores).
    ``object_masks``: one ``[S, S]`` array per image (nonzero on the object), ``S`` the image size."""
    model.eval()
    out = model.encode_image(model.preprocessor.batch(list(images)), output="tokens")
    patches = F.normalize(out.tokens[:, model.visual.n_prefix:].float(), dim=-1)
    tok = model.tokenize(list(captions))
    txt = model.encode_text(tok, output="tokens")
    words = F.normalize(txt.tokens.float(), dim=-1)
    ids = tok.ids[:, : words.shape[1]]
    mask = word_mask(ids, model.text.eot_index(ids))
    grid = model.config.vision.image_size // model.config.vision.patch_size
    hits, chance = [], []
    for b, obj in enumerate(object_masks):
        obj = torch.tensor(obj, dtype=torch.float32)[None, None]  # a copy: scene masks are read-only
        touches = F.adaptive_avg_pool2d(obj, grid).flatten() > 0
        best = (words[b, mask[b]] @ patches[b].T).argmax(-1)
        hits += touches[best].tolist()
        chance.append(touches.float().mean().item())
    return sum(hits) / len(hits), sum(chance) / len(chance)


# --- MLM with image fusion ------------------------------------------------------------------------------------------
def mlm_positions(words_mask: torch.Tensor, prob: float, generator: torch.Generator) -> torch.Tensor:
    """``[B, L]`` bool: each word is masked with probability ``prob``; a caption with no word drawn gets its
    highest-drawn word masked, so every caption has at least one target."""
    if not 0.0 < prob <= 1.0:
        raise ValueError(f"mask_prob must be in (0, 1], got {prob}")
    u = torch.rand(words_mask.shape, generator=generator).to(words_mask.device)
    u = u.masked_fill(~words_mask, 2.0)  # non-words never drawn
    chosen = (u < prob) & words_mask
    first = u.argmin(dim=1)  # the word with the smallest draw
    rows = torch.arange(words_mask.shape[0], device=words_mask.device)
    chosen[rows, first] |= words_mask[rows, first]
    return chosen


class ImageFusion(nn.Module):
    """One fusion stage: ``x + CrossAttention(LayerNorm(x), image_tokens)`` on the text residual stream (width
    ``text_width``), keys and values from the image's joint-space tokens (``image_dim``)."""

    def __init__(self, text_width: int, image_dim: int, heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(text_width)
        self.attn = nn.MultiheadAttention(text_width, heads, kdim=image_dim, vdim=image_dim, batch_first=True)

    def forward(self, x: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        y, _ = self.attn(self.norm(x), image_tokens, image_tokens, need_weights=False)
        return x + y


class _FusionHooks(Hooks):
    """Adds the fusion stages after the listed text blocks (``resid`` site); no effect on the image tower."""

    def __init__(self, stages: dict[int, ImageFusion], image_tokens: torch.Tensor):
        self.stages, self.image_tokens = stages, image_tokens

    def resid(self, tower: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        stage = self.stages.get(layer) if tower == "text" else None
        return x if stage is None else stage(x, self.image_tokens.to(x.dtype))


# --- the trainer loss ------------------------------------------------------------------------------------------------
@register_loss("lightclip")
class LightCLIPLoss(Loss):
    """LightCLIP's objective (see the module docstring). Options reach it from ``loss_kwargs`` (``cliplab train
    --set loss_kwargs.eps_max=0.2``). ``fusion_layers``: text block indices after which the image is fused (``None``:
    all); ``fusion_heads``: heads of each fusion attention (``None``: the text tower's)."""

    def __init__(self, eps_max: float = 0.1, schedule: str = "linear", total_steps: int = 0,
                 token_weight: float = 1.0, matching: str = "relaxed", mlm_weight: float = 1.0,
                 mask_prob: float = 0.15, fusion_layers: list[int] | None = None, fusion_heads: int | None = None,
                 seed: int = 0):
        super().__init__()
        softening_epsilon(0, 0, eps_max, schedule)  # validates eps_max and schedule
        if matching not in MATCHINGS:
            raise ValueError(f"matching must be one of {MATCHINGS}, got {matching!r}")
        if min(token_weight, mlm_weight) < 0:
            raise ValueError(f"loss weights must be >= 0, got token_weight={token_weight}, mlm_weight={mlm_weight}")
        if not 0.0 < mask_prob <= 1.0:
            raise ValueError(f"mask_prob must be in (0, 1], got {mask_prob}")
        self.eps_max, self.schedule, self.total_steps = float(eps_max), schedule, int(total_steps)
        self.token_weight, self.matching, self.mlm_weight = float(token_weight), matching, float(mlm_weight)
        self.mask_prob, self.seed = float(mask_prob), int(seed)
        self.fusion_layers = None if fusion_layers is None else [int(i) for i in fusion_layers]
        self.fusion_heads = None if fusion_heads is None else int(fusion_heads)
        self._model: list[nn.Module] = []  # a plain list: the model's parameters must not register in the loss

    def attach(self, model: nn.Module) -> None:
        self._model = [model]
        if not self.mlm_weight:
            return
        text = model.text
        width, layers = text.cfg.width, text.cfg.layers
        chosen = list(range(layers)) if self.fusion_layers is None else self.fusion_layers
        bad = [i for i in chosen if not 0 <= i < layers]
        if bad:
            raise ValueError(f"fusion_layers {bad} out of range: the text tower has blocks 0..{layers - 1}")
        heads = self.fusion_heads or text.cfg.heads
        self.fusion = nn.ModuleDict({str(i): ImageFusion(width, model.config.embed_dim, heads) for i in chosen})
        self.mask_embed = nn.Parameter(torch.randn(width) * 0.02)
        self.mlm_head = nn.Sequential(nn.Linear(model.config.embed_dim, width), nn.GELU(), nn.LayerNorm(width))
        self.mlm_bias = nn.Parameter(torch.zeros(text.cfg.vocab_size))

    @property
    def model(self) -> nn.Module:
        if not self._model:
            raise RuntimeError("LightCLIPLoss.attach(model) must be called first (the trainer does)")
        return self._model[0]

    def epsilon(self, step: int) -> float:
        return softening_epsilon(step, self.total_steps, self.eps_max, self.schedule)

    def generator(self, step: int) -> torch.Generator:
        """The MLM masks' randomness: a pure function of (seed, step), so resumed runs agree."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + int(step))

    def mlm_loss(self, ids: torch.Tensor, eot: torch.Tensor, words_mask: torch.Tensor, image_tokens: torch.Tensor,
                 step: int) -> tuple[torch.Tensor, float]:
        """Cross-entropy of the masked words' ids given the masked caption fused with the image; and its accuracy."""
        model = self.model
        masked = mlm_positions(words_mask, self.mask_prob, self.generator(step))
        embeds = model.text.token_embed(ids)
        embeds = torch.where(masked.unsqueeze(-1), self.mask_embed.to(embeds.dtype), embeds)
        stages = {int(k): v for k, v in self.fusion.items()}
        out = model.encode_text(inputs_embeds=embeds, eot_index=eot, output="tokens",
                                hooks=_FusionHooks(stages, image_tokens))
        hidden = self.mlm_head(out.tokens[masked])
        logits = hidden @ model.text.token_embed.weight.t() + self.mlm_bias
        target = ids[masked]
        loss = F.cross_entropy(logits.float(), target)
        return loss, (logits.argmax(-1) == target).float().mean().item()

    def forward(self, out: BatchOutput) -> tuple[torch.Tensor, dict[str, float]]:
        step = int(getattr(out.batch, "step", 0)) if out.batch is not None else 0
        eps = self.epsilon(step)
        if not (self.token_weight or self.mlm_weight):  # CLIP's features and arithmetic, softened targets only
            itc, i2t, t2i = softened_clip_loss(out.logits(), eps)
            return itc, {"itc": itc.item(), "loss_i2t": i2t.item(), "loss_t2i": t2i.item(), "eps": eps}
        model, batch = self.model, out.batch
        ids = batch.ids.to(model.device)
        eot = model.text.eot_index(ids)
        ids = ids[:, : int(eot.max()) + 1]  # causal tower: nothing after the last EOT matters
        img = model.encode_image(batch.pixels, output="tokens")
        txt = model.encode_text(ids, output="tokens")
        scale = out.scale
        logits = scale * (F.normalize(img.pooled.float(), dim=-1) @ F.normalize(txt.pooled.float(), dim=-1).t())
        itc, i2t, t2i = softened_clip_loss(logits, eps)
        loss = itc
        logs = {"itc": itc.item(), "loss_i2t": i2t.item(), "loss_t2i": t2i.item(), "eps": eps}
        words = word_mask(ids, eot)
        if self.token_weight:
            patches = img.tokens[:, model.visual.n_prefix:].float()
            tok, _ = token_alignment_loss(patches, txt.tokens.float(), words, scale, self.matching)
            loss = loss + self.token_weight * tok
            logs["tok"] = tok.item()
        if self.mlm_weight:
            mlm, acc = self.mlm_loss(ids, eot, words, img.tokens.float(), step)
            loss = loss + self.mlm_weight * mlm
            logs.update(mlm=mlm.item(), mlm_acc=acc)
        return loss, logs

    def extra_repr(self) -> str:
        return (f"eps_max={self.eps_max}, schedule={self.schedule!r}, total_steps={self.total_steps}, "
                f"token_weight={self.token_weight}, matching={self.matching!r}, mlm_weight={self.mlm_weight}, "
                f"mask_prob={self.mask_prob}")


@register_preset("lightclip-tiny")
def lightclip_tiny() -> TrainConfig:
    """``tiny-smoke``'s recipe with the ``lightclip`` loss; the softening ramp spans the preset's steps (set
    ``loss_kwargs.total_steps`` too when changing ``steps``)."""
    cfg = get_preset("tiny-smoke")
    return cfg.replace(loss="lightclip", loss_kwargs={"total_steps": cfg.steps}, out_dir="runs/lightclip-tiny")
