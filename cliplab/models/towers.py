"""The two towers: a ViT image encoder (CLS pooling, or SigLIP's attention-probe head) and a text transformer
(causal with EOT pooling as CLIP's, or bidirectional pooled at the last position as SigLIP's)."""

from __future__ import annotations

import torch
from torch import nn

from .config import TextConfig, VisionConfig
from .hardware import slice_tokens
from .hooks import NO_HOOKS, Hooks, TowerOutput, run_blocks
from .stem import ConvStem
from .transformer import ProbeHead, Transformer, attention


#: At inference, a large batch runs through a tower in slices of about this many tokens (``rows x sequence``), one
#: slice after the other. Smaller working sets stay in cache: on the 2-core development CPU, ViT-B/32 encoded real
#: captions at 133 vs 94 texts/s (fp32) and 252 vs 198 (bf16) against whole batches of 256, and images at 19.0 vs
#: 17.4 per s (fp32; bf16 unchanged) against a batch of 64. The size follows the CPU's L2 cache: 512 tokens, or 2048
#: where a core has 2 MiB or more (:func:`cliplab.models.hardware.slice_tokens`). Under autograd (training) the batch
#: runs whole.
SLICE_TOKENS = slice_tokens()


def slice_rows(rows: int, tokens_per_row: int) -> int:
    """Rows per inference slice of a batch with ``tokens_per_row`` tokens each (all of them under autograd).

    The slices are as even as their count allows (64 ViT-B/32 images at 2048 tokens: 32 + 32, not 40 + 24): a
    compiled tower then runs one shape, not two, which was worth 10-15% on 2 AMX cores (docs/fast_path.md)."""
    if torch.is_grad_enabled():
        return rows
    most = max(1, SLICE_TOKENS // max(1, tokens_per_row))
    if not isinstance(rows, int):  # a symbolic batch size (ONNX export, dynamic shapes): a step that is not its function
        return most
    slices = -(-rows // most)
    return -(-rows // slices)


def _take_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[b, idx[b]]`` for ``x`` ``[B, N, C]`` and ``idx`` ``[B, K]``."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class VisionTower(nn.Module):
    """A ViT. CLIP's: class token, pre-LayerNorm, CLS pooling and a projection. SigLIP's (``class_token=False``,
    ``patch_bias``, ``ln_pre=False``, ``pool="map"``, ``proj=False``): patch tokens only, an attention-probe head
    (:class:`~cliplab.models.transformer.ProbeHead`) after the final LayerNorm, features of the tower's width."""

    def __init__(self, cfg: VisionConfig, embed_dim: int, eps: float):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        if cfg.stem_channels:  # hybrid ViT: CNN features, then a per-token linear map to the width
            self.stem = ConvStem(cfg.stem_channels)
            self.patch_embed = nn.Conv2d(self.stem.out_channels, w, kernel_size=1, bias=cfg.patch_bias)
        else:
            self.stem = nn.Identity()
            self.patch_embed = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=cfg.patch_bias)
        #: tokens before the patches: the class token, or none (SigLIP)
        self.n_prefix = int(cfg.class_token)
        if cfg.class_token:
            self.class_embedding = nn.Parameter(torch.empty(w))
        self.pos_embed = nn.Parameter(torch.empty(cfg.num_positions, w))
        self.ln_pre = nn.LayerNorm(w, eps=eps) if cfg.ln_pre else nn.Identity()
        self.transformer = Transformer(w, cfg.layers, cfg.heads, cfg.mlp_dim, cfg.act, eps)
        self.ln_post = nn.LayerNorm(w, eps=eps)
        self.head = ProbeHead(w, cfg.heads, cfg.mlp_dim, cfg.act, eps) if cfg.pool == "map" else None
        self.proj = nn.Linear(w, embed_dim, bias=False) if cfg.proj else None
        # Max-skip: a side path from the stem's features straight to the output (see cliplab.models.stem).
        self.stem_skip = nn.Linear(self.stem.out_channels, embed_dim, bias=False) if cfg.stem_max_skip else None

    def embed_patches(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, 3, H, W]`` -> ``[B, n_prefix + grid**2, width]``: CLS (none for SigLIP) then patch
        embeddings, no positions yet."""
        return self._embed(pixels)[0]

    def _embed(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """CLS + patch embeddings, and the max-skip's per-patch stem features ``[B, grid**2, C]`` (``None``
        without a max-skip)."""
        if pixels.shape[-2:] != (self.cfg.image_size, self.cfg.image_size):
            raise ValueError(
                f"expected images of {self.cfg.image_size}x{self.cfg.image_size}, got {tuple(pixels.shape[-2:])}; "
                "use model.preprocess(...) to resize"
            )
        features = self.stem(pixels.to(self.patch_embed.weight.dtype))
        x = self.patch_embed(features).flatten(2).transpose(1, 2)
        skip_features = features.flatten(2).transpose(1, 2) if self.stem_skip is not None else None
        if not self.n_prefix:
            return x, skip_features
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1), skip_features

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's output ``[B, n, W]`` -> pooled features: CLS through ``ln_post`` (and ``proj``), or
        the probe head over every token after ``ln_post``."""
        pooled = self.ln_post(x[:, 0]) if self.head is None else self.head(self.ln_post(x))
        return pooled if self.proj is None else self.proj(pooled)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        step = slice_rows(pixels.shape[0], self.cfg.num_positions)
        if pixels.shape[0] > step:
            return torch.cat([self._forward(chunk) for chunk in pixels.split(step)])
        return self._forward(pixels)

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x, skip_features = self._embed(pixels)
        x = self.transformer(self.ln_pre(x + self.pos_embed.to(self.patch_embed.weight.dtype)))
        pooled = self.pool(x)
        if skip_features is not None:
            pooled = pooled + self.stem_skip(skip_features.amax(1))
        return pooled

    def forward_rich(self, pixels: torch.Tensor, *, hooks: Hooks = NO_HOOKS, want: frozenset = frozenset(),
                     keep: torch.Tensor | None = None, prompts: torch.Tensor | None = None) -> TowerOutput:
        """The forward pass with hook sites and optional outputs (see :mod:`cliplab.models.hooks`).

        ``keep``: patch indices to keep (``[K]`` or ``[B, K]``, into the ``grid**2`` patches), dropped after positions
        are added so kept patches keep their positions; CLS is always kept. ``prompts``: extra tokens ``[P, W]`` or
        ``[B, P, W]`` inserted right after CLS (visual prompt tuning; first without a class token), before ``ln_pre``.

        Shapes (``n = n_prefix + P + K`` tokens in the blocks, ``n_prefix`` 1 with a class token, 0 for SigLIP):
        ``hidden`` ``layers + 1`` tensors ``[B, n, W]``; ``attn`` ``layers`` tensors ``[B, H, n, n]``; ``tokens``
        ``[B, 1 + P + K, D]``, row 0 the pooled output. CLIP: the other rows are every token through ``ln_post``
        and ``proj``. SigLIP (probe head): row ``1 + i`` is token ``i`` (prompts, then patches) after ``ln_post``
        through the head's value path as if it attended only to itself, ``out(v(x_i))``, then the head's residual
        MLP (``y + mlp(ln(y))``); with ``attn`` the probe's own attention ``[B, H, 1, n]`` is in
        ``extras["head_attn"]``.
        """
        x, skip_features = self._embed(pixels)
        x = hooks.input("image", x)
        x = x + hooks.positions("image", self.pos_embed.to(x.dtype))
        k = self.n_prefix
        if keep is not None:
            idx = keep.to(x.device).expand(x.shape[0], -1) if keep.dim() == 1 else keep.to(x.device)
            x = torch.cat([x[:, :k], _take_rows(x[:, k:], idx)], dim=1)
            if skip_features is not None:  # dropped patches leave the max-skip too
                skip_features = _take_rows(skip_features, idx)
        n_prompts = 0
        if prompts is not None:
            p = prompts.to(x.dtype)
            p = p.expand(x.shape[0], -1, -1) if p.dim() == 2 else p
            n_prompts = p.shape[1]
            x = torch.cat([x[:, :k], p, x[:, k:]], dim=1)
        x, hidden, attn = run_blocks(self.transformer, self.ln_pre(x), None, "image", hooks, want)
        extras = {}
        if self.head is None:
            pooled = self.pool(x)
        else:
            pooled, extras = self._probe_pool(self.ln_post(x), "attn" in want)
        if skip_features is not None:
            pooled = pooled + self.stem_skip(skip_features.amax(1))
        tokens = None
        if "tokens" in want or hooks.edits_tokens("image"):
            tokens = self._token_outputs(x, pooled)
            if skip_features is not None:  # each patch token gains its own cell's stem feature
                tokens[:, 1 + n_prompts:] += self.stem_skip(skip_features)
            tokens[:, 0] = pooled  # the same bits as the pooled output (one matmul, not two)
            edited = hooks.tokens("image", tokens)
            if edited is not tokens:
                pooled, tokens = edited[:, 0], edited
        index = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        g = self.cfg.grid_size
        extras.update({"grid": (g, g), "n_prompts": n_prompts, "keep": keep})
        return TowerOutput(pooled, index, tokens if "tokens" in want else None, hidden, attn, extras)

    def _probe_pool(self, x: torch.Tensor, record: bool) -> tuple[torch.Tensor, dict]:
        """The probe head on ``ln_post``'s output; with ``record``, its attention probabilities as well."""
        if not record:
            pooled = self.head(x)
        else:
            probe = self.head.probe.to(x.dtype).expand(x.shape[0], -1, -1)
            q, k, v = self.head.attn.project(probe, x)
            probs = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1)
            # the output itself from the fused kernel, as the plain path computes it
            pooled = self.head.finish(self.head.attn.merge_heads(attention(q, k, v)))[:, 0]
        pooled = pooled if self.proj is None else self.proj(pooled)
        return pooled, ({"head_attn": probs} if record else {})

    def _token_outputs(self, x: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """``[B, 1 + n - n_prefix, D]``: a row for the pooled output (filled by the caller), then every token in
        the joint space (see :meth:`forward_rich`)."""
        if self.head is None:
            tokens = self.ln_post(x)
        else:
            y = self.ln_post(x)
            tokens = torch.cat([y[:, :1], self.head.finish(self.head.attn.value_path(y))], dim=1)
        return tokens if self.proj is None else self.proj(tokens)

    @torch.no_grad()
    def init_weights(self) -> None:
        scale = self.cfg.width**-0.5
        nn.init.normal_(self.patch_embed.weight, std=0.02)
        if isinstance(self.stem, ConvStem):
            self.stem.init_weights()
        if self.stem_skip is not None:
            # Small, so the side path starts as a perturbation of the CLS output (the measured contrastive run's init).
            nn.init.normal_(self.stem_skip.weight, std=0.1 * self.stem.out_channels**-0.5)
        if self.patch_embed.bias is not None:
            nn.init.zeros_(self.patch_embed.bias)
        if self.n_prefix:
            nn.init.normal_(self.class_embedding, std=scale)
        nn.init.normal_(self.pos_embed, std=scale)
        if self.proj is not None:
            nn.init.normal_(self.proj.weight, std=scale)
        if self.head is not None:
            self.head.init_weights()
        self.transformer.init_weights()


class TextTower(nn.Module):
    def __init__(self, cfg: TextConfig, embed_dim: int, eps: float):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.token_embed = nn.Embedding(cfg.vocab_size, w)
        self.pos_embed = nn.Parameter(torch.empty(cfg.context_length, w))
        self.transformer = Transformer(w, cfg.layers, cfg.heads, cfg.mlp_dim, cfg.act, eps)
        self.ln_final = nn.LayerNorm(w, eps=eps)
        self.proj = nn.Linear(w, embed_dim, bias=cfg.proj_bias)

    def eot_index(self, ids: torch.Tensor) -> torch.Tensor:
        """The pooled position of each row: the first end-of-text token (``pool="eot"``), or the last position
        (``pool="last"``, SigLIP: every row padded to the same fixed length).

        Rows without an EOT fall back to the position of the largest id, which is what OpenAI's code does for every
        row.
        """
        if self.cfg.pool == "last":
            return torch.full(ids.shape[:1], ids.shape[-1] - 1, dtype=torch.long, device=ids.device)
        is_eot = ids == self.cfg.eot_token_id
        return torch.where(is_eot.any(-1), is_eot.int().argmax(-1), ids.argmax(-1))

    def attn_mask(self, n: int, like: torch.Tensor) -> torch.Tensor | None:
        """The causal mask, or ``None`` for a bidirectional tower (SigLIP)."""
        return self.causal_mask(n, like) if self.cfg.causal else None

    @staticmethod
    def causal_mask(n: int, like: torch.Tensor) -> torch.Tensor:
        """Additive causal mask ``[n, n]`` (0 on and below the diagonal, -inf above).

        A float mask rather than ``is_causal`` so that an additive attention bias of zero is bit-exactly a no-op."""
        return torch.full((n, n), float("-inf"), dtype=like.dtype, device=like.device).triu_(1)

    def _cut(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if ids.shape[-1] > self.cfg.context_length:
            raise ValueError(f"token ids have length {ids.shape[-1]} > context length {self.cfg.context_length}")
        eot = self.eot_index(ids)
        if not (self.cfg.causal and self.cfg.pool == "eot"):  # bidirectional or last-pooled: padding counts
            return ids, eot
        # Causal attention means nothing after the EOT token can change the pooled output: cut the batch to its
        # longest real sequence (an exact saving; padding to 77 wastes most of the compute on short captions).
        return ids[:, : int(eot.max()) + 1], eot

    def forward(self, ids: torch.Tensor, padded=None) -> torch.Tensor:
        """``padded``: what runs each cut batch, :meth:`forward_padded` unless given (a compiled copy of it: the cut
        depends on the data, so it stays outside the compiled graph)."""
        padded = padded or self.forward_padded
        ids, eot = self._cut(ids)
        step = slice_rows(ids.shape[0], ids.shape[1])
        if ids.shape[0] > step:  # each slice is cut again, to its own longest text
            return torch.cat([padded(*self._cut(chunk)) for chunk in ids.split(step)])
        return padded(ids, eot)

    def forward_padded(self, ids: torch.Tensor, eot: torch.Tensor | None = None) -> torch.Tensor:
        """The forward pass on ``ids`` as given, without cutting the padding (the shape stays static, as ONNX export
        needs). Exact for any padding after EOT, only slower than :meth:`forward` (for a causal EOT-pooled tower;
        a SigLIP tower is never cut)."""
        eot = self.eot_index(ids) if eot is None else eot
        x = self.token_embed(ids) + self.pos_embed[: ids.shape[1]]
        x = self.ln_final(self.transformer(x, attn_mask=self.attn_mask(ids.shape[1], x)))
        return self.proj(x[torch.arange(x.shape[0], device=x.device), eot])

    def forward_rich(self, ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                     eot_index: torch.Tensor | None = None, hooks: Hooks = NO_HOOKS, want: frozenset = frozenset(),
                     keep_padding: bool = False) -> TowerOutput:
        """The forward pass with hook sites and optional outputs (see :mod:`cliplab.models.hooks`).

        Runs from token ``ids`` or from ``inputs_embeds`` ``[B, n, W]`` (token embeddings before positions, e.g.
        learned context vectors or pseudo-words); with embeddings, ``eot_index`` (or ``ids`` to find it) says where
        to pool (a last-pooled tower, SigLIP, defaults to the last position). Batches of ids are cut to the longest
        EOT like the plain path unless ``keep_padding`` (a SigLIP tower is never cut). Shapes: ``hidden``
        ``layers + 1`` tensors ``[B, n, W]``, ``attn`` ``layers`` tensors ``[B, H, n, n]``, ``final`` ``[B, n, W]``
        (every position through ``ln_final``, before the projection: the ``final`` hook site), ``tokens``
        ``[B, n, D]`` (``final`` through the projection; the pooled row is ``pooled``).
        """
        if inputs_embeds is None:
            if ids is None:
                raise ValueError("pass token ids or inputs_embeds")
            if keep_padding:
                eot = self.eot_index(ids)
            else:
                ids, eot = self._cut(ids)
            x = self.token_embed(ids)
        else:
            x = inputs_embeds
            eot = eot_index if eot_index is not None else (self.eot_index(ids) if ids is not None else None)
            if eot is None and self.cfg.pool == "last":
                eot = self.eot_index(x[..., 0])
            if eot is None:
                raise ValueError("inputs_embeds needs eot_index (or ids) to know which position to pool")
        n = x.shape[1]
        if n > self.cfg.context_length:
            raise ValueError(f"sequence length {n} > context length {self.cfg.context_length}")
        eot = eot.to(x.device)
        x = hooks.input("text", x)
        x = x + hooks.positions("text", self.pos_embed[:n])
        x, hidden, attn = run_blocks(self.transformer, x, self.attn_mask(n, x), "text", hooks, want)
        x = self.ln_final(x)
        if hooks.edits_final("text"):  # the conditioning site of SD 1.x: the projection and pooling read the edit
            x = hooks.final("text", x)
        rows = torch.arange(x.shape[0], device=x.device)
        pooled = self.proj(x[rows, eot])
        tokens = None
        if "tokens" in want or hooks.edits_tokens("text"):
            tokens = self.proj(x)
            tokens[rows, eot] = pooled  # the same bits as the pooled output (one matmul, not two)
            edited = hooks.tokens("text", tokens)
            if edited is not tokens:
                pooled, tokens = edited[rows, eot], edited
        return TowerOutput(pooled, eot, tokens if "tokens" in want else None, hidden, attn,
                           final=x if "final" in want else None)

    def resize_positions(self, table: torch.Tensor) -> None:
        """Replace the positional table (``[n, width]``), changing the context length to ``n``; the model's
        tokenizer follows (``CLIP.set_context_length`` calls this)."""
        if table.dim() != 2 or table.shape[1] != self.cfg.width:
            raise ValueError(f"positional table must be [n, {self.cfg.width}], got {tuple(table.shape)}")
        self.pos_embed = nn.Parameter(table.detach().clone().to(self.pos_embed), requires_grad=True)
        self.cfg.context_length = table.shape[0]

    @torch.no_grad()
    def init_weights(self) -> None:
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        nn.init.normal_(self.proj.weight, std=self.cfg.width**-0.5)
        if self.proj.bias is not None:
            nn.init.zeros_(self.proj.bias)
        self.transformer.init_weights()
