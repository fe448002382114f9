"""Sliding-window inference straight to per-class masks, without full-volume float maps.

The official pipeline blends every window into a float32 map of all requested classes over the whole
volume (32 classes of an abdominal CT: 1.3 GB for a 243x193x223 grid, 7 GB for a fine 512x512x800 one)
and thresholds it afterwards. Here windows are visited row by row along one axis (the "slab" axis): a
voxel gets no more contributions once the next row of windows starts beyond it, so only a slab one
window thick is accumulated, and everything before the current row is thresholded into bool masks
(plus optional uint8 probabilities) as soon as it is final. The masks are kept bit-packed (an eighth of
a bool array: 42 MB instead of 0.34 GB for 32 classes of a 243x193x223 grid) until the caller takes them,
one class at a time, after the network has been released. Within a row the order of windows is
MONAI's, so with the slab on axis 0 and float32 accumulation every voxel sums its windows in the same
order as :func:`.full_volume.sliding_window_logits` (identical masks).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import InferenceCancelled, InferenceError
from ..settings import Placement, check_shapes, window_layout
from .full_volume import as_batch_of_one

__all__ = ["BlendedMasks", "sliding_window_masks"]


@dataclass
class BlendedMasks:
    """Thresholded blend of all windows, on the (unpadded) image grid.

    The masks are held bit-packed, slab by slab: :meth:`mask` unpacks one class, :attr:`masks` all of them.
    """

    shape: tuple[int, int, int]
    axis: int  # the slab axis: the packed pieces are consecutive ranges along it
    ranges: list[tuple[int, int]]  # [start, stop) of each piece along ``axis``
    packed: list[list[np.ndarray]]  # per class, per piece: np.packbits of the piece's bool mask
    probabilities: np.ndarray | None  # (K, X, Y, Z) uint8 = round(255 * sigmoid(blended logit)), on request
    windows: int

    def __len__(self) -> int:
        return len(self.packed)

    def mask(self, k: int) -> np.ndarray:
        """Class channel ``k``'s mask, a new (X, Y, Z) bool array."""
        out = np.zeros(self.shape, dtype=bool)
        for (start, stop), bits in zip(self.ranges, self.packed[k]):
            index = [slice(None)] * 3
            index[self.axis] = slice(start, stop)
            piece = out[tuple(index)]
            piece[...] = np.unpackbits(bits, count=piece.size).reshape(piece.shape).view(bool)
        return out

    @property
    def masks(self) -> np.ndarray:
        """All classes' masks, (K, X, Y, Z) bool (the size of a bool array per class: take :meth:`mask` one
        at a time where memory matters)."""
        return np.stack([self.mask(k) for k in range(len(self))]) if len(self) else np.zeros((0, *self.shape), bool)


def sliding_window_masks(
    image: torch.Tensor | np.ndarray,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    weight: torch.Tensor,
    thresholds: Sequence[float],
    roi_size: Sequence[int] = (96, 96, 96),
    overlap: float = 0.5,
    placement: Placement = "monai",
    sw_device: torch.device | str = "cpu",
    accumulate_dtype: torch.dtype = torch.float32,
    keep_probabilities: bool = False,
    slab_axis: int | None = None,
    cancel: Callable[[], bool] | None = None,
    on_window: Callable[[int, int], None] | None = None,
    progress: bool = False,
) -> BlendedMasks:
    """Blend the predictor's logits over windows (``sum(w * logit) / sum(w)``) and threshold per class.

    Args:
        image: preprocessed volume, (X, Y, Z), (1, X, Y, Z) or (1, 1, X, Y, Z), on the CPU.
        predictor: window batch (1, 1, *roi) on ``sw_device`` -> logits (1, K, *roi), a tensor this function
            may overwrite (it is weighted in place) and is done with before the next call (so the predictor
            may return the same buffer every time).
        weight: blending weight of one window, shape ``roi_size`` (see ``gaussian_weight_map``).
        thresholds: one probability per class channel, strictly between 0 and 1 (``sigmoid > t``).
        roi_size, overlap, placement: the window layout (:func:`window_layout`).
        sw_device: where windows are evaluated and the slab is accumulated (on a GPU the slab stays there and
            only finished masks travel to the CPU).
        accumulate_dtype: dtype of the per-class slab sums (float16 halves their memory; the sign of
            a blended logit then changes only where it is within ~1e-3 of the threshold).
        keep_probabilities: also return uint8 probabilities.
        slab_axis: the axis along which rows of windows are streamed (default: the longest padded
            axis, which makes the slab smallest).
        cancel: polled before every window; True stops with :class:`InferenceCancelled`.
        on_window: called with (windows done, windows total) after every window.
        progress: show a tqdm progress bar of the windows.
    """
    from tqdm.auto import tqdm

    volume = as_batch_of_one(image)[0, 0]
    if volume.device.type != "cpu":
        volume = volume.cpu()
    shape, roi = check_shapes(volume.shape, roi_size)
    if tuple(weight.shape) != roi:
        raise InferenceError(f"the blending weight has shape {tuple(weight.shape)}, expected {roi}")
    cuts = []
    for t in thresholds:
        if not 0.0 < float(t) < 1.0:
            raise InferenceError(f"thresholds are probabilities strictly between 0 and 1, got {t!r}")
        cuts.append(math.log(float(t) / (1.0 - float(t))))
    starts = window_layout(shape, roi, overlap, placement)

    # Zero padding of short axes, half before (MONAI's rule); `offset` maps padded -> image coordinates.
    pads = [max(r - n, 0) for n, r in zip(shape, roi)]
    offset = [p // 2 for p in pads]
    if any(pads):
        volume = torch.nn.functional.pad(
            volume[None, None], [v for p, o in reversed(list(zip(pads, offset))) for v in (o, p - o)]
        )[0, 0]
    padded = tuple(volume.shape)
    axis = int(np.argmax(padded)) if slab_axis is None else int(slab_axis)
    if axis not in (0, 1, 2):
        raise InferenceError(f"slab_axis must be 0, 1 or 2, got {slab_axis!r}")
    others = [a for a in range(3) if a != axis]
    rows = starts[axis]
    total = math.prod(len(s) for s in starts)
    sw_device = torch.device(sw_device)
    weight_dev = weight.detach().to(sw_device, torch.float32)

    def along(a: int, start: int, stop: int) -> tuple[slice, ...]:
        index = [slice(None)] * 3
        index[a] = slice(start, stop)
        return tuple(index)

    slab_shape = list(padded)
    slab_shape[axis] = roi[axis]
    weight_sum = torch.zeros(slab_shape, dtype=torch.float32, device=sw_device)
    sums: torch.Tensor | None = None  # (K, *slab_shape), allocated at the first window (K unknown before)
    packed: list[list[np.ndarray]] = []  # per class, the bit-packed mask of each finalised range
    ranges: list[tuple[int, int]] = []
    probabilities: np.ndarray | None = None
    base = rows[0]  # padded coordinate of slab index 0
    done = 0

    def finalize(stop: int) -> None:
        """Threshold padded positions [base, stop) along the slab axis into the outputs."""
        lo, hi = max(base, offset[axis]), min(stop, offset[axis] + shape[axis])
        if hi <= lo or sums is None:
            return
        cut = [slice(None)] * 3
        cut[axis] = slice(lo - base, hi - base)
        for a in others:
            cut[a] = slice(offset[a], offset[a] + shape[a])
        dest = along(axis, lo - offset[axis], hi - offset[axis])
        ranges.append((lo - offset[axis], hi - offset[axis]))
        total_weight = weight_sum[tuple(cut)]
        for k in range(sums.shape[0]):
            blended = sums[k][tuple(cut)].float() / total_weight
            packed[k].append(np.packbits((blended > cuts[k]).cpu().numpy()))
            if probabilities is not None:
                probabilities[k][dest] = (torch.sigmoid(blended) * 255).round().to(torch.uint8).cpu().numpy()

    def shift(to: int) -> None:
        """Move the slab origin from ``base`` to ``to``: keep the overlap, zero the rest."""
        moved = to - base
        keep = roi[axis] - moved
        tensors = [weight_sum] + ([] if sums is None else list(sums))
        for t in tensors:  # one class at a time, so the temporary copy stays small
            if keep > 0:
                t[along(axis, 0, keep)] = t[along(axis, moved, moved + keep)].clone()
            t[along(axis, max(keep, 0), roi[axis])] = 0

    bar = tqdm(total=total, desc="windows", unit="window", disable=not progress, leave=False)
    with torch.no_grad(), bar:
        for row in rows:
            if row > base:
                finalize(row)
                shift(row)
                base = row
            for corner in product(*(starts[a] for a in others)):
                if cancel is not None and cancel():
                    raise InferenceCancelled(f"inference cancelled after {done} of {total} windows")
                begin = [0, 0, 0]
                begin[axis] = row
                for a, s in zip(others, corner):
                    begin[a] = s
                window = volume[tuple(slice(b, b + r) for b, r in zip(begin, roi))]
                logits = predictor(window[None, None].to(sw_device))
                if not isinstance(logits, torch.Tensor) or logits.ndim != 5 or tuple(logits.shape[2:]) != roi \
                        or logits.shape[0] != 1:
                    got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                    raise InferenceError(f"the predictor returned {got} for one window of {roi}; "
                                         f"expected (1, classes, *window size)")
                if sums is None:
                    k = logits.shape[1]
                    if len(cuts) not in (1, k):
                        raise InferenceError(f"{len(cuts)} thresholds for {k} class channels")
                    cuts = cuts * k if len(cuts) == 1 else cuts
                    sums = torch.zeros((k, *slab_shape), dtype=accumulate_dtype, device=sw_device)
                    packed = [[] for _ in range(k)]
                    if keep_probabilities:
                        probabilities = np.zeros((k, *shape), dtype=np.uint8)
                region = [slice(b, b + r) for b, r in zip(begin, roi)]
                region[axis] = slice(row - base, row - base + roi[axis])
                # Weighted in place in the predictor's output and added one class at a time: no class-sized
                # temporary (57 MB for 32 classes in float16). Elementwise, so the sums are the same.
                target = sums[(slice(None), *region)]
                for c in range(target.shape[0]):
                    target[c] += logits[0, c].float().mul_(weight_dev).to(accumulate_dtype)
                weight_sum[tuple(region)] += weight_dev
                del logits, target
                done += 1
                bar.update(1)
                if on_window is not None:
                    on_window(done, total)
        finalize(base + roi[axis])
    return BlendedMasks(shape=shape, axis=axis, ranges=ranges, packed=packed, probabilities=probabilities,
                        windows=total)
