"""The training configuration (one YAML/JSON file, or keyword arguments)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from UniversalSegLib.backbones import backbone_names

from .preprocessing import PreprocessingParameters, preprocessing_from_dict
from .sampling import SamplingConfig

__all__ = ["TrainConfig", "ConfigError", "apply_overrides"]


class ConfigError(ValueError):
    """A training configuration value is invalid."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; saved in every checkpoint. Every key is documented in
    training/README.md ("Configuration reference"); the groups:

    Data: ``datasets``, ``validation``, ``cache_dir``, ``cache_memory_mb``. Model: ``backbone``,
    ``model_size``, ``classes``, ``embedding``/``embedding_file``/``clip_weights``, ``init_checkpoint``,
    ``finetune``, ``pretrained_backbone``. Optimisation: ``steps``, ``batch_size``, ``lr``, ``weight_decay``,
    ``warmup_steps``, ``min_lr``, ``grad_clip``, ``loss``, ``dice``, ``preprocessing``, ``sampling``.
    Runtime: ``device``, ``precision``, ``threads``, ``num_workers``, ``seed``,
    ``distributed_timeout_minutes``. Bookkeeping: ``checkpoint_every``, ``keep_checkpoints``, ``log_every``,
    ``validate_every``, ``validation_overlap``, ``validation_postprocess``, ``progress``, ``tensorboard``,
    ``plot``.
    """

    datasets: tuple[str, ...] = ()
    output_dir: str = "runs/universalseg"
    cache_dir: str | None = None
    cache_memory_mb: float = 0.0
    validation: tuple[str, ...] = ()
    backbone: str = "unet"
    model_size: str = "official"
    classes: tuple[str, ...] | None = None
    embedding: str = "auto"
    embedding_file: str | None = None
    clip_weights: str | None = None
    init_checkpoint: str | None = None
    finetune: str = "all"
    pretrained_backbone: str | None = None
    steps: int = 1000
    batch_size: int = 2
    lr: float = 1e-4
    weight_decay: float = 1e-5
    warmup_steps: int = 100
    min_lr: float = 0.0
    grad_clip: float = 0.0
    loss: str = "masked"
    dice: str = "volume"
    preprocessing: PreprocessingParameters = field(default_factory=PreprocessingParameters)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    device: str = "auto"
    precision: str = "auto"
    threads: int | None = None
    num_workers: int = 0
    seed: int = 0
    distributed_timeout_minutes: float = 30.0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    validate_every: int = 0
    validation_overlap: float = 0.25
    validation_postprocess: str = "fixed"
    progress: bool = True
    tensorboard: bool = True
    plot: bool = True

    def __post_init__(self) -> None:
        choices = {"backbone": backbone_names(), "model_size": ("official", "small", "tiny"),
                   "embedding": ("auto", "clip", "onehot", "file"), "finetune": ("all", "new_embeddings"),
                   "loss": ("masked", "naive"), "dice": ("volume", "slice"),
                   "precision": ("auto", "float32", "bfloat16", "float16"),
                   "validation_postprocess": ("none", "fixed", "official")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        for name in ("steps", "batch_size", "checkpoint_every", "keep_checkpoints", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be at least 1; got {getattr(self, name)!r}")
        for name in ("warmup_steps", "validate_every", "num_workers", "grad_clip", "cache_memory_mb"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} cannot be negative; got {getattr(self, name)!r}")
        if self.distributed_timeout_minutes <= 0:
            raise ConfigError("distributed_timeout_minutes must be positive (minutes a process waits for the others)")
        if self.warmup_steps > self.steps:
            raise ConfigError(
                f"warmup_steps ({self.warmup_steps}) is larger than steps ({self.steps}): the learning rate would "
                f"never reach lr. Set warmup_steps to at most steps (the official recipe warms up for 5% of training: "
                f"warmup_steps = {max(1, self.steps // 20)} here), or raise steps.")
        if not self.datasets:
            raise ConfigError("datasets: give at least one dataset specification file")
        if self.finetune == "new_embeddings" and not self.init_checkpoint:
            raise ConfigError("finetune: new_embeddings needs init_checkpoint (the model whose classes are kept)")
        if self.embedding == "file" and not self.embedding_file:
            raise ConfigError("embedding: file needs embedding_file (e.g. the official txt_encoding.pth)")
        if self.pretrained_backbone and self.init_checkpoint:
            raise ConfigError("pretrained_backbone and init_checkpoint both set the initial weights; give one of them")

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.output_dir) / "cache"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["preprocessing"] = self.preprocessing.to_dict()
        data["sampling"] = self.sampling.to_dict()
        for key in ("datasets", "validation", "classes"):
            if data[key] is not None:
                data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base_dir: str | Path | None = None) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown training settings: {', '.join(sorted(unknown))}")
        values = dict(data)
        if "preprocessing" in values and isinstance(values["preprocessing"], Mapping):
            try:
                values["preprocessing"] = preprocessing_from_dict(values["preprocessing"])
            except (TypeError, ValueError) as error:
                raise ConfigError(f"preprocessing: {error}") from None
        if "sampling" in values and isinstance(values["sampling"], Mapping):
            try:
                values["sampling"] = SamplingConfig.from_dict(values["sampling"])
            except (TypeError, ValueError) as error:
                raise ConfigError(f"sampling: {error}") from None
        for key in ("datasets", "validation", "classes"):
            if values.get(key) is not None:
                items = values[key]
                values[key] = tuple([items] if isinstance(items, str) else (str(i) for i in items))
        if base_dir is not None:  # paths in a config file are relative to the file
            base = Path(base_dir)
            for key in ("datasets", "validation"):
                if values.get(key):
                    values[key] = tuple(str(base / p) for p in values[key])
            for key in ("output_dir", "cache_dir", "init_checkpoint", "clip_weights", "embedding_file",
                        "pretrained_backbone"):
                if values.get(key):
                    values[key] = str(base / values[key])
        try:
            return cls(**values)
        except TypeError as error:
            raise ConfigError(str(error)) from None

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"training configuration {path} does not exist")
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        config = cls.from_dict(data, base_dir=path.parent)
        return replace(config, **overrides) if overrides else config


def apply_overrides(data: Mapping[str, Any], items: list[str]) -> dict:
    """``data`` with ``key=value`` overrides applied; dotted keys reach nested settings
    (``sampling.roi_size=[64,64,64]``). Values are JSON (numbers, lists, true/false, null) or plain text."""
    result = json.loads(json.dumps(data))  # a deep copy of plain data
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value (e.g. sampling.num_samples=4), got {item!r}")
        key, text = item.split("=", 1)
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        *parents, leaf = key.strip().split(".")
        node = result
        for depth, part in enumerate(parents):
            if not isinstance(node.get(part, {}), dict):
                raise ConfigError(f"--set {key}: {'.'.join(parents[:depth + 1])} is not a group of settings")
            node = node.setdefault(part, {})
        node[leaf] = value
    return result
