"""The MRML bridge (UniversalSegLib.mrml) with real MRML on the slicer-core wheel and a real CT.

The shared CT is stored three ways (RAS, LPS-ordered voxels, left-handed / LAS) and read with Slicer's
own reader, which reverses the K axis of left-handed NIfTI files: whatever the storage, the volume the
bridge hands to the library must be the same image in world coordinates, and segments made from masks
must come back voxel for voxel and lie on the same anatomy after a .seg.nrrd round trip.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import require_shared

slicer = pytest.importorskip("slicer", reason="the slicer-core wheel is needed for MRML tests")
nib = pytest.importorskip("nibabel")
slicerio = pytest.importorskip("slicerio")

from UniversalSegLib.mrml import (  # noqa: E402
    MRMLBridgeError,
    headless_scene,
    mask_from_segment,
    oriented_image_from_mask,
    segment_class_index,
    set_segment_class,
    volume_from_node,
    volume_node_from_volume,
)
from UniversalSegLib.taxonomy import get_taxonomy  # noqa: E402


def segment_from_mask(mask, ijk_to_ras, info):
    """A new vtkSegment holding ``mask`` as its binary labelmap (label value 1), tagged with ``info``."""
    segment = slicer.vtkSegment()
    set_segment_class(segment, info)
    segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(),
                              oriented_image_from_mask(mask, ijk_to_ras))
    segment.SetLabelValue(1)
    return segment

CT = "data/totalsegmentator/example_ct.nii.gz"
LIVER = "data/totalsegmentator/example_seg_hist/liver.nii.gz"


def _flip(affine: np.ndarray, shape, axes) -> np.ndarray:
    """Affine of the same image after reversing the voxel order along ``axes`` (world positions unchanged)."""
    flip = np.eye(4)
    for axis in axes:
        flip[axis, axis] = -1.0
        flip[axis, 3] = shape[axis] - 1
    return affine @ flip


@pytest.fixture(scope="module")
def ct_variants(tmp_path_factory):
    """The shared CT written as RAS, LPS (i and j reversed) and LAS (left-handed: i reversed)."""
    source = nib.load(str(require_shared(CT)))
    data = np.asarray(source.dataobj)
    folder = tmp_path_factory.mktemp("ct_variants")
    variants = {}
    for name, axes in (("ras", ()), ("lps", (0, 1)), ("las_left_handed", (0,))):
        array = data
        for axis in axes:
            array = np.flip(array, axis)
        affine = _flip(source.affine, data.shape, axes)
        path = folder / f"ct_{name}.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(array), affine), str(path))
        variants[name] = path
    return variants, data, source.affine


def _canonical(array, affine):
    image = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(array), np.asarray(affine)))
    return np.asarray(image.dataobj), image.affine


@pytest.mark.parametrize("variant", ["ras", "lps", "las_left_handed"])
def test_volume_from_node_is_the_same_world_image_for_every_storage(ct_variants, variant):
    paths, data, affine = ct_variants
    headless = headless_scene()
    node = headless.load_volume(paths[variant], "ct")
    volume = volume_from_node(node)
    assert volume.array.shape == data.shape
    if variant == "las_left_handed":
        # Slicer's reader reversed K (right-handed IJK); the bridge must report the node's real grid.
        assert np.linalg.det(volume.affine[:3, :3]) > 0
    expected_array, expected_affine = _canonical(data, affine)
    got_array, got_affine = _canonical(volume.array, volume.affine)
    np.testing.assert_allclose(got_affine, expected_affine, atol=1e-4)
    assert np.array_equal(got_array, expected_array)
    # the bridge copies: changing the node afterwards does not change the volume handed to the worker
    slicer.util.arrayFromVolume(node)[:] = 0
    assert np.array_equal(_canonical(volume.array, volume.affine)[0], expected_array)


@pytest.mark.parametrize("variant", ["ras", "lps", "las_left_handed"])
def test_segments_round_trip_voxel_for_voxel_and_land_on_the_anatomy(ct_variants, tmp_path, variant):
    paths, data, affine = ct_variants
    taxonomy = get_taxonomy()
    headless = headless_scene()
    node = headless.load_volume(paths[variant], "ct")
    volume = volume_from_node(node)
    bone = volume.array > 200  # a mask whose anatomy is checkable: it must land on bright voxels
    liver_source = np.asarray(nib.load(str(require_shared(LIVER))).dataobj) > 0.5
    # bring the reference liver mask onto this node's grid through world coordinates
    to_node = np.rint(np.linalg.inv(volume.affine) @ affine).astype(int)
    liver = np.zeros(volume.shape, dtype=bool)
    ijk = np.argwhere(liver_source)
    moved = (to_node[:3, :3] @ ijk.T).T + to_node[:3, 3]
    liver[tuple(moved.T)] = True
    assert liver.sum() == liver_source.sum() > 10000

    segmentation_node = headless.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(node)
    segmentation = segmentation_node.GetSegmentation()
    from UniversalSegLib.mrml import affine_of_volume_node

    ijk_to_ras = affine_of_volume_node(node, world=False)
    segmentation.AddSegment(segment_from_mask(liver, ijk_to_ras, taxonomy[6]), "liver")
    segmentation.AddSegment(segment_from_mask(bone, ijk_to_ras, taxonomy[23]), "bone")
    assert np.array_equal(mask_from_segment(segmentation_node, "liver", node), liver)
    assert np.array_equal(mask_from_segment(segmentation_node, "bone", node), bone)

    # .seg.nrrd written by Slicer's storage node, read back by slicerio (independent reader)
    path = tmp_path / "result.seg.nrrd"
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    assert storage.WriteData(segmentation_node)
    written = slicerio.read_segmentation(str(path))
    ijk_to_ras_file = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(written["ijkToLPS"])
    to_source = np.linalg.inv(affine) @ ijk_to_ras_file
    for segment_id, expected in (("liver", liver_source), ("bone", data > 200)):
        mask = slicerio.segment_mask(written, segment_id)
        points = np.argwhere(mask)
        source_ijk = (to_source[:3, :3] @ points.T).T + to_source[:3, 3]
        assert np.allclose(source_ijk, np.rint(source_ijk), atol=1e-3)  # same grid in the world
        back = np.zeros(data.shape, dtype=bool)
        back[tuple(np.rint(source_ijk).astype(int).T)] = True
        assert np.array_equal(back, expected)
    assert 1000 < np.count_nonzero(data > 200) < data.size // 10  # a real, non-trivial structure
    meta = {s["id"]: s for s in written["segments"]}
    assert meta["liver"]["name"] == "Liver"
    assert meta["liver"]["terminology"]["type"][1] == "10200004"  # SNOMED CT Liver


def test_segment_metadata_terminology_and_tags_survive_seg_nrrd_storage(tmp_path):
    taxonomy = get_taxonomy()
    headless = headless_scene()
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    volume_node = volume_node_from_volume(headless.scene, _small_volume(affine), "small")
    segmentation_node = headless.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    mask = np.zeros((20, 16, 12), dtype=bool)
    mask[4:9, 3:7, 2:6] = True
    info = taxonomy[27]  # Liver Tumor: morphologically altered structure in the liver region
    segment_id = "liver_tumor"
    segmentation_node.GetSegmentation().AddSegment(segment_from_mask(mask, affine, info), segment_id)

    path = tmp_path / "tumour.seg.nrrd"
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    assert storage.WriteData(segmentation_node)
    loaded = slicer.vtkMRMLSegmentationNode()
    headless.scene.AddNode(loaded)
    reader = slicer.vtkMRMLSegmentationStorageNode()
    reader.SetFileName(str(path))
    assert reader.ReadData(loaded)
    segment = loaded.GetSegmentation().GetSegment(segment_id)
    assert segment.GetName() == "Liver Tumor"
    np.testing.assert_allclose(segment.GetColor(), np.array(info.color) / 255.0, atol=1e-5)
    assert segment.GetTerminology() == info.terminology.to_slicer_string()
    assert segment_class_index(segment) == 27
    assert np.array_equal(mask_from_segment(loaded, segment_id, volume_node), mask)

    # Slicer's terminology logic parses the entry: category, type and anatomic region codes
    entry = slicer.vtkSlicerTerminologyEntry()
    assert headless.terminologies_logic.DeserializeTerminologyEntry(segment.GetTerminology(), entry)
    assert entry.GetCategoryObject().GetCodeValue() == info.terminology.category.value
    assert entry.GetTypeObject().GetCodeValue() == info.terminology.type.value
    assert entry.GetRegionObject().GetCodeValue() == "10200004"  # the liver
    assert headless.terminologies_logic.SerializeTerminologyEntry(entry) == info.terminology.to_slicer_string()


def test_every_taxonomy_terminology_is_a_valid_slicer_entry():
    headless = headless_scene()
    for info in get_taxonomy():
        entry = slicer.vtkSlicerTerminologyEntry()
        text = info.terminology.to_slicer_string()
        assert headless.terminologies_logic.DeserializeTerminologyEntry(text, entry), info.display_name
        assert entry.GetTypeObject().GetCodeValue() == info.terminology.type.value


def _small_volume(affine):
    from UniversalSegLib.io.volume import Volume

    array = np.random.default_rng(0).integers(-1000, 1000, size=(20, 16, 12)).astype(np.int16)
    return Volume(array=array, affine=affine, source="synthetic", format="mrml")


def test_volume_node_round_trip_and_linear_parent_transform():
    headless = headless_scene()
    affine = np.array([[0.0, -1.5, 0.0, 10.0], [2.0, 0.0, 0.0, -5.0], [0.0, 0.0, 3.0, 7.0], [0, 0, 0, 1.0]])
    volume = _small_volume(affine)
    node = volume_node_from_volume(headless.scene, volume, "oblique")
    back = volume_from_node(node)
    assert np.array_equal(back.array, volume.array)
    np.testing.assert_allclose(back.affine, affine)
    # a linear transform moves the patient: the model must see the world geometry
    import vtk

    transform = headless.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 25.0)
    transform.SetMatrixTransformToParent(matrix)
    node.SetAndObserveTransformNodeID(transform.GetID())
    moved = volume_from_node(node)
    np.testing.assert_allclose(moved.affine[:3, 3], affine[:3, 3] + [25.0, 0.0, 0.0])
    np.testing.assert_allclose(volume_from_node(node, world=False).affine, affine)


def test_bridge_refuses_label_maps_and_empty_nodes_with_clear_messages():
    headless = headless_scene()
    label = headless.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    with pytest.raises(MRMLBridgeError, match="label map"):
        volume_from_node(label)
    empty = headless.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(MRMLBridgeError, match="no voxels"):
        volume_from_node(empty)
    with pytest.raises(MRMLBridgeError, match="No input volume"):
        volume_from_node(None)
