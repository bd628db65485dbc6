"""CLIP4DM: dense (word-level) image-text misalignment from CLIP's text-encoder attributions, and F-CLIPScore.

Paper: *Extract Free Dense Misalignment from CLIP*, JeongYeon Nam, Jinbae Im, Wonjae Kim, Taeho Kil (NAVER),
AAAI 2025, arXiv:2412.18404; official code naver-ai/CLIP4DM (``src/clip4dm.py``, ``main.py``, ``src/utils.py``).

Algorithm (training-free; one forward and one backward pass per batch):

1. Prompt: ``template + caption`` with ``template = "A photo depicts "`` (the CLIPScore prompt).
2. Target: the cosine ``cos(image, text)`` of the pair (the official code's ``logits_per_text / logit_scale``).
3. For each of the last ``-start_layer`` = 3 text blocks: attention ``A [B, H, n, n]``, ``G = d cos / d A`` (autograd
   through the attention probabilities), ``cam = mean_heads(G * A)`` with **no clamping** (the paper's "revamp" of
   Chefer et al., whose clamp to >= 0 erases exactly the negative evidence that marks a misaligned word).
   ``R = sum_layers cam / n_layers`` starting from zeros (no identity, no rollout product).
4. Token scores: the EOT row of ``R``, columns ``1 .. EOT-1`` (SOT and EOT excluded).
5. Word scores: tokens averaged within each whitespace word (:func:`cliplab.tokens.word_scores`); the template's
   words are dropped, and punctuation is dropped.
6. Decision: ``"threshold"`` (HAT, SeeTRUE, Rich-HF): misaligned words are those with score ``< eps = -5e-5``;
   ``"most_negative"`` (FOIL, nocaps-FOIL): the single lowest-scoring word.
7. ``CLIPScore = 2.5 * max(cos, 0)``; ``sum_neg`` = the sum of the flagged scores (0 when none is flagged) in threshold
   mode, the lowest word score in most-negative mode; ``F-CLIPScore = sum_neg * (1 - CLIPScore / 2.5)``, exactly as
   ``main.py`` computes it (``sum_negative_attribution * (1 - pair_score / 2.5)``).

Evaluation: the task ``fclipscore`` (``cliplab.eval.evaluate("fclipscore", model, dataset)``, any captions dataset)
reports CLIPScore, F-CLIPScore and the misaligned words of every (image, caption) pair (:func:`fclipscore_task`).

Sign conventions (checked against ``main.py``): a word's attribution is *negative* when attending to it lowers the
image-text cosine, i.e. the word is evidence *against* the image. ``sum_neg`` is therefore <= eps < 0 in threshold
mode (or exactly 0: nothing flagged), and usually negative in most-negative mode (it may be positive when every word
supports the image). F-CLIPScore is an *alignment* score: higher (closer to 0 or positive) = better aligned, lower =
more misaligned. ``main.py`` ranks originals above foils with it (``AP(is_orig, F-CLIPScore)`` for FOIL,
``AP(is_foil, -F-CLIPScore)`` for HAT/Rich-HF), the same orientation as CLIPScore. A well-aligned pair (cos -> 1)
pulls F-CLIPScore towards 0 whatever the attributions; a pair with cos <= 0 keeps the full ``sum_neg``.

Choices (where this module and the official code differ, and why):

* **Punctuation.** The official code splits words on spaces and also splits off ``.`` and ``,`` as words of their own
  (``space_tokenize``); it drops punctuation-only words in threshold mode but keeps them in most-negative mode (where
  a ``.`` can then be "the foil word"). Here words are whitespace words (``word_scores``), every punctuation-only BPE
  token (no letter or digit in its span) is left out of its word's average, and words made only of punctuation are
  dropped in both modes (the method notes; a punctuation mark is never a misaligned word). So ``"dog."`` scores as
  ``"dog"`` as in the official code, and ``"cat-dog"`` averages ``cat`` and ``dog`` (the official code would also
  average the ``-`` in). Word labels lose punctuation at their ends (``"square."`` -> ``"square"``).
* **Layers.** ``start_layer`` is a Python slice start into the blocks (``-3``: the last three, the official default).
  The official code uses *all* blocks when ``start_layer_text >= 0``; here ``start_layer=0`` means all blocks too,
  and any other non-negative value starts at that block.
* **Precision and batching.** The official code runs one pair at a time in float16; here any batch of (image,
  caption) rows runs at once in the model's dtype (rows of the text tower are independent, so the gradient of the
  summed cosines gives each row its own ``G`` exactly).
* **Template.** A trailing space is added to a template that lacks one (as CLIPScore's code does).
* ``clamp=True`` gives the clamped Chefer-style variant (``mean_heads(max(G * A, 0))``, still no rollout) for
  comparison; it can never produce a negative score.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from ..eval.metrics import clip_score as _clip_score_features
from ..eval.tasks import register_task
from ..methods import register_method
from ..models.hooks import TowerOutput
from ..models.tokenizer import TokenizedBatch
from ..tokens import word_scores
from .clipscore import CLIPSCORE_W, TEMPLATE, prepare_images, with_template  # re-exported: shared with CLIPScore

register_method("clip4dm", "Extract Free Dense Misalignment from CLIP",
                "word-level misalignment from grad x attention on the text encoder (no clamp) + F-CLIPScore",
                doc="docs/methods/clip4dm.md")(__name__)

__all__ = ["TEMPLATE", "EPSILON", "CLIPSCORE_W", "TextAttribution", "Misalignment", "text_attribution",
           "caption_word_scores", "detect_misalignment", "f_clip_score", "prepare_images", "fclipscore_task"]

EPSILON = -5e-5
_ALNUM = re.compile(r"[^\W_]", re.UNICODE)  # a letter or digit


@dataclass
class TextAttribution:
    """Gradient x attention relevance of a batch of (image, text) rows.

    * ``relevance`` ``[B, n, n]``: ``R`` averaged over the selected layers;
    * ``token_scores`` ``[B, n]``: the EOT row of ``R`` at columns ``1 .. EOT-1``, zero elsewhere (SOT, EOT, padding);
    * ``cosine`` ``[B]``: the image-text cosine that was differentiated;
    * ``layers``: the block indices used; ``batch``: the tokenized texts; ``eot_index`` ``[B]``;
    * ``image_features`` / ``text_features`` ``[B, D]`` (detached, unnormalised).
    """

    relevance: torch.Tensor
    token_scores: torch.Tensor
    cosine: torch.Tensor
    layers: list[int]
    batch: TokenizedBatch | None
    eot_index: torch.Tensor
    image_features: torch.Tensor
    text_features: torch.Tensor


@dataclass
class Misalignment:
    """CLIP4DM's answer for one (image, caption) pair.

    ``words``: ``(word, score)`` for every caption word (template and punctuation dropped), in caption order;
    ``flagged``: ``(word_index, word, score)`` of the misaligned words, lowest score first (threshold mode: every
    word below ``eps``; most-negative mode: the single lowest word); ``negative_word``: the lowest flagged word ("" if
    none); ``sum_negative``: see the module docstring; ``cosine``, ``clip_score`` (``2.5 max(cos, 0)``) and
    ``f_clip_score`` (``sum_negative * (1 - clip_score / 2.5)``).
    """

    caption: str
    words: list[tuple[str, float]]
    flagged: list[tuple[int, str, float]]
    negative_word: str
    sum_negative: float
    cosine: float
    clip_score: float
    f_clip_score: float
    mode: str = "threshold"
    token_scores: torch.Tensor | None = field(default=None, repr=False)


def text_attribution(model, images, texts: Sequence[str] | TokenizedBatch | torch.Tensor, *, start_layer: int = -3,
                     clamp: bool = False, image_features: torch.Tensor | None = None) -> TextAttribution:
    """Gradient x attention relevance of each text row for its image (row-aligned; one image is shared by all rows).

    ``texts`` are used as given (no template here; :func:`detect_misalignment` adds it). ``images`` may be None when
    ``image_features`` ``[B or 1, D]`` are passed. ``clamp=True``: the Chefer-style clamped variant (see module doc).
    """
    batch = None
    if isinstance(texts, TokenizedBatch):
        batch = texts
    elif not isinstance(texts, torch.Tensor):
        batch = model.tokenize(list(texts))
    tokens = batch if batch is not None else texts
    if image_features is None:
        with torch.no_grad():
            image_features = model.encode_image(prepare_images(model, images))
    image_features = image_features.detach()
    with torch.enable_grad():
        out: TowerOutput = model.encode_text(tokens, output="attn")
        rows = out.pooled.shape[0]
        img = image_features.to(out.pooled.dtype).expand(rows, -1) if image_features.shape[0] == 1 else image_features
        if img.shape[0] != rows:
            raise ValueError(f"{img.shape[0]} images for {rows} texts (pass one image, or one per text)")
        cosine = F.cosine_similarity(out.pooled, img.to(out.pooled.dtype), dim=-1)
        n_layers = len(out.attn)
        layers = list(range(n_layers))[start_layer:]
        if not layers:
            raise ValueError(f"start_layer={start_layer} selects no block of {n_layers}")
        attn = [out.attn[i] for i in layers]
        grads = torch.autograd.grad(cosine.sum(), attn)
    relevance = torch.zeros_like(attn[0][:, 0]).detach()
    for a, g in zip(attn, grads):
        cam = g * a.detach()
        if clamp:
            cam = cam.clamp(min=0)
        relevance = relevance + cam.mean(dim=1)
    relevance = relevance / len(layers)
    eot = out.pool_index
    row_idx = torch.arange(rows, device=eot.device)
    eot_row = relevance[row_idx, eot]  # [B, n]
    cols = torch.arange(eot_row.shape[1], device=eot.device)
    keep = (cols[None, :] >= 1) & (cols[None, :] < eot[:, None])
    token_scores = torch.where(keep, eot_row, torch.zeros_like(eot_row))
    return TextAttribution(relevance, token_scores, cosine.detach(), layers, batch, eot,
                           image_features, out.pooled.detach())


def _strip_punctuation(word: str) -> str:
    """``"square."`` -> ``"square"``, ``"(cat-dog),"`` -> ``"cat-dog"``: punctuation at either end of a word."""
    return re.sub(r"^[\W_]+|[\W_]+$", "", word)


def _is_punctuation(text: str, span) -> bool:
    return _ALNUM.search(text[span[0]:span[1]]) is None


def caption_word_scores(batch: TokenizedBatch, row: int, token_scores: torch.Tensor,
                        skip_words: int = 0) -> list[tuple[str, float]]:
    """Word scores of one row: the mean of each whitespace word's non-punctuation tokens (via
    :func:`cliplab.tokens.word_scores`), dropping the first ``skip_words`` words (the template) and words with no
    letter or digit. ``token_scores`` are indexed by position (``[n]``)."""
    text = batch.texts[row]
    n = int(batch.lengths[row])
    scores = token_scores.detach().double().cpu()
    keep = torch.zeros(scores.shape[0], dtype=torch.float64)
    for p in range(1, min(n - 1, scores.shape[0])):
        keep[p] = 0.0 if _is_punctuation(text, batch.spans[row][p]) else 1.0
    # mean(s * k) / mean(k) over a word's tokens = the mean of its kept tokens (same positions in both calls)
    sums = word_scores(batch, row, scores * keep)
    fracs = word_scores(batch, row, keep)
    # the template's words come first (and have letters); drop them, then the punctuation-only words
    return [(_strip_punctuation(w), s / f) for (w, s), (_, f) in list(zip(sums, fracs))[skip_words:] if f > 0]


def f_clip_score(sum_negative, clip_score, w: float = CLIPSCORE_W):
    """F-CLIPScore = ``sum_negative * (1 - clip_score / w)`` (official ``main.py``); works on floats or tensors."""
    return sum_negative * (1 - clip_score / w)


def _decide(words: list[tuple[str, float]], mode: str, eps: float) -> tuple[list[tuple[int, str, float]], float]:
    indexed = [(i, w, s) for i, (w, s) in enumerate(words)]
    if mode == "threshold":
        flagged = sorted([t for t in indexed if t[2] < eps], key=lambda t: t[2])
        return flagged, float(sum(s for _, _, s in flagged)) if flagged else 0.0
    if mode == "most_negative":
        if not indexed:
            return [], 0.0
        low = min(indexed, key=lambda t: t[2])  # first minimum wins ties (a stable sort, like the official code)
        return [low], low[2]
    raise ValueError(f"mode must be 'threshold' or 'most_negative', got {mode!r}")


def detect_misalignment(model, images, captions: str | Sequence[str], *, mode: str = "threshold",
                        eps: float = EPSILON, template: str = TEMPLATE, start_layer: int = -3, clamp: bool = False,
                        w: float = CLIPSCORE_W) -> list[Misalignment]:
    """CLIP4DM on (image, caption) pairs: one image for every caption, or one per caption.

    ``mode``: ``"threshold"`` (words scoring below ``eps``) or ``"most_negative"`` (the lowest word). Returns one
    :class:`Misalignment` per caption.
    """
    captions = [captions] if isinstance(captions, str) else list(captions)
    texts = [with_template(template, c) for c in captions]
    skip = len(template.split())
    batch = model.tokenize(texts)
    att = text_attribution(model, images, batch, start_layer=start_layer, clamp=clamp)
    rows = len(captions)
    img = att.image_features if att.image_features.shape[0] == rows else att.image_features.expand(rows, -1)
    cs = _clip_score_features(img, att.text_features, w)
    results = []
    for r, caption in enumerate(captions):
        words = caption_word_scores(batch, r, att.token_scores[r], skip_words=skip)
        flagged, sum_neg = _decide(words, mode, eps)
        score = float(cs[r])
        results.append(Misalignment(caption, words, flagged, flagged[0][1] if flagged else "", sum_neg,
                                    float(att.cosine[r]), score, f_clip_score(sum_neg, score, w), mode,
                                    att.token_scores[r]))
    return results


@register_task("fclipscore", "captions")
def fclipscore_task(data, encoder, *, mode: str = "threshold", eps: float = EPSILON, template: str = TEMPLATE,
                    start_layer: int = -3, clamp: bool = False, w: float = CLIPSCORE_W, batch_size: int = 32,
                    max_pairs_listed: int | None = None) -> dict:
    """F-CLIPScore and the misaligned words (CLIP4DM) of every (image, caption) pair, beside CLIPScore."""
    import time

    t0 = time.perf_counter()
    model = encoder.model
    pairs = []
    for i in range(0, len(data.captions), batch_size):
        caps = data.captions[i: i + batch_size]
        images = [data.items[j].load() for j in data.caption_image[i: i + batch_size]]
        for k, r in enumerate(detect_misalignment(model, images, caps, mode=mode, eps=eps, template=template,
                                                  start_layer=start_layer, clamp=clamp, w=w)):
            pairs.append({"caption": r.caption, "image": data.caption_image[i + k], "clip_score": r.clip_score,
                          "f_clip_score": r.f_clip_score, "misaligned": [word for _, word, _ in r.flagged]})
    n = max(len(pairs), 1)
    metrics = {"clip_score": sum(p["clip_score"] for p in pairs) / n,
               "f_clip_score": sum(p["f_clip_score"] for p in pairs) / n,
               "flagged_share": sum(bool(p["misaligned"]) for p in pairs) / n, "mode": mode}
    return {"task": "fclipscore", "num_images": len(data.items), "num_texts": len(data.captions), "metrics": metrics,
            "pairs": pairs if max_pairs_listed is None else pairs[:max_pairs_listed],
            "timing": {"attribution_s": round(time.perf_counter() - t0, 3)}}
