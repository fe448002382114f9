"""The partially labelled training-case format (UniversalSegLib.io.training_case)."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from conftest import require_shared
from UniversalSegLib.io import InputNotFoundError, OutputExistsError, Volume, read_volume
from UniversalSegLib.errors import InvalidMaskError
from UniversalSegLib.io.training_case import (
    TrainingCaseError,
    case_paths,
    read_training_case,
    write_training_case,
)
from UniversalSegLib.taxonomy import ClassInfo, get_taxonomy


def _oblique_affine() -> np.ndarray:
    """Anisotropic, flipped and slightly rotated grid: geometry must survive the round trip."""
    angle = np.deg2rad(10)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-0.8, 0.9, 2.5])
    affine[:3, 3] = [120.0, -40.5, 30.25]
    return affine


def _scene(shape=(40, 36, 20)):
    """A CT with a liver containing a tumour and two kidneys, one of them with a tumour."""
    rng = np.random.default_rng(3)
    ct = rng.integers(-100, 200, size=shape).astype(np.int16)
    liver = np.zeros(shape, bool)
    liver[2:20, 2:20, 2:18] = True
    liver_tumor = np.zeros(shape, bool)
    liver_tumor[8:12, 8:12, 8:12] = True  # inside the liver
    right_kidney = np.zeros(shape, bool)
    right_kidney[24:30, 4:12, 4:12] = True
    left_kidney = np.zeros(shape, bool)
    left_kidney[24:30, 24:32, 4:12] = True
    kidney_tumor = np.zeros(shape, bool)
    kidney_tumor[25:29, 26:30, 5:9] = True  # inside the LEFT kidney
    volume = Volume(array=ct, affine=_oblique_affine(), source="synthetic", format="nifti")
    masks = {6: liver, 27: liver_tumor, 2: right_kidney, 3: left_kidney, 26: kidney_tumor}
    return volume, masks


def test_round_trip_keeps_geometry_annotations_and_organ_includes_lesion(tmp_path):
    volume, masks = _scene()
    annotated = [6, 27, 2, 3, 26, 1]  # spleen annotated but absent: "checked, none"
    path = write_training_case(tmp_path, "case-01", volume, masks, annotated, review={6: "accepted", 27: "corrected"},
                               source={"tool": "test"})
    assert path.name == "case-01.case.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case-01.case.json", "case-01_ct.nii.gz", "case-01_labels.nii.gz"]
    document = json.loads(path.read_text())
    assert document["format"] == "universalseg-case" and document["version"] == 1
    assert "taxonomy" not in document  # default taxonomy is omitted
    assert document["annotated"] == [1, 2, 3, 6, 26, 27]
    assert document["review"] == {"6": "accepted", "27": "corrected"}

    ct_file = nib.load(str(tmp_path / "case-01_ct.nii.gz"))
    labels_file = nib.load(str(tmp_path / "case-01_labels.nii.gz"))
    assert ct_file.get_data_dtype() == np.int16  # integer HU: lossless int16
    assert labels_file.get_data_dtype() == np.uint8

    case = read_training_case(path)
    assert case.case_id == "case-01"
    assert np.allclose(case.affine, volume.affine, atol=1e-5)
    np.testing.assert_array_equal(case.image, volume.array)
    assert case.annotated == (1, 2, 3, 6, 26, 27)
    assert case.review == {6: "accepted", 27: "corrected"}
    assert case.source == {"tool": "test"}
    # Lesion over organ in the label map; the reader re-derives organ-includes-lesion.
    assert case.labels[10, 10, 10] == 27
    np.testing.assert_array_equal(case.class_mask(6), masks[6] | masks[27])
    np.testing.assert_array_equal(case.class_mask(27), masks[27])
    # The kidney tumour goes to the kidney it lies in (left), not to the right kidney.
    np.testing.assert_array_equal(case.class_mask(3), masks[3] | masks[26])
    np.testing.assert_array_equal(case.class_mask(2), masks[2])
    assert not case.class_mask(1).any()
    assert case.is_annotated(1) and not case.is_annotated(11)


def test_float_ct_stays_float_and_integer_float_becomes_int16(tmp_path):
    volume, masks = _scene()
    fractional = Volume(array=volume.array.astype(np.float32) + 0.25, affine=volume.affine, source="s", format="nifti")
    write_training_case(tmp_path, "frac", fractional, masks, masks.keys())
    assert nib.load(str(tmp_path / "frac_ct.nii.gz")).get_data_dtype() == np.float32
    np.testing.assert_allclose(read_training_case(tmp_path / "frac.case.json").image, fractional.array)
    whole = Volume(array=volume.array.astype(np.float64), affine=volume.affine, source="s", format="nifti")
    write_training_case(tmp_path, "whole", whole, masks, masks.keys())
    assert nib.load(str(tmp_path / "whole_ct.nii.gz")).get_data_dtype() == np.int16


def test_writer_refuses_overwrite_bad_ids_unannotated_masks_and_bad_shapes(tmp_path):
    volume, masks = _scene()
    write_training_case(tmp_path, "a", volume, masks, masks.keys())
    before = (tmp_path / "a_labels.nii.gz").read_bytes()
    with pytest.raises(OutputExistsError):
        write_training_case(tmp_path, "a", volume, {6: masks[6]}, [6])
    assert (tmp_path / "a_labels.nii.gz").read_bytes() == before
    write_training_case(tmp_path, "a", volume, {6: masks[6]}, [6], overwrite=True)
    assert read_training_case(tmp_path / "a.case.json").annotated == (6,)

    with pytest.raises(TrainingCaseError, match="case id"):
        write_training_case(tmp_path, "bad id/..", volume, masks, masks.keys())
    with pytest.raises(TrainingCaseError, match="not listed as annotated.*Liver Tumor"):
        write_training_case(tmp_path, "b", volume, masks, [6, 2, 3, 26])
    with pytest.raises(TrainingCaseError, match="not in the taxonomy"):
        write_training_case(tmp_path, "c", volume, {}, [99])
    with pytest.raises(InvalidMaskError, match="shape"):
        write_training_case(tmp_path, "d", volume, {6: np.zeros((3, 3, 3), bool)}, [6])
    # Nothing half-written for the refused cases.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.case.json", "a_ct.nii.gz", "a_labels.nii.gz"]


def test_custom_taxonomy_is_stored_and_used(tmp_path):
    volume, masks = _scene()
    extra = ClassInfo.from_dict({"index": 40, "display_name": "Spinal Cord"})
    taxonomy = get_taxonomy().extended([extra])
    cord = np.zeros(volume.shape, bool)
    cord[30:34, 30:34, :] = True
    path = write_training_case(tmp_path, "ext", volume, {6: masks[6], 40: cord}, [6, 40], taxonomy=taxonomy)
    document = json.loads(path.read_text())
    assert any(entry["index"] == 40 and entry["display_name"] == "Spinal Cord" for entry in document["taxonomy"])
    case = read_training_case(path)
    assert case.taxonomy[40].display_name == "Spinal Cord"
    np.testing.assert_array_equal(case.class_mask(40), cord)
    assert nib.load(str(tmp_path / "ext_labels.nii.gz")).get_data_dtype() == np.uint8


def test_reader_errors_are_specific(tmp_path):
    volume, masks = _scene()
    path = write_training_case(tmp_path, "r", volume, masks, masks.keys())
    paths = case_paths(tmp_path, "r")

    with pytest.raises(InputNotFoundError):
        read_training_case(tmp_path / "missing.case.json")

    document = json.loads(path.read_text())
    bad = dict(document, annotated=[6, 77])
    (tmp_path / "bad1.case.json").write_text(json.dumps(bad))
    with pytest.raises(TrainingCaseError, match="77"):
        read_training_case(tmp_path / "bad1.case.json")

    bad = dict(document, format="something-else")
    (tmp_path / "bad2.case.json").write_text(json.dumps(bad))
    with pytest.raises(TrainingCaseError, match="not a UniversalSeg training case"):
        read_training_case(tmp_path / "bad2.case.json")

    bad = dict(document, labels="nowhere_labels.nii.gz")
    (tmp_path / "bad3.case.json").write_text(json.dumps(bad))
    with pytest.raises(InputNotFoundError, match="label map"):
        read_training_case(tmp_path / "bad3.case.json")

    # Label map on another grid.
    labels = nib.load(str(paths["labels"]))
    shifted = labels.affine.copy()
    shifted[:3, 3] += 5.0
    nib.save(nib.Nifti1Image(np.asarray(labels.dataobj), shifted), str(tmp_path / "moved_labels.nii.gz"))
    (tmp_path / "bad4.case.json").write_text(json.dumps(dict(document, labels="moved_labels.nii.gz")))
    with pytest.raises(TrainingCaseError, match="grid"):
        read_training_case(tmp_path / "bad4.case.json")

    # A label value outside the taxonomy.
    data = np.asarray(labels.dataobj).copy()
    data[0, 0, 0] = 200
    nib.save(nib.Nifti1Image(data, labels.affine), str(tmp_path / "odd_labels.nii.gz"))
    (tmp_path / "bad5.case.json").write_text(json.dumps(dict(document, labels="odd_labels.nii.gz")))
    with pytest.raises(TrainingCaseError, match=r"\[200\]"):
        read_training_case(tmp_path / "bad5.case.json")


def test_real_ct_round_trip_with_totalsegmentator_liver(tmp_path):
    """The shared TotalSegmentator example CT with its liver label: written and read back unchanged."""
    volume = read_volume(require_shared("data/totalsegmentator/example_ct.nii.gz"))
    liver = np.asarray(nib.load(str(require_shared("data/totalsegmentator/example_seg_hist/liver.nii.gz"))).dataobj) > 0.5
    path = write_training_case(tmp_path, "s0001", volume, {6: liver}, [6, 27], source={"input": "example_ct"})
    case = read_training_case(path)
    np.testing.assert_array_equal(case.image, volume.array)
    np.testing.assert_allclose(case.affine, volume.affine, atol=1e-5)
    np.testing.assert_array_equal(case.class_mask(6), liver)
    assert not case.class_mask(27).any()
    assert 20 < float(case.image[case.class_mask(6)].mean()) < 80  # liver HU of a non-contrast CT
