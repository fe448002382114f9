"""Put per-class masks into a segmentation node: one segment per class, in one step, others untouched.

Segments are built completely (labelmaps, names, colours, terminology, tags) before the segmentation
is touched; then they are inserted in one modification block. Non-overlapping classes share a labelmap
layer (Slicer's shared labelmaps: one uint8 image, one label value per segment), so 32 classes cost a
few images, not 32; overlapping classes (liver and liver tumour) go to separate layers and both are
kept exactly. Segments that were already in the segmentation are never modified; a class that already
has a segment is replaced only when the caller says so (or when it is the quick preview of the same run,
which the exact result replaces: ``replace_segments``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from UniversalSegLib.errors import OutputError
from UniversalSegLib.io.seg_nrrd import pack_layers
from UniversalSegLib.mrml import (
    affine_of_volume_node,
    oriented_image_from_mask,
    parent_transform_to_world,
    prepare_segmentation_node,
    segment_class_index,
    set_segment_class,
)
from UniversalSegLib.taxonomy import ClassInfo

from .review import TAG_REVIEW, TAG_VOXELS, segment_tag

__all__ = ["ExistingSegmentsError", "AppliedResult", "class_segment_ids", "insert_class_masks",
           "TAG_MODEL", "TAG_PREVIEW", "PREVIEW_NAME_SUFFIX", "preview_mode"]

#: Segment tag naming the model that made a segment.
TAG_MODEL = "UniversalSeg.Model"
#: Segment tag of a quick preview (the fast layout's result shown before the exact one): the mode that made it.
TAG_PREVIEW = "UniversalSeg.Preview"
#: Added to a preview segment's name, so the user sees that it is not the exact result.
PREVIEW_NAME_SUFFIX = " (quick result)"


def preview_mode(segment) -> str:
    """The mode of a quick-preview segment ("fast"), or "" for any other segment."""
    return segment_tag(segment, TAG_PREVIEW) or ""


class ExistingSegmentsError(OutputError, ValueError):
    """Some requested classes already have a segment and replacing them was not confirmed."""

    def __init__(self, segmentation_name: str, classes: Sequence[ClassInfo]):
        self.classes = list(classes)
        names = ", ".join(info.display_name for info in self.classes)
        super().__init__(f'"{segmentation_name}" already has a segment for {names}. Confirm to replace '
                         f"{'it' if len(self.classes) == 1 else 'them'}, or choose another output segmentation.")


@dataclass
class AppliedResult:
    """What :func:`insert_class_masks` changed."""

    segmentation_node: object
    segment_ids: dict[int, str] = field(default_factory=dict)  # class index -> segment id
    replaced: list[int] = field(default_factory=list)
    created_node: bool = False
    table_node: object = None
    #: Why the statistics table could not be made (the segments are in the scene all the same), or "".
    statistics_error: str = ""
    #: Classes whose quick-preview segment a person had edited or accepted: kept, not replaced by the exact
    #: result (class index -> the kept segment's id).
    kept_previews: dict[int, str] = field(default_factory=dict)


def class_segment_ids(segmentation_node, classes: Sequence[ClassInfo]) -> dict[int, str]:
    """``{class index: segment id}`` of the segments that already hold one of ``classes``.

    A segment belongs to a class when UniversalSeg tagged it with the class, or (for a ``.seg.nrrd``
    written by the UniversalSeg command line) when its ID is the class key and its terminology is the
    class's terminology.
    """
    wanted = {info.index: info for info in classes}
    found: dict[int, str] = {}
    segmentation = segmentation_node.GetSegmentation()
    for segment_id in segmentation.GetSegmentIDs():
        segment = segmentation.GetSegment(segment_id)
        index = segment_class_index(segment)
        if index is None:
            info = next((c for c in wanted.values() if c.key == segment_id), None)
            if info is not None and _terminology(segment) == info.terminology.to_slicer_string():
                index = info.index
        if index in wanted and index not in found:
            found[index] = segment_id
    return found


def _terminology(segment) -> str:
    if hasattr(segment, "GetTerminology"):
        return segment.GetTerminology()
    import vtk

    value = vtk.mutable("")
    segment.GetTag(segment.GetTerminologyEntryTagName(), value)
    return str(value)


def _layer_segments(labels: np.ndarray, values: Mapping[int, int], voxels: Mapping[int, int],
                    infos: Mapping[int, ClassInfo], ijk_to_ras: np.ndarray, model_name: str,
                    preview: str = "") -> dict[int, object]:
    """vtkSegments of one layer sharing one labelmap image (``values``: class index -> label value)."""
    import slicer

    image = oriented_image_from_mask(labels > 0, ijk_to_ras)  # geometry and extent of the union
    from vtk.util import numpy_support

    extent = image.GetExtent()
    if extent[1] >= extent[0]:
        box = labels[extent[0]:extent[1] + 1, extent[2]:extent[3] + 1, extent[4]:extent[5] + 1]
        numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = np.ascontiguousarray(box.transpose(2, 1, 0)).ravel()
    representation = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    segments = {}
    for index, value in values.items():
        segment = slicer.vtkSegment()
        set_segment_class(segment, infos[index])
        segment.AddRepresentation(representation, image)
        segment.SetLabelValue(value)  # the voxel value of this class in the shared image
        segment.SetTag(TAG_REVIEW, "unreviewed")
        segment.SetTag(TAG_VOXELS, str(voxels[index]))
        if model_name:
            segment.SetTag(TAG_MODEL, model_name)
        if preview:
            segment.SetName(infos[index].display_name + PREVIEW_NAME_SUFFIX)
            segment.SetTag(TAG_PREVIEW, preview)
        segments[index] = segment
    return segments


def insert_class_masks(scene, volume_node, masks: Mapping[int, np.ndarray], classes: Sequence[ClassInfo],
                       segmentation_node=None, replace_existing: bool = False, model_name: str = "",
                       show_3d: bool = False, tracker=None, preview: str = "",
                       replace_segments: Mapping[int, str] | None = None) -> AppliedResult:
    """Add one segment per class of ``masks`` (IJK bool arrays on ``volume_node``'s grid).

    Args:
        scene: the MRML scene (a new segmentation node is added to it when ``segmentation_node`` is None).
        volume_node: the input volume; its grid is the segmentation's reference geometry.
        masks: ``{class index: mask}``.
        classes: ClassInfo of every class in ``masks`` (names, colours, terminology).
        segmentation_node: an existing segmentation to add to; its other segments are not modified.
        replace_existing: replace the segments of classes that already have one (otherwise such classes
            raise :class:`ExistingSegmentsError` and nothing is changed).
        model_name: recorded on each segment.
        show_3d: build closed surfaces and show them in 3D views (on the main thread: slow on big CTs).
        tracker: an :class:`~.review.EditTracker` of the node, suspended while the result goes in.
        preview: the mode of a quick preview ("fast"): its segments are tagged :data:`TAG_PREVIEW` and named
            "<class> (quick result)".
        replace_segments: ``{class index: segment id}`` replaced without asking, whatever
            ``replace_existing`` says (a run's own preview segments, replaced by its exact result).
    """
    import slicer

    infos = {info.index: info for info in classes}
    missing = sorted(set(masks) - set(infos))
    if missing:
        raise ValueError(f"no class information for class index(es) {missing}")
    dims = tuple(volume_node.GetImageData().GetDimensions())
    checked = {}
    for index in [info.index for info in classes if info.index in masks]:  # taxonomy order
        mask = np.asarray(masks[index])
        if mask.shape != dims:
            raise ValueError(f"the mask of {infos[index].display_name} has shape {mask.shape}; the volume "
                             f"{volume_node.GetName()} has {dims} voxels (IJK)")
        checked[index] = mask.astype(bool, copy=False)

    created = segmentation_node is None
    if created:
        segmentation_node = slicer.vtkMRMLSegmentationNode()
        segmentation_node.SetName(scene.GenerateUniqueName(f"{volume_node.GetName()} segmentation"))
    existing = class_segment_ids(segmentation_node, [infos[i] for i in checked]) if not created else {}
    own = {index: segment_id for index, segment_id in (replace_segments or {}).items()
           if index in checked and segmentation_node.GetSegmentation().GetSegment(segment_id) is not None}
    existing.update(own)
    asked = [index for index in existing if index not in own]
    if asked and not replace_existing:
        raise ExistingSegmentsError(segmentation_node.GetName(), [infos[i] for i in asked])

    # Everything that can fail happens before the segmentation is touched.
    ijk_to_ras = segment_geometry(segmentation_node, volume_node, adopts_volume_transform=created or
                                  segmentation_node.GetSegmentation().GetNumberOfSegments() == 0)
    order = list(checked)
    new_segments: dict[int, object] = {}
    packed, placed = pack_layers(dims, checked)  # Slicer's own layer layout, as in .seg.nrrd files
    voxels = {index: int(np.count_nonzero(mask)) for index, mask in checked.items()}
    for number in range(packed.shape[0] if packed.ndim == 4 else 1):
        values = {index: label for index, (layer, label, _) in placed.items() if layer == number}
        if values:
            new_segments.update(_layer_segments(packed[number] if packed.ndim == 4 else packed, values, voxels,
                                                infos, ijk_to_ras, model_name, preview))

    result = AppliedResult(segmentation_node, created_node=created)
    segmentation = segmentation_node.GetSegmentation()
    was_modifying = segmentation_node.StartModify()
    try:
        with (tracker.suspended() if tracker is not None else contextlib.nullcontext()):
            if not created and segmentation.GetNumberOfSegments() == 0:
                prepare_segmentation_node(segmentation_node, volume_node)
            ids = list(segmentation.GetSegmentIDs())
            for index in order:
                segment = new_segments[index]
                if index in existing:
                    old_id = existing[index]
                    position = ids.index(old_id)
                    before = ids[position + 1] if position + 1 < len(ids) else ""
                    segmentation.RemoveSegment(old_id)
                    segmentation.AddSegment(segment, old_id, before)
                    result.segment_ids[index] = old_id
                    result.replaced.append(index)
                else:
                    segment_id = infos[index].key
                    if segmentation.GetSegment(segment_id) is not None:
                        segment_id = segmentation.GenerateUniqueSegmentID(segment_id)
                    segmentation.AddSegment(segment, segment_id)
                    result.segment_ids[index] = segment_id
    finally:
        segmentation_node.EndModify(was_modifying)

    if created:
        scene.AddNode(segmentation_node)
        prepare_segmentation_node(segmentation_node, volume_node)
    elif segmentation_node.GetDisplayNode() is None and segmentation_node.GetScene() is not None:
        segmentation_node.CreateDefaultDisplayNodes()
    _place_in_hierarchy(scene, segmentation_node, volume_node)
    if show_3d:
        show_closed_surfaces(segmentation_node, tracker)
    return result


def segment_geometry(segmentation_node, volume_node, adopts_volume_transform: bool) -> np.ndarray:
    """IJK->segmentation-coordinates matrix of the volume's grid: segments are stored in their node's own
    coordinates, so a segmentation under another (linear) parent transform than the volume's gets the
    volume's world grid mapped through the inverse of its own transform, and its segments land on the
    anatomy the model saw. A node that takes over the volume's transform needs no mapping. A non-linear
    transform is refused with a message that says to harden it."""
    if adopts_volume_transform:
        return affine_of_volume_node(volume_node, world=False)
    world = affine_of_volume_node(volume_node, world=True)
    return np.linalg.inv(parent_transform_to_world(segmentation_node)) @ world


def show_closed_surfaces(segmentation_node, tracker=None) -> None:
    """Closed-surface representation, shown in 3D views (smoothed a little, as Slicer's "Show 3D")."""
    display = segmentation_node.GetDisplayNode()
    with (tracker.suspended() if tracker is not None else contextlib.nullcontext()):
        segmentation_node.CreateClosedSurfaceRepresentation()
    if display is not None:
        display.SetPreferredDisplayRepresentationName3D("Closed surface")
        display.SetVisibility3D(True)


def _place_in_hierarchy(scene, segmentation_node, volume_node) -> None:
    """Put the segmentation under the volume's study (needed for DICOM SEG export in Slicer)."""
    import slicer

    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if hierarchy is None:
        return
    volume_item = hierarchy.GetItemByDataNode(volume_node)
    segmentation_item = hierarchy.GetItemByDataNode(segmentation_node)
    if volume_item and segmentation_item:  # 0 when no subject-hierarchy plugin created the items
        parent = hierarchy.GetItemParent(volume_item)
        if parent and hierarchy.GetItemParent(segmentation_item) != parent:
            hierarchy.SetItemParent(segmentation_item, parent)
