"""Dataset specifications, label harmonisation (merges, left/right split, unknown vs background) and the
preprocessing cache of the training package, on synthetic and real (TotalSegmentator) label maps."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import require_shared
from UniversalSegLib.io import Volume
from UniversalSegLib.io.training_case import write_training_case
from UniversalSegLib.preprocess import PreprocessingParameters
from universalseg_training.assembly import (
    AssemblyError,
    harmonise_labels,
    load_case,
    split_left_right,
)
from universalseg_training.preprocessing import CaseCache
from universalseg_training.sampling import CropDataset, SamplingConfig
from universalseg_training.spec import DatasetSpec, DatasetSpecError, load_dataset_spec

TS = "data/totalsegmentator"


def _spec(classes, **extra):
    data = {"name": "test", "cases": [{"id": "c", "image": "i.nii.gz", "labels": "l.nii.gz"}], "classes": classes}
    data.update(extra)
    return DatasetSpec.from_dict(data)


# ------------------------------------------------------------------------------------------ specifications
def test_spec_maps_names_indices_pairs_and_drops():
    spec = _spec({1: "liver", "2": 27, 3: "kidney", 4: {"right": "right lung", "left": "left lung"}, 5: None,
                  6: "IVC", 7: "postcava"})
    assert spec.targets[1].classes == (6,) and not spec.targets[1].split
    assert spec.targets[2].classes == (27,)
    assert spec.targets[3].classes == (2, 3) and spec.targets[3].split  # (right, left)
    assert spec.targets[4].classes == (16, 17) and spec.targets[4].split
    assert spec.targets[5].dropped
    assert spec.targets[6].classes == spec.targets[7].classes == (9,)  # synonyms resolve to the same class
    assert spec.annotated == (2, 3, 6, 9, 16, 17, 27)  # default: every mapped class
    assert _spec({1: "liver"}, absent=["liver tumor"]).annotated == (6, 27)  # annotated, known absent
    assert _spec({1: "kidney"}, annotated="kidneys").annotated == (2, 3)


@pytest.mark.parametrize("classes, message", [
    ({1: "livr"}, "Did you mean"),
    ({1: "all organs"}, "several classes"),
    ({0: "liver"}, "background"),
    ({1: "liver", "01": "spleen"}, "listed twice"),
    ({"kidney_left": "left kidney"}, "label_names"),
    ({1: {"right": "right kidney"}}, "right' and 'left"),
])
def test_spec_errors_are_specific(classes, message):
    with pytest.raises(DatasetSpecError, match=message):
        _spec(classes)


def test_an_annotated_class_no_raw_value_maps_to_is_an_error():
    with pytest.raises(DatasetSpecError, match="annotated lists Liver Tumor, but no raw value in 'classes' maps to it"):
        _spec({1: "liver"}, annotated=["liver", "liver tumor"])


def test_spec_rejects_unknown_entries_and_needs_cases(tmp_path):
    with pytest.raises(DatasetSpecError, match="unknown entries"):
        _spec({1: "liver"}, colour="red")
    with pytest.raises(DatasetSpecError, match="no cases"):
        DatasetSpec.from_dict({"name": "x", "images": "none/*.nii.gz", "labels": "{name}", "classes": {1: "liver"}},
                              base_dir=tmp_path)


def test_yaml_spec_with_globbed_cases_and_label_names(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    for name in ("a.nii.gz", "b.nii.gz"):
        (tmp_path / "imagesTr" / name).write_bytes(b"")
    (tmp_path / "names.json").write_text(json.dumps({"total": {"1": "liver", "2": "kidney_left"}}))
    (tmp_path / "spec.yaml").write_text(
        "name: mine\nimages: imagesTr/*.nii.gz\nlabels: labelsTr/{stem}_seg.nii.gz\n"
        "label_names: {file: names.json, key: total}\nclasses:\n  liver: liver\n  kidney_left: left kidney\n")
    spec = load_dataset_spec(tmp_path / "spec.yaml")
    assert [c.case_id for c in spec.cases] == ["a", "b"]
    assert spec.cases[0].labels == tmp_path / "labelsTr" / "a_seg.nii.gz"
    assert spec.targets == {1: spec.targets[1], 2: spec.targets[2]}
    assert spec.targets[1].classes == (6,) and spec.targets[2].classes == (3,)
    assert spec.fingerprint() != _spec({1: "liver"}).fingerprint()


# ---------------------------------------------------------------------------------------------- harmonising
def _lps_affine(shape, spacing=2.0):
    """A DICOM-like grid: i towards the patient's LEFT, j posterior, k superior, centred at 0."""
    affine = np.diag([-spacing, -spacing, spacing, 1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return affine


def _body(shape):
    image = np.full(shape, -1000, np.int16)
    image[4:-4, 6:-6, :] = 40
    return image


def test_liver_includes_tumour_and_unlisted_values():
    raw = np.zeros((20, 20, 10), np.int16)
    raw[2:12, 2:12, 2:8] = 1
    raw[5:8, 5:8, 4:6] = 2  # tumour voxels carry the tumour value (LiTS style)
    spec = _spec({1: "liver", 2: "liver tumor"})
    labels, host = harmonise_labels(raw, np.eye(4), spec)
    assert set(np.unique(labels)) == {0, 6, 27}
    assert np.all(host[raw == 2] == 6) and not host[raw != 2].any()
    no_merge = _spec({1: "liver", 2: "liver tumor"}, lesions_in_organs=False)
    assert not harmonise_labels(raw, np.eye(4), no_merge)[1].any()
    raw[0, 0, 0] = 9
    with pytest.raises(AssemblyError, match=r"\[9\].*unlisted: drop"):
        harmonise_labels(raw, np.eye(4), spec)
    labels, _ = harmonise_labels(raw, np.eye(4), _spec({1: "liver", 2: "liver tumor"}, unlisted="drop"))
    assert labels[0, 0, 0] == 0


def test_split_by_patient_side_single_components_and_straddling():
    shape = (40, 30, 12)
    affine = _lps_affine(shape)
    image = _body(shape)
    # In this LPS grid a SMALL i is the patient's RIGHT.
    right_blob = np.zeros(shape, bool)
    right_blob[6:12, 10:18, 3:9] = True
    left_blob = np.zeros(shape, bool)
    left_blob[28:34, 10:18, 3:9] = True
    right, left = split_left_right(right_blob | left_blob, affine, image)
    np.testing.assert_array_equal(right, right_blob)
    np.testing.assert_array_equal(left, left_blob)
    # One kidney alone keeps its true side (the official code calls any single component "right").
    right, left = split_left_right(left_blob, affine, image)
    assert not right.any() and np.array_equal(left, left_blob)
    right, left = split_left_right(right_blob, affine, image)
    assert np.array_equal(right, right_blob) and not left.any()
    # A horseshoe across the midline is cut at the midline (x = 0 here).
    bridge = np.zeros(shape, bool)
    bridge[10:30, 12:16, 5:7] = True
    right, left = split_left_right(bridge, affine, image)
    assert right.sum() == left.sum() == bridge.sum() // 2
    assert right[10:20, 12:16, 5:7].all() and left[20:30, 12:16, 5:7].all()  # i < 19.5 is x > 0: right


def _ts(path):
    return require_shared(f"{TS}/{path}")


def _ts_raw():
    image = nib.load(str(_ts("example_ct.nii.gz")))
    raw = np.asarray(nib.load(str(_ts("example_seg_fast_force_split.nii.gz"))).dataobj).astype(np.int32)
    return np.asarray(image.dataobj), image.affine, raw


def test_real_totalsegmentator_merged_kidney_splits_back_to_its_sides():
    image, affine, raw = _ts_raw()
    merged = raw.copy()
    merged[raw == 3] = 2  # one "kidney" label, as in KiTS / AbdomenCT-1K / CT-ORG
    spec = _spec({2: "kidney"}, unlisted="drop")
    labels, _ = harmonise_labels(merged, affine, spec, image)
    assert (raw == 2).sum() > 1000 and (raw == 3).sum() > 1000
    np.testing.assert_array_equal(labels == 2, raw == 2)  # TotalSegmentator kidney_right -> Right Kidney
    np.testing.assert_array_equal(labels == 3, raw == 3)  # kidney_left -> Left Kidney

    # The same scan stored in another orientation (flipped i and j, as a DICOM-derived LPS file): same sides.
    flipped_affine = affine @ np.array([[-1, 0, 0, raw.shape[0] - 1], [0, -1, 0, raw.shape[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1]])
    flipped = merged[::-1, ::-1]
    labels_flipped, _ = harmonise_labels(flipped, flipped_affine, spec, image[::-1, ::-1])
    np.testing.assert_array_equal(labels_flipped[::-1, ::-1], labels)

    # Only the left kidney labelled: it stays LEFT.
    single = np.where(raw == 3, 2, 0)
    labels_single, _ = harmonise_labels(single, affine, spec, image)
    assert not (labels_single == 2).any()
    np.testing.assert_array_equal(labels_single == 3, raw == 3)


def test_real_totalsegmentator_class_map_by_name():
    spec = DatasetSpec.from_dict({
        "name": "totalseg",
        "cases": [{"id": "example", "image": "example_ct.nii.gz", "labels": "example_seg_fast_force_split.nii.gz"}],
        "label_names": {"file": "class_map_total.json", "key": "total"},
        "classes": {"spleen": "spleen", "kidney_right": "right kidney", "kidney_left": "left kidney",
                    "liver": "liver", "stomach": "stomach", "pancreas": "pancreas", "aorta": "aorta",
                    "inferior_vena_cava": "IVC", "lung_lower_lobe_left": "left lung",
                    "lung_upper_lobe_left": "left lung", "lung_lower_lobe_right": "right lung",
                    "lung_middle_lobe_right": "right lung", "lung_upper_lobe_right": "right lung",
                    "kidney_cyst_left": "kidney cyst", "kidney_cyst_right": "kidney cyst"},
        "unlisted": "drop",
    }, base_dir=_ts(""))
    case = load_case(spec, spec.cases[0])
    _, _, raw = _ts_raw()
    np.testing.assert_array_equal(case.labels == 6, raw == 5)
    np.testing.assert_array_equal(case.labels == 9, raw == 63)
    np.testing.assert_array_equal(case.class_mask(17), np.isin(raw, [10, 11]))
    assert case.annotated == (1, 2, 3, 6, 7, 8, 9, 11, 16, 17, 32)
    # Organs of the taxonomy that this map does not list (e.g. gallbladder) are not annotated: unknown.
    assert 4 not in case.annotated
    # Kidney cysts (if any) are hosted by the kidney of their side.
    for value, kidney in ((23, 3), (24, 2)):
        if (raw == value).any():
            assert np.all(case.host[raw == value] == kidney)
            assert case.class_mask(kidney)[raw == value].all()


def test_preprocessing_cache_and_crops_on_real_ct(tmp_path):
    spec = DatasetSpec.from_dict({
        "name": "totalseg", "cases": [{"id": "example", "image": "example_ct.nii.gz",
                                       "labels": "example_seg_fast_force_split.nii.gz"}],
        "label_names": {"file": "class_map_total.json", "key": "total"},
        "classes": {"liver": "liver", "kidney_right": "kidney", "kidney_left": "kidney", "spleen": "spleen"},
        "unlisted": "drop"}, base_dir=_ts(""))
    prep = PreprocessingParameters(spacing=(3.0, 3.0, 3.0))
    cache = CaseCache([spec], tmp_path / "cache", prep)
    case = cache[0]
    files = sorted((tmp_path / "cache").glob("*.pt"))
    assert len(files) == 1
    image = case["image"]
    assert image.dtype == torch.float32 and image.min() >= 0 and image.max() <= 1
    assert case["labels"].shape == image.shape and image.shape[0] == 1
    np.testing.assert_allclose(np.linalg.norm(case["affine"].numpy()[:3, :3], axis=0), 3.0, atol=1e-6)
    assert case["annotated"] == [1, 2, 3, 6]
    # The original is RAS at 3 mm already: resampling to 3 mm keeps every label voxel count (nearest).
    _, _, raw = _ts_raw()
    assert int((case["labels"] == 6).sum()) == int((raw == 5).sum())
    # The file holds the preprocessed arrays (not just the item), and a second cache object reads it.
    stored = torch.load(files[0], weights_only=True)
    assert torch.equal(stored["labels"], case["labels"]) and stored["image"].shape == image.shape
    again = CaseCache([spec], tmp_path / "cache", prep)
    assert torch.equal(again[0]["labels"], case["labels"])
    assert sorted((tmp_path / "cache").glob("*.pt")) == files
    # Crops: only annotated classes are supervised; every other class is unknown (not background).
    crops = CropDataset(cache, list(range(1, 33)), SamplingConfig(roi_size=(32, 32, 32)), seed=1)
    sample = crops[0]  # one case, num_samples (default 1) crops of it
    assert sample["image"].shape == (1, 1, 32, 32, 32) and sample["target"].shape == (1, 32, 32, 32, 32)
    assert torch.nonzero(sample["annotated"][0]).flatten().tolist() == [0, 1, 2, 5]
    assert not sample["target"][0][~sample["annotated"][0]].any()
    assert torch.equal(crops[0]["image"], sample["image"])  # a pure function of (seed, rank, index)
    # Several crops of one case per sample (the official num_samples), each with its own position and targets.
    several = CropDataset(cache, list(range(1, 33)), SamplingConfig(roi_size=(32, 32, 32), num_samples=3), seed=1)[0]
    assert several["image"].shape == (3, 1, 32, 32, 32) and several["target"].shape == (3, 32, 32, 32, 32)
    assert several["annotated"].shape == (3, 32) and len({float(c.sum()) for c in several["image"]}) == 3


def test_training_case_dataset(tmp_path):
    shape = (40, 30, 12)
    image = _body(shape)
    liver = np.zeros(shape, bool)
    liver[6:20, 8:20, 2:10] = True
    tumour = np.zeros(shape, bool)
    tumour[10:14, 12:15, 4:7] = True
    volume = Volume(array=image, affine=_lps_affine(shape), source="s", format="nifti")
    folder = tmp_path / "exports"
    write_training_case(folder, "c1", volume, {6: liver, 27: tumour}, [6, 27, 1])
    (tmp_path / "slicer.yaml").write_text("name: slicer\ncase_files: exports/*.case.json\n")
    spec = load_dataset_spec(tmp_path / "slicer.yaml")
    assert spec.is_case_format
    case = load_case(spec, spec.cases[0])
    assert case.annotated == (1, 6, 27)
    np.testing.assert_array_equal(case.class_mask(6), liver | tumour)
    np.testing.assert_array_equal(case.class_mask(27), tumour)
    assert not case.class_mask(1).any()
