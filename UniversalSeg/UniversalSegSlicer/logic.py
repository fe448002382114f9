"""The module's logic without Qt: everything the Apply button, the click tool and the review tools do.

:class:`SegmentationLogic` is given the scene and the module logics it needs (it never looks for the
Slicer application), so the same code runs in Slicer and under pytest on the ``slicer-core`` wheel::

    logic = SegmentationLogic(scene)
    job = logic.start_segmentation(ct_node, "liver, liver tumour", model="swinunetr")   # worker thread
    ...                                                 # the GUI keeps running; job.progress, job.cancel()
    applied = logic.apply_result(job, ct_node)          # main thread, one step

Heavy imports (PyTorch, MONAI) happen only when a model is loaded, inside the worker thread.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from UniversalSegLib import __version__
from UniversalSegLib.mrml import segment_class_index, volume_from_node
from UniversalSegLib.taxonomy import ClassInfo, Taxonomy, get_taxonomy

from .classes import ClassCatalog
from .clickselect import CachedPrediction, ClassHit, PredictionCache, volume_fingerprint
from .estimate import RunEstimate, estimate_run
from .export import export_training_case
from .jobs import BackgroundJob, BackgroundRunner
from .results import AppliedResult, class_segment_ids, insert_class_masks
from .review import EditTracker, review_state, set_review_state
from .statistics import segment_statistics, write_statistics_table

__all__ = ["SegmentationLogic", "ModelChoice", "SegmentationOutcome", "STATISTICS_REFERENCE"]

#: Node reference from a segmentation to its statistics table.
STATISTICS_REFERENCE = "UniversalSegStatistics"


@dataclass(frozen=True)
class ModelChoice:
    """A model the user can pick: a registered official model or a checkpoint file."""

    name: str
    label: str
    path: Path | None  # None: registered but not downloaded yet
    license: str
    description: str = ""
    size_mb: int = 0


@dataclass
class SegmentationOutcome:
    """What a segmentation job returns (plain data, produced in the worker thread)."""

    result: object  # UniversalSegLib.pipeline.SegmentationResult
    classes: list[ClassInfo]
    model_name: str
    taxonomy: Taxonomy
    volume_node_id: str


class SegmentationLogic:
    """Background segmentation, result import, click-to-select, review and export for one MRML scene.

    Args:
        scene: the MRML scene.
        threads: PyTorch CPU threads (default: all cores but one, so the GUI stays responsive).
        prediction_cache_size: volumes whose all-class prediction is kept for click-to-select.
    """

    def __init__(self, scene, threads: int | None = None, prediction_cache_size: int = 1) -> None:
        self.scene = scene
        self.threads = threads
        self.runner = BackgroundRunner()
        self.predictions = PredictionCache(prediction_cache_size)
        self._segmenter = None
        self._segmenter_key: tuple | None = None
        self._segmenter_lock = threading.Lock()
        self._trackers: dict[str, EditTracker] = {}

    # ------------------------------------------------------------------------------------------- models
    @staticmethod
    def model_choices() -> list[ModelChoice]:
        """The registered official models (downloaded or not). Needs the library's dependencies (torch)."""
        from UniversalSegLib.models import list_models

        return [ModelChoice(spec.name, f"{spec.name} ({spec.description})", path, spec.license, spec.description,
                            spec.size_mb) for spec, path in list_models()]

    @staticmethod
    def resolve_model(model: str | os.PathLike) -> Path:
        """Path of a registered model name (must be downloaded) or of a checkpoint file."""
        from UniversalSegLib.models import resolve_model

        return Path(resolve_model(model))

    @staticmethod
    def model_license(model: str | os.PathLike) -> str:
        """Licence text of a model: from the registry, or from a UniversalSeg checkpoint's metadata."""
        from UniversalSegLib.checkpoints import OFFICIAL_LICENSE, CheckpointError, read_metadata
        from UniversalSegLib.models import REGISTRY

        if str(model) in REGISTRY:
            return REGISTRY[str(model)].license
        path = Path(model)
        if path.suffix == ".safetensors":
            try:
                return read_metadata(path).license or "No licence recorded in this checkpoint."
            except CheckpointError as error:
                return str(error)
        return OFFICIAL_LICENSE if path.suffix == ".pth" else "Unknown licence."

    def start_download(self, name: str) -> BackgroundJob:
        """Download a registered model in the background (checksum verified; see UniversalSegLib.models)."""
        from UniversalSegLib.models import download_model

        job = BackgroundJob(f"Download of model {name}")

        def run(job: BackgroundJob):
            job.report("load", 0.0)
            return download_model(name, progress=False)

        return self.runner.submit(job, run)

    @property
    def loaded_segmenter(self):
        """The model currently loaded (None before the first run)."""
        return self._segmenter

    @staticmethod
    def _model_name(model) -> str:
        text = str(model)
        return text if os.sep not in text and "/" not in text else Path(text).name

    def _load_segmenter(self, model, device: str, precision: str = "float32", mode: str = "default"):
        """A cached :class:`~UniversalSegLib.pipeline.Segmenter` (loaded in the worker thread)."""
        from UniversalSegLib.pipeline import Segmenter

        path = self.resolve_model(model)
        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, device, precision, mode)
        with self._segmenter_lock:
            if self._segmenter_key != key:
                self._segmenter = None  # free the previous model before loading the next one
                threads = self.threads
                if threads is None and device != "cuda":
                    threads = max(1, (os.cpu_count() or 2) - 1)
                self._segmenter = Segmenter(str(path), device=device, precision=precision, threads=threads,
                                            mode=mode)
                self._segmenter_key = key
            return self._segmenter

    def model_key(self, model) -> tuple:
        """Identity of a model file (path, modification time, size): predictions are cached per model."""
        path = self.resolve_model(model)
        stat = path.stat()
        return (str(path.resolve()), stat.st_mtime_ns, stat.st_size)

    # -------------------------------------------------------------------------------------- segmentation
    def start_segmentation(self, volume_node, classes: str | Sequence[str | int | ClassInfo] | None, model,
                           device: str = "auto", on_progress: Callable[[str, float], None] | None = None,
                           keep_prediction: bool | None = None, mode: str = "default") -> BackgroundJob:
        """Start segmenting ``classes`` (None: all classes of the model) of ``volume_node`` in the background.

        The volume's voxels are copied now, so the scene may change while the job runs. When all classes
        are requested the prediction is also cached for click-to-select (``keep_prediction`` forces it).
        Returns at once; poll ``job.done()`` and call :meth:`apply_result` on the main thread. ``mode`` is
        an inference mode of :data:`UniversalSegLib.pipeline.MODES` ("default", "fast", "reference").
        """
        volume = volume_from_node(volume_node)  # copy on the main thread: the worker never touches MRML
        fingerprint = volume_fingerprint(volume_node)
        model_key = self.model_key(model)  # fails now (on the main thread) when the model is not available
        model_name = self._model_name(model)
        volume_id = volume_node.GetID()
        job = BackgroundJob(f"UniversalSeg on {volume_node.GetName()}", on_progress)

        def run(job: BackgroundJob) -> SegmentationOutcome:
            from UniversalSegLib.io.validation import ensure_ct

            job.report("load", 0.0)
            segmenter = self._load_segmenter(model, device, mode=mode)
            job.report("load", 1.0)
            job.check_cancelled()
            job.report("check", 0.0)
            ensure_ct(volume.array, volume.source)  # a clear error for MR, label maps, images not in HU
            requested = self._resolve_classes(segmenter.taxonomy, classes)
            all_classes = len(requested) == len(segmenter.taxonomy)
            keep = all_classes if keep_prediction is None else keep_prediction
            job.report("check", 1.0)
            result = segmenter.segment(volume, requested, progress=job.report, cancel=job.cancelled,
                                       keep_probabilities=keep)
            if keep and all_classes:
                self.predictions.put((fingerprint, model_key), CachedPrediction(result))
            return SegmentationOutcome(result, requested, model_name, segmenter.taxonomy, volume_id)

        return self.runner.submit(job, run)

    @staticmethod
    def _resolve_classes(taxonomy: Taxonomy, classes) -> list[ClassInfo]:
        if classes is None:
            return list(taxonomy)
        if isinstance(classes, (list, tuple)) and all(isinstance(c, ClassInfo) for c in classes):
            known = set(taxonomy.indices)
            missing = [c.display_name for c in classes if c.index not in known]
            if missing:
                raise ValueError(f"The model does not know: {', '.join(missing)}.")
            return [taxonomy[c.index] for c in classes]
        return ClassCatalog(taxonomy).resolve(classes)

    def existing_classes(self, segmentation_node, classes: Sequence[ClassInfo]) -> list[ClassInfo]:
        """Classes that already have a segment in ``segmentation_node`` (ask before replacing them)."""
        if segmentation_node is None:
            return []
        found = class_segment_ids(segmentation_node, classes)
        return [info for info in classes if info.index in found]

    def apply_result(self, job: BackgroundJob, volume_node, segmentation_node=None, replace_existing: bool = False,
                     show_3d: bool = True, statistics: bool = True) -> AppliedResult:
        """Put a finished job's masks into the scene (main thread), in one step.

        Raises the job's error (the scene is untouched), :class:`~.jobs.JobCancelled`, or
        :class:`~.results.ExistingSegmentsError` when classes already have segments and
        ``replace_existing`` is False (nothing changed; call again with True after asking the user).
        """
        outcome: SegmentationOutcome = job.result()
        if volume_node.GetID() != outcome.volume_node_id:
            raise ValueError("This result belongs to another volume.")
        return self._insert(volume_node, outcome.result.masks, outcome.classes, segmentation_node, replace_existing,
                            outcome.model_name, show_3d, statistics)

    def _insert(self, volume_node, masks, classes, segmentation_node, replace_existing, model_name, show_3d,
                statistics) -> AppliedResult:
        tracker = self._trackers.get(segmentation_node.GetID()) if segmentation_node is not None else None
        applied = insert_class_masks(self.scene, volume_node, masks, classes, segmentation_node,
                                     replace_existing=replace_existing, model_name=model_name, show_3d=show_3d,
                                     tracker=tracker)
        self.track_edits(applied.segmentation_node)
        if statistics:
            applied.table_node = self.update_statistics_table(applied.segmentation_node, volume_node)
        return applied

    def segment(self, volume_node, classes, model, device: str = "auto", segmentation_node=None,
                replace_existing: bool = False, show_3d: bool = True, timeout: float | None = None,
                mode: str = "default") -> AppliedResult:
        """Blocking convenience for scripts and self-tests: start, wait, apply."""
        job = self.start_segmentation(volume_node, classes, model, device, mode=mode)
        if not job.wait(timeout):
            job.cancel()
            job.wait()
            raise TimeoutError(f"segmentation did not finish within {timeout} s and was cancelled")
        return self.apply_result(job, volume_node, segmentation_node, replace_existing, show_3d)

    # ---------------------------------------------------------------------------------- click-to-select
    def cached_prediction(self, volume_node, model) -> CachedPrediction | None:
        return self.predictions.get((volume_fingerprint(volume_node), self.model_key(model)))

    def classes_at(self, volume_node, ras, model) -> list[ClassHit] | None:
        """Classes the model sees at the RAS point (probability > 0.5), most probable first; None when the
        volume has no cached prediction yet (start one with :meth:`start_prediction`)."""
        prediction = self.cached_prediction(volume_node, model)
        return None if prediction is None else prediction.classes_at(ras)

    def start_prediction(self, volume_node, model, device: str = "auto",
                         on_progress: Callable[[str, float], None] | None = None) -> BackgroundJob:
        """Predict every class of the model once for this volume (cached for clicks)."""
        return self.start_segmentation(volume_node, None, model, device, on_progress, keep_prediction=True)

    def add_predicted_class(self, volume_node, index: int, model, segmentation_node=None,
                            replace_existing: bool = False, show_3d: bool = True) -> AppliedResult:
        """Add one class as a segment from the cached prediction (no network run)."""
        prediction = self.cached_prediction(volume_node, model)
        if prediction is None:
            raise LookupError("No prediction for this volume yet; it is computed once in the background.")
        info = next((c for c in prediction.classes if c.index == index), None)
        if info is None:
            raise KeyError(f"The model has no class {index}.")
        return self._insert(volume_node, {index: prediction.mask(index)}, [info], segmentation_node,
                            replace_existing, self._model_name(model), show_3d, statistics=True)

    def remove_class_segment(self, segmentation_node, index: int) -> bool:
        """Remove the segment of a class (click-to-select toggles); False when there was none."""
        segment_id = class_segment_ids(segmentation_node, [self._class_info(index)]).get(index)
        if segment_id is None:
            return False
        tracker = self._trackers.get(segmentation_node.GetID())
        if tracker is not None:
            with tracker.suspended():
                segmentation_node.GetSegmentation().RemoveSegment(segment_id)
        else:
            segmentation_node.GetSegmentation().RemoveSegment(segment_id)
        return True

    @staticmethod
    def _class_info(index: int) -> ClassInfo:
        return get_taxonomy()[index]

    # -------------------------------------------------------------------------------------------- review
    def track_edits(self, segmentation_node) -> EditTracker:
        """Observe a segmentation so that edited UniversalSeg segments become ``corrected``."""
        tracker = self._trackers.get(segmentation_node.GetID())
        if tracker is None or tracker.segmentation_node is not segmentation_node:
            tracker = EditTracker(segmentation_node)
            self._trackers[segmentation_node.GetID()] = tracker
        return tracker

    def review_states(self, segmentation_node) -> dict[str, str]:
        """``{segment id: review state}`` of the UniversalSeg segments (pending edits resolved first)."""
        tracker = self._trackers.get(segmentation_node.GetID())
        if tracker is not None:
            tracker.resolve()
        segmentation = segmentation_node.GetSegmentation()
        states = {}
        for segment_id in segmentation.GetSegmentIDs():
            segment = segmentation.GetSegment(segment_id)
            state = review_state(segment)
            if state is not None and segment_class_index(segment) is not None:
                states[segment_id] = state
        return states

    def set_review_state(self, segmentation_node, segment_id: str, state: str) -> None:
        """Accept a segment, mark it corrected, or reset it to unreviewed."""
        tracker = self._trackers.get(segmentation_node.GetID())
        if tracker is not None:
            tracker.resolve()
        set_review_state(segmentation_node, segment_id, state)

    def export_for_training(self, volume_node, segmentation_node, folder, case_id: str, overwrite: bool = False,
                            taxonomy: Taxonomy | None = None) -> Path:
        """Write the reviewed segments as a partially labelled training case; returns the .case.json path."""
        return export_training_case(volume_node, segmentation_node, folder, case_id, overwrite=overwrite,
                                    source={"tool": f"UniversalSeg Slicer module {__version__}"},
                                    taxonomy=taxonomy, tracker=self._trackers.get(segmentation_node.GetID()))

    # ---------------------------------------------------------------------------------------- statistics
    def update_statistics_table(self, segmentation_node, volume_node, table_node=None):
        """Create or refresh the statistics table of a segmentation (class, ml, voxels, mean HU, review)."""
        if table_node is None:
            table_node = segmentation_node.GetNodeReference(STATISTICS_REFERENCE)
        rows = segment_statistics(segmentation_node, volume_node)
        table_node = write_statistics_table(self.scene, rows, table_node,
                                            name=f"{segmentation_node.GetName()} statistics")
        segmentation_node.SetNodeReferenceID(STATISTICS_REFERENCE, table_node.GetID())
        return table_node

    # ------------------------------------------------------------------------------------------- estimate
    def estimate(self, volume_node, device: str = "auto", classes: int = 32, backbone: str = "swinunetr",
                 mode: str = "default") -> RunEstimate:
        """Rough time and memory of a run of the official-size model on this volume."""
        import vtk

        image = volume_node.GetImageData()
        matrix = vtk.vtkMatrix4x4()
        volume_node.GetIJKToRASMatrix(matrix)
        spacing = [sum(matrix.GetElement(r, c) ** 2 for r in range(3)) ** 0.5 for c in range(3)]
        if device == "auto":
            device = "cuda" if _cuda_available() else "cpu"
        threads = self.threads or max(1, (os.cpu_count() or 2) - 1)
        overlap = 0.0 if mode == "fast" else 0.5  # window counts of the modes (UniversalSegLib.pipeline.MODES)
        return estimate_run(image.GetDimensions(), spacing, backbone, device, classes, threads, overlap=overlap,
                            streaming=mode != "reference")

    def shutdown(self) -> None:
        """Stop observing and release the worker thread and the loaded model."""
        for tracker in self._trackers.values():
            tracker.stop()
        self._trackers.clear()
        self.runner.shutdown(wait=False)
        self._segmenter = None
        self.predictions.clear()


def _cuda_available() -> bool:
    try:
        import torch
    except Exception:  # no (working) PyTorch yet: the estimate is for the CPU
        return False
    return bool(torch.cuda.is_available())
