"""The training loop: masked back-propagation over partially labelled datasets, one CPU to many GPUs.

* Optimiser AdamW, learning rate with a linear warm-up then cosine decay, stepped every iteration.
* bf16 autocast on GPUs that support it (the loss itself is computed in float32).
* Distributed data parallel when started by ``torchrun`` (NCCL on GPUs, gloo on CPUs; several nodes work
  the same way: ``torchrun --nnodes N --node_rank R --master_addr ...``); each process draws its own crops.
* Atomic checkpoints every ``checkpoint_every`` steps (model, optimiser, scheduler, step, RNG states,
  configuration); a run started again with the same ``output_dir`` resumes from the latest one and
  continues exactly as the uninterrupted run would have (samples are a pure function of seed, rank and
  sample number, see :mod:`.sampling`).
* Logs: ``train_log.csv`` and ``validation.csv`` always, TensorBoard events when ``tensorboard`` is
  installed; a progress bar on rank 0.
* At the end, rank 0 exports ``final.safetensors``, a library checkpoint ``universalseg segment`` runs.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from UniversalSegLib.device import resolve_device
from UniversalSegLib.taxonomy import get_taxonomy

from .config import TrainConfig
from .evaluation import evaluate_cases
from .export import build_model_setup, export_checkpoint
from .loss import masked_bce_dice_loss, naive_targets
from .preprocessing import CaseCache
from .sampling import CropDataset
from .spec import load_dataset_spec

__all__ = ["TrainResult", "train", "warmup_cosine", "latest_checkpoint", "load_training_state"]

logger = logging.getLogger("universalseg_training")

CHECKPOINT_FORMAT = "universalseg-training-state"
_TRAIN_COLUMNS = ["step", "loss", "bce", "dice", "pairs", "lr", "seconds", "crops_per_second"]


@dataclass
class TrainResult:
    """What a finished run produced."""

    output_dir: Path
    final_checkpoint: Path | None
    steps: int
    last_loss: float
    validation: dict | None
    resumed_from: int


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """LR multiplier of (0-based) optimisation step ``step``: linear warm-up to 1, then cosine to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------ distributed
@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False


def _init_distributed(device_name: str) -> tuple[_Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist(), resolve_device(device_name)
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    wants_gpu = device_name in ("auto", "cuda", "gpu") and torch.cuda.is_available()
    if wants_gpu:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return _Dist(rank, world, local, True), device


def _barrier(dist_info: _Dist) -> None:
    if dist_info.enabled:
        import torch.distributed as dist

        dist.barrier()


# ------------------------------------------------------------------------------------------ checkpoints
def _checkpoint_dir(config: TrainConfig) -> Path:
    return Path(config.output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest training-state checkpoint of a run (via ``checkpoints/latest.json``), or None."""
    pointer = Path(output_dir) / "checkpoints" / "latest.json"
    if not pointer.is_file():
        return None
    path = pointer.parent / json.loads(pointer.read_text())["file"]
    return path if path.is_file() else None


def _atomic_write_bytes(path: Path, writer) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        writer(temporary)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [v.tolist() if isinstance(v, np.ndarray) else v for v in np.random.get_state()]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    numpy = state["numpy"]
    np.random.set_state((numpy[0], np.asarray(numpy[1], dtype=np.uint32), *numpy[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_state(config: TrainConfig, step: int, setup, optimizer, scheduler) -> Path:
    folder = _checkpoint_dir(config)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:08d}.pt"
    state = {
        "format": CHECKPOINT_FORMAT, "step": step, "config": config.to_dict(),
        "model": setup.model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "trainable_embedding": setup.trainable_embedding.detach() if setup.trainable_embedding is not None else None,
        "rng": _rng_state(),
        "classes": setup.classes.to_dict(), "embedding_info": setup.embedding_info,
    }
    _atomic_write_bytes(path, lambda p: torch.save(state, p))
    pointer = folder / "latest.json"
    _atomic_write_bytes(pointer, lambda p: p.write_text(json.dumps({"file": path.name, "step": step})))
    kept = sorted(folder.glob("step_*.pt"))
    for old in kept[: max(0, len(kept) - config.keep_checkpoints)]:
        old.unlink(missing_ok=True)
    return path


def load_training_state(path: str | Path) -> dict:
    """Read a training-state checkpoint (tensors and plain data only; no pickled code is executed)."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a universalseg-training checkpoint")
    return state


# ----------------------------------------------------------------------------------------------- logging
class _Logs:
    """CSV logs (always) and TensorBoard (when installed); rank 0 only."""

    def __init__(self, config: TrainConfig, start_step: int, active: bool):
        self.active = active
        self.writer = None
        self.folder = Path(config.output_dir)
        if not active:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        self.train_csv = self.folder / "train_log.csv"
        self.validation_csv = self.folder / "validation.csv"
        self._truncate(self.train_csv, start_step)
        self._truncate(self.validation_csv, start_step)
        if config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.folder / "tensorboard"), purge_step=start_step or None)
            except ImportError:
                logger.info("TensorBoard is not installed (pip install 'universalseg-training[tensorboard]'); "
                            "writing CSV logs only.")

    @staticmethod
    def _truncate(path: Path, start_step: int) -> None:
        """After a resume, drop rows the interrupted run logged beyond its last checkpoint."""
        if not path.is_file():
            return
        with open(path, newline="") as handle:
            rows = list(csv.reader(handle))
        if not rows:
            return
        kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= start_step]
        with open(path, "w", newline="") as handle:
            csv.writer(handle).writerows(kept)

    def _append(self, path: Path, columns: list[str], row: dict) -> None:
        new = not path.is_file()
        with open(path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            if new:
                writer.writeheader()
            writer.writerow(row)

    def train(self, row: dict) -> None:
        if not self.active:
            return
        self._append(self.train_csv, _TRAIN_COLUMNS, row)
        if self.writer is not None:
            for key in ("loss", "bce", "dice", "lr"):
                self.writer.add_scalar(f"train/{key}", row[key], row["step"])

    def validation(self, step: int, summary: dict, classes) -> None:
        if not self.active:
            return
        row = {"step": step, "cases": summary["cases"], "mean_dice": summary["mean_dice"]}
        for index, value in summary["dice"].items():
            row[f"dice_{classes[index].key}"] = value
        for index, value in summary["nsd"].items():
            row[f"nsd_{classes[index].key}"] = value
        for index, value in summary["detection"].items():
            row[f"sensitivity_{classes[index].key}"] = value["sensitivity"]
            row[f"specificity_{classes[index].key}"] = value["specificity"]
        columns = list(row)
        if self.validation_csv.is_file():
            with open(self.validation_csv, newline="") as handle:
                header = next(csv.reader(handle), [])
            columns = header + [c for c in columns if c not in header]
            if columns != header:  # new columns: rewrite with the wider header
                with open(self.validation_csv, newline="") as handle:
                    old = list(csv.DictReader(handle))
                with open(self.validation_csv, "w", newline="") as handle:
                    writer = csv.DictWriter(handle, fieldnames=columns)
                    writer.writeheader()
                    writer.writerows(old)
        self._append(self.validation_csv, columns, row)
        if self.writer is not None:
            self.writer.add_scalar("validation/mean_dice", summary["mean_dice"], step)
            for index, value in summary["dice"].items():
                self.writer.add_scalar(f"validation/dice/{classes[index].key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _check_ranks_agree(model: torch.nn.Module) -> None:
    """Data parallelism keeps every rank's weights identical; verify it before exporting."""
    import torch.distributed as dist

    with torch.no_grad():
        total = sum(p.detach().double().sum() for p in model.parameters()).reshape(1)  # on the model device (NCCL)
    gathered = [torch.zeros_like(total) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, total)
    if any(not torch.allclose(g, gathered[0], rtol=1e-9, atol=1e-9) for g in gathered):
        raise RuntimeError(f"the processes' weights diverged ({[float(g) for g in gathered]}); "
                           "the distributed run is not synchronised")


# ---------------------------------------------------------------------------------------------- training
class _RangeSampler(torch.utils.data.Sampler):
    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def _precision(config: TrainConfig, device: torch.device) -> str:
    if config.precision != "auto":
        return config.precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def _autocast_factory(device: torch.device, precision: str):
    import contextlib

    if precision == "float32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) a training run described by ``config``; see the module docstring."""
    dist_info, device = _init_distributed(config.device)
    if config.threads:
        torch.set_num_threads(int(config.threads))
    rank0 = dist_info.rank == 0
    torch.manual_seed(config.seed)  # same initial weights on every rank (DDP also broadcasts them)
    random.seed(config.seed)
    np.random.seed(config.seed % 2**32)

    setup = build_model_setup(config.backbone, config.model_size, config.classes, config.embedding,
                              config.clip_weights, config.init_checkpoint, config.finetune)
    channel_classes = list(setup.classes.indices)
    # Dataset specs name classes of the default taxonomy, plus any class the model adds to it.
    default = get_taxonomy()
    data_taxonomy = default.extended([c for c in setup.classes if c.index not in default.indices])
    specs = [load_dataset_spec(p, data_taxonomy) for p in config.datasets]
    cache = CaseCache(specs, config.cache_path / "train", config.preprocessing)
    cache.prepare(dist_info.rank, dist_info.world_size, progress=config.progress and rank0)
    validation_cache = None
    if config.validation:
        validation_specs = [load_dataset_spec(p, data_taxonomy) for p in config.validation]
        validation_cache = CaseCache(validation_specs, config.cache_path / "validation", config.preprocessing)
        if rank0:
            validation_cache.prepare()
    _barrier(dist_info)

    model = setup.model.to(device).train()
    if setup.trainable_embedding is not None:
        setup.trainable_embedding.data = setup.trainable_embedding.data.to(device)
    parameters = setup.parameters()
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, config.warmup_steps, config.steps, config.min_lr / config.lr))

    start_step = 0
    resume = latest_checkpoint(config.output_dir)
    if resume is not None:
        state = load_training_state(resume)
        model.load_state_dict(state["model"])
        if setup.trainable_embedding is not None and state.get("trainable_embedding") is not None:
            setup.trainable_embedding.data.copy_(state["trainable_embedding"].to(device))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        start_step = int(state["step"])
        if rank0:
            logger.info("resuming from %s (step %d)", resume, start_step)

    wrapped = model
    use_ddp = dist_info.enabled and setup.trainable_embedding is None
    if use_ddp:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    data = CropDataset(cache, channel_classes, config.sampling, config.seed, dist_info.rank, dist_info.world_size)
    loader = torch.utils.data.DataLoader(
        data, batch_size=config.batch_size,
        sampler=_RangeSampler(start_step * config.batch_size, config.steps * config.batch_size),
        num_workers=config.num_workers, pin_memory=device.type == "cuda",
        persistent_workers=config.num_workers > 0)
    precision = _precision(config, device)
    autocast = _autocast_factory(device, precision)
    logs = _Logs(config, start_step, rank0)
    if rank0:
        info = {"world_size": dist_info.world_size, "device": str(device), "precision": precision,
                "backend": ("nccl" if device.type == "cuda" else "gloo") if dist_info.enabled else None,
                "classes": [c.display_name for c in setup.classes], "resumed_from": start_step,
                "datasets": [{"name": s.name, "cases": len(s.cases), "annotated": list(s.annotated)} for s in specs]}
        (Path(config.output_dir) / "run_info.json").write_text(json.dumps(info, indent=1))
    progress = None
    if config.progress and rank0:
        from tqdm.auto import tqdm

        progress = tqdm(total=config.steps, initial=start_step, desc="training", unit="step")

    supervised = torch.zeros(len(channel_classes), dtype=torch.bool)
    for spec in specs:  # classes some dataset annotates: the naive baseline trains exactly those
        for index in spec.annotated:
            if index in channel_classes:
                supervised[channel_classes.index(index)] = True
    if any(spec.is_case_format for spec in specs):
        supervised[:] = True

    step, last_loss, validation_summary = start_step, float("nan"), None
    tick = time.perf_counter()
    for batch in loader:
        image = batch["image"].to(device, non_blocking=True)
        target = batch["target"].to(device, non_blocking=True)
        annotated = batch["annotated"].to(device)
        if config.loss == "naive":
            target, annotated = naive_targets(target, annotated, supervised.to(device))
        # Evaluate only the channels some element of this batch supervises (the head is per class).
        channels = torch.nonzero(annotated.any(0)).flatten()
        if channels.numel() == 0:
            channels = torch.zeros(1, dtype=torch.long, device=device)
        setup.apply_embeddings()
        with autocast():
            logits = wrapped(image, channels=channels)
        parts = masked_bce_dice_loss(logits, target[:, channels], annotated[:, channels], dice=config.dice)
        optimizer.zero_grad(set_to_none=True)
        parts.loss.backward()
        if dist_info.enabled and not use_ddp:  # learnt embeddings only: average their gradient by hand
            import torch.distributed as dist

            for parameter in parameters:
                if parameter.grad is not None:
                    dist.all_reduce(parameter.grad)
                    parameter.grad /= dist_info.world_size
        optimizer.step()
        scheduler.step()
        step += 1
        last_loss = float(parts.loss.detach())
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{last_loss:.4f}")
        if step % config.log_every == 0 or step == config.steps:
            elapsed = time.perf_counter() - tick
            tick = time.perf_counter()
            logs.train({"step": step, "loss": last_loss, "bce": parts.bce, "dice": parts.dice, "pairs": parts.pairs,
                        "lr": scheduler.get_last_lr()[0], "seconds": round(elapsed, 3),
                        "crops_per_second": round(config.log_every * config.batch_size * dist_info.world_size / max(elapsed, 1e-9), 3)})
        if step % config.checkpoint_every == 0 or step == config.steps:
            if rank0:
                _save_state(config, step, setup, optimizer, scheduler)
            _barrier(dist_info)
        if validation_cache is not None and (
                (config.validate_every and step % config.validate_every == 0) or step == config.steps):
            if rank0:
                result = evaluate_cases(model, validation_cache, channel_classes, config.sampling.roi_size, device,
                                        overlap=config.validation_overlap, autocast=autocast)
                validation_summary = result.summary()
                logs.validation(step, validation_summary, setup.classes)
            _barrier(dist_info)
    if progress is not None:
        progress.close()

    if dist_info.enabled:
        _check_ranks_agree(model)
    final = None
    if rank0:
        final = Path(config.output_dir) / "final.safetensors"
        export_checkpoint(final, model, setup.classes, config.preprocessing, config.sampling.roi_size,
                          setup.embedding_info, provenance={"steps": step, "config": config.to_dict()},
                          embeddings=setup.final_embeddings(), overwrite=True)
    logs.close()
    _barrier(dist_info)
    if dist_info.enabled:
        import torch.distributed as dist

        dist.destroy_process_group()
    return TrainResult(Path(config.output_dir), final, step, last_loss, validation_summary, start_step)
