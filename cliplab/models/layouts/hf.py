"""Hugging Face ``transformers`` layout (``CLIPModel``): separate q/k/v projections, ``text_model.*``,
``vision_model.*``; plus conversion of its ``config.json`` / ``preprocessor_config.json``.

``transformers`` centre-crops with a floored offset, so models from this layout record ``crop_rounding="floor"``.
"""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig, PreprocessSettings, TextConfig, VisionConfig
from .base import CheckpointError, Layout, Rule, block_rules, count_blocks, get_layout, register_layout
from .shapes import config_from_shapes

BLOCK = [
    ("ln_1.weight", ("layer_norm1.weight",), "same"),
    ("ln_1.bias", ("layer_norm1.bias",), "same"),
    ("attn.qkv.weight", tuple(f"self_attn.{p}_proj.weight" for p in "qkv"), "concat"),
    ("attn.qkv.bias", tuple(f"self_attn.{p}_proj.bias" for p in "qkv"), "concat"),
    ("attn.out.weight", ("self_attn.out_proj.weight",), "same"),
    ("attn.out.bias", ("self_attn.out_proj.bias",), "same"),
    ("ln_2.weight", ("layer_norm2.weight",), "same"),
    ("ln_2.bias", ("layer_norm2.bias",), "same"),
    ("mlp.fc1.weight", ("mlp.fc1.weight",), "same"),
    ("mlp.fc1.bias", ("mlp.fc1.bias",), "same"),
    ("mlp.fc2.weight", ("mlp.fc2.weight",), "same"),
    ("mlp.fc2.bias", ("mlp.fc2.bias",), "same"),
]

# Defaults of transformers' CLIPTextConfig / CLIPVisionConfig / CLIPConfig: `save_pretrained` omits values that equal
# them, so reading a config.json needs them.
HF_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                        num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                        layer_norm_eps=1e-5, eos_token_id=49407)
HF_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
HF_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu"}
EOT_ID = 49407


@register_layout
class HFLayout(Layout):
    name = "hf"
    crop_rounding = "floor"
    ignored_keys = ("position_ids",)  # a buffer older transformers versions saved

    def detect(self, state) -> bool:
        return "text_model.embeddings.token_embedding.weight" in state and "text_model.head.weight" not in state

    def rules(self, cfg: ModelConfig) -> list[Rule]:
        v, t = "vision_model", "text_model"
        return [
            Rule("visual.patch_embed.weight", (f"{v}.embeddings.patch_embedding.weight",)),
            Rule("visual.class_embedding", (f"{v}.embeddings.class_embedding",)),
            Rule("visual.pos_embed", (f"{v}.embeddings.position_embedding.weight",)),
            Rule("visual.ln_pre.weight", (f"{v}.pre_layrnorm.weight",)),  # sic: transformers' spelling
            Rule("visual.ln_pre.bias", (f"{v}.pre_layrnorm.bias",)),
            *block_rules("visual.transformer.blocks", f"{v}.encoder.layers", cfg.vision.layers, BLOCK),
            Rule("visual.ln_post.weight", (f"{v}.post_layernorm.weight",)),
            Rule("visual.ln_post.bias", (f"{v}.post_layernorm.bias",)),
            Rule("visual.proj.weight", ("visual_projection.weight",)),
            Rule("text.token_embed.weight", (f"{t}.embeddings.token_embedding.weight",)),
            Rule("text.pos_embed", (f"{t}.embeddings.position_embedding.weight",)),
            *block_rules("text.transformer.blocks", f"{t}.encoder.layers", cfg.text.layers, BLOCK),
            Rule("text.ln_final.weight", (f"{t}.final_layer_norm.weight",)),
            Rule("text.ln_final.bias", (f"{t}.final_layer_norm.bias",)),
            Rule("text.proj.weight", ("text_projection.weight",)),
            Rule("logit_scale", ("logit_scale",)),
        ]

    def infer_config(self, state) -> ModelConfig:
        v, t = "vision_model", "text_model"
        patch = state[f"{v}.embeddings.patch_embedding.weight"]
        return config_from_shapes(
            embed_dim=state["text_projection.weight"].shape[0],
            patch_size=patch.shape[-1],
            vision_width=patch.shape[0],
            vision_layers=count_blocks(state, f"{v}.encoder.layers"),
            vision_positions=state[f"{v}.embeddings.position_embedding.weight"].shape[0],
            vision_mlp=state[f"{v}.encoder.layers.0.mlp.fc1.weight"].shape[0],
            vocab_size=state[f"{t}.embeddings.token_embedding.weight"].shape[0],
            context_length=state[f"{t}.embeddings.position_embedding.weight"].shape[0],
            text_width=state[f"{t}.final_layer_norm.weight"].shape[0],
            text_layers=count_blocks(state, f"{t}.encoder.layers"),
            text_mlp=state[f"{t}.encoder.layers.0.mlp.fc1.weight"].shape[0],
            act="quick_gelu",
        )


def _act(name: str, where: str) -> str:
    if name not in HF_ACTS:
        raise CheckpointError(f"{where}: activation {name!r} is not supported (supported: {sorted(HF_ACTS)})")
    return HF_ACTS[name]


def config_from_hf(hf: dict[str, Any], preprocessor: dict[str, Any] | None = None, name: str = "hf") -> ModelConfig:
    """Our config from a transformers ``CLIPConfig`` dict (and optionally its ``preprocessor_config.json``)."""
    if hf.get("model_type", "clip") != "clip":
        raise CheckpointError(f"config.json has model_type {hf.get('model_type')!r}; only 'clip' is supported")
    t = {**HF_TEXT_DEFAULTS, **(hf.get("text_config") or {})}
    v = {**HF_VISION_DEFAULTS, **(hf.get("vision_config") or {})}
    if t["layer_norm_eps"] != v["layer_norm_eps"]:
        raise CheckpointError("text and vision towers use different layer_norm_eps; not supported")
    eot = t.get("eos_token_id")
    eot = EOT_ID if eot in (None, 2) else eot  # 2 is transformers' legacy placeholder: it then pools at argmax(ids)
    image_size = v["image_size"] if isinstance(v["image_size"], int) else v["image_size"][0]
    patch_size = v["patch_size"] if isinstance(v["patch_size"], int) else v["patch_size"][0]
    return ModelConfig(
        name=name,
        embed_dim=hf.get("projection_dim", 512),
        vision=VisionConfig(image_size=image_size, patch_size=patch_size, width=v["hidden_size"],
                            layers=v["num_hidden_layers"], heads=v["num_attention_heads"],
                            mlp_dim=v["intermediate_size"], act=_act(v["hidden_act"], "vision_config")),
        text=TextConfig(context_length=t["max_position_embeddings"], vocab_size=t["vocab_size"],
                        width=t["hidden_size"], layers=t["num_hidden_layers"], heads=t["num_attention_heads"],
                        mlp_dim=t["intermediate_size"], act=_act(t["hidden_act"], "text_config"), eot_token_id=eot),
        layer_norm_eps=t["layer_norm_eps"],
        init_logit_scale=hf.get("logit_scale_init_value", 2.6592),
        preprocess=preprocess_from_hf(preprocessor, image_size),
    )


def preprocess_from_hf(pre: dict[str, Any] | None, image_size: int) -> PreprocessSettings:
    settings = PreprocessSettings(image_size=image_size, crop_rounding="floor")
    if not pre:
        return settings
    crop = pre.get("crop_size", image_size)
    crop = crop.get("height", image_size) if isinstance(crop, dict) else crop
    if crop != image_size:
        raise CheckpointError(f"preprocessor crop_size {crop} differs from the model's image_size {image_size}")
    size = pre.get("size", {"shortest_edge": image_size})
    if isinstance(size, dict) and size.get("shortest_edge", image_size) != image_size:
        raise CheckpointError(f"preprocessor resizes to {size}; cliplab supports shortest_edge == image_size")
    resample = {2: "bilinear", 3: "bicubic"}.get(pre.get("resample", 3))
    if resample is None:
        raise CheckpointError(f"preprocessor resample={pre.get('resample')} is not supported (2 bilinear, 3 bicubic)")
    return PreprocessSettings(image_size=image_size, mean=tuple(pre.get("image_mean", settings.mean)),
                              std=tuple(pre.get("image_std", settings.std)), interpolation=resample,
                              crop_rounding="floor")


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A ``config.json`` that ``transformers.CLIPModel.from_pretrained`` reads into the same network."""
    v, t = cfg.vision, cfg.text
    get_layout("hf").check_architecture(cfg)  # transformers' CLIP has no convolutional stem
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": cfg.init_logit_scale,
        "text_config": {
            "vocab_size": t.vocab_size, "hidden_size": t.width, "intermediate_size": t.mlp_dim,
            "num_hidden_layers": t.layers, "num_attention_heads": t.heads, "max_position_embeddings": t.context_length,
            "hidden_act": t.act, "layer_norm_eps": cfg.layer_norm_eps, "projection_dim": cfg.embed_dim,
            "bos_token_id": 49406, "eos_token_id": t.eot_token_id, "pad_token_id": 1,
        },
        "vision_config": {
            "hidden_size": v.width, "intermediate_size": v.mlp_dim, "num_hidden_layers": v.layers,
            "num_attention_heads": v.heads, "image_size": v.image_size, "patch_size": v.patch_size,
            "hidden_act": v.act, "layer_norm_eps": cfg.layer_norm_eps, "projection_dim": cfg.embed_dim,
        },
    }


def preprocessor_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    p = cfg.preprocess
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True, "size": {"shortest_edge": p.image_size}, "resample": 3 if p.interpolation == "bicubic" else 2,
        "do_center_crop": True, "crop_size": {"height": p.image_size, "width": p.image_size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(p.mean), "image_std": list(p.std), "do_convert_rgb": True,
    }


