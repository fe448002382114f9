"""The training configuration (one YAML/JSON file, or keyword arguments)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from .preprocessing import TrainingPreprocessing
from .sampling import SamplingConfig

__all__ = ["TrainConfig", "ConfigError"]


class ConfigError(ValueError):
    """A training configuration value is invalid."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; saved in every checkpoint.

    Data: ``datasets`` (dataset specification files), ``validation`` (specs of held-out datasets),
    ``cache_dir`` (default ``<output_dir>/cache``). Model: ``backbone`` (unet, swinunetr), ``model_size``
    (official, small, tiny), ``classes`` (names/indices; default all 32), ``embedding`` (auto = CLIP when its
    weights are found, else one-hot; clip; onehot), ``init_checkpoint`` (fine-tune from a checkpoint,
    official ``.pth`` or ours) and ``finetune`` (all: every weight; new_embeddings: only the embeddings of
    classes the checkpoint does not know are learnt, so the old classes' outputs stay exactly as they were).
    Optimisation: AdamW (``lr``, ``weight_decay``), linear warm-up for ``warmup_steps`` then cosine decay
    to ``min_lr`` at ``steps``; ``batch_size`` crops per process and step; ``loss`` masked (the method) or
    naive (unannotated = background, the baseline); ``dice`` volume or slice. Runtime: ``device`` (auto,
    cpu, cuda), ``precision`` (auto = bf16 on a GPU that supports it, else float32), ``threads``,
    ``num_workers``, ``seed``. Bookkeeping: ``checkpoint_every``, ``keep_checkpoints``, ``log_every``,
    ``validate_every`` (0 = only at the end when validation datasets are given), ``progress``.
    """

    datasets: tuple[str, ...] = ()
    output_dir: str = "runs/universalseg"
    cache_dir: str | None = None
    validation: tuple[str, ...] = ()
    backbone: str = "unet"
    model_size: str = "official"
    classes: tuple[str, ...] | None = None
    embedding: str = "auto"
    clip_weights: str | None = None
    init_checkpoint: str | None = None
    finetune: str = "all"
    steps: int = 1000
    batch_size: int = 2
    lr: float = 1e-4
    weight_decay: float = 1e-5
    warmup_steps: int = 100
    min_lr: float = 0.0
    loss: str = "masked"
    dice: str = "volume"
    preprocessing: TrainingPreprocessing = field(default_factory=TrainingPreprocessing)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    device: str = "auto"
    precision: str = "auto"
    threads: int | None = None
    num_workers: int = 0
    seed: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    validate_every: int = 0
    validation_overlap: float = 0.25
    progress: bool = True
    tensorboard: bool = True

    def __post_init__(self) -> None:
        choices = {"backbone": ("unet", "swinunetr"), "model_size": ("official", "small", "tiny"),
                   "embedding": ("auto", "clip", "onehot"), "finetune": ("all", "new_embeddings"),
                   "loss": ("masked", "naive"), "dice": ("volume", "slice"),
                   "precision": ("auto", "float32", "bfloat16", "float16")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        for name in ("steps", "batch_size", "checkpoint_every", "keep_checkpoints", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be at least 1; got {getattr(self, name)!r}")
        if self.warmup_steps < 0 or self.validate_every < 0 or self.num_workers < 0:
            raise ConfigError("warmup_steps, validate_every and num_workers cannot be negative")
        if not self.datasets:
            raise ConfigError("datasets: give at least one dataset specification file")
        if self.finetune == "new_embeddings" and not self.init_checkpoint:
            raise ConfigError("finetune: new_embeddings needs init_checkpoint (the model whose classes are kept)")

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
            values["preprocessing"] = TrainingPreprocessing.from_dict(values["preprocessing"])
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
            for key in ("output_dir", "cache_dir", "init_checkpoint", "clip_weights"):
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
