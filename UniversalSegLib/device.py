"""Device, precision and thread selection for inference."""
from __future__ import annotations

import contextlib
import os

import torch
from .errors import DeviceError
from .settings import PRECISIONS

__all__ = ["PRECISIONS", "DeviceError", "resolve_device", "autocast", "resolve_threads", "torch_threads"]



def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` -> first CUDA GPU if present, else CPU; ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"gpu"``."""
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "gpu":
        name = "cuda"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise DeviceError(f"Unknown device {name!r}; choose auto, cpu, cuda or cuda:N.") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("A CUDA GPU was requested, but PyTorch sees none (no NVIDIA GPU, no driver, or a "
                              "CPU-only PyTorch build). Choose the CPU (or automatic) device instead.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"GPU {device.index} requested, but only {torch.cuda.device_count()} GPU(s) are visible.")
    elif device.type not in ("cpu", "mps"):
        raise DeviceError(f"Unsupported device {name!r}; use auto, cpu, cuda or cuda:N.")
    return device


def autocast(device: torch.device, precision: str = "float32"):
    """Context for the forward pass: float32 (default, exact) or bf16/fp16 autocast on a GPU."""
    if precision not in PRECISIONS:
        raise DeviceError(f"Unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}.")
    if precision == "float32":
        return contextlib.nullcontext()
    if device.type != "cuda":
        raise DeviceError(f"{precision} is for GPUs; on the CPU UniversalSeg runs in float32.")
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float16
    if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise DeviceError("This GPU does not support bfloat16; use float16 or float32.")
    return torch.autocast(device_type="cuda", dtype=dtype)


def resolve_threads(threads: int | None) -> int:
    """The CPU thread count a run uses: ``threads``, or with None every core (``OMP_NUM_THREADS`` when set,
    which PyTorch has already applied)."""
    if threads is not None:
        if threads < 1:
            raise DeviceError(f"Thread count must be at least 1, got {threads}.")
        return int(threads)
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def torch_threads(threads: int):
    """Run the enclosed code with PyTorch's process-wide CPU thread count set to ``threads``, and restore
    the previous count afterwards (other code in the process, e.g. Slicer's, keeps its own setting)."""
    previous = torch.get_num_threads()
    if threads != previous:
        torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)
