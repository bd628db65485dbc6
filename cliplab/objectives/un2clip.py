"""un²CLIP: improve a CLIP image encoder by inverting an unCLIP generator.

Paper: *un²CLIP: Improving CLIP's Visual Detail Capturing Ability via Inverting unCLIP*, Yinqi Li, Jiahe Zhao,
Hong Chang, Ruibing Hou, Shiguang Shan, Xilin Chen (2025; no official code was available to read). An unCLIP
generator is an image diffusion model conditioned on a CLIP **image embedding**; it has learned to draw images from
that embedding, details included. un²CLIP freezes it and fine-tunes the CLIP image encoder so that the encoder's
embedding of an image is the condition under which the generator best denoises that same image:

    z = E_img(x)  (trainable)        L = E_{t, eps} || eps - eps_theta(sqrt(abar_t) x + sqrt(1 - abar_t) eps, t, z) ||^2

with ``eps_theta`` frozen, so gradients reach only the image encoder. The text encoder is untouched; because
unCLIP's conditioning space *is* CLIP's joint image-text space, the improved image embedding stays aligned with it.

Here (:func:`un2clip_finetune`): the generator is :func:`cliplab.generation.unclip` 's ``unclip-32`` (a small
:class:`~cliplab.generation.DiffusionGenerator` conditioned on ``shapes-tiny``'s normalised image embedding, one
token plus 4 learned context tokens made from it as DALL-E 2's decoder does, trained with the encoder frozen); the encoder reads the 64 px scene, the generator denoises
its 32 px box-downsampled view. **Where it acts**: the image tower's pooled output after ``ln_post`` and the
projection, L2-normalised (the joint space); the top of the image tower trains.

Choices that differ from the paper, and why:

* *Trainable part.* The last ``layers`` ViT blocks, ``ln_post``, the projection and the stem max-skip map (the
  tower's output heads); default 1 block (the paper tunes the whole encoder). The stream entering the first
  trainable block is computed once per image (:func:`cache_image_states`), which makes a step cheap on CPU, and the
  tuned part (0.48M parameters) ships under 1 MB. ``layers=None`` tunes the whole image tower from pixels.
* *Generator and data.* A 0.53M-parameter pixel-space U-Net at 32 px on the synthetic generator world (1-3 plain
  objects with distinct colours and shapes) instead of Stable unCLIP (latent space, SD-2.1) on CC3M; the fine-tuning
  images are other scenes of the same world (a different seed). Stable unCLIP's embedding noise augmentation and its
  (empty) text condition do not exist in this generator.
* *Control.* :func:`un2clip_finetune` with ``train_generator=True`` optimises the generator together with the
  encoder (same steps, data, seed and learning rate): the drifting stub of the method notes, which is free to
  co-adapt with the encoder and so is not anchored to the joint space.

Measures (:func:`detail_scores`, :func:`coarse_zero_shot`): the fine detail is **colour binding** in two-object
scenes (the same scene with the two objects' colours swapped; ``shapes-tiny`` gives such pairs cosine ~0.95 and
picks the right caption of the two at chance), and object **position** (one object on the left vs. the right: pair
cosine ~0.99; the text tower cannot tell the two captions apart, so only the image side is measured).

Measured (``docs/methods/un2clip.md``): a null on this toy. Neither detail became more separable (pair cosines rose
slightly) while zero-shot stayed at 100%, and the drifting control stayed aligned too: the frozen generator barely
reads binding or position from the embedding (its loss is the same under the colour-swapped scene's embedding), so
inverting it gives no gradient toward them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..generation.protocol import Conditioning
from ..generation.scenes import GEN_SHAPES, GenerationScenes, prompt_for
from ..generation.unclip import generator_view, image_embeddings, normalise_pixels
from ..methods import register_method
from ..progress import Progress

__all__ = ["Un2clipConfig", "trainable_image_parameters", "cache_image_states", "top_embeddings",
           "un2clip_loss", "un2clip_finetune", "binding_pairs", "position_pairs", "detail_scores",
           "coarse_zero_shot", "save_image_top", "load_image_top", "load_un2clip", "shipped_un2clip_dir",
           "measure", "run_un2clip"]

register_method(
    "un2clip",
    "un²CLIP: Improving CLIP's Visual Detail Capturing Ability via Inverting unCLIP",
    "Fine-tunes the image tower with a frozen unCLIP generator's denoising loss (the embedding is its condition); "
    "text tower untouched",
    doc="docs/methods/un2clip.md",
)(__name__)

_PRETRAINED = Path(__file__).parent / "pretrained" / "un2clip"


@dataclass
class Un2clipConfig:
    steps: int = 400
    batch_size: int = 32
    lr: float = 1e-4
    layers: int | None = 1          # last ViT blocks that train (with ln_post, proj, stem_skip); None = whole tower
    n_images: int = 4000
    seed: int = 1                   # fine-tuning scenes: generator-world seed (unclip-32 was trained on seed 0)
    train_generator: bool = False   # True = the drifting control (generator optimised with the encoder)
    weight_decay: float = 0.0


# ---------------------------------------------------------------------------------------------- the trainable top
def _top_modules(model, layers: int | None) -> list[torch.nn.Module]:
    v = model.visual
    if layers is None:
        return [v]
    n = len(v.transformer.blocks)
    if not 0 <= layers <= n:
        raise ValueError(f"layers must be in [0, {n}] (or None for the whole image tower), got {layers}")
    heads = [m for m in (v.ln_post, v.proj, v.stem_skip) if m is not None]
    return list(v.transformer.blocks[n - layers:]) + heads


def trainable_image_parameters(model, layers: int | None = 1) -> dict[str, torch.nn.Parameter]:
    """The image-tower parameters un²CLIP trains (``name -> parameter``, names as in ``model.state_dict()``)."""
    ids = {id(p) for m in _top_modules(model, layers) for p in m.parameters()}
    return {k: p for k, p in model.named_parameters() if id(p) in ids}


@torch.no_grad()
def cache_image_states(model, images: torch.Tensor, layers: int | None = 1, chunk: int = 256
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """For images in [0, 1]: the stream entering the first trainable block ``[N, n, W]`` and the max-pooled stem
    features of the max-skip ``[N, C]`` (None without one). ``layers=None`` returns the normalised pixels."""
    if layers is None:
        return normalise_pixels(model, images), None
    v = model.visual
    first = len(v.transformer.blocks) - layers
    states, skips = [], []
    for i in range(0, len(images), chunk):
        pix = normalise_pixels(model, images[i:i + chunk])
        out = v.forward_rich(pix, want=frozenset({"hidden"}))
        states.append(out.hidden[first])
        if v.stem_skip is not None:
            skips.append(v.stem(pix).flatten(2).amax(2))
    return torch.cat(states), (torch.cat(skips) if skips else None)


def top_embeddings(model, states: torch.Tensor, skips: torch.Tensor | None, layers: int | None = 1) -> torch.Tensor:
    """L2-normalised image embeddings from :func:`cache_image_states`' output, through the trainable top (equal to
    :func:`~cliplab.generation.unclip.image_embeddings` of the same images)."""
    v = model.visual
    if layers is None:
        return F.normalize(model.encode_image(states).float(), dim=-1)
    x = states
    for block in v.transformer.blocks[len(v.transformer.blocks) - layers:]:
        x = block(x)
    pooled = v.pool(x)
    if skips is not None:
        pooled = pooled + v.stem_skip(skips)
    return F.normalize(pooled.float(), dim=-1)


def un2clip_loss(generator, embeddings: torch.Tensor, images: torch.Tensor, rng: torch.Generator | None = None,
                 t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """The denoising loss of ``images`` (in [0, 1], at the generator's size) under the one-token conditioning
    ``embeddings`` ``[B, D]``; gradients reach the embeddings (and the generator if it is not frozen)."""
    return generator.loss(generator_view(images, generator.image_size), Conditioning.single(embeddings),
                          generator=rng, t=t, noise=noise)


# ---------------------------------------------------------------------------------------------- fine-tuning
def _training_images(model, n: int, seed: int) -> torch.Tensor:
    size = model.config.vision.image_size
    return GenerationScenes(image_size=size, seed=seed).tensors(n)[0].float() / 255


def un2clip_finetune(model, generator, config: Un2clipConfig | None = None, images: torch.Tensor | None = None,
                     progress: bool | None = None, callback: Callable[[int, object], dict] | None = None,
                     every: int = 0, **overrides):
    """un²CLIP: a copy of ``model`` whose image-tower top is fine-tuned with ``generator``'s denoising loss.

    ``model`` and ``generator`` are left unchanged (copies are trained); ``images`` (in [0, 1], at the encoder's
    size) default to ``n_images`` generator-world scenes of ``seed``; ``overrides`` set :class:`Un2clipConfig`
    fields. Returns ``(model, generator, log)``: the generator is the frozen input itself, or the trained copy with
    ``train_generator=True``; ``log`` holds the config, the loss curve and, every ``every`` steps (and at step 0),
    what ``callback(step, model)`` returned (measures along the way)."""
    cfg = dataclasses.replace(config or Un2clipConfig(), **overrides)
    tuned = copy.deepcopy(model).float().eval()
    gen = copy.deepcopy(generator).float() if cfg.train_generator else generator
    if images is None:
        images = _training_images(tuned, cfg.n_images, cfg.seed)
    states, skips = cache_image_states(tuned, images, cfg.layers)
    small = generator_view(images, gen.image_size)
    tuned.requires_grad_(False)
    params = list(trainable_image_parameters(tuned, cfg.layers).values())
    for p in params:
        p.requires_grad_(True)
    if cfg.train_generator:
        gen.train().requires_grad_(True)
        params += list(gen.parameters())
    else:
        gen.eval().requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    losses, evals, t0 = [], [], time.perf_counter()
    bar = Progress(cfg.steps, desc="un2clip", unit="step", enabled=progress)
    for step in range(cfg.steps):
        if callback is not None and every and step % every == 0:
            evals.append({"step": step, **callback(step, tuned)})
        idx = torch.randint(0, len(states), (cfg.batch_size,), generator=rng)
        emb = top_embeddings(tuned, states[idx], None if skips is None else skips[idx], cfg.layers)
        loss = un2clip_loss(gen, emb, small[idx], rng=rng)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if bar.active:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
            bar.update(1)
    bar.close()
    tuned.requires_grad_(False).eval()
    gen.requires_grad_(False).eval()
    if callback is not None and every:
        evals.append({"step": cfg.steps, **callback(cfg.steps, tuned)})
    log = {"config": dataclasses.asdict(cfg), "losses": losses, "evals": evals,
           "seconds": round(time.perf_counter() - t0, 1)}
    return tuned, gen, log


# ---------------------------------------------------------------------------------------------- measures
def _render(scene) -> torch.Tensor:
    return torch.from_numpy(np.asarray(scene.render().convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


def binding_pairs(n: int = 200, seed: int = 7, image_size: int = 64
                  ) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
    """``n`` two-object scenes and the same scenes with the two objects' colours swapped: images ``A``, ``B``
    ``[n, 3, S, S]`` in [0, 1] and their prompts (``"a red circle and a blue square"`` /
    ``"a blue circle and a red square"``)."""
    scenes = GenerationScenes(image_size=image_size, seed=seed, counts=(2,), weights=None)
    a, b, pa, pb = [], [], [], []
    for i in range(n):
        s = scenes.scene(i)
        o1, o2 = s.objects
        swapped = s.replace(objects=(dataclasses.replace(o1, colour=o2.colour), dataclasses.replace(o2, colour=o1.colour)))
        a.append(_render(s))
        b.append(_render(swapped))
        pa.append(prompt_for([(o1.colour, o1.shape), (o2.colour, o2.shape)]))
        pb.append(prompt_for([(o2.colour, o1.shape), (o1.colour, o2.shape)]))
    return torch.stack(a), torch.stack(b), pa, pb


def position_pairs(n: int = 200, seed: int = 7, image_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` one-object scenes with the object on the left (x = 20% of the side) and the same object on the right
    (x = 80%), same height: images ``A``, ``B`` in [0, 1]."""
    scenes = GenerationScenes(image_size=image_size, seed=seed, counts=(1,), weights=None)
    a, b = [], []
    for i in range(n):
        s = scenes.scene(i)
        (o,) = s.objects
        a.append(_render(s.replace(objects=(o.moved(0.2 * image_size, o.y),))))
        b.append(_render(s.replace(objects=(o.moved(0.8 * image_size, o.y),))))
    return torch.stack(a), torch.stack(b)


@torch.no_grad()
def _text_embeddings(model, texts: list[str]) -> torch.Tensor:
    return F.normalize(model.encode_texts(texts).float(), dim=-1)


@torch.no_grad()
def detail_scores(model, a: torch.Tensor, b: torch.Tensor, prompts_a: list[str] | None = None,
                  prompts_b: list[str] | None = None) -> dict[str, float]:
    """``pair_cos``: mean cosine of the image embeddings of ``a[i]`` and ``b[i]`` (lower = more separable); with
    prompts, ``text_acc``: how often each image scores its own prompt above the other one's (2-way, chance 0.5),
    with the model's (unchanged) text tower."""
    ea, eb = image_embeddings(model, a), image_embeddings(model, b)
    out = {"pair_cos": float((ea * eb).sum(-1).mean())}
    if prompts_a is not None and prompts_b is not None:
        ta, tb = _text_embeddings(model, prompts_a), _text_embeddings(model, prompts_b)
        right = torch.cat([(ea * ta).sum(-1) > (ea * tb).sum(-1), (eb * tb).sum(-1) > (eb * ta).sum(-1)])
        out["text_acc"] = float(right.float().mean())
    return out


@torch.no_grad()
def coarse_zero_shot(model, n_per_class: int = 25, seed: int = 3, shapes: tuple[str, ...] = GEN_SHAPES
                     ) -> dict[str, float]:
    """Zero-shot colour and shape accuracy on single-object scenes with the model's text tower (class prototypes:
    the mean normalised embedding of every "a <colour> <shape>" prompt of the class)."""
    from ..data.synthetic import zero_shot_task

    out = {}
    for kind in ("colour", "shape"):
        task = zero_shot_task(kind, n_per_class, image_size=model.config.vision.image_size, seed=seed,
                              shapes=list(shapes))
        protos = torch.stack([F.normalize(_text_embeddings(model, p).mean(0), dim=-1) for p in task.prompts])
        imgs = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
                            for im in task.images])
        pred = (image_embeddings(model, imgs) @ protos.T).argmax(1)
        out[kind] = float((pred == torch.tensor(task.labels)).float().mean())
    return out


# ---------------------------------------------------------------------------------------------- save / load
def save_image_top(model, directory: str | Path, layers: int | None = 1, info: dict | None = None,
                   half: bool = True) -> Path:
    """Store only the fine-tuned part (``top.safetensors``, fp16 when ``half``) and ``top.json``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: (p.detach().half() if half else p.detach()).contiguous()
               for k, p in trainable_image_parameters(model, layers).items()}
    save_file(tensors, str(d / "top.safetensors"))
    meta = {"format": "cliplab-un2clip-top", "base_model": model.config.name, "layers": layers, **(info or {})}
    (d / "top.json").write_text(json.dumps(meta, indent=2) + "\n")
    return d


def shipped_un2clip_dir(name: str = "un2clip") -> Path:
    d = _PRETRAINED / name
    if not (d / "top.json").is_file():
        raise FileNotFoundError(f"no shipped un2clip weights {name!r} in {_PRETRAINED} "
                                "(python experiments/un2clip_train.py --stage un2clip)")
    return d


def load_image_top(model, directory: str | Path):
    """A copy of ``model`` with the tensors of :func:`save_image_top` loaded (fp32)."""
    d = Path(directory)
    tensors = load_file(str(d / "top.safetensors"))
    out = copy.deepcopy(model).float()
    state = out.state_dict()
    missing = [k for k in tensors if k not in state]
    if missing:
        raise ValueError(f"{d} holds tensors this model does not have: {missing[:3]}")
    out.load_state_dict({**state, **{k: v.float() for k, v in tensors.items()}})
    return out.eval()


def load_un2clip(name: str = "un2clip", base=None):
    """``shapes-tiny`` with a shipped fine-tuned top: ``"un2clip"`` (the method) or ``"drift"`` (the control)."""
    import cliplab

    d = shipped_un2clip_dir(name)
    base = base if base is not None else cliplab.load(json.loads((d / "top.json").read_text())["base_model"])
    return load_image_top(base, d)


# ---------------------------------------------------------------------------------------------- one call (the CLI's)
def measure(model, n_pairs: int = 200, n_per_class: int = 25, seed: int = 7) -> dict:
    """The fine-detail measures (colour-binding and position pairs) and coarse zero-shot, on held-out scenes."""
    a, b, pa, pb = binding_pairs(n_pairs, seed=seed, image_size=model.config.vision.image_size)
    la, lb = position_pairs(n_pairs, seed=seed, image_size=model.config.vision.image_size)
    return {"binding": detail_scores(model, a, b, pa, pb), "position": detail_scores(model, la, lb),
            "zero_shot": coarse_zero_shot(model, n_per_class, seed=seed + 1)}


def run_un2clip(out: str | Path | None = None, generator: str | Path = "unclip-32", base: str = "shapes-tiny",
                progress: bool | None = None, measure_pairs: int = 200, **overrides) -> dict:
    """Load ``base`` and the unCLIP ``generator``, fine-tune with :func:`un2clip_finetune` (``overrides`` set
    :class:`Un2clipConfig` fields), save the tuned model as a normal cliplab model in ``out`` (``cliplab.load(out)``
    reads it) and return the measures before and after (``measure_pairs=0`` skips them)."""
    import cliplab
    from ..generation.unclip import load_unclip

    model = cliplab.load(base).float().eval()
    gen = load_unclip(generator).frozen()
    result: dict = {"base": base, "generator": str(generator)}
    if measure_pairs:
        result["before"] = measure(model, measure_pairs)
    tuned, _, log = un2clip_finetune(model, gen, progress=progress, **overrides)
    result.update(config=log["config"], final_loss=float(np.mean(log["losses"][-50:])) if log["losses"] else None)
    if measure_pairs:
        result["after"] = measure(tuned, measure_pairs)
    if out is not None:
        result["out"] = str(tuned.save(out))
    return result
