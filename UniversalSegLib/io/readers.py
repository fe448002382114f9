"""Read a CT volume from NIfTI, NRRD, MetaImage or a DICOM series into a :class:`Volume`.

:func:`read_volume` is the single entry point: it picks the reader from the path (a folder or a
single ``.dcm`` file means DICOM), then runs the checks of :mod:`.validation` (geometry, finite values,
CT in Hounsfield units). Every failure raises a :class:`UniversalSegIOError` subclass that names the
file and says what is wrong; library exceptions never escape with their own stack trace.

NIfTI is read with nibabel (``scl_slope``/``scl_inter`` applied; nibabel chooses between sform and
qform), NRRD and MetaImage with SimpleITK (LPS geometry converted to RAS).
"""
from __future__ import annotations

import logging
import zlib
from pathlib import Path

import numpy as np

from .dicom import dicom_series_uid_of_file, read_dicom_series
from .errors import (
    CorruptFileError,
    InputNotFoundError,
    UniversalSegIOError,
    UnsupportedDimensionsError,
    UnsupportedFormatError,
)
from .validation import check_finite_values, ensure_ct, validate_geometry
from .volume import Volume, affine_from_lps_geometry

logger = logging.getLogger(__name__)

#: File name endings (lower case) and the format they hold.
FORMAT_BY_SUFFIX = {
    ".nii.gz": "nifti",
    ".nii": "nifti",
    ".nrrd": "nrrd",
    ".nhdr": "nrrd",
    ".mha": "metaimage",
    ".mhd": "metaimage",
    ".dcm": "dicom",
    ".dicom": "dicom",
}


def format_from_path(path) -> str | None:
    """``"nifti"``, ``"nrrd"``, ``"metaimage"``, ``"dicom"`` from the file name, or None if unknown."""
    name = Path(path).name.lower()
    for suffix, fmt in FORMAT_BY_SUFFIX.items():
        if name.endswith(suffix):
            return fmt
    return None


def _supported_list() -> str:
    return ", ".join(FORMAT_BY_SUFFIX) + ", or a folder of DICOM files"


def _squeeze_to_3d(shape: tuple[int, ...], source: str) -> tuple[int, int, int]:
    """The 3-D shape of an image, refusing 2-D images and images with several time points/components."""
    dims = list(shape)
    while len(dims) > 3 and dims[-1] == 1:
        dims.pop()
    if len(dims) > 3:
        raise UnsupportedDimensionsError(
            f"{source}: the image has {len(dims)} dimensions {tuple(shape)} (several time points, echoes or "
            f"components). UniversalSeg needs a single 3-D CT volume; extract one volume first."
        )
    if len(dims) < 3 or min(dims) < 2:
        raise UnsupportedDimensionsError(
            f"{source}: the image is 2-D (shape {tuple(shape)}). UniversalSeg needs a 3-D CT volume "
            f"with at least 2 slices along each axis."
        )
    return tuple(dims)  # type: ignore[return-value]


def _read_nifti(path: Path) -> Volume:
    import nibabel as nib

    source = str(path)
    try:
        image = nib.load(source)
    except Exception as error:  # nibabel raises many types (ImageFileError, HeaderDataError, OSError...)
        raise CorruptFileError(f"{source}: not a readable NIfTI file ({type(error).__name__}: {error}).") from None
    shape = _squeeze_to_3d(image.shape, source)
    try:
        # dataobj applies scl_slope/scl_inter; reading everything now detects truncated files here.
        array = np.asanyarray(image.dataobj)
    except (EOFError, OSError, zlib.error, ValueError) as error:
        raise CorruptFileError(
            f"{source}: the file is truncated or damaged; its voxel data could not be read ({error})."
        ) from None
    if array.dtype.fields is not None:
        raise UnsupportedDimensionsError(f"{source}: the image has colour (RGB) voxels; a CT has one value per voxel.")
    array = array.reshape(shape, order="A") if array.shape != shape else array
    slope, inter = image.dataobj.slope, image.dataobj.inter
    if np.issubdtype(array.dtype, np.floating) and array.dtype != np.float32 and (slope != 1 or inter != 0):
        # A rescaled integer image: float32 holds HU exactly and halves the memory of float64.
        array = array.astype(np.float32)
    return Volume(array=array, affine=np.asarray(image.affine, dtype=np.float64), source=source, format="nifti")


def _sitk_error_text(error: Exception) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _read_with_sitk(path: Path, fmt: str) -> Volume:
    import SimpleITK as sitk

    source = str(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(source)
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise CorruptFileError(f"{source}: not a readable {fmt.upper()} file ({_sitk_error_text(error)}).") from None
    if reader.GetNumberOfComponents() != 1:
        raise UnsupportedDimensionsError(
            f"{source}: each voxel has {reader.GetNumberOfComponents()} components (vector/colour image); "
            f"UniversalSeg needs a scalar 3-D CT volume."
        )
    _squeeze_to_3d(tuple(reader.GetSize()), source)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise CorruptFileError(
            f"{source}: the voxel data could not be read; the file is truncated or damaged, or a data file "
            f"its header refers to is missing ({_sitk_error_text(error)})."
        ) from None
    if image.GetDimension() == 4:  # (x, y, z, 1): keep the only volume
        image = image[:, :, :, 0]
    if image.GetDimension() != 3:
        raise UnsupportedDimensionsError(f"{source}: a {image.GetDimension()}-D image; UniversalSeg needs 3-D.")
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # ITK (k, j, i) -> IJK
    affine = affine_from_lps_geometry(image.GetOrigin(), image.GetSpacing(), image.GetDirection())
    return Volume(array=array, affine=affine, source=source, format=fmt)


def read_volume(path, series_uid: str | None = None, force: bool = False) -> Volume:
    """Read a CT volume in IJK order with its IJK->RAS affine.

    Args:
        path: a ``.nii``/``.nii.gz``, ``.nrrd``/``.nhdr``, ``.mha``/``.mhd`` file, a folder of DICOM files
            (searched recursively) or one ``.dcm`` file (its whole series is read).
        series_uid: for DICOM, the SeriesInstanceUID to read; by default the series is chosen by the
            rule in :mod:`.dicom` (CT first, then most slices...) and the choice is logged.
        force: read the volume even if it does not look like a CT in HU (non-CT DICOM modality or
            implausible intensities) or has NaN/infinite voxels (they are then set to -1024 HU, air).
            Geometry errors (2-D, 4-D, missing slices, absurd spacing) are never overridden.

    Raises:
        UniversalSegIOError: one of its subclasses (see :mod:`.errors`) for every problem.
    """
    path = Path(path).expanduser()
    source = str(path)
    if not path.exists():
        raise InputNotFoundError(f"Input not found: {source}")
    if path.is_dir():
        volume = read_dicom_series(path, series_uid)
    else:
        fmt = format_from_path(path)
        if path.stat().st_size == 0:
            raise CorruptFileError(f"{source}: the file is empty (0 bytes).")
        if fmt is None:
            uid = dicom_series_uid_of_file(path)
            if uid is None:
                raise UnsupportedFormatError(
                    f"{source}: unknown file type {''.join(path.suffixes) or '(no extension)'}. "
                    f"Supported: {_supported_list()}."
                )
            fmt = "dicom"
        if fmt == "dicom":
            file_series = dicom_series_uid_of_file(path)
            if file_series is None:
                raise CorruptFileError(f"{source}: not a readable DICOM image file.")
            if series_uid is not None and series_uid != file_series:
                raise UniversalSegIOError(
                    f"{source} belongs to series {file_series}, not to the requested series {series_uid}."
                )
            volume = read_dicom_series(path.parent, file_series)
        else:
            if series_uid is not None:
                raise UniversalSegIOError(f"series_uid applies to DICOM input only; {source} is a {fmt} file.")
            volume = _read_nifti(path) if fmt == "nifti" else _read_with_sitk(path, fmt)

    validate_geometry(volume.affine, source)
    notes = list(volume.notes)
    n_bad = check_finite_values(volume.array, source, force=force)
    if n_bad:
        array = volume.array.copy()
        array[~np.isfinite(array)] = -1024.0
        volume.array = array
        notes.append(f"{n_bad} NaN/infinite voxels were set to -1024 HU (air) because force=True.")
    report = ensure_ct(volume.array, source, modality=volume.modality, force=force)
    if force and (report is None or not report.is_plausible):
        why = f"Modality {volume.modality}" if report is None else report.reason
        notes.append(f"The image does not look like a CT in HU ({why}); read anyway because force=True.")
    for note in notes[len(volume.notes):]:
        logger.warning("%s: %s", source, note)
    volume.notes = tuple(notes)
    return volume
