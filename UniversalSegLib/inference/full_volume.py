"""Sliding-window inference over the whole volume at once, as the official pipeline runs it.

MONAI's ``sliding_window_inference`` with 96^3 windows, overlap 0.5, batch 1, Gaussian blending (see
:mod:`.blending`) and zero padding blends every requested class into a float32 map of the whole volume;
:func:`threshold` then keeps ``sigmoid(logit) > 0.5`` for every class. The reference mode uses this path;
the other modes use the slab-wise blend of :mod:`.slabs`, which gives the same masks with less memory.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from ..errors import InferenceCancelled, InferenceError
from ..settings import check_overlap, check_roi, check_shapes, count_windows
from .blending import Flavour, gaussian_weight_map

__all__ = ["sliding_window_logits", "threshold", "as_batch_of_one"]


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
    volume = as_batch_of_one(image)
    roi = check_roi(roi_size)
    check_shapes(volume.shape[2:], roi)
    check_overlap(overlap)
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


def as_batch_of_one(image: torch.Tensor | np.ndarray) -> torch.Tensor:
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
