"""DICOM series: find the image series in a folder, pick one, and read it as a :class:`Volume`.

Headers are read with pydicom (fast, no pixel decoding); pixel data with SimpleITK/GDCM, which
decodes the compressed transfer syntaxes (JPEG, JPEG 2000, JPEG-LS, RLE) without extra packages.
The geometry is computed here from the headers (ImagePositionPatient, ImageOrientationPatient,
PixelSpacing), after checking that the slices form a regular grid, so that a missing slice can never
silently stretch the volume.

Series selection rule (:func:`select_series`) when a folder holds several image series and no
``series_uid`` is given, best first:

1. Modality ``CT`` before any other modality;
2. a real volume (3 or more slices, ImageType without ``LOCALIZER``) before scouts/localizers;
3. more slices;
4. smaller distance between slices (thinner reconstruction);
5. lower SeriesNumber, then SeriesInstanceUID (so that the choice is deterministic).

The choice and the other series are logged (warning) and written to ``Volume.notes``.
"""
from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CorruptFileError, DicomSeriesError, InputTooLargeError, NoDicomError, UnsupportedDimensionsError
from .validation import check_image_size, validate_geometry
from .volume import Volume, lps_to_ras

logger = logging.getLogger(__name__)

#: Objects that hold no image of their own (segmentations, structure sets, reports, presentation states).
NON_IMAGE_MODALITIES = frozenset({"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "SR", "PR", "KO", "REG", "DOC"})
#: Prefix of the substitute series key of files whose SeriesInstanceUID is empty.
MISSING_UID_PREFIX = "missing-uid:"
#: Orientation cosines of two slices of one series may differ by this much (rounding in headers).
ORIENTATION_TOLERANCE = 1e-3
#: A gap between neighbouring slices may differ from the median gap by this fraction.
SLICE_GAP_TOLERANCE = 0.1
#: Slices closer than this (mm) are duplicates.
DUPLICATE_POSITION_MM = 1e-3
#: A slice may lie this far (fraction of the smaller pixel size) beside the line through the first and
#: last slice positions; further is a displaced slice, and the series is not one regular grid.
LATERAL_TOLERANCE = 0.1
#: Bytes at the start of a DICOM Part 10 file before the "DICM" marker.
_PREAMBLE = 128

_HEADER_TAGS = [
    "SOPClassUID", "SOPInstanceUID", "Modality", "SeriesInstanceUID", "SeriesDescription", "SeriesNumber",
    "StudyInstanceUID", "FrameOfReferenceUID", "ImageType", "Rows", "Columns", "NumberOfFrames",
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "RescaleSlope", "RescaleIntercept",
    "InstanceNumber",
]


@dataclass(frozen=True)
class _Instance:
    path: str
    series_uid: str
    modality: str
    description: str
    series_number: int | None
    study_uid: str
    frame_of_reference_uid: str
    image_type: tuple[str, ...]
    rows: int
    columns: int
    frames: int
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    rescale: tuple[float, float]
    instance_number: int | None


@dataclass(frozen=True)
class DicomSeriesInfo:
    """One image series found in a folder (headers only; pixels are not read)."""

    series_uid: str
    """SeriesInstanceUID, or a substitute key starting with MISSING_UID_PREFIX when the files have none."""
    modality: str
    description: str
    series_number: int | None
    n_files: int
    rows: int
    columns: int
    study_uid: str
    frame_of_reference_uid: str
    image_type: tuple[str, ...]
    files: tuple[str, ...]
    """Instance files, sorted along the slice normal when the headers allow it, else by name."""
    slice_spacing: float | None
    """Median distance between neighbouring slice positions (mm), None for a single slice."""
    is_localizer: bool

    def summary(self) -> str:
        """One line such as ``series 2 'CT Body 3.0' (CT, 20 slices of 512x512, 2 mm apart, UID ...)``."""
        number = f"series {self.series_number} " if self.series_number is not None else "series "
        gap = f", {self.slice_spacing:.3g} mm apart" if self.slice_spacing else ""
        scout = ", localizer" if self.is_localizer else ""
        return (
            f"{number}'{self.description}' ({self.modality}, {self.n_files} slices of {self.columns}x{self.rows}"
            f"{gap}{scout}, UID {self.series_uid})"
        )


def _float_tuple(value, length: int) -> tuple[float, ...] | None:
    """``length`` numbers from a header value, or None when it is missing or malformed."""
    if value is None:
        return None
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == length else None


def _int_or_none(value) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def looks_like_dicom(path: str) -> bool:
    """True for a file with the DICOM Part 10 marker ("DICM" after the 128-byte preamble)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(_PREAMBLE)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _parse_header(path: str):
    """_Instance of a DICOM image file; None for a non-image DICOM object; raises for a damaged header."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    modality = str(ds.get("Modality", "") or "").upper()
    if modality in NON_IMAGE_MODALITIES or ds.get("Rows") is None or ds.get("Columns") is None:
        return None
    uid = str(ds.get("SeriesInstanceUID", "") or "")
    if not uid:
        # Some anonymisers blank the UIDs: group such files by what else identifies a series.
        uid = MISSING_UID_PREFIX + "/".join(
            str(ds.get(tag, "") or "") for tag in ("Modality", "SeriesNumber", "SeriesDescription", "FrameOfReferenceUID")
        )
    slope = ds.get("RescaleSlope", 1)
    intercept = ds.get("RescaleIntercept", 0)
    rows, columns = int(ds.Rows), int(ds.Columns)
    if rows <= 0 or columns <= 0:
        raise ValueError(f"image size {columns}x{rows}")
    return _Instance(
        path=path,
        series_uid=uid,
        modality=modality or "unknown",
        description=str(ds.get("SeriesDescription", "") or ""),
        series_number=_int_or_none(ds.get("SeriesNumber")),
        study_uid=str(ds.get("StudyInstanceUID", "") or ""),
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "") or ""),
        image_type=tuple(str(v).upper() for v in (ds.get("ImageType") or ())),
        rows=rows,
        columns=columns,
        frames=_int_or_none(ds.get("NumberOfFrames")) or 1,
        position=_float_tuple(ds.get("ImagePositionPatient"), 3),
        orientation=_float_tuple(ds.get("ImageOrientationPatient"), 6),
        pixel_spacing=_float_tuple(ds.get("PixelSpacing"), 2),
        rescale=(float(slope if slope not in (None, "") else 1), float(intercept if intercept not in (None, "") else 0)),
        instance_number=_int_or_none(ds.get("InstanceNumber")),
    )


def _read_header(path: str, skipped: list[str] | None = None):
    """Header of one file, or None when it is not a DICOM image.

    Never opens anything but a regular file (a named pipe would block forever, a device could be
    endless) and never raises: a file whose DICOM header cannot be decoded (truncated, bit flips) is
    reported in ``skipped`` (file name and reason) when it carries the DICOM marker, ignored otherwise.
    """
    try:
        info = os.stat(path)  # follows symlinks; a symlink loop or dangling link raises here
    except OSError as error:
        if skipped is not None:
            skipped.append(f"{path} ({error.strerror or error})")
        return None
    if not stat.S_ISREG(info.st_mode):
        if skipped is not None:
            skipped.append(f"{path} (not a regular file)")
        return None
    if info.st_size == 0:
        return None
    try:
        return _parse_header(path)
    except Exception as error:  # noqa: BLE001 - pydicom raises many types on damaged headers
        if skipped is not None and looks_like_dicom(path):
            skipped.append(f"{path} (damaged DICOM header: {type(error).__name__})")
        return None


def _scan_folder(folder: Path, skipped: list[str] | None = None) -> dict[str, list[_Instance]]:
    """All DICOM image instances under ``folder`` (recursively), grouped by SeriesInstanceUID.

    Symbolic links to folders are not followed (no loops); damaged or special files are listed in
    ``skipped``.
    """
    series: dict[str, list[_Instance]] = {}
    for root, dirs, files in os.walk(folder):  # followlinks=False: a link loop cannot recurse
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or name.upper() == "DICOMDIR":
                continue
            instance = _read_header(os.path.join(root, name), skipped)
            if instance is not None:
                series.setdefault(instance.series_uid, []).append(instance)
    return series


def _slice_normal(orientation: tuple[float, ...]) -> np.ndarray:
    row, column = np.asarray(orientation[:3]), np.asarray(orientation[3:6])
    return np.cross(row, column)


def _sorted_instances(instances: list[_Instance]) -> list[_Instance]:
    """Sort along the slice normal (ascending), as GDCM does; by instance number/name if geometry is missing."""
    first = instances[0]
    if first.orientation is not None and len(first.orientation) == 6 and all(i.position is not None for i in instances):
        normal = _slice_normal(first.orientation)
        return sorted(instances, key=lambda inst: (float(np.dot(normal, inst.position)), inst.path))
    return sorted(instances, key=lambda inst: (inst.instance_number if inst.instance_number is not None else 0, inst.path))


def _median_gap(instances: list[_Instance]) -> float | None:
    if len(instances) < 2 or instances[0].orientation is None or any(i.position is None for i in instances):
        return None
    normal = _slice_normal(instances[0].orientation)
    distances = np.diff([float(np.dot(normal, i.position)) for i in instances])
    return float(np.median(np.abs(distances)))


def _series_info(instances: list[_Instance]) -> DicomSeriesInfo:
    ordered = _sorted_instances(instances)
    first = ordered[0]
    return DicomSeriesInfo(
        series_uid=first.series_uid,
        modality=first.modality,
        description=first.description,
        series_number=first.series_number,
        n_files=len(ordered),
        rows=first.rows,
        columns=first.columns,
        study_uid=first.study_uid,
        frame_of_reference_uid=first.frame_of_reference_uid,
        image_type=first.image_type,
        files=tuple(i.path for i in ordered),
        slice_spacing=_median_gap(ordered),
        is_localizer="LOCALIZER" in first.image_type or sum(i.frames for i in ordered) < 3,
    )


def _check_folder(folder) -> Path:
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise NoDicomError(f"{folder} is not a folder.")
    return folder


def list_dicom_series(folder) -> list[DicomSeriesInfo]:
    """All DICOM image series under ``folder`` (searched recursively), in selection-rank order.

    Non-image objects (SEG, RTSTRUCT, SR...) and non-DICOM files are skipped. Returns an empty list
    when the folder holds no DICOM image.
    """
    folder = _check_folder(folder)
    infos = [_series_info(instances) for instances in _scan_folder(folder).values()]
    return sorted(infos, key=_selection_key)


def _selection_key(info: DicomSeriesInfo):
    return (
        info.modality != "CT",
        info.is_localizer,
        -info.n_files,
        info.slice_spacing if info.slice_spacing is not None else float("inf"),
        info.series_number if info.series_number is not None else float("inf"),
        info.series_uid,
    )


def select_series(series: list[DicomSeriesInfo], series_uid: str | None = None, where: str = "") -> DicomSeriesInfo:
    """The series to read: the one with ``series_uid``, else the best by the module's selection rule."""
    if not series:
        raise NoDicomError(f"No DICOM image series found in {where}.")
    if series_uid is not None:
        for info in series:
            if info.series_uid == series_uid:
                return info
        available = "\n  ".join(info.summary() for info in series)
        raise DicomSeriesError(f"No series with SeriesInstanceUID {series_uid} in {where}. Available:\n  {available}")
    return min(series, key=_selection_key)


def _check_regular_grid(ordered: list[_Instance], where: str) -> tuple[np.ndarray, np.ndarray]:
    """Check that the slices form one regular grid; return (IJK->LPS matrix, slice positions along normal)."""
    first = ordered[0]
    if first.frames > 1:
        raise DicomSeriesError(
            f"{where}: multi-frame (enhanced) DICOM objects are not supported yet; "
            f"convert the series to single-frame DICOM or NIfTI (e.g. with dcm2niix) first."
        )
    if first.orientation is None or len(first.orientation) != 6 or first.pixel_spacing is None or len(first.pixel_spacing) != 2:
        raise DicomSeriesError(f"{where}: the images lack ImageOrientationPatient/PixelSpacing; they have no 3-D geometry.")
    if any(i.position is not None and len(i.position) != 3 for i in ordered):
        raise DicomSeriesError(f"{where}: an ImagePositionPatient does not hold 3 numbers; the slice positions are unknown.")
    numbers = [first.orientation, first.pixel_spacing] + [i.position for i in ordered if i.position is not None]
    if not all(np.all(np.isfinite(v)) for v in numbers):
        raise DicomSeriesError(f"{where}: ImagePositionPatient, ImageOrientationPatient or PixelSpacing holds a "
                               f"value that is not a finite number.")
    for name, vector in (("row", first.orientation[:3]), ("column", first.orientation[3:])):
        if abs(float(np.linalg.norm(vector)) - 1.0) > ORIENTATION_TOLERANCE:
            raise DicomSeriesError(
                f"{where}: the {name} direction of ImageOrientationPatient {list(first.orientation)} is not a unit "
                f"vector (length {float(np.linalg.norm(vector)):.4g}); the header is damaged."
            )
    if any(i.position is None for i in ordered):
        raise DicomSeriesError(f"{where}: some images lack ImagePositionPatient; their slice positions are unknown.")
    for inst in ordered[1:]:
        if (inst.rows, inst.columns) != (first.rows, first.columns):
            raise DicomSeriesError(
                f"{where}: images of different sizes in one series ({first.columns}x{first.rows} in "
                f"{Path(first.path).name}, {inst.columns}x{inst.rows} in {Path(inst.path).name})."
            )
        if (inst.orientation is None or len(inst.orientation) != 6
                or not np.max(np.abs(np.subtract(inst.orientation, first.orientation))) <= ORIENTATION_TOLERANCE):
            raise DicomSeriesError(f"{where}: the slices have different orientations ({Path(inst.path).name}); not one volume.")
        if (inst.pixel_spacing is None or len(inst.pixel_spacing) != 2
                or not np.max(np.abs(np.subtract(inst.pixel_spacing, first.pixel_spacing))) <= 1e-4):
            raise DicomSeriesError(f"{where}: the slices have different pixel spacings ({Path(inst.path).name}).")

    # Unit length up to rounding was checked above; normalise so the voxel size is exactly PixelSpacing.
    row_cosine = np.asarray(first.orientation[:3]) / np.linalg.norm(first.orientation[:3])
    column_cosine = np.asarray(first.orientation[3:]) / np.linalg.norm(first.orientation[3:])
    positions = np.asarray([i.position for i in ordered], dtype=np.float64)
    along_normal = positions @ np.cross(row_cosine, column_cosine)
    if len(ordered) > 1:
        gaps = np.diff(along_normal)
        duplicates = int(np.count_nonzero(gaps < DUPLICATE_POSITION_MM))
        if duplicates:
            raise DicomSeriesError(
                f"{where}: {duplicates} slice(s) share a position with another slice (several acquisitions, "
                f"echoes or phases stored as one series?). Select a series with one image per position."
            )
        median = float(np.median(gaps))
        uneven = np.abs(gaps - median) > max(SLICE_GAP_TOLERANCE * median, 0.01)
        if np.any(uneven):
            worst = int(np.argmax(np.abs(gaps - median)))
            missing = int(round(gaps[worst] / median)) - 1
            detail = (f"about {missing} slice(s) missing" if missing >= 1 else "uneven slice spacing")
            raise DicomSeriesError(
                f"{where}: the slices are not evenly spaced ({detail}): gaps range from {gaps.min():.4g} to "
                f"{gaps.max():.4g} mm (median {median:.4g} mm); the largest gap is between "
                f"{Path(ordered[worst].path).name} and {Path(ordered[worst + 1].path).name}. "
                f"Re-export the complete series."
            )

        # The slices must also lie on one straight line (checked in all three directions, not only along
        # the normal): a slice displaced sideways would be drawn at the wrong place in every output.
        step = (positions[-1] - positions[0]) / (len(ordered) - 1)
        expected = positions[0] + np.arange(len(ordered))[:, None] * step
        offsets = np.linalg.norm(positions - expected, axis=1)
        limit = max(LATERAL_TOLERANCE * min(first.pixel_spacing), 0.01)
        if float(offsets.max()) > limit:
            worst = int(np.argmax(offsets))
            raise DicomSeriesError(
                f"{where}: slice {Path(ordered[worst].path).name} lies {offsets[worst]:.3g} mm away from where a "
                f"regular series puts it (more than {limit:.3g} mm); the slices do not form one regular grid "
                f"(displaced slice, or images of different reconstructions in one series). Re-export the series."
            )

    # pixel (column c, row r) lies at position + c * column_spacing * row_cosine + r * row_spacing * column_cosine
    row_spacing, column_spacing = first.pixel_spacing[0], first.pixel_spacing[1]
    matrix = np.eye(4)
    matrix[:3, 0] = row_cosine * column_spacing
    matrix[:3, 1] = column_cosine * row_spacing
    if len(ordered) > 1:
        # Mean step between slices; with gantry tilt this is not parallel to the normal (sheared grid).
        matrix[:3, 2] = (positions[-1] - positions[0]) / (len(ordered) - 1)
    else:
        matrix[:3, 2] = np.cross(row_cosine, column_cosine)
    matrix[:3, 3] = positions[0]
    return matrix, along_normal


def _read_pixels(ordered: list[_Instance], where: str) -> np.ndarray:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([i.path for i in ordered])
    if len({i.rescale for i in ordered}) > 1 or any(s != int(s) or b != int(b) for s, b in {i.rescale for i in ordered}):
        # Per-slice or fractional rescale: keep the exact values.
        reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        image = reader.Execute()
    except MemoryError:
        raise InputTooLargeError(f"{where}: not enough memory to read its {len(ordered)} slices.") from None
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown error"
        raise CorruptFileError(
            f"{where}: the DICOM pixel data could not be decoded{_damaged_files(ordered)} ({first_line}). "
            f"The series is incomplete; re-export it."
        ) from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise UnsupportedDimensionsError(f"{where}: colour (RGB) DICOM images are not CT volumes.")
    array = sitk.GetArrayFromImage(image)  # (k, j, i)
    if array.ndim == 2:
        array = array[np.newaxis]
    return array.transpose(2, 1, 0)


def _damaged_files(ordered: list[_Instance]) -> str:
    """`` in <names>`` of the files whose pixel data cannot be decoded one by one ('' if none is found)."""
    import SimpleITK as sitk

    damaged = []
    for instance in ordered:
        try:
            sitk.ReadImage(instance.path)
        except RuntimeError:
            damaged.append(Path(instance.path).name)
    return f" in {', '.join(damaged[:5])}{' ...' if len(damaged) > 5 else ''}" if damaged else ""


def read_dicom_series(folder, series_uid: str | None = None) -> Volume:
    """Read one DICOM image series from ``folder`` (chosen by ``series_uid`` or the selection rule).

    The returned Volume has ``modality``, ``series_uid`` and ``dicom_files`` (one file per k slice) set;
    it is not yet checked for being CT (see :func:`UniversalSegLib.io.readers.read_volume`).
    """
    folder = _check_folder(folder)
    skipped: list[str] = []
    grouped = _scan_folder(folder, skipped)
    notes: list[str] = []
    if skipped:
        listed = "\n  ".join(skipped[:10]) + (f"\n  ... and {len(skipped) - 10} more" if len(skipped) > 10 else "")
        message = (f"{folder}: skipped {len(skipped)} file(s) that could not be read as DICOM (damaged, or not "
                   f"regular files); a missing slice of the chosen series would be refused below:\n  {listed}")
        logger.warning(message)
        notes.append(message)
    if not grouped:
        raise NoDicomError(
            f"No DICOM images found in folder {folder} (searched sub-folders too). "
            f"Give a folder with the .dcm files of one series, or a NIfTI/NRRD/MetaImage file."
        )
    infos = sorted((_series_info(instances) for instances in grouped.values()), key=_selection_key)
    chosen = select_series(infos, series_uid, where=str(folder))
    if len(infos) > 1 and series_uid is None:
        others = "\n  ".join(info.summary() for info in infos if info is not chosen)
        message = (
            f"{folder} holds {len(infos)} image series; using {chosen.summary()}. Other series (pass series_uid "
            f"to choose one):\n  {others}"
        )
        logger.warning(message)
        notes.append(message)
    where = f"DICOM series {chosen.series_uid} in {folder}"
    ordered = _sorted_instances(grouped[chosen.series_uid])
    if len(ordered) < 2:
        raise UnsupportedDimensionsError(
            f"{where}: only one slice; UniversalSeg needs a 3-D volume (a series of at least 2 slices)."
        )
    matrix_lps, _ = _check_regular_grid(ordered, where)
    affine = validate_geometry(lps_to_ras(matrix_lps), where)  # before any pixel is allocated
    check_image_size((ordered[0].columns, ordered[0].rows, len(ordered)), 4, where)
    array = _read_pixels(ordered, where)
    expected = (ordered[0].columns, ordered[0].rows, len(ordered))
    if array.shape != expected:
        raise CorruptFileError(f"{where}: decoded {array.shape} voxels, expected {expected} from the headers.")
    return Volume(
        array=array,
        affine=affine,
        source=str(folder),
        format="dicom",
        modality=chosen.modality,
        series_uid=None if chosen.series_uid.startswith(MISSING_UID_PREFIX) else chosen.series_uid,
        dicom_files=tuple(i.path for i in ordered),
        notes=tuple(notes),
    )


def dicom_series_uid_of_file(path) -> str | None:
    """SeriesInstanceUID of a single DICOM image file, or None when it is not a DICOM image."""
    instance = _read_header(str(path))
    return instance.series_uid if instance is not None else None
