"""Property-based tests (Hypothesis) over the header fields that define geometry and size, and mutations of
DICOM headers and bytes.

Properties:

* reading never ends in anything but a volume or a UniversalSeg input error (exit code 3): no other
  library's exception, no MemoryError, no hang;
* a volume that is returned has the geometry its header states (never a substituted 1 mm, never a slice
  drawn where its file does not put it) and axes ITK can represent;
* every file written for such a volume opens in nibabel, SimpleITK and 3D Slicer's reader with the
  volume's geometry.

Examples are derandomised (the same inputs on every run) and bounded so the module takes well under a
minute on two cores.
"""
from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import synthetic_dicom as sd
from UniversalSegLib.errors import UniversalSegError, exit_code_of
from UniversalSegLib.io import read_volume
from UniversalSegLib.io.validation import MAX_SPACING_MM, MIN_SPACING_MM, ORTHOGONALITY_TOLERANCE

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SLOW_FUZZ = settings(FUZZ, max_examples=20)

_ODD = [0.0, -0.0, -1.0, float("nan"), float("inf"), -float("inf"), 1e-9, 1e9, 3.4e38, 25.0, 0.005]
_valid_size = st.floats(min_value=0.3, max_value=5.0)
#: Three draws in four are plausible voxel sizes, so that both reading and refusing are exercised.
_size_field = st.one_of(_valid_size, _valid_size, _valid_size, st.sampled_from(_ODD))
_corruption = st.one_of(st.none(), st.none(), st.tuples(st.integers(0, 11), st.sampled_from(_ODD + [0.3, -2.0])))


def _ct(shape):
    array = np.full(shape, -1000, np.int16)
    array[1:-1, 1:-1, :] = 40
    return array


def _check_read(path):
    """read_volume(path): a Volume, or a UniversalSeg error with exit code 3 (anything else fails the test)."""
    try:
        volume = read_volume(path)
    except UniversalSegError as error:
        event(f"refused: {type(error).__name__}")
        assert exit_code_of(error) == 3, f"{type(error).__name__}: {error}"
        assert str(path) in str(error) or "DICOM series" in str(error) or "image" in str(error).lower()
        return None
    event("read")
    return volume


def _assert_sane(volume):
    spacing = np.asarray(volume.spacing)
    assert np.all((spacing >= MIN_SPACING_MM) & (spacing <= MAX_SPACING_MM))
    directions = volume.affine[:3, :3] / spacing
    assert np.max(np.abs(directions.T @ directions - np.eye(3))) <= ORTHOGONALITY_TOLERANCE


# ------------------------------------------------------------------------------------------ NIfTI headers


@FUZZ
@given(pixdim=st.tuples(_size_field, _size_field, _size_field),
       sform_code=st.sampled_from([0, 1, 2]), qform_code=st.sampled_from([0, 1]),
       sform_sizes=st.tuples(_valid_size, _valid_size, _valid_size), corruption=_corruption,
       dims=st.one_of(st.none(), st.none(), st.tuples(st.integers(-3, 32767), st.integers(-3, 32767), st.integers(-3, 32767))),
       gz=st.booleans())
def test_nifti_header_fields(tmp_path_factory, pixdim, sform_code, qform_code, sform_sizes, corruption, dims, gz):
    folder = tmp_path_factory.mktemp("nifti")
    image = nib.Nifti1Image(_ct((6, 5, 4)), None)
    matrix = np.diag([*sform_sizes, 1.0])
    matrix[:3, 3] = [-20.0, 15.0, 7.5]
    if corruption is not None:
        matrix[corruption[0] // 4, corruption[0] % 4] = corruption[1]
    header = image.header
    with np.errstate(all="ignore"):
        header["srow_x"], header["srow_y"], header["srow_z"] = matrix[0], matrix[1], matrix[2]
    header["sform_code"], header["qform_code"] = sform_code, qform_code
    header["pixdim"][1:4] = pixdim
    raw = bytearray(header.binaryblock) + b"\0" * 4 + image.get_fdata().astype("<i2").tobytes(order="F")
    raw[70:72] = np.asarray(4, "<i2").tobytes()  # datatype int16
    raw[72:74] = np.asarray(16, "<i2").tobytes()
    raw[108:112] = np.asarray(352, "<f4").tobytes()  # vox_offset
    if dims is not None:
        raw[40:48] = np.asarray((3, *dims), "<i2").tobytes()
    path = folder / ("case.nii.gz" if gz else "case.nii")
    path.write_bytes(gzip.compress(bytes(raw)) if gz else bytes(raw))

    volume = _check_read(path)
    if volume is None:
        return
    _assert_sane(volume)
    if sform_code > 0:
        np.testing.assert_allclose(volume.affine[:3, 3], matrix[:3, 3].astype(np.float32), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(volume.affine[:3, :3], matrix[:3, :3].astype(np.float32), atol=2e-4 * MAX_SPACING_MM)
    else:  # qform or no orientation: the voxel sizes are the header's own, never substituted
        np.testing.assert_allclose(volume.spacing, np.abs(np.float32(pixdim)), rtol=1e-5)
    assert volume.array.shape == (tuple(dims) if dims is not None else (6, 5, 4))


# ------------------------------------------------------------------------------------------ NRRD / MetaImage

_number_text = st.one_of(
    st.sampled_from(["0", "-1", "nan", "inf", "1e300", "1e-300", "abc", ""]),
    st.floats(min_value=0.2, max_value=30, allow_nan=False).map(lambda v: f"{v:.6g}"),
    st.floats(min_value=-2, max_value=2, allow_nan=False).map(lambda v: f"{v:.6g}"),
)


@FUZZ
@given(fmt=st.sampled_from(["nrrd", "mha"]),
       sizes=st.one_of(st.just((5, 4, 3)), st.just((5, 4, 3)), st.tuples(st.integers(0, 70000), st.integers(1, 9), st.integers(1, 9))),
       spacing=st.tuples(_valid_size, _valid_size, _valid_size),
       corruption=st.one_of(st.none(), st.tuples(st.integers(0, 8), _number_text)), drop_spacing=st.booleans())
def test_nrrd_and_metaimage_header_fields(tmp_path_factory, fmt, sizes, spacing, corruption, drop_spacing):
    directions = [f"{v:.6g}" for v in np.diag(spacing).ravel()] if fmt == "nrrd" else [
        f"{v:g}" for v in np.eye(3).ravel()]
    element_spacing = [f"{v:.6g}" for v in spacing]
    if corruption is not None:
        directions[corruption[0]] = corruption[1]
        element_spacing[corruption[0] % 3] = corruption[1]
    folder = tmp_path_factory.mktemp(fmt)
    data = _ct((5, 4, 3)).astype("<i2").tobytes(order="F")
    size_text = " ".join(str(s) for s in sizes)
    if fmt == "nrrd":
        vectors = " ".join("(" + ",".join(directions[3 * i:3 * i + 3]) + ")" for i in range(3))
        spacing_line = "" if drop_spacing else f"space directions: {vectors}\n"
        header = (f"NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\nsizes: {size_text}\n"
                  f"{spacing_line}endian: little\nencoding: raw\nspace origin: (0,0,0)\n\n")
    else:
        spacing_line = "" if drop_spacing else f"ElementSpacing = {' '.join(element_spacing)}\n"
        header = (f"ObjectType = Image\nNDims = 3\nDimSize = {size_text}\n{spacing_line}"
                  f"TransformMatrix = {' '.join(directions)}\nElementType = MET_SHORT\nElementDataFile = LOCAL\n")
    path = folder / f"case.{fmt}"
    path.write_bytes(header.encode() + data)
    volume = _check_read(path)
    if volume is not None:
        _assert_sane(volume)
        assert not drop_spacing and volume.shape == sizes
        if corruption is None:  # the stated voxel sizes, never substituted
            np.testing.assert_allclose(volume.spacing, [float(v) for v in element_spacing], rtol=1e-5)


# ------------------------------------------------------------------------------------------ DICOM mutations

_MUTATIONS = ["position", "orientation", "spacing", "rows", "delete", "flip", "truncate", "noise", "noise", "length"]


@pytest.fixture(scope="module")
def clean_series(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clean")
    return {p.name: p.read_bytes() for p in sd.write_series(folder, n_slices=5)}


def _mutate(data: bytes, kind: str, draw) -> bytes:
    import io

    import pydicom

    if kind == "flip":
        raw = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            at = draw(st.integers(0, min(len(raw) - 1, 1200)))
            raw[at] ^= 1 << draw(st.integers(0, 7))
        return bytes(raw)
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        return _mutate_header(ds, kind, draw)
    except Exception:  # noqa: BLE001 - a file damaged by an earlier mutation, or a value pydicom refuses to store
        return data


def _mutate_header(ds, kind: str, draw) -> bytes:
    import io

    if kind == "noise":  # rounding noise in position and orientation, as real exports have
        ds.ImagePositionPatient = [f"{float(v) + draw(st.floats(-2e-3, 2e-3)):.6f}" for v in ds.ImagePositionPatient]
        ds.ImageOrientationPatient = [f"{float(v) + draw(st.floats(-5e-6, 5e-6)):.7f}" for v in ds.ImageOrientationPatient]
    elif kind == "length":  # a multi-valued field with too few or too many values
        keyword = draw(st.sampled_from(["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"]))
        values = list(getattr(ds, keyword))
        setattr(ds, keyword, values[:-1] if draw(st.booleans()) else values + ["0"])
    elif kind == "position":
        ds.ImagePositionPatient = [draw(_number_text.filter(lambda t: t != "")) or "0" for _ in range(3)]
    elif kind == "orientation":
        values = list(ds.ImageOrientationPatient)
        values[draw(st.integers(0, 5))] = draw(st.sampled_from(["0.5", "1.0001", "0.99", "nan", "1", "0.0002"]))
        ds.ImageOrientationPatient = values
    elif kind == "spacing":
        ds.PixelSpacing = [draw(st.sampled_from(["0", "-0.7", "nan", "1e9", "0.7", "0.71"])), "0.7"]
    elif kind == "rows":
        ds.Rows = draw(st.sampled_from([0, 1, 19, 21, 65535]))
    elif kind == "delete":
        keyword = draw(st.sampled_from(["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                                        "SeriesInstanceUID", "Rows", "PixelData"]))
        if keyword in ds:
            delattr(ds, keyword)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@FUZZ
@given(data=st.data())
def test_dicom_header_and_byte_mutations(tmp_path_factory, clean_series, data):
    folder = tmp_path_factory.mktemp("dicom")
    files = dict(clean_series)
    for _ in range(data.draw(st.integers(0, 2))):
        name = data.draw(st.sampled_from(sorted(files)))
        files[name] = _mutate(files[name], data.draw(st.sampled_from(_MUTATIONS)), data.draw)
    for name, content in files.items():
        (folder / name).write_bytes(content)

    volume = _check_read(folder)
    if volume is None:
        return
    _assert_sane(volume)
    # Every slice is drawn where its own file puts it.
    import pydicom

    for k, path in enumerate(volume.dicom_files):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        stated = np.asarray([float(v) for v in ds.ImagePositionPatient]) * [-1, -1, 1]  # LPS -> RAS
        np.testing.assert_allclose(volume.affine @ [0, 0, k, 1], [*stated, 1], atol=0.05)
        np.testing.assert_allclose(volume.spacing[:2], [float(v) for v in ds.PixelSpacing][::-1], rtol=1e-4)


# ------------------------------------------------------------------------------------------ outputs


def _random_rotation(angles):
    from scipy.spatial.transform import Rotation

    return Rotation.from_euler("xyz", angles, degrees=True).as_matrix()


def _slicer_label_map_ijk_to_ras(path):
    from test_io_writers import read_seg_nrrd_with_slicer

    _, node = read_seg_nrrd_with_slicer(path, "vtkMRMLLabelMapVolumeNode", "vtkMRMLVolumeArchetypeStorageNode")
    matrix = __import__("vtk").vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


@SLOW_FUZZ
@given(angles=st.tuples(*[st.floats(-180, 180)] * 3), spacing=st.tuples(*[st.floats(0.3, 6.0)] * 3),
       noise=st.floats(0, 0.9 * ORTHOGONALITY_TOLERANCE), origin=st.tuples(*[st.floats(-500, 500)] * 3))
def test_every_written_file_opens_with_the_input_geometry(tmp_path_factory, angles, spacing, noise, origin):
    import SimpleITK as sitk

    from UniversalSegLib.io import write_label_map, write_seg_nrrd
    from UniversalSegLib.io.volume import ras_to_lps
    from UniversalSegLib.taxonomy import get_taxonomy

    folder = tmp_path_factory.mktemp("out")
    affine = np.eye(4)
    affine[:3, :3] = _random_rotation(angles) * spacing
    affine[0, 1] += noise * spacing[1]  # header rounding: axes not exactly perpendicular
    affine[:3, 3] = origin
    nib.save(nib.Nifti1Image(_ct((7, 6, 5)), affine), folder / "in.nii.gz")
    volume = _check_read(folder / "in.nii.gz")
    assert volume is not None
    _assert_sane(volume)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-3)
    liver = get_taxonomy().resolve("liver")[0].index
    mask = np.zeros(volume.shape, bool)
    mask[2:5, 1:4, 1:3] = True
    label_map = write_label_map(folder / "labels.nii.gz", volume, {liver: mask}, get_taxonomy())
    seg = write_seg_nrrd(folder / "labels.seg.nrrd", volume, {liver: mask}, get_taxonomy())

    np.testing.assert_allclose(nib.load(label_map).affine, volume.affine, atol=1e-4)
    lps = ras_to_lps(volume.affine)
    for path in (label_map, seg):
        image = sitk.ReadImage(str(path))  # raises for non-orthonormal directions
        np.testing.assert_allclose(image.GetOrigin(), lps[:3, 3], atol=1e-3)
        np.testing.assert_allclose(image.GetSpacing()[:3], volume.spacing, rtol=1e-4)
        np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), lps[:3, :3] / volume.spacing, atol=1e-4)
    np.testing.assert_allclose(_slicer_label_map_ijk_to_ras(label_map), volume.affine, atol=1e-3)
    from test_io_writers import read_seg_nrrd_with_slicer, slicer_segment_mask

    slicer, node = read_seg_nrrd_with_slicer(seg)  # Slicer's own reader: the segment on the input grid
    np.testing.assert_array_equal(slicer_segment_mask(slicer, node, get_taxonomy()[liver].key, volume), mask)
