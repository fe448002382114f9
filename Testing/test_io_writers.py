"""Writers of UniversalSegLib.io: geometry == input geometry, round trips, overlap rule, no-overwrite, atomicity.

Masks are a few boxes inside the body of real CTs (no model needed). Outputs are read back with
independent readers: nibabel, slicerio, the real Slicer MRML (slicer-core) and highdicom.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import require_shared

from UniversalSegLib.io import (
    DicomSegError,
    InvalidMaskError,
    OutputExistsError,
    OutputNotWritableError,
    UnsupportedFormatError,
    Volume,
    read_volume,
)
from UniversalSegLib.io.atomic import TEMP_PREFIX
from UniversalSegLib.io import masks as masks_module
from UniversalSegLib.io.masks import OVERLAP_RULE, label_map_from_masks, paint_label_map
from UniversalSegLib.taxonomy import KIND_PRIORITY
from UniversalSegLib.io.writers import (
    sidecar_paths,
    write_class_masks,
    write_dicom_seg,
    write_label_map,
    write_seg_nrrd,
)
from UniversalSegLib.taxonomy import get_taxonomy

CT_NIFTI = "data/totalsegmentator/example_ct.nii.gz"
CT_DICOM = "data/totalsegmentator/example_ct_dicom"
CT3_DICOM = "data/dcmqi_ct3slice/dicom"
CT3_REFERENCE_SEG = "data/dcmqi_ct3slice/liver_SEG.dcm"

TAXONOMY = get_taxonomy()
SPLEEN, RIGHT_KIDNEY, GALLBLADDER, LIVER, AORTA = 1, 2, 4, 6, 8
LIVER_TUMOR, KIDNEY_CYST = 27, 32


def box(shape, lo, hi) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return mask


def organ_masks(shape) -> dict[int, np.ndarray]:
    """Liver with a tumour inside, the aorta crossing the liver's edge, a spleen, and an empty gallbladder."""
    x, y, z = shape
    return {
        LIVER: box(shape, (x // 5, y // 3, z // 3), (x // 2, 2 * y // 3, 2 * z // 3)),
        LIVER_TUMOR: box(shape, (x // 4, y // 2 - 3, z // 2 - 3), (x // 4 + 4, y // 2 + 3, z // 2 + 3)),
        AORTA: box(shape, (x // 2 - 3, y // 2 - 2, 0), (x // 2 + 2, y // 2 + 2, z)),
        SPLEEN: box(shape, (2 * x // 3, y // 3, z // 3), (2 * x // 3 + 8, y // 3 + 8, z // 3 + 6)),
        GALLBLADDER: np.zeros(shape, dtype=bool),
    }


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def ct():
    return read_volume(require_shared(CT_NIFTI))


@pytest.fixture(scope="module")
def ct3():
    return read_volume(require_shared(CT3_DICOM))


@pytest.fixture(scope="module")
def oblique_volume():
    """A synthetic left-handed oblique grid (LAS-like, rotated), to exercise every geometry path."""
    a, b = np.deg2rad(25.0), np.deg2rad(-8.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag([-1.25, 0.8, 2.5])
    affine[:3, 3] = (101.5, -37.25, 12.0)
    array = np.full((30, 24, 12), -1000, dtype=np.int16)
    return Volume(array=array, affine=affine, source="synthetic", format="nifti")


# ----------------------------------------------------------------------------------------- label map
def test_label_map_has_the_input_grid_and_the_overlap_rule(tmp_path, ct):
    masks = organ_masks(ct.shape)
    path = write_label_map(tmp_path / "labels.nii.gz", ct, masks, TAXONOMY)
    image = nib.load(str(path))
    assert image.shape == ct.shape and image.get_data_dtype() == np.uint8
    np.testing.assert_allclose(image.affine, ct.affine, atol=1e-4)
    assert int(image.header["sform_code"]) == 1 and int(image.header["qform_code"]) == 1
    np.testing.assert_allclose(image.header.get_qform(), ct.affine, atol=1e-4)
    labels = np.asarray(image.dataobj)

    # lesion over organ, vessel over organ, organ elsewhere, background outside
    assert (labels[masks[LIVER_TUMOR]] == LIVER_TUMOR).all()
    assert (labels[masks[AORTA]] == AORTA).all()
    assert masks[AORTA][masks[LIVER]].any()  # the aorta box does cross the liver box
    liver_only = masks[LIVER] & ~masks[LIVER_TUMOR] & ~masks[AORTA]
    assert (labels[liver_only] == LIVER).all()
    assert (labels[masks[SPLEEN]] == SPLEEN).all()
    anything = np.logical_or.reduce(list(masks.values()))
    assert (labels[~anything] == 0).all()
    assert set(np.unique(labels)) == {0, SPLEEN, LIVER, AORTA, LIVER_TUMOR}


def test_label_map_sidecars_name_every_label(tmp_path, ct):
    masks = organ_masks(ct.shape)
    path = write_label_map(tmp_path / "case1_labels.nii.gz", ct, masks, TAXONOMY)
    json_path, csv_path = sidecar_paths(path)
    assert json_path.name == "case1_labels.labels.json" and csv_path.name == "case1_labels.labels.csv"
    assert files_in(tmp_path) == sorted([path.name, json_path.name, csv_path.name])

    labels = np.asarray(nib.load(str(path)).dataobj)
    table = json.loads(json_path.read_text())
    assert table["label_map"] == path.name and table["overlap_rule"] == OVERLAP_RULE
    entries = {entry["value"]: entry for entry in table["labels"]}
    assert sorted(entries) == sorted(masks)
    voxel_ml = 3.0 * 3.0 * 3.0 / 1000.0
    for index, mask in masks.items():
        info = TAXONOMY[index]
        entry = entries[index]
        assert (entry["key"], entry["name"], entry["kind"]) == (info.key, info.display_name, info.kind)
        assert tuple(entry["color"]) == tuple(info.color)
        assert entry["terminology"] == info.terminology.to_slicer_string()
        assert entry["voxel_count"] == int(mask.sum())
        assert entry["voxel_count_in_label_map"] == int((labels == index).sum())
        assert entry["volume_ml"] == pytest.approx(mask.sum() * voxel_ml, abs=1e-3)
    assert entries[LIVER]["voxel_count_in_label_map"] < entries[LIVER]["voxel_count"]

    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["LabelValue"]) for r in rows] == [0] + sorted(masks)
    tumour = next(r for r in rows if int(r["LabelValue"]) == LIVER_TUMOR)
    assert tumour["Name"] == "Liver Tumor" and tumour["Region_CodeValue"] == TAXONOMY[LIVER_TUMOR].terminology.region.value


def test_slicer_reads_the_colour_table_with_names_colours_and_codes(tmp_path, ct):
    slicer = pytest.importorskip("slicer")
    masks = organ_masks(ct.shape)
    _, csv_path = sidecar_paths(write_label_map(tmp_path / "labels.nii.gz", ct, masks, TAXONOMY))
    scene = slicer.vtkMRMLScene()
    colors = slicer.vtkMRMLColorTableNode()
    scene.AddNode(colors)
    storage = slicer.vtkMRMLColorTableStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(csv_path))
    assert storage.ReadData(colors) == 1
    for index in masks:
        info = TAXONOMY[index]
        assert colors.GetColorName(index) == info.display_name
        rgba = [0.0] * 4
        colors.GetColor(index, rgba)
        np.testing.assert_allclose(np.array(rgba[:3]) * 255, info.color, atol=0.5)
        assert colors.GetTerminologyType(index).GetCodeValue() == info.terminology.type.value
    region = colors.GetTerminologyRegion(LIVER_TUMOR)
    assert region.GetCodeValue() == "10200004" and region.GetCodeMeaning() == "Liver"


def test_label_map_geometry_for_dicom_and_oblique_inputs(tmp_path, ct3, oblique_volume):
    for name, volume in (("dicom", ct3), ("oblique", oblique_volume)):
        masks = {LIVER: box(volume.shape, (3, 4, 1), (9, 10, volume.shape[2]))}
        image = nib.load(str(write_label_map(tmp_path / f"{name}.nii.gz", volume, masks, TAXONOMY)))
        assert image.shape == volume.shape
        np.testing.assert_allclose(image.affine, volume.affine, atol=1e-4)
        np.testing.assert_array_equal(np.asarray(image.dataobj) == LIVER, masks[LIVER])


def paint_order(masks, table) -> list[int]:
    """The overlap rule written out as a sort (the reference the one-pass painting is checked against):
    class indices in painting order, the last one wins: kind, then the smaller mask, then the lower index."""
    counts = {index: int(np.count_nonzero(mask)) for index, mask in masks.items()}
    return sorted(masks, key=lambda index: (KIND_PRIORITY[table[index].kind], -counts[index], -index))


def test_overlap_priority_rule_on_ties_and_sizes():
    shape = (6, 6, 6)
    small, large = box(shape, (0, 0, 0), (2, 2, 2)), box(shape, (0, 0, 0), (4, 4, 4))
    table = {info.index: info for info in TAXONOMY}
    # same kind: the smaller mask wins, whatever the index order
    assert label_map_from_masks(shape, {SPLEEN: large, LIVER: small}, table)[0, 0, 0] == LIVER
    assert label_map_from_masks(shape, {SPLEEN: small, LIVER: large}, table)[0, 0, 0] == SPLEEN
    # same kind and size: the lower index wins
    assert label_map_from_masks(shape, {LIVER: small, SPLEEN: small.copy()}, table)[0, 0, 0] == SPLEEN
    # kind beats size: a large cyst over a small vessel over a tiny organ
    tiny = box(shape, (0, 0, 0), (1, 1, 1))
    assert label_map_from_masks(shape, {KIDNEY_CYST: large, AORTA: small, RIGHT_KIDNEY: tiny}, table)[0, 0, 0] == KIDNEY_CYST
    assert paint_order({KIDNEY_CYST: large, AORTA: small, RIGHT_KIDNEY: tiny}, table) == [RIGHT_KIDNEY, AORTA, KIDNEY_CYST]


def test_one_pass_painting_equals_painting_in_priority_order(monkeypatch):
    """The label map is painted in one pass over the masks (each read once); it must equal painting every
    class in the rule's order, whatever order the masks come in and across slab boundaries."""
    monkeypatch.setattr(masks_module, "_SLAB_VOXELS", 50)  # many slabs of a few slices
    rng = np.random.default_rng(3)
    shape = (13, 7, 6)
    table = {info.index: info for info in TAXONOMY}
    indices = [int(i) for i in rng.choice(sorted(table), size=12, replace=False)]
    masks = {i: rng.random(shape) < rng.uniform(0.05, 0.6) for i in indices}
    masks[indices[0]] = masks[indices[1]].copy()  # a tie in kind and size: the index decides
    expected = np.zeros(shape, np.uint8)
    for index in paint_order(masks, table):
        expected[masks[index]] = index
    for order in (indices, indices[::-1], sorted(indices)):
        labels, counts = paint_label_map(shape, {i: masks[i] for i in order}, table)
        np.testing.assert_array_equal(labels, expected)
        assert counts == {i: int(masks[i].sum()) for i in order}
    # Fortran-ordered masks (on a nibabel volume's grid) give a Fortran-ordered label map, same labels
    labels, _ = paint_label_map(shape, {i: np.asfortranarray(masks[i]) for i in indices}, table)
    assert labels.flags.f_contiguous
    np.testing.assert_array_equal(labels, expected)
    np.testing.assert_array_equal(masks_module.label_voxel_counts(labels, 256), np.bincount(expected.ravel(), minlength=256))


def test_label_map_uses_uint16_for_class_indices_above_255(tmp_path, ct3):
    extra = dataclasses.replace(TAXONOMY[LIVER], index=300, key="extra_structure", display_name="Extra Structure")
    classes = list(TAXONOMY) + [extra]
    masks = {300: box(ct3.shape, (10, 10, 0), (20, 20, 2)), LIVER: box(ct3.shape, (15, 15, 0), (40, 40, 3))}
    image = nib.load(str(write_label_map(tmp_path / "big.nii.gz", ct3, masks, classes)))
    assert image.get_data_dtype() == np.uint16
    labels = np.asarray(image.dataobj)
    assert (labels[masks[300]] == 300).all()  # smaller organ wins


# ----------------------------------------------------------------------------------------- class masks
def test_class_masks_one_file_per_class_on_the_input_grid(tmp_path, ct):
    masks = organ_masks(ct.shape)
    paths = write_class_masks(tmp_path / "masks", ct, masks, TAXONOMY)
    assert [p.name for p in paths] == [f"{TAXONOMY[i].key}.nii.gz" for i in sorted(masks)]
    assert files_in(tmp_path / "masks") == sorted(p.name for p in paths)
    for index, path in zip(sorted(masks), paths):
        image = nib.load(str(path))
        assert image.get_data_dtype() == np.uint8 and image.shape == ct.shape
        np.testing.assert_allclose(image.affine, ct.affine, atol=1e-4)
        np.testing.assert_array_equal(np.asarray(image.dataobj), masks[index].astype(np.uint8))


# ----------------------------------------------------------------------------------------- seg.nrrd
def check_seg_nrrd_with_slicerio(path: Path, volume: Volume, masks):
    import slicerio

    segmentation = slicerio.read_segmentation(str(path))
    lps = np.asarray(segmentation["ijkToLPS"], dtype=float)
    np.testing.assert_allclose(np.diag([-1, -1, 1, 1]) @ lps, volume.affine, atol=1e-6)
    assert segmentation["voxels"].shape[-3:] == volume.shape
    assert [s["name"] for s in segmentation["segments"]] == [TAXONOMY[i].display_name for i in sorted(masks)]
    for segment, index in zip(segmentation["segments"], sorted(masks)):
        info = TAXONOMY[index]
        assert segment["id"] == info.key
        np.testing.assert_allclose(np.array(segment["color"]) * 255, info.color, atol=0.01)
        terminology = segment["terminology"]
        assert terminology["type"] == [info.terminology.type.scheme, info.terminology.type.value, info.terminology.type.meaning]
        np.testing.assert_array_equal(slicerio.segment_mask(segmentation, segment), masks[index])


def read_seg_nrrd_with_slicer(path: Path, node_class: str = "vtkMRMLSegmentationNode",
                              storage_class: str = "vtkMRMLSegmentationStorageNode"):
    """Read ``path`` with Slicer's own storage node (a segmentation by default; pass the label-map volume
    classes for a NIfTI label map); returns (slicer module, node)."""
    slicer = pytest.importorskip("slicer")
    scene = slicer.vtkMRMLScene()
    node = getattr(slicer, node_class)()
    scene.AddNode(node)
    storage = getattr(slicer, storage_class)()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    return slicer, node


def slicer_segment_mask(slicer, node, segment_id: str, volume: Volume) -> np.ndarray:
    """A segment's binary labelmap placed on the volume grid, after checking its IJK->RAS is the volume's."""
    from vtk.util import numpy_support

    image = slicer.vtkOrientedImageData()
    node.GetBinaryLabelmapRepresentation(segment_id, image)
    matrix = slicer.vtkMatrix4x4() if hasattr(slicer, "vtkMatrix4x4") else __import__("vtk").vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    to_world = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    np.testing.assert_allclose(to_world, volume.affine, atol=1e-5)
    extent = image.GetExtent()
    mask = np.zeros(volume.shape, dtype=bool)
    if extent[1] < extent[0]:
        return mask
    dims = image.GetDimensions()
    kji = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0])
    mask[extent[0]:extent[1] + 1, extent[2]:extent[3] + 1, extent[4]:extent[5] + 1] = kji.transpose(2, 1, 0) > 0
    return mask


@pytest.mark.parametrize("volume_name", ["ct", "oblique_volume"])
def test_seg_nrrd_round_trip_through_slicerio_and_slicer(tmp_path, request, volume_name):
    volume = request.getfixturevalue(volume_name)
    masks = organ_masks(volume.shape)
    path = write_seg_nrrd(tmp_path / "result.seg.nrrd", volume, masks, TAXONOMY)
    assert files_in(tmp_path) == ["result.seg.nrrd"]
    check_seg_nrrd_with_slicerio(path, volume, masks)

    slicer, node = read_seg_nrrd_with_slicer(path)
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == len(masks)
    # the reference geometry is the input grid
    reference = slicer.vtkOrientedImageData()
    geometry = segmentation.GetConversionParameter("Reference image geometry")
    assert slicer.vtkSegmentationConverter.DeserializeImageGeometry(geometry, reference)
    assert reference.GetExtent() == (0, volume.shape[0] - 1, 0, volume.shape[1] - 1, 0, volume.shape[2] - 1)
    for index, mask in masks.items():
        info = TAXONOMY[index]
        segment = segmentation.GetSegment(info.key)
        assert segment is not None and segment.GetName() == info.display_name
        assert segment.GetTerminology() == info.terminology.to_slicer_string()
        np.testing.assert_allclose(np.array(segment.GetColor()) * 255, info.color, atol=0.01)
        assert not segment.GetNameAutoGenerated() and not segment.GetColorAutoGenerated()
        np.testing.assert_array_equal(slicer_segment_mask(slicer, node, info.key, volume), mask)


@pytest.mark.parametrize("fortran", [False, True], ids=["C", "F"])
def test_seg_nrrd_layers_follow_slicerio_add_segment(tmp_path, ct, fortran, monkeypatch):
    """Our one-pass layer packing gives exactly slicerio.add_segment's layers, label values and extents
    (Slicer's layout), for masks in either memory order and across slabs; Slicer reads every overlapping
    segment back."""
    import slicerio

    from UniversalSegLib.io.seg_nrrd import pack_layers

    monkeypatch.setattr(masks_module, "_SLAB_VOXELS", 500)  # a few rows per slab
    rng = np.random.default_rng(7)
    order = "F" if fortran else "C"
    indices = sorted(TAXONOMY.indices)[:9]
    masks = {}
    for n, index in enumerate(indices):
        low = rng.integers(0, np.array(ct.shape) // 2)
        high = low + rng.integers(1, np.array(ct.shape) // 2 + 1)
        masks[index] = np.zeros(ct.shape, dtype=bool, order=order)
        if n != 4:  # one empty mask: Slicer's empty extent
            masks[index][low[0]:high[0], low[1]:high[1], low[2]:high[2]] = True
    expected = slicerio.create_segmentation(ct.shape, np.eye(4))
    for index in indices:
        slicerio.add_segment(expected, masks[index], {"id": str(index)})
    voxels, placed = pack_layers(ct.shape, masks)
    np.testing.assert_array_equal(voxels, expected["voxels"])
    assert voxels.ndim == 4  # the boxes overlap: several layers
    for segment in expected["segments"]:
        assert placed[int(segment["id"])] == (segment["layer"], segment["labelValue"], segment["extent"])
    path = write_seg_nrrd(tmp_path / "layered.seg.nrrd", ct, masks, TAXONOMY)
    check_seg_nrrd_with_slicerio(path, ct, masks)
    slicer, node = read_seg_nrrd_with_slicer(path)
    for index, mask in masks.items():
        np.testing.assert_array_equal(slicer_segment_mask(slicer, node, TAXONOMY[index].key, ct), mask)


def test_seg_nrrd_needs_its_extension(tmp_path, ct):
    with pytest.raises(UnsupportedFormatError, match=".seg.nrrd"):
        write_seg_nrrd(tmp_path / "result.nrrd", ct, organ_masks(ct.shape), TAXONOMY)
    assert files_in(tmp_path) == []


# ----------------------------------------------------------------------------------------- DICOM SEG
def dicom_masks(volume: Volume) -> dict[int, np.ndarray]:
    x, y, z = volume.shape
    return {
        LIVER: box(volume.shape, (x // 8, y // 3, 0), (x // 2, 2 * y // 3, max(1, 2 * z // 3))),
        LIVER_TUMOR: box(volume.shape, (x // 5, y // 2, z // 2), (x // 5 + 20, y // 2 + 15, z // 2 + 1)),
        RIGHT_KIDNEY: box(volume.shape, (x // 2, y // 2, z - 1), (x // 2 + 40, y // 2 + 30, z)),
        GALLBLADDER: np.zeros(volume.shape, dtype=bool),
    }


def check_dicom_seg(path: Path, volume: Volume, masks):
    import highdicom as hd

    seg = hd.seg.segread(str(path))
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in volume.dicom_files]
    assert seg.SegmentationType == "BINARY"
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    referenced = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {s.SOPInstanceUID for s in sources}

    order = sorted(masks)
    assert [d.SegmentLabel for d in seg.SegmentSequence] == [TAXONOMY[i].display_name for i in order]
    for description, index in zip(seg.SegmentSequence, order):
        terminology = TAXONOMY[index].terminology
        assert description.SegmentedPropertyTypeCodeSequence[0].CodeValue == terminology.type.value
        assert description.SegmentedPropertyCategoryCodeSequence[0].CodeValue == terminology.category.value
        assert description.SegmentAlgorithmType == "AUTOMATIC" and description.SegmentAlgorithmName == "UniversalSeg"
        assert description.TrackingID == TAXONOMY[index].key
        if terminology.type_modifier is not None:
            modifier = description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0]
            assert modifier.CodeValue == terminology.type_modifier.value
        if terminology.region is not None:
            assert description.AnatomicRegionSequence[0].CodeValue == terminology.region.value

    # every frame sits on its source slice, and each class lands on the right source instances
    for frame in seg.PerFrameFunctionalGroupsSequence:
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        source = next(s for s in sources if s.SOPInstanceUID == uid)
        np.testing.assert_allclose([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
                                   [float(v) for v in source.ImagePositionPatient], atol=1e-3)
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[s.SOPInstanceUID for s in sources],
        segment_numbers=list(range(1, len(order) + 1)),
        assert_missing_frames_are_empty=True,
    )
    for number, index in enumerate(order):
        np.testing.assert_array_equal(pixels[..., number].transpose(2, 1, 0) > 0, masks[index])
    return seg


def test_dicom_seg_for_the_three_slice_ct_references_its_frames(tmp_path, ct3):
    masks = dicom_masks(ct3)
    path = write_dicom_seg(tmp_path / "seg.dcm", ct3, masks, TAXONOMY)
    seg = check_dicom_seg(path, ct3, masks)

    # same structure as dcmqi's reference SEG of this CT
    reference = pydicom.dcmread(require_shared(CT3_REFERENCE_SEG))
    assert seg.SOPClassUID == reference.SOPClassUID
    assert seg.FrameOfReferenceUID == reference.FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == reference.ReferencedSeriesSequence[0].SeriesInstanceUID
    ours_shared, theirs_shared = seg.SharedFunctionalGroupsSequence[0], reference.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose([float(v) for v in ours_shared.PlaneOrientationSequence[0].ImageOrientationPatient],
                               [float(v) for v in theirs_shared.PlaneOrientationSequence[0].ImageOrientationPatient])
    np.testing.assert_allclose([float(v) for v in ours_shared.PixelMeasuresSequence[0].PixelSpacing],
                               [float(v) for v in theirs_shared.PixelMeasuresSequence[0].PixelSpacing])
    assert (seg.Rows, seg.Columns) == (reference.Rows, reference.Columns)
    # algorithm identification
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    from UniversalSegLib import __version__

    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("UniversalSeg", __version__)


def test_dicom_seg_for_the_jpeg2000_series(tmp_path):
    """example_ct_dicom with UIDs restored (the shared copy is anonymised with blank UIDs)."""
    source = require_shared(CT_DICOM)
    folder = tmp_path / "ct"
    folder.mkdir()
    study, series, frame = (pydicom.uid.generate_uid() for _ in range(3))
    for path in sorted(source.iterdir()):
        dataset = pydicom.dcmread(path)
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study, series
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID
        dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID
        dataset.SeriesNumber = 3
        dataset.save_as(folder / f"{path.name}.dcm")
    volume = read_volume(folder)
    masks = dicom_masks(volume)
    check_dicom_seg(write_dicom_seg(tmp_path / "seg.dcm", volume, masks, TAXONOMY), volume, masks)


def test_dicom_seg_refuses_sources_without_uids_and_non_dicom_volumes(tmp_path, ct):
    blank_uids = read_volume(require_shared(CT_DICOM))
    with pytest.raises(DicomSegError, match="SOPInstanceUID"):
        write_dicom_seg(tmp_path / "a.dcm", blank_uids, dicom_masks(blank_uids), TAXONOMY)
    with pytest.raises(DicomSegError, match="nifti") as error:
        write_dicom_seg(tmp_path / "b.dcm", ct, organ_masks(ct.shape), TAXONOMY)
    assert ".seg.nrrd" in str(error.value)
    assert files_in(tmp_path) == []


# ----------------------------------------------------------------------------------------- no overwrite
def test_no_writer_overwrites_unless_asked(tmp_path, ct3):
    masks = dicom_masks(ct3)
    writers = {
        "labels.nii.gz": write_label_map,
        "result.seg.nrrd": write_seg_nrrd,
        "result.dcm": write_dicom_seg,
    }
    for name, writer in writers.items():
        target = tmp_path / name
        target.write_bytes(b"precious")
        with pytest.raises(OutputExistsError, match=name) as error:
            writer(target, ct3, masks, TAXONOMY)
        assert isinstance(error.value, FileExistsError)
        assert target.read_bytes() == b"precious"
        writer(target, ct3, masks, TAXONOMY, overwrite=True)
        assert target.read_bytes() != b"precious"

    folder = tmp_path / "masks"
    folder.mkdir()
    (folder / "liver.nii.gz").write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="liver.nii.gz"):
        write_class_masks(folder, ct3, masks, TAXONOMY)
    assert files_in(folder) == ["liver.nii.gz"] and (folder / "liver.nii.gz").read_bytes() == b"precious"
    write_class_masks(folder, ct3, masks, TAXONOMY, overwrite=True)
    assert files_in(folder) == sorted(f"{TAXONOMY[i].key}.nii.gz" for i in masks)


def test_an_existing_sidecar_also_blocks_the_label_map(tmp_path, ct3):
    (tmp_path / "labels.labels.csv").write_text("mine")
    with pytest.raises(OutputExistsError, match="labels.labels.csv"):
        write_label_map(tmp_path / "labels.nii.gz", ct3, dicom_masks(ct3), TAXONOMY)
    assert files_in(tmp_path) == ["labels.labels.csv"]


# ----------------------------------------------------------------------------------------- atomicity
def test_class_masks_fail_midway_leave_nothing(tmp_path, ct3):
    """The 2nd class's file name is taken by a folder: the 1st file was already written (to a temp name)."""
    masks = dicom_masks(ct3)  # written in index order: right_kidney, gallbladder, liver, liver_tumor
    folder = tmp_path / "out"
    (folder / "gallbladder.nii.gz").mkdir(parents=True)
    with pytest.raises(OutputExistsError, match="gallbladder"):
        write_class_masks(folder, ct3, masks, TAXONOMY)
    assert files_in(folder) == ["gallbladder.nii.gz"]


def test_invalid_mask_for_the_second_class_writes_nothing(tmp_path, ct3):
    masks = dicom_masks(ct3)
    masks[GALLBLADDER] = np.zeros((5, 5, 5), dtype=bool)
    writers = [
        lambda: write_class_masks(tmp_path / "masks", ct3, masks, TAXONOMY),
        lambda: write_label_map(tmp_path / "labels.nii.gz", ct3, masks, TAXONOMY),
        lambda: write_seg_nrrd(tmp_path / "result.seg.nrrd", ct3, masks, TAXONOMY),
        lambda: write_dicom_seg(tmp_path / "result.dcm", ct3, masks, TAXONOMY),
    ]
    for writer in writers:
        with pytest.raises(InvalidMaskError, match="Gallbladder"):
            writer()
    assert list(tmp_path.rglob("*")) == []


def test_failure_inside_the_writer_removes_the_temporary_file(tmp_path, ct3, monkeypatch):
    """Fault injection: the library's NRRD writer dies after writing part of the file."""
    import nrrd

    real_write = nrrd.write

    def write_then_fail(file, *args, **kwargs):
        Path(file).write_bytes(b"NRRD0005\npartial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nrrd, "write", write_then_fail)
    with pytest.raises(OSError, match="No space left"):
        write_seg_nrrd(tmp_path / "result.seg.nrrd", ct3, dicom_masks(ct3), TAXONOMY)
    assert files_in(tmp_path) == []
    monkeypatch.setattr(nrrd, "write", real_write)
    write_seg_nrrd(tmp_path / "result.seg.nrrd", ct3, dicom_masks(ct3), TAXONOMY)
    assert files_in(tmp_path) == ["result.seg.nrrd"]
    assert not any(name.startswith(TEMP_PREFIX) for name in files_in(tmp_path))


def test_unwritable_output_folder(tmp_path, ct3):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    masks = dicom_masks(ct3)
    with pytest.raises(OutputNotWritableError, match="a_file"):
        write_label_map(blocker / "labels.nii.gz", ct3, masks, TAXONOMY)
    with pytest.raises(OutputNotWritableError, match="a_file"):
        write_class_masks(blocker / "masks", ct3, masks, TAXONOMY)
    if os.geteuid() != 0:  # root ignores permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(OutputNotWritableError, match="not writable"):
            write_seg_nrrd(locked / "x.seg.nrrd", ct3, masks, TAXONOMY)


# ----------------------------------------------------------------------------------------- mask checks
def test_bad_masks_get_clear_errors(tmp_path, ct3):
    good = box(ct3.shape, (0, 0, 0), (5, 5, 1))
    with pytest.raises(InvalidMaskError, match="class index 99"):
        write_label_map(tmp_path / "a.nii.gz", ct3, {99: good}, TAXONOMY)
    with pytest.raises(InvalidMaskError, match=r"Liver\).*shape \(512, 512\)"):
        write_label_map(tmp_path / "a.nii.gz", ct3, {LIVER: good[:, :, 0]}, TAXONOMY)
    with pytest.raises(InvalidMaskError, match="probabilities"):
        write_label_map(tmp_path / "a.nii.gz", ct3, {LIVER: good * 0.7}, TAXONOMY)
    with pytest.raises(InvalidMaskError, match="class indices"):
        write_label_map(tmp_path / "a.nii.gz", ct3, {"liver": good}, TAXONOMY)
    # 0/1 integers are fine
    path = write_label_map(tmp_path / "ok.nii.gz", ct3, {LIVER: good.astype(np.uint8)}, TAXONOMY)
    assert (np.asarray(nib.load(str(path)).dataobj)[good] == LIVER).all()
    assert sorted(files_in(tmp_path)) == ["ok.labels.csv", "ok.labels.json", "ok.nii.gz"]
