"""Text2Token: unsupervised sentence-embedding learning by predicting a target token distribution from the embedding.

Paper: *Text2Token: Unsupervised Text Representation Learning with Token Target Prediction*, Ruize An, Richong Zhang,
Zhijie Nie, Zhanyu Wu, Yanzhao Zhang, Dingkun Long (arXiv 2510.10224, 2025). Official code (read to understand, not
copied): ``GDNL-ACT/anruize_target_learn`` (``aa_gene_train.py``: ``Text2Target.compute_theta_contrastive``,
``GenRepTrainer.compute_loss``; ``aa_dataset.py``: the data-driven target; ``script/*_llara_{first,second}_*.sh``).

The method. A text ``x`` is embedded, ``h = pool(model(x))``, and the embedding is read out in the vocabulary space
through the backbone's LM head, ``p = softmax(W h)``. Training minimises ``KL(q || p)`` (the code's
``nn.KLDivLoss(reduction="batchmean")``) against a synthetic target distribution ``q``, in two stages:

1. **Data-driven target** (the meaningful tokens *in* the text). Every run of non-word characters becomes a space
   (``[\\W_]+``), NLTK's English stop words are dropped, the rest is tokenized, special tokens (and whitespace-only
   pieces, the code's lone ``"▁"``) are removed, and each *distinct* token gets the same mass ``1/|T|``
   (:func:`meaningful_token_ids`, :func:`data_target`).
2. **Model-derived target** (semantically derived tokens *beyond* the text). A frozen copy of the stage-1 model gives
   ``p_0 = softmax(W h_0)``; the corpus background is ``theta = softmax(mean_x W h_0(x))`` (the frozen model's mean
   logits over the training texts, the code's ``theta_random``); each token is scored by ``r = p_0 / (p_0 + theta +
   1e-8)`` and the target is ``q = softmax(r / tau)``, ``tau = 1e-4`` (the code's ``--tau 0.0001``). Training
   continues from the stage-1 weights (:func:`background_logits`, :func:`model_target`).

Where it acts: the loss reads the pooled **final token states** (MiniLM: the last block's output, after its
post-LayerNorm; a Llama decoder: after the final RMSNorm, which is what its LM head reads), pooled as the embedder is
evaluated (``mean`` for MiniLM, the paper's ``mean`` mode; a decoder's default ``prompteol`` is the paper's ``last``
mode with the same PromptEOL prompt). Gradients reach every block; nothing is inserted into the model, so the result is
a plain :class:`~cliplab.text.EncoderEmbedder` / ``DecoderEmbedder`` that saves with ``.save(dir)`` and loads with
``cliplab.text.load_embedder(dir)`` / ``cliplab eval sts -m DIR``. The head is a training device and is not saved.

Choices that differ from the paper or its code, and why:

* **Backbone and head.** The paper trains 7B LLMs (Mistral, LLaMA) with LoRA and a frozen LM head. Here the main
  backbone is all-MiniLM-L6-v2, fully fine-tuned (22M parameters fit a CPU; no LoRA in this package). MiniLM ships
  without an MLM head, so its head is the **tied word-embedding table** ``E`` (frozen, like the paper's LM head; the
  input embeddings therefore do not move either) times a **trainable scalar** ``s``: ``logits = s * E h``. The scale is
  not in the paper: ``E h`` on MiniLM's mean-pooled states has a logit spread of about 0.3, so ``p`` would be almost
  uniform over 30,522 tokens and the loss would first have to inflate the embedding. ``s`` starts at the value of a
  1-D grid (1 .. 64) that best fits the first batch's stage-1 targets (:func:`calibrate_scale`) and is then trained.
  A Llama decoder uses its own ``lm_head`` with ``s = 1`` fixed, as in the paper.
* **Stop words.** NLTK's English list (179 words) is written out in :data:`STOP_WORDS` (NLTK is not a dependency).
* **Texts without a meaningful word** (all stop words). The code's target is then all zeros, which still counts in
  ``batchmean``; here such a text falls back to all its non-special tokens, and a text with none at all (empty) is
  left out of the mean (:func:`kl_loss`).
* **Schedule.** The code runs each stage as its own job (HF Trainer: AdamW, lr 5e-5, no weight decay, linear decay,
  ``max_grad_norm=1.0``, 100-10,000 steps, batch 32-128, texts cut at 128 tokens). Here both stages run in one call
  on :func:`cliplab.text.training.fit` (AdamW, no weight decay, cosine decay per stage, clipping at 1.0); the steps of
  each stage are arguments. The background is the mean over ``background_size`` training texts (the code: its whole
  training file); the default ``None`` uses them all.
* **Control.** ``shuffle_targets=True`` gives each text the target of another text of the corpus (a fixed random
  derangement, in both stages): the same loss, steps, data and target statistics with the text-target link cut. Not
  in the paper; it is the same-compute ablation the experiment and the effect test compare with.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..methods import register_method
from ..text.training import register_trainer

register_method(
    "text2token",
    "Text2Token: Unsupervised Text Representation Learning with Token Target Prediction",
    "train a sentence embedder to predict a target token distribution (data-driven, then model-derived) from its "
    "pooled embedding through the vocabulary head",
    doc="docs/methods/text2token.md",
)(__name__)

__all__ = ["STOP_WORDS", "DEFAULT_MODEL", "meaningful_text", "meaningful_token_ids", "special_token_ids",
           "data_target", "model_target", "kl_loss", "VocabHead", "calibrate_scale", "background_logits",
           "pooled_states", "top_tokens", "Text2TokenResult", "train_text2token", "cli_train"]

#: the model ``cli_train`` trains when none is named
DEFAULT_MODEL = "all-MiniLM-L6-v2"

#: NLTK's English stop-word list (``nltk.corpus.stopwords.words("english")``, 179 words), which the official code uses.
STOP_WORDS = frozenset("""
i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves he him his himself
she she's her hers herself it it's its itself they them their theirs themselves what which who whom this that that'll
these those am is are was were be been being have has had having do does did doing a an the and but if or because as
until while of at by for with about against between into through during before after above below to from up down in
out on off over under again further then once here there when where why how all any both each few more most other
some such no nor not only own same so than too very s t can will just don don't should should've now d ll m o re ve y
ain aren aren't couldn couldn't didn didn't doesn doesn't hadn hadn't hasn hasn't haven haven't isn isn't ma mightn
mightn't mustn mustn't needn needn't shan shan't shouldn shouldn't wasn wasn't weren weren't won won't wouldn wouldn't
""".split())

_NON_WORD = re.compile(r"[\W_]+")


# --- stage 1: the data-driven target ----------------------------------------------------------------------------------
def meaningful_text(text: str, stop_words=STOP_WORDS) -> str:
    """The official clean-up: every run of non-word characters becomes a space, then stop words are dropped."""
    words = _NON_WORD.sub(" ", text).split()
    return " ".join(w for w in words if w.lower() not in stop_words)


def _raw_tokenizer(tokenizer):
    """The ``tokenizers.Tokenizer`` inside a cliplab ``TextTokenizer`` (or the object itself)."""
    return getattr(tokenizer, "tokenizer", tokenizer)


def special_token_ids(tokenizer) -> frozenset[int]:
    """Ids never used as targets: the tokenizer's special tokens (``[CLS]``, ``[SEP]``, ``[PAD]``, ``[UNK]``,
    ``[MASK]``; ``<|endoftext|>``, ...), as the code drops Mistral's ``<unk> <s> </s>``."""
    tk = _raw_tokenizer(tokenizer)
    return frozenset(int(i) for i, t in tk.get_added_tokens_decoder().items() if t.special)


def meaningful_token_ids(text: str, tokenizer, stop_words=STOP_WORDS, fallback: bool = True) -> list[int]:
    """Distinct token ids of the meaningful words of ``text`` (:func:`meaningful_text`), in first-seen order, without
    special tokens or whitespace-only pieces. Words are tokenized after a space, so a byte-level BPE gives every word
    its mid-sentence form. ``fallback``: a text with no meaningful word uses all its non-special tokens instead."""
    tk = _raw_tokenizer(tokenizer)
    special = special_token_ids(tokenizer)

    def ids_of(s: str) -> list[int]:
        if not s.strip():
            return []
        out: dict[int, None] = {}
        for i in tk.encode(" " + s, add_special_tokens=False).ids:
            if i in special or i in out or not tk.decode([i], skip_special_tokens=False).strip():
                continue
            out[i] = None
        return list(out)

    ids = ids_of(meaningful_text(text, stop_words))
    if not ids and fallback:
        ids = ids_of(text)
    return ids


def _dense(id_lists: Sequence[Sequence[int]], vocab_size: int) -> torch.Tensor:
    q = torch.zeros(len(id_lists), vocab_size)
    for r, ids in enumerate(id_lists):
        if ids:
            q[r, torch.tensor(list(ids))] = 1.0 / len(ids)
    return q


def data_target(texts: Sequence[str], tokenizer, vocab_size: int | None = None, stop_words=STOP_WORDS,
                fallback: bool = True) -> torch.Tensor:
    """Stage-1 targets ``[B, vocab_size]``: mass ``1/|T|`` on each of the ``|T|`` distinct meaningful tokens of each
    text (:func:`meaningful_token_ids`, with ``stop_words`` and ``fallback``). Each row sums to 1, or is all zeros for
    a text with no usable token. Token order and repeats do not matter."""
    v = vocab_size or _raw_tokenizer(tokenizer).get_vocab_size(with_added_tokens=True)
    return _dense([meaningful_token_ids(t, tokenizer, stop_words, fallback) for t in texts], v)


# --- stage 2: the model-derived target --------------------------------------------------------------------------------
def model_target(logits: torch.Tensor, background: torch.Tensor, tau: float = 1e-4) -> torch.Tensor:
    """Stage-2 targets ``[B, V]`` from a frozen model's vocabulary logits ``[B, V]`` and the corpus ``background``
    (mean logits ``[V]``, :func:`background_logits`): ``softmax(r / tau)`` with the contrastive ratio
    ``r = p / (p + theta + 1e-8)``, ``p = softmax(logits)``, ``theta = softmax(background)``. No gradient flows."""
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    p = logits.detach().float().softmax(-1)
    theta = background.detach().float().to(p.device).softmax(-1)
    return (p / (p + theta + 1e-8) / tau).softmax(-1)


def kl_loss(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``KL(q || softmax(logits))`` summed over the vocabulary and averaged over the rows that have a target (a zero
    row, a text with no token, is left out). 0 exactly when ``softmax(logits) == q``."""
    logp = logits.float().log_softmax(-1)
    q = target.to(logp)
    per_row = (torch.xlogy(q, q) - q * logp).sum(-1)
    has = q.sum(-1) > 0
    if not bool(has.any()):
        return logp.sum() * 0.0
    return per_row[has].mean()


# --- the vocabulary head ----------------------------------------------------------------------------------------------
class VocabHead(nn.Module):
    """``logits = exp(log_scale) * h @ weight.T``: the backbone's vocabulary projection of a pooled state.

    ``weight`` is the model's own tensor, shared and not copied, and never trained (MiniLM: the word-embedding table;
    a Llama decoder: its ``lm_head``). ``log_scale`` is a trainable scalar where ``learn_scale`` (the module docstring
    says why MiniLM needs it and the paper does not)."""

    def __init__(self, weight: torch.Tensor, scale: float = 1.0, learn_scale: bool = True):
        super().__init__()
        self.weight = weight
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)), requires_grad=learn_scale)

    @classmethod
    def for_model(cls, model, scale: float | None = None) -> VocabHead:
        """The head of a :class:`~cliplab.models.lm.BertEncoder` (tied word embeddings, trainable scale starting at
        ``scale`` or 1) or a :class:`~cliplab.models.lm.LlamaDecoder` (its ``lm_head``, scale fixed at ``scale``
        or 1)."""
        from ..models.lm import BertEncoder, LlamaDecoder

        if isinstance(model, LlamaDecoder):
            weight, learn = model.lm_head.weight, False
        elif isinstance(model, BertEncoder):
            weight, learn = model.token_embed.weight, True
        else:
            raise TypeError(f"no vocabulary head for a {type(model).__name__} (BertEncoder and LlamaDecoder are known)")
        return cls(weight, scale=1.0 if scale is None else scale, learn_scale=learn)

    @property
    def scale(self) -> float:
        return float(self.log_scale.detach().exp())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.log_scale.exp() * (h.float() @ self.weight.detach().float().T)


@torch.no_grad()
def calibrate_scale(head: VocabHead, h: torch.Tensor, target: torch.Tensor,
                    grid: Sequence[float] = tuple(2.0 ** (k / 2) for k in range(13))) -> float:
    """Set ``head``'s scale to the value of ``grid`` (default 1 .. 64) with the lowest :func:`kl_loss` of ``target``
    given pooled states ``h``; returns it."""
    best = None
    for s in grid:
        head.log_scale.fill_(math.log(s))
        loss = float(kl_loss(target, head(h)))
        if best is None or loss < best[0]:
            best = (loss, s)
    head.log_scale.fill_(math.log(best[1]))
    return best[1]


# --- embedding and the training loop ----------------------------------------------------------------------------------
def pooled_states(embedder, batch, pooling) -> torch.Tensor:
    """The pooled final token states ``[B, W]`` of a tokenized batch (with gradients when enabled): what
    ``embedder.encode`` returns, before normalisation."""
    from ..text import get_pooling

    states = embedder.token_states(batch).tokens
    return get_pooling(pooling)(states, batch.mask.to(states.device))


@torch.no_grad()
def background_logits(embedder, head: VocabHead, texts: Sequence[str], pooling: str | None = None,
                      batch_size: int = 64) -> torch.Tensor:
    """Mean vocabulary logits ``[V]`` of ``texts`` under ``head`` (the official ``theta_random`` before its softmax)."""
    from ..text import get_pooling

    pool = get_pooling(pooling or embedder.default_pooling)
    batch = embedder.tokenize(embedder.prepare_texts(list(texts), pool))
    total = torch.zeros(head.weight.shape[0], dtype=torch.float64)
    for _, sub in embedder.iter_batches(batch, batch_size):
        total += head(pooled_states(embedder, sub, pool)).double().sum(0).cpu()
    return (total / max(1, len(texts))).float()


@torch.no_grad()
def top_tokens(embedder, head: VocabHead, texts: Sequence[str], k: int = 10, pooling: str | None = None) -> list:
    """For each text, its ``k`` most probable vocabulary tokens under ``head`` (a diagnostic of token alignment)."""
    from ..text import get_pooling

    pool = get_pooling(pooling or embedder.default_pooling)
    batch = embedder.tokenize(embedder.prepare_texts(list(texts), pool))
    logits = head(pooled_states(embedder, batch, pool))
    tok = _raw_tokenizer(embedder.tokenizer)
    return [[tok.decode([int(i)]) for i in row] for row in logits.topk(k, dim=-1).indices]


@dataclass
class Text2TokenResult:
    """The trained ``embedder`` (a new one; the input is untouched), its training ``head``, the ``fit`` results of
    each stage (None when it had no steps), the stage-2 ``background`` logits and the settings used."""

    embedder: object
    head: VocabHead
    stage1: object = None
    stage2: object = None
    background: torch.Tensor | None = None
    settings: dict = field(default_factory=dict)


def _derangement(n: int, gen: torch.Generator) -> torch.Tensor:
    """A random permutation of ``range(n)`` with no fixed point (``n >= 2``): each i maps to its predecessor in one
    random cycle through all n."""
    perm = torch.randperm(n, generator=gen)
    return torch.roll(perm, 1)[torch.argsort(perm)]


class _Batches:
    """Seeded epochs of shuffled row indices, ``batch_size`` at a time."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.bs = n, min(batch_size, n)
        self.gen = torch.Generator().manual_seed(seed)
        self.order, self.pos = torch.randperm(n, generator=self.gen), 0

    def next(self) -> list[int]:
        if self.pos + self.bs > self.n:
            self.order, self.pos = torch.randperm(self.n, generator=self.gen), 0
        rows = self.order[self.pos:self.pos + self.bs]
        self.pos += self.bs
        return rows.tolist()


def train_text2token(embedder, texts: Sequence[str], *, stage1_steps: int = 100, stage2_steps: int = 100,
                     batch_size: int = 32, lr: float = 5e-5, pooling: str | None = None, tau: float = 1e-4,
                     background_size: int | None = None, scale: float | None = None, shuffle_targets: bool = False,
                     seed: int = 0, progress: bool | None = None, log_every: int = 10) -> Text2TokenResult:
    """Text2Token on unlabelled ``texts``: ``stage1_steps`` with the data-driven target, then ``stage2_steps`` with
    the model-derived target of the frozen stage-1 model (module docstring). Returns a new embedder; ``embedder`` is
    not modified.

    ``pooling`` (default: the embedder's) is both trained and saved as the default. ``tau`` and ``background_size``
    (texts for the corpus background, None: all): the stage-2 target (:func:`model_target`). ``scale``: the head's
    starting scale (None: calibrated on the first batch for an encoder, 1 for a decoder). ``shuffle_targets``: the
    control (each text trained on another text's targets). ``batch_size``, ``lr``, ``seed``, ``progress``,
    ``log_every``: the loop (:func:`cliplab.text.training.fit`; AdamW, cosine decay per stage)."""
    from ..text import DecoderEmbedder, EncoderEmbedder, get_pooling
    from ..text.training import fit

    texts = list(texts)
    if len(texts) < 2:
        raise ValueError("train_text2token needs at least 2 texts")
    if stage1_steps < 0 or stage2_steps < 0:
        raise ValueError("stage1_steps and stage2_steps must be >= 0")
    pool = get_pooling(pooling or embedder.default_pooling)
    cls = DecoderEmbedder if getattr(embedder, "causal", False) else EncoderEmbedder
    model = copy.deepcopy(embedder.model).float()
    student = cls(f"{embedder.name}+text2token", model, embedder.tokenizer, pool.name)
    head = VocabHead.for_model(model, scale=scale)
    vocab = head.weight.shape[0]
    model.token_embed.weight.requires_grad_(False)  # the head's table stays frozen, as the paper's LM head
    if hasattr(model, "lm_head"):
        model.lm_head.weight.requires_grad_(False)

    gen = torch.Generator().manual_seed(seed)
    link = _derangement(len(texts), gen) if shuffle_targets else torch.arange(len(texts))
    ids = [meaningful_token_ids(t, embedder.tokenizer) for t in texts]
    batch_all = student.tokenize(student.prepare_texts(texts, pool))
    batches = _Batches(len(texts), batch_size, seed)

    def data_q(rows):
        return _dense([ids[int(link[r])] for r in rows], vocab)

    if scale is None and head.log_scale.requires_grad:
        rows = _Batches(len(texts), batch_size, seed).next()  # the first training batch
        with torch.no_grad():
            calibrate_scale(head, pooled_states(student, batch_all.select(rows), pool), data_q(rows))
    params = [p for p in list(model.parameters()) + list(head.parameters()) if p.requires_grad]
    settings = dict(stage1_steps=stage1_steps, stage2_steps=stage2_steps, batch_size=batch_size, lr=lr,
                    pooling=pool.name, tau=tau, background_size=background_size, start_scale=head.scale,
                    shuffle_targets=shuffle_targets, seed=seed)

    def run(steps, target_of, desc, stage_seed):
        if steps == 0:
            return None

        def step(i):
            rows = batches.next()
            logits = head(pooled_states(student, batch_all.select(rows), pool))
            return kl_loss(target_of(rows), logits), {"scale": head.log_scale.detach().exp()}

        model.train()
        try:
            return fit(params, step, steps=steps, lr=lr, seed=stage_seed, progress=progress, log_every=log_every,
                       desc=desc)
        finally:
            model.eval()

    stage1 = run(stage1_steps, data_q, "text2token stage 1 (data-driven)", seed)
    bg = stage2 = None
    if stage2_steps:
        teacher = cls(student.name, copy.deepcopy(model).eval().requires_grad_(False), embedder.tokenizer, pool.name)
        t_head = VocabHead.for_model(teacher.model, scale=head.scale).requires_grad_(False)
        sample = texts
        if background_size is not None and background_size < len(texts):
            pick = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed + 1))[:background_size]
            sample = [texts[int(i)] for i in pick]
        bg = background_logits(teacher, t_head, sample, pool)

        def model_q(rows):
            with torch.no_grad():
                logits = t_head(pooled_states(teacher, batch_all.select([int(link[r]) for r in rows]), pool))
            return model_target(logits, bg, tau)

        stage2 = run(stage2_steps, model_q, "text2token stage 2 (model-derived)", seed + 1)
    return Text2TokenResult(student, head, stage1, stage2, bg, settings)


@register_trainer("text2token", DEFAULT_MODEL, "predict each text's key tokens from its embedding (data-driven, then "
                  "model-derived targets)")
def cli_train(model: str | None, texts: Sequence[str], *, steps: int, batch_size: int | None = None,
              lr: float | None = None, seed: int = 0, progress: bool = False):
    """What ``cliplab textrep train text2token -m MODEL --texts FILE --steps N -o DIR`` runs: Text2Token on ``texts``
    with ``steps // 2`` data-driven steps, then the rest model-derived. ``model``: a name for
    :func:`cliplab.text.load_embedder` or a saved directory (None: :data:`DEFAULT_MODEL`); ``batch_size`` (None: 32)
    and ``lr`` (None: 5e-5), as the official scripts. Returns the trained embedder (``.save(dir)``)."""
    from ..text import load_embedder

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    base = load_embedder(model or DEFAULT_MODEL)
    res = train_text2token(base, texts, stage1_steps=steps // 2, stage2_steps=steps - steps // 2,
                           batch_size=32 if batch_size is None else batch_size, lr=5e-5 if lr is None else lr,
                           seed=seed, progress=progress)
    return res.embedder
