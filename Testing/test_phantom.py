"""The procedural abdominal CT phantom (UniversalSegLib.phantom)."""
from __future__ import annotations

import time

import nibabel as nib
import numpy as np
import pytest

from UniversalSegLib.phantom import (
    PHANTOM_DATASETS,
    generate_phantom,
    phantom_affine,
    phantom_dataset_spec,
    phantom_raw_labels,
)
from UniversalSegLib.taxonomy import get_taxonomy


def _centroid_ras(phantom, index) -> np.ndarray:
    ijk = np.argwhere(phantom.masks[index]).mean(axis=0)
    return (phantom.affine @ np.append(ijk, 1.0))[:3]


def test_same_seed_same_phantom_other_seed_other_phantom():
    a, b, c = generate_phantom(11), generate_phantom(11), generate_phantom(12)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.affine, b.affine)
    assert all(np.array_equal(a.masks[i], b.masks[i]) for i in a.masks)
    assert not np.array_equal(a.image, c.image)
    assert a.seed == 11 and a.image.dtype == np.int16 and a.image.shape == (96, 96, 96)


def test_generation_is_fast():
    generate_phantom(0)  # warm-up (imports)
    start = time.perf_counter()
    generate_phantom(1)
    assert time.perf_counter() - start < 2.5  # ~0.5 s on an idle core


@pytest.mark.parametrize("orientation", ["LPS", "RAS", "SRA", "random"])
def test_anatomy_sits_on_the_correct_patient_side_in_any_grid_orientation(orientation):
    phantom = generate_phantom(3, orientation=orientation)
    if orientation != "random":
        assert "".join(nib.aff2axcodes(phantom.affine)) == orientation
    right, left = 0, 0  # RAS x grows towards the patient's right
    assert _centroid_ras(phantom, 6)[right] > _centroid_ras(phantom, 1)[left]  # liver right, spleen left
    assert _centroid_ras(phantom, 2)[0] > 20 > -20 > _centroid_ras(phantom, 3)[0]  # right / left kidney
    assert _centroid_ras(phantom, 16)[0] > _centroid_ras(phantom, 17)[0]  # right / left lung
    assert _centroid_ras(phantom, 24)[0] > _centroid_ras(phantom, 23)[0]  # right / left femoral head
    assert _centroid_ras(phantom, 12)[0] > _centroid_ras(phantom, 13)[0]  # right / left adrenal
    # Lungs above the liver above the kidneys above the bladder (S = +z).
    z = {i: _centroid_ras(phantom, i)[2] for i in (16, 6, 2, 21)}
    assert z[16] > z[6] > z[2] > z[21]
    # Aorta behind the pancreas (A = +y), spine behind both.
    assert _centroid_ras(phantom, 11)[1] > _centroid_ras(phantom, 8)[1]


def test_intensities_and_sizes_are_plausible():
    for seed in (0, 1, 2):
        p = generate_phantom(seed)
        present = set(p.present)
        assert set(range(1, 22)) | {23, 24, 25} <= present  # every organ/vessel except maybe the prostate
        mean = {i: float(p.image[p.masks[i]].mean()) for i in present}
        assert mean[16] < -600 and mean[17] < -600  # lungs
        assert 30 < mean[6] < 160  # liver (non-contrast to portal venous)
        assert mean[23] > 200 and mean[24] > 200  # bone
        assert mean[21] < 40  # urine
        ml = {i: p.masks[i].sum() * abs(np.linalg.det(p.affine[:3, :3])) / 1000 for i in present}
        assert 500 < ml[6] < 2500 and 40 < ml[2] < 250 and 50 < ml[1] < 400


def test_lesions_lie_inside_their_organs_and_organs_include_them():
    seen = set()
    for seed in range(6):
        p = generate_phantom(seed, lesion_probability=0.9)
        m = p.masks
        for lesion, organs in ((27, [6]), (28, [11]), (31, [18]), (30, [16, 17]), (26, [2, 3]), (32, [2, 3]), (29, [15])):
            if m[lesion].any():
                seen.add(lesion)
                union = np.logical_or.reduce([m[o] for o in organs])
                assert not (m[lesion] & ~union).any(), f"lesion {lesion} not inside its organ (seed {seed})"
        assert not (m[29] & ~m[6]).any()
        assert not (m[15] & ~m[6]).any()  # hepatic vessels run inside the liver
    assert seen == {26, 27, 28, 29, 30, 31, 32}
    clean = generate_phantom(0, lesion_probability=0.0)
    assert not any(clean.masks[i].any() for i in range(26, 33))


def test_label_map_and_dataset_label_maps_leave_unlabelled_organs_as_background():
    p = generate_phantom(8, lesion_probability=1.0)
    labels = p.label_map()
    assert set(np.unique(labels)) <= set(range(33))
    assert np.all(labels[p.masks[27]] == 27)  # lesion over organ
    kits = phantom_raw_labels(p, "kits")
    assert set(np.unique(kits)) <= {0, 1, 2, 3}
    kidneys = p.masks[2] | p.masks[3]
    np.testing.assert_array_equal(kits > 0, kidneys)  # kidneys include their lesions
    np.testing.assert_array_equal(kits == 3, p.masks[32])  # equal priority: the later value (cyst) wins
    np.testing.assert_array_equal(kits == 2, p.masks[26] & ~p.masks[32])
    assert (kits == 2).any() and (kits == 3).any()
    assert np.all(kits[p.masks[6] & ~kidneys] == 0)  # the liver is not labelled in KiTS: background
    lits = phantom_raw_labels(p, "lits")
    np.testing.assert_array_equal(lits > 0, p.masks[6])
    np.testing.assert_array_equal(lits == 2, p.masks[27])
    ctorg = phantom_raw_labels(p, "ctorg")
    np.testing.assert_array_equal(ctorg == 3, (p.masks[16] | p.masks[17]) & ~(ctorg == 5))
    assert (ctorg == 5).sum() > 1000  # bone is labelled in CT-ORG
    spec = phantom_dataset_spec("ctorg")
    assert spec["labels"][5] is None and spec["labels"][3] == "lung"
    taxonomy = get_taxonomy()
    for name, definition in PHANTOM_DATASETS.items():  # every label name resolves in the taxonomy
        for value, target in definition["labels"].items():
            assert target in ("bone", "heart") or taxonomy.resolve(target)


def test_phantom_affine_rejects_bad_orientation_and_centres_the_grid():
    affine = phantom_affine((10, 20, 30), (1.0, 2.0, 3.0), "RAS", center=(5, 6, 7))
    np.testing.assert_allclose(affine @ [4.5, 9.5, 14.5, 1], [5, 6, 7, 1])
    with pytest.raises(ValueError, match="orientation"):
        phantom_affine((10, 10, 10), (1, 1, 1), "RRS")
