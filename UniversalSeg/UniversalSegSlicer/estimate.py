"""Rough time and memory estimate of a run, shown next to the device choice before Apply.

The costs that matter (DESIGN.md, performance model): the number of 96^3 windows (image size after
resampling to 1.5 mm, overlap 0.5), the time of one window on the chosen device, and the memory of one
forward plus the per-class arrays. The window count is an upper bound: the body crop is not known
before preprocessing. Per-window times are measurements of the official-size networks (CPU: 2-core AMD
EPYC, float32, see the fidelity fixture's ``bench_cpu.jsonl``); GPU times are typical values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

__all__ = ["RunEstimate", "estimate_run", "SECONDS_PER_WINDOW"]

#: (backbone, device type) -> seconds per 96^3 window at batch 1, float32 (CPU: with 2 threads).
SECONDS_PER_WINDOW = {
    ("swinunetr", "cpu"): 15.6,
    ("unet", "cpu"): 21.9,
    ("swinunetr", "cuda"): 0.25,
    ("unet", "cuda"): 0.15,
}
#: Peak memory of one official-size forward (GB): CPU measured, GPU typical for float32.
FORWARD_MEMORY_GB = {"cpu": 4.7, "cuda": 3.5}
_REFERENCE_WINDOW = 96 ** 3


@dataclass(frozen=True)
class RunEstimate:
    windows: int
    seconds: float
    ram_gb: float
    gpu_gb: float
    device: str

    def text(self) -> str:
        minutes = self.seconds / 60.0
        duration = f"about {self.seconds:.0f} s" if minutes < 2 else f"about {minutes:.0f} min"
        where = "on the GPU" if self.device == "cuda" else "on the CPU"
        memory = f"about {self.ram_gb:.1f} GB of memory"
        if self.device == "cuda":
            memory += f" and {self.gpu_gb:.1f} GB of GPU memory"
        return f"Up to {self.windows} network windows: {duration} {where}; needs {memory}."


def _windows_per_axis(length: int, roi: int, overlap: float) -> int:
    if length <= roi:
        return 1
    step = max(1, int(roi * (1.0 - overlap)))
    return math.ceil((length - roi) / step) + 1


def estimate_run(shape: Sequence[int], spacing: Sequence[float], backbone: str = "swinunetr", device: str = "cpu",
                 classes: int = 32, threads: int = 2, target_spacing: Sequence[float] = (1.5, 1.5, 1.5),
                 roi: Sequence[int] = (96, 96, 96), overlap: float = 0.5) -> RunEstimate:
    """Estimate for a volume of ``shape`` voxels of ``spacing`` mm on ``device`` ("cpu" or "cuda")."""
    device = "cuda" if device.startswith("cuda") or device == "gpu" else "cpu"
    resampled = [max(1, round((n - 1) * s / t + 1)) for n, s, t in zip(shape, spacing, target_spacing)]
    windows = math.prod(_windows_per_axis(n, r, overlap) for n, r in zip(resampled, roi))
    window_scale = math.prod(roi) / _REFERENCE_WINDOW
    per_window = SECONDS_PER_WINDOW.get((backbone, device), SECONDS_PER_WINDOW[("swinunetr", device)]) * window_scale
    if device == "cpu":
        per_window *= (2.0 / max(1, min(int(threads), 16))) ** 0.85  # measured with 2 threads; sub-linear scaling
    resampled_voxels = math.prod(resampled)
    input_voxels = math.prod(int(n) for n in shape)
    # image + weight map (float32) + logits of every class (float32) + masks on the input grid (bool)
    arrays = (8 * resampled_voxels + 4 * classes * resampled_voxels + classes * input_voxels) / 1e9
    forward = FORWARD_MEMORY_GB[device] * window_scale
    if device == "cuda":
        return RunEstimate(windows, windows * per_window, arrays + 1.0, forward, device)
    return RunEstimate(windows, windows * per_window, arrays + forward, 0.0, device)
