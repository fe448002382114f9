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
import os
import stat
import zlib
from pathlib import Path

import numpy as np

from .dicom import dicom_series_uid_of_file, read_dicom_series
from ..errors import (
    CorruptFileError,
    InputNotFoundError,
    InvalidGeometryError,
    InvalidVoxelValuesError,
    UniversalSegIOError,
    InputTooLargeError,
    UnsupportedDimensionsError,
    UnsupportedFormatError,
)
from .validation import check_finite_values, check_image_size, ensure_ct, validate_geometry
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


def _raw_nifti_header(image, source: str):
    """The header exactly as stored: nibabel's loader "fixes" some fields (zero voxel sizes become 1 mm)."""
    from nibabel.openers import ImageOpener

    try:
        with ImageOpener(image.file_map["image"].filename) as handle:
            return type(image.header).from_fileobj(handle, check=False)
    except Exception as error:  # noqa: BLE001 - the same file was just parsed by nibabel; any failure is damage
        raise CorruptFileError(f"{source}: the NIfTI header cannot be read ({type(error).__name__}: {error}).") from None


def _nifti_geometry(image, source: str, notes: list[str]):
    """Check the header fields that define the grid, before nibabel substitutes anything.

    nibabel takes the sform when ``sform_code > 0``, else the qform (``qform_code > 0``, scaled by the voxel
    sizes ``pixdim[1:4]``), else an orientation-free default built from ``pixdim``; when loading, it also
    replaces zero voxel sizes by 1 mm. A CT with such a header would be segmented on a made-up grid, so
    voxel sizes that are zero, negative or not finite are refused unless an sform defines the grid.
    """
    raw = _raw_nifti_header(image, source)
    sform_code, qform_code = int(raw["sform_code"]), int(raw["qform_code"])
    pixdim = np.asarray(raw["pixdim"][1:4], dtype=np.float64)
    if sform_code <= 0 and not (np.all(np.isfinite(pixdim)) and np.all(pixdim > 0)):
        which = "qform (qform_code > 0)" if qform_code > 0 else "sform or qform"
        raise InvalidGeometryError(
            f"{source}: the header gives voxel sizes (pixdim) {pixdim.tolist()} mm, which are zero, negative or not "
            f"numbers, and no sform defines the grid (it relies on the {which}). Reading it would assume "
            f"1 mm voxels and a wrong image size. Fix the header's voxel sizes (for example with nibabel or "
            f"fslhd/fslorient) and try again."
        )
    if sform_code <= 0 and qform_code <= 0:
        message = (f"{source}: the NIfTI header has no orientation (sform_code and qform_code are 0); the voxel "
                   f"sizes are used, but the orientation is nibabel's default (LAS), so left and right may be "
                   f"swapped in the results.")
        logger.warning(message)
        notes.append(message)


def _gzip_length_at_least(source: str, needed: int) -> int:
    """Uncompressed length of a gzip file, counted in chunks up to ``needed`` bytes (bounded memory).

    The gzip trailer states the length (mod 2^32) of the last member, which is enough for the usual
    single-member file; multi-member files (bgzip) are counted.
    """
    import gzip

    with open(source, "rb") as handle:
        handle.seek(-4, os.SEEK_END)
        stated = int.from_bytes(handle.read(4), "little")
    if stated == needed % 2**32 and needed < 2**32:
        return needed
    total = 0
    try:
        with gzip.open(source, "rb") as stream:
            while total < needed:
                chunk = stream.read(min(1 << 22, needed - total))
                if not chunk:
                    break
                total += len(chunk)
    except (OSError, EOFError, zlib.error) as error:
        raise CorruptFileError(f"{source}: the compressed data is truncated or damaged ({error}).") from None
    return total


def _check_nifti_length(source: str, needed: int, shape) -> None:
    """Refuse a file shorter than its header says, before the voxels are allocated (a lying header)."""
    length = _gzip_length_at_least(source, needed) if source.lower().endswith(".gz") else os.path.getsize(source)
    if length < needed:
        raise CorruptFileError(
            f"{source}: the file is truncated or its header is wrong: the header describes {tuple(shape)} voxels "
            f"({needed} bytes with the header), but the file holds only {length} bytes."
        )


def _check_real_dtype(dtype: np.dtype, source: str) -> None:
    """A CT holds one real number per voxel: refuse complex, boolean and structured (RGB) voxel types."""
    if dtype.fields is not None:
        raise UnsupportedDimensionsError(f"{source}: the image has colour (RGB) voxels; a CT has one value per voxel.")
    if dtype.kind not in "iuf":
        raise InvalidVoxelValuesError(f"{source}: the voxels are of type {dtype} ({'complex' if dtype.kind == 'c' else 'not numbers'}); "
                                      f"a CT holds one real number (HU) per voxel.")


def _read_nifti(path: Path) -> Volume:
    import nibabel as nib

    source = str(path)
    try:
        image = nib.load(source)
    except Exception as error:  # nibabel raises many types (ImageFileError, HeaderDataError, OSError...)
        raise CorruptFileError(f"{source}: not a readable NIfTI file ({type(error).__name__}: {error}).") from None
    notes: list[str] = []
    _nifti_geometry(image, source, notes)
    try:
        raw_affine = np.asarray(image.affine, dtype=np.float64)
        dtype = np.dtype(image.get_data_dtype())
        scaled = bool(image.dataobj.slope != 1 or image.dataobj.inter != 0)
    except (ValueError, TypeError) as error:
        raise CorruptFileError(f"{source}: the NIfTI header is damaged ({error}).") from None
    affine = validate_geometry(raw_affine, source)
    shape = _squeeze_to_3d(image.shape, source)
    _check_real_dtype(dtype, source)
    # Check the claimed size before anything is allocated: a rescaled image is computed in float64, then
    # kept as float32.
    check_image_size(image.shape, dtype.itemsize + (12 if scaled else 0), source)
    _check_nifti_length(source, int(image.dataobj.offset) + dtype.itemsize * int(np.prod(image.shape)), image.shape)
    try:
        # dataobj applies scl_slope/scl_inter; reading everything now detects truncated files here.
        array = np.asanyarray(image.dataobj)
    except (EOFError, OSError, zlib.error, ValueError) as error:
        raise CorruptFileError(
            f"{source}: the file is truncated or damaged; its voxel data could not be read ({error})."
        ) from None
    except MemoryError:
        raise InputTooLargeError(f"{source}: not enough memory to read its {image.shape} voxels.") from None
    if array.dtype.fields is not None:
        raise UnsupportedDimensionsError(f"{source}: the image has colour (RGB) voxels; a CT has one value per voxel.")
    array = array.reshape(shape, order="A") if array.shape != shape else array
    if np.issubdtype(array.dtype, np.floating) and array.dtype != np.float32 and scaled:
        # A rescaled integer image: float32 holds HU exactly and halves the memory of float64.
        array = array.astype(np.float32)
    return Volume(array=array, affine=affine, source=source, format="nifti", notes=tuple(notes))


def _sitk_error_text(error: Exception) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


#: Bytes per voxel of SimpleITK's scalar pixel types (by their names); unknown types count as 8.
_SITK_ITEMSIZE = {"8-bit unsigned integer": 1, "8-bit signed integer": 1, "16-bit unsigned integer": 2,
                  "16-bit signed integer": 2, "32-bit unsigned integer": 4, "32-bit signed integer": 4,
                  "64-bit unsigned integer": 8, "64-bit signed integer": 8, "32-bit float": 4, "64-bit float": 8}
#: Header fields that state the voxel size: ITK assumes 1 mm when none is present.
_SPACING_FIELDS = {"nrrd": ("space directions", "spacings"), "metaimage": ("elementspacing", "elementsize")}
#: How much of a text header is read to find them.
_TEXT_HEADER_LIMIT = 65536


def _check_spacing_is_stated(path: Path, fmt: str) -> None:
    """Refuse a NRRD/MetaImage header that does not state a usable voxel size for every axis: ITK would
    silently use 1 mm (no field, or a NRRD axis whose direction is "none") or its absolute value (a
    negative MetaImage ElementSpacing, which would mirror the image)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(_TEXT_HEADER_LIMIT)
    except OSError as error:
        raise CorruptFileError(f"{path}: cannot be read ({error.strerror or error}).") from None
    end = b"\n\n" if fmt == "nrrd" else b"elementdatafile"
    text = head.lower().split(end)[0].decode("latin-1")
    separator = ":" if fmt == "nrrd" else "="
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(separator)
        fields[key.strip()] = value.strip()
    stated = [key for key in _SPACING_FIELDS[fmt] if key in fields]
    if not stated:
        raise InvalidGeometryError(
            f"{path}: the {fmt.upper()} header does not state the voxel size (no "
            f"{' or '.join(_SPACING_FIELDS[fmt])} field); reading it would assume 1 mm voxels. Add the voxel "
            f"size to the header and try again."
        )
    value = fields[stated[0]]
    if stated[0] == "space directions":
        if value.count("(") < 3:
            raise InvalidGeometryError(
                f"{path}: the NRRD header gives fewer than three spatial axes a direction ({value!r}); reading it "
                f"would assume 1 mm along the others."
            )
        return
    try:
        sizes = [float(v) for v in value.replace(",", " ").split()]
    except ValueError:
        sizes = [float("nan")]
    if not all(np.isfinite(v) and v > 0 for v in sizes[:3]):
        raise InvalidGeometryError(
            f"{path}: the header's voxel size {stated[0]} = {value!r} is not a positive number for every axis; "
            f"ITK would substitute a value (or mirror the image). Fix the header and try again."
        )


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
    _check_spacing_is_stated(path, fmt)
    # Geometry and size from the header, checked before the voxels are allocated.
    dimension = len(reader.GetSize())
    direction = np.asarray(reader.GetDirection(), dtype=np.float64).reshape(dimension, dimension)[:3, :3]
    validate_geometry(affine_from_lps_geometry(reader.GetOrigin()[:3], reader.GetSpacing()[:3], direction), source)
    check_image_size(reader.GetSize(), _SITK_ITEMSIZE.get(sitk.GetPixelIDValueAsString(reader.GetPixelID()), 8), source)
    try:
        image = reader.Execute()
    except MemoryError:
        raise InputTooLargeError(f"{source}: not enough memory to read its {tuple(reader.GetSize())} voxels.") from None
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
    affine = validate_geometry(affine_from_lps_geometry(image.GetOrigin(), image.GetSpacing(), image.GetDirection()), source)
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
    mode = path.stat().st_mode
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):  # a named pipe or device would block or never end
        raise CorruptFileError(f"{source}: not a regular file or folder (a pipe, socket or device); give an image file.")
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

    volume.affine = validate_geometry(volume.affine, source)
    _check_real_dtype(volume.array.dtype, source)
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
