"""The CI-sized masked vs naive experiment (the paper's method against its baseline) on phantoms.

Three phantom datasets each label ONE organ (LiTS-like: liver; KiTS-like: kidneys; MSD-spleen-like:
spleen); the others are in the images but stored as background. The naive model is therefore told "no
liver" on two thirds of its samples and stops predicting it; masked back-propagation learns the liver from
the third that annotates it. This test can fail: if the loss masking were broken (or the naive baseline
silently masked too), the two models would be equal.
"""
from __future__ import annotations

from universalseg_training.experiment import markdown_table, masked_vs_naive


def test_masked_training_beats_naive_training_on_inconsistent_partial_labels(tmp_path):
    result = masked_vs_naive(tmp_path, datasets=("lits", "kits", "msd_spleen"), classes=("liver", "spleen", "kidneys"),
                             cases=2, steps=100, lr=3e-3, seed=0, eval_seeds=(1000, 1001, 1002))
    print("\n" + markdown_table(result))
    masked, naive = result.dice["masked"], result.dice["naive"]
    assert set(masked) == {"Liver", "Spleen", "Right Kidney", "Left Kidney"}
    # Every class is unannotated in two of the three datasets; the liver (largest) is learnt in 100 steps.
    assert masked["Liver"] > 0.5, masked
    assert result.margin("Liver") > 0.3, (masked, naive)
    assert sum(masked.values()) > sum(naive.values())
