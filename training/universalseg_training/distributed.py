"""Distributed data parallel helpers: process group set-up, collectives on plain Python data, rank checks.

Every helper is a no-op (or the identity) in a single-process run, so the training code calls them
unconditionally. Several nodes work like one: ``torchrun --nnodes N --node_rank R --master_addr ...``;
``output_dir`` and the cache must then be on a file system every node sees (rank 0 writes checkpoints,
every rank reads them on resume; each rank preprocesses its share of the cases into the shared cache).
"""
from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass
from typing import Any

import torch

from UniversalSegLib.device import resolve_device

__all__ = ["Distributed", "init_distributed", "parameters_checksum"]


@dataclass
class Distributed:
    """This process's place in the run (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (any picklable object)."""
        if not self.enabled:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        if not self.enabled:
            return [value]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, value)
        return out

    def mean(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise mean of ``values`` over the ranks."""
        if not self.enabled:
            return [float(v) for v in values]
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(tensor)
        return [float(v) for v in tensor / self.world_size]

    def close(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def init_distributed(device_name: str, timeout_minutes: float = 30.0) -> tuple[Distributed, torch.device]:
    """Join the process group ``torchrun`` describes (NCCL on GPUs, gloo on CPUs), or a single process.

    ``timeout_minutes``: how long a collective waits for the slowest rank before the run fails (validation
    is shared by all ranks, so this only has to cover uneven step times and checkpoint writing).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed(), resolve_device(device_name)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    wants_gpu = device_name in ("auto", "cuda", "gpu") and torch.cuda.is_available()
    if wants_gpu:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend,
                                             timeout=datetime.timedelta(minutes=float(timeout_minutes)))
    return Distributed(rank, world, local, True, backend), device


def parameters_checksum(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes, in registration order (equal iff the weights are bit-identical).

    Buffers are left out: the U-Net's batch statistics are updated by any forward, including the
    validation forwards each rank runs on its own share of the cases.
    """
    digest = hashlib.sha256()
    for key, value in model.named_parameters():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_ranks_agree(model: torch.nn.Module, dist: Distributed) -> str:
    """The weights' checksum; raises when any rank's weights differ from rank 0's by a single bit."""
    checksum = parameters_checksum(model)
    sums = dist.gather(checksum)
    if any(s != sums[0] for s in sums):
        differing = [r for r, s in enumerate(sums) if s != sums[0]]
        raise RuntimeError(f"the processes' weights diverged: ranks {differing} differ from rank 0 (weight checksums "
                           f"{sums}); the distributed run is not synchronised and nothing was exported")
    return checksum
