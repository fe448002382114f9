"""Small synthetic CT series written with pydicom, for tests that damage or bend DICOM headers.

A body of soft tissue (40 HU) in air (-1000 HU) on a 24 x 20 grid, so that the CT-intensity check of the
readers passes; every slice is one uncompressed single-frame CT Image Storage file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

ROWS, COLUMNS = 20, 24
PIXEL_SPACING = (0.8, 0.7)  # (row spacing, column spacing) in mm
SLICE_GAP = 2.5


def ct_slice_pixels(k: int) -> np.ndarray:
    """Stored values (HU + 1024) of slice ``k``: a soft-tissue block in air."""
    hu = np.full((ROWS, COLUMNS), -1000, np.int16)
    hu[4:16, 5:19] = 40 + k
    return (hu + 1024).astype(np.uint16)


def write_series(folder: Path, n_slices: int = 6, orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
                 positions=None, uids: bool = True, orientations=None) -> list[Path]:
    """Write ``n_slices`` files ``slice_NN.dcm`` into ``folder``; returns their paths (in slice order).

    ``positions``: per-slice ImagePositionPatient (default: along the normal, SLICE_GAP apart).
    ``orientations``: per-slice ImageOrientationPatient (default: ``orientation`` for all).
    ``uids=False`` leaves every UID empty (as some anonymisers do).
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    normal = np.cross(orientation[:3], orientation[3:])
    if positions is None:
        positions = [tuple(float(v) for v in (np.array([-10.0, -8.0, 30.0]) + k * SLICE_GAP * normal)) for k in range(n_slices)]
    study, series, frame = (generate_uid(), generate_uid(), generate_uid()) if uids else ("", "", "")
    paths = []
    for k in range(n_slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        sop = generate_uid()
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop if uids else ""
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality = "CT"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Phantom", "TEST1", "", "O"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "20260101", "120000", "", "", "1"
        ds.SeriesNumber, ds.InstanceNumber = 3, k + 1
        ds.SeriesDescription = "synthetic"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.Manufacturer = "test"
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [f"{v:.6f}" for v in positions[k]]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (orientations[k] if orientations is not None else orientation)]
        ds.PixelSpacing = [f"{v:g}" for v in PIXEL_SPACING]
        ds.SliceThickness = SLICE_GAP
        ds.Rows, ds.Columns = ROWS, COLUMNS
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.PixelData = ct_slice_pixels(k).tobytes()
        path = folder / f"slice_{k:02d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
