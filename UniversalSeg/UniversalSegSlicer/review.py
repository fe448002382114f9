"""Review states of UniversalSeg segments, and automatic "corrected" when a person edits a segment.

Every segment UniversalSeg creates carries a tag ``UniversalSeg.ReviewState``:

* ``unreviewed``: as the model made it;
* ``accepted``: a person looked at it and kept it;
* ``corrected``: a person changed its voxels (set automatically, see :class:`EditTracker`).

Tags are saved with the segmentation (``.seg.nrrd``), so the state survives saving and reloading.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np

from UniversalSegLib.errors import UsageError
from UniversalSegLib.mrml import segment_class_index

__all__ = ["REVIEW_STATES", "TAG_REVIEW", "TAG_VOXELS", "ReviewError", "review_state", "set_review_state",
           "layer_voxel_counts", "EditTracker"]

REVIEW_STATES = ("unreviewed", "accepted", "corrected")
#: States that mean "a person checked this class" (exported for training).
REVIEWED_STATES = ("accepted", "corrected")
TAG_REVIEW = "UniversalSeg.ReviewState"
#: Voxel count when the state was last set; a different count later means the voxels were edited.
TAG_VOXELS = "UniversalSeg.VoxelCount"


class ReviewError(UsageError, ValueError):
    """Unknown review state, or a segment that UniversalSeg does not track."""


def segment_tag(segment, name: str) -> str | None:
    """The value of a segment's tag ``name``, or None when it has none."""
    import vtk

    value = vtk.mutable("")
    return str(value) if segment.GetTag(name, value) else None


def review_state(segment) -> str | None:
    """The segment's review state, or None for a segment without one (not made by UniversalSeg)."""
    return segment_tag(segment, TAG_REVIEW)


def layer_voxel_counts(segmentation) -> dict[str, int]:
    """Voxel count of every segment, from its labelmap layer (one ``bincount`` per layer, no resampling)."""
    from vtk.util import numpy_support

    counts: dict[str, int] = {}
    for layer in range(segmentation.GetNumberOfLayers()):
        image = segmentation.GetLayerDataObject(layer)
        ids = list(segmentation.GetSegmentIDsForLayer(layer))
        scalars = image.GetPointData().GetScalars() if image is not None else None
        if scalars is None or scalars.GetNumberOfTuples() == 0:
            counts.update({segment_id: 0 for segment_id in ids})
            continue
        values = numpy_support.vtk_to_numpy(scalars)
        histogram = np.bincount(values.ravel().astype(np.int64, copy=False))
        for segment_id in ids:
            label = segmentation.GetSegment(segment_id).GetLabelValue()
            counts[segment_id] = int(histogram[label]) if label < histogram.size else 0
    return counts


def set_review_state(segmentation_node, segment_id: str, state: str, voxels: int | None = None) -> None:
    """Set a segment's review state (and the voxel count it refers to)."""
    if state not in REVIEW_STATES:
        raise ReviewError(f"unknown review state {state!r}; use one of {', '.join(REVIEW_STATES)}")
    segmentation = segmentation_node.GetSegmentation()
    segment = segmentation.GetSegment(segment_id)
    if segment is None:
        raise ReviewError(f'segmentation "{segmentation_node.GetName()}" has no segment "{segment_id}"')
    if voxels is None:
        voxels = layer_voxel_counts(segmentation).get(segment_id, 0)
    segment.SetTag(TAG_REVIEW, state)
    segment.SetTag(TAG_VOXELS, str(int(voxels)))


class EditTracker:
    """Marks UniversalSeg segments ``corrected`` when their voxels change (Segment Editor, scripts...).

    It observes the segmentation's ``SourceRepresentationModified`` event. When the event names the
    segment (every Segment Editor effect does), that segment is corrected at once. An edit can also
    change segments it does not name (painting with "overwrite other segments" erases their voxels, in
    the same shared layer or another one); so after any edit the tracker compares every tracked segment's
    voxel count with the count recorded at its last state change, lazily, on the next :meth:`resolve`
    (cheap: one histogram per layer, no resampling).
    """

    def __init__(self, segmentation_node) -> None:
        self.segmentation_node = segmentation_node
        self._segmentation = None
        self._observations: list[tuple[object, int]] = []
        self._suspended = 0
        self._unnamed_change = False
        self._node_observer = segmentation_node.AddObserver(
            segmentation_node.SegmentationChangedEvent, lambda caller, event: self._observe_segmentation())
        self._observe_segmentation()

    # -- observation
    def _observe_segmentation(self) -> None:
        import slicer
        import vtk

        self._remove_segmentation_observers()
        self._segmentation = self.segmentation_node.GetSegmentation()

        @vtk.calldata_type(vtk.VTK_STRING)
        def on_source_modified(caller, event, segment_id):
            self._on_source_modified(segment_id)

        # Keep a reference: VTK holds the Python callable weakly through the observer.
        self._callback = on_source_modified
        tag = self._segmentation.AddObserver(slicer.vtkSegmentation.SourceRepresentationModified, on_source_modified)
        self._observations.append((self._segmentation, tag))

    def _remove_segmentation_observers(self) -> None:
        for obj, tag in self._observations:
            obj.RemoveObserver(tag)
        self._observations.clear()

    def _on_source_modified(self, segment_id) -> None:
        if self._suspended:
            return
        # Other segments of the same (shared) layer may have lost voxels too: check counts on resolve().
        self._unnamed_change = True
        if not segment_id:
            return
        segment = self._segmentation.GetSegment(segment_id)
        if segment is not None and segment_class_index(segment) is not None and review_state(segment) != "corrected":
            # The count is recorded lazily (resolve), not here: this runs on every brush stroke.
            segment.SetTag(TAG_REVIEW, "corrected")

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """Changes made inside this block (UniversalSeg's own results) are not edits by a person."""
        self._suspended += 1
        try:
            yield
        finally:
            self._suspended -= 1

    def resolve(self) -> list[str]:
        """Apply pending unnamed changes: segments whose voxel count moved become corrected. Returns their IDs."""
        if not self._unnamed_change:
            return []
        self._unnamed_change = False
        changed = []
        segmentation = self._segmentation
        counts = layer_voxel_counts(segmentation)
        for segment_id in segmentation.GetSegmentIDs():
            segment = segmentation.GetSegment(segment_id)
            state = review_state(segment)
            if state is None or state == "corrected" or segment_class_index(segment) is None:
                continue
            recorded = segment_tag(segment, TAG_VOXELS)
            if recorded is not None and int(recorded) != counts.get(segment_id, 0):
                segment.SetTag(TAG_REVIEW, "corrected")
                changed.append(segment_id)
        return changed

    def stop(self) -> None:
        self._remove_segmentation_observers()
        if self._node_observer is not None:
            self.segmentation_node.RemoveObserver(self._node_observer)
            self._node_observer = None
