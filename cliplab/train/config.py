"""``TrainConfig``: everything a training run needs, as a dataclass that round-trips through JSON."""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..models import ConfigError, ModelConfig, get_config
from ..models.config import read_json

__all__ = ["DataConfig", "TrainConfig", "PRECISIONS"]

PRECISIONS = ("fp32", "bf16")
ATTENTION_BACKENDS = ("math", "default")


def _check_keys(cls, data: dict[str, Any], where: str) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; expected a subset of {sorted(names)}")


@dataclass
class DataConfig:
    """Where batches come from. ``options`` go to the source's constructor (see ``cliplab.train.data``)."""

    source: str = "synthetic"
    options: dict[str, Any] = field(default_factory=dict)
    caption: str = "short"  # "short" | "long" | "mix"
    long_prob: float = 0.5  # probability of the long caption with caption="mix"
    num_workers: int = 0  # DataLoader worker processes (0: build batches in the training process)
    prefetch: int = 2  # batches queued per worker


@dataclass
class TrainConfig:
    # model: a registered architecture name or a ModelConfig dict; init_from: weights to start from (cliplab.load)
    model: str | dict[str, Any] = "test-tiny"
    init_from: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    batch_size: int = 64
    steps: int = 1000
    lr: float = 5e-4
    min_lr: float = 0.0  # the cosine decays from lr to min_lr
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 100
    clip_norm: float | None = 1.0  # None or 0: no gradient clipping
    precision: str = "fp32"  # "fp32" | "bf16" (torch.autocast on the CPU)
    bucket_text: bool = True  # encode short and long captions of a batch as two length buckets (see Trainer)
    attention: str = "math"  # scaled_dot_product_attention backend while training: "math" | "default" (PyTorch's pick)
    freeze: list[str] = field(default_factory=list)  # fnmatch patterns over parameter names, e.g. "text.*"
    loss: str = "clip"
    loss_kwargs: dict[str, Any] = field(default_factory=dict)
    sampler: str = "random"
    sampler_kwargs: dict[str, Any] = field(default_factory=dict)
    seed: int = 0  # model init, sampler order and caption draws
    log_every: int = 10  # steps between metrics records (JSONL) and progress-bar updates
    checkpoint_every: int = 0  # steps between checkpoints (0: only the final one)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk (0: keep all)
    out_dir: str = "runs/train"
    threads: int | None = None  # torch.set_num_threads for the run (None: leave as is)
    progress: bool | None = None  # None: a bar on a terminal, a plain line every 10 s otherwise (cliplab.progress)

    def __post_init__(self):
        if isinstance(self.data, dict):
            _check_keys(DataConfig, self.data, "data")
            self.data = DataConfig(**self.data)
        self.betas = tuple(float(b) for b in self.betas)
        self.freeze = list(self.freeze)

    # --- checks ------------------------------------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ConfigError(f"attention must be one of {list(ATTENTION_BACKENDS)}, got {self.attention!r}")
        for name in ("batch_size", "steps"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.data.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.data.num_workers}")
        if len(self.betas) != 2:
            raise ConfigError(f"betas must be two floats, got {self.betas}")
        self.model_config()  # raises on an unknown name or a bad dict
        return self

    def model_config(self) -> ModelConfig:
        if isinstance(self.model, str):
            return get_config(self.model)
        if isinstance(self.model, ModelConfig):
            return self.model
        return ModelConfig.from_dict(self.model)

    # --- serialisation -----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if isinstance(self.model, ModelConfig):
            d["model"] = self.model.to_dict()
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        data = copy.deepcopy(dict(data))
        _check_keys(cls, data, "train config")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        return cls.from_dict(read_json(path))

    def replace(self, **changes: Any) -> "TrainConfig":
        return self.from_dict({**self.to_dict(), **{k: v for k, v in changes.items()}})

    def with_overrides(self, assignments: list[str] | tuple[str, ...]) -> "TrainConfig":
        """Apply ``key=value`` strings (dotted keys reach nested fields: ``data.caption=mix``,
        ``loss_kwargs.label_smoothing=0.1``). Values are parsed as JSON when they can be (``1e-3``, ``true``,
        ``null``, ``["text.*"]``), else kept as strings."""
        d = self.to_dict()
        for item in assignments:
            key, sep, raw = item.partition("=")
            if not sep or not key:
                raise ConfigError(f"override {item!r} is not key=value")
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
            parts = key.split(".")
            node = d
            for p in parts[:-1]:
                if node is d and p not in d:
                    raise ConfigError(f"override {item!r}: unknown section {p!r}; known: {sorted(d)}")
                cur = node.get(p)
                if node is d and p == "model" and isinstance(cur, str):
                    cur = node[p] = get_config(cur).to_dict()
                elif cur is None:
                    cur = node[p] = {}
                elif not isinstance(cur, dict):
                    raise ConfigError(f"override {item!r}: {p!r} is not a nested section")
                node = cur
            if node is d and parts[-1] not in d:
                raise ConfigError(f"override {item!r}: unknown key {parts[-1]!r}; known: {sorted(d)}")
            node[parts[-1]] = value
        return self.from_dict(d)
