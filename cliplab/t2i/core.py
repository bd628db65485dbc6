"""CoRe: textual inversion of a new concept token ``S*`` with context regularisation, on cliplab's generator.

Paper: F. Wu, Y. Pang, J. Zhang, L. Pang, J. Yin, B. Zhao, Q. Li, X. Mao, "CoRe: Context-Regularized Text Embedding
Learning for Text-to-Image Personalization" (AAAI 2025, arXiv 2408.15914; no official code was released when this
was written). A new token ``S*`` is learned in the text tower's **input** embedding space (one row, injected through
``inputs_embeds`` by :class:`cliplab.tokens.new_token.NewToken`) against a frozen generator's denoising loss on a few
images of the concept, and regularised so that the **context tokens** around ``S*`` behave as they do around the
concept's super-class word:

* **diffusion loss** (textual inversion): ``|eps - eps_theta(x_t, t, c(p))|^2`` for the concept images under
  training prompts ``p`` with ``S*`` ("a S*"); gradients reach only ``S*``'s vector;
* **context-embedding regularisation** :func:`context_embedding_loss`: for a regularisation prompt ``p`` ("a S* and a
  blue square", no image needed) and its reference ``p_ref`` (``S*`` replaced by the class word: "a triangle and a
  blue square"), ``mean_i (1 - cos(E(p)_i, E(p_ref)_i))`` over every context token ``i`` (all positions up to and
  including EOT except ``S*``'s), with ``E`` the per-token states the generator reads (``final``: after the final
  LayerNorm, before the projection: SD 1.x's site). The reference side carries no gradient;
* **context-attention regularisation** :func:`context_attention_loss`: the mean squared difference between the
  generator's cross-attention maps (every :class:`~cliplab.generation.denoiser.CrossAttention`, averaged over heads)
  of the context tokens under ``p`` and under ``p_ref``, on the same noisy image ``x_t`` (the reference detached);
* **embedding rescaling** (:func:`rescale_`): ``S*``'s norm grows large during inversion and then dominates the
  context; at the start of stage 2 it is rescaled to ``rescale x`` the class word's embedding norm;
* **two stages**: stage 1 is plain inversion (diffusion loss only, learning rate ``lr``); then the rescaling; stage 2
  adds ``lambda_emb L_emb + lambda_attn L_attn`` to the diffusion loss (learning rate ``stage2_lr``).

Plain textual inversion (the control, :func:`textual_inversion`) is the same loop with the same steps, learning rates,
seed and diffusion batches, without the two regularisers and the rescaling.

Where the model acts: ``S*`` is one row of ``shapes-tiny``'s input token-embedding table (before the positional
table); the regularisers read the ``final`` per-token states (after ``ln_final``, before the projection), which is
what the shipped ``scenes-32`` generator's cross-attention reads; every weight of both models stays frozen.

Choices that differ from the paper, and why:

* The paper's second stage also fine-tunes the U-Net (a DreamBooth-style stage after learning the embedding). Here the
  generator stays frozen in both stages: the task is textual inversion on a shared, shipped generator, and a tuned
  U-Net would confound the comparison with plain inversion. Stage 1 here is plain inversion and stage 2 adds the
  regularisers (the project notes' schedule); the exact stage lengths, learning rates and loss weights of the paper
  are not used (they are for SD-1.5 at 512 px). Ours: 150 + 150 steps, Adam at 0.005 then 0.003, and loss weights
  set from the gradient norms at the stage boundary on ``scenes-32``: ``|grad L_emb|`` is ~150x ``|grad L_diff|``
  and ``|grad L_attn|`` about equal to it, so ``lambda_emb=0.001`` and ``lambda_attn=0.5`` keep each regulariser's
  pull below the (noisy) diffusion gradient; larger weights (0.005-1) turned ``S*`` into the class word (context
  cosine 0.99+) and lost the concept.
* The rescaling target is the class word's input-embedding norm (times ``rescale``), applied once at the stage
  boundary; the paper's exact target value for SD's CLIP is not transferable to ``shapes-tiny``'s table.
* ``L_emb`` and ``L_attn`` are means (over context tokens, prompts, layers), not sums, so their weights do not depend
  on prompt length.
* The noisy images for the attention term are the concept images noised at random timesteps: the regularisation
  prompts have no images of their own, and we could not check which latents the paper uses.
* The class word must be a single token, so that ``p`` and ``p_ref`` align position by position.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.synthetic.vocabulary import article
from ..generation.protocol import Conditioning
from ..methods import register_method
from ..progress import Progress
from ..tokens import space_output, space_tokens
from ..tokens.new_token import NewToken, embedding_table, single_token_id

register_method(
    "core",
    "CoRe: Context-Regularized Text Embedding Learning for Text-to-Image Personalization",
    "textual inversion of a new token S* against a frozen generator, with the context tokens' text-encoder outputs "
    "and the generator's cross-attention maps of them pulled to those under the super-class word, and norm rescaling",
    doc="docs/methods/core.md",
)(__name__)

__all__ = ["reference_prompts", "concept_conditioning", "context_mask", "context_embedding_loss",
           "recording_attention", "context_attention_loss", "rescale_", "CoReResult", "learn_concept",
           "textual_inversion", "context_prompts", "context_scores", "learn_from_images", "sample_concept"]

Pair = tuple[str, str]


def reference_prompts(prompts: Sequence[str], placeholder: str, class_word: str) -> list[str]:
    """``prompts`` with the placeholder replaced by the class word ("a S* and ..." -> "a triangle and ...")."""
    out = []
    for p in prompts:
        if placeholder not in p:
            raise ValueError(f"regularisation prompt {p!r} has no {placeholder!r}")
        out.append(p.replace(placeholder, class_word))
    return out


def _sequences(token: NewToken, texts: Sequence[str], space: str):
    out = token.encode(texts, output=space_output(space))
    return space_tokens(out, space), out.extras["batch"].lengths.to(out.pooled.device), out.extras["new_token"]


def concept_conditioning(token: NewToken, prompts: str | Sequence[str], space: str = "final") -> Conditioning:
    """The generator's conditioning for prompts naming ``token.placeholder`` (gradients reach ``token.vector``)."""
    seq, lengths, _ = _sequences(token, [prompts] if isinstance(prompts, str) else list(prompts), space)
    mask = torch.arange(seq.shape[1], device=seq.device)[None] < lengths[:, None]
    return Conditioning(seq, mask)


def _reference_sequences(token: NewToken, texts: Sequence[str], space: str):
    with torch.no_grad():
        batch = token.model.tokenize(list(texts))
        out = token.model.encode_text(batch, output=space_output(space))
    return space_tokens(out, space), batch.lengths.to(out.pooled.device)


def context_mask(lengths: torch.Tensor, new_token: torch.Tensor) -> torch.Tensor:
    """``[B, n]`` bool: the context tokens, every position up to and including EOT except the new token's."""
    n = new_token.shape[1]
    valid = torch.arange(n, device=new_token.device)[None] < lengths.to(new_token.device)[:, None]
    return valid & ~new_token


def _paired(token: NewToken, prompts: Sequence[str], class_word: str, space: str):
    """Both prompt sets encoded: ``(seq, ref_seq, lengths, context [B, n])`` (checks they align token by token)."""
    single_token_id(token.model, class_word)  # a clear error for a multi-token class word
    seq, lengths, where = _sequences(token, prompts, space)
    if not bool(where.any(1).all()):
        raise ValueError(f"every regularisation prompt must contain {token.placeholder!r}")
    ref_seq, ref_lengths = _reference_sequences(token, reference_prompts(prompts, token.placeholder, class_word),
                                                space)
    if not torch.equal(lengths, ref_lengths) or ref_seq.shape != seq.shape:
        raise ValueError("regularisation and reference prompts tokenize to different lengths")
    return seq, ref_seq, lengths, context_mask(lengths, where)


def context_embedding_loss(token: NewToken, prompts: Sequence[str], class_word: str, space: str = "final"
                           ) -> torch.Tensor:
    """``L_emb``: mean over prompts of the mean over context tokens of ``1 - cos(E(p)_i, E(p_ref)_i)``."""
    seq, ref_seq, _, ctx = _paired(token, prompts, class_word, space)
    dist = 1 - F.cosine_similarity(seq.float(), ref_seq.float(), dim=-1)       # [B, n]
    per_prompt = (dist * ctx).sum(1) / ctx.sum(1).clamp(min=1)
    return per_prompt.mean()


@contextmanager
def recording_attention(generator):
    """Within the block, every cross-attention of ``generator``'s denoiser keeps its last map; yields the list of
    modules (state restored, maps dropped on exit)."""
    denoiser = getattr(generator, "denoiser", None)
    if denoiser is None or not hasattr(denoiser, "cross_attentions"):
        raise ValueError("the attention regulariser needs a generator whose denoiser has cross_attentions()")
    layers = denoiser.cross_attentions()
    before = [m.record_attention for m in layers]
    for m in layers:
        m.record_attention = True
    try:
        yield layers
    finally:
        for m, b in zip(layers, before):
            m.record_attention, m.last_attention = b, None


def _attention_maps(generator, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> list[torch.Tensor]:
    with recording_attention(generator) as layers:
        generator.predict_noise(x_t, t, cond)
        return [m.last_attention.mean(1) for m in layers]  # [B, HW, L] per layer, heads averaged


def context_attention_loss(token: NewToken, generator, prompts: Sequence[str], class_word: str, x_t: torch.Tensor,
                           t: torch.Tensor, space: str = "final") -> torch.Tensor:
    """``L_attn``: the mean squared difference between the generator's cross-attention maps of the context tokens
    under ``prompts`` and under their reference prompts, on the noisy images ``x_t`` at timesteps ``t``; averaged
    over layers (heads averaged first)."""
    seq, ref_seq, lengths, ctx = _paired(token, prompts, class_word, space)
    mask = torch.arange(seq.shape[1], device=seq.device)[None] < lengths[:, None]
    maps = _attention_maps(generator, x_t, t, Conditioning(seq, mask))
    with torch.no_grad():
        ref_maps = _attention_maps(generator, x_t, t, Conditioning(ref_seq, mask))
    weight = ctx[:, None, :].float()                                          # [B, 1, L]
    per_layer = [((a - r).pow(2) * weight).sum((1, 2)) / (weight.sum((1, 2)) * a.shape[1])
                 for a, r in zip(maps, ref_maps)]
    return torch.stack(per_layer).mean()


@torch.no_grad()
def rescale_(token: NewToken, class_word: str, rescale: float = 1.0) -> float:
    """Set ``||S*||`` to ``rescale`` times the class word's input-embedding norm; returns the norm before."""
    target = embedding_table(token.model).weight[single_token_id(token.model, class_word)].norm() * rescale
    before = float(token.vector.norm())
    token.vector.mul_(target / token.vector.norm().clamp(min=1e-12))
    return before


@dataclass
class CoReResult:
    token: NewToken
    history: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)


def _check_images(images: torch.Tensor, generator) -> torch.Tensor:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"concept images must be [N, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
    size = generator.image_size
    if images.shape[-1] != size or images.shape[-2] != size:
        images = F.interpolate(images, size=(size, size), mode="area")
    return images.float().clamp(0, 1)


def learn_concept(model, generator, images: torch.Tensor, class_word: str, *,
                  templates: Sequence[str] = ("a S*",), reg_prompts: Sequence[str] | None = None,
                  stage1_steps: int = 150, stage2_steps: int = 150, lr: float = 0.005, stage2_lr: float = 0.003,
                  batch_size: int = 16, reg_batch: int = 8, lambda_emb: float = 0.001, lambda_attn: float = 0.5,
                  rescale: float | None = 1.0, seed: int = 0, placeholder: str = "S*", carrier: str = "sks",
                  init_word: str | None = None, init: torch.Tensor | None = None, space: str = "final",
                  progress: bool | None = None) -> CoReResult:
    """Learn ``S*`` for the concept shown in ``images`` ``[N, 3, H, W]`` (in [0, 1]) with CoRe.

    ``templates``: training prompts with the placeholder ("a S*"); ``reg_prompts``: regularisation prompts with the
    placeholder and no images (default: :func:`context_prompts` for the generator world, concept's class word aside);
    ``init_word`` (default: the class word) initialises ``S*``, or ``init`` (a vector: e.g. a learned ``S*`` to go
    on from, as CoRe's test-time optimisation on target prompts does). ``lambda_emb = lambda_attn = 0`` and
    ``rescale=None`` is plain textual inversion (:func:`textual_inversion`). The model and the generator are not
    changed; the result's ``token`` holds ``S*``."""
    if stage1_steps < 0 or stage2_steps < 0:
        raise ValueError("stage1_steps and stage2_steps must be >= 0")
    images = _check_images(images, generator)
    token = NewToken(model, placeholder=placeholder, carrier=carrier,
                     init_word=class_word if init_word is None else init_word, init=init)
    token.to(images.device)
    regularised = lambda_emb > 0 or lambda_attn > 0
    if regularised:
        if reg_prompts is None:  # the world's context objects, none of the class word's own kind
            reg_prompts = [p for p in context_prompts(placeholder) if class_word not in p.split()]
        reg_prompts = list(reg_prompts)
        if not reg_prompts:
            raise ValueError("CoRe needs at least one regularisation prompt")
        reference_prompts(reg_prompts, placeholder, class_word)  # every one names the placeholder
    templates = list(templates)
    reference_prompts(templates, placeholder, class_word)
    frozen = [p for p in list(model.parameters()) + list(generator.parameters()) if p.requires_grad]
    for p in frozen:  # only S* learns; restored on exit
        p.requires_grad_(False)
    was_training = generator.training
    generator.eval()
    diff_gen = torch.Generator().manual_seed(seed)          # the diffusion batches: the same in every arm
    reg_gen = torch.Generator().manual_seed(seed + 1)       # the regularisation batches
    pick = random.Random(seed)
    history: list[dict] = []
    bar = Progress(stage1_steps + stage2_steps, desc="core" if regularised else "inversion", unit="step",
                   enabled=progress)
    settings = dict(templates=templates, reg_prompts=reg_prompts if regularised else None, class_word=class_word,
                    stage1_steps=stage1_steps, stage2_steps=stage2_steps, lr=lr, stage2_lr=stage2_lr,
                    batch_size=batch_size, reg_batch=reg_batch, lambda_emb=lambda_emb, lambda_attn=lambda_attn,
                    rescale=rescale, seed=seed, space=space, init_word=token.init_word)
    try:
        for stage, steps, rate in ((1, stage1_steps, lr), (2, stage2_steps, stage2_lr)):
            if stage == 2 and rescale is not None and steps > 0:
                before = rescale_(token, class_word, rescale)
                history.append({"stage": 2, "step": -1, "rescaled_from": before, "norm": token.vector.norm().item()})
            opt = torch.optim.Adam([token.vector], lr=rate)
            for step in range(steps):
                idx = torch.randint(0, len(images), (batch_size,), generator=diff_gen)
                prompts = [templates[int(i)] for i in torch.randint(0, len(templates), (batch_size,),
                                                                     generator=diff_gen)]
                cond = concept_conditioning(token, prompts, space)
                loss_diff = generator.loss(images[idx], cond, generator=diff_gen)
                loss = loss_diff
                row = {"stage": stage, "step": step, "diffusion": loss_diff.item()}
                if stage == 2 and regularised:
                    reg = [pick.choice(reg_prompts) for _ in range(reg_batch)]
                    if lambda_emb > 0:
                        l_emb = context_embedding_loss(token, reg, class_word, space)
                        loss = loss + lambda_emb * l_emb
                        row["emb"] = l_emb.item()
                    if lambda_attn > 0:
                        ridx = torch.randint(0, len(images), (reg_batch,), generator=reg_gen)
                        t = generator.schedule.sample_timesteps(reg_batch, reg_gen) if hasattr(
                            generator, "schedule") else torch.randint(0, generator.timesteps, (reg_batch,),
                                                                      generator=reg_gen)
                        x0 = images[ridx] * 2 - 1
                        noise = torch.randn(x0.shape, generator=reg_gen)
                        x_t = generator.schedule.add_noise(x0, t, noise)
                        l_attn = context_attention_loss(token, generator, reg, class_word, x_t, t, space)
                        loss = loss + lambda_attn * l_attn
                        row["attn"] = l_attn.item()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                row["norm"] = token.vector.norm().item()
                history.append(row)
                if bar.active:
                    bar.set_postfix(loss=f"{loss.item():.4f}", stage=stage)
                    bar.update(1)
    finally:
        bar.close()
        for p in frozen:
            p.requires_grad_(True)
        generator.train(was_training)
    return CoReResult(token, history, settings)


def textual_inversion(model, generator, images: torch.Tensor, class_word: str, *,
                      templates: Sequence[str] = ("a S*",), stage1_steps: int = 150, stage2_steps: int = 150,
                      lr: float = 0.005, stage2_lr: float = 0.003, batch_size: int = 16, seed: int = 0,
                      placeholder: str = "S*", carrier: str = "sks", init_word: str | None = None,
                      init: torch.Tensor | None = None, space: str = "final", progress: bool | None = None
                      ) -> CoReResult:
    """Plain textual inversion, the control: :func:`learn_concept` with the same schedule, without the two
    regularisers and the rescaling."""
    return learn_concept(model, generator, images, class_word, templates=templates, reg_prompts=None,
                         stage1_steps=stage1_steps, stage2_steps=stage2_steps, lr=lr, stage2_lr=stage2_lr,
                         batch_size=batch_size, reg_batch=0, lambda_emb=0.0, lambda_attn=0.0, rescale=None,
                         seed=seed, placeholder=placeholder, carrier=carrier, init_word=init_word, init=init,
                         space=space, progress=progress)


# ------------------------------------------------------------------ the generator world's prompts and judging
def context_prompts(placeholder: str = "S*", contexts: Sequence[Pair] | None = None,
                    exclude: Pair | None = None) -> list[str]:
    """Prompts that put the new concept beside one context object, in both orders: "a S* and a blue square",
    "a blue square and a S*". ``contexts``: (colour, shape) pairs (default: every pair of the generator world
    whose colour and shape both differ from ``exclude``, the concept's own pair)."""
    if contexts is None:
        from ..generation.scenes import GEN_COLOURS, GEN_SHAPES

        contexts = [(c, s) for c in GEN_COLOURS for s in GEN_SHAPES
                    if exclude is None or (c != exclude[0] and s != exclude[1])]
    out = []
    for c, s in contexts:
        obj = f"{article(c)} {c} {s}"
        out += [f"a {placeholder} and {obj}", f"{obj} and a {placeholder}"]
    return out


def _context_of(prompt: str, placeholder: str) -> Pair:
    words = [w for w in prompt.replace(placeholder, " ").split() if w not in ("a", "an", "and")]
    if len(words) != 2:
        raise ValueError(f"cannot read the context object of {prompt!r}: expected 'a S* and a <colour> <shape>'")
    return words[0], words[1]


@torch.no_grad()
def context_scores(token: NewToken, generator, judge, concept: Pair, prompts: Sequence[str], steps: int = 20,
                   seed: int = 0, guidance: float | None = None, batch_size: int = 32, space: str = "final",
                   samples: int = 1) -> dict:
    """Sample every prompt ("a S* and a blue square") ``samples`` times and parse each image with the judge
    (``judge.parse`` -> ``{colour: shape}``): ``context`` = the context object is drawn (its colour, as its shape),
    ``concept`` = the concept is drawn (the concept's colour as the concept's shape), ``both``; and
    ``concept_alone``: the same for samples of "a S*" alone."""
    rows = [p for p in prompts for _ in range(samples)]
    contexts = [_context_of(p, token.placeholder) for p in rows]
    kwargs = {} if guidance is None else {"guidance": guidance}
    images = []
    for i in range(0, len(rows), batch_size):
        cond = concept_conditioning(token, rows[i:i + batch_size], space)
        images.append(generator.sample(cond, steps=steps, seed=seed + i, **kwargs))
    images = torch.cat(images)
    seen = judge.parse(images)
    context = [float(s.get(c) == sh) for (c, sh), s in zip(contexts, seen)]
    concept_hit = [float(s.get(concept[0]) == concept[1]) for s in seen]
    alone_n = max(8, min(32, len(rows)))
    alone = generator.sample(concept_conditioning(token, [f"a {token.placeholder}"] * alone_n, space), steps=steps,
                             seed=seed + 10_000, **kwargs)
    alone_hit = [float(s.get(concept[0]) == concept[1]) for s in judge.parse(alone)]
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return {"context": mean(context), "concept": mean(concept_hit),
            "both": mean([a * b for a, b in zip(context, concept_hit)]), "concept_alone": mean(alone_hit),
            "n": len(rows), "images": images}


def learn_from_images(image_paths: Sequence[str | Path], class_word: str, out: str | Path,
                      generator: str | Path = "scenes-32", text_model: str | None = None, core: bool = True,
                      **kwargs) -> CoReResult:
    """The CLI's path: read the concept images (any size, RGB), learn ``S*`` with CoRe (``core=False``: plain
    textual inversion) against a shipped or saved generator, save the token to ``out``. Every other keyword goes to
    :func:`learn_concept` (or :func:`textual_inversion`)."""
    import numpy as np
    from PIL import Image

    import cliplab
    from ..generation import load_generator

    if not image_paths:
        raise ValueError("give at least one concept image")
    gen = load_generator(generator).frozen()
    model = cliplab.load(text_model or gen.info.get("text_model", "shapes-tiny")).float().eval()
    s = gen.image_size
    pixels = [torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize((s, s), Image.BOX), dtype=np.float32)
                               / 255.0).permute(2, 0, 1) for p in image_paths]
    space = kwargs.pop("space", gen.info.get("space", "final"))
    fn = learn_concept if core else textual_inversion
    result = fn(model, gen, torch.stack(pixels), class_word, space=space, **kwargs)
    result.token.save(out, info={"method": "core" if core else "textual_inversion", "class_word": class_word,
                                 "generator": str(generator), "settings": result.settings})
    return result


@torch.no_grad()
def sample_concept(token_dir: str | Path, prompts: str | Sequence[str], generator: str | Path = "scenes-32",
                   text_model: str | None = None, steps: int = 25, seed: int = 0, guidance: float | None = None
                   ) -> torch.Tensor:
    """The CLI's sampling path: images ``[B, 3, S, S]`` in [0, 1] for prompts naming a saved token's placeholder
    ("a S* and a blue square"), from a shipped or saved generator."""
    import cliplab
    from ..generation import load_generator

    gen = load_generator(generator).frozen()
    model = cliplab.load(text_model or gen.info.get("text_model", "shapes-tiny")).float().eval()
    token = NewToken.load(token_dir, model)
    cond = concept_conditioning(token, [prompts] if isinstance(prompts, str) else list(prompts),
                                gen.info.get("space", "final"))
    return gen.sample(cond, steps=steps, seed=seed, **({} if guidance is None else {"guidance": guidance}))
