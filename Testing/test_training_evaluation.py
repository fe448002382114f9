"""Validation metrics of the training package: Dice, normalised surface Dice, tumour detection."""
from __future__ import annotations

import math

import numpy as np

from universalseg_training.evaluation import ValidationResult, detection_summary, dice_score, surface_dice_score


def _cube(shape, start, size):
    mask = np.zeros(shape, bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


def test_dice_matches_its_definition_and_handles_empty_masks():
    a = _cube((20, 20, 20), (2, 2, 2), 10)
    b = _cube((20, 20, 20), (4, 2, 2), 10)  # overlap 8 x 10 x 10
    assert math.isclose(dice_score(a, b), 2 * 800 / 2000, rel_tol=1e-6)
    assert dice_score(a, a) == 1.0
    assert dice_score(np.zeros_like(a), np.zeros_like(a)) == 1.0
    assert dice_score(a, np.zeros_like(a)) == 0.0


def test_surface_dice_uses_millimetres():
    a = _cube((30, 30, 30), (5, 5, 5), 12)
    shifted = _cube((30, 30, 30), (6, 5, 5), 12)  # one voxel along i
    assert surface_dice_score(a, shifted, spacing=(1.0, 1.0, 1.0), tolerance_mm=2.0) == 1.0  # within 2 mm
    far = surface_dice_score(a, shifted, spacing=(4.0, 1.0, 1.0), tolerance_mm=2.0)  # the voxel is now 4 mm
    assert 0.0 < far < 1.0
    assert surface_dice_score(a, np.zeros_like(a), (1, 1, 1)) == 0.0
    assert surface_dice_score(np.zeros_like(a), np.zeros_like(a), (1, 1, 1)) == 1.0


def test_detection_summary():
    summary = detection_summary({27: {"tp": 3, "fn": 1, "tn": 4, "fp": 1}, 26: {"tp": 0, "fn": 0, "tn": 2, "fp": 0}})
    assert summary[27]["sensitivity"] == 0.75 and summary[27]["specificity"] == 0.8
    assert math.isnan(summary[26]["sensitivity"]) and summary[26]["specificity"] == 1.0


def _record(dataset, case, index, name, dice, truth, predicted, tumor=False):
    return {"dataset": dataset, "case_id": case, "class": index, "name": name, "tumor": tumor, "truth_voxels": truth,
            "predicted_voxels": predicted, "dice": dice, "nsd": dice}


def test_validation_tables_skip_empty_truth_and_merge_ranks():
    rank0 = ValidationResult([_record("lits", "a", 6, "Liver", 0.9, 500, 480),
                              _record("lits", "a", 27, "Liver Tumor", None, 0, 0, tumor=True)])
    rank1 = ValidationResult([_record("btcv", "b", 6, "Liver", 0.7, 400, 390),
                              _record("lits", "c", 27, "Liver Tumor", 0.4, 50, 30, tumor=True)])
    merged = ValidationResult.merged([rank1, rank0])
    assert [r["case_id"] for r in merged.records] == ["b", "a", "a", "c"]  # sorted by dataset, case, class
    summary = merged.summary()
    # Liver over both datasets; the tumour only where its truth is not empty (no free 1.0 for case a).
    assert summary["cases"] == 3 and math.isclose(summary["dice"][6], 0.8) and summary["dice"][27] == 0.4
    assert summary["datasets"]["lits"]["dice"] == {6: 0.9, 27: 0.4} and summary["datasets"]["btcv"]["cases"] == 1
    # Case a still counts for detection: a true negative (nothing predicted, nothing there).
    assert summary["detection"][27]["tn"] == 1 and summary["detection"][27]["tp"] == 1
    named = merged.named_summary()
    assert named["dice"] == {"Liver": summary["dice"][6], "Liver Tumor": 0.4}
    assert named["datasets"]["lits"]["dice"] == {"Liver": 0.9, "Liver Tumor": 0.4}
