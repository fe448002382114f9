"""The module's logic without Qt: everything the Apply button, the click tool and the review tools do.

:class:`SegmentationLogic` is given the scene and the module logics it needs (it never looks for the
Slicer application), so the same code runs in Slicer and under pytest on the ``slicer-core`` wheel::

    logic = SegmentationLogic(scene)
    job = logic.start_segmentation(ct_node, "liver, liver tumour", model="swinunetr")   # worker process
    ...                                   # the GUI keeps running; job.done() (from a timer), job.cancel()
    applied = logic.apply_result(job, ct_node)          # main thread, one step

With ``progressive=True`` on a CPU the worker first sends the fast layout's result: ``job.preview()`` is set
and :meth:`SegmentationLogic.apply_preview` shows it as segments named "<class> (quick result)"; the exact
result replaces them in :meth:`SegmentationLogic.apply_result`, except those a person edited or accepted
meanwhile, which are kept. When the exact run is cancelled or fails, the shown preview stays in the scene,
marked as the quick result: the user has seen it and may already be working on it, and it is a complete
result of the fast mode, not a half-written one. Deleting its segments is quick; a preview taken away
could not be brought back without running again.

Inference runs in a persistent worker process (:mod:`UniversalSegLib.worker`) that keeps the model loaded
between runs: this process never imports PyTorch or MONAI, so it never holds their memory or DLLs, and
a worker that dies (out of memory, CUDA error, killed) is replaced on the next request.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from UniversalSegLib import __version__
from UniversalSegLib.mrml import segment_class_index, volume_from_node
from UniversalSegLib.taxonomy import ClassInfo, Taxonomy, get_taxonomy
from UniversalSegLib.worker import read_result
from UniversalSegLib.worker.protocol import write_volume

from .classes import ClassCatalog
from .clickselect import CachedPrediction, ClassHit, PredictionCache, volume_fingerprint
from .estimate import RunEstimate, estimate_run
from .export import export_training_case
from .jobs import BackgroundJob, JobCancelled
from .results import AppliedResult, class_segment_ids, insert_class_masks, preview_mode
from .review import EditTracker, review_state, set_review_state
from .statistics import SegmentStatistics, segment_statistics, write_statistics_table

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
    """What a segmentation job returns: the worker's masks, the classes, and what the worker measured."""

    result: object  # UniversalSegLib.worker.WorkerResult
    classes: list[ClassInfo]
    model_name: str
    taxonomy: Taxonomy
    volume_node_id: str
    statistics: dict = None  # class index -> {"voxels", "volume_ml", "mean_hu"} (measured by the worker)
    info: dict = None  # the worker's answer: model_loaded, load_seconds, seconds, runtime, mode, device...
    preview: bool = False  # the quick result of a progressive run (fast layout), not the exact one


def worker_python() -> str:
    """The interpreter for the worker: ``PythonSlicer`` inside 3D Slicer (Slicer's Python and packages;
    ``sys.executable`` there is the application itself), else this interpreter.
    ``$UNIVERSALSEG_WORKER_PYTHON`` overrides both."""
    override = os.environ.get("UNIVERSALSEG_WORKER_PYTHON")
    if override:
        return override
    slicer = sys.modules.get("slicer")
    if slicer is not None and getattr(slicer, "app", None) is not None:
        found = shutil.which("PythonSlicer")
        if found:
            return found
    return sys.executable


class SegmentationLogic:
    """Segmentation in the worker process, result import, click-to-select, review and export for one scene.

    Args:
        scene: the MRML scene.
        threads: PyTorch CPU threads of the worker (default: all cores but one, so the GUI stays responsive).
        prediction_cache_size: volumes whose all-class prediction is kept for click-to-select.
        python: the worker's interpreter (default: :func:`worker_python`).
        worker: a :class:`~UniversalSegLib.worker.WorkerProcess` to use instead of an own one (scripts that
            work on several scenes share one loaded model); it is not stopped by :meth:`shutdown`.
        front_end: which UniversalSeg front-end drives this logic, recorded as the source of exported
            training cases ("Slicer module", "review (browser)").
    """

    def __init__(self, scene, threads: int | None = None, prediction_cache_size: int = 1,
                 python: str | None = None, worker=None, front_end: str = "Slicer module") -> None:
        from UniversalSegLib.worker import WorkerProcess

        self.scene = scene
        self.threads = threads
        self.front_end = front_end
        self._own_worker = worker is None
        self.worker = worker if worker is not None else WorkerProcess(python or worker_python())
        self.downloader = WorkerProcess(python or worker_python())  # separate: a cancelled download is killed
        self.predictions = PredictionCache(prediction_cache_size)
        self._stored_predictions: dict = {}  # volume node id -> (fingerprint, prediction read from files)
        self.last_run: dict = {}  # the worker's answer to the last segmentation (device, load time...)
        self._trackers: dict[str, EditTracker] = {}

    # ------------------------------------------------------------------------------------------- models
    @staticmethod
    def model_choices() -> list[ModelChoice]:
        """The registered official models (downloaded or not)."""
        from UniversalSegLib.model_store import list_models

        return [ModelChoice(spec.name, f"{spec.name} ({spec.description})", path, spec.license, spec.description,
                            spec.size_mb) for spec, path in list_models()]

    @staticmethod
    def resolve_model(model: str | os.PathLike) -> Path:
        """Path of a registered model name (must be downloaded) or of a checkpoint file."""
        from UniversalSegLib.model_store import resolve_model

        return Path(resolve_model(model))

    @staticmethod
    def model_metadata(model: str | os.PathLike | None):
        """What a model is (backbone, classes, preprocessing and inference parameters) without loading it or
        PyTorch: a registered model (by name or by its official file name) -> the official metadata; a
        UniversalSeg ``.safetensors`` -> its header. None when that cannot be told before loading (another
        ``.pth`` file, a missing or damaged file)."""
        from UniversalSegLib.checkpoint_metadata import official_metadata, read_metadata
        from UniversalSegLib.errors import CheckpointError
        from UniversalSegLib.model_store import REGISTRY
        from UniversalSegLib.settings import ModelConfig

        if not model:
            return None
        text = str(model)
        spec = REGISTRY.get(text) or next((s for s in REGISTRY.values() if Path(text).name == s.filename), None)
        if spec is not None:
            return official_metadata(ModelConfig(backbone=spec.backbone))
        if Path(text).suffix == ".safetensors":
            try:
                return read_metadata(text)
            except CheckpointError:
                return None
        return None

    @classmethod
    def model_classes(cls, model: str | os.PathLike | None) -> Taxonomy:
        """The classes a model segments (the official 32 when that cannot be told before loading)."""
        metadata = cls.model_metadata(model)
        return metadata.classes if metadata is not None else get_taxonomy()

    @staticmethod
    def model_license(model: str | os.PathLike) -> str:
        """Licence text of a model: from the registry, or from a UniversalSeg checkpoint's metadata."""
        from UniversalSegLib.checkpoint_metadata import read_metadata
        from UniversalSegLib.errors import CheckpointError
        from UniversalSegLib.model_store import OFFICIAL_LICENSE, REGISTRY

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
        """Download a registered model in a separate process (checksum verified; see
        UniversalSegLib.model_store). Cancel stops that process; the partial file is never installed."""
        downloader = self.downloader
        request_id = downloader.new_request_id()

        def cancel():
            downloader.kill()
            downloader.poll()

        job = BackgroundJob(f"Download of model {name}", poll=downloader.poll, on_cancel=cancel)
        downloader.send(request_id, "download", self._listener(job, lambda event: Path(event["path"])), name=name)
        return job

    def start_import(self, path: str | os.PathLike) -> BackgroundJob:
        """Import an official checkpoint file into the model cache in a separate process (validating it
        needs PyTorch, which Slicer's process never loads)."""
        downloader = self.downloader
        request_id = downloader.new_request_id()
        job = BackgroundJob(f"Import of {Path(path).name}", poll=downloader.poll, on_cancel=downloader.kill)
        downloader.send(request_id, "import", self._listener(job, lambda event: Path(event["path"])), path=str(path))
        return job

    @staticmethod
    def model_folder() -> Path:
        """Where downloaded and imported models are kept."""
        from UniversalSegLib.model_store import models_dir

        return models_dir()

    def clear_model_cache(self) -> int:
        """Delete the downloaded and imported models (the worker is stopped first: it may hold one open);
        returns the number of bytes freed."""
        folder = self.model_folder()
        if not folder.is_dir():
            return 0
        self.release_model()
        freed = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
        shutil.rmtree(folder)
        return freed

    @staticmethod
    def _listener(job: BackgroundJob, on_result, on_end=None, on_preview=None):
        """Turns a request's worker events into the job's state (``on_result(event)`` gives its value,
        ``on_preview(event)`` a progressive run's quick result)."""
        from UniversalSegLib.worker import error_from_event

        def listener(event: dict) -> None:
            kind = event.get("event")
            try:
                if kind == "progress":
                    job.report(event["stage"], event["fraction"], event.get("phase"))
                elif kind == "preview" and on_preview is not None:
                    value = on_preview(event)  # None for a job that has ended meanwhile
                    if value is not None:
                        job.set_preview(value)
                elif kind == "result":
                    if not job.finished:  # a cancelled job's late result is not even read
                        job.succeed(on_result(event))
                elif kind == "error":
                    error = error_from_event(event)
                    job.fail(error, event.get("details", ""))
                elif kind == "cancelled":
                    job.metadata["worker_stopped_at"] = time.monotonic()  # the worker is free again
                    job.fail(JobCancelled(f"{job.description} was cancelled"))
                elif kind == "died":
                    job.fail(event["error"])
            except Exception as error:  # reading the answer failed: the job fails, the GUI goes on
                import traceback

                job.fail(error, traceback.format_exc())
            finally:
                if kind not in ("progress", "preview") and on_end is not None:
                    on_end(event)

        return listener

    @staticmethod
    def _model_name(model) -> str:
        text = str(model)
        return text if os.sep not in text and "/" not in text else Path(text).name

    def model_key(self, model) -> tuple:
        """Identity of a model file (path, modification time, size): predictions are cached per model."""
        path = self.resolve_model(model)
        stat = path.stat()
        return (str(path.resolve()), stat.st_mtime_ns, stat.st_size)

    # -------------------------------------------------------------------------------------- segmentation
    def start_segmentation(self, volume_node, classes: str | Sequence[str | int | ClassInfo] | None, model,
                           device: str = "auto", on_progress: Callable[[str, float], None] | None = None,
                           keep_prediction: bool | None = None, mode: str = "default",
                           runtime: str | None = None, progressive: bool = False,
                           on_preview: Callable[[SegmentationOutcome], None] | None = None) -> BackgroundJob:
        """Start segmenting ``classes`` (None: all classes of the model) of ``volume_node`` in the background.

        The volume's voxels are copied now, so the scene may change while the job runs. When all classes
        are requested the prediction is also cached for click-to-select (``keep_prediction`` forces it).
        Returns at once; poll ``job.done()`` and call :meth:`apply_result` on the main thread. ``mode`` is
        an inference mode of :data:`UniversalSegLib.settings.MODES` ("default", "fast", "reference");
        ``runtime`` one of :data:`UniversalSegLib.settings.RUNTIMES` ("auto": OpenVINO on a CPU when installed;
        None: ``$UNIVERSALSEG_RUNTIME`` or "auto").

        ``progressive``: when the worker runs on a CPU in the default mode, it first computes the fast
        layout with the same loaded model and sends it as ``job.preview()`` (a :class:`SegmentationOutcome`
        with ``preview=True``; see :meth:`apply_preview`), then the exact result. Ignored on a GPU and in the
        other modes. ``on_preview(outcome)`` is called when it arrives (in ``job.done()``).
        """
        volume = volume_from_node(volume_node)  # a copy: the scene may change while the worker runs
        fingerprint = volume_fingerprint(volume_node)
        model_key = self.model_key(model)  # fails now (on the main thread) when the model is not available
        model_name = self._model_name(model)
        volume_id = volume_node.GetID()
        taxonomy = self.model_classes(model)
        requested = self._resolve_classes(taxonomy, classes)
        all_classes = len(requested) == len(taxonomy)
        keep = all_classes if keep_prediction is None else keep_prediction
        worker = self.worker
        request_id = worker.new_request_id()
        volume_file = write_volume(worker.folder, request_id, volume.array)
        job = BackgroundJob(f"UniversalSeg on {volume_node.GetName()}", on_progress, poll=worker.poll,
                            on_cancel=lambda: worker.cancel(request_id), on_preview=on_preview)

        def on_result(event: dict) -> SegmentationOutcome:
            result = read_result(worker.folder / event["output"])
            taxonomy = Taxonomy.from_dict(event["taxonomy"])
            done = [taxonomy[index] for index in event["classes"]]
            self.last_run = {key: value for key, value in event.items() if key not in ("taxonomy", "statistics")}
            statistics = {row["index"]: row for row in event.get("statistics", [])}
            if keep and all_classes:
                self.predictions.put((fingerprint, model_key), CachedPrediction(result, done, statistics))
            return SegmentationOutcome(result, done, model_name, taxonomy, volume_id, statistics, self.last_run)

        def on_preview(event: dict) -> SegmentationOutcome | None:
            try:
                if job.finished:  # cancelled meanwhile: not even read
                    return None
                result = read_result(worker.folder / event["output"])
            finally:
                worker.discard(event["output"])  # read once, into memory
            done = [taxonomy[index] for index in event["classes"]]
            statistics = {row["index"]: row for row in event.get("statistics", [])}
            info = {key: value for key, value in event.items() if key != "statistics"}
            return SegmentationOutcome(result, done, model_name, taxonomy, volume_id, statistics, info, preview=True)

        def on_end(event: dict) -> None:  # the request's files are not needed any more
            worker.discard(volume_file)
            if event.get("output"):
                worker.discard(event["output"])

        worker.send(request_id, "segment", self._listener(job, on_result, on_end, on_preview), volume=volume_file,
                    affine=[[float(v) for v in row] for row in volume.affine], source=str(volume.source),
                    model=str(self.resolve_model(model)), device=device, mode=mode, runtime=runtime,
                    threads=self._worker_threads(device),
                    classes=None if all_classes else [c.index for c in requested], keep_probabilities=keep,
                    progressive=bool(progressive))
        return job

    @staticmethod
    def progressive_default(device: str) -> bool:
        """Whether "show a quick result first" starts on for ``device``: on a CPU yes (the exact run takes
        minutes there); on a GPU no (the exact result comes in seconds; the worker ignores it there anyway)."""
        return device == "cpu" or (device == "auto" and not _cuda_likely())

    def _worker_threads(self, device: str) -> int | None:
        if self.threads is not None or device == "cuda":
            return self.threads
        return max(1, (os.cpu_count() or 2) - 1)  # one core left for Slicer

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
                     show_3d: bool = False, statistics: bool = True) -> AppliedResult:
        """Put a finished job's masks into the scene (main thread), in one step.

        Raises the job's error (the scene is untouched), :class:`~.jobs.JobCancelled`, or
        :class:`~.results.ExistingSegmentsError` when classes already have segments and
        ``replace_existing`` is False (nothing changed; call again with True after asking the user).

        When :meth:`apply_preview` showed this job's quick result, the exact segments replace the preview
        segments in the same step (same IDs and order; ``segmentation_node`` None: the preview's node), except
        those a person edited or accepted meanwhile: they are kept, listed in ``kept_previews``, and their
        class's exact mask is not applied (``job.result().result.masks`` still has it).
        """
        outcome: SegmentationOutcome = job.result()
        if volume_node.GetID() != outcome.volume_node_id:
            raise ValueError("This result belongs to another volume.")
        shown = job.metadata.get("preview_segments")
        if not shown:
            return self._insert(volume_node, outcome.result.masks, outcome.classes, segmentation_node,
                                replace_existing, outcome.model_name, show_3d, statistics, outcome.statistics)
        preview_node = self.scene.GetNodeByID(shown["node_id"])
        if segmentation_node is None and preview_node is not None:
            segmentation_node = preview_node
        untouched, kept = self._preview_segments(preview_node, shown["segment_ids"])
        elsewhere = preview_node is not None and preview_node is not segmentation_node
        masks = {index: mask for index, mask in outcome.result.masks.items() if index not in kept}
        classes = [info for info in outcome.classes if info.index not in kept]
        if not masks:
            applied = AppliedResult(segmentation_node)
        else:  # this step can still fail (existing segments, transforms): the preview is touched only after it
            applied = self._insert(volume_node, masks, classes, segmentation_node, replace_existing,
                                   outcome.model_name, show_3d, statistics, outcome.statistics,
                                   replace_segments={} if elsewhere else untouched)
        if elsewhere:  # the exact result went to another segmentation: the preview's segments are done with
            self._remove_segments(preview_node, untouched.values())
        applied.kept_previews = kept
        job.metadata["preview_segments"] = None  # replaced: a second apply is an ordinary one
        return applied

    def apply_preview(self, job: BackgroundJob, volume_node, segmentation_node=None, show_3d: bool = False,
                      statistics: bool = True) -> AppliedResult | None:
        """Show a progressive job's quick result (``job.preview()``) as segments named "<class> (quick
        result)" and tagged :data:`~.results.TAG_PREVIEW`, in one step, once; None when no preview is pending
        (:meth:`preview_pending`) or every class already has a segment. The exact result replaces these
        segments in :meth:`apply_result`; if the job is cancelled or fails, they stay.

        A preview never replaces an existing segment, even when the run was started to replace it: that
        segment may hold a person's corrections, and a cancelled exact run would leave only the quick result.
        Classes that have a segment get theirs from the exact result (asked about in :meth:`apply_result`).
        An error here marks the preview as not shown, so a polling GUI does not try (and report) it again.
        The preview's masks are dropped from ``job.preview()`` here (they live on as segments).
        """
        if not self.preview_pending(job):
            return None
        outcome = job.preview()
        job.metadata["preview_segments"] = None  # not shown (yet): set below when it is
        if volume_node.GetID() != outcome.volume_node_id:
            raise ValueError("This result belongs to another volume.")
        existing = class_segment_ids(segmentation_node, outcome.classes) if segmentation_node is not None else {}
        masks = {index: mask for index, mask in outcome.result.masks.items() if index not in existing}
        # The masks are in the scene now (or not wanted): this process need not hold them beside the exact
        # result's (a whole CT's bool masks, 2.5 GB for 32 classes of 512x512x300).
        outcome.result.masks.clear()
        if not masks:
            return None
        classes = [info for info in outcome.classes if info.index in masks]
        applied = self._insert(volume_node, masks, classes, segmentation_node, False, outcome.model_name, show_3d,
                               statistics, outcome.statistics, preview=str(outcome.info.get("mode", "fast")))
        job.metadata["preview_segments"] = {"node_id": applied.segmentation_node.GetID(),
                                            "segment_ids": dict(applied.segment_ids)}
        return applied

    @staticmethod
    def preview_pending(job: BackgroundJob) -> bool:
        """Whether a progressive job's quick result has arrived and :meth:`apply_preview` has not handled it."""
        return job.preview() is not None and "preview_segments" not in job.metadata

    @staticmethod
    def preview_shown(job: BackgroundJob) -> bool:
        """Whether this job's quick result is in the scene (and not yet replaced by the exact one)."""
        return bool(job.metadata.get("preview_segments"))

    def unfinished_note(self, job: BackgroundJob) -> str:
        """What the scene holds after a cancelled or failed run, for the status line."""
        if self.preview_shown(job):
            return " The quick result stays (segments named \"... (quick result)\")."
        return " Nothing was changed."

    @staticmethod
    def kept_previews_note(applied: AppliedResult) -> str:
        """The status-line sentence about quick-result segments kept because a person edited or accepted them."""
        if not applied.kept_previews:
            return ""
        segmentation = applied.segmentation_node.GetSegmentation()
        names = ", ".join(segmentation.GetSegment(i).GetName() for i in applied.kept_previews.values())
        return f" Kept the quick-result segments you edited or accepted ({names}); their exact result was not applied."

    def _preview_segments(self, segmentation_node, segment_ids: dict) -> tuple[dict, dict]:
        """The shown preview's segments still in ``segmentation_node``: ``(untouched, kept)``, both
        ``{class index: segment id}``; kept ones were edited or accepted by a person (review state)."""
        if segmentation_node is None:
            return {}, {}
        tracker = self._trackers.get(segmentation_node.GetID())
        if tracker is not None:
            tracker.resolve()  # edits that did not name the segment (overwrite in a shared layer)
        segmentation = segmentation_node.GetSegmentation()
        untouched, kept = {}, {}
        for index, segment_id in segment_ids.items():
            segment = segmentation.GetSegment(segment_id)
            if segment is None or not preview_mode(segment):  # deleted or replaced meanwhile
                continue
            (untouched if review_state(segment) == "unreviewed" else kept)[int(index)] = segment_id
        return untouched, kept

    def _remove_segments(self, segmentation_node, segment_ids) -> None:
        tracker = self._trackers.get(segmentation_node.GetID())
        segmentation = segmentation_node.GetSegmentation()
        with (tracker.suspended() if tracker is not None else contextlib.nullcontext()):
            for segment_id in list(segment_ids):
                segmentation.RemoveSegment(segment_id)

    def _insert(self, volume_node, masks, classes, segmentation_node, replace_existing, model_name, show_3d,
                statistics, measured=None, preview: str = "", replace_segments=None) -> AppliedResult:
        tracker = self._trackers.get(segmentation_node.GetID()) if segmentation_node is not None else None
        applied = insert_class_masks(self.scene, volume_node, masks, classes, segmentation_node,
                                     replace_existing=replace_existing, model_name=model_name, show_3d=show_3d,
                                     tracker=tracker, preview=preview, replace_segments=replace_segments)
        self.track_edits(applied.segmentation_node)
        if statistics:
            known = {}
            if measured:  # what the worker measured for the new segments: no second pass over the CT here
                segmentation = applied.segmentation_node.GetSegmentation()
                for index, segment_id in applied.segment_ids.items():
                    row = measured.get(index)
                    if row is not None:
                        known[segment_id] = SegmentStatistics(
                            segment_id, segmentation.GetSegment(segment_id).GetName(), index, int(row["voxels"]),
                            float(row["volume_ml"]), row["mean_hu"], "unreviewed")
            try:
                applied.table_node = self.update_statistics_table(applied.segmentation_node, volume_node, known=known)
            except Exception as error:  # the segments are in: report the missing table, do not undo them
                logging.getLogger(__name__).exception("UniversalSeg: statistics table not updated")
                applied.statistics_error = str(error)
        return applied

    def segment(self, volume_node, classes, model, device: str = "auto", segmentation_node=None,
                replace_existing: bool = False, show_3d: bool = False, timeout: float | None = None,
                mode: str = "default", runtime: str | None = None) -> AppliedResult:
        """Blocking convenience for scripts and self-tests: start, wait, apply."""
        job = self.start_segmentation(volume_node, classes, model, device, mode=mode, runtime=runtime)
        if not job.wait(timeout):
            job.cancel()
            job.wait()
            raise TimeoutError(f"segmentation did not finish within {timeout} s and was cancelled")
        return self.apply_result(job, volume_node, segmentation_node, replace_existing, show_3d)

    # ---------------------------------------------------------------------------------- click-to-select
    def cached_prediction(self, volume_node, model) -> CachedPrediction | None:
        """The volume's all-class prediction: one attached from stored files (a batch case, whatever model is
        selected), else the one computed in the worker for ``model``."""
        stored = self._stored_predictions.get(volume_node.GetID())
        if stored is not None and stored[0] == volume_fingerprint(volume_node):
            return stored[1]
        return self.predictions.get((volume_fingerprint(volume_node), self.model_key(model)))

    def attach_prediction(self, volume_node, prediction: CachedPrediction) -> None:
        """Use a prediction read from files (a batch's stored probabilities) for clicks on this volume, as
        long as its voxels and geometry do not change; no network runs for it."""
        self._stored_predictions[volume_node.GetID()] = (volume_fingerprint(volume_node), prediction)

    def detach_prediction(self, volume_node) -> None:
        """Forget a prediction attached with :meth:`attach_prediction` (its probabilities can be large)."""
        self._stored_predictions.pop(volume_node.GetID(), None)

    def import_masks(self, volume_node, masks, classes, segmentation_node=None, replace_existing: bool = False,
                     model_name: str = "", statistics: bool = True) -> AppliedResult:
        """Put masks made elsewhere (a batch's outputs) into the scene as UniversalSeg segments, exactly as a
        run's result goes in (review states, edit tracking, statistics table)."""
        return self._insert(volume_node, masks, classes, segmentation_node, replace_existing, model_name,
                            False, statistics)

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
                            replace_existing: bool = False, show_3d: bool = False) -> AppliedResult:
        """Add one class as a segment from the cached prediction (no network run)."""
        prediction = self.cached_prediction(volume_node, model)
        if prediction is None:
            raise LookupError("No prediction for this volume yet; it is computed once in the background.")
        info = next((c for c in prediction.classes if c.index == index), None)
        if info is None:
            raise KeyError(f"The model has no class {index}.")
        return self._insert(volume_node, {index: prediction.mask(index)}, [info], segmentation_node,
                            replace_existing, self._model_name(model), show_3d, statistics=True,
                            measured=prediction.statistics)

    def remove_class_segment(self, segmentation_node, index: int | ClassInfo) -> bool:
        """Remove the segment of a class (click-to-select toggles); False when there was none. ``index``:
        a class index of the official table, or the ClassInfo of any model's class."""
        info = index if isinstance(index, ClassInfo) else get_taxonomy()[index]
        segment_id = class_segment_ids(segmentation_node, [info]).get(info.index)
        if segment_id is None:
            return False
        tracker = self._trackers.get(segmentation_node.GetID())
        if tracker is not None:
            with tracker.suspended():
                segmentation_node.GetSegmentation().RemoveSegment(segment_id)
        else:
            segmentation_node.GetSegmentation().RemoveSegment(segment_id)
        return True

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
                                    source={"tool": f"UniversalSeg {self.front_end} {__version__}"},
                                    taxonomy=taxonomy, tracker=self._trackers.get(segmentation_node.GetID()))

    # ---------------------------------------------------------------------------------------- statistics
    def update_statistics_table(self, segmentation_node, volume_node, table_node=None, known=None):
        """Create or refresh the statistics table of a segmentation (class, ml, voxels, mean HU, review).

        ``known``: rows already measured (segment id -> :class:`SegmentStatistics`); only the other
        segments are measured here."""
        if table_node is None:
            table_node = segmentation_node.GetNodeReference(STATISTICS_REFERENCE)
        known = dict(known or {})
        ids = list(segmentation_node.GetSegmentation().GetSegmentIDs())
        measured = {row.segment_id: row for row in
                    segment_statistics(segmentation_node, volume_node, [i for i in ids if i not in known])}
        rows = [known.get(segment_id) or measured[segment_id] for segment_id in ids]
        table_node = write_statistics_table(self.scene, rows, table_node,
                                            name=f"{segmentation_node.GetName()} statistics")
        segmentation_node.SetNodeReferenceID(STATISTICS_REFERENCE, table_node.GetID())
        return table_node

    # ------------------------------------------------------------------------------------------- estimate
    def estimate(self, volume_node, device: str = "auto", classes: int = 32, model: str | os.PathLike | None = None,
                 mode: str = "default", runtime: str | None = None) -> RunEstimate:
        """Rough time and memory of a run of ``model`` (default: the official Swin UNETR) in ``mode`` with the
        runtime choice ``runtime`` on this volume, from the model's metadata (backbone, grid spacing, window
        size and overlap)."""
        import importlib.util

        import vtk

        from UniversalSegLib.errors import UniversalSegError
        from UniversalSegLib.settings import MODES, InferenceParameters, PreprocessingParameters, choose_runtime

        image = volume_node.GetImageData()
        matrix = vtk.vtkMatrix4x4()
        volume_node.GetIJKToRASMatrix(matrix)
        spacing = [sum(matrix.GetElement(r, c) ** 2 for r in range(3)) ** 0.5 for c in range(3)]
        if device == "auto":
            # what the worker chose last time ("cuda:0" -> "cuda"), else a guess that imports nothing
            device = str(self.last_run.get("device", "cuda" if _cuda_likely() else "cpu")).split(":")[0]
        threads = self._worker_threads("cpu")
        metadata = self.model_metadata(model)
        backbone = metadata.model.backbone if metadata is not None else "swinunetr"
        windows = metadata.inference if metadata is not None else InferenceParameters()
        grid = metadata.preprocessing if metadata is not None else PreprocessingParameters()
        run_mode = MODES[mode]
        # Whether OpenVINO is installed, asked of this process's Python without importing it: the worker's
        # unless UNIVERSALSEG_WORKER_PYTHON names another one, and a broken install counts as installed here
        # (the worker would fall back to PyTorch). Good enough for an estimate.
        try:
            used = choose_runtime(runtime, device, mode, lambda: importlib.util.find_spec("openvino") is not None)
        except UniversalSegError:  # a choice the run will refuse with its own message
            used = "torch"
        return estimate_run(image.GetDimensions(), spacing, backbone, device, classes, threads,
                            target_spacing=grid.spacing, roi=windows.roi_size,
                            overlap=run_mode.effective_overlap(windows.overlap), streaming=run_mode.streaming,
                            runtime=used)

    def release_model(self) -> None:
        """Stop the worker process: the model's memory (GPU memory too) is given back now. The next run
        starts a new worker and loads the model again."""
        self.worker.stop()

    def shutdown(self) -> None:
        """Stop observing, cancel what runs, and stop the worker processes (module exit, Reload)."""
        for tracker in self._trackers.values():
            tracker.stop()
        self._trackers.clear()
        if self._own_worker:
            self.worker.stop(timeout=0.5)
        self.downloader.kill()
        self.downloader.stop(timeout=0.0)
        self.predictions.clear()
        self._stored_predictions.clear()


def _cuda_likely() -> bool:
    """Whether an NVIDIA GPU is probably usable, told without importing PyTorch (the worker decides)."""
    return shutil.which("nvidia-smi") is not None
