"""Checks that a freshly read volume can be segmented: sane geometry, finite values, CT in HU.

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
from dataclasses import dataclass

import numpy as np

from .errors import InvalidGeometryError, InvalidVoxelValuesError, NotCTError

#: A voxel size below this (mm) is not a medical image grid (a header with missing units, or a 0).
MIN_SPACING_MM = 0.01
#: A voxel size above this (mm) is not a diagnostic CT (a header in wrong units, e.g. cm vs um).
MAX_SPACING_MM = 100.0

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


def validate_geometry(affine: np.ndarray, source: str) -> None:
    """Raise :class:`InvalidGeometryError` unless the IJK->RAS affine is finite, invertible and the
    voxel sizes lie in [MIN_SPACING_MM, MAX_SPACING_MM]."""
    affine = np.asarray(affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        raise InvalidGeometryError(f"{source}: the image orientation/position contains NaN or infinite numbers.")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    for axis, size in zip("ijk", spacing):
        if not (MIN_SPACING_MM <= size <= MAX_SPACING_MM):
            raise InvalidGeometryError(
                f"{source}: implausible voxel size {size:g} mm along axis {axis} "
                f"(spacing {', '.join(f'{s:g}' for s in spacing)} mm); expected between "
                f"{MIN_SPACING_MM:g} and {MAX_SPACING_MM:g} mm. The header's spacing or units are probably wrong."
            )
    # Columns almost parallel: the grid is degenerate even though each axis has a sane length.
    unit_axes = affine[:3, :3] / spacing
    if abs(np.linalg.det(unit_axes)) < 1e-3:
        raise InvalidGeometryError(f"{source}: the voxel axes are (almost) parallel; the orientation in the header is invalid.")


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
