"""File input/output of UniversalSeg: read CT volumes, write segmentation results.

Readers return a :class:`Volume` (IJK array + IJK->RAS affine). Writers put per-class masks on the
volume's own grid into a NIfTI label map, per-class NIfTI masks, a Slicer ``.seg.nrrd`` or a DICOM
SEG; every writer is atomic and never overwrites an existing file unless asked.
"""
from .dicom import DicomSeriesInfo, list_dicom_series, read_dicom_series, select_series
from ..errors import (
    CorruptFileError,
    DicomSegError,
    DicomSeriesError,
    InputNotFoundError,
    InvalidGeometryError,
    InvalidMaskError,
    InvalidVoxelValuesError,
    NoDicomError,
    NotCTError,
    OutputExistsError,
    OutputNotWritableError,
    UniversalSegIOError,
    UnsupportedDimensionsError,
    UnsupportedFormatError,
)
from .readers import read_volume
from .validation import check_ct_intensities
from .volume import Volume, lps_to_ras, ras_to_lps
from .writers import write_class_masks, write_dicom_seg, write_label_map, write_seg_nrrd

__all__ = [
    "CorruptFileError", "DicomSegError", "DicomSeriesError", "DicomSeriesInfo", "InputNotFoundError",
    "InvalidGeometryError", "InvalidMaskError", "InvalidVoxelValuesError", "NoDicomError", "NotCTError",
    "OutputExistsError", "OutputNotWritableError", "UniversalSegIOError", "UnsupportedDimensionsError",
    "UnsupportedFormatError", "Volume", "check_ct_intensities", "list_dicom_series", "lps_to_ras",
    "ras_to_lps", "read_dicom_series", "read_volume", "select_series", "write_class_masks", "write_dicom_seg",
    "write_label_map", "write_seg_nrrd",
]
