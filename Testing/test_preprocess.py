"""Preprocessing (orientation, 1.5 mm resampling, HU window, crop to the body) and its inverse onto the
input grid.

Checked against the official pipeline's outputs on the phantom (reference/fixture/preproc_phantom.*), against
MONAI's own ``Invertd`` on tie-heavy synthetic grids, and by round trips of analytic label volumes through
flipped, permuted, left-handed and oblique input geometries.
"""
from __future__ import annotations

import copy
import dataclasses
import json

import nibabel as nib
import numpy as np
import pytest

from conftest import require_shared
from UniversalSegLib.preprocess import (
    InvalidImageError,
    PreprocessingParameters,
    preprocess,
    to_source_grid,
)

# ------------------------------------------------------------------------------------------------ helpers


def _unpack(packed: np.ndarray, shape) -> np.ndarray:
    return np.unpackbits(packed, count=int(np.prod(shape))).reshape(tuple(int(n) for n in shape)).astype(bool)


def _rotation(z_deg: float, x_deg: float) -> np.ndarray:
    cz, sz = np.cos(np.radians(z_deg)), np.sin(np.radians(z_deg))
    cx, sx = np.cos(np.radians(x_deg)), np.sin(np.radians(x_deg))
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return rz @ rx


def _centred_affine(shape, spacing, rotation=np.eye(3)) -> np.ndarray:
    """IJK->RAS affine with the volume centre at the world origin."""
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return affine


def _restore(array: np.ndarray, affine: np.ndarray, flips=(), perm=(0, 1, 2)):
    """The same voxels stored differently: flip the given axes, then permute (new axis k = old axis perm[k])."""
    new_affine = affine.copy()
    for axis in flips:
        flip = np.eye(4)
        flip[axis, axis] = -1
        flip[axis, 3] = array.shape[axis] - 1
        new_affine = new_affine @ flip
    new_array = np.flip(array, axis=tuple(flips)) if flips else array
    new_array = np.ascontiguousarray(np.transpose(new_array, perm))
    new_affine = new_affine[:, [perm[0], perm[1], perm[2], 3]]
    return new_array, new_affine


def _world(affine: np.ndarray, shape) -> np.ndarray:
    """(3, X, Y, Z) RAS position of every voxel centre."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
    return np.einsum("ab,bxyz->axyz", affine[:3, :3], ijk) + affine[:3, 3, None, None, None]


def _phantom_ct(affine: np.ndarray, shape, body_radii=(48.0, 40.0)) -> np.ndarray:
    """HU volume defined in world coordinates: air, an elliptic body (40 HU) with a brighter 'organ'."""
    x, y, z = _world(affine, shape)
    body = (x / body_radii[0]) ** 2 + (y / body_radii[1]) ** 2 <= 1.0
    organ = (x - 8) ** 2 + (y + 2) ** 2 + (z - 3) ** 2 <= 10.0**2
    hu = np.where(body, 40.0, -1000.0) + np.where(organ, 120.0, 0.0) + 3.0 * np.sin(x / 7.0) * np.cos(z / 5.0)
    return hu.astype(np.int16)


def _world_labels(affine: np.ndarray, shape) -> np.ndarray:
    """Blocky label map (uint8) defined in world coordinates, inside the body: a box, a sphere, a slab, a rod
    (8-60 mm). Nearest-neighbour round trips through a 1.5 mm grid misplace boundaries by up to 0.75 mm (about
    0.3 mm on average), so agreement is bounded by the boundary-to-volume ratio of these shapes (~99.7 %)."""
    x, y, z = _world(affine, shape)
    labels = np.zeros(shape, np.uint8)
    labels[(np.abs(x + 14) <= 15) & (np.abs(y - 4) <= 12) & (np.abs(z) <= 15)] = 1
    labels[(x - 18) ** 2 + (y + 6) ** 2 + (z - 4) ** 2 <= 13.0**2] = 2
    labels[(np.abs(z + 30) <= 4) & (np.abs(x) <= 20) & (np.abs(y) <= 15)] = 3
    labels[((x - 5) ** 2 + (y - 22) ** 2 <= 6.0**2) & (np.abs(z) <= 20)] = 4
    return labels


# Source spacings for which no source voxel centre falls exactly halfway between two 1.5 mm voxel centres,
# so that any two correct nearest-neighbour inversions must agree voxel for voxel.
SHAPE = (120, 100, 48)  # 108 x 110 x 96 mm
SPACING = (0.9, 1.1, 2.0)
GEOMETRIES = {
    "ras": dict(rotation=np.eye(3), flips=(), perm=(0, 1, 2)),
    "lps": dict(rotation=np.eye(3), flips=(0, 1), perm=(0, 1, 2)),
    "left_handed": dict(rotation=np.eye(3), flips=(0,), perm=(0, 1, 2)),
    "permuted_flipped": dict(rotation=np.eye(3), flips=(1, 2), perm=(2, 0, 1)),
    "oblique": dict(rotation=_rotation(20, 12), flips=(), perm=(0, 1, 2)),
    "oblique_lps_permuted": dict(rotation=_rotation(20, 12), flips=(0, 1), perm=(1, 2, 0)),
}


def _stored_image(name: str):
    g = GEOMETRIES[name]
    base_affine = _centred_affine(SHAPE, SPACING, g["rotation"])
    array, affine = _restore(_phantom_ct(base_affine, SHAPE), base_affine, g["flips"], g["perm"])
    return array, affine


@pytest.fixture(scope="module")
def fixture_phantom():
    """Official preprocessing results of the phantom plus our preprocessing of the same file."""
    path = require_shared("reference/fixture/preproc_phantom.npz")
    expected = dict(np.load(path))
    summary = json.loads(require_shared("reference/fixture/preproc_phantom.json").read_text())
    image = nib.load(require_shared("reference/fixture/phantom_ct.nii.gz"))
    prep = preprocess(np.asarray(image.dataobj), image.affine)
    return expected, summary, image, prep


# ------------------------------------------------------------------------------- official phantom fixture


def test_phantom_array_matches_official_preprocessing(fixture_phantom):
    expected, _, _, prep = fixture_phantom
    assert prep.array.dtype == np.float32
    assert prep.array.shape == expected["preprocessed"].shape == (74, 57, 116)
    # MONAI 0.9.0 (the official pin) and 1.6.1 resample to within 6.1e-6 of each other.
    np.testing.assert_allclose(prep.array, expected["preprocessed"], rtol=0, atol=1e-5)
    assert prep.array.min() == 0.0 and prep.array.max() == 1.0


def test_phantom_geometry_matches_official_preprocessing(fixture_phantom):
    expected, summary, image, prep = fixture_phantom
    steps = {s["transform"]: s for s in summary["steps_monai090"]}
    assert prep.source_shape == (150, 130, 70)
    np.testing.assert_array_equal(prep.source_affine, image.affine)
    np.testing.assert_allclose(prep.oriented_affine, expected["affine_after_orientation"], atol=1e-5)
    np.testing.assert_allclose(prep.oriented_affine, steps["Orientationd"]["affine"], atol=1e-5)
    assert prep.resampled_shape == tuple(steps["Spacingd"]["shape"][1:]) == (80, 70, 116)
    np.testing.assert_allclose(prep.resampled_affine, expected["affine_after_spacing"], atol=1e-5)
    assert prep.crop_start == tuple(expected["crop_box_start"]) == (3, 4, 0)
    assert prep.crop_end == tuple(expected["crop_box_end"]) == (77, 61, 116)
    np.testing.assert_allclose(prep.affine, expected["affine_after_crop_monai1x"], atol=1e-5)
    assert prep.spacing == (1.5, 1.5, 1.5)


def _fixture_inversion_inputs(expected):
    """The two preprocessed-grid arrays the official inversion was run on (channel 0 and channel 5)."""
    ch0 = _unpack(expected["inv_input_results_ch0"], (74, 57, 116))
    ch5 = np.zeros_like(ch0)
    box = expected["inv_input_results_ch5_box"]
    ch5[box[0, 0] : box[0, 1], box[1, 0] : box[1, 1], box[2, 0] : box[2, 1]] = True
    shape = tuple(expected["inverted_shape"])
    return ch0, ch5, _unpack(expected["inverted_ch0"], shape), _unpack(expected["inverted_ch5"], shape)


def test_phantom_inversion_matches_official_exactly(fixture_phantom):
    expected, summary, _, prep = fixture_phantom
    ch0, ch5, want0, want5 = _fixture_inversion_inputs(expected)
    official_files = summary["saved_by_official_save_results"]["monai_0.9.0"]
    assert want0.sum() == official_files["phantom_ct/phantom_ct_Spleen.nii.gz"]["sum"]
    assert want5.sum() == official_files["phantom_ct/phantom_ct_Liver.nii.gz"]["sum"]

    got0, got5 = to_source_grid(ch0, prep), to_source_grid(ch5, prep)
    assert got0.dtype == bool and got0.shape == prep.source_shape
    np.testing.assert_array_equal(got0, want0)
    np.testing.assert_array_equal(got5, want5)
    # The same masks laid out in Fortran order (the memory order of nibabel volumes).
    fortran = to_source_grid(ch0, prep, order="F")
    assert fortran.flags.f_contiguous and not fortran.flags.c_contiguous and fortran.dtype == bool
    np.testing.assert_array_equal(fortran, want0)

    # The same through a (C, X, Y, Z) stack and through a uint8 label map.
    stack = to_source_grid(np.stack([ch0, ch5]), prep)
    np.testing.assert_array_equal(stack[0], want0)
    np.testing.assert_array_equal(stack[1], want5)
    labels = to_source_grid(np.where(ch5, 6, np.where(ch0, 1, 0)).astype(np.uint8), prep)
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels == 6, want5)
    np.testing.assert_array_equal(labels == 1, want0 & ~want5)


# ------------------------------------------------------------------ MONAI Invertd reference on tie-heavy grids


def _monai_reference(array, affine, labels_on_prep):
    """The official chain as MONAI dict transforms, inverted with Invertd(nearest_interp=True)."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Compose, CropForegroundd, Invertd, Orientationd, ScaleIntensityRanged, Spacingd

    chain = Compose(
        [
            Orientationd("image", axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            Spacingd("image", pixdim=(1.5, 1.5, 1.5), mode="bilinear"),
            ScaleIntensityRanged("image", a_min=-175, a_max=250, b_min=0.0, b_max=1.0, clip=True),
            CropForegroundd("image", source_key="image", allow_smaller=True),
        ]
    )
    source = MetaTensor(torch.from_numpy(array.astype(np.float32)[None]), affine=torch.as_tensor(affine))
    image = chain({"image": source})["image"]
    pred = MetaTensor(torch.from_numpy(labels_on_prep.astype(np.float32)[None]), affine=image.affine.clone())
    pred.applied_operations = copy.deepcopy(image.applied_operations)
    inverted = Invertd("pred", transform=chain, orig_keys="image", nearest_interp=True)({"pred": pred, "image": image})
    return image[0].numpy(), inverted["pred"][0].numpy()


@pytest.mark.parametrize(
    "spacing, flips, perm",
    [
        ((0.75, 0.75, 1.25), (0, 1), (0, 1, 2)),  # every other voxel lies exactly halfway
        ((2.25, 0.8, 3.0), (), (2, 0, 1)),
        ((1.25, 0.75, 2.25), (2,), (1, 0, 2)),
    ],
)
def test_inversion_equals_monai_invertd_including_ties(spacing, flips, perm):
    rng = np.random.default_rng(7)
    shape = (56, 44, 20)
    base_affine = _centred_affine(shape, spacing)
    base_affine[:3, 3] += rng.uniform(-3, 3, 3).astype(np.float32)  # unround origin as in real headers
    array, affine = _restore(_phantom_ct(base_affine, shape, body_radii=(15.0, 12.0)), base_affine, flips, perm)
    prep = preprocess(array, affine)
    assert prep.crop_start != (0, 0, 0) or prep.crop_end != prep.resampled_shape  # the crop is exercised
    labels = rng.random(prep.shape) > 0.5  # a boundary at every voxel: any index error shows
    reference_array, reference_inverse = _monai_reference(array, affine, labels)
    np.testing.assert_allclose(prep.array, reference_array, atol=1e-6)
    np.testing.assert_array_equal(to_source_grid(labels, prep), reference_inverse.astype(bool))


# ---------------------------------------------------------------------------- geometry round trips


def _nearest_lookup(labels_on_resampled: np.ndarray, resampled_affine: np.ndarray, affine: np.ndarray, shape):
    """Independent nearest-neighbour lookup: each source voxel centre -> closest resampled voxel (clamped)."""
    index_from_world = np.linalg.inv(resampled_affine)
    world = _world(affine, shape)
    position = np.einsum("ab,bxyz->axyz", index_from_world[:3, :3], world) + index_from_world[:3, 3, None, None, None]
    index = [np.clip(np.rint(position[a]), 0, labels_on_resampled.shape[a] - 1).astype(int) for a in range(3)]
    return labels_on_resampled[index[0], index[1], index[2]]


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_label_round_trip_through_preprocessed_grid(name):
    array, affine = _stored_image(name)
    prep = preprocess(array, affine)
    truth = _world_labels(affine, array.shape)
    on_prep = _world_labels(prep.affine, prep.shape)  # exact labels on the preprocessed grid
    back = to_source_grid(on_prep, prep)
    assert back.shape == array.shape and back.dtype == np.uint8
    # 1) exactly the nearest resampled voxel of every source voxel (these spacings have no exact ties; the
    #    labels lie inside the body, so the crop removes none of them)
    on_resampled = _world_labels(prep.resampled_affine, prep.resampled_shape)
    assert on_resampled.sum() == on_prep.sum()
    np.testing.assert_array_equal(back, _nearest_lookup(on_resampled, prep.resampled_affine, affine, array.shape))
    # 2) close to the analytic truth on the source grid
    assert set(np.unique(truth)) == {0, 1, 2, 3, 4}
    agreement = float(np.mean(back == truth))
    assert agreement >= 0.995, f"{name}: {agreement:.4%} voxel agreement"
    for label in range(1, 5):
        dice = 2 * np.sum((back == label) & (truth == label)) / (np.sum(back == label) + np.sum(truth == label))
        assert dice > 0.9, f"{name}: label {label} Dice {dice:.3f}"
    # Direction cosines are kept (only flipped/permuted): no resampling to an axis-aligned grid.
    src_dirs = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    prep_dirs = prep.affine[:3, :3] / np.linalg.norm(prep.affine[:3, :3], axis=0)
    np.testing.assert_allclose(np.abs(src_dirs.T @ prep_dirs).max(axis=0), 1.0, atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(prep.affine[:3, :3], axis=0), 1.5, atol=1e-9)
    assert np.linalg.det(prep.affine[:3, :3]) > 0  # RAS-like, right-handed


@pytest.mark.parametrize("rotation", [np.eye(3), _rotation(20, 12)], ids=["axis_aligned", "oblique"])
def test_same_image_stored_differently_gives_same_result(rotation):
    base_affine = _centred_affine(SHAPE, SPACING, rotation)
    base = _phantom_ct(base_affine, SHAPE)
    reference = preprocess(base, base_affine)
    labels = _world_labels(reference.affine, reference.shape)
    reference_back = to_source_grid(labels, reference)
    for flips, perm in [((0, 1), (0, 1, 2)), ((0,), (0, 1, 2)), ((2,), (2, 0, 1)), ((0, 1, 2), (1, 2, 0))]:
        array, affine = _restore(base, base_affine, flips, perm)
        prep = preprocess(array, affine)
        assert prep.shape == reference.shape and prep.crop_start == reference.crop_start
        np.testing.assert_allclose(prep.array, reference.array, atol=1e-5)
        np.testing.assert_allclose(prep.affine, reference.affine, atol=1e-6)
        expected_back, _ = _restore(reference_back, base_affine, flips, perm)
        np.testing.assert_array_equal(to_source_grid(labels, prep), expected_back)
        np.testing.assert_array_equal(to_source_grid(labels, prep, order="F"), expected_back)


def test_general_affine_fallback_agrees_with_axis_aligned_path():
    from UniversalSegLib.preprocess import _general_map, _invert_channel_general

    array, affine = _stored_image("permuted_flipped")
    prep = preprocess(array, affine)
    labels = np.random.default_rng(3).integers(0, 5, prep.shape).astype(np.uint8)
    general = _invert_channel_general(labels, prep, _general_map(prep))
    np.testing.assert_array_equal(general, to_source_grid(labels, prep))
    general_f = _invert_channel_general(labels, prep, _general_map(prep), order="F")
    assert general_f.flags.f_contiguous
    np.testing.assert_array_equal(general_f, general)


def test_inversion_onto_a_rotated_grid_uses_the_general_path():
    # A preprocessed grid rotated against the source (not something preprocess() makes) must still invert.
    array, affine = _stored_image("ras")
    prep = preprocess(array, affine, crop_foreground=False)
    rotated = _centred_affine(prep.resampled_shape, (1.5, 1.5, 1.5), _rotation(25, 10))
    prep = dataclasses.replace(prep, affine=rotated, resampled_affine=rotated)
    labels = _world_labels(rotated, prep.shape)
    back = to_source_grid(labels, prep)
    np.testing.assert_array_equal(back, _nearest_lookup(labels, rotated, affine, array.shape))
    assert np.mean(back == _world_labels(affine, array.shape)) >= 0.99


def test_input_already_on_the_target_grid_round_trips_exactly():
    # 1.5 mm LPS input: orientation is a flip, resampling the identity, so the inverse is a pure flip back.
    shape = (64, 56, 40)
    base_affine = _centred_affine(shape, (1.5, 1.5, 1.5))
    array, affine = _restore(_phantom_ct(base_affine, shape, body_radii=(40.0, 30.0)), base_affine, flips=(0, 1))
    prep = preprocess(array, affine, crop_foreground=False)
    assert prep.resampled_shape == shape
    np.testing.assert_allclose(prep.affine, base_affine, atol=1e-9)
    np.testing.assert_allclose(prep.array, np.clip((np.flip(array, (0, 1)) + 175.0) / 425.0, 0, 1), atol=1e-6)
    labels = np.random.default_rng(1).integers(0, 200, shape).astype(np.uint8)
    np.testing.assert_array_equal(to_source_grid(labels, prep), np.flip(labels, (0, 1)))


# ------------------------------------------------------------------------------------------ parameters


def test_parameters_spacing_crop_and_margin():
    array, affine = _stored_image("lps")
    default = preprocess(array, affine)
    fast = preprocess(array, affine, spacing=3.0)
    np.testing.assert_allclose(np.linalg.norm(fast.affine[:3, :3], axis=0), 3.0)
    assert fast.spacing == (3.0, 3.0, 3.0)
    expected_shape = tuple(int(round((n - 1) * s / 3.0 + 1)) for n, s in zip(SHAPE, SPACING))
    assert fast.resampled_shape == expected_shape

    uncropped = preprocess(array, affine, crop_foreground=False)
    assert uncropped.crop_start == (0, 0, 0) and uncropped.crop_end == uncropped.resampled_shape
    assert uncropped.shape == default.resampled_shape
    start, end = default.crop_start, default.crop_end
    box = tuple(slice(a, b) for a, b in zip(start, end))
    np.testing.assert_array_equal(uncropped.array[box], default.array)

    margin = preprocess(array, affine, crop_margin=2)
    for axis in range(3):
        assert margin.crop_start[axis] == max(default.crop_start[axis] - 2, 0)
        assert margin.crop_end[axis] == min(default.crop_end[axis] + 2, default.resampled_shape[axis])

    windowed = preprocess(array, affine, hu_window=(-1000.0, 1000.0), crop_foreground=False)
    assert 0.4 < windowed.array.max() < 0.6 and windowed.array.min() == 0.0  # 160 HU max -> 0.58


def test_preprocessing_parameters_round_trip():
    params = PreprocessingParameters(spacing=(3.0, 3.0, 3.0), crop_margin=(1, 1, 0))
    data = json.loads(json.dumps(params.to_dict()))
    assert PreprocessingParameters.from_dict(data) == params
    assert PreprocessingParameters.from_dict({}) == PreprocessingParameters()
    with pytest.raises(ValueError, match="Unknown preprocessing parameter"):
        PreprocessingParameters.from_dict({"spcing": [1, 1, 1]})
    array, affine = _stored_image("ras")
    prep = preprocess(array, affine, **params.as_kwargs())
    assert prep.parameters == params


# ------------------------------------------------------------------------------------------ validation


def test_invalid_images_are_rejected_with_clear_messages():
    ok = np.zeros((8, 8, 8), np.int16)
    eye = np.eye(4)
    with pytest.raises(InvalidImageError, match="2-D"):
        preprocess(np.zeros((8, 8)), eye)
    with pytest.raises(InvalidImageError, match="3 components"):
        preprocess(np.zeros((8, 8, 8, 3)), eye)
    with pytest.raises(InvalidImageError, match="empty"):
        preprocess(np.zeros((0, 8, 8)), eye)
    nan = ok.astype(np.float32)
    nan[0, 0, :3] = np.nan
    nan[1, 1, 1] = np.inf
    with pytest.raises(InvalidImageError, match=r"4 non-finite voxel value\(s\) \(3 NaN, 1 infinite\)"):
        preprocess(nan, eye)
    with pytest.raises(InvalidImageError, match="spacing"):
        preprocess(ok, np.diag([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(InvalidImageError, match="spacing"):
        preprocess(ok, np.diag([1.0, 1.0, 25.0, 1.0]))
    singular = np.eye(4)
    singular[:3, 1] = [1.0, 0.0, 0.0]  # second axis parallel to the first
    with pytest.raises(InvalidImageError, match="singular"):
        preprocess(ok, singular)
    with pytest.raises(InvalidImageError, match="4x4"):
        preprocess(ok, np.eye(3))
    with pytest.raises(InvalidImageError, match="real numbers"):
        preprocess(ok.astype(bool), eye)
    with pytest.raises(InvalidImageError, match="No voxel is above -175 HU"):
        preprocess(np.full((8, 8, 8), -1000, np.int16), eye)
    assert issubclass(InvalidImageError, ValueError)


def test_single_component_4d_input_is_accepted():
    array, affine = _stored_image("ras")
    np.testing.assert_array_equal(preprocess(array[..., None], affine).array, preprocess(array, affine).array)


def test_to_source_grid_rejects_arrays_of_the_wrong_shape():
    array, affine = _stored_image("ras")
    prep = preprocess(array, affine)
    with pytest.raises(ValueError, match="preprocessed grid"):
        to_source_grid(np.zeros(array.shape, np.uint8), prep)


# --------------------------------------------------------------------------------------------- real CT


def test_real_ct_example():
    image = nib.load(require_shared("data/totalsegmentator/example_ct.nii.gz"))
    array = np.asarray(image.dataobj)
    prep = preprocess(array, image.affine)
    assert prep.resampled_shape == (243, 201, 223)  # 122x101x112 @ 3 mm -> 1.5 mm
    assert prep.shape == (243, 193, 223)  # after cropping to the body
    assert prep.array.dtype == np.float32 and 0.0 <= prep.array.min() and prep.array.max() <= 1.0
    # The body mask brought back agrees with the body mask computed on the original grid.
    back = to_source_grid(prep.array > 0.0, prep)
    assert back.shape == array.shape
    assert np.mean(back == (array > -175)) >= 0.98
