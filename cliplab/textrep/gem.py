"""GEM: sentence embeddings from a decoder LM through special tokens that an attention mask makes summarise the text.

Paper: *GEM: Empowering LLM for both Embedding Generation and Language Understanding*, Caojin Zhang, Qiang Zhang,
Ke Li, Sai Vidyaranya Nuthalapati, Benyu Zhang, Jason Liu, Serena Li, Lizhu Zhang, Xiangjun Fan (arXiv 2506.04344,
2025). No official code is public. Only the abstract and a third-party summary of the method section (the
themoonlight.io literature review of the paper) could be read here (the full text was not reachable), so the details
below that the summary does not give are choices of this module, marked as such.

The method (what the paper specifies):

* ``n`` new special tokens are inserted at a random position of a training text: ``prefix ⊕ specials ⊕ suffix``.
* The attention mask is the causal one, except that (a) suffix tokens may not attend to prefix tokens (only to the
  specials and to earlier suffix tokens) and (b) special tokens may not attend to each other (each sees the prefix
  and itself). The next-token loss on the suffix can then only use the prefix through the specials: a bottleneck
  that makes them summarise it.
* *Mixed NTP*: these compressed sequences are mixed with ordinary sequences under the plain causal mask, so the
  model keeps its language modelling. (The paper also mentions an optional contrastive term; not implemented.)
* Inference: the text followed by the specials; the embedding is read from the specials' final states.

Where it acts: the special tokens enter at the **input** (``inputs_embeds``: SmolLM2's vocabulary is fixed, so they
are ``n`` trainable vectors of the model's width, saved with the model, like Token Prepending's slot); the mask acts
in **every layer's attention** (an ``attn_bias`` intervention ``text.layer[*].attn_bias``, :mod:`cliplab.tokens`);
the embedding is read from the **final states after the last RMSNorm** (``TowerOutput.tokens``, the states the LM
head reads) at the special positions.

Choices (not in the paper, or not in what could be read of it):

* *Readout.* ``readout="last"`` (default): the final state of the last special; ``"mean"``: the mean of the ``n``
  specials' final states. The last special is the only one with a loss of its own (it predicts the first suffix
  token); the others are trained only through the suffix's attention. Chosen on STS-B dev after 100 training steps
  on SmolLM2-135M: last 47.59, mean 40.73 (``experiments/results/gem-smollm2-dev-*``). The mean was the first
  default (the specials, which cannot see each other, are parallel summaries); the test split was not used to choose.
* *Which positions are scored.* The loss is the next-token loss of the combined sequence, skipping targets that are
  special tokens (they are not in the vocabulary): the prefix positions predict the next prefix token (ordinary
  NTP; ``prefix_loss=False`` drops these), the **last special** predicts the first suffix token, and each suffix
  token predicts the next. The loss is the mean over all scored tokens of the batch, compressed and plain rows alike.
* *Where the specials go.* The split point ``k`` (the prefix length) is uniform in ``1 .. T-1`` for a text of ``T``
  tokens, so both the prefix and the suffix are non-empty; a text of one token is used as a plain row.
* *Mixing.* In every batch ``round(ntp_fraction * B)`` rows, chosen at random, are plain (no specials, causal mask);
  the default ``ntp_fraction=0.5``. The paper's ratio was not available.
* *Special vectors.* Initialised as seeded normal vectors scaled to the standard deviation of the token-embedding
  table (as :func:`cliplab.text_edit.token_prepending.pst_embedding`), one per special.
* *What is trained.* The specials always; the transformer blocks chosen by ``train_blocks`` (``None``: all, an int
  ``k``: the top ``k``, ``0``: none); the tied token-embedding / LM-head table and the final norm only with
  ``train_embeddings=True`` (SmolLM2's tied table stays frozen by default: the specials need no vocabulary row,
  and a frozen head protects the language modelling; a model trained from scratch, as in the tests, needs it
  trained). The paper fine-tunes the whole LLM (1B-8B) on far more data; on 2 shared CPU cores the real run here is
  100 steps of 8 captions (see ``docs/methods/gem.md`` for what was run and what it measured).
* *Padding.* Rows are padded on the right. A padding query attends only to itself (so no row of the mask is
  empty); padding keys come after every real token, so causality already hides them.
* *Positions.* The specials take ordinary consecutive positions, as inserted tokens do; the suffix's rotary positions
  continue after them.

Public API: :func:`gem_allowed` / :func:`gem_bias` (the mask), :func:`init_specials`, :func:`build_batch`,
:func:`gem_forward`, :func:`gem_loss`, :func:`sample_splits`, :class:`GEMEmbedder` (a
:class:`~cliplab.text.TextEmbedder`; saves as kind ``"gem"``, so ``load_embedder(dir)`` and ``cliplab eval sts -m
DIR`` read it back), :func:`train_gem` (mixed-NTP training with :func:`cliplab.text.training.fit`) and
:func:`cli_train` (what ``cliplab textrep train gem`` calls).

The control (``use_mask=False`` in :func:`gem_loss` / :func:`train_gem`) is the same sequences, specials, splits,
targets, steps and seed under the plain causal mask: the suffix then reads the prefix directly and nothing forces the
specials to summarise it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..methods import register_method
from ..models.tokenizer import TruncationWarning
from ..text import DecoderEmbedder, get_pooling
from ..text.saving import load_model_state, read_saved, register_embedder_kind, save_embedder
from ..text.training import register_trainer
from ..tokens import Intervention, InterventionSet

register_method(
    "gem",
    "GEM: Empowering LLM for both Embedding Generation and Language Understanding",
    "special tokens after the text of a decoder LM, trained under a bottleneck attention mask (suffix sees the "
    "prefix only through them) mixed with plain next-token prediction; their final states are the embedding",
    doc="docs/methods/gem.md",
)(__name__)

__all__ = [
    "IGNORE",
    "PAD",
    "PREFIX",
    "READOUTS",
    "SPECIAL",
    "SUFFIX",
    "GEMBatch",
    "GEMEmbedder",
    "build_batch",
    "cli_train",
    "gem_allowed",
    "gem_bias",
    "gem_forward",
    "gem_loss",
    "init_specials",
    "sample_splits",
    "train_gem",
]

#: segment codes of a position: a prefix (or plain-text) token, a special token, a suffix token, padding
PREFIX, SPECIAL, SUFFIX, PAD = 0, 1, 2, 3
#: target of a position that is not scored
IGNORE = -100
#: how the specials' final states become the embedding
READOUTS = ("mean", "last")


# --- the mask ------------------------------------------------------------------------------------------------------
def gem_allowed(segments: torch.Tensor) -> torch.Tensor:
    """``[B, n, n]`` bool, True where query ``i`` may attend key ``j``, for segment codes ``[B, n]`` (or ``[n]``).

    Causal, except: a suffix query never sees a prefix key; a special query never sees another special; a padding
    query sees only itself and no query sees a padding key other than itself."""
    seg = segments if segments.dim() == 2 else segments[None]
    n = seg.shape[1]
    idx = torch.arange(n, device=seg.device)
    causal = (idx[None, :] <= idx[:, None])[None]  # [1, n(query), n(key)]
    eye = (idx[None, :] == idx[:, None])[None]
    q, k = seg[:, :, None], seg[:, None, :]
    allowed = causal & ~((q == SUFFIX) & (k == PREFIX)) & ~((q == SPECIAL) & (k == SPECIAL) & ~eye)
    allowed = allowed & ((k != PAD) | eye)
    return torch.where(q == PAD, eye, allowed)


def gem_bias(segments: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The mask as an additive attention bias ``[B, 1, n, n]``: 0 where allowed, ``-inf`` elsewhere."""
    allowed = gem_allowed(segments)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))
    return bias[:, None]


# --- sequences -----------------------------------------------------------------------------------------------------
def init_specials(model, n_special: int = 4, seed: int = 0) -> torch.Tensor:
    """``[n_special, W]`` seeded normal vectors scaled to the standard deviation of ``model``'s token table."""
    if n_special < 1:
        raise ValueError(f"n_special must be >= 1, got {n_special}")
    table = model.token_embed.weight.detach()
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_special, table.shape[1], generator=g) * table.float().std()


@dataclass
class GEMBatch:
    """``embeds`` ``[B, n, W]``; ``segments`` ``[B, n]`` (:data:`PREFIX` ...); ``targets`` ``[B, n]`` (the token
    each position predicts, :data:`IGNORE` where unscored); ``special_index`` ``[B, S]`` (positions of the
    specials, -1 in plain rows); ``ids`` ``[B, n]`` (token ids, -1 at specials and padding)."""

    embeds: torch.Tensor
    segments: torch.Tensor
    targets: torch.Tensor
    special_index: torch.Tensor
    ids: torch.Tensor

    def __len__(self) -> int:
        return self.embeds.shape[0]

    @property
    def compressed(self) -> torch.Tensor:
        """``[B]`` True on rows with specials."""
        return self.special_index[:, 0] >= 0


def build_batch(model, specials: torch.Tensor, rows: Sequence[Sequence[int]], splits: Sequence[int | None],
                prefix_loss: bool = True) -> GEMBatch:
    """Sequences ``prefix ⊕ specials ⊕ suffix`` for token-id ``rows`` split at ``splits[r]`` (the prefix length,
    ``0..T``; ``T`` puts the specials after the whole text, as at inference), or the plain text where the split is
    None. Targets: see the module docstring (``prefix_loss=False`` leaves the prefix positions unscored)."""
    if len(rows) != len(splits):
        raise ValueError(f"{len(rows)} rows but {len(splits)} splits")
    s = specials.shape[0]
    seqs, segs, tgts, where = [], [], [], []
    for ids, k in zip(rows, splits):
        ids = [int(t) for t in ids]
        t = len(ids)
        if k is None:
            seqs.append(ids)
            segs.append([PREFIX] * t)
            tgts.append(ids[1:] + [IGNORE])
            where.append([-1] * s)
            continue
        if not 0 <= k <= t:
            raise ValueError(f"split {k} outside 0..{t}")
        seqs.append(ids[:k] + [-1] * s + ids[k:])
        segs.append([PREFIX] * k + [SPECIAL] * s + [SUFFIX] * (t - k))
        pre = (ids[1:k] if prefix_loss else [IGNORE] * max(0, k - 1)) + ([IGNORE] if k else [])
        first = [ids[k]] if k < t else [IGNORE]  # the last special predicts the first suffix token
        tgts.append(pre + [IGNORE] * (s - 1) + first + ids[k + 1:] + ([IGNORE] if k < t else []))
        where.append(list(range(k, k + s)))
    n = max(len(x) for x in seqs)
    b = len(seqs)
    ids = torch.full((b, n), -1, dtype=torch.long)
    segments = torch.full((b, n), PAD, dtype=torch.long)
    targets = torch.full((b, n), IGNORE, dtype=torch.long)
    for r in range(b):
        m = len(seqs[r])
        ids[r, :m] = torch.tensor(seqs[r], dtype=torch.long)
        segments[r, :m] = torch.tensor(segs[r], dtype=torch.long)
        targets[r, :m] = torch.tensor(tgts[r], dtype=torch.long)
        assert len(tgts[r]) == m
    special_index = torch.tensor(where, dtype=torch.long).reshape(b, s)
    device = model.token_embed.weight.device
    tok = model.token_embed(ids.clamp(min=0).to(device))
    is_special = (segments == SPECIAL).to(device)
    slot = (torch.cumsum(is_special.long(), 1) - 1).clamp(min=0)  # which special sits at each position
    sp = specials.to(device=device, dtype=tok.dtype)[slot]
    embeds = torch.where(is_special[..., None], sp, tok)
    return GEMBatch(embeds, segments.to(device), targets.to(device), special_index.to(device), ids.to(device))


def gem_forward(model, batch: GEMBatch, *, use_mask: bool = True, hooks: InterventionSet | None = None,
                output=False):
    """Run ``model`` (a :class:`~cliplab.models.lm.LlamaDecoder`) on ``batch`` under the GEM mask, applied as an
    ``attn_bias`` intervention on every layer (``use_mask=False``: the plain causal mask, the control); ``hooks``
    (more interventions) and ``output`` pass through."""
    if use_mask:
        bias = gem_bias(batch.segments, batch.embeds.dtype)
        mask = InterventionSet([Intervention("text.layer[*].attn_bias", bias)])
        hooks = mask if hooks is None else mask + hooks
    return model(inputs_embeds=batch.embeds, hooks=hooks, output=output)


def gem_loss(model, specials: torch.Tensor, rows: Sequence[Sequence[int]], splits: Sequence[int | None], *,
             prefix_loss: bool = True, use_mask: bool = True) -> tuple[torch.Tensor, dict]:
    """Mixed next-token loss of ``rows`` split at ``splits`` (None: a plain row): the mean cross-entropy over every
    scored position; the logs split it into ``gem`` (rows with specials) and ``ntp`` (plain rows).
    ``use_mask=False``: the control (plain causal mask, same sequences and targets)."""
    batch = build_batch(model, specials, rows, splits, prefix_loss=prefix_loss)
    states = gem_forward(model, batch, use_mask=use_mask).tokens
    scored = batch.targets != IGNORE
    if not bool(scored.any()):
        raise ValueError("no position is scored (texts too short?)")
    nll = F.cross_entropy(model.logits(states[scored]), batch.targets[scored], reduction="none")
    loss = nll.mean()
    row = batch.compressed[:, None].expand_as(scored)[scored]
    logs = {"gem": nll[row].mean().detach() if bool(row.any()) else torch.tensor(float("nan")),
            "ntp": nll[~row].mean().detach() if bool((~row).any()) else torch.tensor(float("nan"))}
    return loss, logs


def sample_splits(lengths: Sequence[int], generator: torch.Generator, ntp_fraction: float = 0.5) -> list[int | None]:
    """Split points for a batch: ``round(ntp_fraction * B)`` random rows plain (None), the others a prefix length
    uniform in ``1 .. T-1`` (texts under two tokens are plain)."""
    if not 0.0 <= ntp_fraction <= 1.0:
        raise ValueError(f"ntp_fraction must be in [0, 1], got {ntp_fraction}")
    b = len(lengths)
    plain = set(torch.randperm(b, generator=generator)[: round(ntp_fraction * b)].tolist())
    out: list[int | None] = []
    for r, t in enumerate(lengths):
        if r in plain or t < 2:
            out.append(None)
        else:
            out.append(1 + int(torch.randint(t - 1, (1,), generator=generator)))
    return out


# --- the embedder ----------------------------------------------------------------------------------------------------
class GEMEmbedder(DecoderEmbedder):
    """A decoder LM with ``n`` special vectors: ``encode(texts)`` appends the specials to each text and reads their
    final states (``readout``: ``"mean"`` of them or the ``"last"``). ``encode(texts, pooling="mean")`` (any
    registered pooling) embeds the plain text with the same weights instead, for comparison. ``pooling="gem"`` is
    the default readout, ``"gem_mean"`` / ``"gem_last"`` choose one."""

    def __init__(self, name: str, model, tokenizer, specials: torch.Tensor | None = None, *, n_special: int = 4,
                 readout: str = "last", seed: int = 0):
        super().__init__(name, model, tokenizer, "last")
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
        self.default_pooling = "gem"
        self.readout = readout
        init = init_specials(model, n_special, seed) if specials is None else specials.detach().float().clone()
        self.specials = nn.Parameter(init.to(model.token_embed.weight.device), requires_grad=False)

    @classmethod
    def from_lm(cls, lm, n_special: int = 4, readout: str = "last", seed: int = 0) -> GEMEmbedder:  # type: ignore[override]
        """GEM on a loaded :class:`~cliplab.text.CausalLM` (the same weights, not a copy: training changes ``lm``)."""
        emb = cls(f"{lm.name}+gem", lm.model, lm.tokenizer, n_special=n_special, readout=readout, seed=seed)
        emb.lm = lm
        return emb

    @property
    def n_special(self) -> int:
        return self.specials.shape[0]

    def _readout_of(self, pooling) -> str | None:
        name = getattr(pooling, "name", pooling)
        if name in (None, "gem"):
            return self.readout
        if name in ("gem_mean", "gem_last"):
            return name[4:]
        return None

    @torch.no_grad()
    def encode(self, texts: Sequence[str], pooling=None, normalize: bool = False, batch_size: int = 64,
               progress: bool = False) -> torch.Tensor:
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts; wrap a single text in a list")
        readout = self._readout_of(pooling)
        if readout is None:  # a registered pooling of the plain text, same weights
            return super().encode(texts, get_pooling(pooling), normalize, batch_size, progress)
        if not texts:
            return torch.empty(0, self.dim)
        room = self.max_tokens - self.n_special
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", TruncationWarning)
            batch = self.tokenizer(list(texts), max_length=room)
        for w in caught:
            warnings.warn(str(w.message), w.category, stacklevel=2)
        out = torch.empty(len(batch), self.dim)
        for rows, sub in self.iter_batches(batch, batch_size, progress):
            out[rows] = self.embed_batch([r[:n] for r, n in zip(sub.ids.tolist(), sub.lengths.tolist())],
                                         readout).float().cpu()
        return F.normalize(out, dim=-1) if normalize else out

    def embed_batch(self, rows: Sequence[Sequence[int]], readout: str | None = None) -> torch.Tensor:
        """``[B, W]`` embeddings of token-id ``rows``: each followed by the specials, read out at their positions."""
        readout = readout or self.readout
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
        batch = build_batch(self.model, self.specials, rows, [len(r) for r in rows])
        states = gem_forward(self.model, batch).tokens  # final states after the last RMSNorm
        at = states[torch.arange(len(batch), device=states.device)[:, None], batch.special_index]  # [B, S, W]
        return at.mean(1) if readout == "mean" else at[:, -1]

    def save(self, directory, **kw):
        """Write the model, its tokenizer and the special vectors (kind ``"gem"``)."""
        state = dict(self.model.state_dict())
        state["gem.specials"] = self.specials.detach()
        extra = {"n_special": self.n_special, "readout": self.readout, **kw.pop("extra", {})}
        return save_embedder(self, directory, kind="gem", extra=extra, state=state, **kw)

    def __repr__(self) -> str:
        return (f"GEMEmbedder(name={self.name!r}, dim={self.dim}, n_special={self.n_special}, "
                f"readout={self.readout!r}, precision={self.precision!r})")


@register_embedder_kind("gem")
def _load_gem(directory, meta: dict) -> GEMEmbedder:
    meta, state, tok = read_saved(directory)
    model = load_model_state(meta, state)
    return GEMEmbedder(meta["name"], model, tok, state["gem.specials"], readout=meta["extra"].get("readout", "last"))


# --- training --------------------------------------------------------------------------------------------------------
def _trainable(model, train_blocks: int | None, train_embeddings: bool) -> list[nn.Parameter]:
    blocks = list(model.blocks)
    if train_blocks is None:
        chosen = blocks
    elif not 0 <= train_blocks <= len(blocks):
        raise ValueError(f"train_blocks must be None or 0..{len(blocks)}, got {train_blocks}")
    else:
        chosen = blocks[len(blocks) - train_blocks:]
    params = [p for b in chosen for p in b.parameters()]
    if train_embeddings:
        params += [model.token_embed.weight, *model.norm.parameters()]
        if model.lm_head.weight is not model.token_embed.weight:
            params.append(model.lm_head.weight)
    return params


def train_gem(embedder: GEMEmbedder, texts: Sequence[str], *, steps: int, batch_size: int = 16, lr: float = 1e-4,
              ntp_fraction: float = 0.5, prefix_loss: bool = True, use_mask: bool = True,
              train_blocks: int | None = None, train_embeddings: bool = False, max_tokens: int = 64,
              warmup: int = 0, weight_decay: float = 0.0, seed: int = 0, progress: bool | None = None,
              log_every: int = 10):
    """Mixed-NTP GEM training of ``embedder`` (in place) on ``texts``; returns the
    :class:`~cliplab.text.training.FitResult`.

    Each step takes the next ``batch_size`` texts of a seeded shuffle (cut at ``max_tokens`` tokens), makes
    ``ntp_fraction`` of them plain rows and inserts the specials at a random split in the others
    (:func:`sample_splits`), and minimises :func:`gem_loss`. ``use_mask=False`` is the control: the same sequences,
    specials and steps under the plain causal mask, so the suffix reads the prefix directly and nothing forces the
    specials to summarise. ``train_blocks`` / ``train_embeddings`` choose what is trained besides the specials
    (module docstring); the rest of the keywords go to :func:`cliplab.text.training.fit`."""
    from ..text.training import fit

    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    model = embedder.model
    tok = embedder.tokenizer
    encoded = [tok.encode(t) for t in texts]
    cut = sum(len(r) > max_tokens for r in encoded)
    if cut:  # a training crop, as the papers' scripts do, but said
        warnings.warn(f"train_gem: {cut} of {len(encoded)} texts were cut to max_tokens={max_tokens} tokens",
                      TruncationWarning, stacklevel=2)
    rows = [r[:max_tokens] for r in encoded if r]
    if not rows:
        raise ValueError("no text has a token")
    params = [embedder.specials, *_trainable(model, train_blocks, train_embeddings)]
    flags = {id(p): p.requires_grad for p in [*model.parameters(), embedder.specials]}
    for p in [*model.parameters(), embedder.specials]:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []

    def next_rows() -> list[list[int]]:
        nonlocal order
        picked = []
        while len(picked) < batch_size:
            if not order:
                order = torch.randperm(len(rows), generator=g).tolist()
            picked.append(rows[order.pop()])
        return picked

    def step(i: int):
        batch_rows = next_rows()
        splits = sample_splits([len(r) for r in batch_rows], g, ntp_fraction)
        return gem_loss(model, embedder.specials, batch_rows, splits, prefix_loss=prefix_loss, use_mask=use_mask)

    model.train()
    try:
        result = fit(params, step, steps=steps, lr=lr, warmup=warmup, weight_decay=weight_decay, seed=seed,
                     progress=progress, log_every=log_every, desc="gem" if use_mask else "gem-control")
    finally:
        model.eval()
        for p in [*model.parameters(), embedder.specials]:
            p.requires_grad_(flags[id(p)])
    return result



@register_trainer("gem", "smollm2-135m", "special tokens that an attention mask makes summarise the text, trained with "
                  "mixed next-token prediction (a decoder LM)")
def cli_train(model: str | None, texts: Sequence[str], *, steps: int, batch_size: int | None = None,
              lr: float | None = None, seed: int = 0, progress: bool = False) -> GEMEmbedder:
    """What ``cliplab textrep train gem -m MODEL --texts FILE --steps N -o DIR`` runs: GEM on ``model`` (a name for
    :func:`cliplab.text.load_embedder` or a saved directory, a decoder or an earlier GEM; None: ``smollm2-135m``),
    trained with :func:`train_gem` on ``texts``; ``batch_size`` / ``lr`` None keep :func:`train_gem`'s defaults.
    The result saves with ``.save(dir)`` and loads back with ``load_embedder(dir)``."""
    from ..text import load_embedder

    base = load_embedder(model or "smollm2-135m")
    if isinstance(base, GEMEmbedder):
        emb = base
    elif isinstance(base, DecoderEmbedder):
        emb = GEMEmbedder(f"{base.name}+gem", base.model, base.tokenizer, seed=seed)
    else:
        raise TypeError(f"GEM needs a decoder LM; {model!r} loads as a {type(base).__name__}")
    kw = {k: v for k, v in {"batch_size": batch_size, "lr": lr}.items() if v is not None}
    train_gem(emb, texts, steps=steps, seed=seed, progress=progress, **kw)
    return emb
