"""The in-memory volume of the library: a voxel array in IJK order plus its IJK->RAS affine.

This is the one geometry convention of UniversalSeg (the nibabel one): ``array[i, j, k]`` is the voxel
whose centre lies at ``affine @ [i, j, k, 1]`` in RAS world coordinates (millimetres). Sources that
work in LPS (DICOM, NRRD, MetaImage, SimpleITK) are converted by negating the first two world axes;
:func:`lps_to_ras` / :func:`ras_to_lps` do that for a 4x4 matrix.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Negates x and y: converts a 4x4 matrix between LPS and RAS world coordinates (its own inverse).
LPS_RAS_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


def lps_to_ras(matrix_lps: np.ndarray) -> np.ndarray:
    """IJK->LPS 4x4 matrix -> IJK->RAS 4x4 matrix."""
    return LPS_RAS_FLIP @ np.asarray(matrix_lps, dtype=np.float64)


def ras_to_lps(matrix_ras: np.ndarray) -> np.ndarray:
    """IJK->RAS 4x4 matrix -> IJK->LPS 4x4 matrix."""
    return LPS_RAS_FLIP @ np.asarray(matrix_ras, dtype=np.float64)


def affine_from_lps_geometry(origin, spacing, direction) -> np.ndarray:
    """IJK->RAS affine from ITK-style LPS geometry (origin, spacing, 3x3 direction, row-major or flat)."""
    direction = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = direction @ np.diag(np.asarray(spacing, dtype=np.float64))
    matrix[:3, 3] = np.asarray(origin, dtype=np.float64)
    return lps_to_ras(matrix)


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size along i, j, k in mm (length of each affine column)."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


def orientation_from_affine(affine: np.ndarray) -> str:
    """Three-letter code of the world direction each voxel axis increases towards, e.g. "RAS" or "LPS"."""
    import nibabel as nib

    return "".join(nib.aff2axcodes(np.asarray(affine)))


@dataclass
class Volume:
    """A 3-D scalar image in the library's geometry convention.

    Attributes:
        array: voxel values in IJK order (``array[i, j, k]``), in the file's own dtype, or float32 when
            a rescale (NIfTI ``scl_slope``/``scl_inter``) had to be applied.
        affine: 4x4 float64 IJK->RAS matrix (mm).
        source: the path that was read (file or DICOM folder).
        format: ``"nifti"``, ``"nrrd"``, ``"metaimage"`` or ``"dicom"``.
        modality: the DICOM Modality when known (``"CT"``, ``"MR"``...), else ``None``.
        series_uid: the DICOM SeriesInstanceUID when read from DICOM.
        dicom_files: for DICOM, the source instance files in slice order: ``dicom_files[k]`` holds
            ``array[:, :, k]`` (needed to write a DICOM SEG that references them).
        notes: what the reader decided on the user's behalf (series picked among several, a check
            skipped with ``force``...), in plain sentences for display.
    """

    array: np.ndarray
    affine: np.ndarray
    source: str
    format: str
    modality: str | None = None
    series_uid: str | None = None
    dicom_files: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {self.affine.shape}")
        if self.array.ndim != 3:
            raise ValueError(f"a Volume holds a 3-D array, got shape {self.array.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """Number of voxels along i, j, k."""
        return tuple(int(n) for n in self.array.shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size along i, j, k in mm."""
        return spacing_from_affine(self.affine)

    @property
    def orientation(self) -> str:
        """Axis codes of the voxel axes, e.g. ``"RAS"``, ``"LPS"`` (nibabel's ``aff2axcodes``)."""
        return orientation_from_affine(self.affine)

    @property
    def affine_lps(self) -> np.ndarray:
        """IJK->LPS 4x4 matrix (the DICOM/ITK/Slicer-file convention)."""
        return ras_to_lps(self.affine)

    def describe(self) -> str:
        """One line for logs: format, shape, spacing, orientation, modality."""
        spacing = " x ".join(f"{s:.3g}" for s in self.spacing)
        modality = f", {self.modality}" if self.modality else ""
        return (
            f"{self.format} volume {self.shape[0]}x{self.shape[1]}x{self.shape[2]} voxels, "
            f"{spacing} mm, {self.orientation}{modality} ({self.source})"
        )
