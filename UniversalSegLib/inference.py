"""Sliding-window inference over a preprocessed CT, and thresholding of the blended logits (SPEC s.4).

The official pipeline runs MONAI's ``sliding_window_inference`` with 96^3 windows, overlap 0.5, batch 1,
Gaussian blending and zero padding, and blends the network's LOGITS: ``sum(w * logit) / sum(w)``. It then
keeps ``sigmoid(logit) > 0.5`` for every class.

Windows: an axis shorter than the window is padded with zeros (half before, rounded down), the step is
``int(roi * (1 - overlap))`` (48 for 96 and 0.5; the whole window when the padded axis equals it), and the
last window is moved back to end at the border, so an axis of (padded) length L gets
``ceil((L - roi) / step) + 1`` windows (:func:`window_starts`).

The Gaussian blending weight changed between MONAI versions. The official code pins MONAI 0.9.0, whose
weight is a unit impulse at index ``size // 2`` smoothed with MONAI's discrete Gaussian kernel (the
"erf" kernel: each tap is the integral of a Gaussian of sigma = 0.125 * size over its unit interval,
cut at 4 sigma), normalised to 1 at the centre, then raised to at least 1e-3 inside its sliding window
(without that floor the corner weight would be 3.8e-11). MONAI >= 1.0 samples an analytic Gaussian
centred between the two middle voxels (47.5 for 96) and also floors it at 1e-3. The two maps differ by up
to 0.044; :func:`gaussian_weight_map` builds either (``flavour="monai09"`` / ``"current"``) and
:func:`sliding_window_logits` uses the 0.9.0 one by default, for bit-faithful blending.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from monai.data.utils import compute_importance_map
from monai.inferers import sliding_window_inference

__all__ = [
    "InferenceParameters",
    "InferenceCancelled",
    "InferenceError",
    "gaussian_weight_map",
    "sliding_window_logits",
    "threshold",
    "window_starts",
    "count_windows",
]

Flavour = Literal["monai09", "current"]
_FLAVOURS = ("monai09", "current")

# MONAI 0.9.0 constants: the kernel is cut at 4 sigma, and sliding_window_inference floors the weight
# at 1e-3 (or at the smallest non-zero weight when that is larger).
_KERNEL_TRUNCATION_SIGMAS = 4.0
_MIN_WEIGHT = 1e-3
_INV_SQRT2 = 0.70710678  # 1/sqrt(2) as MONAI 0.9.0 wrote it (8 digits), for identical float32 rounding


class InferenceError(ValueError):
    """The input or the predictor's output cannot be used for sliding-window inference."""


class InferenceCancelled(RuntimeError):
    """The ``cancel`` callback asked to stop; no result was produced."""


# -- window layout -----------------------------------------------------------------------------------


def window_starts(
    spatial_shape: Sequence[int], roi_size: Sequence[int] = (96, 96, 96), overlap: float = 0.5
) -> list[list[int]]:
    """Start index of every window along each axis, in the zero-padded image (see module doc).

    An axis shorter than its window is padded to the window size first (the starts then refer to the
    padded axis, i.e. the single start is 0).
    """
    shape, roi = _check_shapes(spatial_shape, roi_size)
    _check_overlap(overlap)
    starts = []
    for length, window in zip(shape, roi):
        padded = max(length, window)
        step = window if padded == window else max(int(window * (1 - overlap)), 1)
        count = math.ceil((padded - window) / step) + 1
        starts.append([min(i * step, padded - window) for i in range(count)])
    return starts


def count_windows(
    spatial_shape: Sequence[int], roi_size: Sequence[int] = (96, 96, 96), overlap: float = 0.5
) -> int:
    """Number of windows (network forwards at batch size 1) for an image of ``spatial_shape``."""
    return math.prod(len(axis) for axis in window_starts(spatial_shape, roi_size, overlap))


# -- blending weight ---------------------------------------------------------------------------------


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
    roi = _check_roi(roi_size)
    scales = _per_axis(sigma_scale, len(roi), "sigma_scale")
    if any(s <= 0 for s in scales):
        raise InferenceError(f"sigma_scale must be positive, got {sigma_scale}")
    if flavour == "current":
        return compute_importance_map(roi, mode="gaussian", sigma_scale=scales, device=device or "cpu").float()
    if flavour != "monai09":
        raise InferenceError(f"unknown Gaussian flavour {flavour!r}; use one of {_FLAVOURS}")

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


# -- parameters stored in checkpoints -----------------------------------------------------------------


@dataclass(frozen=True)
class InferenceParameters:
    """How windows are laid out, blended and thresholded; a checkpoint carries them (official defaults)."""

    roi_size: tuple[int, int, int] = (96, 96, 96)
    overlap: float = 0.5
    threshold: float = 0.5
    gaussian: str = "monai09"
    sigma_scale: float = 0.125

    def to_dict(self) -> dict:
        return {"roi_size": list(self.roi_size), "overlap": self.overlap, "threshold": self.threshold,
                "gaussian": self.gaussian, "sigma_scale": self.sigma_scale}

    @classmethod
    def from_dict(cls, data: dict) -> "InferenceParameters":
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"Unknown inference parameter(s): {sorted(unknown)}")
        d = cls()
        return cls(roi_size=tuple(int(v) for v in data.get("roi_size", d.roi_size)),
                   overlap=float(data.get("overlap", d.overlap)), threshold=float(data.get("threshold", d.threshold)),
                   gaussian=str(data.get("gaussian", d.gaussian)), sigma_scale=float(data.get("sigma_scale", d.sigma_scale)))


# -- sliding window ----------------------------------------------------------------------------------


def sliding_window_logits(
    image: torch.Tensor | np.ndarray,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    roi_size: Sequence[int] = (96, 96, 96),
    overlap: float = 0.5,
    sw_batch_size: int = 1,
    gaussian: Flavour = "monai09",
    sigma_scale: float | Sequence[float] = 0.125,
    device: torch.device | str | None = "cpu",
    sw_device: torch.device | str | None = None,
    progress: bool = False,
    cancel: Callable[[], bool] | None = None,
    on_window: Callable[[int, int], None] | None = None,
    buffer_steps: int | None = None,
) -> torch.Tensor:
    """Blend the predictor's logits over overlapping windows, as the official pipeline does.

    Args:
        image: the preprocessed image, shape (X, Y, Z), (1, X, Y, Z) or (1, 1, X, Y, Z).
        predictor: maps a window batch (B, 1, *roi_size) to logits (B, K, *roi_size); K is free.
        roi_size: window size (official: 96^3).
        overlap: fraction of a window shared with its neighbour, in [0, 1) (official: 0.5).
        sw_batch_size: windows per predictor call (official: 1).
        gaussian: blending weight flavour, see :func:`gaussian_weight_map` (official: "monai09").
        sigma_scale: Gaussian sigma as a fraction of the window (official: 0.125).
        device: where the blended output (1, K, X, Y, Z) float32 is accumulated and returned; CPU by
            default, since 32 classes of a full CT take ~2 GB.
        sw_device: where windows are sent to the predictor; default the image's device.
        progress: show a tqdm progress bar.
        cancel: called before every predictor call; returning True stops with
            :class:`InferenceCancelled`.
        on_window: called after every predictor call with (windows done, windows total).
        buffer_steps: passed to MONAI (buffers ``buffer_steps`` window rows on ``sw_device`` before
            adding them to the output; faster on GPU); None for the official unbuffered loop.

    Returns:
        Float32 logits (1, K, X, Y, Z) on ``device``.

    Raises:
        InferenceError: bad image, window or predictor output.
        InferenceCancelled: ``cancel()`` returned True.
    """
    volume = _as_batch_of_one(image)
    roi = _check_roi(roi_size)
    _check_shapes(volume.shape[2:], roi)
    _check_overlap(overlap)
    if not isinstance(sw_batch_size, int) or sw_batch_size < 1:
        raise InferenceError(f"sw_batch_size must be a positive integer, got {sw_batch_size!r}")
    sw_device = torch.device(sw_device) if sw_device is not None else volume.device
    device = torch.device(device) if device is not None else volume.device

    weight = gaussian_weight_map(roi, sigma_scale, flavour=gaussian, device=sw_device)
    total = count_windows(volume.shape[2:], roi, overlap)
    done = 0

    def guarded_predictor(windows: torch.Tensor) -> torch.Tensor:
        nonlocal done
        if cancel is not None and cancel():
            raise InferenceCancelled(f"inference cancelled after {done} of {total} windows")
        logits = predictor(windows)
        if not isinstance(logits, torch.Tensor):
            raise InferenceError(f"the predictor must return one tensor of logits, got {type(logits).__name__}")
        expected = (windows.shape[0], *roi)
        if logits.ndim != 2 + len(roi) or (logits.shape[0], *logits.shape[2:]) != expected:
            raise InferenceError(
                f"the predictor returned shape {tuple(logits.shape)} for windows of shape "
                f"{tuple(windows.shape)}; expected (batch, classes, *window size)"
            )
        done += windows.shape[0]
        if on_window is not None:
            on_window(done, total)
        # MONAI weights the window in place: hand it a dense tensor of its own layout (an expanded
        # or strided view cannot be written to).
        return logits.float().contiguous()

    with torch.no_grad():
        logits = sliding_window_inference(
            volume,
            roi,
            sw_batch_size,
            guarded_predictor,
            overlap=overlap,
            mode="gaussian",
            sigma_scale=sigma_scale,
            padding_mode="constant",
            cval=0.0,
            sw_device=sw_device,
            device=device,
            progress=progress,
            roi_weight_map=weight,
            buffer_steps=buffer_steps,
        )
    return torch.as_tensor(logits).float()


# -- threshold ---------------------------------------------------------------------------------------


def threshold(logits: torch.Tensor, threshold: float | Sequence[float] = 0.5) -> torch.Tensor:
    """Foreground masks ``sigmoid(logit) > threshold`` (strict, as the official code), without
    materialising the probabilities: computed as ``logit > log(t / (1 - t))``.

    Args:
        logits: (1, K, X, Y, Z) (or any shape with the class axis at 1 when thresholds are per class).
        threshold: one probability in (0, 1) for all classes, or one per class (length K).

    Returns:
        A bool tensor of the same shape. A probability of exactly ``threshold`` is background.

    Note:
        The official code compares float32 probabilities, which round to exactly 0.5 for logits below
        about 1.2e-7 in magnitude; those (rare) voxels are background there and foreground here.
    """
    if not torch.is_tensor(logits):
        logits = torch.as_tensor(logits)
    if not logits.is_floating_point():
        raise InferenceError(f"threshold expects float logits, got dtype {logits.dtype}")
    single = isinstance(threshold, numbers.Real)
    values = [threshold] if single else list(threshold)
    for value in values:
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0.0 < float(value) < 1.0:
            raise InferenceError(f"thresholds are probabilities strictly between 0 and 1, got {value!r}")
    cuts = [math.log(float(v) / (1.0 - float(v))) for v in values]
    if single:
        return logits > cuts[0]
    if logits.ndim < 2 or logits.shape[1] != len(cuts):
        raise InferenceError(
            f"{len(cuts)} per-class thresholds for logits of shape {tuple(logits.shape)} (classes on axis 1)"
        )
    shape = [1, len(cuts)] + [1] * (logits.ndim - 2)
    return logits > torch.tensor(cuts, dtype=logits.dtype, device=logits.device).reshape(shape)


# -- checks ------------------------------------------------------------------------------------------


def _as_batch_of_one(image: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))
    if not torch.is_tensor(image):
        raise InferenceError(f"the image must be a torch tensor or numpy array, got {type(image).__name__}")
    if image.ndim == 3:
        image = image[None, None]
    elif image.ndim == 4 and image.shape[0] == 1:
        image = image[None]
    if image.ndim != 5 or image.shape[0] != 1 or image.shape[1] != 1:
        raise InferenceError(
            f"the image must be one single-channel volume, (X, Y, Z), (1, X, Y, Z) or (1, 1, X, Y, Z); "
            f"got shape {tuple(image.shape)}"
        )
    if any(size < 1 for size in image.shape[2:]):
        raise InferenceError(f"the image is empty: shape {tuple(image.shape)}")
    return image if image.dtype == torch.float32 else image.float()


def _check_roi(roi_size: Sequence[int]) -> tuple[int, ...]:
    roi = tuple(roi_size) if isinstance(roi_size, Sequence) else ()
    if len(roi) != 3 or not all(isinstance(s, (int, np.integer)) and s >= 1 for s in roi):
        raise InferenceError(f"roi_size must be three positive integers, got {roi_size!r}")
    return tuple(int(s) for s in roi)


def _check_shapes(spatial_shape: Sequence[int], roi_size: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    roi = _check_roi(roi_size)
    shape = tuple(int(s) for s in spatial_shape)
    if len(shape) != 3 or any(s < 1 for s in shape):
        raise InferenceError(f"the image must have three non-empty spatial axes, got {tuple(spatial_shape)}")
    return shape, roi


def _check_overlap(overlap: float) -> None:
    if not isinstance(overlap, (int, float)) or not 0.0 <= overlap < 1.0:
        raise InferenceError(f"overlap must be in [0, 1), got {overlap!r}")


def _per_axis(value: float | Sequence[float], count: int, name: str) -> tuple[float, ...]:
    values = (value,) * count if isinstance(value, (int, float)) else tuple(value)
    if len(values) != count:
        raise InferenceError(f"{name} needs one value or {count}, got {value!r}")
    return tuple(float(v) for v in values)
