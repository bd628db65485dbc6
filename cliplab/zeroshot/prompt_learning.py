"""Learned prompts for a frozen CLIP: context vectors in the text tower's input, a mixture of prompts with a router,
the learned-prompts file, a small few-shot training loop and a linear-probe baseline.

Shared by CoOp (:mod:`cliplab.zeroshot.coop`) and MoCoOp (:mod:`cliplab.zeroshot.mocoop`); neither paper's choices
live here, only the mechanics both need.

**Where it acts.** A prompt is ``[SOS] [before ctx] [class-name tokens] [after ctx] [suffix tokens] [EOT]`` as token
embeddings *before* the positional embeddings are added: the learned context vectors replace the token embeddings of
the context words (:class:`PromptLearner`); the frozen text transformer, ``ln_final`` and the projection run on them
(``model.encode_text(inputs_embeds=..., eot_index=...)``) and the joint-space feature at EOT is the class embedding.
Nothing of the model trains: only the context vectors (and, for a mixture, the router and a correction vector).

**Exactness.** Initialised from the words of a hand prompt (``ctx_init="a photo of a"``), a learner's input embeddings
are the hand prompt's token embeddings, cut to the same length as the plain text path cuts a batch, so the class
embeddings -- and ``ZeroShotClassifier.from_learned_prompts``' weights, built by the same normalise-and-average code as
:class:`~cliplab.zeroshot.ZeroShotClassifier` -- are bit-for-bit those of ``"a photo of a {}."``.

**A mixture of prompts** (:class:`PromptMixture`): ``K`` experts (learners over the same classes) and a linear router
on the normalised image feature; the top-``k`` router logits are softmaxed (:func:`top_k_gates`) and an image's class
embedding is the gate-weighted sum of the chosen experts' normalised class features. One expert is a plain
learned-prompt classifier.

**The file** (:meth:`LearnedPrompts.save` / :meth:`LearnedPrompts.load`): one safetensors file (context vectors, router,
correction) whose metadata holds a JSON header (method, class names, layout, model name). Never pickle.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..models.towers import SLICE_TOKENS

__all__ = [
    "CLASS_POSITIONS", "PROMPTS_FORMAT", "PromptLearner", "PromptMixture", "LearnedPrompts", "top_k_gates",
    "encode_prompt_embeddings", "model_logit_scale", "image_features", "fit_prompts", "FitResult",
    "learned_class_features", "LinearProbe", "fit_linear_probe", "sample_few_shot",
    "accuracy", "load_prompts", "UNSEEN_COLOUR_WORDS", "PromptTask", "synthetic_prompt_task", "PROMPT_PRESETS",
    "register_prompt_preset", "prompt_presets", "prompts_path", "run_prompt_preset", "preset_task", "preset_summary",
]

CLASS_POSITIONS = ("end", "middle", "front")
PROMPTS_FORMAT = "cliplab-learned-prompts"
PROMPTS_FORMAT_VERSION = 1
#: the placeholder word whose token slots the context vectors take (CoOp's "X")
PLACEHOLDER = "X"


def model_logit_scale(model) -> float:
    """The model's ``exp(logit_scale)`` capped at 100, as :class:`~cliplab.zeroshot.ZeroShotClassifier` uses it."""
    return min(math.exp(float(model.logit_scale.detach())), 100.0)


def _split_init(ctx_init: str) -> tuple[str, str]:
    """``"a photo of a {}."`` -> ``("a photo of a", ".")``; a phrase without ``{}`` is all "before"."""
    if "{}" not in ctx_init:
        return ctx_init.strip(), ""
    if ctx_init.count("{}") != 1:
        raise ValueError(f"a context template holds one '{{}}' for the class name, got {ctx_init!r}")
    before, after = ctx_init.split("{}")
    return before.strip(), after.strip()


def _word_ids(model, text: str) -> torch.Tensor:
    """The token ids of ``text`` without SOS/EOT."""
    if not text:
        return torch.empty(0, dtype=torch.long)
    batch = model.tokenize([text])
    return batch.ids[0, 1: int(batch.lengths[0]) - 1].clone()


class PromptLearner(nn.Module):
    """Learned context vectors around each class name: ``[SOS] [ctx_before] [name] [ctx_after] [suffix] [EOT]``.

    * ``n_ctx`` context vectors, placed by ``class_position``: ``"end"`` (all before the name, CoOp's default),
      ``"middle"`` (``n_ctx // 2`` before, the rest after), ``"front"`` (all after); or give ``n_before`` and
      ``n_after`` directly.
    * ``ctx_init``: a phrase (``"a photo of a"``: its tokens' embeddings become the context, its token count
      ``n_ctx``) or a template with ``{}`` (``"a photo of a {}"``: words left of ``{}`` initialise the context before
      the name, words right of it the context after it). Without it, N(0, ``init_std``²) with ``seed``.
    * ``class_specific``: one context per class (CoOp's CSC) instead of one shared by all classes.
    * ``suffix``: fixed tokens after the name and the after-context (CoOp's ``"."``).

    ``forward()`` gives the input embeddings ``[C, L, W]`` (before positions) and the EOT index ``[C]``; ``L`` is the
    longest prompt's EOT + 1, as the plain text path cuts a batch.
    """

    def __init__(self, model, classnames: Sequence[str], n_ctx: int = 16, *, ctx_init: str | None = None,
                 class_position: str = "end", class_specific: bool = False, suffix: str = ".",
                 n_before: int | None = None, n_after: int | None = None, init_std: float = 0.02, seed: int = 0):
        super().__init__()
        classnames = [str(c) for c in classnames]
        if not classnames:
            raise ValueError("no class names")
        if class_position not in CLASS_POSITIONS:
            raise ValueError(f"class_position must be one of {CLASS_POSITIONS}, got {class_position!r}")
        table = model.text.token_embed.weight
        width = table.shape[1]
        init_vectors = None
        if ctx_init is not None:
            before_text, after_text = _split_init(ctx_init)
            before_ids, after_ids = _word_ids(model, before_text), _word_ids(model, after_text)
            if "{}" in ctx_init:
                n_before, n_after = len(before_ids), len(after_ids)
            n_ctx = len(before_ids) + len(after_ids)
            if n_ctx == 0:
                raise ValueError(f"ctx_init {ctx_init!r} has no words to initialise the context from")
            with torch.no_grad():
                init_vectors = table[torch.cat([before_ids, after_ids])].detach().clone().float()
        if n_before is None and n_after is None:
            n_before = {"end": n_ctx, "middle": n_ctx // 2, "front": 0}[class_position]
            n_after = n_ctx - n_before
        elif n_before is None or n_after is None:
            raise ValueError("give both n_before and n_after (or neither, and class_position)")
        if n_before < 0 or n_after < 0 or n_before + n_after == 0:
            raise ValueError(f"need at least one context vector, got n_before={n_before}, n_after={n_after}")
        self.classnames = classnames
        self.n_before, self.n_after = int(n_before), int(n_after)
        self.n_ctx = self.n_before + self.n_after
        self.class_specific = bool(class_specific)
        self.suffix = suffix
        self.ctx_init = ctx_init
        self.class_position = class_position

        # Tokenize with placeholder words in the context slots; the slots' positions come from the name's own length.
        slot = "".join(f"{PLACEHOLDER} " for _ in range(self.n_before))
        after = " ".join([PLACEHOLDER] * self.n_after)
        texts = [f"{slot}{name}{' ' + after if after else ''}{suffix}" for name in classnames]
        batch = model.tokenize(texts, truncate=False)
        name_lens = [len(_word_ids(model, name)) for name in classnames]
        eot = batch.eot_index.clone()
        length = int(eot.max()) + 1
        ids = batch.ids[:, :length].clone()
        placeholder_id = int(_word_ids(model, PLACEHOLDER)[0])
        index = torch.arange(length).repeat(len(classnames), 1)
        for c, n_name in enumerate(name_lens):
            slots = list(range(1, 1 + self.n_before))
            start = 1 + self.n_before + n_name
            slots += list(range(start, start + self.n_after))
            if not all(int(ids[c, p]) == placeholder_id for p in slots):
                raise ValueError(f"class name {classnames[c]!r} does not tokenize on its own as inside a prompt")
            for j, p in enumerate(slots):
                index[c, p] = length + j  # the j-th context vector (see forward)
        self.register_buffer("ids", ids, persistent=False)
        self.register_buffer("eot", eot, persistent=False)
        self.register_buffer("gather_index", index, persistent=False)
        with torch.no_grad():
            self.register_buffer("token_embeds", table[ids].detach().clone().float(), persistent=False)
        shape = (len(classnames), self.n_ctx, width) if self.class_specific else (self.n_ctx, width)
        if init_vectors is not None:
            ctx = init_vectors.expand(shape).clone()
        else:
            g = torch.Generator().manual_seed(int(seed))
            ctx = torch.randn(shape, generator=g) * init_std
        self.ctx = nn.Parameter(ctx)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embeds [C, L, W], eot [C])``: the class prompts' input embeddings (before positions)."""
        c, _, w = self.token_embeds.shape
        ctx = self.ctx.to(self.token_embeds.dtype)
        ctx = ctx.expand(c, -1, -1) if ctx.dim() == 2 else ctx
        source = torch.cat([self.token_embeds, ctx], dim=1)
        return source.gather(1, self.gather_index[..., None].expand(-1, -1, w)), self.eot

    def layout(self) -> list[str]:
        """Each class prompt as text with ``X`` for the context slots (``"X X X X red circle."``)."""
        return [" ".join([PLACEHOLDER] * self.n_before + [n] + [PLACEHOLDER] * self.n_after) + self.suffix
                for n in self.classnames]

    def nearest_words(self, model, k: int = 1) -> list[list[str]]:
        """CoOp's interpretation: for each context vector (of the first class with CSC), the ``k`` vocabulary tokens
        nearest in Euclidean distance in the token-embedding table."""
        table = model.text.token_embed.weight.detach().float()
        ctx = self.ctx.detach().float()
        ctx = ctx[0] if ctx.dim() == 3 else ctx
        idx = torch.cdist(ctx, table).topk(k, largest=False).indices
        decoder = getattr(model.tokenizer, "decode", None)
        return [[decoder([int(i)]).strip() if decoder else str(int(i)) for i in row] for row in idx]


def encode_prompt_embeddings(model, embeds: torch.Tensor, eot: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Input embeddings ``[C, L, W]`` and EOT index -> ``[C, D]`` unnormalised float32 text features.

    Under autograd: one pass over all rows. Without it (building a classifier): the rows go through the tower in the
    same groups as :func:`~cliplab.zeroshot.encode_prompts` sends token ids (sorted by length, ``batch_size`` per
    batch, each batch split into the plain path's row slices and every slice cut to its own longest prompt). Causal
    attention makes the grouping irrelevant mathematically, but matrix kernels round differently for different
    shapes; grouped the same way, a hand prompt's embeddings give its plain-path features bit-for-bit."""
    if torch.is_grad_enabled():
        return model.encode_text(inputs_embeds=embeds, eot_index=eot).pooled.float()
    out = torch.empty(len(eot), model.config.embed_dim, dtype=torch.float32, device=embeds.device)
    order = torch.argsort(eot.cpu(), stable=True).to(eot.device)
    for start in range(0, len(eot), batch_size):
        rows = order[start: start + batch_size]
        step = max(1, SLICE_TOKENS // (int(eot[rows].max()) + 1))
        for chunk in (rows.split(step) if len(rows) > step else [rows]):
            n = int(eot[chunk].max()) + 1
            out[chunk] = model.encode_text(inputs_embeds=embeds[chunk, :n], eot_index=eot[chunk]).pooled.float()
    return out


def top_k_gates(logits: torch.Tensor, k: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits ``[B, K]`` -> dense gates ``[B, K]`` (softmax over each row's top ``k`` logits, zero elsewhere;
    rows sum to one) and the chosen experts ``[B, k]``. ``k`` is capped at ``K``."""
    k = min(int(k), logits.shape[-1])
    if k < 1:
        raise ValueError("top_k_gates needs k >= 1")
    values, indices = logits.topk(k, dim=-1)
    gates = torch.zeros_like(logits).scatter(-1, indices, values.softmax(-1))
    return gates, indices


class PromptMixture(nn.Module):
    """``K`` prompt learners over the same classes, a router and an optional correction vector.

    * one expert, no router: the plain learned-prompt classifier (CoOp): ``logits = s * norm(img) @ norm(text)^T``;
    * several experts: ``router`` (``Linear(D, K)`` on the normalised image feature) picks the top ``top_k`` experts
      per image (:func:`top_k_gates`), and the image's class embeddings are the gate-weighted sums of the chosen
      experts' normalised class features (not renormalised, as MoCoOp's code).
    * ``correction``: a vector ``w`` ``[1, D]`` added to every expert's text feature before normalising (zero-init).
    """

    def __init__(self, experts: Sequence[PromptLearner], *, router: bool | None = None, top_k: int = 2,
                 correction: bool = False, embed_dim: int | None = None, logit_scale: float = 100.0):
        super().__init__()
        if not experts:
            raise ValueError("a prompt mixture needs at least one expert")
        names = experts[0].classnames
        if any(e.classnames != names for e in experts):
            raise ValueError("every expert must cover the same classes in the same order")
        self.experts = nn.ModuleList(experts)
        self.top_k = int(top_k)
        self.logit_scale = float(logit_scale)
        use_router = len(experts) > 1 if router is None else bool(router)
        if (use_router or correction) and embed_dim is None:
            raise ValueError("a router or a correction vector needs embed_dim (the model's config.embed_dim)")
        self.router = nn.Linear(embed_dim, len(experts)) if use_router else None
        self.correction = nn.Parameter(torch.zeros(1, embed_dim)) if correction else None

    @property
    def classnames(self) -> list[str]:
        return self.experts[0].classnames

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def expert_features(self, model, normalize: bool = True) -> torch.Tensor:
        """``[K, C, D]`` class features of every expert (with the correction; normalised unless told otherwise)."""
        feats = torch.stack([encode_prompt_embeddings(model, *e()) for e in self.experts])
        if self.correction is not None:
            feats = feats + self.correction
        return F.normalize(feats, dim=-1) if normalize else feats

    def gates(self, image_features: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(router logits [B, K] or None, gates [B, K])`` for image features ``[B, D]``."""
        if self.router is None:
            n = image_features.shape[0]
            return None, torch.full((n, self.num_experts), 1.0 / self.num_experts, device=image_features.device)
        logits = self.router(F.normalize(image_features.float(), dim=-1))
        return logits, top_k_gates(logits, self.top_k)[0]

    def logits_from(self, image_features: torch.Tensor, expert_feats: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Logits ``[B, C]`` from image features and normalised expert features ``[K, C, D]``; ``extras`` holds the
        router logits and the gates."""
        img = F.normalize(image_features.float(), dim=-1)
        router_logits, gates = self.gates(img)
        if self.num_experts == 1:  # the gate is 1: the plain classifier's arithmetic exactly
            logits = self.logit_scale * img @ expert_feats[0].t()
        else:
            text = torch.einsum("bk,kcd->bcd", gates, expert_feats)
            logits = self.logit_scale * torch.einsum("bd,bcd->bc", img, text)
        return logits, {"router_logits": router_logits, "gates": gates}

    def forward(self, model, image_features: torch.Tensor) -> torch.Tensor:
        return self.logits_from(image_features, self.expert_features(model))[0]


# --- the learned-prompts file ------------------------------------------------------------------------------------------


@dataclass
class LearnedPrompts:
    """What a prompt-learning run produces: the context vectors of each expert, the router and the correction, plus
    the layout needed to rebuild the prompts (the class names' token embeddings come from the model at load time)."""

    method: str
    classnames: list[str]
    experts: list[dict]           # per expert: {"ctx": tensor, "n_before", "n_after", "suffix", "class_specific"}
    router_weight: torch.Tensor | None = None
    router_bias: torch.Tensor | None = None
    correction: torch.Tensor | None = None
    top_k: int = 2
    logit_scale: float = 100.0
    model: str | None = None
    info: dict = field(default_factory=dict)

    @classmethod
    def from_mixture(cls, mixture: PromptMixture, method: str, model=None, info: dict | None = None
                     ) -> "LearnedPrompts":
        experts = [{"ctx": e.ctx.detach().cpu().clone(), "n_before": e.n_before, "n_after": e.n_after,
                    "suffix": e.suffix, "class_specific": e.class_specific, "ctx_init": e.ctx_init}
                   for e in mixture.experts]
        r = mixture.router
        return cls(method, list(mixture.classnames), experts,
                   None if r is None else r.weight.detach().cpu().clone(),
                   None if r is None else r.bias.detach().cpu().clone(),
                   None if mixture.correction is None else mixture.correction.detach().cpu().clone(),
                   mixture.top_k, mixture.logit_scale,
                   None if model is None else model.config.name, dict(info or {}))

    def to_mixture(self, model) -> PromptMixture:
        """Rebuild the trainable module on ``model`` (its token embeddings give the class-name tokens)."""
        width = model.text.token_embed.weight.shape[1]
        experts = []
        for e in self.experts:
            ctx = e["ctx"]
            if ctx.shape[-1] != width:
                raise ValueError(f"the learned context has width {ctx.shape[-1]}, the model's text tower {width}: "
                                 f"load it with the model it was trained on ({self.model})")
            learner = PromptLearner(model, self.classnames, n_before=e["n_before"], n_after=e["n_after"],
                                    class_specific=e["class_specific"], suffix=e["suffix"])
            learner.ctx_init = e.get("ctx_init")
            with torch.no_grad():
                learner.ctx.copy_(ctx)
            experts.append(learner)
        mixture = PromptMixture(experts, router=self.router_weight is not None, top_k=self.top_k,
                                correction=self.correction is not None, embed_dim=model.config.embed_dim,
                                logit_scale=self.logit_scale)
        with torch.no_grad():
            if mixture.router is not None:
                mixture.router.weight.copy_(self.router_weight)
                mixture.router.bias.copy_(self.router_bias)
            if mixture.correction is not None:
                mixture.correction.copy_(self.correction)
        return mixture

    def save(self, path: str | Path) -> Path:
        """One safetensors file: tensors ``expert.<i>.ctx``, ``router.weight``, ``router.bias``, ``correction``;
        metadata ``{"cliplab_prompts": JSON header}``."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"expert.{i}.ctx": e["ctx"].float().contiguous() for i, e in enumerate(self.experts)}
        for key, t in (("router.weight", self.router_weight), ("router.bias", self.router_bias),
                       ("correction", self.correction)):
            if t is not None:
                tensors[key] = t.float().contiguous()
        header = {"format": PROMPTS_FORMAT, "format_version": PROMPTS_FORMAT_VERSION, "method": self.method,
                  "classnames": self.classnames, "top_k": self.top_k, "logit_scale": self.logit_scale,
                  "model": self.model, "info": self.info,
                  "experts": [{k: v for k, v in e.items() if k != "ctx"} for e in self.experts]}
        save_file(tensors, str(path), metadata={"cliplab_prompts": json.dumps(header)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "LearnedPrompts":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no learned-prompts file at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # not a safetensors file at all
            raise ValueError(f"{path} is not a learned-prompts file (safetensors): {e}") from None
        if "cliplab_prompts" not in meta:
            raise ValueError(f"{path} is a safetensors file but not a learned-prompts file (write one with "
                             "`cliplab train --preset coop` or LearnedPrompts.save)")
        header = json.loads(meta["cliplab_prompts"])
        if header.get("format") != PROMPTS_FORMAT or header.get("format_version", 0) > PROMPTS_FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported learned-prompts format {header.get('format')!r} "
                             f"v{header.get('format_version')}")
        experts = [dict(e, ctx=tensors[f"expert.{i}.ctx"]) for i, e in enumerate(header["experts"])]
        return cls(header["method"], list(header["classnames"]), experts, tensors.get("router.weight"),
                   tensors.get("router.bias"), tensors.get("correction"), int(header.get("top_k", 2)),
                   float(header.get("logit_scale", 100.0)), header.get("model"), dict(header.get("info") or {}))


def load_prompts(path: str | Path) -> LearnedPrompts:
    """:meth:`LearnedPrompts.load`."""
    return LearnedPrompts.load(path)


# --- classifiers ---------------------------------------------------------------------------------------------------------


def learned_class_features(model, prompts: "LearnedPrompts | PromptMixture | str | Path", *,
                           classnames: Sequence[str] | None = None
                           ) -> tuple[PromptMixture, torch.Tensor, list[str]]:
    """``(mixture, features [K, C, D], classnames)``: learned prompts (a file, a :class:`LearnedPrompts` or a
    :class:`PromptMixture`) on ``model``, every expert's unnormalised class features (encoded as
    :func:`encode_prompt_embeddings` groups them, so an initialised learner matches its hand prompt bit-for-bit), in
    the order of ``classnames`` when given (which must be the learned classes).
    :meth:`~cliplab.zeroshot.ZeroShotClassifier.from_learned_prompts` builds the classifier from these."""
    if isinstance(prompts, (str, Path)):
        prompts = LearnedPrompts.load(prompts)
    mixture = prompts.to_mixture(model) if isinstance(prompts, LearnedPrompts) else prompts
    mixture = mixture.to(model.device)
    with torch.no_grad():
        raw = mixture.expert_features(model, normalize=False).cpu()
    names = list(mixture.classnames)
    if classnames is not None:
        classnames = [str(c) for c in classnames]
        missing = [c for c in classnames if c not in names]
        extra = [c for c in names if c not in classnames]
        if missing or extra or len(classnames) != len(names):
            raise ValueError(f"the learned prompts cover other classes than asked for (not learned: {missing}; "
                             f"learned but not asked for: {extra}): train the prompts on the same classes")
        raw = raw[:, [names.index(c) for c in classnames]]
        names = classnames
    return mixture, raw, names


# --- data helpers, training loop, linear probe ------------------------------------------------------------------------


@torch.no_grad()
def image_features(model, images, batch_size: int = 128) -> torch.Tensor:
    """PIL images (or preprocessed pixels ``[N, 3, S, S]``) -> ``[N, D]`` float32 image features of the frozen model."""
    if isinstance(images, torch.Tensor):
        return torch.cat([model.encode_image(images[i:i + batch_size].to(model.device)).float().cpu()
                          for i in range(0, len(images), batch_size)])
    images = list(images)
    out = [model.encode_image(torch.stack([model.preprocess(im) for im in images[i:i + batch_size]])
                              .to(model.device)).float().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.empty(0, model.config.embed_dim)


def sample_few_shot(labels: Sequence[int], shots: int, seed: int = 0) -> list[int]:
    """Indices of ``shots`` examples per class (fewer where a class has fewer), drawn with ``seed``."""
    labels = torch.as_tensor(list(labels))
    g = torch.Generator().manual_seed(int(seed))
    out = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        out += idx[torch.randperm(len(idx), generator=g)[:shots]].tolist()
    return sorted(out)


def accuracy(logits: torch.Tensor, labels: Sequence[int] | torch.Tensor) -> float:
    return float((logits.argmax(-1).cpu() == torch.as_tensor(labels)).float().mean())


@dataclass
class FitResult:
    losses: list[float]
    steps: int
    parts: dict[str, list[float]] = field(default_factory=dict)


def _lr_at(step: int, steps: int, lr: float, warmup_steps: int, warmup_lr: float) -> float:
    """CoOp's schedule: a constant warm-up at ``warmup_lr``, then cosine from ``lr`` to 0 over the remaining steps."""
    if step < warmup_steps:
        return warmup_lr
    t = (step - warmup_steps) / max(1, steps - warmup_steps)
    return 0.5 * lr * (1 + math.cos(math.pi * t))


ExtraLoss = Callable[[PromptMixture, torch.Tensor, torch.Tensor, dict], "dict[str, torch.Tensor]"]


def fit_prompts(model, mixture: PromptMixture, features: torch.Tensor, labels: Sequence[int] | torch.Tensor, *,
                steps: int = 200, lr: float = 0.002, batch_size: int = 32, optimizer: str = "sgd",
                momentum: float = 0.9, weight_decay: float = 5e-4, warmup_steps: int = 0, warmup_lr: float = 1e-5,
                seed: int = 0, extra_loss: ExtraLoss | None = None, log_every: int = 0) -> FitResult:
    """Few-shot training of a :class:`PromptMixture` on cached image features of a frozen model.

    Each step draws ``batch_size`` examples (an epoch-wise permutation with ``seed``), encodes every expert's class
    prompts, and minimises the cross-entropy of the mixture's logits plus ``extra_loss(mixture, batch_features,
    batch_labels, state)`` (a dict of weighted terms; ``state`` holds ``expert_feats`` and ``extras`` of the step).
    Only the mixture's parameters get gradients; the model's are left untouched (``requires_grad`` is switched off for
    the run and restored). Schedule: ``warmup_steps`` at ``warmup_lr``, then cosine from ``lr`` (CoOp's)."""
    if optimizer not in ("sgd", "adamw"):
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
    labels = torch.as_tensor(list(labels) if not isinstance(labels, torch.Tensor) else labels).long()
    if len(labels) != len(features):
        raise ValueError(f"{len(features)} feature rows for {len(labels)} labels")
    params = [p for p in mixture.parameters() if p.requires_grad]
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(int(seed))
    order = torch.empty(0, dtype=torch.long)
    losses: list[float] = []
    parts: dict[str, list[float]] = {}
    was_training = mixture.training
    mixture.train()
    try:
        for step in range(steps):
            if len(order) < min(batch_size, len(labels)):
                order = torch.cat([order, torch.randperm(len(labels), generator=g)])
            idx, order = order[:batch_size], order[batch_size:]
            x, y = features[idx].to(model.device), labels[idx].to(model.device)
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, steps, lr, warmup_steps, warmup_lr)
            expert_feats = mixture.expert_features(model)
            logits, extras = mixture.logits_from(x, expert_feats)
            loss = F.cross_entropy(logits, y)
            terms = {"ce": loss.detach()}
            if extra_loss is not None:
                for name, term in extra_loss(mixture, x, y, {"expert_feats": expert_feats, "extras": extras}).items():
                    loss = loss + term
                    terms[name] = term.detach()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            for name, v in terms.items():
                parts.setdefault(name, []).append(float(v))
            if log_every and (step + 1) % log_every == 0:
                print(f"step {step + 1}/{steps} loss {losses[-1]:.4f}", flush=True)
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        mixture.train(was_training)
    return FitResult(losses, steps, parts)


class LinearProbe(nn.Module):
    """Multinomial logistic regression on normalised image features (CLIP's linear-probe baseline)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear(F.normalize(image_features.float(), dim=-1))


def fit_linear_probe(features: torch.Tensor, labels: Sequence[int] | torch.Tensor, num_classes: int | None = None, *,
                     weight_decay: float = 1e-4, steps: int = 300, lr: float = 1.0) -> LinearProbe:
    """Full-batch L-BFGS logistic regression with an L2 penalty ``weight_decay * |W|^2`` (CLIP fits the same model
    with scikit-learn's L-BFGS and a swept ``C``; here one fixed penalty)."""
    labels = torch.as_tensor(list(labels) if not isinstance(labels, torch.Tensor) else labels).long()
    num_classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    probe = LinearProbe(features.shape[1], num_classes)
    nn.init.zeros_(probe.linear.weight)
    nn.init.zeros_(probe.linear.bias)
    opt = torch.optim.LBFGS(probe.parameters(), lr=lr, max_iter=steps, line_search_fn="strong_wolfe")
    x = features.float()

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(probe(x), labels) + weight_decay * probe.linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return probe.eval()


# --- synthetic few-shot tasks ---------------------------------------------------------------------------------------

#: Colour words the shipped model never saw in training (their token embeddings are untrained), one per world colour:
#: class names written with them shift the prompt vocabulary away from the model's training captions.
UNSEEN_COLOUR_WORDS: dict[str, str] = {
    "red": "crimson", "green": "emerald", "blue": "azure", "yellow": "golden", "purple": "violet",
    "orange": "amber", "cyan": "teal", "pink": "rose",
}


@dataclass
class PromptTask:
    """A few-shot classification task of single-object synthetic scenes (:func:`synthetic_prompt_task`).

    ``train_*`` hold ``shots`` images per class, ``test_*`` ``n_test``; ``*_style`` is each image's hidden style
    index (its size, into ``styles``), which no class name mentions."""

    classnames: list[str]
    train_images: list
    train_labels: list[int]
    test_images: list
    test_labels: list[int]
    styles: list[str]
    train_style: list[int]
    test_style: list[int]
    info: dict


def synthetic_prompt_task(shots: int = 16, n_test: int = 8, *, names: str = "plain",
                          colours: Sequence[str] | None = None, shapes: Sequence[str] | None = None,
                          styles: Sequence[str] = ("small", "medium", "large"), image_size: int = 64,
                          seed: int = 0) -> PromptTask:
    """Colour x shape classes of single-object scenes (no clutter, no words), sizes cycling through ``styles``.

    ``names``: ``"plain"`` (``"red circle"``, the model's own vocabulary) or ``"unseen-colours"`` (``"crimson
    circle"``: :data:`UNSEEN_COLOUR_WORDS`, a prompt vocabulary the model did not see in training)."""
    import numpy as np

    from ..data.synthetic import SceneWorld
    from ..data.synthetic.vocabulary import COLOURS, SHAPES

    if names not in ("plain", "unseen-colours"):
        raise ValueError(f"names must be 'plain' or 'unseen-colours', got {names!r}")
    colours = list(colours or COLOURS)
    shapes = list(shapes or SHAPES)
    styles = list(styles)
    combos = [(c, s) for c in colours for s in shapes]
    world = SceneWorld(image_size, seed=seed, colours=colours, shapes=shapes)

    def split(tag: int, n: int):
        images, labels, style = [], [], []
        for ci, (c, s) in enumerate(combos):
            for k in range(n):
                rng = np.random.default_rng([seed, 131, tag, ci, k])
                z = k % len(styles)
                scene = world.compose([{"colour": c, "shape": s, "size": styles[z]}], rng, word=False, clutter=False)
                images.append(scene.render())
                labels.append(ci)
                style.append(z)
        return images, labels, style

    tr, te = split(0, shots), split(1, n_test)
    word = UNSEEN_COLOUR_WORDS if names == "unseen-colours" else {c: c for c in colours}
    classnames = [f"{word[c]} {s}" for c, s in combos]
    info = {"shots": shots, "n_test": n_test, "names": names, "colours": colours, "shapes": shapes,
            "styles": styles, "image_size": image_size, "seed": seed}
    return PromptTask(classnames, tr[0], tr[1], te[0], te[1], styles, tr[2], te[2], info)


# --- presets: `cliplab train --preset coop` and the like ---------------------------------------------------------------

#: name -> (runner, one-line summary); a method module registers its runner with :func:`register_prompt_preset`
PROMPT_PRESETS: dict[str, tuple[Callable, str]] = {}
TASK_OPTIONS = ("shots", "n_test", "names", "colours", "shapes", "styles", "image_size", "seed")
DEFAULT_PROMPTS_FILE = "prompts.safetensors"


def register_prompt_preset(name: str, summary: str):
    """Decorator: ``runner(model, out_path, **options) -> summary dict`` becomes ``cliplab train --preset NAME``."""

    def register(fn):
        PROMPT_PRESETS[name] = (fn, summary)
        return fn

    return register


def prompt_presets() -> dict[str, str]:
    """``{name: summary}`` of the prompt-learning presets (their method modules are imported here)."""
    from ..methods import import_capability

    import_capability("zeroshot")
    return {name: summary for name, (_, summary) in sorted(PROMPT_PRESETS.items())}


def prompts_path(out: str | Path | None, preset: str) -> Path:
    """Where a preset writes its file: ``out`` itself when it ends in ``.safetensors``, else
    ``out/prompts.safetensors`` (default ``runs/<preset>/prompts.safetensors``)."""
    if out is None:
        return Path("runs") / preset / DEFAULT_PROMPTS_FILE
    out = Path(out)
    return out if out.suffix == ".safetensors" else out / DEFAULT_PROMPTS_FILE


def run_prompt_preset(name: str, model=None, out: str | Path | None = None, **options) -> dict:
    """Run preset ``name`` (``coop``, ``mocoop``) on ``model`` (default: the shipped ``shapes-tiny``): build its
    synthetic few-shot task (``options`` named in :data:`TASK_OPTIONS`), train, write the learned-prompts file and
    return a summary (file, test accuracy of the learned prompts and of the hand prompt ``"a photo of a {}."``)."""
    presets = prompt_presets()
    if name not in presets:
        raise ValueError(f"unknown prompt-learning preset {name!r}; known: {sorted(presets)}")
    if model is None:
        import cliplab

        model = cliplab.load("shapes-tiny")
    model.eval()
    runner = PROMPT_PRESETS[name][0]
    return runner(model, prompts_path(out, name), **options)


def preset_task(model, options: dict) -> tuple[PromptTask, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pop the task options out of ``options``; build the task and its cached features ``(task, x_train, y_train,
    x_test, y_test)``."""
    task_kw = {k: options.pop(k) for k in TASK_OPTIONS if k in options}
    task = synthetic_prompt_task(**task_kw)
    return (task, image_features(model, task.train_images), torch.tensor(task.train_labels),
            image_features(model, task.test_images), torch.tensor(task.test_labels))


def preset_summary(model, run, task: PromptTask, x_test: torch.Tensor, y_test: torch.Tensor, path: Path) -> dict:
    """Save ``run``'s prompts to ``path``; accuracies of the learned and the hand prompts on the task's test split."""
    run.save(path)
    # the hand prompt "a photo of a {}." is exactly a learner initialised from its words
    hand = PromptMixture([PromptLearner(model, task.classnames, ctx_init="a photo of a")],
                         logit_scale=model_logit_scale(model)).to(model.device)
    with torch.no_grad():
        hand_logits = hand(model, x_test)
    return {"prompts": str(path), "classes": len(task.classnames), "train_images": len(task.train_labels),
            "test_images": len(y_test), "steps": run.fit.steps, "final_loss": run.fit.losses[-1],
            "test_accuracy": accuracy(run.classifier().predict(x_test), y_test),
            "hand_prompt_accuracy": accuracy(hand_logits, y_test), "task": task.info}
