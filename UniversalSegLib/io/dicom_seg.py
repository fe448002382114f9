"""DICOM Segmentation (SEG) objects that reference the source CT series, written with highdicom.

One BINARY segment per class, in class-index order (segment number 1..n), with the taxonomy's coded
terminology: SegmentedPropertyCategory/Type (+ type modifier, e.g. Right/Left), AnatomicRegion
(+ modifier) for lesions, the recommended display colour, algorithm type AUTOMATIC and algorithm
identification "UniversalSeg" + library version (family: Artificial Intelligence). Tracking ID = class
key. Frames: one per (slice, segment) that contains the segment (empty frames are omitted), each
referencing its source CT instance by SOPInstanceUID.

A DICOM SEG can only be written for a volume read from a DICOM series (``volume.format == "dicom"``),
because it must reference the source instances.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .atomic import atomic_output, prepare_output_path
from ..errors import DicomSegError, DicomSegInputError
from .masks import validate_masks
from .volume import Volume

#: Series number given to the SEG series (source SeriesNumber + this offset, as many tools do).
SERIES_NUMBER_OFFSET = 1000


def _version() -> str:
    from .. import __version__

    return __version__


def _coded(term):
    from highdicom.sr import CodedConcept

    return CodedConcept(value=term.value, scheme_designator=term.scheme, meaning=term.meaning)


def segment_description(number: int, info: Any):
    """highdicom SegmentDescription of one taxonomy class."""
    import highdicom as hd
    from highdicom.color import CIELabColor
    from pydicom.sr.codedict import codes

    terminology = info.terminology
    algorithm = hd.AlgorithmIdentificationSequence(
        name="UniversalSeg", family=codes.cid7162.ArtificialIntelligence, version=_version()
    )
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=info.display_name,
        segmented_property_category=_coded(terminology.category),
        segmented_property_type=_coded(terminology.type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_uid=hd.UID(),
        tracking_id=info.key,
        anatomic_regions=[_coded(terminology.region)] if terminology.region is not None else None,
        display_color=CIELabColor.from_rgb(*(int(c) for c in info.color)),
    )
    # highdicom has no parameters for the modifiers; they are plain attributes of the code items.
    if terminology.type_modifier is not None:
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            _coded(terminology.type_modifier)
        ]
    if terminology.region is not None and terminology.region_modifier is not None:
        description.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [_coded(terminology.region_modifier)]
    return description


#: Source attributes a DICOM SEG must copy or reference.
_REFERENCED_UIDS = ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID")


def _check_source(dataset, path, volume: Volume, first_orientation) -> None:
    for keyword in _REFERENCED_UIDS:
        if not str(dataset.get(keyword, "") or ""):
            raise DicomSegInputError(
                f"Source DICOM file {path} has no {keyword} (anonymised with blank UIDs?); a DICOM SEG "
                f"cannot reference it. Write a .seg.nrrd or NIfTI instead (--format nifti,seg.nrrd)."
            )
    try:
        size = (int(dataset.Columns), int(dataset.Rows))
        orientation = [float(v) for v in dataset.ImageOrientationPatient]
    except (AttributeError, TypeError, ValueError):
        raise DicomSegInputError(f"Source DICOM file {path} lacks a readable size or ImageOrientationPatient.") from None
    if size != volume.shape[:2]:
        raise DicomSegInputError(f"Source DICOM file {path} is {size[0]}x{size[1]}, the volume {volume.shape[:2]}.")
    if first_orientation is not None and max(abs(a - b) for a, b in zip(orientation, first_orientation)) > 1e-3:
        raise DicomSegInputError(f"Source DICOM file {path} has another orientation than the first slice of its series.")


def check_dicom_seg_sources(volume: Volume) -> None:
    """Everything a DICOM SEG needs from the source series, checked from the headers only (before the
    network runs): a DICOM input, one file per slice, the UIDs it must reference, one size and orientation.

    Raises :class:`DicomSegError` (exit code 5) for a non-DICOM input and :class:`DicomSegInputError` (exit
    code 3) for a series that cannot be referenced.
    """
    import pydicom

    _check_volume_is_dicom(volume)
    first = None
    for path in volume.dicom_files:
        try:
            dataset = pydicom.dcmread(path, stop_before_pixels=True,
                                      specific_tags=[*_REFERENCED_UIDS, "Rows", "Columns", "ImageOrientationPatient"])
        except Exception as error:  # noqa: BLE001 - any read failure means the same thing here
            raise DicomSegInputError(f"Cannot re-read source DICOM file {path} ({error}).") from None
        _check_source(dataset, path, volume, first)
        if first is None:
            first = [float(v) for v in dataset.ImageOrientationPatient]


def _check_volume_is_dicom(volume: Volume) -> None:
    if volume.format != "dicom" or not volume.dicom_files:
        raise DicomSegError(
            f"A DICOM SEG must reference the DICOM images it segments, but {volume.source} was read from a "
            f"{volume.format} file. Read the CT from its DICOM series, or write a .seg.nrrd or NIfTI instead."
        )
    if len(volume.dicom_files) != volume.shape[2]:
        raise DicomSegError(
            f"The volume has {volume.shape[2]} slices but references {len(volume.dicom_files)} DICOM files; "
            f"it no longer matches its DICOM series (was it cropped or resampled?)."
        )


def _load_sources(volume: Volume) -> list:
    import pydicom

    _check_volume_is_dicom(volume)
    sources = []
    for path in volume.dicom_files:
        try:
            dataset = pydicom.dcmread(path)
        except Exception as error:  # noqa: BLE001 - any read failure means the same thing here
            raise DicomSegInputError(f"Cannot re-read source DICOM file {path} ({error}).") from None
        _check_source(dataset, path, volume, sources[0].ImageOrientationPatient if sources else None)
        if "SpecificCharacterSet" in dataset and not str(dataset.SpecificCharacterSet or "").strip():
            # An empty value means the default repertoire; highdicom rejects the empty string itself.
            del dataset.SpecificCharacterSet
        if sources:
            # Orientations equal up to header rounding (checked when the series was read) are made
            # identical: highdicom requires one shared orientation.
            dataset.ImageOrientationPatient = sources[0].ImageOrientationPatient
        sources.append(dataset)
    return sources


def write_dicom_seg(path, volume: Volume, masks: Mapping[int, np.ndarray], classes: Any, overwrite: bool = False) -> Path:
    """Write a BINARY DICOM SEG of ``masks`` referencing the DICOM series ``volume`` was read from.

    Args:
        path: output file (``.dcm`` recommended).
        volume: a volume read from DICOM (its ``dicom_files`` are referenced frame by frame).
        masks: ``{class index: bool array}`` on the volume's grid; at least one.
        classes: the taxonomy (or list of ClassInfo) with names, colours and coded terminology.
        overwrite: replace an existing file.
    """
    import highdicom as hd

    masks, table = validate_masks(volume, masks, classes)
    if not masks:
        raise DicomSegError("A DICOM SEG needs at least one segment; no mask was given.")
    path = prepare_output_path(path, overwrite)  # fail before the work if the name is taken
    sources = _load_sources(volume)
    order = list(masks)
    # Only slices that hold any class are passed (with their plane positions): this bounds memory by the
    # segmented region instead of (slices x rows x columns x classes).
    # Classes are the outer loop: masks made on access (a fine CT's LazyMasks) are made twice per class,
    # not once per slice.
    filled = np.zeros(volume.shape[2], dtype=bool)
    for index in order:
        filled |= masks[index].any(axis=(0, 1))
    occupied = [int(k) for k in np.flatnonzero(filled)]
    any_voxel = bool(occupied)
    if not any_voxel:
        occupied = [0]  # every segment empty: one empty frame keeps the object valid
    pixels = np.zeros((len(occupied), volume.shape[1], volume.shape[0], len(order)), dtype=bool)
    for s, index in enumerate(order):
        # IJK (column, row, slice) -> DICOM frames of (row, column)
        pixels[:, :, :, s] = masks[index][:, :, occupied].transpose(2, 1, 0)
    positions = [hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, sources[k].ImagePositionPatient) for k in occupied]
    source_number = sources[0].get("SeriesNumber")
    descriptions = [segment_description(n, table[i]) for n, i in enumerate(order, start=1)]
    try:
        with warnings.catch_warnings():
            # Source headers such as PatientName "JANCT000" are copied as they are; do not nag about them.
            warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name.*")
            segmentation = hd.seg.Segmentation(
                source_images=sources,
                pixel_array=pixels,
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=descriptions,
                series_instance_uid=hd.UID(),
                series_number=(int(source_number) if source_number not in (None, "") else 0) + SERIES_NUMBER_OFFSET,
                sop_instance_uid=hd.UID(),
                instance_number=1,
                manufacturer="UniversalSeg",
                manufacturer_model_name="UniversalSeg",
                software_versions=_version(),
                device_serial_number="0",
                content_label="UNIVERSALSEG",
                content_description="Automatic segmentation by UniversalSeg",
                series_description="UniversalSeg segmentation",
                plane_positions=positions,
                omit_empty_frames=any_voxel,
            )
    except (ValueError, TypeError, AttributeError, KeyError) as error:
        raise DicomSegError(f"Cannot build a DICOM SEG for {volume.source}: {error}") from None
    with atomic_output(path, overwrite) as temporary:
        segmentation.save_as(str(temporary))
    return path
