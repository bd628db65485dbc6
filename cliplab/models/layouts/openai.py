"""OpenAI / OpenCLIP layout: ``visual.conv1.weight``, ``transformer.resblocks.<i>.attn.in_proj_weight``, ...

OpenAI's checkpoints (and OpenCLIP's ``*-quickgelu`` ones) use QuickGELU; OpenCLIP models trained with GELU have the
same tensor names, so shape inference assumes QuickGELU (OpenAI's) and a GELU checkpoint needs ``arch=`` naming a
GELU config (e.g. ``"ViT-B-32"``).

ResNet image towers (RN50 family: ``visual.layer1.0.conv1.weight``, ``visual.attnpool.*``) map onto
:class:`cliplab.models.resnet.ResNetTower`; BatchNorm's ``num_batches_tracked`` counters carry no weights and are
dropped (writing this layout leaves them out).
"""

from __future__ import annotations

import math

from ..config import ModelConfig, PreprocessSettings, TextConfig
from .base import CheckpointError, Layout, Rule, block_rules, count_blocks, register_layout
from .shapes import HEAD_DIM, config_from_shapes

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


BATCH_NORM = ("weight", "bias", "running_mean", "running_var")


def _conv_bn(ours: str, theirs: str, conv: str, bn: str, our_conv: str | None = None,
             our_bn: str | None = None) -> list[Rule]:
    """A convolution and its BatchNorm (weight, bias and both running statistics)."""
    return [Rule(f"{ours}.{our_conv or conv}.weight", (f"{theirs}.{conv}.weight",)),
            *(Rule(f"{ours}.{our_bn or bn}.{p}", (f"{theirs}.{bn}.{p}",)) for p in BATCH_NORM)]


def resnet_rules(cfg: ModelConfig) -> list[Rule]:
    """The ModifiedResNet image tower: OpenAI's ``visual.conv1`` / ``layer{1..4}.<b>`` / ``attnpool`` names."""
    rules = [r for i in (1, 2, 3) for r in _conv_bn("visual.stem", "visual", f"conv{i}", f"bn{i}")]
    for s, blocks in enumerate(cfg.vision.resnet_layers):
        for b in range(blocks):
            ours, theirs = f"visual.stages.{s}.{b}", f"visual.layer{s + 1}.{b}"
            rules += [r for i in (1, 2, 3) for r in _conv_bn(ours, theirs, f"conv{i}", f"bn{i}")]
            if b == 0:  # the first block of a stage changes the channels (and the stride): a projection shortcut
                rules += _conv_bn(ours, f"{theirs}.downsample", "0", "1", "shortcut.conv", "shortcut.bn")
    rules.append(Rule("visual.pool.pos_embed", ("visual.attnpool.positional_embedding",)))
    for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("out", "c_proj")):
        rules += [Rule(f"visual.pool.{ours}.{p}", (f"visual.attnpool.{theirs}.{p}",)) for p in ("weight", "bias")]
    return rules


def vit_rules(cfg: ModelConfig) -> list[Rule]:
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
    ]


def infer_resnet(state) -> ModelConfig:
    """A ResNet CLIP's config from shapes, as OpenAI's ``build_model`` infers it: blocks per stage from the
    ``visual.layer{1..4}.<b>`` indices, the width from ``layer1.0.conv1``, the resolution from the attention pool's
    positions (``1 + (size / 32) ** 2`` rows) and 64-wide pool heads."""
    from ..resnet import resnet_vision_config

    required = ("visual.layer1.0.conv1.weight", "visual.attnpool.positional_embedding")
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"OpenAI-layout ResNet checkpoint without {missing}: cannot infer its architecture")
    layers = tuple(count_blocks(state, f"visual.layer{s}") for s in (1, 2, 3, 4))
    width = state["visual.layer1.0.conv1.weight"].shape[0]
    positions = state["visual.attnpool.positional_embedding"].shape[0]
    grid = math.isqrt(positions - 1)
    if grid * grid + 1 != positions:
        raise CheckpointError(f"visual.attnpool.positional_embedding has {positions} rows, not 1 + a square grid")
    if not all(layers):
        raise CheckpointError(f"OpenAI-layout ResNet checkpoint with an empty stage (blocks per stage {list(layers)})")
    vision = resnet_vision_config(image_size=grid * 32, width=width, layers=layers, heads=width * 32 // HEAD_DIM)
    text_width = state["ln_final.weight"].shape[0]
    text = TextConfig(context_length=state["positional_embedding"].shape[0],
                      vocab_size=state["token_embedding.weight"].shape[0], width=text_width,
                      layers=count_blocks(state, "transformer.resblocks"), heads=max(1, text_width // HEAD_DIM),
                      mlp_dim=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0], act="quick_gelu")
    return ModelConfig(name="inferred", embed_dim=state["text_projection"].shape[1], vision=vision, text=text,
                       preprocess=PreprocessSettings(image_size=vision.image_size))


@register_layout
class OpenAILayout(Layout):
    name = "openai"
    # OpenAI's released state dicts carry these three scalars next to the weights.
    crop_rounding = "round"
    ignored_keys = ("input_resolution", "context_length", "vocab_size", "num_batches_tracked")
    has_resnet = True

    def detect(self, state) -> bool:
        return "token_embedding.weight" in state and "positional_embedding" in state

    def rules(self, cfg: ModelConfig) -> list[Rule]:
        return [
            *(resnet_rules(cfg) if cfg.vision.is_resnet else vit_rules(cfg)),
            Rule("text.token_embed.weight", ("token_embedding.weight",)),
            Rule("text.pos_embed", ("positional_embedding",)),
            *block_rules("text.transformer.blocks", "transformer.resblocks", cfg.text.layers, BLOCK),
            Rule("text.ln_final.weight", ("ln_final.weight",)),
            Rule("text.ln_final.bias", ("ln_final.bias",)),
            Rule("text.proj.weight", ("text_projection",), "transpose"),
            Rule("logit_scale", ("logit_scale",)),
        ]

    def infer_config(self, state) -> ModelConfig:
        if "visual.proj" not in state and any(k.startswith("visual.layer1.") for k in state):
            return infer_resnet(state)  # OpenAI's build_model tells the two apart the same way
        if "visual.conv1.weight" not in state or "visual.proj" not in state:
            raise CheckpointError("OpenAI-layout checkpoint with neither a ViT image tower (visual.proj) nor a "
                                  "ResNet one (visual.layer1.*): cannot infer its architecture; pass arch=")
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
