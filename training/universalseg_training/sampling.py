"""Training samples: uniform over datasets, positive/negative crops, augmentations (SPEC s.6.1), MONAI.

Every sample is a pure function of ``(seed, rank, sample number)``: the dataset (round robin over datasets,
so each dataset is drawn equally often whatever its size, like the official ``--uniform_sample``), the
case, the crop and the augmentations all come from a generator seeded with those three numbers. A run
resumed from a checkpoint at step *s* therefore sees exactly the samples the uninterrupted run would
have seen, whatever the number of data-loader workers, with no data-loader state to save.

Crops: datasets without annotated lesions use ``RandCropByPosNegLabeld`` (positive = any labelled voxel,
positive:negative = 2:1); datasets with annotated lesions use ``RandCropByLabelClassesd`` with background:
organ:lesion = 1:1:5 (the official choice for LiTS and the MSD tumour tasks). Augmentations: random zoom
1.3-1.5 (probability 0.3, lesion datasets only, as the official MSD-only zoom), random 90-degree rotations
in the axial plane (0.1), random intensity shift +-0.1 (0.2).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .assembly import class_masks_from_maps
from .preprocessing import CaseCache

__all__ = ["SamplingConfig", "CropDataset", "sample_seed"]

_KEYS = ("image", "labels", "host")


@dataclass(frozen=True)
class SamplingConfig:
    """Crop size, crop balance and augmentation probabilities."""

    roi_size: tuple[int, int, int] = (96, 96, 96)
    pos: float = 2.0
    neg: float = 1.0
    lesion_ratios: tuple[float, float, float] = (1.0, 1.0, 5.0)
    zoom_prob: float = 0.3
    zoom_range: tuple[float, float] = (1.3, 1.5)
    rotate90_prob: float = 0.1
    shift_intensity_prob: float = 0.2
    shift_intensity_offset: float = 0.1
    augment: bool = True

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SamplingConfig":
        fields = {}
        for key, value in data.items():
            if key not in cls.__dataclass_fields__:
                raise ValueError(f"unknown sampling setting {key!r}")
            fields[key] = tuple(value) if isinstance(value, list) else value
        return cls(**fields)


def sample_seed(seed: int, rank: int, index: int) -> np.random.Generator:
    """The generator of sample ``index`` of ``rank`` in a run seeded with ``seed``."""
    return np.random.default_rng([int(seed), int(rank), int(index)])


def _crop_chain(config: SamplingConfig, lesions: bool):
    from monai.transforms import (
        Compose,
        RandCropByLabelClassesd,
        RandCropByPosNegLabeld,
        RandRotate90d,
        RandShiftIntensityd,
        RandZoomd,
        SpatialPadd,
    )

    keys = list(_KEYS)
    roi = tuple(int(s) for s in config.roi_size)
    chain: list = [SpatialPadd(keys=[*keys, "balance"], spatial_size=roi, mode="constant")]
    if lesions:
        chain.append(RandCropByLabelClassesd(keys=keys, label_key="balance", spatial_size=roi,
                                             ratios=list(config.lesion_ratios), num_classes=3, num_samples=1,
                                             image_key="image", image_threshold=0.0, warn=False))
    else:
        chain.append(RandCropByPosNegLabeld(keys=keys, label_key="balance", spatial_size=roi, pos=config.pos,
                                            neg=config.neg, num_samples=1, image_key="image", image_threshold=0.0))
    if config.augment:
        if lesions and config.zoom_prob > 0:
            chain.append(RandZoomd(keys=keys, prob=config.zoom_prob, min_zoom=config.zoom_range[0],
                                   max_zoom=config.zoom_range[1], mode=("area", "nearest", "nearest"), keep_size=True))
        if config.rotate90_prob > 0:
            chain.append(RandRotate90d(keys=keys, prob=config.rotate90_prob, max_k=3, spatial_axes=(0, 1)))
        if config.shift_intensity_prob > 0:
            chain.append(RandShiftIntensityd(keys="image", offsets=config.shift_intensity_offset,
                                             prob=config.shift_intensity_prob))
    return Compose(chain)


def _plain(value) -> torch.Tensor:
    value = value.as_tensor() if hasattr(value, "as_tensor") else torch.as_tensor(value)
    return value.contiguous()


class CropDataset(torch.utils.data.Dataset):
    """Map-style dataset of training crops indexed by the global sample number of one rank.

    ``dataset[n]`` -> ``{"image": (1, *roi) float32, "target": (K, *roi) uint8, "annotated": (K,) bool,
    "dataset": int}``; ``K`` = number of model channels and ``channel_classes[k]`` is the taxonomy index of
    channel ``k``. Unannotated channels have an all-zero target and ``annotated[k] = False``.
    """

    def __init__(self, cache: CaseCache, channel_classes: Sequence[int], config: SamplingConfig | None = None,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        self.cache = cache
        self.channel_classes = [int(c) for c in channel_classes]
        self.config = config or SamplingConfig()
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.datasets = [d for d, members in enumerate(cache.by_dataset) if members]
        if not self.datasets:
            raise ValueError("no training cases: every dataset is empty")
        self._chains: dict[bool, Any] = {}

    def __len__(self) -> int:
        return 2**62  # indexed by sample number; the trainer decides how many it draws

    def _chain(self, lesions: bool):
        if lesions not in self._chains:
            self._chains[lesions] = _crop_chain(self.config, lesions)
        return self._chains[lesions]

    def dataset_of(self, index: int) -> int:
        """Round robin over datasets across ranks and samples: every dataset equally often."""
        return self.datasets[(int(index) * self.world_size + self.rank) % len(self.datasets)]

    def __getitem__(self, index: int) -> dict:
        rng = sample_seed(self.seed, self.rank, index)
        dataset = self.dataset_of(index)
        case_index = int(rng.choice(self.cache.by_dataset[dataset]))
        case = self.cache[case_index]
        annotated = set(int(i) for i in case["annotated"])
        includes = {int(k): v for k, v in case["includes"].items()}
        spec = self.cache.specs[dataset]
        lesion_classes = [i for i in annotated if i in spec.taxonomy.indices and spec.taxonomy[i].is_lesion]
        lesions = bool(lesion_classes)
        labels = case["labels"]
        if lesions:
            is_lesion = torch.zeros_like(labels, dtype=torch.bool)
            for index_ in lesion_classes:
                is_lesion |= labels == index_
            balance = (labels > 0).to(torch.int16) + is_lesion.to(torch.int16)  # 0 bg, 1 organ, 2 lesion
        else:
            balance = (labels > 0).to(torch.int16)
        data = {"image": case["image"], "labels": labels, "host": case["host"], "balance": balance}
        chain = self._chain(lesions)
        chain.set_random_state(seed=int(rng.integers(2**31 - 1)))
        out = chain(data)
        if isinstance(out, list):
            out = out[0]
        # Plain tensors from here: MetaTensor bookkeeping would slow every comparison below tenfold.
        image, crop_labels, crop_host = (_plain(out[key]) for key in _KEYS)
        image, crop_labels, crop_host = image.float(), crop_labels[0], crop_host[0]
        wanted = [c for c in self.channel_classes if c in annotated]
        masks = class_masks_from_maps(crop_labels, crop_host, wanted, includes)
        target = torch.zeros((len(self.channel_classes), *crop_labels.shape), dtype=torch.uint8)
        flags = torch.zeros(len(self.channel_classes), dtype=torch.bool)
        for k, c in enumerate(self.channel_classes):
            if c in masks:
                target[k] = masks[c].to(torch.uint8)
                flags[k] = True
        return {"image": image, "target": target,
                "annotated": flags, "dataset": dataset}
