"""Per-segment statistics (volume in ml, voxel count, mean HU) and the table node that shows them.

Computed from the segments as they are now (after any correction), from their own labelmap layers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from UniversalSegLib.helpers import voxel_volume_ml
from UniversalSegLib.mrml import affine_of_volume_node, mask_from_segment, segment_class_index

from .review import review_state

__all__ = ["SegmentStatistics", "segment_statistics", "write_statistics_table", "TABLE_COLUMNS"]

TABLE_COLUMNS = ("Segment", "Class index", "Volume (ml)", "Voxels", "Mean HU", "Review")


@dataclass(frozen=True)
class SegmentStatistics:
    segment_id: str
    name: str
    class_index: int | None
    voxels: int
    volume_ml: float
    mean_hu: float | None
    review: str | None


def segment_statistics(segmentation_node, volume_node, segment_ids=None) -> list[SegmentStatistics]:
    """Statistics of the given (default: all) segments of ``segmentation_node`` over ``volume_node``.

    Read from the segments' own labelmaps, never resampled to the whole CT grid: one pass per shared
    labelmap layer (a slice at a time) counts every label value of the layer and sums the CT under it, so
    32 classes in three layers cost three passes over the layers' extents. Segments UniversalSeg adds lie
    on the volume's grid, so their voxels index the CT directly; a segment on another grid is resampled
    onto the volume's for its mean HU; one under another transform than the volume gets no mean HU.
    """
    import slicer

    hounsfield = slicer.util.arrayFromVolume(volume_node)  # KJI view, no copy
    volume_grid = affine_of_volume_node(volume_node, world=False)
    same_transform = segmentation_node.GetTransformNodeID() == volume_node.GetTransformNodeID()
    representation = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    segmentation = segmentation_node.GetSegmentation()
    ids = list(segmentation.GetSegmentIDs()) if segment_ids is None else list(segment_ids)
    layers: dict = {}
    out = []
    for segment_id in ids:
        segment = segmentation.GetSegment(segment_id)
        image = segment.GetRepresentation(representation)
        if image is None:  # another source representation (closed surface): Slicer converts a copy
            image = slicer.vtkOrientedImageData()
            slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
                segmentation_node, segment_id, image)
        key = image.GetAddressAsString("vtkOrientedImageData")
        if key not in layers:
            layers[key] = _layer_measures(image, hounsfield, volume_grid if same_transform else None)
        counts, sums, grid = layers[key]
        label = int(segment.GetLabelValue())
        n = int(counts[label]) if label < len(counts) else 0
        mean = None
        if n and sums is not None:
            mean = float(sums[label] / n)
        elif n and same_transform:  # on another grid: resample this one segment for its mean HU
            on_grid = mask_from_segment(segmentation_node, segment_id, volume_node).transpose(2, 1, 0)
            mean = float(hounsfield[on_grid].mean(dtype=np.float64)) if on_grid.any() else None
        out.append(SegmentStatistics(segment_id, segment.GetName(), segment_class_index(segment), n,
                                     n * voxel_volume_ml(grid), mean, review_state(segment)))
    return out


def _layer_measures(image, hounsfield: np.ndarray, volume_grid: np.ndarray | None):
    """``(voxels per label value, HU sum per label value or None, IJK->RAS of the layer)`` of one labelmap
    layer; the HU sums only when the layer lies on the volume's grid (``volume_grid``) inside the volume."""
    import vtk
    from vtk.util import numpy_support

    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    grid = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    extent = image.GetExtent()
    if extent[1] < extent[0] or extent[3] < extent[2] or extent[5] < extent[4]:
        return np.zeros(1, dtype=np.int64), None, grid
    dims = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)  # K, J, I
    labels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims)
    on_volume = volume_grid is not None and np.allclose(grid, volume_grid, atol=1e-6) and all(
        0 <= extent[2 * a] and extent[2 * a + 1] < hounsfield.shape[2 - a] for a in range(3))
    size = max(int(labels.max()) + 1, 1) if labels.size else 1
    counts = np.zeros(size, dtype=np.int64)
    sums = np.zeros(size, dtype=np.float64) if on_volume else None
    for k in range(dims[0]):  # a slice at a time: bincount's int64 copy of a whole layer could be gigabytes
        values = labels[k].ravel()
        if values.dtype.kind == "i":  # a signed labelmap: negative values are no segment's label
            values = np.maximum(values, 0)
        counts += np.bincount(values, minlength=size)[:size]
        if sums is not None:
            hu = hounsfield[extent[4] + k, extent[2]:extent[3] + 1, extent[0]:extent[1] + 1].ravel()
            sums += np.bincount(values, weights=hu, minlength=size)[:size]
    return counts, sums, grid


def write_statistics_table(scene, statistics: list[SegmentStatistics], table_node=None, name: str = "Statistics"):
    """Fill (or create) a ``vtkMRMLTableNode`` with one row per segment; returns the table node."""
    import vtk

    if table_node is None:
        table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name))
    table = table_node.GetTable()
    was_modifying = table_node.StartModify()
    try:
        table.Initialize()
        columns = [vtk.vtkStringArray(), vtk.vtkIntArray(), vtk.vtkDoubleArray(), vtk.vtkIntArray(),
                   vtk.vtkDoubleArray(), vtk.vtkStringArray()]
        for column, title in zip(columns, TABLE_COLUMNS):
            column.SetName(title)
        for row in statistics:
            columns[0].InsertNextValue(row.name)
            columns[1].InsertNextValue(row.class_index or 0)
            columns[2].InsertNextValue(round(row.volume_ml, 3))
            columns[3].InsertNextValue(row.voxels)
            columns[4].InsertNextValue(float("nan") if row.mean_hu is None else round(row.mean_hu, 1))
            columns[5].InsertNextValue(row.review or "")
        for column in columns:
            table.AddColumn(column)
        for title, unit in (("Volume (ml)", "ml"), ("Mean HU", "HU")):
            if hasattr(table_node, "SetColumnUnitLabel"):
                table_node.SetColumnUnitLabel(title, unit)
    finally:
        table_node.EndModify(was_modifying)
    table_node.Modified()
    return table_node
