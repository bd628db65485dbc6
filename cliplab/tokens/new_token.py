"""A trainable new token ``S*``: one input-embedding row, injected through the text tower's ``inputs_embeds`` path.

Textual-inversion-style methods (CoRe, ``cliplab.t2i.core``) learn one vector in a text tower's **input** embedding
space (token embeddings, before the positional table) and leave every weight of the model untouched. Here:

* a prompt names the new concept with a ``placeholder`` (``"S*"``); before tokenizing, it is replaced by a
  ``carrier`` word that the tokenizer keeps as one token (``"sks"``, a rare word: on ``shapes-tiny`` its row was never
  trained). Every position holding the carrier's id gets :attr:`NewToken.vector` instead of the table's row;
* :meth:`NewToken.encode` runs ``model.encode_text(inputs_embeds=..., eot_index=...)`` on the batch cut to its
  longest prompt (as the plain ids path cuts it), so a prompt without ``S*`` encodes bit-identically to the plain
  path, and gradients reach only :attr:`NewToken.vector` (the model's parameters may stay frozen);
* :meth:`NewToken.install` writes the vector into a model's embedding table (the carrier's row, nothing else), for
  consumers that only take text: ``conditioner("a sks and a blue square")`` then reads the learned concept;
* :meth:`NewToken.save` / :meth:`NewToken.load`: ``new_token.safetensors`` + ``new_token.json``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..models.hooks import TowerOutput
from ..models.tokenizer import TokenizedBatch

__all__ = ["NewToken", "single_token_id", "embedding_table"]


def embedding_table(model) -> nn.Embedding:
    """The text tower's input token-embedding table (``model.text.token_embed``)."""
    table = getattr(getattr(model, "text", None), "token_embed", None)
    if not isinstance(table, nn.Embedding):
        raise ValueError("this model has no text.token_embed table: a new token needs a cliplab CLIP text tower")
    return table


def single_token_id(model, word: str) -> int:
    """The id of ``word`` when the model's tokenizer keeps it as exactly one token (ValueError otherwise)."""
    batch = model.tokenize([word])
    length = int(batch.lengths[0])
    body = batch.ids[0, 1:length - 1].tolist()  # drop SOT and EOT
    if len(body) != 1:
        raise ValueError(f"{word!r} is {len(body)} tokens for this tokenizer; pick a word that is one token")
    return int(body[0])


class NewToken(nn.Module):
    """One trainable input-embedding row for ``placeholder`` (default ``"S*"``), carried by the one-token word
    ``carrier``. The initial vector is ``init`` if given, else the row of ``init_word`` (the class word, as textual
    inversion initialises), else the carrier's own row. The model is held by reference, not as a submodule, so
    ``new_token.parameters()`` is the vector alone."""

    def __init__(self, model, placeholder: str = "S*", carrier: str = "sks", init_word: str | None = None,
                 init: torch.Tensor | None = None) -> None:
        super().__init__()
        if not placeholder.strip():
            raise ValueError("placeholder must be a non-empty string, e.g. 'S*'")
        table = embedding_table(model)
        self.__dict__["model"] = model  # not a submodule: its parameters are not ours
        self.placeholder, self.carrier, self.init_word = placeholder, carrier, init_word
        self.token_id = single_token_id(model, carrier)
        if init is None:
            source = self.token_id if init_word is None else single_token_id(model, init_word)
            init = table.weight[source]
        init = init.detach().reshape(-1).to(torch.float32).clone()
        if init.numel() != table.embedding_dim:
            raise ValueError(f"init has {init.numel()} values; the table's width is {table.embedding_dim}")
        self.vector = nn.Parameter(init)
        self._carrier_re = re.compile(rf"(?<![\w]){re.escape(carrier)}(?![\w])", re.IGNORECASE)

    # -------------------------------------------------------------- text -> tokens
    def prepare(self, texts: str | Sequence[str]) -> list[str]:
        """Texts with the placeholder replaced by the carrier word (refuses texts that already use the carrier)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = []
        for t in texts:
            if self._carrier_re.search(t):
                raise ValueError(f"{t!r} already contains the carrier word {self.carrier!r}: pick another carrier")
            out.append(t.replace(self.placeholder, self.carrier))
        return out

    def tokenize(self, texts: str | Sequence[str]) -> TokenizedBatch:
        return self.model.tokenize(self.prepare(texts))

    def positions(self, ids: torch.Tensor) -> torch.Tensor:
        """Bool mask ``[B, n]``: where the new token sits in token ids ``ids``."""
        return ids == self.token_id

    def inputs_embeds(self, batch: TokenizedBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(embeds [B, n, W], eot [B], new_token_mask [B, n])`` for ``batch`` cut to its longest prompt (a
        last-pooled batch, SigLIP, is never cut); the new token's rows are :attr:`vector` (with gradients), every
        other row the table's."""
        n = batch.ids.shape[1] if batch.pool == "last" else int(batch.lengths.max())
        ids = batch.ids[:, :n].to(self.vector.device)
        base = embedding_table(self.model)(ids)
        where = self.positions(ids)
        embeds = torch.where(where[..., None], self.vector.to(base.dtype), base)
        return embeds, batch.eot_index.to(ids.device), where

    def encode(self, texts: str | Sequence[str] | TokenizedBatch, output="final", **kwargs) -> TowerOutput:
        """``model.encode_text`` of ``texts`` (placeholders replaced) with the new token injected; ``output`` and
        every other keyword go to ``encode_text``. The result's ``extras['new_token']`` is the ``[B, n]`` mask of
        the new token's positions."""
        batch = texts if isinstance(texts, TokenizedBatch) else self.tokenize(texts)
        embeds, eot, where = self.inputs_embeds(batch)
        out = self.model.encode_text(inputs_embeds=embeds, eot_index=eot, output=output, **kwargs)
        out.extras["batch"] = batch
        out.extras["new_token"] = where
        return out

    # -------------------------------------------------------------- install / save / load
    @torch.no_grad()
    def install(self, model=None):
        """Write :attr:`vector` into the carrier's row of ``model``'s table (default: the model this token was
        made for); every other row is left as it was. Returns the model."""
        model = self.model if model is None else model
        table = embedding_table(model)
        table.weight[self.token_id] = self.vector.detach().to(table.weight)
        return model

    def save(self, directory: str | Path, info: dict | None = None) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file({"vector": self.vector.detach().contiguous()}, str(d / "new_token.safetensors"))
        meta = {"format": "cliplab-new-token", "placeholder": self.placeholder, "carrier": self.carrier,
                "token_id": self.token_id, "init_word": self.init_word, "info": dict(info or {})}
        (d / "new_token.json").write_text(json.dumps(meta, indent=2) + "\n")
        return d

    @classmethod
    def load(cls, directory: str | Path, model) -> "NewToken":
        d = Path(directory)
        meta_path = d / "new_token.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{d} holds no saved new token (no new_token.json)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != "cliplab-new-token":
            raise ValueError(f"{meta_path} is not a cliplab new-token file")
        vector = load_file(str(d / "new_token.safetensors"))["vector"]
        token = cls(model, placeholder=meta["placeholder"], carrier=meta["carrier"], init_word=meta["init_word"],
                    init=vector)
        if token.token_id != meta["token_id"]:
            raise ValueError(f"the carrier {meta['carrier']!r} has id {token.token_id} for this model, "
                             f"{meta['token_id']} when saved: load it with the model it was learned for")
        token.info = meta.get("info", {})
        return token
