"""Hugging Face ``transformers`` SigLIP layout (``SiglipModel``): ``vision_model.*`` with the attention-probe
``head``, ``text_model.*`` with its biased ``head``, ``logit_scale`` and ``logit_bias``; plus conversion of its
``config.json`` / ``preprocessor_config.json`` both ways.

Only SigLIP's fixed-resolution architecture (``model_type`` ``"siglip"``, which Google's fixed-resolution SigLIP 2
checkpoints also use) is supported. ``model_type`` ``"siglip2"`` (NaFlex: a linear patch embedding on flattened
patches, variable resolution with resized position tables and a patch attention mask) is a different computation and
is refused with a clear error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..config import ModelConfig, PreprocessSettings, TextConfig, VisionConfig
from .base import CheckpointError, Layout, Rule, block_rules, count_blocks, register_layout
from .hf import BLOCK

# Defaults of transformers' SiglipTextConfig / SiglipVisionConfig: ``save_pretrained`` may omit values equal to them.
HF_TEXT_DEFAULTS = dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, max_position_embeddings=64, hidden_act="gelu_pytorch_tanh",
                        layer_norm_eps=1e-6, eos_token_id=1, projection_size=None)
HF_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
                          layer_norm_eps=1e-6, vision_use_head=True)
HF_ACTS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "quick_gelu": "quick_gelu"}
OUR_ACTS = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "quick_gelu": "quick_gelu"}
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)  # transformers' IMAGENET_STANDARD_MEAN / _STD
#: Released SigLIP towers whose heads are not 64 wide (the head count is not recorded in the weights).
HEADS_BY_WIDTH = {1152: 16}
HEAD_DIM = 64


@dataclass(frozen=True)
class ScalarRule(Rule):
    """A 0-d tensor of ours stored as shape ``[1]`` there (``logit_scale``, ``logit_bias``)."""

    def gather(self, theirs: dict[str, torch.Tensor]) -> torch.Tensor:
        (key,) = self.theirs
        return theirs[key].reshape(())

    def scatter(self, ours: torch.Tensor) -> dict[str, torch.Tensor]:
        (key,) = self.theirs
        return {key: ours.reshape(1)}


HEAD = [
    ("visual.head.probe", "head.probe"),
    ("visual.head.attn.qkv.weight", "head.attention.in_proj_weight"),
    ("visual.head.attn.qkv.bias", "head.attention.in_proj_bias"),
    ("visual.head.attn.out.weight", "head.attention.out_proj.weight"),
    ("visual.head.attn.out.bias", "head.attention.out_proj.bias"),
    ("visual.head.ln.weight", "head.layernorm.weight"),
    ("visual.head.ln.bias", "head.layernorm.bias"),
    ("visual.head.mlp.fc1.weight", "head.mlp.fc1.weight"),
    ("visual.head.mlp.fc1.bias", "head.mlp.fc1.bias"),
    ("visual.head.mlp.fc2.weight", "head.mlp.fc2.weight"),
    ("visual.head.mlp.fc2.bias", "head.mlp.fc2.bias"),
]


def is_siglip(cfg: ModelConfig) -> bool:
    """Whether ``cfg`` is the architecture this layout holds."""
    v, t = cfg.vision, cfg.text
    return (not v.is_resnet and not v.class_token and v.pool == "map" and v.patch_bias and not v.ln_pre
            and not v.proj and not v.stem_channels and not t.causal and t.pool == "last" and t.proj_bias
            and cfg.init_logit_bias is not None)


@register_layout
class SiglipLayout(Layout):
    name = "siglip"
    ignored_keys = ("position_ids",)

    def detect(self, state) -> bool:
        return "vision_model.head.probe" in state and "text_model.head.weight" in state

    def check_architecture(self, cfg: ModelConfig) -> None:
        super().check_architecture(cfg)
        if not is_siglip(cfg):
            raise CheckpointError(f"{cfg.name}: the siglip layout holds only SigLIP's architecture (no class token, "
                                  "probe head, bidirectional last-pooled text with a biased head, a logit bias)")

    def rules(self, cfg: ModelConfig) -> list[Rule]:
        v, t = "vision_model", "text_model"
        return [
            Rule("visual.patch_embed.weight", (f"{v}.embeddings.patch_embedding.weight",)),
            Rule("visual.patch_embed.bias", (f"{v}.embeddings.patch_embedding.bias",)),
            Rule("visual.pos_embed", (f"{v}.embeddings.position_embedding.weight",)),
            *block_rules("visual.transformer.blocks", f"{v}.encoder.layers", cfg.vision.layers, BLOCK),
            Rule("visual.ln_post.weight", (f"{v}.post_layernorm.weight",)),
            Rule("visual.ln_post.bias", (f"{v}.post_layernorm.bias",)),
            *(Rule(ours, (f"{v}.{theirs}",)) for ours, theirs in HEAD),
            Rule("text.token_embed.weight", (f"{t}.embeddings.token_embedding.weight",)),
            Rule("text.pos_embed", (f"{t}.embeddings.position_embedding.weight",)),
            *block_rules("text.transformer.blocks", f"{t}.encoder.layers", cfg.text.layers, BLOCK),
            Rule("text.ln_final.weight", (f"{t}.final_layer_norm.weight",)),
            Rule("text.ln_final.bias", (f"{t}.final_layer_norm.bias",)),
            Rule("text.proj.weight", (f"{t}.head.weight",)),
            Rule("text.proj.bias", (f"{t}.head.bias",)),
            ScalarRule("logit_scale", ("logit_scale",)),
            ScalarRule("logit_bias", ("logit_bias",)),
        ]

    def infer_config(self, state) -> ModelConfig:
        v, t = "vision_model", "text_model"
        patch = state[f"{v}.embeddings.patch_embedding.weight"]
        positions = state[f"{v}.embeddings.position_embedding.weight"].shape[0]
        grid = math.isqrt(positions)
        if grid * grid != positions:
            raise CheckpointError(f"vision position table of {positions} rows is not a square grid")
        width, text_width = patch.shape[0], state[f"{t}.final_layer_norm.weight"].shape[0]
        return siglip_config(
            name="inferred",
            image_size=grid * patch.shape[-1], patch_size=patch.shape[-1], width=width,
            layers=count_blocks(state, f"{v}.encoder.layers"), heads=_heads(width),
            mlp_dim=state[f"{v}.encoder.layers.0.mlp.fc1.weight"].shape[0],
            vocab_size=state[f"{t}.embeddings.token_embedding.weight"].shape[0],
            context_length=state[f"{t}.embeddings.position_embedding.weight"].shape[0],
            text_width=text_width, text_layers=count_blocks(state, f"{t}.encoder.layers"),
            text_heads=_heads(text_width),
            text_mlp=state[f"{t}.encoder.layers.0.mlp.fc1.weight"].shape[0],
            embed_dim=state[f"{t}.head.weight"].shape[0],
        )


def _heads(width: int) -> int:
    return HEADS_BY_WIDTH.get(width, max(1, width // HEAD_DIM))


def siglip_config(*, name: str, image_size: int, patch_size: int, width: int, layers: int, heads: int, mlp_dim: int,
                  vocab_size: int, context_length: int, text_width: int, text_layers: int, text_heads: int,
                  text_mlp: int, embed_dim: int, act: str = "gelu_tanh", text_act: str | None = None,
                  eps: float = 1e-6, eot_token_id: int = 1, tokenizer: str = "openai-clip-bpe",
                  preprocess: PreprocessSettings | None = None) -> ModelConfig:
    """A SigLIP-architecture config (the flags of :func:`is_siglip`); ``logit_scale`` init ``log 10``, bias -10."""
    if embed_dim != width:
        raise CheckpointError(f"SigLIP's image features are the vision width ({width}), but the text head gives "
                              f"{embed_dim}: the two towers do not share a space")
    return ModelConfig(
        name=name, embed_dim=embed_dim,
        vision=VisionConfig(image_size=image_size, patch_size=patch_size, width=width, layers=layers, heads=heads,
                            mlp_dim=mlp_dim, act=act, class_token=False, pool="map", patch_bias=True, ln_pre=False,
                            proj=False),
        text=TextConfig(context_length=context_length, vocab_size=vocab_size, width=text_width, layers=text_layers,
                        heads=text_heads, mlp_dim=text_mlp, act=text_act or act, eot_token_id=eot_token_id,
                        causal=False, pool="last", proj_bias=True),
        layer_norm_eps=eps, init_logit_scale=math.log(10.0), init_logit_bias=-10.0, tokenizer=tokenizer,
        preprocess=preprocess or siglip_preprocess(image_size),
    )


def siglip_preprocess(image_size: int, interpolation: str = "bicubic", mean=SIGLIP_MEAN,
                      std=SIGLIP_STD) -> PreprocessSettings:
    """SigLIP's image processor: resize straight to ``S x S`` (no crop), mean and std 0.5."""
    return PreprocessSettings(image_size=image_size, mean=tuple(mean), std=tuple(std), interpolation=interpolation,
                              crop_rounding="floor", resize_mode="squash")


def _act(name: str, where: str) -> str:
    if name not in HF_ACTS:
        raise CheckpointError(f"{where}: activation {name!r} is not supported (supported: {sorted(HF_ACTS)})")
    return HF_ACTS[name]


def _side(value, what: str) -> int:
    if isinstance(value, int):
        return value
    if len(set(value)) != 1:
        raise CheckpointError(f"vision_config: non-square {what} {list(value)} is not supported")
    return int(value[0])


def config_from_siglip(hf: dict[str, Any], preprocessor: dict[str, Any] | None = None,
                       name: str = "siglip") -> ModelConfig:
    """Our config from a transformers ``SiglipConfig`` dict (and optionally its ``preprocessor_config.json``)."""
    kind = hf.get("model_type")
    if kind == "siglip2":
        raise CheckpointError("model_type 'siglip2' (NaFlex: linear patch embedding on flattened patches, variable "
                              "resolution) is not supported; SigLIP 2's fixed-resolution checkpoints "
                              "(model_type 'siglip') are")
    if kind != "siglip":
        raise CheckpointError(f"config.json has model_type {kind!r}; the siglip layout reads 'siglip'")
    t = {**HF_TEXT_DEFAULTS, **(hf.get("text_config") or {})}
    v = {**HF_VISION_DEFAULTS, **(hf.get("vision_config") or {})}
    if not v["vision_use_head"]:
        raise CheckpointError("vision_config.vision_use_head is false: a SigLIP image tower without its probe head "
                              "gives no pooled features; not supported")
    if v["num_channels"] != 3:
        raise CheckpointError(f"vision_config.num_channels {v['num_channels']} is not supported (RGB only)")
    if t["layer_norm_eps"] != v["layer_norm_eps"]:
        raise CheckpointError("text and vision towers use different layer_norm_eps; not supported")
    image_size, patch_size = _side(v["image_size"], "image_size"), _side(v["patch_size"], "patch_size")
    eot = t.get("eos_token_id")
    return siglip_config(
        name=name, image_size=image_size, patch_size=patch_size, width=v["hidden_size"],
        layers=v["num_hidden_layers"], heads=v["num_attention_heads"], mlp_dim=v["intermediate_size"],
        act=_act(v["hidden_act"], "vision_config"), text_act=_act(t["hidden_act"], "text_config"),
        vocab_size=t["vocab_size"], context_length=t["max_position_embeddings"], text_width=t["hidden_size"],
        text_layers=t["num_hidden_layers"], text_heads=t["num_attention_heads"], text_mlp=t["intermediate_size"],
        embed_dim=t["projection_size"] or t["hidden_size"], eps=t["layer_norm_eps"],
        eot_token_id=eot if isinstance(eot, int) else 1,
        preprocess=preprocess_from_siglip(preprocessor, image_size),
    )


def preprocess_from_siglip(pre: dict[str, Any] | None, image_size: int) -> PreprocessSettings:
    if not pre:
        return siglip_preprocess(image_size)
    if pre.get("do_center_crop"):
        raise CheckpointError("preprocessor centre-crops; SigLIP's processor resizes to height x width without a crop")
    size = pre.get("size", {"height": image_size, "width": image_size})
    if not (isinstance(size, dict) and size.get("height") == image_size and size.get("width") == image_size):
        raise CheckpointError(f"preprocessor resizes to {size}; cliplab supports height == width == image_size "
                              f"({image_size}) for SigLIP")
    resample = {2: "bilinear", 3: "bicubic"}.get(pre.get("resample", 3))
    if resample is None:
        raise CheckpointError(f"preprocessor resample={pre.get('resample')} is not supported (2 bilinear, 3 bicubic)")
    return siglip_preprocess(image_size, resample, pre.get("image_mean", SIGLIP_MEAN),
                             pre.get("image_std", SIGLIP_STD))


def config_to_siglip(cfg: ModelConfig) -> dict[str, Any]:
    """A transformers ``SiglipConfig`` dict for ``cfg`` (``SiglipModel.from_pretrained`` reads it)."""
    if not is_siglip(cfg):
        raise CheckpointError(f"{cfg.name} is not a SigLIP architecture; write it in the 'hf' (CLIPModel) layout")
    for act in (cfg.vision.act, cfg.text.act):
        if act not in OUR_ACTS:
            raise CheckpointError(f"activation {act!r} has no transformers name")
    v, t = cfg.vision, cfg.text
    return {
        "model_type": "siglip",
        "architectures": ["SiglipModel"],
        "text_config": {"vocab_size": t.vocab_size, "hidden_size": t.width, "intermediate_size": t.mlp_dim,
                        "num_hidden_layers": t.layers, "num_attention_heads": t.heads,
                        "max_position_embeddings": t.context_length, "hidden_act": OUR_ACTS[t.act],
                        "layer_norm_eps": cfg.layer_norm_eps, "projection_size": cfg.embed_dim,
                        "eos_token_id": t.eot_token_id, "bos_token_id": None},
        "vision_config": {"hidden_size": v.width, "intermediate_size": v.mlp_dim, "num_hidden_layers": v.layers,
                          "num_attention_heads": v.heads, "image_size": v.image_size, "patch_size": v.patch_size,
                          "hidden_act": OUR_ACTS[v.act], "layer_norm_eps": cfg.layer_norm_eps,
                          "vision_use_head": True},
    }


def preprocessor_to_siglip(cfg: ModelConfig) -> dict[str, Any]:
    p = cfg.preprocess
    if p.resize_mode != "squash":
        raise CheckpointError(f"{cfg.name}: its preprocessing centre-crops; SigLIP's processor cannot express that")
    return {
        "image_processor_type": "SiglipImageProcessor", "do_resize": True,
        "size": {"height": p.image_size, "width": p.image_size},
        "resample": {"bilinear": 2, "bicubic": 3}[p.interpolation], "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(p.mean), "image_std": list(p.std), "do_convert_rgb": True,
    }
