"""Training preprocessing with MONAI transforms, cached on disk with MONAI's ``PersistentDataset``.

Each case is harmonised (:mod:`.assembly`) and brought to the training grid exactly like the library
prepares an image for inference (``UniversalSegLib.preprocess``): RAS orientation, isotropic spacing
(1.5 mm by default; bilinear for the CT, nearest neighbour for the label and host maps), HU window
-175..250 -> 0..1, crop to the foreground. The settings are the library's own
:class:`~UniversalSegLib.preprocess.PreprocessingParameters`, so training and inference cannot drift
apart; an exported checkpoint carries the same object.

The cached item holds the image (float32), the taxonomy label map and the lesion host map (int16) and the
annotated classes; per-class targets are derived from the two maps for each crop
(:func:`~.assembly.class_masks_from_maps`), which keeps the cache small (two bytes per voxel instead of one
per class) and exact.

The cache key of a case includes the image and label files' size and modification time, the dataset
specification's fingerprint and the preprocessing parameters, so an edited spec or file is re-processed.

Memory: the on-disk cache is the persistent one; loaded cases are kept in memory only within
``memory_budget_mb`` per process (least recently used cases are dropped first; 0 = nothing is kept, every
access reads the case file).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import Transform

from UniversalSegLib.preprocess import PreprocessingParameters

from .assembly import AssemblyError, load_case
from .spec import DatasetSpec, DatasetSpecError

__all__ = ["PreprocessingParameters", "CaseCache", "case_items", "preprocessing_transforms", "preprocessing_from_dict"]

_MAP_KEYS = ("labels", "host")


def preprocessing_from_dict(data: Mapping[str, Any] | PreprocessingParameters | None) -> PreprocessingParameters:
    """The library's parameters from a configuration mapping (missing keys take the official defaults)."""
    if isinstance(data, PreprocessingParameters):
        return data
    return PreprocessingParameters.from_dict(dict(data or {}))


def _file_stamp(path: Path | None) -> str:
    if path is None:
        return ""
    try:
        stat = os.stat(path)
    except OSError:
        return f"{path}:missing"
    return f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def check_case_files(specs: Sequence[DatasetSpec]) -> None:
    """Fail before any preprocessing when a case's image or label file is missing, naming file and spec."""
    for spec in specs:
        for case in spec.cases:
            for kind, path in (("image", case.image), ("label map", case.labels), ("training case", case.case_json)):
                if path is not None and not Path(path).is_file():
                    hint = ("check 'labels' (the label path template, e.g. labelsTr/{name}) and 'root'"
                            if kind == "label map" else "check 'images'/'cases' and 'root'")
                    raise DatasetSpecError(
                        f"dataset specification {spec.source}: the {kind} of case {case.case_id!r} does not exist: "
                        f"{path}. Every case needs its {kind}; {hint} in the specification, or remove the case.")


def case_items(specs: Sequence[DatasetSpec], preprocessing: PreprocessingParameters) -> list[dict]:
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


def preprocessing_transforms(specs: Sequence[DatasetSpec], preprocessing: PreprocessingParameters):
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
        chain.append(CropForegroundd(keys=keys, source_key="image", margin=tuple(preprocessing.crop_margin),
                                     allow_smaller=True))
    chain.append(_Finalise())
    return Compose(chain)


def _our_error(error: BaseException) -> BaseException | None:
    """The AssemblyError/DatasetSpecError MONAI wrapped in its 'applying transform' RuntimeError, if any."""
    seen = error
    while seen is not None:
        if isinstance(seen, (AssemblyError, DatasetSpecError)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _case_bytes(case: Mapping[str, Any]) -> int:
    return sum(v.numel() * v.element_size() for v in case.values() if isinstance(v, torch.Tensor))


class CaseCache:
    """All cases of some datasets, preprocessed once and kept on disk (MONAI ``PersistentDataset``).

    ``cache[i]`` returns the preprocessed case ``i`` (a dict with ``image`` (1, X, Y, Z) float32 in 0..1,
    ``labels`` and ``host`` (1, X, Y, Z) int16, ``annotated``, ``includes``, ``affine``, ``dataset``,
    ``case_id``). ``memory_budget_mb``: loaded cases kept in memory per process, least recently used
    dropped first (0 = none kept; each access reads the case's cache file, about as fast as the data
    loader needs for a 96^3 crop).
    """

    def __init__(self, specs: Sequence[DatasetSpec], cache_dir: str | Path,
                 preprocessing: PreprocessingParameters | None = None, memory_budget_mb: float = 0.0):
        from monai.data import PersistentDataset

        self.specs = list(specs)
        check_case_files(self.specs)
        self.preprocessing = preprocessing or PreprocessingParameters()
        self.items = case_items(self.specs, self.preprocessing)
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._dataset = PersistentDataset(self.items, preprocessing_transforms(self.specs, self.preprocessing),
                                          cache_dir=self.cache_dir)
        if memory_budget_mb < 0:
            raise ValueError(f"memory_budget_mb cannot be negative; got {memory_budget_mb}")
        self.memory_budget = int(memory_budget_mb * 2**20)
        self._memory: OrderedDict[int, dict] = OrderedDict()
        self._memory_bytes = 0
        self.by_dataset: list[list[int]] = [[] for _ in self.specs]
        for index, item in enumerate(self.items):
            self.by_dataset[item["dataset_index"]].append(index)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def memory_bytes(self) -> int:
        """Bytes of the cases held in memory now (never above the budget)."""
        return self._memory_bytes

    def _load(self, index: int) -> dict:
        try:
            return self._dataset[index]
        except Exception as error:  # MONAI wraps every transform error in a long RuntimeError chain
            ours = _our_error(error)
            if ours is not None:
                raise ours from None
            raise

    def __getitem__(self, index: int) -> dict:
        if index in self._memory:
            self._memory.move_to_end(index)
            return self._memory[index]
        case = self._load(index)
        size = _case_bytes(case)
        if 0 < size <= self.memory_budget:
            while self._memory and self._memory_bytes + size > self.memory_budget:
                _, dropped = self._memory.popitem(last=False)
                self._memory_bytes -= _case_bytes(dropped)
            self._memory[index] = case
            self._memory_bytes += size
        return case

    def prepare(self, rank: int = 0, world_size: int = 1, progress: bool = False) -> None:
        """Preprocess every case not cached yet (each rank takes every ``world_size``-th case)."""
        indices = range(rank, len(self.items), world_size)
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices, desc="preprocessing", unit="case")
        for index in indices:
            self._load(index)  # computes and stores the cache file when missing
