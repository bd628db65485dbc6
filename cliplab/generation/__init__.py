"""Text-to-image conditioning: a generator protocol and a small token-conditioned diffusion model trained here.

No diffusion model can run in this environment, so cliplab ships its own small one: the consumer that turns the
text-to-image seed papers' claims (WiCLP, CoRe, ELLA, attribute control, un²CLIP) into measurable effects.

* :class:`ConditionalGenerator` (protocol) and :class:`Conditioning` (token sequence + mask): what methods talk to;
* :class:`TokenDenoiser` (a small U-Net with cross-attention), :class:`NoiseSchedule` (cosine DDPM, DDIM sampler),
  :class:`DiffusionGenerator` (both, with classifier-free guidance, safetensors save/load);
* :class:`TextConditioner`: a cliplab text tower's per-token states in a conditioning space (``final`` = SD 1.x);
* :class:`GenerationScenes`: the generator's world (1-3 plain objects, distinct shapes and colours, 32 px);
* :class:`SceneJudge`: scores colours, shapes and bindings of generated images against their prompts;
* :func:`load_generator` / :func:`load_judge`: the shipped ``scenes-32`` generator (on ``shapes-tiny``'s ``final``
  states) and its judge; see ``cliplab/generation/pretrained/scenes-32/MODEL_CARD.md`` for what it can draw.
"""

from .conditioning import TextConditioner
from .denoiser import DenoiserConfig, TokenDenoiser, timestep_embedding
from .generator import DiffusionGenerator, guided_sample
from .grid import image_grid, save_grid
from .judge import SceneJudge, train_judge
from .pretrained import load_generator, load_judge, shipped_generator_dir
from .protocol import ConditionalGenerator, Conditioning
from .quality import judge_generator
from .scenes import GEN_COLOURS, GEN_SHAPES, GenerationScenes, SceneSpec, prompt_for, render_spec
from .schedule import NoiseSchedule
from .training import GeneratorTrainConfig, train_generator

__all__ = [
    "ConditionalGenerator", "Conditioning", "DenoiserConfig", "TokenDenoiser", "timestep_embedding",
    "NoiseSchedule", "DiffusionGenerator", "TextConditioner", "GenerationScenes", "SceneSpec", "prompt_for",
    "render_spec", "GEN_SHAPES", "GEN_COLOURS", "SceneJudge", "train_judge", "GeneratorTrainConfig",
    "train_generator", "load_generator", "load_judge", "shipped_generator_dir", "image_grid", "save_grid",
    "judge_generator", "guided_sample",
]
