"""Review of a batch folder (``universalseg batch -o OUT``) in the module: the queue, one case at a time.

:class:`BatchReview` lists the batch's cases in the order of its review queue (``OUT/review_queue.csv``,
worst case first) with the reasons of each class. Loading a case puts into the scene what the batch
made, without running the network: the CT (read from the case's input as the batch read it, so the grid
is the one the outputs refer to), its segments (the case's ``.seg.nrrd``, read by Slicer's own reader)
as ordinary UniversalSeg segments (review states, edit tracking, statistics), each tagged with its
reasons, and the stored model-grid probabilities, attached to the volume so that click-to-select
answers from them. "Export for training" writes the reviewed case into the case's folder, where the
training package reads a batch's corrections (:mod:`UniversalSegLib.batch.corrections`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from UniversalSegLib.batch.corrections import correction_paths
from UniversalSegLib.batch.queue import QUEUE_FILE, read_queue_csv
from UniversalSegLib.batch.state import corpus_rows, database_paths
from UniversalSegLib.batch.worker import case_files
from UniversalSegLib.errors import InputNotFoundError, MRMLBridgeError
from UniversalSegLib.mrml import mask_from_segment
from UniversalSegLib.taxonomy import ClassInfo, Taxonomy, get_taxonomy
from UniversalSegLib.worker.protocol import WorkerResult

from .clickselect import CachedPrediction
from .results import AppliedResult

__all__ = ["BatchCase", "BatchReview", "LoadedCase", "TAG_REASONS", "TAG_REASON_SEPARATOR"]

#: Segment tag holding the batch's reasons for reviewing the segment (saved with the .seg.nrrd).
TAG_REASONS = "UniversalSeg.ReviewReasons"
#: Between two reasons in :data:`TAG_REASONS`.
TAG_REASON_SEPARATOR = "\n"


@dataclass
class BatchCase:
    """One case of the queue: its priority (that of its worst class) and each class's priority and reasons."""

    case_id: str
    priority: float
    folder: Path
    input: str
    #: class display name -> (priority, reasons), in queue order (worst first).
    classes: dict = field(default_factory=dict)
    #: output format -> file the batch wrote (as recorded; the file is looked up in ``folder``, which may
    #: have moved since).
    outputs: dict = field(default_factory=dict)
    #: the batch's options of the case (classes, formats, mode, force...).
    options: dict = field(default_factory=dict)

    @property
    def top_reasons(self) -> list[str]:
        """The reasons of the worst class, as "<class>: <reason>"."""
        for name, (_, reasons) in self.classes.items():
            if reasons:
                return [f"{name}: {reason}" for reason in reasons]
        return []


@dataclass
class LoadedCase:
    """A case as it is in the scene."""

    case: BatchCase
    volume_node: object
    segmentation_node: object
    applied: AppliedResult
    prediction: CachedPrediction
    #: segment id -> reasons of its class.
    reasons: dict = field(default_factory=dict)


class BatchReview:
    """The review of one batch folder through a :class:`~.logic.SegmentationLogic` (its scene)."""

    def __init__(self, logic, folder: str | os.PathLike, taxonomy: Taxonomy | None = None) -> None:
        self.logic = logic
        self.folder = Path(folder).expanduser()
        self.taxonomy = taxonomy or get_taxonomy()
        if not database_paths(self.folder):
            raise InputNotFoundError(f"{self.folder} is not a batch folder (no batch.sqlite); choose the -o "
                                     "folder of 'universalseg batch'.")
        records = {record.case_id: record for record in corpus_rows(self.folder)}
        self.cases: list[BatchCase] = []
        by_id: dict[str, BatchCase] = {}
        for entry in read_queue_csv(self.folder / QUEUE_FILE):  # highest class priority first
            record = records.get(entry.case)
            if record is None or record.status != "done":
                continue  # re-run since the queue was written: its outputs are not those the queue scored
            case = by_id.get(entry.case)
            if case is None:
                case = by_id[entry.case] = BatchCase(entry.case, entry.case_priority, self.folder / entry.case,
                                                     record.input, outputs=dict(record.outputs),
                                                     options=_options(record.options))
                self.cases.append(case)
            case.classes[entry.name] = (entry.priority, list(entry.reasons))
        self.cases.sort(key=lambda c: -c.priority)  # stable: cases of equal priority keep the queue's order
        self.current: LoadedCase | None = None

    def case(self, case_id: str) -> BatchCase:
        for case in self.cases:
            if case.case_id == case_id:
                return case
        raise KeyError(f"case {case_id!r} is not in the review queue of {self.folder}")

    def is_exported(self, case_id: str) -> bool:
        """Whether the case has been exported for training (its corrections are in its folder)."""
        return correction_paths(self.folder, case_id)["json"].exists()

    def next_case(self) -> BatchCase | None:
        """The first case after the loaded one, in queue order, not exported yet (None: none left)."""
        start = 0
        if self.current is not None:
            start = [c.case_id for c in self.cases].index(self.current.case.case_id) + 1
        return next((c for c in self.cases[start:] if not self.is_exported(c.case_id)), None)

    # ------------------------------------------------------------------------------------------ loading
    def load_case(self, case_id: str, show_3d: bool = False) -> LoadedCase:
        """Put the case's CT, segments and stored probabilities into the scene, then remove the previous case's
        nodes (a case that cannot be loaded leaves the scene as it was); no network runs."""
        from UniversalSegLib.io import read_volume
        from UniversalSegLib.mrml import volume_node_from_volume

        case = self.case(case_id)
        files = case_files(case.folder, case.case_id)
        if "seg.nrrd" not in case.outputs:
            raise InputNotFoundError(f"case {case.case_id} has no .seg.nrrd to review: run the batch with the "
                                     "seg.nrrd output format (one of its defaults).")
        seg_path = case.folder / Path(case.outputs["seg.nrrd"]).name
        for path in (seg_path, files["probabilities"]):
            if not path.is_file():
                raise InputNotFoundError(f"{path} is missing: the outputs of case {case.case_id} are incomplete.")
        if not Path(case.input).exists():
            raise InputNotFoundError(f"the CT of case {case.case_id}, {case.input}, is not there any more (it is read "
                                     "from where it was when the batch ran).")
        with np.load(files["probabilities"], allow_pickle=False) as stored:
            keys = [str(k) for k in stored["class_keys"]]
            indices = [int(i) for i in stored["class_indices"]]
            stack = stored["probabilities"]  # read (decompressed) once
            probabilities = {index: stack[n] for n, index in enumerate(indices)}
            grid_affine = np.asarray(stored["affine"], dtype=np.float64)
        classes = [self._class(key, index) for key, index in zip(keys, indices)]
        # the batch's reader and its --force: the grid its outputs refer to
        volume = read_volume(case.input, force=bool(case.options.get("force")))
        scene = self.logic.scene
        volume_node = volume_node_from_volume(scene, volume, case.case_id)
        applied = None
        try:
            masks = self._read_segments(seg_path, volume_node, classes)
            applied = self.logic.import_masks(volume_node, masks, [c for c in classes if c.index in masks],
                                              model_name=f"batch {self.folder.name}")
            segmentation_node = applied.segmentation_node
            segmentation_node.SetName(f"{case.case_id} segmentation")
            result = WorkerResult(tuple(volume.shape), masks, probabilities, grid_affine,
                                  tuple(next(iter(probabilities.values())).shape) if probabilities else (0, 0, 0))
            prediction = CachedPrediction(result, classes)
            reasons = {}
            for index, segment_id in applied.segment_ids.items():
                info = next(c for c in classes if c.index == index)
                found = case.classes.get(info.display_name, (0.0, []))[1]
                reasons[segment_id] = found
                segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
                segment.SetTag(TAG_REASONS, TAG_REASON_SEPARATOR.join(found))
            if show_3d:
                from .results import show_closed_surfaces

                show_closed_surfaces(segmentation_node, self.logic.track_edits(segmentation_node))
        except BaseException:  # nothing half-loaded stays in the scene; the previous case stays loaded
            leftovers = (applied.segmentation_node, applied.table_node) if applied is not None else ()
            for node in (*leftovers, volume_node):
                if node is not None and scene.IsNodePresent(node):
                    scene.RemoveNode(node)
            raise
        self.close_case()
        self.logic.attach_prediction(volume_node, prediction)
        self.current = LoadedCase(case, volume_node, segmentation_node, applied, prediction, reasons)
        return self.current

    def load_next(self, show_3d: bool = False) -> LoadedCase | None:
        """Load :meth:`next_case` (None when every case after the current one has been exported)."""
        case = self.next_case()
        return None if case is None else self.load_case(case.case_id, show_3d)

    def _class(self, key: str, index: int) -> ClassInfo:
        try:
            info = self.taxonomy.by_key(key)
        except Exception:  # noqa: BLE001 - the class table raises its own error type for an unknown key
            raise MRMLBridgeError(f"class {key!r} of the batch's model is not in the class table; open the "
                                  "batch with that model's classes.") from None
        if info.index != index:
            raise MRMLBridgeError(f"class {key!r} has number {index} in the batch but {info.index} in the class "
                                  "table; open the batch with its model's classes.")
        return info

    def _read_segments(self, path: Path, volume_node, classes) -> dict[int, np.ndarray]:
        """``{class index: mask on the volume's grid}`` from a ``.seg.nrrd`` read by Slicer's reader."""
        import slicer

        by_key = {info.key: info for info in classes}
        scene = self.logic.scene
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "UniversalSeg batch reader")
        try:
            reader = slicer.vtkMRMLSegmentationStorageNode()
            reader.SetFileName(str(path))
            if not reader.ReadData(node):
                raise MRMLBridgeError(f"Slicer could not read {path}")
            masks = {}
            segmentation = node.GetSegmentation()
            for segment_id in segmentation.GetSegmentIDs():
                info = by_key.get(segment_id)
                if info is None:
                    raise MRMLBridgeError(f"{path}: segment {segment_id!r} is not a class of the batch's model")
                masks[info.index] = mask_from_segment(node, segment_id, volume_node)
            return masks
        finally:
            scene.RemoveNode(node)

    def close_case(self) -> None:
        """Remove the loaded case's nodes from the scene (its exported files stay)."""
        if self.current is None:
            return
        scene = self.logic.scene
        table = self.current.applied.table_node
        self.logic.detach_prediction(self.current.volume_node)
        for node in (self.current.segmentation_node, table, self.current.volume_node):
            if node is not None and scene.IsNodePresent(node):
                scene.RemoveNode(node)
        self.current = None

    # ------------------------------------------------------------------------------------------- review
    def reasons(self, segment_id: str) -> list[str]:
        """The batch's reasons for reviewing a segment of the loaded case ([] when it had no concern)."""
        if self.current is None:
            return []
        return list(self.current.reasons.get(segment_id, []))

    def export(self, overwrite: bool = False) -> Path:
        """"Export for training" of the loaded case into its batch folder, where the training package reads
        a batch's corrections; returns the ``.case.json``."""
        if self.current is None:
            raise ValueError("No batch case is loaded.")
        case = self.current.case
        return self.logic.export_for_training(self.current.volume_node, self.current.segmentation_node,
                                              correction_paths(self.folder, case.case_id)["json"].parent,
                                              case.case_id, overwrite=overwrite, taxonomy=self.taxonomy)


def _options(text: str) -> dict:
    try:
        value = json.loads(text)
    except (TypeError, ValueError):  # a database of another version: the defaults
        return {}
    return value if isinstance(value, dict) else {}
