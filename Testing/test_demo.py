"""The offline demo (UniversalSegLib.demo): fresh phantom -> demo model -> files + Dice against the truth."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from UniversalSegLib.checkpoints import load_checkpoint
from UniversalSegLib.demo import demo_checkpoint_path, run_demo, write_overlay_png
from UniversalSegLib.io import OutputExistsError


def test_demo_checkpoint_ships_in_the_package_and_is_small():
    path = demo_checkpoint_path()
    assert path.stat().st_size <= 15 * 2**20
    checkpoint = load_checkpoint(path)
    meta = checkpoint.metadata
    assert meta.provenance["phantom"]["shape"] == [96, 96, 96]
    assert "train_demo_model.py" in meta.provenance["command"]
    assert {"Liver", "Spleen", "Right Kidney", "Left Kidney"} <= {c.display_name for c in meta.classes}


def test_demo_segments_a_fresh_phantom_writes_all_outputs_and_scores_it(tmp_path):
    lines: list[str] = []
    result = run_demo(tmp_path / "demo", seed=7, threads=2, log=lines.append)
    assert result.seconds["segment"] < 120
    for key in ("ct", "seg_nrrd", "labels", "truth", "overlay", "dice"):
        assert result.files[key].is_file() and result.files[key].stat().st_size > 0, key
    assert result.files["overlay"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ct = nib.load(str(result.files["ct"]))
    labels = nib.load(str(result.files["labels"]))
    np.testing.assert_allclose(labels.affine, ct.affine)
    assert labels.shape == ct.shape == (96, 96, 96)
    report = json.loads(result.files["dice"].read_text())
    assert report["seed"] == 7 and report["dice"] == pytest.approx(result.dice)
    # The demo model segments the large organs of an unseen phantom well (measured: see README).
    assert result.dice["Liver"] > 0.8, result.dice
    assert result.mean_dice > 0.5, result.dice
    printed = "\n".join(lines)
    assert "seed 7" in printed and f"{result.dice['Liver']:5.3f}" in printed  # the per-class table was printed
    # Same seed, same phantom: nothing is overwritten without asking.
    with pytest.raises(OutputExistsError):
        run_demo(tmp_path / "demo", seed=7, log=None)


def test_overlay_png_draws_labels_in_colour(tmp_path):
    image = np.full((20, 16, 12), -100, np.int16)
    labels = np.zeros(image.shape, np.uint8)
    labels[5:10, 4:9, 3:9] = 6
    affine = np.diag([-2.0, -2.0, 3.0, 1.0])
    path = write_overlay_png(tmp_path / "o.png", image, affine, labels, {6: (221, 130, 101)})
    from matplotlib.image import imread

    pixels = imread(str(path))
    reddish = (pixels[..., 0] > pixels[..., 2] + 0.1).sum()
    assert reddish > 50  # the liver colour is visible on the grey CT
