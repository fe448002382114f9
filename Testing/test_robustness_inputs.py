"""Inputs that lie: headers that describe the wrong grid or an impossible size, damaged DICOM folders.

Each case must end in a library error with exit code 3 and a message that says what is wrong (never a
wrong geometry with success, never a traceback of another library, never a hang, never a huge
allocation), or, for files that are merely damaged inside a folder, be skipped with a warning.
"""
from __future__ import annotations

import os
import threading
import tracemalloc

import nibabel as nib
import numpy as np
import pytest

import synthetic_dicom as sd
from UniversalSegLib.errors import (
    CorruptFileError,
    DicomSegError,
    DicomSegInputError,
    DicomSeriesError,
    InputTooLargeError,
    InvalidGeometryError,
    InvalidImageError,
    UniversalSegError,
    exit_code_of,
)
from UniversalSegLib.io import read_volume
from UniversalSegLib.io.validation import MAX_SPACING_MM, validate_geometry


def _ct_array(shape=(20, 18, 8)):
    array = np.full(shape, -1000, np.int16)
    array[4:-4, 4:-4, :] = 40
    return array


def _save_raw_header_nifti(path, array, pixdim, sform=None, qform_code=0, dims=None):
    image = nib.Nifti1Image(array, None)
    header = image.header
    header.set_sform(sform if sform is not None else np.eye(4), code=1 if sform is not None else 0)
    header.set_qform(None, code=qform_code)
    header["pixdim"][1:4] = pixdim
    nib.save(image, path)
    if dims is not None:  # overwrite dim[] in the stored bytes: a header that lies about the size
        raw = bytearray(open(path, "rb").read())
        np.frombuffer(raw, dtype="<i2", count=8, offset=40)  # dim[0..7] at byte 40
        raw[42:48] = np.asarray(dims, "<i2").tobytes()
        open(path, "wb").write(bytes(raw))
    return path


# ------------------------------------------------------------------------------------------ NIfTI


@pytest.mark.parametrize("pixdim", [(0.0, 0.0, 0.0), (1.0, 0.0, 1.0), (np.nan, 1.0, 1.0), (-0.8, 0.8, 2.0)])
@pytest.mark.parametrize("qform_code", [0, 1])
def test_nifti_without_sform_and_bad_pixdim_is_refused(tmp_path, pixdim, qform_code):
    path = _save_raw_header_nifti(tmp_path / "bad.nii", _ct_array(), pixdim, qform_code=qform_code)
    assert nib.load(path).header.get_zooms()[:3] != tuple(pixdim)  # nibabel would substitute voxel sizes
    with pytest.raises(InvalidGeometryError, match="pixdim") as error:
        read_volume(path)
    assert exit_code_of(error.value) == 3 and "1 mm" in str(error.value)


def test_nifti_with_sform_ignores_bad_pixdim(tmp_path):
    sform = np.diag([0.7, 0.7, 2.5, 1.0])
    path = _save_raw_header_nifti(tmp_path / "sform.nii", _ct_array(), (0.0, 0.0, 0.0), sform=sform)
    np.testing.assert_allclose(read_volume(path).affine, sform)


def test_nifti_without_any_orientation_is_read_with_a_warning(tmp_path):
    path = _save_raw_header_nifti(tmp_path / "analyze.nii", _ct_array(), (0.7, 0.7, 2.5))
    volume = read_volume(path)
    assert volume.spacing == pytest.approx((0.7, 0.7, 2.5))
    assert any("no orientation" in note for note in volume.notes)


@pytest.mark.parametrize("dims", [(3, 1400, 1400, 1400), (3, 20000, 20000, 20000), (3, 32767, 32767, 2)])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_huge_size_claimed_by_a_tiny_header_is_refused_before_allocating(tmp_path, dims, suffix):
    path = _save_raw_header_nifti(tmp_path / f"liar{suffix}", _ct_array(), (1.0, 1.0, 1.0), sform=np.eye(4))
    if suffix == ".nii":  # patch dim[] in place (for .gz: patch the uncompressed bytes, then compress)
        raw = bytearray(path.read_bytes())
        raw[40:48] = np.asarray(dims + (1,) * (4 - len(dims)), "<i2").tobytes()[:8]
        path.write_bytes(bytes(raw))
    else:
        import gzip

        raw = bytearray(gzip.decompress(path.read_bytes()))
        raw[40:48] = np.asarray(dims, "<i2").tobytes()
        path.write_bytes(gzip.compress(bytes(raw)))
    tracemalloc.start()
    try:
        with pytest.raises((InputTooLargeError, CorruptFileError)) as error:
            read_volume(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert exit_code_of(error.value) == 3
    assert peak < 50 * 2**20, f"{peak / 2**20:.0f} MiB allocated for a {path.stat().st_size}-byte file"
    if isinstance(error.value, InputTooLargeError):
        assert "voxels" in str(error.value) or "memory" in str(error.value)


def test_spacing_limit_is_one_rule_for_reading_and_preprocessing(tmp_path):
    from UniversalSegLib.preprocess import MAX_SPACING_MM as preprocess_limit
    from UniversalSegLib.preprocess import validate_image

    assert preprocess_limit == MAX_SPACING_MM
    just_over = np.diag([1.0, 1.0, MAX_SPACING_MM * 1.01, 1.0])
    with pytest.raises(InvalidGeometryError):
        validate_geometry(just_over, "x")
    with pytest.raises(InvalidImageError):
        validate_image(_ct_array(), just_over)
    nib.save(nib.Nifti1Image(_ct_array(), just_over), tmp_path / "thick.nii.gz")
    with pytest.raises(InvalidGeometryError):
        read_volume(tmp_path / "thick.nii.gz")


def test_resampled_grid_too_large_is_refused_before_allocating():
    from UniversalSegLib.preprocess import preprocess

    # 19.9 mm voxels (just under the limit) resampled to 0.05 mm: ~400^3 * 4 k voxels.
    affine = np.diag([19.9, 19.9, 19.9, 1.0])
    with pytest.raises(InputTooLargeError, match="resampling"):
        preprocess(_ct_array((40, 40, 40)), affine, spacing=0.05)


def test_sheared_grid_gantry_tilt_is_refused_with_advice(tmp_path):
    affine = np.diag([0.7, 0.7, 2.5, 1.0])
    affine[1, 2] = 2.5 * np.tan(np.radians(15))  # slices step sideways: 15 degree gantry tilt
    nib.save(nib.Nifti1Image(_ct_array(), affine), tmp_path / "tilted.nii.gz")
    with pytest.raises(InvalidGeometryError, match="sheared") as error:
        read_volume(tmp_path / "tilted.nii.gz")
    assert "gantry tilt" in str(error.value) and "dcm2niix" in str(error.value)


def test_rounding_noise_in_directions_is_removed():
    affine = np.diag([0.7, 0.8, 2.5, 1.0])
    affine[0, 1] = 0.8 * 3e-5  # not perpendicular by 3e-5: rounding of a DICOM header
    fixed = validate_geometry(affine, "x")
    directions = fixed[:3, :3] / np.linalg.norm(fixed[:3, :3], axis=0)
    np.testing.assert_allclose(directions.T @ directions, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(fixed[:3, :3], axis=0), [0.7, 0.8, 2.5])


def test_nrrd_and_metaimage_without_voxel_size_are_refused(tmp_path):
    data = _ct_array().astype("<i2")
    (tmp_path / "nospacing.nrrd").write_bytes(
        b"NRRD0004\ntype: short\ndimension: 3\nsizes: 20 18 8\nendian: little\nencoding: raw\n\n" + data.tobytes(order="F"))
    (tmp_path / "nospacing.mha").write_bytes(
        b"ObjectType = Image\nNDims = 3\nDimSize = 20 18 8\nElementType = MET_SHORT\nElementDataFile = LOCAL\n"
        + data.tobytes(order="F"))
    for name in ("nospacing.nrrd", "nospacing.mha"):
        with pytest.raises(InvalidGeometryError, match="voxel size"):
            read_volume(tmp_path / name)


def test_metaimage_claiming_a_huge_size_is_refused_before_allocating(tmp_path):
    (tmp_path / "liar.mha").write_bytes(
        b"ObjectType = Image\nNDims = 3\nDimSize = 20000 20000 20000\nElementSpacing = 1 1 1\n"
        b"ElementType = MET_SHORT\nElementDataFile = LOCAL\n" + b"\0" * 1000)
    with pytest.raises(InputTooLargeError, match="voxels"):
        read_volume(tmp_path / "liar.mha")


# ------------------------------------------------------------------------------------------ DICOM


def test_dicom_slice_displaced_sideways_is_refused(tmp_path):
    positions = [(-10.0, -8.0, 30.0 + k * sd.SLICE_GAP) for k in range(6)]
    positions[3] = (-10.0 + 5.0, -8.0, positions[3][2])  # 5 mm sideways, correct height
    sd.write_series(tmp_path / "s", positions=positions)
    with pytest.raises(DicomSeriesError, match="slice_03.dcm lies 5 mm away"):
        read_volume(tmp_path / "s")


def test_dicom_orientation_rounding_noise_is_normalised_for_dicom_seg(tmp_path):
    pytest.importorskip("highdicom")
    from UniversalSegLib.io import write_dicom_seg
    from UniversalSegLib.taxonomy import get_taxonomy

    noisy = [(1.0, 0.0, 0.0, 0.0, 1.0, 0.0) if k % 2 else (1.0, 0.00002, 0.0, -0.00002, 1.0, 0.0) for k in range(6)]
    sd.write_series(tmp_path / "s", orientations=noisy)
    volume = read_volume(tmp_path / "s")
    mask = np.zeros(volume.shape, bool)
    mask[5:10, 5:10, 1:4] = True
    liver = get_taxonomy().resolve("liver")[0].index
    out = write_dicom_seg(tmp_path / "seg.dcm", volume, {liver: mask}, get_taxonomy())
    import pydicom

    assert pydicom.dcmread(out).Modality == "SEG"


def test_dicom_series_without_uids_fails_before_inference_for_dicom_seg(tmp_path):
    from UniversalSegLib.api import plan_outputs

    sd.write_series(tmp_path / "s", uids=False)
    volume = read_volume(tmp_path / "s")
    plan = plan_outputs(tmp_path / "s", tmp_path / "out", "nifti,dicom-seg")
    with pytest.raises(DicomSegInputError, match="UID") as error:
        plan.check(False, volume.format, volume=volume)
    assert exit_code_of(error.value) == 3 and isinstance(error.value, DicomSegError)
    assert not (tmp_path / "out").exists()  # the check creates nothing


def test_damaged_and_special_files_in_a_dicom_folder_are_skipped(tmp_path):
    folder = tmp_path / "s"
    paths = sd.write_series(folder, n_slices=6)
    (folder / "notes.txt").write_text("not DICOM")
    os.mkfifo(folder / "a_named_pipe.dcm")  # opening it would block forever
    os.symlink(folder / "loop_b", folder / "loop_a")
    os.symlink(folder / "loop_a", folder / "loop_b")
    (folder / "sub").mkdir()
    os.symlink(folder, folder / "sub" / "back_to_top")  # a folder loop
    damaged = bytearray(paths[0].read_bytes())
    damaged[132 + 20:132 + 60] = os.urandom(40)  # bit flips in the file meta header
    (folder / "zz_damaged.dcm").write_bytes(bytes(damaged))
    (folder / "zz_truncated.dcm").write_bytes(paths[1].read_bytes()[:200])

    result = {}
    reader = threading.Thread(target=lambda: result.setdefault("volume", read_volume(folder)), daemon=True)
    reader.start()
    reader.join(timeout=60)
    assert not reader.is_alive(), "reading a folder with a named pipe hung"
    volume = result["volume"]
    assert volume.shape == (sd.COLUMNS, sd.ROWS, 6)
    skipped = "\n".join(volume.notes)
    assert "a_named_pipe.dcm (not a regular file)" in skipped and "loop_a" in skipped


def test_dicom_folder_with_a_lost_middle_slice_is_refused(tmp_path):
    paths = sd.write_series(tmp_path / "s", n_slices=6)
    paths[2].write_bytes(paths[2].read_bytes()[:100])  # header unreadable: the slice is missing
    with pytest.raises(DicomSeriesError, match="missing") as error:
        read_volume(tmp_path / "s")
    assert exit_code_of(error.value) == 3


def test_dicom_slice_with_truncated_pixel_data_is_refused(tmp_path):
    paths = sd.write_series(tmp_path / "s", n_slices=6)
    paths[4].write_bytes(paths[4].read_bytes()[:-300])
    with pytest.raises(UniversalSegError) as error:
        read_volume(tmp_path / "s")
    assert exit_code_of(error.value) == 3


def test_named_pipe_as_input_file_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.nii.gz")
    with pytest.raises(CorruptFileError, match="not a regular file"):
        read_volume(tmp_path / "pipe.nii.gz")


# ------------------------------------------------------------------------------------------ checkpoints


def test_checkpoint_metadata_claiming_a_huge_width_is_refused_before_building(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from conftest import small_checkpoint
    from UniversalSegLib.checkpoints import load_checkpoint
    from UniversalSegLib.errors import CheckpointError

    path = small_checkpoint(tmp_path / "small.safetensors")
    with safe_open(str(path), "pt") as handle:
        header = dict(handle.metadata())
    key = next(k for k, v in header.items() if v.lstrip().startswith("{"))
    metadata = json.loads(header[key])
    metadata["model"]["backbone_kwargs"]["base_channels"] = 200_000  # a model of hundreds of GB
    header[key] = json.dumps(metadata)
    liar = tmp_path / "liar.safetensors"
    save_file(load_file(str(path)), str(liar), metadata=header)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="base_channels 200000") as error:
            load_checkpoint(liar)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert exit_code_of(error.value) == 4 and peak < 200 * 2**20


def test_gantry_tilted_dicom_series_is_refused_with_advice(tmp_path):
    # Constant axial orientation, but each slice 2.5 mm higher is also 0.67 mm further back: 15 degree tilt.
    positions = [(-10.0, -8.0 + k * sd.SLICE_GAP * np.tan(np.radians(15)), 30.0 + k * sd.SLICE_GAP) for k in range(6)]
    sd.write_series(tmp_path / "s", positions=positions)
    with pytest.raises(InvalidGeometryError, match="sheared") as error:
        read_volume(tmp_path / "s")
    assert "gantry tilt" in str(error.value) and exit_code_of(error.value) == 3


def test_complex_voxels_are_refused_at_reading(tmp_path):
    from UniversalSegLib.errors import InvalidVoxelValuesError

    nib.save(nib.Nifti1Image(_ct_array().astype(np.complex64), np.eye(4)), tmp_path / "complex.nii.gz")
    with pytest.raises(InvalidVoxelValuesError, match="complex"):
        read_volume(tmp_path / "complex.nii.gz")


@pytest.mark.parametrize("name, header", [
    ("negative.mha", b"ObjectType = Image\nNDims = 3\nDimSize = 20 18 8\nElementSpacing = -0.7 0.7 2.5\n"
                     b"ElementType = MET_SHORT\nElementDataFile = LOCAL\n"),
    ("none_axis.nrrd", b"NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\nsizes: 20 18 8\n"
                       b"space directions: none (0,0.7,0) (0,0,2.5)\nendian: little\nencoding: raw\n\n"),
    ("nan.nrrd", b"NRRD0004\ntype: short\ndimension: 3\nsizes: 20 18 8\nspacings: 0.7 nan 2.5\nendian: little\n"
                 b"encoding: raw\n\n"),
])
def test_header_voxel_sizes_itk_would_replace_are_refused(tmp_path, name, header):
    (tmp_path / name).write_bytes(header + _ct_array().astype("<i2").tobytes(order="F"))
    with pytest.raises(InvalidGeometryError) as error:
        read_volume(tmp_path / name)
    assert exit_code_of(error.value) == 3


def test_cli_refuses_dicom_seg_for_a_series_without_uids_before_inference(tmp_path, capsys):
    from conftest import small_checkpoint
    from UniversalSegLib.cli import main

    sd.write_series(tmp_path / "s", uids=False)
    model = small_checkpoint(tmp_path / "small.safetensors")
    code = main(["segment", str(tmp_path / "s"), "-o", str(tmp_path / "out"), "--classes", "liver", "--model",
                 str(model), "--device", "cpu", "--format", "nifti,dicom-seg"])
    err = capsys.readouterr().err
    assert code == 3 and "UID" in err and "inference" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options, error", [
    ({"mode": "bogus"}, "Unknown mode"), ({"runtime": "gpu-ish"}, "Unknown runtime"),
    ({"precision": "float8"}, "Unknown precision"), ({"threads": 0}, "thread count"), ({"threads": 1.5}, "thread count"),
    ({"formats": "nifty"}, "Unknown output format"), ({"formats": 5}, "Output formats are names"),
    ({"classes": 5}, "classes are names"), ({"classes": ["liver", 6]}, "class names must be strings"),
])
def test_api_refuses_a_bad_request_with_a_usage_error_before_reading(tmp_path, options, error):
    """Bad options of the Python API are library errors (exit code 2 in the CLI), raised before the input is
    read and before the output folder is created."""
    from UniversalSegLib.api import segment_file
    from UniversalSegLib.errors import UsageError
    from UniversalSegLib.demo import demo_checkpoint_path

    with pytest.raises(UsageError, match=error) as caught:
        segment_file(tmp_path / "missing.nii.gz", tmp_path / "out", model=demo_checkpoint_path(), **options)
    assert caught.value.exit_code == 2
    assert not (tmp_path / "out").exists()
