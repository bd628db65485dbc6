"""A small caption generator: a conditioning embedding (a CLIP image or text embedding) -> words.

ClipCap-style: the embedding goes through a residual mapper ``x + MLP(x)`` (its last layer starts at zero, so the
mapper is the identity at initialisation), a linear map to ``prefix_len`` prefix vectors, and a one-layer GRU that
reads the prefix and then generates words over a closed word vocabulary (:class:`WordVocab`). The mapped condition
also sets the GRU's initial state and is concatenated to every step's input: through the prefix alone a small GRU
learned to condition far too slowly (loss at the unconditional entropy after 500 steps on the synthetic corpus). A GRU stands in for
GPT-2 so that training runs in seconds on a CPU. Shared by every captioning method; nothing here is paper-specific.

    vocab = WordVocab.for_synthetic_world()
    gen = CaptionGenerator(vocab, cond_dim=128)
    train_mle(gen, text_embeddings, captions, steps=300)        # maximum likelihood, teacher forcing
    tokens, logp = gen.sample(image_embeddings, n=5)              # multinomial samples + their mean log-probs
    gen.decode(gen.greedy(image_embeddings))                      # -> list of caption strings
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["WordVocab", "CaptionGenerator", "train_mle", "PAD", "BOS", "EOS"]

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"


class WordVocab:
    """Word-level vocabulary: ids 0, 1, 2 are ``<pad>``, ``<bos>``, ``<eos>``; a comma is its own token."""

    def __init__(self, words: Sequence[str]):
        specials = [PAD, BOS, EOS]
        self.words = specials + sorted(set(words) - set(specials))
        self.index = {w: i for i, w in enumerate(self.words)}
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2

    def __len__(self) -> int:
        return len(self.words)

    @staticmethod
    def split(text: str) -> list[str]:
        return text.replace(",", " ,").split()

    @classmethod
    def from_texts(cls, texts: Sequence[str]) -> "WordVocab":
        return cls([w for t in texts for w in cls.split(t)])

    @classmethod
    def for_synthetic_world(cls) -> "WordVocab":
        """Every word a short caption of :mod:`cliplab.data.synthetic` can contain."""
        from ..data.synthetic.vocabulary import COLOURS, NUMBER_WORDS, PLURALS, SHAPES, SIZES, TEXTURES, WORDS

        words = ["a", "an", "and", ",", "with", "the", "to", "of", "left", "right", "above", "below", "word"]
        words += list(NUMBER_WORDS) + list(SIZES) + list(COLOURS) + list(TEXTURES) + list(SHAPES)
        words += list(PLURALS.values()) + [f'"{w}"' for w in WORDS]
        return cls(words)

    def encode(self, text: str) -> list[int]:
        """Word ids of ``text`` followed by ``<eos>``; unknown words raise ValueError."""
        ids = []
        for w in self.split(text):
            if w not in self.index:
                raise ValueError(f"word {w!r} is not in the vocabulary; build it with WordVocab.from_texts(corpus)")
            ids.append(self.index[w])
        return ids + [self.eos_id]

    def encode_batch(self, texts: Sequence[str], max_len: int | None = None) -> torch.Tensor:
        """``[N, L]`` ids padded with ``<pad>`` (each row ends with ``<eos>``; rows longer than ``max_len`` are cut)."""
        rows = [self.encode(t) for t in texts]
        length = max(len(r) for r in rows) if max_len is None else max_len
        out = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            r = r[:length]
            out[i, : len(r)] = torch.tensor(r)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Words up to the first ``<eos>`` (``<pad>``/``<bos>`` skipped), commas re-attached."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id):
                continue
            words.append(self.words[i])
        return " ".join(words).replace(" ,", ",")


def sequence_mask(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 for every position up to and including the first ``eos_id`` of each row, 0 after it."""
    is_eos = (tokens == eos_id).long()
    before = torch.cumsum(is_eos, dim=1) - is_eos  # number of EOS strictly before each position
    return (before == 0).float()


def _with_cond(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, c.expand(-1, x.shape[1], -1)], dim=-1)


class CaptionGenerator(nn.Module):
    """Embedding-prefixed GRU caption generator over a :class:`WordVocab`."""

    def __init__(self, vocab: WordVocab, cond_dim: int, hidden: int = 256, embed: int = 128, prefix_len: int = 4,
                 mapper_hidden: int = 256):
        super().__init__()
        self.vocab = vocab
        self.cond_dim, self.hidden, self.prefix_len = cond_dim, hidden, prefix_len
        self.sizes = dict(cond_dim=cond_dim, hidden=hidden, embed=embed, prefix_len=prefix_len,
                          mapper_hidden=mapper_hidden)
        # residual mapper x + MLP(x); zero last layer -> identity at init (the paper's Mapping_Network is residual)
        self.mapper = nn.Sequential(nn.Linear(cond_dim, mapper_hidden), nn.Tanh(), nn.Linear(mapper_hidden, cond_dim))
        nn.init.zeros_(self.mapper[2].weight)
        nn.init.zeros_(self.mapper[2].bias)
        self.to_prefix = nn.Linear(cond_dim, prefix_len * embed)
        self.to_h0 = nn.Linear(cond_dim, hidden)
        self.embed = nn.Embedding(len(vocab), embed)
        # the condition also enters every step's input (a small GRU conditions slowly through its state alone)
        self.cond_in = nn.Linear(cond_dim, embed)
        self.gru = nn.GRU(2 * embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, len(vocab))

    def map_condition(self, cond: torch.Tensor) -> torch.Tensor:
        """The residual mapper's output ``x + MLP(x)`` (``x`` L2-normalised first)."""
        x = F.normalize(cond.float(), dim=-1)
        return x + self.mapper(x)

    def _start(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Read the prefix and ``<bos>``: logits of the first word ``[B, V]``, the GRU state and the per-step
        condition input ``[B, 1, E]``."""
        z = self.map_condition(cond) * self.cond_dim ** 0.5  # unit scale per dimension: conditioning learns fast
        b = z.shape[0]
        c = self.cond_in(z).unsqueeze(1)
        prefix = self.to_prefix(z).view(b, self.prefix_len, -1)
        bos = self.embed(torch.full((b, 1), self.vocab.bos_id, dtype=torch.long, device=z.device))
        h0 = torch.tanh(self.to_h0(z)).unsqueeze(0)
        out, h = self.gru(_with_cond(torch.cat([prefix, bos], dim=1), c), h0)
        return self.head(out[:, -1]), h, c

    def forward(self, cond: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced next-word logits ``[B, L, V]`` for target ``tokens`` ``[B, L]``."""
        first, h, c = self._start(cond)
        if tokens.shape[1] == 1:
            return first.unsqueeze(1)
        out, _ = self.gru(_with_cond(self.embed(tokens[:, :-1]), c), h)
        return torch.cat([first.unsqueeze(1), self.head(out)], dim=1)

    def token_log_probs(self, cond: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position log-probs of ``tokens`` ``[B, L]`` and the mask of positions up to the first ``<eos>``."""
        logp = F.log_softmax(self.forward(cond, tokens), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        return logp, sequence_mask(tokens, self.vocab.eos_id)

    def sequence_log_prob(self, cond: torch.Tensor, tokens: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
        """Log-prob of each whole sequence, ``reduce="mean"`` over its words (the CgT-GAN code's choice) or "sum"."""
        logp, mask = self.token_log_probs(cond, tokens)
        total = (logp * mask).sum(1)
        if reduce == "sum":
            return total
        if reduce != "mean":
            raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
        return total / mask.sum(1).clamp_min(1)

    def sample(self, cond: torch.Tensor, n: int = 1, max_len: int = 20, greedy: bool = False,
               generator: torch.Generator | None = None, reduce: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` captions per row of ``cond``: ids ``[B*n, max_len]`` (image-major: rows ``i*n .. i*n+n-1`` belong
        to ``cond[i]``; ``<eos>`` forced at ``max_len``, ``<pad>`` after) and their log-probs ``[B*n]``
        (differentiable; ``reduce`` as in :meth:`sequence_log_prob`)."""
        cond = cond.repeat_interleave(n, dim=0)
        logits, h, c = self._start(cond)
        b = cond.shape[0]
        ids = torch.full((b, max_len), self.vocab.pad_id, dtype=torch.long, device=cond.device)
        logps, alive = [], torch.ones(b, dtype=torch.bool, device=cond.device)
        masks = []
        for t in range(max_len):
            logp_all = F.log_softmax(logits, dim=-1)
            if greedy:
                nxt = logp_all.argmax(-1)
            else:
                nxt = torch.multinomial(logp_all.detach().exp(), 1, generator=generator).squeeze(-1)
            if t == max_len - 1:
                nxt = torch.where(alive, torch.full_like(nxt, self.vocab.eos_id), nxt)
            nxt = torch.where(alive, nxt, torch.full_like(nxt, self.vocab.pad_id))
            ids[:, t] = nxt
            logps.append(logp_all.gather(-1, nxt.unsqueeze(-1)).squeeze(-1))
            masks.append(alive.float())
            alive = alive & (nxt != self.vocab.eos_id)
            if not alive.any():
                break
            out, h = self.gru(_with_cond(self.embed(nxt).unsqueeze(1), c), h)
            logits = self.head(out[:, 0])
        logp = torch.stack(logps, 1)
        mask = torch.stack(masks, 1)
        total = (logp * mask).sum(1)
        if reduce == "sum":
            return ids, total
        if reduce != "mean":
            raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
        return ids, total / mask.sum(1).clamp_min(1)

    @torch.no_grad()
    def greedy(self, cond: torch.Tensor, max_len: int = 20) -> torch.Tensor:
        """Greedy ids ``[B, max_len]``."""
        return self.sample(cond, 1, max_len=max_len, greedy=True)[0]

    def decode(self, ids: torch.Tensor) -> list[str]:
        return [self.vocab.decode(row.tolist()) for row in ids]

    def save(self, path) -> None:
        """One file with the vocabulary, the sizes and the weights (:meth:`load` reads it back)."""
        torch.save({"words": self.vocab.words, "sizes": self.sizes, "state_dict": self.state_dict()}, path)

    @classmethod
    def load(cls, path) -> "CaptionGenerator":
        blob = torch.load(path, map_location="cpu", weights_only=True)
        gen = cls(WordVocab(blob["words"]), **blob["sizes"])
        gen.load_state_dict(blob["state_dict"])
        return gen.eval()

    @torch.no_grad()
    def caption(self, cond: torch.Tensor, max_len: int = 20) -> list[str]:
        """Greedy captions of the embeddings ``cond`` ``[B, D]``."""
        was = self.training
        self.eval()
        try:
            return self.decode(self.greedy(cond, max_len=max_len))
        finally:
            self.train(was)


def train_mle(generator: CaptionGenerator, cond: torch.Tensor, captions: Sequence[str], steps: int = 300,
              batch_size: int = 64, lr: float = 3e-3, seed: int = 0, max_len: int = 20,
              noise: float = 0.0) -> list[float]:
    """Maximum-likelihood (teacher-forced cross-entropy) training on ``(cond[i], captions[i])`` pairs; Adam.
    ``noise``: std of Gaussian noise added to the (normalised) condition, 0 = none. Returns the loss per step."""
    if len(captions) != cond.shape[0]:
        raise ValueError(f"need one caption per condition row, got {len(captions)} captions for {cond.shape[0]} rows")
    tokens = generator.vocab.encode_batch(captions, max_len=max_len)
    mask = sequence_mask(tokens, generator.vocab.eos_id)
    cond = F.normalize(cond.float(), dim=-1)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(generator.parameters(), lr=lr)
    losses = []
    generator.train()
    for _ in range(steps):
        idx = torch.randint(0, len(captions), (min(batch_size, len(captions)),), generator=g)
        c = cond[idx]
        if noise > 0:
            c = c + noise * torch.randn(c.shape, generator=g)
        logits = generator(c, tokens[idx])
        nll = F.cross_entropy(logits.transpose(1, 2), tokens[idx], reduction="none")
        loss = (nll * mask[idx]).sum() / mask[idx].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses
