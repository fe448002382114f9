"""The pipeline on the shared real CT with a small seeded model: geometry under every storage orientation,
class subsets, statistics, progress, cancellation, cached probabilities."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from conftest import require_shared, small_checkpoint
from UniversalSegLib.inference import InferenceCancelled
from UniversalSegLib.io import Volume, read_volume
from UniversalSegLib.pipeline import STAGES, Segmenter

CLASSES = "liver, spleen, kidneys, aorta, liver tumor"


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    return Segmenter(small_checkpoint(tmp_path_factory.mktemp("m") / "small.safetensors"), device="cpu")


@pytest.fixture(scope="module")
def ct():
    return read_volume(require_shared("data/totalsegmentator/example_ct.nii.gz"))


@pytest.fixture(scope="module")
def baseline(segmenter, ct):
    return segmenter.segment(ct, CLASSES)


def _flip(matrix_axis, shape):
    """Affine of flipping voxel axis `matrix_axis` of an array of `shape`."""
    f = np.eye(4)
    f[matrix_axis, matrix_axis] = -1
    f[matrix_axis, 3] = shape[matrix_axis] - 1
    return f


def _variants(ct):
    """The same CT stored in other voxel orders: (name, volume, function mapping its arrays back to ct's order)."""
    a, A = np.asarray(ct.array), ct.affine
    out = []
    # Flip of the first axis (x stored right-to-left).
    out.append(("flip-i", a[::-1], A @ _flip(0, a.shape), lambda m: m[::-1]))
    # LPS storage: first two axes reversed.
    out.append(("lps", a[::-1, ::-1], A @ _flip(0, a.shape) @ _flip(1, a.shape), lambda m: m[::-1, ::-1]))
    # Left-handed storage (det < 0): only the slice axis reversed.
    out.append(("left-handed", a[:, :, ::-1], A @ _flip(2, a.shape), lambda m: m[:, :, ::-1]))
    # Permuted axes (k, i, j).
    perm = np.eye(4)[[2, 0, 1, 3]].T  # new index (k,i,j) -> old (i,j,k)
    out.append(("permuted", np.transpose(a, (2, 0, 1)), A @ perm, lambda m: np.transpose(m, (1, 2, 0))))
    return out


@pytest.mark.parametrize("variant", range(4))
def test_output_follows_input_storage(segmenter, ct, baseline, variant, tmp_path):
    name, array, affine, back = _variants(ct)[variant]
    # Through a real file, so that the reader's handling of the header is part of the test.
    nib.save(nib.Nifti1Image(np.ascontiguousarray(array), affine), tmp_path / f"{name}.nii.gz")
    volume = read_volume(tmp_path / f"{name}.nii.gz")
    np.testing.assert_allclose(volume.affine, affine, atol=1e-5)
    result = segmenter.segment(volume, CLASSES)
    for index, mask in result.masks.items():
        assert mask.shape == volume.shape
        agreement = np.mean(back(mask) == baseline.masks[index])
        assert agreement >= 0.995, (name, index, agreement)


def test_oblique_direction_keeps_voxel_correspondence(segmenter, ct, baseline):
    # Same voxels, rotated world frame: the output lies on the same voxel grid with the same affine.
    angle = np.deg2rad(12.0)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    volume = Volume(ct.array, rot @ ct.affine, ct.source, ct.format)
    result = segmenter.segment(volume, CLASSES)
    for index, mask in result.masks.items():
        assert np.mean(mask == baseline.masks[index]) >= 0.995


def test_subset_equals_same_classes_of_larger_request(segmenter, ct, baseline):
    subset = segmenter.segment(ct, "liver tumor, spleen")
    assert [c.index for c in subset.classes] == [1, 27]
    for index in (1, 27):
        assert np.array_equal(subset.masks[index], baseline.masks[index])


def test_statistics_match_masks(ct, baseline):
    voxel_ml = 27.0 / 1000.0  # 3 mm isotropic
    for row in baseline.statistics():
        mask = baseline.masks[row.index]
        assert row.voxels == int(mask.sum())
        assert row.volume_ml == pytest.approx(row.voxels * voxel_ml)
        if row.voxels:
            assert row.mean_hu == pytest.approx(float(ct.array[mask].mean()))
    summary = baseline.summary()
    assert [c["name"] for c in summary["classes"]] == ["Spleen", "Right Kidney", "Left Kidney", "Liver", "Aorta", "Liver Tumor"]
    assert set(summary["timings_s"]) == set(STAGES)


def test_progress_and_cancel(segmenter, ct):
    seen = []
    segmenter.segment(ct, "liver", progress=lambda stage, f: seen.append((stage, f)))
    stages = [s for s, _ in seen]
    assert [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s] == list(STAGES)
    assert ("inference", 1.0) in seen
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(InferenceCancelled):
        segmenter.segment(ct, "liver", cancel=cancel)


def test_probabilities_cached_on_request(segmenter, ct):
    result = segmenter.segment(ct, CLASSES, keep_probabilities=True)
    assert set(result.probabilities) == {c.index for c in result.classes}
    checked = 0
    for index, prob in result.probabilities.items():
        assert prob.dtype == np.uint8 and prob.shape == result.preprocessed.shape
        # These classes' post-processing only removes voxels, so every voxel of a final mask has p > 0.5.
        mask = result.masks[index]
        if mask.any():
            assert (result.preprocessed.to_source_grid(prob)[mask] >= 128).all()
            assert (prob < 128).any()
            checked += 1
    assert checked >= 2


def test_thread_count_applies_during_the_run_and_is_restored(tmp_path):
    """PyTorch's thread count is process-wide (Slicer shares it): a run uses its own and gives it back."""
    import torch

    checkpoint = small_checkpoint(tmp_path / "small.safetensors")
    image = np.full((24, 24, 24), -1000, np.int16)
    image[4:20, 4:20, 4:20] = 40
    volume = Volume(image, np.diag([5.0, 5.0, 5.0, 1.0]), "cube.nii.gz", "nifti")
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    segmenter = Segmenter(checkpoint, device="cpu", threads=wanted)
    assert torch.get_num_threads() == before  # making a segmenter changes nothing
    seen = set()
    segmenter.segment(volume, "liver", progress=lambda stage, fraction: seen.add(torch.get_num_threads()))
    assert seen == {wanted} and torch.get_num_threads() == before


def test_monai_comes_without_torchvision():
    """The library imports MONAI with torchvision hidden (its torchvision modules are unused here and cost
    about 160 MB of memory per process); torchvision itself still imports afterwards (open_clip needs it)."""
    import subprocess
    import sys

    code = ("import importlib.util, sys\n"
            "import UniversalSegLib.pipeline, monai.networks.nets\n"
            "assert 'torchvision' not in sys.modules and 'torch._dynamo' not in sys.modules, 'loaded'\n"
            "if importlib.util.find_spec('torchvision'):\n"
            "    import torchvision.models\n"
            "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
