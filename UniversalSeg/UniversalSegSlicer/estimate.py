"""Rough time and memory estimate of a run, shown next to the device choice before Apply.

The costs that matter: the number of 96^3 windows (image size after resampling to 1.5 mm, the mode's
overlap), the time of one window on the chosen device, and the memory of one
forward plus the per-class arrays. The window count is an upper bound: the body crop is not known
before preprocessing. Per-window times are measurements of the official-size networks with UniversalSeg's
CPU path (2-core AMD EPYC, float32, 2 threads, ``benchmarks/benchmark_modes.py``); GPU times are typical
values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from UniversalSegLib.settings import count_windows

__all__ = ["RunEstimate", "estimate_run", "SECONDS_PER_WINDOW", "OPENVINO_SECONDS_PER_WINDOW"]

#: (backbone, device type) -> seconds per 96^3 window at batch 1, float32, PyTorch (CPU: with 2 threads;
#: the Swin UNETR's 7.5 s from the example CT's end-to-end run on the 2-core development VM, 2026-12-01).
SECONDS_PER_WINDOW = {
    ("swinunetr", "cpu"): 7.5,
    ("unet", "cpu"): 17.0,
    ("swinunetr", "cuda"): 0.25,
    ("unet", "cuda"): 0.15,
}
#: backbone -> seconds per 96^3 window on the CPU with OpenVINO, 2 threads, 32 classes (measured
#: 2026-12-01 on the development VM: 2.1 s in the example CT's end-to-end run, 3.8 s for the U-Net).
OPENVINO_SECONDS_PER_WINDOW = {"swinunetr": 2.1, "unet": 3.8}
#: Peak memory of the process around one official-size forward (GB). CPU, measured (2026-12-01): Python with
#: PyTorch and MONAI 0.7, the weights (PyTorch 0.25; OpenVINO 0.42 in its kernels' layouts) and one 96^3
#: window's intermediates and logits (0.65 with either runtime): the larger sum, 1.77, rounded up. GPU: typical.
FORWARD_MEMORY_GB = {"cpu": 1.8, "cuda": 3.5}
#: Python with PyTorch and MONAI imported (GB), what the process holds besides its arrays after the windows.
IMPORT_MEMORY_GB = 0.7
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


def estimate_run(shape: Sequence[int], spacing: Sequence[float], backbone: str = "swinunetr", device: str = "cpu",
                 classes: int = 32, threads: int = 2, target_spacing: Sequence[float] = (1.5, 1.5, 1.5),
                 roi: Sequence[int] = (96, 96, 96), overlap: float = 0.5, streaming: bool = True,
                 runtime: str = "torch") -> RunEstimate:
    """Estimate for a volume of ``shape`` voxels of ``spacing`` mm on ``device`` ("cpu" or "cuda").

    ``streaming``: the default and fast modes blend windows into masks one slab at a time (float16); the
    reference mode holds float32 logits of every class over the whole image. ``runtime``: the runtime the
    run will use, ``"torch"`` or ``"openvino"`` (:func:`UniversalSegLib.settings.choose_runtime`).
    """
    device = "cuda" if device.startswith("cuda") or device == "gpu" else "cpu"
    resampled = [max(1, round((n - 1) * s / t + 1)) for n, s, t in zip(shape, spacing, target_spacing)]
    windows = count_windows(resampled, tuple(int(r) for r in roi), overlap)
    window_scale = math.prod(roi) / _REFERENCE_WINDOW
    if runtime == "openvino" and device == "cpu":
        per_window = OPENVINO_SECONDS_PER_WINDOW.get(backbone, OPENVINO_SECONDS_PER_WINDOW["swinunetr"])
    else:
        per_window = SECONDS_PER_WINDOW.get((backbone, device), SECONDS_PER_WINDOW[("swinunetr", device)])
    per_window *= window_scale
    if device == "cpu":
        per_window *= (2.0 / max(1, min(int(threads), 16))) ** 0.85  # measured with 2 threads; sub-linear scaling
    resampled_voxels = math.prod(resampled)
    input_voxels = math.prod(int(n) for n in shape)
    forward = FORWARD_MEMORY_GB[device] * window_scale
    if streaming:
        # During the windows: the image (float32), a window-thick float16 slab per class and the masks
        # bit-packed. After them the network is freed, and the raw and cleaned bool masks and the masks on the
        # input grid (made class by class beyond 0.5 GB) take its place.
        slab = 2 * classes * resampled_voxels * min(1.0, roi[0] / max(resampled))
        during_gb = (4 * resampled_voxels + slab + classes * resampled_voxels / 8) / 1e9
        after_gb = (2 * classes * resampled_voxels + min(classes * input_voxels, 0.5e9)) / 1e9
    else:
        # image + weight map (float32) + logits of every class (float32) + masks on the input grid (bool)
        during_gb = after_gb = (8 * resampled_voxels + 4 * classes * resampled_voxels + classes * input_voxels) / 1e9
    if device == "cuda":  # the network and a window's intermediates are in GPU memory; ~1 GB of libraries
        return RunEstimate(windows, windows * per_window, 1.0 + max(during_gb, after_gb), forward, device)
    ram = max(forward + during_gb, IMPORT_MEMORY_GB + after_gb)
    return RunEstimate(windows, windows * per_window, ram, 0.0, device)
