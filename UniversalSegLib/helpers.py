"""Small helpers several parts of UniversalSeg need: a mask's bounding box, the Dice overlap of two masks,
the volume of a voxel, a file's SHA-256. numpy and the standard library only (the Slicer module uses them
too)."""
from __future__ import annotations

import hashlib
import os
from typing import Sequence

import numpy as np

__all__ = ["bounding_box", "dice_score", "voxel_volume_ml", "sha256_file"]


def bounding_box(mask: np.ndarray, margin: int | Sequence[int] = 0) -> tuple[slice, ...] | None:
    """Slices of the smallest box holding every non-zero voxel of ``mask``, grown by ``margin`` voxels per
    side (clamped to the array); None for an empty mask."""
    margins = np.broadcast_to(np.asarray(margin, dtype=np.int64), (mask.ndim,))
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            return None
        box.append(slice(max(int(hit[0]) - int(margins[axis]), 0),
                         min(int(hit[-1]) + 1 + int(margins[axis]), mask.shape[axis])))
    return tuple(box)


def voxel_volume_ml(affine) -> float:
    """Volume of one voxel in millilitres (cm^3) from a 4x4 (or 3x3) IJK->RAS matrix in millimetres."""
    matrix = np.asarray(affine, dtype=np.float64)[:3, :3]
    return float(abs(np.linalg.det(matrix))) / 1000.0


def sha256_file(path: str | os.PathLike, chunk: int = 2**22) -> str:
    """Hex SHA-256 of a file, read in ``chunk``-byte blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def dice_score(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice overlap of two boolean masks, ``2 |P & T| / (|P| + |T|)``; 1.0 when both are empty."""
    prediction, truth = np.asarray(prediction, dtype=bool), np.asarray(truth, dtype=bool)
    total = int(np.count_nonzero(prediction)) + int(np.count_nonzero(truth))
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(prediction & truth)) / total
