"""Zero-shot classifiers: class names x templates -> one unit-norm text embedding per class.

The CLIP recipe ("prompt ensembling"): fill every template with the class name, encode each prompt, normalise each
embedding, average them per class and normalise the average. A class may carry several names (synonyms, as in CLIP's
FER2013 list): all names x all templates are pooled into the same average.

Class descriptions (the "class description embedding", after Menon & Vondrick 2022 and CuPL): each description ``d``
of class ``c`` becomes one more prompt, ``description_template`` filled with ``{c}`` and ``{d}`` (default
``"a photo of a {c}, which has {d}."``). ``description_mode`` says how they combine with the templates:

* ``"pool"`` (default): description prompts join the template prompts in one average; every prompt weighs the same.
* ``"balanced"``: templates and descriptions are averaged separately (each normalised), then the two means are
  averaged and normalised: 50/50 whatever the counts.
* ``"only"``: descriptions alone; a class without descriptions falls back to its template prompts.

Building is batched over all classes at once: the prompts of every class are flattened, de-duplicated, tokenized once,
sorted by token length (the text tower cuts each batch to its longest prompt, so similar lengths waste no compute) and
encoded in batches; per-class means are one ``index_add_`` each.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from ..progress import Progress
from .templates import ClassName, fill_template, load_templates, normalize_name

__all__ = ["ZeroShotClassifier", "encode_prompts", "class_prompt_groups", "DEFAULT_DESCRIPTION_TEMPLATE",
           "duplicate_classnames", "DuplicateClassWarning", "RoutedPromptClassifier"]

DEFAULT_DESCRIPTION_TEMPLATE = "a photo of a {c}, which has {d}."
DESCRIPTION_MODES = ("pool", "balanced", "only")

TextEncoder = Callable[[list[str]], torch.Tensor]


class DuplicateClassWarning(UserWarning):
    """Two or more classes have the same name: they get (nearly) the same embedding, so all but one of them are
    (almost) never predicted."""


def duplicate_classnames(classnames: Sequence[ClassName]) -> dict[str, list[int]]:
    """``{name: [class indices]}`` for every class name that occurs more than once, compared by
    :func:`~cliplab.zeroshot.normalize_name` of the display name (the first synonym), so ``"Cat"`` and ``"cat."``
    are the same; keyed by the first spelling. CLIP's ImageNet list has two: ``missile`` and ``sunglasses``."""
    seen: dict[str, list[int]] = {}
    first: dict[str, str] = {}
    for i, c in enumerate(classnames):
        name = c if isinstance(c, str) else (list(c) or [""])[0]
        key = normalize_name(str(name)) or str(name)
        first.setdefault(key, str(name))
        seen.setdefault(key, []).append(i)
    return {first[k]: ix for k, ix in seen.items() if len(ix) > 1}


def describe_duplicates(dups: Mapping[str, Sequence[int]]) -> str:
    """``"duplicate class names: 'missile' (657, 744), ..."`` (one line; the warning's text)."""
    listed = ", ".join(f"{n!r} ({', '.join(map(str, ix))})" for n, ix in dups.items())
    return (f"duplicate class names: {listed} (class indices); classes with the same name get (nearly) the same "
            "embedding, so all but the first of each are (almost) never predicted: rename them")


def _warn_duplicates(classnames: Sequence[ClassName]) -> None:
    dups = duplicate_classnames(classnames)
    if dups:
        warnings.warn(describe_duplicates(dups), DuplicateClassWarning, stacklevel=3)


@torch.inference_mode()
def encode_prompts(model, texts: Sequence[str], batch_size: int = 256, progress: bool | None = False,
                   on_batch: Callable[[list[int], torch.Tensor], None] | None = None,
                   desc: str = "encoding prompts") -> torch.Tensor:
    """Encode ``texts`` with ``model.encode_text`` in length-sorted batches; rows come back in input order, as
    unnormalised float32 features on the CPU.

    ``on_batch(indices, features)`` is called after each batch (the embedding cache writes a chunk there).
    ``progress``: ``False`` silent, ``True`` a bar, ``None`` a bar on a terminal and a plain line every 10 s
    otherwise (:mod:`cliplab.progress`)."""
    texts = list(texts)
    out = torch.empty(len(texts), model.config.embed_dim, dtype=torch.float32)
    if not texts:
        return out
    tokens = model.tokenize(texts)
    order = torch.argsort(tokens.lengths, stable=True)
    with Progress(total=len(texts), desc=desc, unit="item", enabled=progress, leave=False) as bar:
        for start in range(0, len(texts), batch_size):
            idx = order[start: start + batch_size]
            feats = model.encode_text(tokens.ids[idx]).float().cpu()
            out[idx] = feats
            if on_batch is not None:
                on_batch(idx.tolist(), feats)
            bar.update(len(idx))
    return out


def _names(c: ClassName) -> list[str]:
    if isinstance(c, str):
        return [c]
    names = list(c)
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"a class must be a name or a non-empty list of synonym names, got {c!r}")
    return names


def class_prompt_groups(classnames: Sequence[ClassName], templates: Sequence[str],
                        descriptions: Mapping[str, Sequence[str]] | Sequence[Sequence[str] | None] | None = None,
                        description_template: str = DEFAULT_DESCRIPTION_TEMPLATE,
                        description_mode: str = "pool") -> list[list[list[str]]]:
    """The prompts of each class, as groups: ``groups[c]`` is a list of prompt lists; a class embedding is the
    normalised mean of its groups' normalised means (module docstring)."""
    if description_mode not in DESCRIPTION_MODES:
        raise ValueError(f"description_mode must be one of {DESCRIPTION_MODES}, got {description_mode!r}")
    if descriptions is not None and not isinstance(descriptions, Mapping) and len(descriptions) != len(classnames):
        raise ValueError(f"descriptions: {len(descriptions)} entries for {len(classnames)} classes")
    out = []
    for i, c in enumerate(classnames):
        names = _names(c)
        base = [fill_template(t, n) for n in names for t in templates]
        if descriptions is None:
            descs = []
        elif isinstance(descriptions, Mapping):
            descs = list(descriptions.get(names[0], ()))
        else:
            descs = list(descriptions[i] or ())
        desc_prompts = [fill_template(description_template, names[0], d) for d in descs]
        if not desc_prompts:
            groups = [base]
        elif description_mode == "pool":
            groups = [base + desc_prompts]
        elif description_mode == "balanced":
            groups = [base, desc_prompts] if base else [desc_prompts]
        else:
            groups = [desc_prompts]
        groups = [g for g in groups if g]
        if not groups:
            raise ValueError(f"class {names[0]!r} has no prompts (no templates and no descriptions)")
        out.append(groups)
    return out


def _segment_mean_normalized(rows: torch.Tensor, segment: torch.Tensor, n_segments: int) -> torch.Tensor:
    sums = torch.zeros(n_segments, rows.shape[1], dtype=rows.dtype).index_add_(0, segment, rows)
    counts = torch.bincount(segment, minlength=n_segments).to(rows.dtype).clamp_min(1)
    return F.normalize(sums / counts[:, None], dim=-1)


class ZeroShotClassifier:
    """``weights [C, D]`` unit-norm class embeddings; ``predict(image_features)`` gives ``[N, C]`` logits."""

    def __init__(self, weights: torch.Tensor, classnames: Sequence[str], logit_scale: float = 100.0,
                 model=None, prompts: list[list[list[str]]] | None = None, normalize: bool = True):
        if weights.ndim != 2 or weights.shape[0] != len(classnames):
            raise ValueError(f"weights {tuple(weights.shape)} do not match {len(classnames)} class names")
        self.weights = F.normalize(weights.float(), dim=-1) if normalize else weights.float()
        self.classnames = list(classnames)
        self.logit_scale = float(logit_scale)
        self.model = model
        self.prompts = prompts

    # --- building ------------------------------------------------------------------------------------------------------
    @classmethod
    def from_prompts(cls, model, prompts: Sequence[Sequence[str] | Sequence[Sequence[str]]],
                     classnames: Sequence[str] | None = None, *, text_encoder: TextEncoder | None = None,
                     batch_size: int = 256, progress: bool | None = False, logit_scale: float | None = None
                     ) -> "ZeroShotClassifier":
        """One class per entry of ``prompts``: a list of prompt strings, or a list of prompt groups (lists).

        Duplicate class names are reported with a :class:`DuplicateClassWarning` (:func:`duplicate_classnames`)."""
        groups = [[list(p)] if p and isinstance(p[0], str) else [list(g) for g in p] for p in prompts]
        if any(not g or not all(g) for g in groups):
            raise ValueError("every class needs at least one non-empty prompt list")
        if classnames is None:
            classnames = [g[0][0] for g in groups]
        _warn_duplicates(classnames)
        unique: dict[str, int] = {}
        text_ix, group_ix, class_of_group = [], [], []
        for c, cls_groups in enumerate(groups):
            for g in cls_groups:
                gi = len(class_of_group)
                class_of_group.append(c)
                for text in g:
                    text_ix.append(unique.setdefault(text, len(unique)))
                    group_ix.append(gi)
        texts = list(unique)
        if text_encoder is None:
            feats = encode_prompts(model, texts, batch_size=batch_size, progress=progress)
        else:
            feats = text_encoder(texts).float().cpu()
        if feats.shape[0] != len(texts):
            raise ValueError(f"text encoder returned {feats.shape[0]} rows for {len(texts)} prompts")
        rows = F.normalize(feats, dim=-1)[torch.tensor(text_ix)]
        weights = _segment_mean_normalized(rows, torch.tensor(group_ix), len(class_of_group))
        if len(class_of_group) != len(groups):  # several groups in some class: mean of the group means
            weights = _segment_mean_normalized(weights, torch.tensor(class_of_group), len(groups))
        if logit_scale is None:
            logit_scale = _model_logit_scale(model)
        return cls(weights, list(classnames), logit_scale=logit_scale, model=model, prompts=groups, normalize=False)

    @classmethod
    def from_classnames(cls, model, classnames: Sequence[ClassName], templates: str | Path | Sequence[str] = "generic",
                        descriptions: Mapping[str, Sequence[str]] | Sequence[Sequence[str] | None] | None = None, *,
                        description_template: str = DEFAULT_DESCRIPTION_TEMPLATE, description_mode: str = "pool",
                        text_encoder: TextEncoder | None = None, batch_size: int = 256,
                        progress: bool | None = False, logit_scale: float | None = None) -> "ZeroShotClassifier":
        """Class names x templates (a shipped set name, a file, ``prompts.md#Dataset`` or a list) -> classifier.

        ``descriptions``: ``{classname: [description, ...]}`` or one list per class (module docstring)."""
        if not classnames:
            raise ValueError("no class names")
        tmpl = load_templates(templates)
        groups = class_prompt_groups(classnames, tmpl, descriptions, description_template, description_mode)
        display = [c if isinstance(c, str) else list(c)[0] for c in classnames]
        return cls.from_prompts(model, groups, display, text_encoder=text_encoder, batch_size=batch_size,
                                progress=progress, logit_scale=logit_scale)

    @classmethod
    def from_learned_prompts(cls, model, prompts, classnames: Sequence[str] | None = None) -> "ZeroShotClassifier":
        """A classifier from learned prompts (CoOp/MoCoOp): a learned-prompts file, a
        :class:`~cliplab.zeroshot.prompt_learning.LearnedPrompts` or a ``PromptMixture``. ``classnames`` reorders
        (and checks) the classes. A mixture with a router gives a ``MixturePromptClassifier`` (routes each image).
        See :func:`cliplab.zeroshot.prompt_learning.prompt_classifier`."""
        from .prompt_learning import learned_class_features

        mixture, feats, names = learned_class_features(model, prompts, classnames=classnames)
        if mixture.num_experts > 1:
            return RoutedPromptClassifier(F.normalize(feats, dim=-1), mixture, names, model=model)
        # one class embedding per class, through the same normalise-and-average code as hand prompts
        keys = [f"\0learned:{c}" for c in names]
        table = dict(zip(keys, feats[0]))
        clf = cls.from_prompts(model, [[k] for k in keys], names, logit_scale=mixture.logit_scale,
                               text_encoder=lambda texts: torch.stack([table[t] for t in texts]))
        clf.prompts = None
        return clf

    # --- using ---------------------------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.weights.shape[0]

    def predict(self, image_features: torch.Tensor) -> torch.Tensor:
        """``[N, D]`` image features (normalised here) -> ``[N, C]`` logits ``logit_scale * cos``."""
        f = F.normalize(image_features.float().to(self.weights.device), dim=-1)
        return self.logit_scale * f @ self.weights.t()

    @torch.inference_mode()
    def classify(self, images: Iterable | torch.Tensor, topk: int = 5, batch_size: int = 64
                 ) -> list[list[tuple[str, float]]]:
        """Images (PIL, paths, or preprocessed pixels ``[B, 3, S, S]``) -> for each, the ``topk`` classes with their
        softmax probabilities, best first."""
        if self.model is None:
            raise ValueError("classify needs the model: build the classifier with from_classnames/from_prompts")
        if isinstance(images, torch.Tensor):
            feats = self.model.encode_image(images.to(self.model.device))
        else:
            feats = self.model.encode_images(images, batch_size=batch_size)
        probs = self.predict(feats.float().cpu()).softmax(dim=-1)
        k = min(topk, self.num_classes)
        values, indices = probs.topk(k, dim=-1)
        return [[(self.classnames[j], float(v)) for v, j in zip(vs.tolist(), ix.tolist())]
                for vs, ix in zip(values, indices)]

    def save(self, path: str | Path) -> Path:
        """Weights + class names in one safetensors file (reload with :meth:`load`)."""
        import json

        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"weights": self.weights.contiguous()}, str(path),
                  metadata={"classnames": json.dumps(self.classnames), "logit_scale": repr(self.logit_scale)})
        return path

    @classmethod
    def load(cls, path: str | Path, model=None) -> "ZeroShotClassifier":
        import json

        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            weights = f.get_tensor("weights")
        return cls(weights, json.loads(meta["classnames"]), float(meta.get("logit_scale", 100.0)), model=model,
                   normalize=False)

    def __repr__(self) -> str:
        return f"ZeroShotClassifier(classes={self.num_classes}, dim={self.weights.shape[1]})"


class RoutedPromptClassifier(ZeroShotClassifier):
    """Learned prompts with several experts and a router (MoCoOp): :meth:`predict` routes each image to its top-k
    experts (``PromptMixture.logits_from``); ``weights`` (for code that ignores routing) is the normalised mean of the
    experts' class embeddings ``expert_weights`` ``[K, C, D]``. Save the learned-prompts file, not this."""

    def __init__(self, expert_weights: torch.Tensor, mixture, classnames: Sequence[str], model=None):
        super().__init__(expert_weights.float().mean(0), classnames, logit_scale=mixture.logit_scale, model=model)
        self.expert_weights = expert_weights.float()
        self.mixture = mixture.cpu().eval()

    @torch.no_grad()
    def predict(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.mixture.logits_from(image_features.float().cpu(), self.expert_weights)[0]

    def save(self, path: str | Path) -> Path:
        raise ValueError("a routed classifier is saved as its learned-prompts file (LearnedPrompts.save), not as "
                         "fixed weights")


def _model_logit_scale(model) -> float:
    if model is None or not hasattr(model, "logit_scale"):
        return 100.0
    return min(math.exp(float(model.logit_scale.detach())), 100.0)
