""""Export for training": the reviewed segments of a segmentation as a partially labelled training case.

Only classes a person reviewed (``accepted`` or ``corrected``) are written and listed as annotated;
every other class stays UNKNOWN for training (never background), so an unchecked pseudo-label never
teaches the network anything. The files are the library's training-case format
(:func:`UniversalSegLib.io.training_case.write_training_case`), which the training package reads.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

from UniversalSegLib.errors import OutputError
from UniversalSegLib.io.training_case import write_training_case
from UniversalSegLib.mrml import mask_from_segment, segment_class_index, volume_from_node
from UniversalSegLib.taxonomy import Taxonomy, get_taxonomy

from .review import REVIEWED_STATES, review_state

__all__ = ["ExportError", "reviewed_segments", "export_training_case", "suggest_case_id"]


class ExportError(OutputError, ValueError):
    """Nothing to export, or an ambiguous segmentation (two reviewed segments for one class)."""


def suggest_case_id(volume_name: str) -> str:
    """A valid case id (letters, digits, -, _) made from a volume name."""
    text = re.sub(r"[^A-Za-z0-9_-]+", "_", volume_name).strip("_")
    return text or "case"


def reviewed_segments(segmentation_node) -> dict[int, tuple[str, str]]:
    """``{class index: (segment id, review state)}`` of the segments a person reviewed."""
    found: dict[int, tuple[str, str]] = {}
    segmentation = segmentation_node.GetSegmentation()
    for segment_id in segmentation.GetSegmentIDs():
        segment = segmentation.GetSegment(segment_id)
        state, index = review_state(segment), segment_class_index(segment)
        if index is None or state not in REVIEWED_STATES:
            continue
        if index in found:
            raise ExportError(
                f'segments "{segmentation.GetSegment(found[index][0]).GetName()}" and "{segment.GetName()}" '
                f"are both reviewed as class {index}; merge them or mark one unreviewed before exporting.")
        found[index] = (segment_id, state)
    return found


def export_training_case(volume_node, segmentation_node, folder, case_id: str, overwrite: bool = False,
                         source: Mapping | None = None, taxonomy: Taxonomy | None = None, tracker=None) -> Path:
    """Write the CT, the label map of the reviewed classes and the ``.case.json``; returns its path.

    The CT and label map keep the volume's own grid and its world geometry (linear parent transforms
    included). ``tracker`` (an :class:`~.review.EditTracker`) is resolved first so that edits not yet
    counted are taken into account.
    """
    if tracker is not None:
        tracker.resolve()
    reviewed = reviewed_segments(segmentation_node)
    if not reviewed:
        raise ExportError("Nothing to export: no segment has been reviewed. Accept or correct at least one "
                          "segment first; unreviewed segments are never used for training.")
    volume = volume_from_node(volume_node, world=True)
    masks = {index: mask_from_segment(segmentation_node, segment_id, volume_node)
             for index, (segment_id, _) in reviewed.items()}
    provenance = {"tool": "UniversalSeg Slicer module", "input": volume_node.GetName(),
                  "segmentation": segmentation_node.GetName()}
    provenance.update(source or {})
    return write_training_case(folder, case_id, volume, masks, annotated=sorted(reviewed),
                               review={index: state for index, (_, state) in reviewed.items()},
                               source=provenance, overwrite=overwrite, taxonomy=taxonomy or get_taxonomy())
