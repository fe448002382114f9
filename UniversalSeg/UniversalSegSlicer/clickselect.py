"""Click-to-select: which classes does the model see at a clicked point, without running it again.

One background run per volume (all classes of the model, ``keep_probabilities=True``) fills a
:class:`CachedPrediction`: the per-class probabilities on the preprocessed grid and the final masks on the
input grid (bit-packed: one bit per voxel and class). A click maps the RAS point onto the preprocessed
grid and names the classes whose probability there is above 0.5; adding such a class as a segment takes
its cached mask, which is exactly what a normal run would have produced. Nothing re-runs the network
until the volume, its geometry or the model changes.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable

import numpy as np

from UniversalSegLib.taxonomy import ClassInfo

__all__ = ["ClassHit", "CachedPrediction", "PredictionCache", "volume_fingerprint", "PROBABILITY_CUT"]

#: uint8 probability (0..255) at or above which a class counts as present: round(255 * p) >= 128 <=> p >= 0.5.
PROBABILITY_CUT = 128


@dataclass(frozen=True)
class ClassHit:
    """A class present at a point, with the model's probability there."""

    info: ClassInfo
    probability: float


class CachedPrediction:
    """All-class prediction of one volume: probabilities (preprocessed grid) and masks (input grid)."""

    def __init__(self, result, classes, statistics: dict | None = None) -> None:
        """``result``: a :class:`~UniversalSegLib.worker.WorkerResult` with probabilities; ``classes``: its
        classes; ``statistics``: what the worker measured per class (index -> voxels, volume_ml, mean_hu)."""
        self.statistics = dict(statistics or {})
        if result.probabilities is None or result.preprocessed_affine is None:
            raise ValueError("the segmentation result holds no probabilities (run with keep_probabilities=True)")
        self.classes: list[ClassInfo] = list(classes)
        self.probabilities: dict[int, np.ndarray] = dict(result.probabilities)
        self.preprocessed_shape = tuple(result.preprocessed_shape)
        self._ras_to_index = np.linalg.inv(np.asarray(result.preprocessed_affine, dtype=np.float64))
        self.shape = tuple(result.shape)
        self._packed = {index: np.packbits(mask, axis=None) for index, mask in result.masks.items()}

    @property
    def indices(self) -> list[int]:
        return [info.index for info in self.classes]

    def preprocessed_index(self, ras) -> tuple[int, int, int] | None:
        """Nearest voxel of the preprocessed grid to the RAS point, or None outside it (outside the body crop)."""
        point = self._ras_to_index @ np.array([float(ras[0]), float(ras[1]), float(ras[2]), 1.0])
        index = np.rint(point[:3]).astype(int)
        if np.any(index < 0) or np.any(index >= np.array(self.preprocessed_shape)):
            return None
        return tuple(int(v) for v in index)

    def classes_at(self, ras) -> list[ClassHit]:
        """Classes whose probability at the RAS point is above 0.5, most probable first."""
        index = self.preprocessed_index(ras)
        if index is None:
            return []
        hits = []
        for info in self.classes:
            value = int(self.probabilities[info.index][index])
            if value >= PROBABILITY_CUT:
                hits.append(ClassHit(info, value / 255.0))
        return sorted(hits, key=lambda hit: (-hit.probability, hit.info.index))

    def mask(self, index: int) -> np.ndarray:
        """The final (post-processed) mask of a class on the input grid, as the normal run gives it."""
        count = int(np.prod(self.shape))
        return np.unpackbits(self._packed[index], count=count).reshape(self.shape).astype(bool)


def volume_fingerprint(volume_node) -> tuple:
    """What identifies a volume's content and geometry: a change of voxels, grid or transform changes it."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    geometry = tuple(round(matrix.GetElement(r, c), 9) for r in range(3) for c in range(4))
    transform = volume_node.GetParentTransformNode()
    transform_key = None
    if transform is not None:
        world = vtk.vtkMatrix4x4()
        if transform.IsTransformToWorldLinear():
            transform.GetMatrixTransformToWorld(world)
        transform_key = (transform.GetID(), tuple(round(world.GetElement(r, c), 9) for r in range(3) for c in range(4)))
    image = volume_node.GetImageData()
    return (volume_node.GetID(), image.GetMTime() if image is not None else None, geometry, transform_key)


class PredictionCache:
    """Least-recently-used cache of :class:`CachedPrediction`."""

    def __init__(self, max_entries: int = 1) -> None:
        self.max_entries = max(1, int(max_entries))
        self._entries: "OrderedDict[Hashable, CachedPrediction]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> CachedPrediction | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: Hashable, prediction: CachedPrediction) -> None:
        with self._lock:
            self._entries[key] = prediction
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
