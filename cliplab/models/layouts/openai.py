"""OpenAI / OpenCLIP layout: ``visual.conv1.weight``, ``transformer.resblocks.<i>.attn.in_proj_weight``, ...

OpenAI's checkpoints (and OpenCLIP's ``*-quickgelu`` ones) use QuickGELU; OpenCLIP models trained with GELU have the
same tensor names, so shape inference assumes QuickGELU (OpenAI's) and a GELU checkpoint needs ``arch=`` naming a
GELU config (e.g. ``"ViT-B-32"``).
"""

from __future__ import annotations

from ..config import ModelConfig
from .base import CheckpointError, Layout, Rule, block_rules, count_blocks, register_layout
from .shapes import config_from_shapes

BLOCK = [
    ("ln_1.weight", ("ln_1.weight",), "same"),
    ("ln_1.bias", ("ln_1.bias",), "same"),
    ("attn.qkv.weight", ("attn.in_proj_weight",), "same"),
    ("attn.qkv.bias", ("attn.in_proj_bias",), "same"),
    ("attn.out.weight", ("attn.out_proj.weight",), "same"),
    ("attn.out.bias", ("attn.out_proj.bias",), "same"),
    ("ln_2.weight", ("ln_2.weight",), "same"),
    ("ln_2.bias", ("ln_2.bias",), "same"),
    ("mlp.fc1.weight", ("mlp.c_fc.weight",), "same"),
    ("mlp.fc1.bias", ("mlp.c_fc.bias",), "same"),
    ("mlp.fc2.weight", ("mlp.c_proj.weight",), "same"),
    ("mlp.fc2.bias", ("mlp.c_proj.bias",), "same"),
]


@register_layout
class OpenAILayout(Layout):
    name = "openai"
    # OpenAI's released state dicts carry these three scalars next to the weights.
    crop_rounding = "round"
    ignored_keys = ("input_resolution", "context_length", "vocab_size")

    def detect(self, state) -> bool:
        return "token_embedding.weight" in state and "positional_embedding" in state

    def rules(self, cfg: ModelConfig) -> list[Rule]:
        return [
            Rule("visual.patch_embed.weight", ("visual.conv1.weight",)),
            Rule("visual.class_embedding", ("visual.class_embedding",)),
            Rule("visual.pos_embed", ("visual.positional_embedding",)),
            Rule("visual.ln_pre.weight", ("visual.ln_pre.weight",)),
            Rule("visual.ln_pre.bias", ("visual.ln_pre.bias",)),
            *block_rules("visual.transformer.blocks", "visual.transformer.resblocks", cfg.vision.layers, BLOCK),
            Rule("visual.ln_post.weight", ("visual.ln_post.weight",)),
            Rule("visual.ln_post.bias", ("visual.ln_post.bias",)),
            Rule("visual.proj.weight", ("visual.proj",), "transpose"),
            Rule("text.token_embed.weight", ("token_embedding.weight",)),
            Rule("text.pos_embed", ("positional_embedding",)),
            *block_rules("text.transformer.blocks", "transformer.resblocks", cfg.text.layers, BLOCK),
            Rule("text.ln_final.weight", ("ln_final.weight",)),
            Rule("text.ln_final.bias", ("ln_final.bias",)),
            Rule("text.proj.weight", ("text_projection",), "transpose"),
            Rule("logit_scale", ("logit_scale",)),
        ]

    def infer_config(self, state) -> ModelConfig:
        if "visual.conv1.weight" not in state or "visual.proj" not in state:
            resnet = any(k.startswith("visual.layer1.") for k in state)
            what = "a ResNet image tower (RN50 and friends)" if resnet else "no ViT image tower"
            raise CheckpointError(f"OpenAI-layout checkpoint with {what}: only ViT image towers are supported")
        conv = state["visual.conv1.weight"]
        return config_from_shapes(
            embed_dim=state["text_projection"].shape[1],
            patch_size=conv.shape[-1],
            vision_width=conv.shape[0],
            vision_layers=count_blocks(state, "visual.transformer.resblocks"),
            vision_positions=state["visual.positional_embedding"].shape[0],
            vision_mlp=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            vocab_size=state["token_embedding.weight"].shape[0],
            context_length=state["positional_embedding"].shape[0],
            text_width=state["ln_final.weight"].shape[0],
            text_layers=count_blocks(state, "transformer.resblocks"),
            text_mlp=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            act="quick_gelu",
        )
