"""Training preprocessing with MONAI transforms, cached on disk with MONAI's ``PersistentDataset``.

Each case is harmonised (:mod:`.assembly`) and brought to the training grid exactly like the library
prepares an image for inference (``UniversalSegLib.preprocess``, SPEC s.3): RAS orientation, isotropic
spacing (1.5 mm by default; bilinear for the CT, nearest neighbour for the label and host maps), HU window
-175..250 -> 0..1, crop to the foreground. The cached item holds the image (float32), the taxonomy label
map and the lesion host map (uint8/uint16) and the annotated classes; per-class targets are derived from
the two maps for each crop (:func:`~.assembly.class_masks_from_maps`), which keeps the cache small (two
bytes per voxel instead of one per class) and exact.

The cache key of a case includes the image and label files' size and modification time, the dataset
specification's fingerprint and the preprocessing parameters, so an edited spec or file is re-processed.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import Transform

from UniversalSegLib.preprocess import PreprocessingParameters

from .assembly import load_case
from .spec import DatasetSpec

__all__ = ["TrainingPreprocessing", "CaseCache", "case_items", "preprocessing_transforms"]

_MAP_KEYS = ("labels", "host")


@dataclass(frozen=True)
class TrainingPreprocessing:
    """Grid and intensity settings of training; exported checkpoints carry them for inference."""

    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)
    hu_window: tuple[float, float] = (-175.0, 250.0)
    crop_foreground: bool = True

    def library_parameters(self) -> PreprocessingParameters:
        return PreprocessingParameters(spacing=tuple(self.spacing), hu_window=tuple(self.hu_window),
                                       crop_foreground=self.crop_foreground)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainingPreprocessing":
        return cls(spacing=tuple(float(v) for v in data.get("spacing", (1.5,) * 3)),
                   hu_window=tuple(float(v) for v in data.get("hu_window", (-175.0, 250.0))),
                   crop_foreground=bool(data.get("crop_foreground", True)))


def _file_stamp(path: Path | None) -> str:
    if path is None:
        return ""
    try:
        stat = os.stat(path)
    except OSError:
        return f"{path}:missing"
    return f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def case_items(specs: Sequence[DatasetSpec], preprocessing: TrainingPreprocessing) -> list[dict]:
    """One plain dict per case (the cache key material); ``dataset_index``/``case_index`` locate the case."""
    items = []
    prep = repr(preprocessing.to_dict())
    for d, spec in enumerate(specs):
        fingerprint = spec.fingerprint()
        for c, case in enumerate(spec.cases):
            items.append({
                "dataset": spec.name, "dataset_index": d, "case_index": c, "case_id": case.case_id,
                "files": "|".join(_file_stamp(p) for p in (case.image, case.labels, case.case_json)),
                "spec": fingerprint, "preprocessing": prep,
            })
    return items


class _LoadHarmonised(Transform):
    """First (deterministic) transform: read and harmonise the case an item points at.

    A MONAI ``Transform`` subclass on purpose: ``PersistentDataset`` caches the results of the leading
    deterministic ``Transform`` objects only, and would treat a plain callable as the uncached part.
    """

    def __init__(self, specs: Sequence[DatasetSpec]):
        self.specs = list(specs)

    def __call__(self, item: Mapping[str, Any]) -> dict:
        from monai.data import MetaTensor

        spec = self.specs[item["dataset_index"]]
        case = load_case(spec, spec.cases[item["case_index"]])
        affine = torch.as_tensor(case.affine, dtype=torch.float64)
        out = dict(item)
        out["image"] = MetaTensor(torch.as_tensor(np.asarray(case.image, dtype=np.float32))[None], affine=affine)
        for key in _MAP_KEYS:
            out[key] = MetaTensor(torch.as_tensor(getattr(case, key).astype(np.int16))[None], affine=affine)
        out["annotated"] = list(case.annotated)
        out["includes"] = {int(k): list(v) for k, v in case.includes.items()}
        return out


class _Finalise(Transform):
    """Last transform: plain tensors, compact dtypes, and the grid's affine for distance metrics."""

    def __call__(self, data: Mapping[str, Any]) -> dict:
        out = {k: v for k, v in data.items() if k not in ("image", *_MAP_KEYS) and not k.startswith("foreground_")}
        image = data["image"]
        out["affine"] = torch.as_tensor(np.asarray(image.affine, dtype=np.float64))
        out["image"] = torch.as_tensor(image.as_tensor() if hasattr(image, "as_tensor") else image).float().contiguous()
        for key in _MAP_KEYS:
            value = data[key]
            value = value.as_tensor() if hasattr(value, "as_tensor") else torch.as_tensor(value)
            out[key] = torch.round(value).to(torch.int16).contiguous()
        return out


def preprocessing_transforms(specs: Sequence[DatasetSpec], preprocessing: TrainingPreprocessing):
    """The deterministic MONAI chain from a case item to the cached training-grid arrays."""
    from monai.transforms import Compose, CropForegroundd, Orientationd, ScaleIntensityRanged, Spacingd

    keys = ["image", *_MAP_KEYS]
    low, high = preprocessing.hu_window
    chain = [
        _LoadHarmonised(specs),
        Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(keys=keys, pixdim=tuple(preprocessing.spacing), mode=("bilinear", "nearest", "nearest"),
                 padding_mode=("border", "border", "border"), dtype=(np.float64, np.float32, np.float32)),
        ScaleIntensityRanged(keys="image", a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True),
    ]
    if preprocessing.crop_foreground:
        chain.append(CropForegroundd(keys=keys, source_key="image", allow_smaller=True))
    chain.append(_Finalise())
    return Compose(chain)


class CaseCache:
    """All cases of some datasets, preprocessed once and kept on disk (MONAI ``PersistentDataset``).

    ``cache[i]`` returns the preprocessed case ``i`` (a dict with ``image`` (1, X, Y, Z) float32 in 0..1,
    ``labels`` and ``host`` (1, X, Y, Z) int16, ``annotated``, ``includes``, ``affine``, ``dataset``,
    ``case_id``). ``memory=True`` also keeps loaded cases in memory (per process).
    """

    def __init__(self, specs: Sequence[DatasetSpec], cache_dir: str | Path,
                 preprocessing: TrainingPreprocessing | None = None, memory: bool = True):
        from monai.data import PersistentDataset

        self.specs = list(specs)
        self.preprocessing = preprocessing or TrainingPreprocessing()
        self.items = case_items(self.specs, self.preprocessing)
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._dataset = PersistentDataset(self.items, preprocessing_transforms(self.specs, self.preprocessing),
                                          cache_dir=self.cache_dir)
        self._memory: dict[int, dict] | None = {} if memory else None
        self.by_dataset: list[list[int]] = [[] for _ in self.specs]
        for index, item in enumerate(self.items):
            self.by_dataset[item["dataset_index"]].append(index)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        if self._memory is not None and index in self._memory:
            return self._memory[index]
        case = self._dataset[index]
        if self._memory is not None:
            self._memory[index] = case
        return case

    def prepare(self, rank: int = 0, world_size: int = 1, progress: bool = False) -> None:
        """Preprocess every case not cached yet (each rank takes every ``world_size``-th case)."""
        indices = range(rank, len(self.items), world_size)
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices, desc="preprocessing", unit="case")
        for index in indices:
            self._dataset[index]  # computes and stores the cache file when missing
