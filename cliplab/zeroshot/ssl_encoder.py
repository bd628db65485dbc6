"""Self-supervised image encoders: the :class:`SSLImageEncoder` protocol and a small DINO-style implementation.

A second, label-free image encoder is what several label-free adaptation methods lean on (NoLA uses DINO ViT-B/16
features to label images for CLIP). Here the protocol is small so any encoder can stand in:

* ``encode(pixels) -> [B, D]``: ``pixels`` are RGB in ``[0, 1]``, ``[B, 3, H, W]`` of any size (the encoder resizes
  and normalises itself, so callers never need to know its input convention);
* ``feature_dim`` (``D``) and ``image_size`` (what it resizes to);
* ``save(path)``: weights as safetensors plus a JSON config (``kind`` names the class); :func:`load_ssl_encoder`
  reads any registered kind back (:func:`register_ssl_encoder`).

The shipped implementation, :class:`DINOConvEncoder`, is a small CNN trained by self-distillation without labels
(:func:`train_dino`, after Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", DINO):

* a student and a teacher of the same architecture (backbone + projection head ending in an L2-normalised bottleneck
  and a weight-normalised prototype layer with its norms fixed to 1, DINO's ``norm_last_layer``); the head's MLP
  has BatchNorm (DINO's ``use_bn_in_head``, off by default there);
* multi-crop: two global crops go through both, the global and ``n_local`` smaller local crops through the student;
  the loss is the cross-entropy between the teacher's distribution on one global crop and the student's on every
  other crop;
* the teacher is the exponential moving average of the student (momentum on a cosine schedule from
  ``momentum`` to 1) and gets no gradient; its outputs are **centred** (a running mean of the teacher logits,
  subtracted) and **sharpened** (temperature ``teacher_temp`` < ``student_temp``), which is what keeps it from
  collapsing to a constant or a uniform output.

Differences from DINO, and why: a small CNN instead of a ViT, to train in minutes on a CPU; the features are the
backbone's global average and max pools concatenated (a max over local detectors keeps small-object evidence that an
average dilutes); crops at the encoder's size and half of it, not 224/96 px; BatchNorm in the head (below). Options
for shape-defined synthetic domains, used by the shipped encoder: ``grayscale`` (luminance only, each image
standardised; on coloured single-object scenes the untrained and briefly trained features were dominated by colour:
5-NN colour accuracy 0.93, shape 0.24), crops that also zoom out (area fraction above 1), so object size is
augmented both ways, and a wider blur range. Colour jitter also permutes channels (a hue change).

``object_crop`` (:func:`object_crops`) is a stronger option for single-object scenes on a flat background: the
encoder sees the object centred at a fixed size (a square around the pixels that differ from the border colour, a
margin around it), in training and in ``encode``, so the object's position and size, which are not its class, are
gone before the network sees it. Found necessary here: a small CNN's pooled features of the whole 64 px scene
mixed shape with position and size, and its 5-NN shape accuracy was 0.51 at initialisation and 0.64 after DINO
training, while the object crop's raw pixels alone reach 0.83 (``experiments/nola_train_ssl.py``). DINO on real
photos learns object-centred attention over many GPU-days; this is the CPU-budget stand-in for it.

The trainer reads **images only**: a ``[N, 3, H, W]`` tensor or a sampler ``f(n, generator)``; a ``(images,
labels)`` pair is refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SSLImageEncoder", "register_ssl_encoder", "load_ssl_encoder", "DINOConfig", "DINOConvEncoder",
           "DINOHead", "dino_loss", "train_dino", "images_to_pixels", "random_crops", "colour_jitter",
           "random_blur", "augment", "foreground_boxes", "object_crops", "SHIPPED_SSL_ENCODERS",
           "load_shipped_ssl_encoder"]

PRETRAINED_DIR = Path(__file__).parent / "pretrained"
#: name -> folder under cliplab/zeroshot/pretrained/ (made by experiments/nola_train_ssl.py)
SHIPPED_SSL_ENCODERS = {"dino-conv-shapes-blur": PRETRAINED_DIR / "dino-conv-shapes-blur",
                        "dino-conv-shapes-objects": PRETRAINED_DIR / "dino-conv-shapes-objects"}

ImageSource = torch.Tensor | Callable[[int, torch.Generator], torch.Tensor]


@runtime_checkable
class SSLImageEncoder(Protocol):
    """A frozen image encoder trained without labels: ``encode`` RGB pixels in ``[0, 1]`` (any size) to features."""

    feature_dim: int
    image_size: int

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` RGB in ``[0, 1]`` -> ``[B, feature_dim]`` features (float32, not normalised)."""
        ...

    def save(self, path: str | Path) -> Path:
        """Write ``path/weights.safetensors`` and ``path/config.json`` (with ``"kind"``); returns ``path``."""
        ...


_KINDS: dict[str, type] = {}


def register_ssl_encoder(kind: str):
    """Class decorator: ``load_ssl_encoder`` builds classes of this ``kind`` with ``cls.from_config(cfg, tensors)``."""

    def register(cls):
        _KINDS[kind] = cls
        cls.kind = kind
        return cls

    return register


def load_ssl_encoder(path: str | Path) -> SSLImageEncoder:
    """Read an encoder written by ``save`` (a folder with ``config.json`` and ``weights.safetensors``)."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{path} has no config.json: pass a folder written by an SSL encoder's save()")
    cfg = json.loads(cfg_file.read_text())
    kind = cfg.get("kind")
    if kind not in _KINDS:
        raise ValueError(f"unknown SSL encoder kind {kind!r} in {cfg_file}; known: {sorted(_KINDS)}")
    return _KINDS[kind].from_config(cfg, load_file(str(path / "weights.safetensors")))


def load_shipped_ssl_encoder(name: str = "dino-conv-shapes-blur") -> SSLImageEncoder:
    """A shipped encoder by name (:data:`SHIPPED_SSL_ENCODERS`)."""
    if name not in SHIPPED_SSL_ENCODERS:
        raise ValueError(f"unknown shipped SSL encoder {name!r}; known: {sorted(SHIPPED_SSL_ENCODERS)}")
    return load_ssl_encoder(SHIPPED_SSL_ENCODERS[name])


def images_to_pixels(images: Sequence, size: int | None = None) -> torch.Tensor:
    """PIL images -> ``[N, 3, S, S]`` float RGB in ``[0, 1]`` (resized to ``size`` when given, bilinear)."""
    import numpy as np

    rows = []
    for im in images:
        im = im.convert("RGB")
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), resample=2)
        rows.append(torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1))
    if not rows:
        raise ValueError("no images")
    return torch.stack(rows).float() / 255.0


# --- object-centred views (single-object scenes on a flat background) ----------------------------------------------

def foreground_boxes(pixels: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """``[N, 4]`` boxes ``(row0, row1, col0, col1)`` (inclusive pixel indices) of the pixels that differ from the
    image's background colour (the per-channel median of its border) by more than ``threshold`` in some channel.
    An image with no such pixel gets the whole image."""
    n, _, h, w = pixels.shape
    border = torch.cat([pixels[:, :, 0], pixels[:, :, -1], pixels[:, :, :, 0], pixels[:, :, :, -1]], dim=2)
    background = border.median(dim=2).values[:, :, None, None]
    fg = (pixels - background).abs().amax(dim=1) > threshold            # [N, H, W]

    def span(mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(length, dtype=torch.float32).expand_as(mask)
        lo = torch.where(mask, pos, torch.full_like(pos, length)).amin(dim=1)
        hi = torch.where(mask, pos, torch.full_like(pos, -1)).amax(dim=1)
        found = mask.any(dim=1)
        return torch.where(found, lo, 0.0), torch.where(found, hi, float(length - 1))

    r0, r1 = span(fg.any(dim=2), h)
    c0, c1 = span(fg.any(dim=1), w)
    return torch.stack([r0, r1, c0, c1], dim=1)


def object_crops(pixels: torch.Tensor, size: int, margin: float = 0.15, threshold: float = 0.1) -> torch.Tensor:
    """Each image cropped to a square around its foreground box (:func:`foreground_boxes`), ``margin`` of the
    box's longer side added on every side, resampled to ``size`` (bilinear; outside the image the border pixels
    extend it). On single-object scenes this removes the object's position and size, which a small CNN's pooled
    features otherwise mix with its shape."""
    n, _, h, w = pixels.shape
    r0, r1, c0, c1 = foreground_boxes(pixels, threshold).unbind(dim=1)
    side = torch.maximum(r1 - r0 + 1, c1 - c0 + 1) * (1 + 2 * margin)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = side / w, side / h
    theta[:, 0, 2] = (c0 + c1 + 1) / w - 1                     # box centre in [-1, 1] (align_corners=False)
    theta[:, 1, 2] = (r0 + r1 + 1) / h - 1
    grid = F.affine_grid(theta, (n, pixels.shape[1], size, size), align_corners=False)
    return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)


# --- augmentations (batched, seeded, on [0, 1] pixels) -------------------------------------------------------------

def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def random_crops(pixels: torch.Tensor, size: int, scale: tuple[float, float], g: torch.Generator,
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True) -> torch.Tensor:
    """A random resized crop of each image (area fraction in ``scale``), resampled to ``size`` (bilinear), with a
    random horizontal flip: one ``affine_grid`` for the whole batch. An area fraction above 1 zooms out (the border
    pixels extend the image), so object size can be augmented both ways."""
    n = pixels.shape[0]
    area = _uniform(n, *scale, g)
    log_r = _uniform(n, math.log(ratio[0]), math.log(ratio[1]), g).exp()
    w = (area * log_r).sqrt()
    h = (area / log_r).sqrt()
    cx = (torch.rand(n, generator=g) * 2 - 1) * (1 - w).abs()
    cy = (torch.rand(n, generator=g) * 2 - 1) * (1 - h).abs()
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0) if flip else torch.ones(n)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w * sign, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta, (n, 3, size, size), align_corners=False)
    return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)


def colour_jitter(pixels: torch.Tensor, g: torch.Generator, strength: float = 0.4, p: float = 0.8,
                  grayscale: float = 0.2, permute: float = 0.5) -> torch.Tensor:
    """Brightness/contrast/saturation jitter (prob. ``p``), random channel permutation (prob. ``permute``, a hue
    change that keeps shapes), random grayscale (prob. ``grayscale``)."""
    n = pixels.shape[0]
    x = pixels
    on = (torch.rand(n, generator=g) < p).float()[:, None, None, None]
    b = 1 + on * _uniform(n, -strength, strength, g)[:, None, None, None]
    c = 1 + on * _uniform(n, -strength, strength, g)[:, None, None, None]
    s = 1 + on * _uniform(n, -strength, strength, g)[:, None, None, None]
    x = x * b
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * c + mean
    gray = (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]).expand_as(x)
    x = (x - gray) * s + gray
    if permute > 0:
        perms = torch.stack([torch.randperm(3, generator=g) for _ in range(n)])
        keep = torch.rand(n, generator=g) >= permute
        perms[keep] = torch.arange(3)
        x = x.gather(1, perms[:, :, None, None].expand_as(x))
    if grayscale > 0:
        to_gray = (torch.rand(n, generator=g) < grayscale)[:, None, None, None]
        gray = (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]).expand_as(x)
        x = torch.where(to_gray, gray, x)
    return x.clamp(0, 1)


def random_blur(pixels: torch.Tensor, g: torch.Generator, p: float = 0.5, sigma: tuple[float, float] = (0.1, 1.5)
                ) -> torch.Tensor:
    """Gaussian blur of a random subset (prob. ``p``), one sigma drawn per batch (a 5x5 separable kernel)."""
    n = pixels.shape[0]
    chosen = torch.rand(n, generator=g) < p
    if not chosen.any():
        return pixels
    sd = float(_uniform(1, *sigma, g))
    t = torch.arange(-2, 3, dtype=pixels.dtype)
    k = torch.exp(-t**2 / (2 * sd * sd))
    k = k / k.sum()
    x = pixels[chosen]
    x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="reflect"), k.view(1, 1, 1, 5).expand(3, 1, 1, 5), groups=3)
    x = F.conv2d(F.pad(x, (0, 0, 2, 2), mode="reflect"), k.view(1, 1, 5, 1).expand(3, 1, 5, 1), groups=3)
    out = pixels.clone()
    out[chosen] = x
    return out


def augment(pixels: torch.Tensor, size: int, g: torch.Generator, scale: tuple[float, float] = (0.4, 1.0),
            blur: float = 0.5, colour: bool = True, blur_sigma: tuple[float, float] = (0.1, 1.5)) -> torch.Tensor:
    """One random view: crop+flip, colour jitter, blur (the SimCLR/DINO recipe, on tensors)."""
    x = random_crops(pixels, size, scale, g)
    if colour:
        x = colour_jitter(x, g)
    return random_blur(x, g, p=blur, sigma=blur_sigma) if blur > 0 else x


# --- the DINO-style encoder ----------------------------------------------------------------------------------------

@dataclass
class DINOConfig:
    """Architecture and self-distillation recipe of :class:`DINOConvEncoder` / :func:`train_dino`."""

    image_size: int = 32
    channels: tuple[int, ...] = (32, 64, 128)
    head_hidden: int = 256
    bottleneck: int = 64
    n_prototypes: int = 256
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    center_momentum: float = 0.9
    momentum: float = 0.99          # teacher EMA at step 0, cosine to 1 at the end
    n_local: int = 2
    local_size: int = 16
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.15, 0.4)
    lr: float = 2e-3
    weight_decay: float = 0.04
    steps: int = 600
    batch_size: int = 64
    seed: int = 0
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    #: see luminance only, each image standardised (zero mean, unit std): colour and global brightness cannot be
    #: features at all (a stronger form of DINO's colour jitter + grayscale, chosen for shape-defined domains)
    grayscale: bool = False
    blur_sigma: tuple[float, float] = (0.1, 1.5)
    #: see each image through :func:`object_crops` (its object, centred, at a fixed size) in training and in
    #: ``encode``: for single-object scenes on a flat background, where position and size are not the class
    object_crop: bool = False
    crop_margin: float = 0.15
    crop_threshold: float = 0.1
    extra: dict = field(default_factory=dict)


class ConvBackbone(nn.Module):
    """``len(channels)`` stages of ``3x3 conv -> GroupNorm -> ReLU -> 2x2 max-pool``; global average and max pools
    concatenated: ``2 * channels[-1]`` features."""

    def __init__(self, channels: Sequence[int], in_channels: int = 3):
        super().__init__()
        layers, c_in = [], in_channels
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.GroupNorm(min(8, c), c), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c
        self.body = nn.Sequential(*layers)
        self.out_dim = 2 * c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.body(x)
        return torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)


class DINOHead(nn.Module):
    """DINO's projection head: MLP -> L2-normalised bottleneck -> prototypes with unit-norm weight rows."""

    def __init__(self, dim: int, hidden: int, bottleneck: int, n_prototypes: int):
        super().__init__()
        # BatchNorm: on near-identical synthetic images the raw features differ little between images; without it
        # the centred teacher targets start (and stay) uniform and the run collapses (measured: entropy -> log K).
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.GELU(),
                                 nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.prototypes = nn.Parameter(torch.randn(n_prototypes, bottleneck) * bottleneck**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=-1) @ F.normalize(self.prototypes, dim=-1).t()


@register_ssl_encoder("dino-conv")
class DINOConvEncoder(nn.Module):
    """A small CNN trained by DINO self-distillation (:func:`train_dino`); an :class:`SSLImageEncoder`. ``encode``
    returns the backbone features (the head is used only in training, as in DINO)."""

    def __init__(self, config: DINOConfig | None = None):
        super().__init__()
        self.config = config or DINOConfig()
        self.backbone = ConvBackbone(self.config.channels, 1 if self.config.grayscale else 3)
        self.head = DINOHead(self.backbone.out_dim, self.config.head_hidden, self.config.bottleneck,
                             self.config.n_prototypes)
        self.register_buffer("mean", torch.tensor(self.config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.config.std).view(1, 3, 1, 1), persistent=False)

    @property
    def feature_dim(self) -> int:
        return self.backbone.out_dim

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def normalize_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.config.grayscale:
            y = 0.299 * pixels[:, :1] + 0.587 * pixels[:, 1:2] + 0.114 * pixels[:, 2:]
            mu = y.mean(dim=(1, 2, 3), keepdim=True)
            return (y - mu) / y.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)
        return (pixels - self.mean) / self.std

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Backbone features of ``[0, 1]`` pixels already at the size to use (crops keep their own size)."""
        return self.backbone(self.normalize_pixels(pixels))

    def view(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[0, 1]`` pixels of any size -> the encoder's input view at ``image_size``: the object crop when
        ``config.object_crop``, else the whole image resized."""
        cfg, s = self.config, self.config.image_size
        if cfg.object_crop:
            return object_crops(pixels, s, cfg.crop_margin, cfg.crop_threshold)
        if pixels.shape[-2:] != (s, s):
            pixels = F.interpolate(pixels, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        return pixels

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """``[B, 3, H, W]`` RGB in ``[0, 1]`` -> ``[B, feature_dim]`` (of :meth:`view`, eval mode)."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected pixels [B, 3, H, W] in [0, 1], got {tuple(pixels.shape)}")
        was = self.training
        self.eval()
        out = [self.features(self.view(chunk)) for chunk in pixels.float().split(batch_size)]
        self.train(was)
        return torch.cat(out)

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path / "weights.safetensors"))
        cfg = {"kind": self.kind, **asdict(self.config)}
        (path / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")
        return path

    @classmethod
    def from_config(cls, cfg: dict, tensors: dict[str, torch.Tensor]) -> "DINOConvEncoder":
        cfg = {k: v for k, v in cfg.items() if k != "kind"}
        for k in ("channels", "global_scale", "local_scale", "mean", "std", "blur_sigma"):
            if k in cfg:
                cfg[k] = tuple(cfg[k])
        enc = cls(DINOConfig(**cfg))
        enc.load_state_dict(tensors)
        return enc.eval()


def dino_loss(student_out: Sequence[torch.Tensor], teacher_out: Sequence[torch.Tensor], center: torch.Tensor,
              student_temp: float, teacher_temp: float) -> torch.Tensor:
    """DINO's loss: mean over pairs (teacher global crop ``i``, student crop ``j != i``) of
    ``-sum softmax((t_i - center) / teacher_temp) * log_softmax(s_j / student_temp)``."""
    targets = [F.softmax((t - center) / teacher_temp, dim=-1) for t in teacher_out]
    logps = [F.log_softmax(s / student_temp, dim=-1) for s in student_out]
    total, pairs = 0.0, 0
    for i, q in enumerate(targets):
        for j, lp in enumerate(logps):
            if j == i:
                continue
            total = total + (-(q * lp).sum(dim=-1)).mean()
            pairs += 1
    return total / pairs


def _batch(images: ImageSource, n: int, g: torch.Generator) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        return images[torch.randint(images.shape[0], (n,), generator=g)]
    return images(n, g)


def train_dino(images: ImageSource, config: DINOConfig | None = None, *, steps: int | None = None,
               log_every: int = 0, on_log: Callable[[dict], None] | None = None
               ) -> tuple[DINOConvEncoder, list[dict]]:
    """Self-distillation without labels (module docstring). ``images``: a ``[N, 3, H, W]`` tensor in ``[0, 1]`` or
    a sampler ``f(n, generator) -> [n, 3, H, W]``. Returns the teacher (DINO evaluates the teacher) and a log of
    ``{"step", "loss", "entropy", "center_norm"}`` every ``log_every`` steps (and the last)."""
    if isinstance(images, (tuple, list)):
        raise ValueError("train_dino takes images only (a tensor or a sampler), not (images, labels): it is label-free")
    if not (isinstance(images, torch.Tensor) or callable(images)):
        raise ValueError("images must be a [N, 3, H, W] tensor in [0, 1] or a sampler f(n, generator)")
    cfg = config or DINOConfig()
    steps = cfg.steps if steps is None else steps
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    student = DINOConvEncoder(cfg)
    teacher = DINOConvEncoder(cfg)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    center = torch.zeros(1, cfg.n_prototypes)
    decay = [p for n, p in student.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in student.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    history = []
    warmup = max(1, steps // 10)
    for step in range(steps):
        lr = cfg.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        x = _batch(images, cfg.batch_size, g).float()
        if cfg.object_crop:     # augment the object view, as encode() sees it
            x = object_crops(x, cfg.image_size, cfg.crop_margin, cfg.crop_threshold)
        globals_ = [augment(x, cfg.image_size, g, cfg.global_scale, blur_sigma=cfg.blur_sigma) for _ in range(2)]
        locals_ = [augment(x, cfg.local_size, g, cfg.local_scale, blur_sigma=cfg.blur_sigma)
                   for _ in range(cfg.n_local)]
        with torch.no_grad():
            t_out = [teacher.head(teacher.features(v)) for v in globals_]
        s_out = [student.head(student.features(v)) for v in globals_ + locals_]
        loss = dino_loss(s_out, t_out, center, cfg.student_temp, cfg.teacher_temp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            m = 1 - (1 - cfg.momentum) * 0.5 * (1 + math.cos(math.pi * step / steps))
            for pt, ps in zip(teacher.parameters(), student.parameters()):
                pt.mul_(m).add_(ps.detach(), alpha=1 - m)
            batch_center = torch.cat(t_out).mean(dim=0, keepdim=True)
            center.mul_(cfg.center_momentum).add_(batch_center, alpha=1 - cfg.center_momentum)
        if (log_every and step % log_every == 0) or step == steps - 1:
            with torch.no_grad():
                q = F.softmax((t_out[0] - center) / cfg.teacher_temp, dim=-1)
                entropy = float(-(q * q.clamp_min(1e-12).log()).sum(-1).mean())
            row = {"step": step, "loss": float(loss.detach()), "entropy": entropy, "center_norm": float(center.norm())}
            history.append(row)
            if on_log is not None:
                on_log(row)
    teacher.center = center
    return teacher.eval(), history
