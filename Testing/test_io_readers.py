"""Readers of UniversalSegLib.io on the real shared scans: geometry, formats, CT check, bad input."""
from __future__ import annotations

import gzip
import logging
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import require_shared

from UniversalSegLib.io import (
    CorruptFileError,
    DicomSeriesError,
    InputNotFoundError,
    InvalidGeometryError,
    InvalidVoxelValuesError,
    NoDicomError,
    NotCTError,
    UniversalSegIOError,
    UnsupportedDimensionsError,
    UnsupportedFormatError,
    check_ct_intensities,
    list_dicom_series,
    read_volume,
)
from UniversalSegLib.io.volume import lps_to_ras

CT_NIFTI = "data/totalsegmentator/example_ct.nii.gz"
CT_DICOM = "data/totalsegmentator/example_ct_dicom"
CT_DICOM_AS_NIFTI = "data/totalsegmentator/derived/example_ct_dicom_as_nifti.nii.gz"
CT3_DICOM = "data/dcmqi_ct3slice/dicom"
CT3_AS_NIFTI = "data/dcmqi_ct3slice/derived/ct_3slice.nii.gz"

ALL_CT_NIFTI = [
    CT_NIFTI,
    "data/totalsegmentator/example_ct_sm.nii.gz",
    "data/totalsegmentator/aorta_report/test_result/models/ct_cropped.nii.gz",
    "data/totalsegmentator/pulmonary_report/models/ct_cropped.nii.gz",
    CT_DICOM_AS_NIFTI,
    CT3_AS_NIFTI,
]
ALL_MR = [
    "data/totalsegmentator/example_mr_sm.nii.gz",
    "data/nonct_mr/chaos_t2_qnet/image_1.nii.gz",
    "data/nonct_mr/chaos_t2_qnet/image_2.nii.gz",
    "data/nonct_mr/pyradiomics/brain1_image.nrrd",
    "data/nonct_mr/pyradiomics/brain2_image.nrrd",
    "data/nonct_mr/pyradiomics/breast1_image.nrrd",
]


# ----------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def small_ct():
    """A real CT, subsampled to about 41x34x28 voxels (keeps air, fat and soft tissue): (int16 array, affine)."""
    image = nib.load(str(require_shared(CT_NIFTI)))
    array = np.asarray(image.dataobj)[::3, ::3, ::4].astype(np.int16)
    affine = image.affine @ np.diag([3.0, 3.0, 4.0, 1.0])
    return array, affine


def save_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    image = nib.Nifti1Image(array, affine)
    image.header.set_sform(affine, code=1)
    image.header.set_qform(affine, code=1)
    nib.save(image, str(path))
    return path


def canonical(array: np.ndarray, affine: np.ndarray):
    """Array and affine reoriented to the closest RAS+ grid (to compare grids whose axes differ)."""
    image = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(array), affine))
    return np.asarray(image.dataobj), image.affine


def world_of_voxel(affine: np.ndarray, ijk) -> np.ndarray:
    return (affine @ np.append(np.asarray(ijk, dtype=float), 1.0))[:3]


def oblique_affine(spacing=(1.2, 0.9, 2.5), flip_first=True) -> np.ndarray:
    """A left-handed (det<0) oblique affine: rotated 20 deg about z and 10 deg about x, first axis flipped."""
    a, b = np.deg2rad(20.0), np.deg2rad(10.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    matrix = np.eye(4)
    matrix[:3, :3] = rz @ rx @ np.diag(spacing)
    if flip_first:
        matrix[:3, 0] *= -1
    matrix[:3, 3] = (12.5, -40.0, 7.25)
    return matrix


def copy_dicom_series(source: Path, target: Path, **changes) -> list[Path]:
    """Copy a DICOM series, optionally changing header keywords (callables get (index, dataset))."""
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for index, path in enumerate(sorted(p for p in source.iterdir() if p.is_file())):
        dataset = pydicom.dcmread(path)
        for keyword, value in changes.items():
            setattr(dataset, keyword, value(index, dataset) if callable(value) else value)
        out = target / f"{path.stem}_{index:03d}.dcm"
        dataset.save_as(out)
        written.append(out)
    return written


# ----------------------------------------------------------------------------------------- NIfTI
def test_nifti_is_read_as_nibabel_sees_it():
    path = require_shared(CT_NIFTI)
    volume = read_volume(path)
    reference = nib.load(str(path))
    assert volume.format == "nifti" and volume.modality is None and volume.series_uid is None
    assert volume.shape == reference.shape == (122, 101, 112)
    assert volume.array.dtype == reference.get_data_dtype()
    np.testing.assert_array_equal(volume.array, np.asarray(reference.dataobj))
    np.testing.assert_array_equal(volume.affine, reference.affine)
    assert volume.affine.dtype == np.float64
    np.testing.assert_allclose(volume.spacing, (3.0, 3.0, 3.0))
    assert volume.orientation == "".join(nib.aff2axcodes(reference.affine))
    assert volume.notes == ()


def test_nifti_rescale_slope_and_intercept_are_applied(tmp_path, small_ct):
    hounsfield, affine = small_ct
    stored = ((hounsfield.astype(np.int32) + 1024) // 2).astype(np.int16)  # HU = 2 * stored - 1024
    image = nib.Nifti1Image(stored, affine)
    image.header.set_slope_inter(2.0, -1024.0)
    path = tmp_path / "scaled.nii.gz"
    nib.save(image, str(path))

    volume = read_volume(path)
    assert volume.array.dtype == np.float32
    np.testing.assert_array_equal(volume.array, stored.astype(np.float32) * 2 - 1024)


@pytest.mark.parametrize("relative", ALL_CT_NIFTI)
def test_every_shared_ct_is_accepted(relative):
    volume = read_volume(require_shared(relative))
    report = check_ct_intensities(volume.array)
    assert report.is_plausible, report.reason
    assert report.air_fraction > 0.01 and report.soft_tissue_fraction > 0.2


@pytest.mark.parametrize("relative", ALL_MR)
def test_every_shared_mr_is_refused_unless_forced(relative):
    path = require_shared(relative)
    with pytest.raises(NotCTError) as error:
        read_volume(path)
    message = str(error.value)
    assert path.name in message and "Hounsfield" in message and "force=True" in message

    volume = read_volume(path, force=True)
    assert volume.shape == volume.array.shape and len(volume.shape) == 3
    assert any("force=True" in note for note in volume.notes)


def test_ct_rule_refuses_ct_stored_without_its_rescale(small_ct):
    hounsfield, _ = small_ct
    assert check_ct_intensities(hounsfield).is_plausible
    raw_stored = hounsfield.astype(np.int32) + 1024  # air at ~0, soft tissue ~1064: not HU
    report = check_ct_intensities(raw_stored)
    assert not report.is_plausible and "air" in report.reason


@pytest.mark.parametrize("affine_name", ["permuted", "flipped", "oblique_left_handed"])
def test_nifti_keeps_any_orientation_without_reorienting(tmp_path, small_ct, affine_name):
    array, _ = small_ct
    affines = {
        "permuted": np.array([[0, 0, 2.5, -30], [1.5, 0, 0, 10], [0, -1.2, 0, 55], [0, 0, 0, 1]], dtype=float),
        "flipped": np.diag([-1.5, 1.5, -2.0, 1.0]) + np.array([[0, 0, 0, 60], [0, 0, 0, -10], [0, 0, 0, 20], [0] * 4]),
        "oblique_left_handed": oblique_affine(),
    }
    path = save_nifti(tmp_path / f"{affine_name}.nii.gz", array, affines[affine_name])
    volume = read_volume(path)
    np.testing.assert_array_equal(volume.array, array)
    np.testing.assert_allclose(volume.affine, affines[affine_name], atol=1e-5)
    assert volume.orientation == "".join(nib.aff2axcodes(affines[affine_name]))


def test_nifti_with_a_trailing_singleton_dimension_is_3d(tmp_path, small_ct):
    array, affine = small_ct
    path = save_nifti(tmp_path / "x_y_z_1.nii.gz", array[..., np.newaxis], affine)
    volume = read_volume(path)
    assert volume.shape == array.shape
    np.testing.assert_array_equal(volume.array, array)


# ----------------------------------------------------------------------------------------- NRRD / MetaImage
@pytest.mark.parametrize("suffix,fmt", [(".nrrd", "nrrd"), (".mha", "metaimage"), (".mhd", "metaimage"), (".nhdr", "nrrd")])
def test_itk_formats_have_the_same_array_and_ras_affine_as_the_nifti(tmp_path, suffix, fmt):
    nifti_path = require_shared(CT_NIFTI)
    reference = read_volume(nifti_path)
    out = tmp_path / f"ct{suffix}"
    sitk.WriteImage(sitk.ReadImage(str(nifti_path)), str(out), True)

    volume = read_volume(out)
    assert volume.format == fmt
    np.testing.assert_array_equal(volume.array, reference.array)
    np.testing.assert_allclose(volume.affine, reference.affine, atol=1e-4)


def test_oblique_left_handed_grid_survives_nifti_to_nrrd_and_mha(tmp_path, small_ct):
    """LPS->RAS conversion with a non-trivial direction matrix: the same voxel lies at the same world point."""
    array, _ = small_ct
    affine = oblique_affine()
    nifti = save_nifti(tmp_path / "oblique.nii.gz", array, affine)
    image = sitk.ReadImage(str(nifti))
    for suffix in (".nrrd", ".mha"):
        out = tmp_path / f"oblique{suffix}"
        sitk.WriteImage(image, str(out))
        volume = read_volume(out)
        np.testing.assert_array_equal(volume.array, array)
        np.testing.assert_allclose(volume.affine, affine, atol=1e-4)
        for ijk in [(0, 0, 0), (40, 0, 3), (5, 33, 27)]:
            np.testing.assert_allclose(world_of_voxel(volume.affine, ijk), world_of_voxel(affine, ijk), atol=1e-3)

    # Independent check of the NRRD header (pynrrd: LPS space directions and origin).
    import nrrd

    header = nrrd.read_header(str(tmp_path / "oblique.nrrd"))
    assert header["space"] == "left-posterior-superior"
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(header["space directions"], dtype=float).T
    lps[:3, 3] = header["space origin"]
    np.testing.assert_allclose(lps_to_ras(lps), affine, atol=1e-4)


# ----------------------------------------------------------------------------------------- DICOM
def test_dicom_series_matches_its_nifti_conversion():
    volume = read_volume(require_shared(CT_DICOM))
    reference = nib.load(str(require_shared(CT_DICOM_AS_NIFTI)))
    assert volume.format == "dicom" and volume.modality == "CT"
    assert volume.shape == (512, 512, 20)
    ours, our_affine = canonical(volume.array, volume.affine)
    theirs, their_affine = canonical(np.asarray(reference.dataobj), reference.affine)
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_allclose(our_affine, their_affine, atol=1e-4)
    np.testing.assert_allclose(volume.spacing, (0.9765625, 0.9765625, 2.0), atol=1e-6)
    # The file list is in k order: slice k's ImagePositionPatient is the world position of voxel (0, 0, k).
    assert len(volume.dicom_files) == 20
    for k in (0, 7, 19):
        header = pydicom.dcmread(volume.dicom_files[k], stop_before_pixels=True)
        lps = np.asarray(header.ImagePositionPatient, dtype=float)
        np.testing.assert_allclose(world_of_voxel(volume.affine, (0, 0, k)), lps * [-1, -1, 1], atol=1e-4)
    # These anonymised files have blank UIDs: no series UID to report.
    assert volume.series_uid is None


def test_three_slice_dicom_with_outside_fov_padding_is_ct_and_matches_its_nifti():
    volume = read_volume(require_shared(CT3_DICOM))
    reference = nib.load(str(require_shared(CT3_AS_NIFTI)))
    assert volume.array.min() == -3024  # outside the field of view
    assert volume.series_uid == "1.2.392.200103.20080913.113635.1.2009.6.22.21.43.10.23430.1"
    ours, our_affine = canonical(volume.array, volume.affine)
    theirs, their_affine = canonical(np.asarray(reference.dataobj), reference.affine)
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_allclose(our_affine, their_affine, atol=1e-4)


def test_one_dicom_file_reads_its_whole_series():
    folder = require_shared(CT3_DICOM)
    from_file = read_volume(folder / "02.dcm")
    from_folder = read_volume(folder)
    assert from_file.dicom_files == from_folder.dicom_files
    np.testing.assert_array_equal(from_file.array, from_folder.array)


def test_segmentation_objects_in_the_folder_are_not_image_series():
    # data/dcmqi_ct3slice holds the CT in dicom/ and a DICOM SEG (liver_SEG.dcm) beside it.
    parent = require_shared(CT3_DICOM).parent
    series = list_dicom_series(parent)
    assert [info.modality for info in series] == ["CT"]
    assert series[0].n_files == 3 and series[0].rows == series[0].columns == 512
    assert read_volume(parent).shape == (512, 512, 3)


@pytest.fixture
def multi_series_folder(tmp_path):
    """The 3-slice CT, an 'MR' copy of it (new UIDs) and a 2-slice CT (new UIDs), in one folder."""
    source = require_shared(CT3_DICOM)
    folder = tmp_path / "mixed"
    copy_dicom_series(source, folder / "ct")
    mr_uid, small_uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    copy_dicom_series(source, folder / "mr", Modality="MR", SeriesInstanceUID=mr_uid, SeriesDescription="fake MR",
                      SOPInstanceUID=lambda i, ds: pydicom.uid.generate_uid())
    small = copy_dicom_series(source, folder / "small", SeriesInstanceUID=small_uid, SeriesDescription="two slices",
                              SOPInstanceUID=lambda i, ds: pydicom.uid.generate_uid())
    small[-1].unlink()
    return folder, mr_uid, small_uid


def test_folder_with_several_series_picks_the_ct_and_names_the_others(multi_series_folder, caplog):
    folder, mr_uid, small_uid = multi_series_folder
    ct_uid = "1.2.392.200103.20080913.113635.1.2009.6.22.21.43.10.23430.1"
    series = list_dicom_series(folder)
    assert [info.series_uid for info in series] == [ct_uid, small_uid, mr_uid]  # selection-rank order
    assert series[1].is_localizer and not series[0].is_localizer

    with caplog.at_level(logging.WARNING, logger="UniversalSegLib.io"):
        volume = read_volume(folder)
    assert volume.series_uid == ct_uid and volume.shape == (512, 512, 3)
    assert len(volume.notes) == 1 and mr_uid in volume.notes[0] and small_uid in volume.notes[0]
    assert ct_uid in caplog.text and mr_uid in caplog.text

    assert read_volume(folder, series_uid=small_uid).shape == (512, 512, 2)
    with pytest.raises(NotCTError, match="Modality 'MR'"):
        read_volume(folder, series_uid=mr_uid)
    assert read_volume(folder, series_uid=mr_uid, force=True).modality == "MR"
    with pytest.raises(DicomSeriesError) as error:
        read_volume(folder, series_uid="1.2.3.4")
    assert "1.2.3.4" in str(error.value) and mr_uid in str(error.value)


def _link_series(source: Path, target: Path, skip=()) -> Path:
    target.mkdir()
    for index, path in enumerate(sorted(source.iterdir())):
        if index not in skip:
            os.symlink(path, target / path.name)
    return target


def test_dicom_series_with_a_missing_slice_is_refused(tmp_path):
    source = require_shared(CT_DICOM)
    order = sorted(source.iterdir(), key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
    target = tmp_path / "gap"
    target.mkdir()
    for path in order[:9] + order[10:]:
        os.symlink(path, target / path.name)
    with pytest.raises(DicomSeriesError, match="missing") as error:
        read_volume(target)
    assert order[8].name in str(error.value) and order[10].name in str(error.value)


def test_dicom_series_with_two_images_at_one_position_is_refused(tmp_path):
    folder = copy_dicom_series(require_shared(CT3_DICOM), tmp_path / "dup",
                               ImagePositionPatient=lambda i, ds: ds.ImagePositionPatient if i < 2 else
                               pydicom.dcmread(require_shared(CT3_DICOM) / "02.dcm").ImagePositionPatient)[0].parent
    with pytest.raises(DicomSeriesError, match="share a position"):
        read_volume(folder)


def test_dicom_series_with_mixed_orientation_is_refused(tmp_path):
    folder = copy_dicom_series(require_shared(CT3_DICOM), tmp_path / "mixed_orientation",
                               ImageOrientationPatient=lambda i, ds: [1, 0, 0, 0, 1, 0] if i else [0, 1, 0, 0, 0, -1])[0].parent
    with pytest.raises(DicomSeriesError, match="orientation"):
        read_volume(folder)


# ----------------------------------------------------------------------------------------- bad input
def test_missing_path(tmp_path):
    with pytest.raises(InputNotFoundError, match="not_there.nii.gz") as error:
        read_volume(tmp_path / "not_there.nii.gz")
    assert isinstance(error.value, FileNotFoundError)


@pytest.mark.parametrize("name", ["empty.nii.gz", "empty.nrrd", "empty.mha", "empty.dcm"])
def test_empty_file(tmp_path, name):
    (tmp_path / name).touch()
    with pytest.raises(CorruptFileError, match="empty") as error:
        read_volume(tmp_path / name)
    assert name in str(error.value)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_truncated_file(tmp_path, small_ct, suffix):
    array, affine = small_ct
    whole = tmp_path / f"whole{suffix}"
    if suffix.startswith(".nii"):
        save_nifti(whole, array, affine)
    else:
        image = sitk.GetImageFromArray(array.transpose(2, 1, 0))
        sitk.WriteImage(image, str(whole), True)
    data = whole.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError) as error:
        read_volume(cut)
    assert cut.name in str(error.value)


def test_garbage_with_a_nifti_name(tmp_path):
    path = tmp_path / "garbage.nii.gz"
    path.write_bytes(gzip.compress(b"this is not an image" * 50))
    with pytest.raises(CorruptFileError, match="garbage.nii.gz"):
        read_volume(path)


@pytest.mark.parametrize("name", ["scan.png", "notes.txt", "volume.img"])
def test_unknown_extension(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x89PNG not a volume at all")
    with pytest.raises(UnsupportedFormatError) as error:
        read_volume(tmp_path / name)
    assert name in str(error.value) and ".nii.gz" in str(error.value)


@pytest.mark.parametrize("shape", [(41, 34), (41, 34, 1), (1, 34, 28)])
def test_2d_nifti(tmp_path, small_ct, shape):
    array, affine = small_ct
    data = array[: shape[0], : shape[1], : (shape[2] if len(shape) > 2 else 1)].reshape(shape)
    path = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    with pytest.raises(UnsupportedDimensionsError, match="2-D"):
        read_volume(path)


def test_2d_metaimage(tmp_path, small_ct):
    array, _ = small_ct
    path = tmp_path / "slice.mha"
    sitk.WriteImage(sitk.GetImageFromArray(array[:, :, 5].T), str(path))
    with pytest.raises(UnsupportedDimensionsError, match="2-D"):
        read_volume(path)


def test_4d_nifti_with_two_time_points(tmp_path, small_ct):
    array, affine = small_ct
    path = tmp_path / "two_phases.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([array, array], axis=-1), affine), str(path))
    with pytest.raises(UnsupportedDimensionsError, match="time points"):
        read_volume(path)


def test_vector_nrrd(tmp_path, small_ct):
    array, _ = small_ct
    image = sitk.GetImageFromArray(np.stack([array.T] * 3, axis=-1), isVector=True)
    path = tmp_path / "vector.nrrd"
    sitk.WriteImage(image, str(path))
    with pytest.raises(UnsupportedDimensionsError, match="components"):
        read_volume(path)


def test_folder_without_dicom(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "fake.dcm").write_bytes(b"not dicom" * 30)
    with pytest.raises(NoDicomError, match="No DICOM images") as error:
        read_volume(tmp_path)
    assert str(tmp_path) in str(error.value)
    assert list_dicom_series(tmp_path) == []


def test_nan_voxels_are_counted_and_refused_unless_forced(tmp_path, small_ct):
    array, affine = small_ct
    data = array.astype(np.float32)
    data[0, 0, :7] = np.nan
    path = save_nifti(tmp_path / "with_nan.nii.gz", data, affine)
    with pytest.raises(InvalidVoxelValuesError, match=r"\b7 of") as error:
        read_volume(path)
    assert "NaN" in str(error.value) and "with_nan.nii.gz" in str(error.value)

    volume = read_volume(path, force=True)
    assert np.isfinite(volume.array).all() and (volume.array[0, 0, :7] == -1024).all()
    assert any("7 NaN" in note for note in volume.notes)


@pytest.mark.parametrize("spacing", [(0.0005, 1.0, 1.0), (1.0, 1.0, 500.0)])
def test_absurd_spacing(tmp_path, small_ct, spacing):
    array, _ = small_ct
    path = save_nifti(tmp_path / "odd_spacing.nii.gz", array, np.diag(list(spacing) + [1.0]))
    with pytest.raises(InvalidGeometryError, match="implausible voxel size"):
        read_volume(path)


def test_every_error_is_a_universalseg_io_error():
    for error_class in (CorruptFileError, DicomSeriesError, InputNotFoundError, InvalidGeometryError,
                        InvalidVoxelValuesError, NoDicomError, NotCTError, UnsupportedDimensionsError,
                        UnsupportedFormatError):
        assert issubclass(error_class, UniversalSegIOError)


def test_series_uid_with_a_nifti_is_an_error():
    with pytest.raises(UniversalSegIOError, match="DICOM input only"):
        read_volume(require_shared(CT_NIFTI), series_uid="1.2.3")


def test_dicom_slice_order_comes_from_positions_not_file_names(tmp_path):
    """Slice order comes from positions, not file names: reversed names give the same volume."""
    source = require_shared(CT3_DICOM)
    target = tmp_path / "renamed"
    target.mkdir()
    for path in sorted(source.iterdir()):
        shutil.copy(path, target / f"z{4 - int(path.stem)}.dcm")  # 01 -> z3, 03 -> z1
    np.testing.assert_array_equal(read_volume(target).array, read_volume(source).array)
