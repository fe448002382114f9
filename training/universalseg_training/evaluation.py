"""Validation: Dice and normalised surface Dice (MONAI), patient-level tumour detection, per case and dataset.

Cases are evaluated on the training grid (the preprocessed cache) with the library's sliding-window
inference, for the classes annotated in each case only, so that the numbers mean what the paper's mean:

* ``postprocess``: ``"fixed"`` or ``"official"`` runs the library's post-processing
  (:func:`UniversalSegLib.postprocess.postprocess_masks`, the rules ``universalseg segment`` applies; its
  default mode is ``fixed``) on the thresholded masks before scoring; ``"none"`` scores the raw threshold.
* A (case, class) pair is scored only when the case annotates the class AND its truth is not empty, as
  the official evaluation does: an empty truth has no Dice (empty-vs-empty would be a free 1.0, one false
  voxel a 0.0). Such pairs still count for tumour detection.
* Tumour detection follows the paper's Table 4 protocol: a patient is *positive* for a tumour class when the
  truth has any voxel of it, and *predicted positive* when the prediction has at least
  ``min_lesion_voxels`` voxels of it; sensitivity and specificity are counted over the cases that annotate
  that class.

The result keeps one record per scored (case, class) pair; records from several processes are simply
concatenated (:meth:`ValidationResult.merged`), and every table is computed from them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch

from UniversalSegLib.helpers import dice_score
from UniversalSegLib.inference import sliding_window_logits
from UniversalSegLib.postprocess import MissingInputError, postprocess_masks, required_classes

from .assembly import class_masks_from_maps
from .preprocessing import CaseCache

__all__ = ["ValidationResult", "evaluate_cases", "dice_score", "surface_dice_score", "detection_summary",
           "POSTPROCESS_MODES"]

POSTPROCESS_MODES = ("none", "fixed", "official")


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


def detection_summary(counts: dict[int, dict[str, int]]) -> dict[int, dict[str, float]]:
    """Sensitivity and specificity per tumour class from TP/FN/TN/FP counts (NaN when undefined)."""
    out = {}
    for index, c in sorted(counts.items()):
        positives, negatives = c["tp"] + c["fn"], c["tn"] + c["fp"]
        out[index] = {**c,
                      "sensitivity": c["tp"] / positives if positives else float("nan"),
                      "specificity": c["tn"] / negatives if negatives else float("nan")}
    return out


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


@dataclass
class ValidationResult:
    """One record per evaluated (case, annotated class) pair; tables are computed from the records.

    A record: ``dataset``, ``case_id``, ``class`` (taxonomy index), ``name``, ``tumor`` (bool),
    ``truth_voxels``, ``predicted_voxels``, ``dice`` and ``nsd`` (None when the truth is empty).
    """

    records: list[dict] = field(default_factory=list)
    min_lesion_voxels: int = 10

    @classmethod
    def merged(cls, parts: Sequence["ValidationResult"]) -> "ValidationResult":
        records = [r for part in parts for r in part.records]
        records.sort(key=lambda r: (r["dataset"], r["case_id"], r["class"]))
        return cls(records, parts[0].min_lesion_voxels if parts else 10)

    @property
    def cases(self) -> int:
        return len({(r["dataset"], r["case_id"]) for r in self.records})

    def _scored(self, dataset: str | None = None) -> list[dict]:
        return [r for r in self.records if r["dice"] is not None and (dataset is None or r["dataset"] == dataset)]

    def mean_dice(self, dataset: str | None = None) -> dict[int, float]:
        by_class: dict[int, list[float]] = {}
        for r in self._scored(dataset):
            by_class.setdefault(r["class"], []).append(r["dice"])
        return {k: _mean(v) for k, v in sorted(by_class.items())}

    def mean_nsd(self, dataset: str | None = None) -> dict[int, float]:
        by_class: dict[int, list[float]] = {}
        for r in self._scored(dataset):
            by_class.setdefault(r["class"], []).append(r["nsd"])
        return {k: _mean(v) for k, v in sorted(by_class.items())}

    def detection(self) -> dict[int, dict[str, int]]:
        counts: dict[int, dict[str, int]] = {}
        for r in self.records:
            if not r["tumor"]:
                continue
            c = counts.setdefault(r["class"], {"tp": 0, "fn": 0, "tn": 0, "fp": 0})
            called = r["predicted_voxels"] >= self.min_lesion_voxels
            c[("tp" if called else "fn") if r["truth_voxels"] > 0 else ("fp" if called else "tn")] += 1
        return counts

    def names(self) -> dict[int, str]:
        return {r["class"]: r["name"] for r in self.records}

    def summary(self) -> dict:
        """Pooled tables (keyed by class index) plus one table per dataset."""
        dice = self.mean_dice()
        datasets = {}
        for name in sorted({r["dataset"] for r in self.records}):
            per_class = self.mean_dice(name)
            datasets[name] = {"cases": len({r["case_id"] for r in self.records if r["dataset"] == name}),
                              "mean_dice": _mean(list(per_class.values())), "dice": per_class,
                              "nsd": self.mean_nsd(name)}
        return {"cases": self.cases, "mean_dice": _mean(list(dice.values())), "dice": dice, "nsd": self.mean_nsd(),
                "detection": detection_summary(self.detection()), "datasets": datasets}

    def named_summary(self) -> dict:
        """:meth:`summary` with class names instead of indices (for printing and summary.json)."""
        names = self.names()
        summary = self.summary()

        def rename(table: Mapping[int, object]) -> dict:
            return {names.get(k, str(k)): v for k, v in table.items()}

        out = {**summary, "dice": rename(summary["dice"]), "nsd": rename(summary["nsd"]),
               "detection": rename(summary["detection"])}
        out["datasets"] = {d: {**t, "dice": rename(t["dice"]), "nsd": rename(t["nsd"])}
                           for d, t in summary["datasets"].items()}
        return out


def _postprocessed(raw: dict[int, np.ndarray], classes: list[int], mode: str) -> dict[int, np.ndarray]:
    """The library's post-processing of ``classes``; a class whose rule reads a class the model lacks keeps
    its thresholded mask (what ``universalseg segment`` does for such checkpoints)."""
    try:
        return postprocess_masks(raw, classes, mode=mode)
    except MissingInputError:
        cleaned = {}
        for index in classes:
            try:
                cleaned.update(postprocess_masks(raw, [index], mode=mode))
            except MissingInputError:
                cleaned[index] = raw[index]
        return cleaned


@torch.no_grad()
def evaluate_cases(model: torch.nn.Module, cache: CaseCache, channel_classes: Sequence[int],
                   roi_size: Sequence[int], device: torch.device | str = "cpu", overlap: float = 0.25,
                   indices: Sequence[int] | None = None, tolerance_mm: float = 2.0, min_lesion_voxels: int = 10,
                   autocast=None, postprocess: str = "fixed", class_names: Mapping[int, str] | None = None) -> ValidationResult:
    """Segment the cached cases ``indices`` (default all) with ``model`` and score the annotated classes."""
    if postprocess not in POSTPROCESS_MODES:
        raise ValueError(f"postprocess must be one of {', '.join(POSTPROCESS_MODES)}; got {postprocess!r}")
    model_was_training = model.training
    model.eval()
    result = ValidationResult(min_lesion_voxels=min_lesion_voxels)
    channel_classes = [int(c) for c in channel_classes]
    for case_index in (range(len(cache)) if indices is None else indices):
        case = cache[case_index]
        annotated = [c for c in channel_classes if c in set(int(i) for i in case["annotated"])]
        if not annotated:
            continue
        spec = cache.specs[cache.items[case_index]["dataset_index"]]
        needed = annotated if postprocess == "none" else \
            [c for c in required_classes(annotated, postprocess) if c in channel_classes]
        channels = torch.as_tensor([channel_classes.index(c) for c in needed], dtype=torch.long)

        def predictor(window: torch.Tensor) -> torch.Tensor:
            with (autocast() if autocast is not None else contextlib.nullcontext()):
                return model(window.to(device), channels=channels).float()

        image = case["image"][None].float()
        logits = sliding_window_logits(image, predictor, roi_size=tuple(roi_size), overlap=overlap, device="cpu",
                                       sw_device=device, gaussian="current")
        raw = {c: (logits[0, k] > 0).numpy() for k, c in enumerate(needed)}  # sigmoid > 0.5
        predicted = raw if postprocess == "none" else _postprocessed(raw, annotated, postprocess)
        truth = class_masks_from_maps(case["labels"][0].numpy(), case["host"][0].numpy(), annotated,
                                      {int(k): v for k, v in case["includes"].items()})
        spacing = np.linalg.norm(case["affine"].numpy()[:3, :3], axis=0)
        for index in annotated:
            mask, guess = truth[index], predicted[index]
            empty = not mask.any()
            info = spec.taxonomy[index] if index in spec.taxonomy.indices else None
            result.records.append({
                "dataset": spec.name, "case_id": str(case["case_id"]), "class": index,
                "name": (class_names or {}).get(index) or (info.display_name if info else str(index)),
                "tumor": bool(info is not None and info.kind == "tumor"),
                "truth_voxels": int(mask.sum()), "predicted_voxels": int(guess.sum()),
                "dice": None if empty else dice_score(guess, mask),
                "nsd": None if empty else surface_dice_score(guess, mask, spacing, tolerance_mm),
            })
    model.train(model_was_training)
    return result
