"""The training loop: masked back-propagation over partially labelled datasets, one CPU to many GPUs.

:func:`train` runs these steps, each a function of its own:

1. :func:`_build_run`: process group, seeds, model and label embeddings, dataset specifications, caches,
   optimiser (AdamW), learning-rate schedule (linear warm-up then cosine, stepped every iteration),
   gradient scaler (float16 only; bf16 autocast on GPUs that support it needs none);
2. :func:`_resume`: rank 0 reads ``checkpoints/latest.json`` and tells the others which file to load; a
   run whose classes or datasets changed is refused;
3. :func:`_train_loop`: one optimisation step per batch (:func:`_train_step`), logs (loss averaged over the
   logging interval and over all processes), atomic checkpoints every ``checkpoint_every`` steps,
   validation every ``validate_every`` steps (:func:`_validate`, shared by all processes);
4. :func:`_finish`: all ranks compare a checksum of their weights, rank 0 exports ``final.safetensors``.

A run started again with the same ``output_dir`` resumes from the latest checkpoint and continues exactly
as the uninterrupted run would have (samples are a pure function of seed, rank and sample number, see
:mod:`.sampling`). Distributed data parallel is used when started by ``torchrun``.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from UniversalSegLib.taxonomy import get_taxonomy

from .config import ConfigError, TrainConfig
from .distributed import Distributed, check_ranks_agree, init_distributed
from .evaluation import ValidationResult, evaluate_cases
from .export import ModelSetup, build_model_setup, export_checkpoint
from .loss import masked_bce_dice_loss, naive_targets
from .preprocessing import CaseCache
from .run_logs import RunLogs
from .sampling import CropDataset
from .spec import DatasetSpec, load_dataset_spec
from .state import (
    check_resume_compatible,
    latest_checkpoint,
    load_training_state,
    rng_state,
    save_training_state,
    set_rng_state,
)

__all__ = ["TrainResult", "train", "warmup_cosine", "latest_checkpoint", "load_training_state"]


@dataclass
class TrainResult:
    """What a finished run produced."""

    output_dir: Path
    final_checkpoint: Path | None
    steps: int
    last_loss: float
    validation: dict | None
    resumed_from: int
    best_checkpoint: Path | None = None


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """LR multiplier of (0-based) optimisation step ``step``: linear warm-up to 1, then cosine to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class _Run:
    """Everything one training process holds."""

    config: TrainConfig
    dist: Distributed
    device: torch.device
    setup: ModelSetup
    specs: list[DatasetSpec]
    cache: CaseCache
    validation_cache: CaseCache | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    precision: str
    start_step: int = 0
    best: dict = field(default_factory=lambda: {"mean_dice": -math.inf, "step": None})
    wrapped: torch.nn.Module | None = None
    logs: RunLogs | None = None

    @property
    def model(self) -> torch.nn.Module:
        return self.setup.model

    @property
    def channel_classes(self) -> list[int]:
        return list(self.setup.classes.indices)

    def autocast(self):
        if self.precision == "float32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bfloat16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def dataset_fingerprints(self) -> list[dict]:
        return [{"name": s.name, "fingerprint": s.fingerprint()} for s in self.specs]


# ------------------------------------------------------------------------------------------------ set-up
def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # same initial weights on every rank (DDP also broadcasts them)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _precision(config: TrainConfig, device: torch.device) -> str:
    if config.precision != "auto":
        return config.precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def _load_specs(paths, setup: ModelSetup) -> list[DatasetSpec]:
    # Dataset specs name classes of the default taxonomy, plus any class the model adds to it.
    default = get_taxonomy()
    taxonomy = default.extended([c for c in setup.classes if c.index not in default.indices])
    return [load_dataset_spec(p, taxonomy) for p in paths]


def _check_specs_supervise(specs: list[DatasetSpec], setup: ModelSetup) -> None:
    """A dataset that annotates none of the model's classes would only ever step on a zero loss."""
    channels = set(setup.classes.indices)
    for spec in specs:
        if spec.is_case_format:
            continue
        annotated = set(spec.annotated) | {i for _, _, a in spec.subsets for i in a}
        if not annotated & channels:
            names = [spec.taxonomy[i].display_name for i in spec.annotated if i in spec.taxonomy.indices]
            raise ConfigError(
                f"dataset {spec.name!r} ({spec.source}) annotates {', '.join(names) or 'no class'}, none of which is "
                f"a class of the model ({', '.join(c.display_name for c in setup.classes)}): its samples would "
                "train on a zero loss. Add its classes to 'classes', or remove it from 'datasets'.")


def _build_run(config: TrainConfig, dist: Distributed, device: torch.device) -> _Run:
    if config.threads:
        torch.set_num_threads(int(config.threads))
    _seed_everything(config.seed)
    setup = build_model_setup(config.backbone, config.model_size, config.classes, config.embedding,
                              config.clip_weights, config.init_checkpoint, config.finetune,
                              embedding_file=config.embedding_file, pretrained_backbone=config.pretrained_backbone)
    specs = _load_specs(config.datasets, setup)
    _check_specs_supervise(specs, setup)
    progress = config.progress and dist.is_main
    cache = CaseCache(specs, config.cache_path / "train", config.preprocessing, config.cache_memory_mb)
    cache.prepare(dist.rank, dist.world_size, progress=progress)
    validation_cache = None
    if config.validation:
        validation_cache = CaseCache(_load_specs(config.validation, setup), config.cache_path / "validation",
                                     config.preprocessing, config.cache_memory_mb)
        validation_cache.prepare(dist.rank, dist.world_size, progress=progress)
    dist.barrier()

    setup.model.to(device).train()
    if setup.trainable_embedding is not None:
        setup.trainable_embedding.data = setup.trainable_embedding.data.to(device)
    optimizer = torch.optim.AdamW(setup.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, config.warmup_steps, config.steps, config.min_lr / config.lr))
    precision = _precision(config, device)
    # float16 gradients underflow without loss scaling; bf16 and float32 need none (the scaler is then a no-op).
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "float16")
    return _Run(config, dist, device, setup, specs, cache, validation_cache, optimizer, scheduler, scaler, precision)


# ------------------------------------------------------------------------------------------------ resume
def _resume(run: _Run) -> None:
    """Load the latest checkpoint of ``output_dir`` (rank 0 finds it, every rank loads the same file)."""
    found = latest_checkpoint(run.config.output_dir) if run.dist.is_main else None
    path = run.dist.broadcast(None if found is None else str(found))
    if path is None:
        return
    state = load_training_state(path)
    check_resume_compatible(Path(path), state, [c.display_name for c in run.setup.classes], run.dataset_fingerprints())
    run.model.load_state_dict(state["model"])
    if run.setup.trainable_embedding is not None and state.get("trainable_embedding") is not None:
        run.setup.trainable_embedding.data.copy_(state["trainable_embedding"].to(run.device))
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    run.start_step = int(state["step"])
    run.best = dict(state.get("best") or run.best)


def _save_state(run: _Run, step: int) -> None:
    setup = run.setup
    state = {
        "config": run.config.to_dict(),
        "model": setup.model.state_dict(), "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(),
        "trainable_embedding": setup.trainable_embedding.detach() if setup.trainable_embedding is not None else None,
        "rng": rng_state(), "classes": setup.classes.to_dict(), "embedding_info": setup.embedding_info,
        "datasets": run.dataset_fingerprints(), "best": run.best,
    }
    save_training_state(Path(run.config.output_dir) / "checkpoints", step, state, run.config.keep_checkpoints)


# ------------------------------------------------------------------------------------------------ the loop
class _RangeSampler(torch.utils.data.Sampler):
    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def _loader(run: _Run) -> torch.utils.data.DataLoader:
    config = run.config
    data = CropDataset(run.cache, run.channel_classes, config.sampling, config.seed, run.dist.rank, run.dist.world_size)
    return torch.utils.data.DataLoader(
        data, batch_size=config.batch_size,
        sampler=_RangeSampler(run.start_step * config.batch_size, config.steps * config.batch_size),
        num_workers=config.num_workers, pin_memory=run.device.type == "cuda",
        persistent_workers=config.num_workers > 0)


def _supervised_channels(run: _Run) -> torch.Tensor:
    """Classes some dataset annotates: the naive baseline trains exactly those."""
    supervised = torch.zeros(len(run.channel_classes), dtype=torch.bool)
    for spec in run.specs:
        for index in spec.annotated:
            if index in run.channel_classes:
                supervised[run.channel_classes.index(index)] = True
    if any(spec.is_case_format for spec in run.specs):
        supervised[:] = True
    return supervised


def _train_step(run: _Run, batch: dict, supervised: torch.Tensor):
    """One optimisation step; returns the loss parts and the learning rate the step used."""
    device, config = run.device, run.config
    # (cases, crops per case, ...) -> one batch of crops
    image = batch["image"].flatten(0, 1).to(device, non_blocking=True)
    target = batch["target"].flatten(0, 1).to(device, non_blocking=True)
    annotated = batch["annotated"].flatten(0, 1).to(device)
    if config.loss == "naive":
        target, annotated = naive_targets(target, annotated, supervised.to(device))
    # Evaluate only the channels some element of this batch supervises (the head is per class).
    channels = torch.nonzero(annotated.any(0)).flatten()
    if channels.numel() == 0:
        channels = torch.zeros(1, dtype=torch.long, device=device)
    run.setup.apply_embeddings()
    with run.autocast():
        logits = run.wrapped(image, channels=channels)
    parts = masked_bce_dice_loss(logits, target[:, channels], annotated[:, channels], dice=config.dice)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(parts.loss).backward()
    parameters = run.setup.parameters()
    if run.dist.enabled and run.wrapped is run.model:  # learnt embeddings only: average their gradient by hand
        for parameter in parameters:
            if parameter.grad is not None:
                torch.distributed.all_reduce(parameter.grad)
                parameter.grad /= run.dist.world_size
    if config.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
    lr = run.scheduler.get_last_lr()[0]  # the rate this step uses (the scheduler moves on below)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    return parts, lr


class _Interval:
    """Loss terms summed over the steps since the last log row."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.loss = self.bce = self.dice = self.pairs = 0.0
        self.steps = 0
        self.started = time.perf_counter()

    def add(self, parts) -> None:
        self.loss += float(parts.loss.detach())
        self.bce += parts.bce
        self.dice += parts.dice
        self.pairs += parts.pairs
        self.steps += 1


def _log_row(run: _Run, step: int, interval: _Interval, lr: float) -> float:
    """Average the interval over steps and ranks, write the row; returns the averaged loss."""
    loss, bce, dice, pairs, steps = run.dist.mean(
        [interval.loss, interval.bce, interval.dice, interval.pairs, interval.steps], run.device)
    elapsed = time.perf_counter() - interval.started
    crops = interval.steps * run.config.batch_size * run.config.sampling.num_samples * run.dist.world_size
    row = {"step": step, "loss": loss / steps, "bce": bce / steps, "dice": dice / steps, "pairs": pairs / steps,
           "lr": lr, "seconds": round(elapsed, 3), "crops_per_second": round(crops / max(elapsed, 1e-9), 3)}
    run.logs.train(row)
    interval.reset()
    return row["loss"]


def _validate(run: _Run, step: int) -> dict:
    """Every rank scores its share of the validation cases; rank 0 writes the merged tables."""
    cache = run.validation_cache
    share = list(range(run.dist.rank, len(cache), run.dist.world_size))
    names = {c.index: c.display_name for c in run.setup.classes}
    part = evaluate_cases(run.model, cache, run.channel_classes, run.config.sampling.roi_size, run.device,
                          overlap=run.config.validation_overlap, indices=share, autocast=run.autocast,
                          postprocess=run.config.validation_postprocess, class_names=names)
    result = ValidationResult.merged(run.dist.gather(part))
    summary = run.logs.validation(step, result, run.setup.classes)
    score = summary["mean_dice"]
    if run.dist.is_main:
        run.logs.write_json("summary.json", {"step": step, **result.named_summary(), "per_case": result.records,
                                             "best": run.best})
    if math.isfinite(score) and score > run.best["mean_dice"]:
        run.best = {"mean_dice": score, "step": step}
        if run.dist.is_main:
            _export(run, Path(run.config.output_dir) / "best.safetensors", step, {"validation_mean_dice": score})
            run.logs.info("new best validation mean Dice %.4f at step %d: best.safetensors", score, step)
    return summary


def _train_loop(run: _Run) -> tuple[int, float, dict | None]:
    config = run.config
    supervised = _supervised_channels(run)
    progress = None
    if config.progress and run.dist.is_main:
        from tqdm.auto import tqdm

        progress = tqdm(total=config.steps, initial=run.start_step, desc="training", unit="step")
    step, last_loss, summary = run.start_step, float("nan"), None
    interval = _Interval()
    for batch in _loader(run):
        parts, lr = _train_step(run, batch, supervised)
        step += 1
        interval.add(parts)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{float(parts.loss.detach()):.4f}")
        if step % config.log_every == 0 or step == config.steps:
            last_loss = _log_row(run, step, interval, lr)
        if step % config.checkpoint_every == 0 or step == config.steps:
            if run.dist.is_main:
                _save_state(run, step)
            run.dist.barrier()
        if run.validation_cache is not None and (
                (config.validate_every and step % config.validate_every == 0) or step == config.steps):
            summary = _validate(run, step)
    if progress is not None:
        progress.close()
    return step, last_loss, summary


# ------------------------------------------------------------------------------------------------ the end
def _export(run: _Run, path: Path, step: int, extra: dict | None = None) -> Path:
    return export_checkpoint(path, run.model, run.setup.classes, run.config.preprocessing,
                             run.config.sampling.roi_size, run.setup.embedding_info,
                             provenance={"steps": step, "config": run.config.to_dict(), **(extra or {})},
                             embeddings=run.setup.final_embeddings(), overwrite=True)


def _finish(run: _Run, step: int) -> tuple[Path | None, str | None]:
    checksum = check_ranks_agree(run.model, run.dist) if run.dist.enabled else None
    final = None
    if run.dist.is_main:
        final = _export(run, Path(run.config.output_dir) / "final.safetensors", step)
        run.logs.info("exported %s after %d steps", final, step)
    run.dist.barrier()
    return final, checksum


def _run_info(run: _Run, checksum: str | None = None) -> dict:
    return {
        "world_size": run.dist.world_size, "device": str(run.device), "precision": run.precision,
        "backend": run.dist.backend, "classes": [c.display_name for c in run.setup.classes],
        "resumed_from": run.start_step, "embedding": run.setup.embedding_info, "pretrained_backbone": run.setup.pretrained,
        "crops_per_step": run.config.batch_size * run.config.sampling.num_samples * run.dist.world_size,
        "datasets": [{"name": s.name, "source": s.source, "preset": s.preset, "cases": len(s.cases),
                      "annotated": list(s.annotated), "crops": s.crops, "zoom": s.zoom} for s in run.specs],
        "weights_checksum": checksum, "config": run.config.to_dict(),
    }


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) a training run described by ``config``; see the module docstring."""
    dist, device = init_distributed(config.device, config.distributed_timeout_minutes)
    run = _build_run(config, dist, device)
    _resume(run)
    run.logs = RunLogs(config.output_dir, run.start_step, dist.is_main, config.tensorboard, config.plot)
    embedding = run.setup.embedding_info
    run.logs.info("label embeddings: %s (%s)", embedding.get("encoder"), embedding.get("file") or embedding.get("weights")
                  or embedding.get("source", "from the initial checkpoint"))
    if run.start_step:
        run.logs.info("resuming from step %d", run.start_step)
    run.logs.write_json("run_info.json", _run_info(run))
    run.wrapped = run.model
    if dist.enabled and run.setup.trainable_embedding is None:
        from torch.nn.parallel import DistributedDataParallel

        run.wrapped = DistributedDataParallel(run.model, device_ids=[device.index] if device.type == "cuda" else None)
    try:
        step, last_loss, summary = _train_loop(run)
        final, checksum = _finish(run, step)
        if checksum is not None:
            run.logs.write_json("run_info.json", _run_info(run, checksum))
    finally:
        run.logs.close()
    dist.close()
    best = Path(config.output_dir) / "best.safetensors"
    return TrainResult(Path(config.output_dir), final, step, last_loss, summary, run.start_step,
                       best if best.is_file() and run.best["step"] is not None else None)
