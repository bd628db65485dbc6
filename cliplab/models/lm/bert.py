"""A BERT-style bidirectional text encoder (post-LayerNorm blocks, learned absolute positions), e.g.
all-MiniLM-L6-v2, with the token-level views of the CLIP towers.

``BertEncoder.forward`` returns a :class:`~cliplab.models.hooks.TowerOutput` whose ``tokens`` are the last layer's
states ``[B, n, W]`` (what sentence-transformers pools), ``pooled`` the ``[CLS]`` state, and, on request, ``hidden``
(``layers + 1`` streams: the embeddings after their LayerNorm, then each block's output, as ``transformers``'
``hidden_states``) and ``attn`` (probabilities per layer). Hook sites (tower ``"text"``): ``input`` (word
embeddings), ``positions`` (the position table about to be added), ``attn_bias``, ``attn_probs``, ``resid`` (after
each block) and ``tokens`` (the final states). Padding is masked in attention, so a row's states do not depend on
how long the other rows of its batch are.

Weights load from a Hugging Face ``BertModel`` folder (``config.json`` + ``model.safetensors``) by
:func:`load_bert`; q, k and v are fused into one projection (one matmul instead of three).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import TOWER, TextTransformer
from ..hooks import Hooks, TowerOutput, attend
from ..layouts.base import CheckpointError, Rule, block_rules, describe_key_problems
from ..transformer import Attention



@dataclass
class BertConfig:
    vocab_size: int = 30522
    width: int = 384
    layers: int = 6
    heads: int = 12
    mlp_dim: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    eps: float = 1e-12
    act: str = "gelu"
    pad_id: int = 0

    @classmethod
    def from_hf(cls, hf: dict) -> "BertConfig":
        if hf.get("model_type", "bert") != "bert":
            raise CheckpointError(f"config.json has model_type {hf.get('model_type')!r}, expected 'bert'")
        if hf.get("hidden_act", "gelu") != "gelu":
            raise CheckpointError(f"hidden_act {hf['hidden_act']!r} is not supported (only exact 'gelu')")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise CheckpointError("only absolute position embeddings are supported")
        return cls(vocab_size=hf["vocab_size"], width=hf["hidden_size"], layers=hf["num_hidden_layers"],
                   heads=hf["num_attention_heads"], mlp_dim=hf["intermediate_size"],
                   max_positions=hf["max_position_embeddings"], type_vocab_size=hf.get("type_vocab_size", 2),
                   eps=hf.get("layer_norm_eps", 1e-12), pad_id=hf.get("pad_token_id", 0))


class BertBlock(nn.Module):
    """Post-LN: ``x = LN(x + attn(x)); x = LN(x + mlp(x))``."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attn = Attention(cfg.width, cfg.heads)
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None, layer: int, hooks: Hooks,
                record: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        q, k, v = self.attn.split_heads(x)
        y, probs = attend(q, k, v, mask, TOWER, layer, hooks, record)
        x = self.ln_1(x + self.attn.merge_heads(y))
        return self.ln_2(x + self.fc2(F.gelu(self.fc1(x)))), probs


class BertEncoder(TextTransformer):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Embedding(cfg.max_positions, cfg.width)
        self.type_embed = nn.Embedding(cfg.type_vocab_size, cfg.width)
        self.ln_embed = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.blocks = nn.ModuleList(BertBlock(cfg) for _ in range(cfg.layers))

    def forward(self, ids: torch.Tensor | None = None, mask: torch.Tensor | None = None, *,
                inputs_embeds: torch.Tensor | None = None, hooks: Hooks | None = None, output=False) -> TowerOutput:
        """Token ids ``[B, n]`` (or ``inputs_embeds`` ``[B, n, W]``, word embeddings before positions) and the mask
        of real tokens ``[B, n]`` (None: all real) -> :class:`TowerOutput` (see the module docstring)."""
        x, hooks, want = self.begin(ids, inputs_embeds, hooks, output)
        b, n, _ = x.shape
        if n > self.cfg.max_positions:
            raise ValueError(f"sequence length {n} > the model's {self.cfg.max_positions} positions")
        x = hooks.input(TOWER, x)
        x = x + hooks.positions(TOWER, self.pos_embed.weight[:n]) + self.type_embed.weight[0]
        x = self.ln_embed(x)
        bias = None
        if mask is not None and not bool(mask.all()):
            # additive key mask [B, 1, 1, n]: padding receives no attention
            bias = torch.zeros(b, 1, 1, n, dtype=x.dtype, device=x.device).masked_fill_(
                ~mask.to(x.device)[:, None, None, :], float("-inf"))
        x, hidden, attn = self.run_blocks(x, hooks, want, mask=bias)
        if hooks.edits_tokens(TOWER):
            x = hooks.tokens(TOWER, x)
        index = torch.zeros(b, dtype=torch.long, device=x.device)
        return TowerOutput(x[:, 0], index, x, hidden, attn)


# --- Hugging Face BertModel layout ------------------------------------------------------------------------------------
_BLOCK = [
    ("attn.qkv.weight", tuple(f"attention.self.{p}.weight" for p in ("query", "key", "value")), "concat"),
    ("attn.qkv.bias", tuple(f"attention.self.{p}.bias" for p in ("query", "key", "value")), "concat"),
    ("attn.out.weight", ("attention.output.dense.weight",), "same"),
    ("attn.out.bias", ("attention.output.dense.bias",), "same"),
    ("ln_1.weight", ("attention.output.LayerNorm.weight",), "same"),
    ("ln_1.bias", ("attention.output.LayerNorm.bias",), "same"),
    ("fc1.weight", ("intermediate.dense.weight",), "same"),
    ("fc1.bias", ("intermediate.dense.bias",), "same"),
    ("fc2.weight", ("output.dense.weight",), "same"),
    ("fc2.bias", ("output.dense.bias",), "same"),
    ("ln_2.weight", ("output.LayerNorm.weight",), "same"),
    ("ln_2.bias", ("output.LayerNorm.bias",), "same"),
]


def hf_bert_rules(cfg: BertConfig) -> list[Rule]:
    e = "embeddings"
    return [
        Rule("token_embed.weight", (f"{e}.word_embeddings.weight",)),
        Rule("pos_embed.weight", (f"{e}.position_embeddings.weight",)),
        Rule("type_embed.weight", (f"{e}.token_type_embeddings.weight",)),
        Rule("ln_embed.weight", (f"{e}.LayerNorm.weight",)),
        Rule("ln_embed.bias", (f"{e}.LayerNorm.bias",)),
        *block_rules("blocks", "encoder.layer", cfg.layers, _BLOCK),
    ]


def bert_from_hf_state(state: dict[str, torch.Tensor], cfg: BertConfig) -> BertEncoder:
    """Our encoder holding a ``BertModel`` state dict (``bert.`` prefixes and the unused pooler are dropped)."""
    if state and all(k.startswith("bert.") for k in state if not k.startswith("cls.")):
        state = {k[len("bert."):]: v for k, v in state.items() if k.startswith("bert.")}
    state = {k: v for k, v in state.items() if not k.startswith("pooler.") and not k.endswith("position_ids")}
    rules = hf_bert_rules(cfg)
    missing = sorted(k for r in rules for k in r.theirs if k not in state)
    unexpected = sorted(set(state) - {k for r in rules for k in r.theirs})
    if missing or unexpected:
        raise CheckpointError(describe_key_problems("hf-bert", "bert", missing, unexpected, []))
    model = BertEncoder(cfg)
    ours = {r.ours: r.gather(state).float().clone() for r in rules}
    model.load_state_dict(ours, strict=True)
    return model.eval()


def load_bert(directory: str | Path) -> BertEncoder:
    """A ``BertModel`` folder saved by ``transformers`` (``config.json`` + ``model.safetensors``)."""
    from safetensors.torch import load_file

    d = Path(directory)
    cfg = BertConfig.from_hf(json.loads((d / "config.json").read_text()))
    weights = d / "model.safetensors"
    if not weights.exists():
        raise CheckpointError(f"{d}: no model.safetensors")
    return bert_from_hf_state(load_file(str(weights)), cfg)
