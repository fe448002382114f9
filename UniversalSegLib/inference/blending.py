"""The Gaussian weight that blends overlapping windows.

The official pipeline blends the network's LOGITS over windows: ``sum(w * logit) / sum(w)``. The weight
changed between MONAI versions. The official code pins MONAI 0.9.0, whose weight is a unit impulse at
index ``size // 2`` smoothed with MONAI's discrete Gaussian kernel (the "erf" kernel: each tap is the
integral of a Gaussian of sigma = 0.125 * size over its unit interval, cut at 4 sigma), normalised to 1
at the centre, then raised to at least 1e-3 inside its sliding window (without that floor the corner
weight would be 3.8e-11). MONAI >= 1.0 samples an analytic Gaussian centred between the two middle voxels
(47.5 for 96) and also floors it at 1e-3. The two maps differ by up to 0.044; :func:`gaussian_weight_map`
builds either (``flavour="monai09"`` / ``"current"``); the 0.9.0 one is the default, for bit-faithful
blending.
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch
from monai.data.utils import compute_importance_map

from ..errors import InferenceError
from ..settings import check_roi

__all__ = ["FLAVOURS", "Flavour", "gaussian_weight_map"]

Flavour = Literal["monai09", "current"]
FLAVOURS = ("monai09", "current")

# MONAI 0.9.0 constants: the kernel is cut at 4 sigma, and sliding_window_inference floors the weight
# at 1e-3 (or at the smallest non-zero weight when that is larger).
_KERNEL_TRUNCATION_SIGMAS = 4.0
_MIN_WEIGHT = 1e-3
_INV_SQRT2 = 0.70710678  # 1/sqrt(2) as MONAI 0.9.0 wrote it (8 digits), for identical float32 rounding


def gaussian_weight_map(
    roi_size: Sequence[int] = (96, 96, 96),
    sigma_scale: float | Sequence[float] = 0.125,
    flavour: Flavour = "monai09",
    min_weight: float | None = _MIN_WEIGHT,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Gaussian blending weight of one window, float32, maximum 1.

    Args:
        roi_size: window size.
        sigma_scale: sigma as a fraction of the window size (per axis or one for all).
        flavour: ``"monai09"``, the weight of MONAI 0.9.0 as pinned by the official code (module doc), or
            ``"current"``, the installed MONAI's own ``compute_importance_map(..., mode="gaussian")``.
        min_weight: for ``"monai09"``, the floor applied as 0.9.0's sliding window did (weights below
            ``max(min_weight, smallest non-zero weight)`` are raised to it); None for the raw smoothed
            impulse (corner 3.8e-11 for 96^3). Ignored for ``"current"``, which has its own 1e-3 floor.
        device: where to build the map.
    """
    roi = check_roi(roi_size)
    scales = _per_axis(sigma_scale, len(roi), "sigma_scale")
    if any(s <= 0 for s in scales):
        raise InferenceError(f"sigma_scale must be positive, got {sigma_scale}")
    if flavour == "current":
        return compute_importance_map(roi, mode="gaussian", sigma_scale=scales, device=device or "cpu").float()
    if flavour != "monai09":
        raise InferenceError(f"unknown Gaussian flavour {flavour!r}; use one of {FLAVOURS}")

    weight: torch.Tensor | None = None
    for axis, (size, scale) in enumerate(zip(roi, scales)):
        profile = _smoothed_impulse_1d(size, size * scale, device)
        shape = [1] * len(roi)
        shape[axis] = size
        # Multiply axis by axis in this order: it is the order in which 0.9.0's separable filter
        # applied the kernels, so every product rounds the same way in float32.
        weight = profile.reshape(shape) if weight is None else weight * profile.reshape(shape)
    assert weight is not None
    weight = weight / weight.max()
    if min_weight is not None:
        positive = weight[weight > 0]
        floor = max(positive.min().item() if positive.numel() else 0.0, min_weight)
        weight = weight.clamp(min=floor)
    return weight


def _smoothed_impulse_1d(size: int, sigma: float, device: torch.device | str | None) -> torch.Tensor:
    """A unit impulse at ``size // 2`` filtered (zero padding) with the erf-discretised Gaussian kernel.

    Kernel tap at offset x: ``(erf((x + 1/2) / (sigma sqrt 2)) - erf((x - 1/2) / (sigma sqrt 2))) / 2``,
    offsets up to ``round(4 sigma)``; computed in float32 like MONAI 0.9.0's ``gaussian_1d``.
    """
    sigma_t = torch.as_tensor(sigma, dtype=torch.float32, device=device)
    tail = int(max(float(sigma_t) * _KERNEL_TRUNCATION_SIGMAS, 0.5) + 0.5)
    offsets = torch.arange(-tail, tail + 1, dtype=torch.float32, device=device)
    t = _INV_SQRT2 / sigma_t.abs()
    kernel = (0.5 * (torch.erf(t * (offsets + 0.5)) - torch.erf(t * (offsets - 0.5)))).clamp(min=0)
    # Filtering an impulse at c gives, at index i, the kernel tap at offset c - i (zero beyond the tail).
    distance = (size // 2) - torch.arange(size, device=device)
    inside = distance.abs() <= tail
    profile = torch.zeros(size, dtype=torch.float32, device=device)
    profile[inside] = kernel[distance[inside] + tail]
    return profile


def _per_axis(value: float | Sequence[float], count: int, name: str) -> tuple[float, ...]:
    values = (value,) * count if isinstance(value, (int, float)) else tuple(value)
    if len(values) != count:
        raise InferenceError(f"{name} needs one value or {count}, got {value!r}")
    return tuple(float(v) for v in values)
