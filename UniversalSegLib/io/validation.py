"""Checks that a volume can be segmented: sane geometry, a size that fits in memory, finite values, CT in HU.

These are the only input checks of UniversalSeg: the readers run them on every file, and preprocessing
runs the geometry check again on arrays handed to it directly (the Python API, the Slicer module).

The CT check looks at the intensity distribution because most file formats (NIfTI, NRRD, MetaImage)
do not say which modality they hold. The rule (:func:`check_ct_intensities`) relies on two facts of
any CT in Hounsfield units that covers a body region: it contains air (lungs, bowel gas, the air
around the patient, the scanner's outside-field-of-view padding at -1024/-2048/-3024 HU), and a good
part of it is fat or soft tissue between -200 and 300 HU. MR images (raw or normalised) have no
values near -1000, and images whose air sits near 0 are not in HU (for example a CT exported without
its rescale intercept), so both fail the air test.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from ..errors import (
    InputTooLargeError,
    InvalidGeometryError,
    InvalidVoxelValuesError,
    NotCTError,
    UnsupportedDimensionsError,
)

#: A voxel size below this (mm) is not a medical image grid (a header with missing units, or a 0).
MIN_SPACING_MM = 0.01
#: A voxel size above this (mm) is not a diagnostic CT (clinical slices are at most ~10 mm thick; larger
#: values almost always mean a header in wrong units, e.g. cm vs um, or a damaged header).
MAX_SPACING_MM = 20.0
#: Voxel axes whose directions deviate from perpendicular by less than this (cosine of the angle between
#: them) are rounding noise of the header and are made exactly perpendicular; beyond it the grid is sheared
#: (for example a gantry-tilted CT), which ITK-based readers (SimpleITK, 3D Slicer) cannot represent.
ORTHOGONALITY_TOLERANCE = 1e-4
#: Below this, direction rounding (float32 NIfTI headers: ~1e-7) is left as it is, so that well-formed
#: inputs keep their exact affine.
DIRECTION_NOISE = 1e-6
#: Most voxels an input or a resampled image may have: 2^31 (e.g. 1024 x 1024 x 2048), beyond any CT scan
#: and beyond the 32-bit indexing of several libraries underneath.
MAX_VOXELS = 2**31
#: Share of the memory the operating system reports as available that one allocation may use (the rest is
#: for the model, the masks and the other programs).
MEMORY_HEADROOM = 0.9

#: Voxels below this value (HU) are air or lung.
AIR_THRESHOLD_HU = -500.0
#: At least this fraction of voxels must be air for a CT of a body region (all shared CTs: >= 33 %).
MIN_AIR_FRACTION = 0.001
#: Soft tissue and fat lie in this range (HU).
SOFT_TISSUE_RANGE_HU = (-200.0, 300.0)
#: At least this fraction of voxels must be fat/soft tissue (all shared CTs: >= 32 %).
MIN_SOFT_TISSUE_FRACTION = 0.05
#: The 99th percentile must stay below this (HU): cortical bone is < 3000 HU; more than 1 % of the
#: voxels above it is not a CT in HU (e.g. a signed 12-bit MR phase image).
MAX_P99_HU = 4000.0
#: The check runs on an evenly strided subsample of at most about this many voxels (speed).
CT_CHECK_MAX_SAMPLES = 2_000_000


def _format_bytes(n_bytes: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n_bytes < 1024 or unit == "PiB":
            return f"{n_bytes:.0f} {unit}" if unit == "bytes" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024.0
    return f"{n_bytes:.1f} PiB"  # pragma: no cover


def available_memory_bytes() -> int | None:
    """Memory this process can still allocate: the operating system's ``MemAvailable``, lowered to the
    remaining room of a cgroup (container) memory limit; None when neither is known."""
    limits = []
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as handle:
            limit = handle.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current", encoding="ascii") as handle:
                limits.append(max(0, int(limit) - int(handle.read().strip())))
    except (OSError, ValueError):
        pass
    if not limits:
        try:
            limits.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    return min(limits)


def check_allocation(n_bytes: int, what: str, source: str) -> None:
    """Raise :class:`InputTooLargeError` when ``what`` (``n_bytes``) exceeds the memory available now."""
    available = available_memory_bytes()
    if available is not None and n_bytes > MEMORY_HEADROOM * available:
        raise InputTooLargeError(
            f"{source}: {what} needs {_format_bytes(n_bytes)} of memory, but only {_format_bytes(available)} "
            f"is available on this machine. Use a machine with more memory, or crop/downsample the image first."
        )


def check_image_size(shape, itemsize: int, source: str, what: str = "the image") -> None:
    """Refuse a header that claims more than :data:`MAX_VOXELS` voxels, or more bytes than the memory
    available, before any voxel is allocated. ``itemsize``: bytes per voxel of the array to be made."""
    dims = [int(n) for n in shape]
    if any(n <= 0 for n in dims):
        raise UnsupportedDimensionsError(f"{source}: {what} has an empty or negative size {tuple(dims)}.")
    n_voxels = math.prod(dims)
    size = " x ".join(str(n) for n in dims)
    if n_voxels > MAX_VOXELS:
        raise InputTooLargeError(
            f"{source}: {what} would have {size} = {n_voxels:,} voxels, more than the {MAX_VOXELS:,} UniversalSeg "
            f"accepts (no CT scan is that large; the header is probably damaged or in wrong units)."
        )
    check_allocation(n_voxels * int(itemsize), f"{what} ({size} voxels, {int(itemsize)} bytes each)", source)


def _describe_axes(spacing: np.ndarray) -> str:
    return ", ".join(f"{s:g}" for s in spacing)


def validate_geometry(affine: np.ndarray, source: str) -> np.ndarray:
    """Check an IJK->RAS affine and return it with header rounding noise removed.

    The one geometry check of UniversalSeg, used when a file is read and again before preprocessing.
    Raises :class:`InvalidGeometryError` unless the affine is a finite 4x4 matrix with last row
    [0, 0, 0, 1], its voxel sizes lie in [MIN_SPACING_MM, MAX_SPACING_MM], and its axes are perpendicular
    (within :data:`ORTHOGONALITY_TOLERANCE`). Directions that are perpendicular only up to rounding (more than
    :data:`DIRECTION_NOISE` off) are made
    exactly perpendicular (nearest rotation, voxel sizes and origin kept), so that every writer stores a
    grid that ITK-based readers accept.

    Sheared grids (gantry-tilted CT) are refused rather than resampled: every output must lie on the
    input's own voxel grid, and a sheared grid cannot be stored in NRRD/MetaImage or read by ITK/Slicer.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise InvalidGeometryError(f"{source}: the affine must be a 4x4 IJK->RAS matrix, got shape {affine.shape}.")
    if not np.all(np.isfinite(affine)):
        raise InvalidGeometryError(f"{source}: the image orientation/position contains NaN or infinite numbers.")
    if not np.allclose(affine[3], [0.0, 0.0, 0.0, 1.0]):
        raise InvalidGeometryError(f"{source}: the last row of the affine must be [0, 0, 0, 1], got {affine[3].tolist()}.")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    for axis, size in zip("ijk", spacing):
        if not (MIN_SPACING_MM <= size <= MAX_SPACING_MM):
            raise InvalidGeometryError(
                f"{source}: implausible voxel size {size:g} mm along axis {axis} "
                f"(spacing {_describe_axes(spacing)} mm); expected between "
                f"{MIN_SPACING_MM:g} and {MAX_SPACING_MM:g} mm. The header's spacing or units are probably wrong."
            )
    directions = affine[:3, :3] / spacing
    # |det| of the unit columns is 1 for perpendicular axes and 0 for parallel ones.
    if abs(np.linalg.det(directions)) < 1e-3:
        raise InvalidGeometryError(
            f"{source}: the affine is singular: two voxel axes point in (almost) the same direction (parallel), "
            f"so voxel positions are undefined. The orientation in the header is invalid."
        )
    cosines = directions.T @ directions
    skew = float(np.max(np.abs(cosines - np.eye(3))))
    if skew > ORTHOGONALITY_TOLERANCE:
        angle = float(np.degrees(np.arcsin(min(1.0, skew))))
        raise InvalidGeometryError(
            f"{source}: the voxel grid is sheared (its axes are {angle:.3g} degrees from perpendicular), as in a "
            f"CT acquired with gantry tilt. UniversalSeg writes its results on the input's own grid, and a "
            f"sheared grid cannot be stored in a form SimpleITK or 3D Slicer can read. Resample the scan onto a "
            f"regular grid first (dcm2niix corrects gantry tilt; in 3D Slicer, enable acquisition geometry "
            f"regularization when loading the DICOM series and harden the transform), then segment that volume."
        )
    if skew > DIRECTION_NOISE:
        u, _, vt = np.linalg.svd(directions)  # nearest rotation (polar decomposition)
        affine = affine.copy()
        affine[:3, :3] = (u @ vt) * spacing
    return affine


def check_finite_values(array: np.ndarray, source: str, force: bool = False) -> int:
    """Count NaN/infinite voxels; raise :class:`InvalidVoxelValuesError` if there are any (unless ``force``).

    Returns the number of non-finite voxels (0 for integer images).
    """
    if not np.issubdtype(array.dtype, np.floating):
        return 0
    n_bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if n_bad and not force:
        n_nan = int(np.count_nonzero(np.isnan(array)))
        raise InvalidVoxelValuesError(
            f"{source}: {n_bad} of {array.size} voxels ({100.0 * n_bad / array.size:.3g} %) are not numbers "
            f"({n_nan} NaN, {n_bad - n_nan} infinite). Fix the image, or use --force (force=True in Python) to treat them as air."
        )
    return n_bad


@dataclass(frozen=True)
class CTIntensityReport:
    """Result of :func:`check_ct_intensities`: the measured statistics and the verdict."""

    minimum: float
    p99: float
    air_fraction: float
    soft_tissue_fraction: float
    is_plausible: bool
    reason: str


def _subsample(array: np.ndarray, max_samples: int = CT_CHECK_MAX_SAMPLES) -> np.ndarray:
    step = max(1, math.ceil((array.size / max_samples) ** (1.0 / 3.0)))
    sample = np.asarray(array[::step, ::step, ::step], dtype=np.float32).ravel()
    return sample[np.isfinite(sample)]


def check_ct_intensities(array: np.ndarray) -> CTIntensityReport:
    """Measure whether ``array`` looks like a CT in Hounsfield units (see the module docstring).

    Plausible when all hold: >= MIN_AIR_FRACTION of voxels below AIR_THRESHOLD_HU, >=
    MIN_SOFT_TISSUE_FRACTION in SOFT_TISSUE_RANGE_HU, and the 99th percentile <= MAX_P99_HU.
    """
    sample = _subsample(array)
    if sample.size == 0:
        return CTIntensityReport(math.nan, math.nan, 0.0, 0.0, False, "the image has no finite voxel values")
    minimum = float(sample.min())
    p99 = float(np.percentile(sample, 99))
    air = float(np.count_nonzero(sample < AIR_THRESHOLD_HU)) / sample.size
    low, high = SOFT_TISSUE_RANGE_HU
    soft = float(np.count_nonzero((sample >= low) & (sample <= high))) / sample.size
    problems = []
    if air < MIN_AIR_FRACTION:
        problems.append(
            f"almost no air: {100 * air:.2g} % of voxels below {AIR_THRESHOLD_HU:g} HU (minimum value {minimum:g}; "
            f"a CT in HU has air near -1000)"
        )
    if soft < MIN_SOFT_TISSUE_FRACTION:
        problems.append(f"only {100 * soft:.2g} % of voxels in the fat/soft-tissue range {low:g}..{high:g} HU")
    if p99 > MAX_P99_HU:
        problems.append(f"1 % of voxels above {p99:g}, beyond any tissue in HU")
    return CTIntensityReport(minimum, p99, air, soft, not problems, "; ".join(problems))


def ensure_ct(array: np.ndarray, source: str, modality: str | None = None, force: bool = False) -> CTIntensityReport | None:
    """Raise :class:`NotCTError` unless the image is a CT in HU (DICOM modality and intensities).

    With ``force=True`` nothing is raised and the report (or ``None`` for a non-CT modality) is
    returned so the caller can record that the check was overridden.
    """
    if modality is not None and modality.upper() != "CT":
        if force:
            return None
        raise NotCTError(
            f"{source}: the DICOM series has Modality {modality!r}, but UniversalSeg segments CT only. "
            f"Use --force (force=True in Python) to process it anyway (the results will not be meaningful)."
        )
    report = check_ct_intensities(array)
    if not report.is_plausible and not force:
        raise NotCTError(
            f"{source}: the voxel values do not look like a CT in Hounsfield units ({report.reason}). "
            f"MR or intensity-normalised images are not supported. If this is a CT stored without its "
            f"rescale (air near 0 instead of -1000 HU), convert it to HU first; use --force (force=True in Python) to process "
            f"it anyway."
        )
    return report
