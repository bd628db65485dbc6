"""FDP: Focus, Distinguish, and Prompt, CLIP for OCR-free scene text retrieval.

Paper: G. Zeng et al., "Focus, Distinguish, and Prompt: Unleashing CLIP for Efficient and Flexible Scene Text
Retrieval" (ACM MM 2024; official code Gyann-z/FDP: ``main.py``, ``fdp.py``, ``utils.py``). Parts:

* **Distracted queries** (:func:`distracted_candidates`, :func:`candidate_target`, :func:`distractor_loss`): for a
  query ``q`` the candidates are ``q`` and every dictionary word within Levenshtein distance 1 (``len(q) <= 5``) or 2
  (longer), sorted by distance, padded with ``"###"`` (whose distance is ``lev("###", q)``, as in the code) and cut
  to 5. The target is ``softmax(1 / (d + 0.1))`` over the 5; the loss is ``KL(target || softmax(s cos(image,
  candidate texts)))`` (batch mean). Ties in distance are broken alphabetically (the code's order is a set's).
* **Focus supervision** (:func:`shrink_box`, :func:`text_kernel`, :func:`balanced_bce`): positives are the text
  kernels shrunk PSENet/DB-style with ratio 0.4 (offset ``int(area (1 - r^2) / (perimeter + 0.001) + 0.5)``; our
  word regions are axis-aligned boxes, so the offset polygon is a box), rasterised on the patch grid (a patch is
  positive when its centre is inside a kernel); balanced BCE keeps every positive and the ``3 x positives`` hardest
  negatives inside the effective mask, averaged over their count (+1e-6).
* **Focus bias** (:class:`FocusBias`): the predicted text map ``sigmoid(map)`` is added to the attention logits of
  the class token's query over the patches in the image tower's **last** block (``[1, sigmoid(map)]``: the class key
  gets +1); the map is a linear head on the residual stream entering that block (``ln``-normalised patch rows).
  Adaptation: FDP's backbone is RN50 and the bias acts on the attention pool; on a ViT the last block's class-token
  attention plays that role. The pooled output is then CLS -> ``ln_post`` -> ``proj`` (+ the tower's max-skip).
* **Prompt** (:class:`FDP`): :func:`route_queries` splits the vocabulary by KMeans(2) on frozen CLIP text features,
  the cluster holding ``"the"`` being the function words (FDP anchors the content cluster at ``"office"``; we seed
  the second centre at the point farthest from ``"the"``); function words get CoOp prompts with 2 learned context
  vectors, content words 4 (N(0, 0.02^2), class at the end, no suffix), through the frozen text tower. The image
  feature cross-attends (8 heads) to the token features of ``"scene text"``: ``fused = global + attended``.
* **Training** (:func:`train_fdp`): ``CE_sym(fused, query prompt) + KL_candidates + balanced BCE``, Adam (0.9, 0.98,
  eps 1e-6, weight decay 1e-3), lr 2e-3 for prompts, cross-attention and focus head, 1e-4 for the image parts,
  x0.1 at half of the steps. Trainable image parts (FDP: ``new_positional_embedding``, ``new_v_proj``,
  ``new_c_proj``, the attention pool's own weights): the last block's attention (q/k/v/out) and the image
  projection, the ViT counterparts of the pool; everything else of CLIP stays frozen. The logit scale is the
  model's ``exp(logit_scale)`` capped at 100 (fixed).
* Evaluation: :func:`mean_average_precision`, :func:`confuser_win_rate`, :func:`retrieval_report`, and the control
  :func:`plain_clip_scores` (frozen CLIP with ``'the word "{q}"'``).

Other differences, and why: the frozen part of the image tower runs once and its output (the stream entering the
last block) is cached, exact because it is frozen and our data have no augmentation (CPU budget); the attention
pool's separate positional embedding has no ViT counterpart after the patch embedding (positions enter at block 0,
frozen), so it is not trained; the cross-attention's output projection starts at zero (the code's default init is
random) so an untrained FDP is exactly the frozen model (tested); schedules are in steps, not epochs; the batch is
32 synthetic scenes, the query one of the scene's words (FDP: MLT words, batch 48).

Measured (docs/methods/fdp.md): on the shipped ``shapes-tiny``, which cannot read TrueType words, FDP training does
not lift retrieval above chance; the focus map does learn where text is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..methods import register_method
from ..models.hooks import Hooks
from ..text.edit_distance import levenshtein  # re-exported: the candidates' distance

register_method(
    "fdp",
    "Focus, Distinguish, and Prompt: Unleashing CLIP for Efficient and Flexible Scene Text Retrieval (FDP)",
    "scene-text retrieval: a predicted text map biases the class token's last attention (balanced-BCE supervised) "
    "and near-spelling distracted queries (edit distance, softmax(1/(d+0.1)) target) sharpen word discrimination",
    doc="docs/methods/fdp.md",
)(__name__)

__all__ = ["PAD", "levenshtein", "edit_budget", "distracted_candidates", "candidate_target", "distractor_loss",
           "shrink_box", "text_kernel", "balanced_bce", "FocusBias", "mean_average_precision"]

PAD = "###"


def edit_budget(query: str) -> int:
    """FDP's neighbourhood radius: 1 for words of up to 5 characters, 2 for longer ones."""
    return 1 if len(query) <= 5 else 2


def distracted_candidates(query: str, dictionary: Sequence[str], k: int = 5, pad: str = PAD) -> list[tuple[str, int]]:
    """``k`` (word, distance) pairs: the query and its dictionary neighbours within :func:`edit_budget`, nearest
    first (ties alphabetical), padded with ``pad`` at distance ``levenshtein(pad, query)``."""
    budget = edit_budget(query)
    found = {w: levenshtein(query, w) for w in set(dictionary) | {query}}
    near = sorted(((w, d) for w, d in found.items() if d <= budget), key=lambda wd: (wd[1], wd[0]))
    near += [(pad, levenshtein(pad, query))] * max(0, k - len(near))
    return near[:k]


def candidate_target(distances: torch.Tensor | Sequence, eps: float = 0.1) -> torch.Tensor:
    """``softmax(1 / (d + eps))`` over the last axis."""
    d = torch.as_tensor(distances, dtype=torch.float32)
    return torch.softmax(1.0 / (d + eps), dim=-1)


def distractor_loss(image_features: torch.Tensor, candidate_features: torch.Tensor, target: torch.Tensor,
                    logit_scale: float) -> torch.Tensor:
    """``KL(target || softmax(logit_scale * cos(image_b, candidate_bk)))``, batch mean. Shapes ``[B, D]``,
    ``[B, k, D]``, ``[B, k]``."""
    img = F.normalize(image_features, dim=-1)
    cand = F.normalize(candidate_features, dim=-1)
    logits = logit_scale * torch.einsum("bd,bkd->bk", img, cand)
    return F.kl_div(logits.log_softmax(-1), target, reduction="batchmean")


def shrink_box(box: Sequence[float], ratio: float = 0.4) -> tuple[float, float, float, float] | None:
    """The DB/PSENet kernel of an axis-aligned box ``(x0, y0, x1, y1)``: every side moved in by
    ``int(area (1 - ratio^2) / (perimeter + 0.001) + 0.5)``; None when nothing is left."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    offset = int(w * h * (1 - ratio * ratio) / (2 * (w + h) + 0.001) + 0.5)
    if 2 * offset >= w or 2 * offset >= h:
        return None
    return x0 + offset, y0 + offset, x1 - offset, y1 - offset


def text_kernel(boxes: Sequence[Sequence[float]], image_size: int, grid: int, ratio: float = 0.4) -> torch.Tensor:
    """``[grid, grid]`` 0/1 map: a patch is positive when its centre lies inside a shrunk box."""
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) * image_size / grid
    out = torch.zeros(grid, grid)
    for box in boxes:
        kern = shrink_box(box, ratio)
        if kern is None:
            continue
        x0, y0, x1, y1 = kern
        rows = (centres >= y0) & (centres < y1)
        cols = (centres >= x0) & (centres < x1)
        out[rows[:, None] & cols[None]] = 1.0
    return out


def balanced_bce(logits: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor | None = None,
                 negative_ratio: float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """Balanced BCE (DB's): all positives and the ``min(#neg, negative_ratio * #pos)`` largest negative losses,
    summed and divided by their count (+``eps``); only where ``mask`` is 1."""
    mask = torch.ones_like(gt) if mask is None else mask.to(gt.dtype)
    pos, neg = gt * mask, (1 - gt) * mask
    n_pos = int(pos.sum())
    n_neg = min(int(neg.sum()), int(n_pos * negative_ratio))
    loss = F.binary_cross_entropy_with_logits(logits, gt, reduction="none")
    neg_loss = torch.topk((loss * neg).reshape(-1), n_neg).values
    return ((loss * pos).sum() + neg_loss.sum()) / (n_pos + n_neg + eps)


class FocusBias(Hooks):
    """Hook set for the image tower: after block ``L - 2`` a linear ``head`` on the ``ln``-normalised patch rows
    predicts the text map (logits, kept in ``self.map`` ``[B, N]``); block ``L - 1``'s attention gets the additive
    bias ``[1, sigmoid(map)]`` on the class token's query row (other rows unbiased). ``enabled=False`` is a no-op."""

    def __init__(self, width: int, enabled: bool = True) -> None:
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, 1)
        self.enabled = enabled
        self.layers = None
        self.map: torch.Tensor | None = None

    def parameters(self):
        return list(self.ln.parameters()) + list(self.head.parameters())

    def bind(self, model) -> "FocusBias":
        self.layers = model.tower_layers()["image"]
        return self

    def resid(self, tower: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        if self.enabled and tower == "image" and layer == self.layers - 2:
            self.predict(x)
        return x

    def attn_bias(self, tower: str, layer: int, n: int) -> torch.Tensor | None:
        if not (self.enabled and tower == "image" and layer == self.layers - 1):
            return None
        return self.bias(n)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The map logits ``[B, N]`` from the residual stream ``[B, 1 + N, W]`` entering the last block (kept)."""
        self.map = self.head(self.ln(x[:, 1:])).squeeze(-1)
        return self.map

    def bias(self, n: int) -> torch.Tensor:
        """``[B, 1, n, n]``: ``[1, sigmoid(map)]`` on the class token's query row, zero elsewhere."""
        b = self.map.shape[0]
        row = torch.cat([torch.ones(b, 1, dtype=self.map.dtype), torch.sigmoid(self.map)], dim=1)  # [B, n]
        if row.shape[1] != n:
            raise ValueError(f"FocusBias: map has {row.shape[1] - 1} patches, the block {n - 1} tokens after CLS")
        bias = torch.zeros(b, 1, n, n, dtype=row.dtype)
        bias[:, 0, 0] = row
        return bias


def mean_average_precision(scores: torch.Tensor, relevant: torch.Tensor) -> float:
    """mAP of ``scores [Q, G]`` against 0/1 ``relevant [Q, G]`` (queries with no relevant image are skipped)."""
    aps = []
    for s, r in zip(scores, relevant.bool()):
        if not r.any():
            continue
        hits = r[s.argsort(descending=True)].float()
        precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1)
        aps.append(float((precision * hits).sum() / hits.sum()))
    return sum(aps) / len(aps) if aps else math.nan


# --- Prompt: function / content word routing -------------------------------------------------------------------


def kmeans2(features: torch.Tensor, first: int, iters: int = 50) -> torch.Tensor:
    """Two-way k-means (Lloyd) on L2-normalised rows, seeded deterministically with row ``first`` and the row
    farthest from it; returns 0/1 labels with row ``first`` in cluster 0."""
    x = F.normalize(features.float(), dim=-1)
    far = int((x - x[first]).norm(dim=-1).argmax())
    centres = torch.stack([x[first], x[far]])
    labels = torch.zeros(len(x), dtype=torch.long)
    for _ in range(iters):
        labels = torch.cdist(x, centres).argmin(-1)
        new = torch.stack([x[labels == c].mean(0) if (labels == c).any() else centres[c] for c in (0, 1)])
        if torch.allclose(new, centres):
            break
        centres = new
    return labels if labels[first] == 0 else 1 - labels


def route_queries(model, words: Sequence[str], anchor: str = "the") -> list[bool]:
    """FDP's routing: KMeans(2) on the frozen CLIP text features of ``words`` (plus ``anchor``); the cluster that
    holds ``anchor`` is the function-word cluster. Returns ``is_function`` per word."""
    vocab = list(words) + ([anchor] if anchor not in words else [])
    with torch.no_grad():
        feats = model.encode_text(model.tokenize(vocab))
    labels = kmeans2(feats, vocab.index(anchor))
    return [bool(labels[vocab.index(w)] == 0) for w in words]


# --- the FDP retrieval model -----------------------------------------------------------------------------------


class FDP(nn.Module):
    """FDP on a CLIP with a ViT image tower (see the module docstring for where each part acts).

    * ``focus``: :class:`FocusBias` (``focus=False``: no map, no bias).
    * ``prompts``: CoOp prompts ``[SOS][ctx x n][word][EOT]`` for every vocabulary word, 2 context vectors for
      function words and 4 for content words (N(0, 0.02²)), routed by :func:`route_queries`; the text tower is frozen.
    * ``cross``: the image feature attends (8 heads) to the token features of ``"scene text"``; its output
      projection starts at zero, so ``fused = global + attended`` equals the plain feature at initialisation.
    * Trainable image side (``image_parts``): the last block's attention and the image projection, FDP's
      ``new_v_proj`` / ``new_c_proj`` analogue (the rest of the image tower stays frozen).
    """

    def __init__(self, model, vocabulary: Sequence[str], *, focus: bool = True, n_function: int = 2,
                 n_content: int = 4, heads: int = 8, seed: int = 0, image_parts: Sequence[str] = ("attn", "proj")):
        super().__init__()
        from ..zeroshot.prompt_learning import PromptLearner

        if model.config.vision.is_resnet or not model.config.vision.class_token:
            raise ValueError("FDP here needs a ViT image tower with a class token (the focus bias acts on it)")
        self.clip = model
        self.vocabulary = list(dict.fromkeys(list(vocabulary) + [PAD]))
        self.index = {w: i for i, w in enumerate(self.vocabulary)}
        self.is_function = route_queries(model, self.vocabulary)
        width, dim = model.config.vision.width, model.config.embed_dim
        self.focus = FocusBias(width, enabled=focus)
        self.focus_head = nn.ModuleDict({"ln": self.focus.ln, "head": self.focus.head})  # registers the parameters
        groups = {True: [w for w, f in zip(self.vocabulary, self.is_function) if f],
                  False: [w for w, f in zip(self.vocabulary, self.is_function) if not f]}
        self.prompts = nn.ModuleDict({
            name: PromptLearner(model, groups[is_fn], n, suffix="", seed=seed + k)
            for k, (name, is_fn, n) in enumerate((("function", True, n_function), ("content", False, n_content)))
            if groups[is_fn]})
        self.cross = nn.MultiheadAttention(dim, heads, batch_first=True)
        nn.init.zeros_(self.cross.out_proj.weight)
        nn.init.zeros_(self.cross.out_proj.bias)
        with torch.no_grad():
            self.register_buffer("scene_text", model.encode_text(model.tokenize(["scene text"]), output="tokens")
                                 .tokens.detach().float(), persistent=False)
        self.image_parts = tuple(image_parts)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in self.image_parameters():
            p.requires_grad_(True)

    def image_parameters(self) -> list[nn.Parameter]:
        last = self.clip.visual.transformer.blocks[-1]
        parts = {"attn": list(last.attn.parameters()), "mlp": list(last.mlp.parameters()),
                 "proj": list(self.clip.visual.proj.parameters()), "ln": list(self.clip.visual.ln_post.parameters())}
        unknown = set(self.image_parts) - set(parts)
        if unknown:
            raise ValueError(f"image_parts {sorted(unknown)} unknown; choose from {sorted(parts)}")
        return [p for name in self.image_parts for p in parts[name]]

    def head_parameters(self) -> list[nn.Parameter]:
        """FDP's fast group (lr 2e-3): prompts, cross-attention, focus head."""
        return list(self.prompts.parameters()) + list(self.cross.parameters()) + list(self.focus_head.parameters())

    # text side
    def word_features(self) -> torch.Tensor:
        """``[V, D]`` unnormalised prompt features of every vocabulary word (in ``self.vocabulary`` order)."""
        feats = torch.empty(len(self.vocabulary), self.clip.config.embed_dim)
        for name, learner in self.prompts.items():
            embeds, eot = learner()
            out = self.clip.encode_text(inputs_embeds=embeds, eot_index=eot).pooled.float()
            rows = torch.tensor([self.index[w] for w in learner.classnames])
            feats = feats.index_put((rows,), out)
        return feats

    # image side
    @torch.no_grad()
    def frozen_features(self, pixels: torch.Tensor, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """What the frozen part of the image tower gives, cached for training: the residual stream entering the
        last block ``[B, 1 + N, W]`` and the max-skip side path's contribution to the pooled output ``[B, D]``."""
        streams, skips = [], []
        for chunk in pixels.split(batch_size):
            out = self.clip.encode_image(chunk, output="hidden")
            streams.append(out.hidden[-2])
            skips.append(out.pooled - self.clip.visual.pool(out.hidden[-1]))
        return torch.cat(streams), torch.cat(skips)

    def image_from_stream(self, stream: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """The last block (with the focus bias) and the pooling on cached frozen features; equals
        ``encode_image(pixels, hooks=self.focus).pooled`` (tested)."""
        from types import SimpleNamespace

        from ..models.hooks import run_blocks

        if self.focus.enabled:
            self.focus.predict(stream)
        last = SimpleNamespace(blocks=[self.clip.visual.transformer.blocks[-1]])
        x, _, _ = run_blocks(last, stream, None, "image", _FirstBlockBias(self.focus), frozenset())
        return self.clip.visual.pool(x) + skip

    def fuse(self, image: torch.Tensor) -> torch.Tensor:
        """``global + cross_attention(global, "scene text" tokens)``."""
        kv = self.scene_text.expand(image.shape[0], -1, -1)
        attended, _ = self.cross(image[:, None], kv, kv, need_weights=False)
        return image + attended[:, 0]

    def encode_images(self, pixels: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """``[B, D]`` normalised fused image features of preprocessed pixels."""
        with torch.no_grad():
            stream, skip = self.frozen_features(pixels, batch_size)
            return F.normalize(self.fuse(self.image_from_stream(stream, skip)), dim=-1)

    def scores(self, image_features: torch.Tensor, queries: Sequence[str]) -> torch.Tensor:
        """``[Q, B]`` cosines of each query's prompt feature with normalised image features."""
        unknown = [q for q in queries if q not in self.index]
        if unknown:
            raise ValueError(f"queries {unknown} are not in the FDP vocabulary; retrain with them in `vocabulary`")
        with torch.no_grad():
            text = F.normalize(self.word_features(), dim=-1)[[self.index[q] for q in queries]]
        return text @ image_features.t()

    # persistence (the trained parts only; the CLIP weights come from the model name)
    def trained_state(self) -> dict[str, torch.Tensor]:
        names = {id(p): n for n, p in self.named_parameters()}
        return {names[id(p)]: p.detach().clone() for p in self.head_parameters() + self.image_parameters()}

    def save(self, path, model_name: str = "shapes-tiny") -> None:
        torch.save({"state": self.trained_state(), "vocabulary": self.vocabulary[:-1], "focus": self.focus.enabled,
                    "image_parts": self.image_parts, "model": model_name}, path)

    @classmethod
    def load(cls, path, model=None) -> "FDP":
        """An :class:`FDP` from :meth:`save`'s file (loads the named CLIP unless ``model`` is given)."""
        import cliplab

        blob = torch.load(path, map_location="cpu", weights_only=True)
        model = cliplab.load(blob["model"]).eval() if model is None else model
        fdp = cls(model, blob["vocabulary"], focus=blob["focus"], image_parts=blob["image_parts"])
        missing = set(blob["state"]) - {n for n, _ in fdp.named_parameters()}
        if missing:
            raise ValueError(f"{path}: parameters {sorted(missing)} do not belong to this FDP model")
        fdp.load_state_dict(blob["state"], strict=False)
        return fdp.eval()


class _FirstBlockBias(Hooks):
    """The focus bias at layer 0 of a one-block loop (the cached last block)."""

    def __init__(self, focus: FocusBias):
        self.focus = focus

    def attn_bias(self, tower: str, layer: int, n: int) -> torch.Tensor | None:
        return self.focus.bias(n) if self.focus.enabled and layer == 0 else None


# --- training and evaluation -----------------------------------------------------------------------------------


def scene_pixels(model, scenes) -> torch.Tensor:
    return torch.stack([model.preprocess(s.image) for s in scenes])


def train_fdp(model, scenes, *, vocabulary: Sequence[str] | None = None, steps: int = 300, batch_size: int = 32,
              lr: float = 2e-3, image_lr: float = 1e-4, weight_decay: float = 1e-3, focus: bool = True,
              distractor: bool = True, map_loss: bool = True, kernel_ratio: float = 0.4,
              image_parts: Sequence[str] = ("attn", "proj"), seed: int = 0, log_every: int = 0) -> tuple[FDP, list]:
    """Train :class:`FDP` on :class:`~cliplab.scenetext.dataset.TextScene` s (each step: ``batch_size`` scenes, one
    of each scene's words as its query). ``model`` is trained in place (its ``image_parts``; every other weight is
    set ``requires_grad=False``): pass a copy to keep the frozen one. Loss ``CE_sym + KL_candidates + balanced BCE`` (the last two switchable:
    ``distractor``, ``map_loss``); Adam (0.9, 0.98, eps 1e-6, ``weight_decay``) with ``lr`` for prompts /
    cross-attention / focus head and ``image_lr`` for ``image_parts``, both x0.1 at half of ``steps`` (FDP: x0.1
    after 10 of 20 epochs). The frozen part of the image tower runs once (cached). Returns ``(fdp, log)`` with
    ``log`` rows ``(step, total, ce, kl, bce)``."""
    scenes = list(scenes)
    if not scenes:
        raise ValueError("no training scenes")
    vocabulary = sorted({w for s in scenes for w in s.words}) if vocabulary is None else list(vocabulary)
    torch.manual_seed(seed)
    fdp = FDP(model, vocabulary, focus=focus, seed=seed, image_parts=image_parts)
    stream, skip = fdp.frozen_features(scene_pixels(model, scenes))
    grid = model.config.vision.image_size // model.config.vision.patch_size
    kernels = torch.stack([text_kernel(s.boxes, model.config.vision.image_size, grid, kernel_ratio)
                           for s in scenes]).reshape(len(scenes), -1)
    cands = {w: distracted_candidates(w, fdp.vocabulary[:-1]) for w in vocabulary}
    opt = torch.optim.Adam([{"params": fdp.head_parameters(), "lr": lr},
                            {"params": fdp.image_parameters(), "lr": image_lr}],
                           betas=(0.9, 0.98), eps=1e-6, weight_decay=weight_decay)
    scale = float(model.logit_scale.exp().clamp(max=100))
    g = torch.Generator().manual_seed(seed)
    log = []
    for step in range(steps):
        if step == steps // 2 and step:
            for group in opt.param_groups:
                group["lr"] *= 0.1
        idx = torch.randperm(len(scenes), generator=g)[:batch_size]
        queries = [scenes[i].words[int(torch.randint(len(scenes[i].words), (1,), generator=g))] for i in idx]
        image = F.normalize(fdp.fuse(fdp.image_from_stream(stream[idx], skip[idx])), dim=-1)
        words = F.normalize(fdp.word_features(), dim=-1)
        text = words[[fdp.index[q] for q in queries]]
        logits = scale * image @ text.t()
        target = torch.arange(len(idx))
        ce = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        kl = bce = torch.zeros(())
        if distractor:
            cand_rows = torch.tensor([[fdp.index[w] for w, _ in cands[q]] for q in queries])
            dist = candidate_target([[d for _, d in cands[q]] for q in queries])
            kl = distractor_loss(image, words[cand_rows], dist, scale)
        if focus and map_loss:
            bce = balanced_bce(fdp.focus.map, kernels[idx])
        loss = ce + kl + bce
        opt.zero_grad()
        loss.backward()
        opt.step()
        log.append((step, loss.item(), ce.item(), kl.item(), bce.item()))
        if log_every and step % log_every == 0:
            print(f"step {step}: loss {loss.item():.3f} ce {ce.item():.3f} kl {kl.item():.3f} bce {bce.item():.3f}",
                  flush=True)
    return fdp.eval(), log


def confuser_win_rate(scores: torch.Tensor, queries: Sequence[str], scenes) -> float:
    """How often an image holding a near-spelling of the query (edit distance 1, not the query) outranks an image
    holding the query, over all such pairs (0.5 is a coin)."""
    wins, total = 0, 0
    for qi, q in enumerate(queries):
        pos = [i for i, s in enumerate(scenes) if q in s.words]
        conf = [i for i, s in enumerate(scenes) if q not in s.words and any(levenshtein(q, w) == 1 for w in s.words)]
        for p in pos:
            for c in conf:
                wins += int(scores[qi, c] > scores[qi, p])
                total += 1
    return wins / total if total else math.nan


def retrieval_report(scores: torch.Tensor, queries: Sequence[str], scenes) -> dict:
    """mAP and the confuser win rate of ``scores [Q, G]`` over ``scenes``."""
    relevant = torch.tensor([[q in s.words for s in scenes] for q in queries])
    return {"mAP": mean_average_precision(scores, relevant),
            "confuser_outranks_true_rate": confuser_win_rate(scores, queries, scenes)}


def plain_clip_scores(model, scenes, queries: Sequence[str], template: str = 'the word "{}"') -> torch.Tensor:
    """The control: cosines of the frozen image embedding with the text embedding of ``template.format(q)``."""
    with torch.no_grad():
        img = F.normalize(model.encode_image(scene_pixels(model, scenes)), dim=-1)
        txt = model.encode_text(model.tokenize([template.format(q) for q in queries]), normalize=True)
    return txt @ img.t()


def gallery_queries(scenes, vocabulary: Sequence[str]) -> list[str]:
    """The vocabulary words present in at least one gallery scene."""
    present = {w for s in scenes for w in s.words}
    return [w for w in vocabulary if w in present]


def focus_map_auc(fdp: FDP, scenes) -> float:
    """AUC of the predicted focus map: patches whose centre lies inside a word box (unshrunk) against the rest."""
    if not fdp.focus.enabled:
        raise ValueError("this FDP has no focus map (focus=False)")
    model = fdp.clip
    grid = model.config.vision.image_size // model.config.vision.patch_size
    stream, _ = fdp.frozen_features(scene_pixels(model, scenes))
    with torch.no_grad():
        score = fdp.focus.predict(stream).flatten()
    truth = torch.stack([text_kernel(s.boxes, model.config.vision.image_size, grid, ratio=1.0)
                         for s in scenes]).flatten().bool()
    pos, neg = score[truth], score[~truth]
    if not len(pos) or not len(neg):
        return math.nan
    return float((pos[:, None] > neg[None]).float().mean() + 0.5 * (pos[:, None] == neg[None]).float().mean())
