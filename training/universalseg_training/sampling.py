"""Training samples: uniform over datasets, positive/negative crops, augmentations, as in the official training; MONAI.

Every sample is a pure function of ``(seed, rank, sample number)``: the dataset (round robin over datasets,
so each dataset is drawn equally often whatever its size, like the official ``--uniform_sample``), the
case, the crop and the augmentations all come from a generator seeded with those three numbers. A run
resumed from a checkpoint at step *s* therefore sees exactly the samples the uninterrupted run would
have seen, whatever the number of data-loader workers, with no data-loader state to save.

Crops are chosen per dataset by its specification's ``sampling`` entry (the presets follow the official
recipe): ``crops: pos_neg`` uses ``RandCropByPosNegLabeld`` (positive = any labelled voxel,
positive:negative = 2:1); ``crops: lesions`` uses ``RandCropByLabelClassesd`` with background:organ:lesion
= 1:1:5 (officially LiTS and the MSD liver, pancreas and hepatic-vessel tasks only). ``zoom: true`` adds a
random zoom 1.3-1.5 (probability 0.3; officially every MSD task), applied to the whole padded case BEFORE
cropping as the official pipeline does (``SamplingConfig.zoom_before_crop``; False zooms each crop, the
behaviour of earlier versions kept for their benchmarks). Then, per crop: random 90-degree rotations in
the axial plane (0.1), random intensity shift +-0.1 (0.2). ``num_samples`` crops are drawn from each
sampled case (the official ``--num_samples``); a batch holds ``batch_size`` cases, i.e.
``batch_size * num_samples`` crops.
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
    """Crop size, crop balance, crops per case and augmentation probabilities (see the module docstring)."""

    roi_size: tuple[int, int, int] = (96, 96, 96)
    num_samples: int = 1
    pos: float = 2.0
    neg: float = 1.0
    lesion_ratios: tuple[float, float, float] = (1.0, 1.0, 5.0)
    zoom_prob: float = 0.3
    zoom_range: tuple[float, float] = (1.3, 1.5)
    rotate90_prob: float = 0.1
    shift_intensity_prob: float = 0.2
    shift_intensity_offset: float = 0.1
    augment: bool = True
    zoom_before_crop: bool = True

    def __post_init__(self) -> None:
        if int(self.num_samples) < 1:
            raise ValueError(f"num_samples must be at least 1; got {self.num_samples!r}")

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


def _crop_chain(config: SamplingConfig, lesions: bool, zoom: bool):
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
    samples = int(config.num_samples)
    zooms = config.augment and zoom and config.zoom_prob > 0
    chain: list = [SpatialPadd(keys=[*keys, "balance"], spatial_size=roi, mode="constant")]
    if zooms and config.zoom_before_crop:  # the whole case, so the crop balance follows the zoomed labels
        chain.append(RandZoomd(keys=[*keys, "balance"], prob=config.zoom_prob, min_zoom=config.zoom_range[0],
                               max_zoom=config.zoom_range[1], mode=("area", "nearest", "nearest", "nearest"),
                               keep_size=True))
    if lesions:
        chain.append(RandCropByLabelClassesd(keys=keys, label_key="balance", spatial_size=roi,
                                             ratios=list(config.lesion_ratios), num_classes=3, num_samples=samples,
                                             image_key="image", image_threshold=0.0, warn=False))
    else:
        chain.append(RandCropByPosNegLabeld(keys=keys, label_key="balance", spatial_size=roi, pos=config.pos,
                                            neg=config.neg, num_samples=samples, image_key="image", image_threshold=0.0))
    if zooms and not config.zoom_before_crop:
        chain.append(RandZoomd(keys=keys, prob=config.zoom_prob, min_zoom=config.zoom_range[0],
                               max_zoom=config.zoom_range[1], mode=("area", "nearest", "nearest"), keep_size=True))
    if config.augment:
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

    ``dataset[n]`` -> ``{"image": (S, 1, *roi) float32, "target": (S, K, *roi) uint8, "annotated": (S, K) bool,
    "dataset": (S,) int}`` with ``S = num_samples`` crops of one case; ``K`` = number of model channels and
    ``channel_classes[k]`` is the taxonomy index of channel ``k``. Unannotated channels have an all-zero target and ``annotated[k] = False``.
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
        self._chains: dict[tuple[bool, bool], Any] = {}

    def __len__(self) -> int:
        return 2**62  # indexed by sample number; the trainer decides how many it draws

    def _chain(self, lesions: bool, zoom: bool):
        if (lesions, zoom) not in self._chains:
            self._chains[lesions, zoom] = _crop_chain(self.config, lesions, zoom)
        return self._chains[lesions, zoom]

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
        lesions = spec.crops == "lesions"
        labels = case["labels"]
        balance = (labels > 0).to(torch.int16)  # 0 background, 1 labelled
        if lesions:  # 2 = lesion
            for lesion in (i for i in annotated if i in spec.taxonomy.indices and spec.taxonomy[i].is_lesion):
                balance = balance + (labels == lesion).to(torch.int16)
        data = {"image": case["image"], "labels": labels, "host": case["host"], "balance": balance}
        chain = self._chain(lesions, spec.zoom)
        chain.set_random_state(seed=int(rng.integers(2**31 - 1)))
        out = chain(data)
        crops = out if isinstance(out, list) else [out]
        wanted = [c for c in self.channel_classes if c in annotated]
        flags = torch.zeros(len(self.channel_classes), dtype=torch.bool)
        for k, c in enumerate(self.channel_classes):
            flags[k] = c in wanted
        images, targets = [], []
        for crop in crops:
            # Plain tensors from here: MetaTensor bookkeeping would slow every comparison below tenfold.
            image, crop_labels, crop_host = (_plain(crop[key]) for key in _KEYS)
            masks = class_masks_from_maps(crop_labels[0], crop_host[0], wanted, includes)
            target = torch.zeros((len(self.channel_classes), *crop_labels.shape[1:]), dtype=torch.uint8)
            for k, c in enumerate(self.channel_classes):
                if c in masks:
                    target[k] = masks[c].to(torch.uint8)
            images.append(image.float())
            targets.append(target)
        count = len(crops)
        return {"image": torch.stack(images), "target": torch.stack(targets),
                "annotated": flags.expand(count, -1).clone(), "dataset": torch.full((count,), dataset)}
