"""Validation metrics: Dice and normalised surface Dice (MONAI), patient-level tumour detection.

Cases are evaluated on the training grid (the preprocessed cache), with the library's sliding-window
inference, for the classes annotated in each case only. Tumour detection follows the paper's Table 4
protocol: a patient is *positive* for a tumour class when the truth has any voxel of it, and *predicted
positive* when the prediction has at least ``min_lesion_voxels`` voxels of it; sensitivity and specificity
are counted over the cases whose dataset annotates that class.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from UniversalSegLib.inference import sliding_window_logits

from .assembly import class_masks_from_maps
from .preprocessing import CaseCache

__all__ = ["ValidationResult", "evaluate_cases", "dice_score", "surface_dice_score", "detection_summary"]


def dice_score(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two bool masks (MONAI ``compute_dice``); 1.0 when both are empty."""
    from monai.metrics import compute_dice

    # float32 copies made by NumPy: read-only masks (cached pipeline results) are fine.
    p = torch.from_numpy(np.asarray(prediction, dtype=np.float32).copy())[None, None]
    t = torch.from_numpy(np.asarray(truth, dtype=np.float32).copy())[None, None]
    value = compute_dice(p, t, include_background=True, ignore_empty=False)
    return float(value.item())


def surface_dice_score(prediction: np.ndarray, truth: np.ndarray, spacing: Sequence[float], tolerance_mm: float = 2.0) -> float:
    """Normalised surface Dice at ``tolerance_mm`` (MONAI ``compute_surface_dice``); 1.0 when both are empty."""
    from monai.metrics import compute_surface_dice

    prediction = np.asarray(prediction, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if not prediction.any() and not truth.any():
        return 1.0
    if not prediction.any() or not truth.any():
        return 0.0
    # MONAI wants one-hot (B, C, ...) with a background channel it can skip.
    p = torch.stack([torch.as_tensor(~prediction), torch.as_tensor(prediction)])[None].float()
    t = torch.stack([torch.as_tensor(~truth), torch.as_tensor(truth)])[None].float()
    value = compute_surface_dice(p, t, class_thresholds=[tolerance_mm], include_background=False,
                                 spacing=[float(s) for s in spacing])
    return float(value.item())


@dataclass
class ValidationResult:
    """Per-case, per-class scores and tumour detection counts."""

    dice: dict[int, list[float]] = field(default_factory=dict)
    nsd: dict[int, list[float]] = field(default_factory=dict)
    detection: dict[int, dict[str, int]] = field(default_factory=dict)
    cases: int = 0

    def mean_dice(self) -> dict[int, float]:
        return {k: float(np.mean(v)) for k, v in sorted(self.dice.items()) if v}

    def mean_nsd(self) -> dict[int, float]:
        return {k: float(np.mean(v)) for k, v in sorted(self.nsd.items()) if v}

    def summary(self) -> dict:
        dice = self.mean_dice()
        return {
            "cases": self.cases,
            "mean_dice": float(np.mean(list(dice.values()))) if dice else float("nan"),
            "dice": dice,
            "nsd": self.mean_nsd(),
            "detection": detection_summary(self.detection),
        }


def detection_summary(counts: dict[int, dict[str, int]]) -> dict[int, dict[str, float]]:
    """Sensitivity and specificity per tumour class from TP/FN/TN/FP counts (NaN when undefined)."""
    out = {}
    for index, c in sorted(counts.items()):
        positives, negatives = c["tp"] + c["fn"], c["tn"] + c["fp"]
        out[index] = {**c,
                      "sensitivity": c["tp"] / positives if positives else float("nan"),
                      "specificity": c["tn"] / negatives if negatives else float("nan")}
    return out


@torch.no_grad()
def evaluate_cases(model: torch.nn.Module, cache: CaseCache, channel_classes: Sequence[int],
                   roi_size: Sequence[int], device: torch.device | str = "cpu", overlap: float = 0.25,
                   indices: Sequence[int] | None = None, tolerance_mm: float = 2.0, min_lesion_voxels: int = 10,
                   autocast=None) -> ValidationResult:
    """Segment the cached cases with ``model`` and score the annotated classes."""
    import contextlib

    model_was_training = model.training
    model.eval()
    result = ValidationResult()
    channel_classes = [int(c) for c in channel_classes]
    for case_index in (range(len(cache)) if indices is None else indices):
        case = cache[case_index]
        annotated = [c for c in channel_classes if c in set(int(i) for i in case["annotated"])]
        if not annotated:
            continue
        channels = torch.as_tensor([channel_classes.index(c) for c in annotated], dtype=torch.long)
        spec = cache.specs[cache.items[case_index]["dataset_index"]]

        def predictor(window: torch.Tensor) -> torch.Tensor:
            with (autocast() if autocast is not None else contextlib.nullcontext()):
                return model(window.to(device), channels=channels).float()

        image = case["image"][None].float()
        logits = sliding_window_logits(image, predictor, roi_size=tuple(roi_size), overlap=overlap, device="cpu",
                                       sw_device=device, gaussian="current")
        predicted = (logits[0] > 0).numpy()  # sigmoid > 0.5
        truth = class_masks_from_maps(case["labels"][0].numpy(), case["host"][0].numpy(), annotated,
                                      {int(k): v for k, v in case["includes"].items()})
        spacing = np.linalg.norm(case["affine"].numpy()[:3, :3], axis=0)
        for k, index in enumerate(annotated):
            mask = truth[index]
            result.dice.setdefault(index, []).append(dice_score(predicted[k], mask))
            result.nsd.setdefault(index, []).append(surface_dice_score(predicted[k], mask, spacing, tolerance_mm))
            if index in spec.taxonomy.indices and spec.taxonomy[index].kind == "tumor":
                counts = result.detection.setdefault(index, {"tp": 0, "fn": 0, "tn": 0, "fp": 0})
                positive = bool(mask.any())
                called = int(predicted[k].sum()) >= min_lesion_voxels
                counts[("tp" if called else "fn") if positive else ("fp" if called else "tn")] += 1
        result.cases += 1
    model.train(model_was_training)
    return result
