"""Per-segment statistics (volume in ml, voxel count, mean HU) and the table node that shows them.

Computed from the segments as they are now (after any correction), on the input volume's grid.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from UniversalSegLib.mrml import mask_from_segment, segment_class_index

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
    """Statistics of the given (default: all) segments of ``segmentation_node`` over ``volume_node``."""
    import slicer
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    voxel_ml = abs(matrix.Determinant()) / 1000.0
    hounsfield = slicer.util.arrayFromVolume(volume_node).transpose(2, 1, 0)  # IJK view, no copy
    segmentation = segmentation_node.GetSegmentation()
    ids = list(segmentation.GetSegmentIDs()) if segment_ids is None else list(segment_ids)
    out = []
    for segment_id in ids:
        segment = segmentation.GetSegment(segment_id)
        mask = mask_from_segment(segmentation_node, segment_id, volume_node)
        n = int(np.count_nonzero(mask))
        mean = float(hounsfield[mask].mean(dtype=np.float64)) if n else None
        out.append(SegmentStatistics(segment_id, segment.GetName(), segment_class_index(segment), n, n * voxel_ml,
                                     mean, review_state(segment)))
    return out


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
