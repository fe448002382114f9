"""Segment a CT end to end: preprocess, sliding-window inference, post-processing, back to the input grid.

:class:`Segmenter` holds a loaded model; :meth:`Segmenter.segment` turns a :class:`~UniversalSegLib.io.Volume`
and a list of class names into a :class:`SegmentationResult`: one boolean mask per requested class on the
input's own voxel grid, plus per-class statistics and stage timings.

The modes (:data:`~UniversalSegLib.settings.MODES`: ``"default"``, ``"fast"``, ``"reference"``) are
described in :class:`~UniversalSegLib.settings.InferenceMode`; ``reference=True`` is a synonym of
``mode="reference"``. All modes blend with the official MONAI 0.9 Gaussian (the checkpoint's default);
``gaussian="current"`` selects current MONAI's map, which moves logits by up to ~0.1 in window overlaps.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from .checkpoints import Checkpoint, load_checkpoint
from .device import autocast, resolve_device, resolve_threads, torch_threads
from .errors import RuntimeUnavailableError, UsageError
from .helpers import voxel_volume_ml
from .inference import (InferenceCancelled, count_windows, gaussian_weight_map, sliding_window_logits,
                        sliding_window_masks, threshold)
from .io.masks import LazyMasks, memory_order, same_order_views
from .io.volume import Volume
from .postprocess import MissingInputError, postprocess_masks, required_classes
from .preprocess import PreprocessedVolume, preprocess
from .memory import trim_heap
from .runtime import OpenVINOWindowNetwork, model_digest, prepare_openvino, requested_runtime, resolve_runtime
from .settings import CONVERT_STAGE, MODES, STAGES, InferenceMode
from .taxonomy import ClassInfo

__all__ = ["ClassStatistics", "InferenceMode", "MODES", "SegmentationResult", "Segmenter", "ProgressCallback",
           "STAGES", "masks_on_input_grid"]

#: Measure of the result masks: sum of the input HU under a mask (statistics give its mean).
HU_SUM = "hu_sum"

#: ``callback(stage, fraction)``: fraction in 0..1 of the current stage.
ProgressCallback = Callable[[str, float], None]


@dataclass(frozen=True)
class ClassStatistics:
    index: int
    name: str
    voxels: int
    volume_ml: float
    mean_hu: float | None

    def to_dict(self) -> dict:
        return {"index": self.index, "name": self.name, "voxels": self.voxels,
                "volume_ml": round(self.volume_ml, 3), "mean_hu": None if self.mean_hu is None else round(self.mean_hu, 1)}


def _hu_sum(array: np.ndarray, mask: np.ndarray) -> float:
    """Sum of the HU under ``mask`` (float64), indexed in the arrays' shared memory order."""
    array, mask = same_order_views(np.asarray(array), mask)
    return float(array[mask].sum(dtype=np.float64))


def masks_on_input_grid(volume: Volume, prep: PreprocessedVolume, masks: Mapping[int, np.ndarray]) -> LazyMasks:
    """``{class index: mask on the preprocessed grid}`` -> a :class:`LazyMasks` on ``volume``'s grid.

    Each mask is made on access (cached when all fit) and measured when made (voxels, HU sum). Masks share
    the input array's memory order (Fortran for nibabel/SimpleITK volumes), so statistics, label-map
    painting and NIfTI/NRRD writing run in memory order.
    """
    order = memory_order(volume.array)
    makers = {index: (lambda m=masks[index]: prep.to_source_grid(m, order).astype(bool, copy=False))
              for index in sorted(masks)}
    return LazyMasks(volume.shape, makers, measures={HU_SUM: lambda mask: _hu_sum(volume.array, mask)})


@dataclass
class SegmentationResult:
    """Per-class masks on the input grid (``masks[index]`` is a bool array of ``volume.shape``)."""

    volume: Volume
    classes: list[ClassInfo]
    #: ``{class index: bool mask}``; a :class:`~UniversalSegLib.io.masks.LazyMasks` that makes each mask on
    #: the input grid on access when they do not all fit its cache (fine CTs).
    masks: Mapping[int, np.ndarray]
    timings: dict[str, float] = field(default_factory=dict)
    windows: int = 0
    preprocessed: PreprocessedVolume | None = None
    #: Optional per-class sigmoid probabilities on the preprocessed grid, uint8 0..255 (see keep_probabilities).
    probabilities: dict[int, np.ndarray] | None = None

    def statistics(self) -> list[ClassStatistics]:
        voxel_ml = voxel_volume_ml(self.volume.affine)
        # Masks made by the pipeline were measured when they were made (no second pass on a fine CT).
        measured = isinstance(self.masks, LazyMasks) and HU_SUM in self.masks.measures
        out = []
        for info in self.classes:
            if measured:
                n, total = self.masks.measure(info.index, "voxels"), self.masks.measure(info.index, HU_SUM)
            else:
                mask = self.masks[info.index]
                n, total = int(np.count_nonzero(mask)), _hu_sum(self.volume.array, mask)
            out.append(ClassStatistics(info.index, info.display_name, n, n * voxel_ml, total / n if n else None))
        return out

    def summary(self) -> dict:
        return {
            "input": self.volume.source, "shape": list(self.volume.shape),
            "spacing_mm": [round(s, 4) for s in self.volume.spacing],
            "windows": self.windows, "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
            "classes": [s.to_dict() for s in self.statistics()],
        }


class Segmenter:
    """A loaded Universal Model ready to segment volumes.

    Args:
        checkpoint: a :class:`Checkpoint` or the path of any supported checkpoint file.
        device: ``"auto"`` (GPU when present), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        precision: ``"float32"`` (default, exact), or ``"bfloat16"``/``"float16"`` autocast on a GPU.
        threads: CPU threads for PyTorch during each run (None: every core, or ``OMP_NUM_THREADS``); the
            process-wide setting is restored after the run.
        reference: synonym of ``mode="reference"``.
        mode: ``"default"``, ``"fast"`` or ``"reference"`` (see module docs and :data:`MODES`).
        runtime: where each window's forward runs: ``"auto"``, ``"torch"`` or ``"openvino"``
            (:data:`~UniversalSegLib.settings.RUNTIMES`, :func:`~UniversalSegLib.runtime.resolve_runtime`);
            None: ``$UNIVERSALSEG_RUNTIME`` or ``"auto"`` (OpenVINO on a CPU when installed). With OpenVINO
            the PyTorch model is released once the network is compiled (memory) and read from the checkpoint
            file again when it is needed (a new class set, a fallback); the compiled network is released after
            each run's windows and compiled again from the on-disk cache by the next run.
        gaussian, overlap, sw_batch_size: override the checkpoint's or the mode's inference parameters.
    """

    def __init__(self, checkpoint: Checkpoint | str, device: str = "auto", precision: str = "float32",
                 threads: int | None = None, reference: bool = False, gaussian: str | None = None,
                 overlap: float | None = None, sw_batch_size: int = 1, mode: str | None = None,
                 runtime: str | None = None) -> None:
        if reference and mode not in (None, "reference"):
            raise UsageError(f"reference=True contradicts mode={mode!r}.")
        mode = "reference" if reference else (mode or "default")
        if mode not in MODES:
            raise UsageError(f"Unknown mode {mode!r}; choose one of {', '.join(MODES)}.")
        self.mode = MODES[mode]
        self.checkpoint = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
        self.device = resolve_device(device)
        self.precision = precision
        autocast(self.device, precision)  # validates the precision for this device now, not mid-run
        self.threads = resolve_threads(threads)  # applied during each run only (see torch_threads)
        self.runtime = resolve_runtime(runtime, self.device, mode)
        self._runtime_chosen = requested_runtime(runtime) == "openvino"  # not "auto": no silent fallback
        self._openvino: OpenVINOWindowNetwork | None = None  # the last class set's network (one held at a time)
        self._openvino_key: tuple | None = None
        self._weights_digest: str | None = None
        params = self.checkpoint.metadata.inference
        self.gaussian = gaussian or params.gaussian
        self._overlap_override = overlap
        self.overlap = self._overlap_for(self.mode)
        if self.mode.streaming and sw_batch_size != 1:
            raise ValueError(f"mode {mode!r} evaluates one window at a time (sw_batch_size=1)")
        self.sw_batch_size = sw_batch_size
        self._model = self._build_model(self.checkpoint)
        # Where the weights can be read again after an OpenVINO run released the PyTorch model (None: an
        # in-memory checkpoint, whose model is kept).
        self._model_path = self.checkpoint.path
        # Keep the metadata only: the weights now live in the model, and a second copy would cost the
        # model's size in memory (250 MB for Swin UNETR) for the whole session.
        self.checkpoint = dataclasses.replace(self.checkpoint, state_dict={})

    def _overlap_for(self, mode: InferenceMode) -> float:
        """Window overlap of a run in ``mode``: the constructor's ``overlap``, else the mode's own."""
        if self._overlap_override is not None:
            return self._overlap_override
        return mode.effective_overlap(self.checkpoint.metadata.inference.overlap)

    def _build_model(self, checkpoint: Checkpoint) -> torch.nn.Module:
        model = checkpoint.build_model(self.device)
        if self.device.type == "cpu":
            # oneDNN's 3-D convolutions are faster on channels-last tensors (same results up to
            # float rounding); the model converts each window on entry.
            model = model.to(memory_format=torch.channels_last_3d)
        return model

    @property
    def model(self) -> torch.nn.Module:
        """The PyTorch model; read again from the checkpoint file if an OpenVINO run released it."""
        if self._model is None:
            self._model = self._build_model(load_checkpoint(self._model_path))
            self._weights_digest = None  # hash what was read now: the OpenVINO cache key must match it
        return self._model

    @model.setter
    def model(self, model: torch.nn.Module) -> None:
        # A model set by hand is kept (the file's weights are not it) and converted again when needed.
        self._model, self._model_path, self._weights_digest, self._openvino = model, None, None, None

    @property
    def taxonomy(self):
        return self.checkpoint.metadata.classes

    def resolve(self, classes: str | Sequence[str] | Sequence[ClassInfo] | None) -> list[ClassInfo]:
        """Requested classes as ClassInfo (None or "all": every class of the checkpoint)."""
        if classes is None or (isinstance(classes, str) and classes.strip().lower() == "all"):
            return list(self.taxonomy)
        if isinstance(classes, (list, tuple)) and classes and all(isinstance(c, ClassInfo) for c in classes):
            return sorted(classes, key=lambda c: c.index)
        return self.taxonomy.resolve(classes)

    def segment(self, volume: Volume, classes: str | Sequence[str] | Sequence[ClassInfo] | None = None,
                progress: ProgressCallback | None = None, cancel: Callable[[], bool] | None = None,
                show_progress: bool = False, keep_probabilities: bool = False,
                mode: str | None = None) -> SegmentationResult:
        """Segment ``classes`` (names, ClassInfo, or None for all) in ``volume``.

        ``mode`` runs this call in another streaming mode than the segmenter's (``"fast"`` on a
        ``"default"`` segmenter: a quick preview from the same loaded model and, with OpenVINO, the same
        compiled network, since the window size does not change). The reference mode has its own runtime
        rules and needs a segmenter of its own.

        ``cancel()`` is polled between windows and stages; when it returns True the run stops with
        :class:`~UniversalSegLib.errors.InferenceCancelled` and nothing is returned. PyTorch's thread
        count is this segmenter's during the run and restored afterwards.
        """
        run_mode = self.mode if mode is None else MODES.get(mode)
        if run_mode is None:
            raise UsageError(f"Unknown mode {mode!r}; choose one of {', '.join(MODES)}.")
        if run_mode is not self.mode and not (run_mode.streaming and self.mode.streaming):
            raise UsageError(f"A {self.mode.name!r} segmenter cannot run a {run_mode.name!r} call; make a "
                             f"Segmenter with mode={run_mode.name!r}.")
        with torch_threads(self.threads):
            return self._segment(volume, classes, progress, cancel, show_progress, keep_probabilities, run_mode)

    def _openvino_network(self, channels: Sequence[int], roi_size: Sequence[int], report: ProgressCallback,
                          timings: dict[str, float]) -> OpenVINOWindowNetwork | None:
        """The OpenVINO network for these class channels (converted on first use, then cached), timed and
        reported as its own stage. If the conversion fails, an automatic choice falls back to PyTorch for
        good (None; logged), an explicit one raises :class:`RuntimeUnavailableError`."""
        key = (tuple(channels), tuple(roi_size))
        if self._openvino is None or self._openvino_key != key or not self._openvino.available():
            t0 = time.perf_counter()
            report(CONVERT_STAGE, 0.0)
            self._openvino = None  # free the previous class set's network before building the next
            model = self.model  # read again from the file if the last conversion released it
            if self._weights_digest is None:
                self._weights_digest = model_digest(model)
            try:
                self._openvino = prepare_openvino(model, channels, roi_size, self.threads,
                                                  digest=self._weights_digest)
            except RuntimeUnavailableError:
                raise
            except Exception as err:  # noqa: BLE001 - any conversion failure: the PyTorch forward still works
                if self._runtime_chosen:
                    raise RuntimeUnavailableError(f"OpenVINO could not prepare this model ({err}); choose the "
                                                  "torch runtime.") from err
                logging.getLogger(__name__).warning("OpenVINO could not prepare this model (%s); using PyTorch.", err)
                self.runtime = "torch"
                return None
            self._openvino_key = key
            del model
            if self._model_path is not None:
                # With the compiled network ready, the PyTorch model (0.25 GB of weights for Swin UNETR,
                # plus what its load left in the heap) is not needed; a class set not converted yet, or
                # the torch runtime, reads it from the checkpoint file again.
                self._model = None
                trim_heap()
            timings[CONVERT_STAGE] = time.perf_counter() - t0
            report(CONVERT_STAGE, 1.0)
        return self._openvino

    def _segment(self, volume: Volume, classes, progress: ProgressCallback | None, cancel: Callable[[], bool] | None,
                 show_progress: bool, keep_probabilities: bool, run_mode: InferenceMode) -> SegmentationResult:
        requested = self.resolve(classes)
        mode = run_mode.postprocess
        overlap = self._overlap_for(run_mode)
        available = set(self.taxonomy.indices)
        needed = [i for i in required_classes([c.index for c in requested], mode, self.taxonomy) if i in available]
        meta = self.checkpoint.metadata
        channels = [meta.channel_of(self.taxonomy[i]) for i in needed]
        report = progress or (lambda stage, fraction: None)
        timings: dict[str, float] = {}

        def check_cancel():
            if cancel is not None and cancel():
                raise InferenceCancelled("segmentation cancelled")

        t0 = time.perf_counter()
        report("preprocess", 0.0)
        prep = preprocess(volume.array, volume.affine, **meta.preprocessing.as_kwargs(),
                          resample_dtype=np.dtype(run_mode.resample_dtype).type)
        timings["preprocess"] = time.perf_counter() - t0
        report("preprocess", 1.0)
        check_cancel()

        openvino_network = None
        if self.runtime == "openvino":  # None when the conversion failed and PyTorch takes over
            openvino_network = self._openvino_network(channels, meta.inference.roi_size, report, timings)
            check_cancel()

        t0 = time.perf_counter()
        report("inference", 0.0)  # the stage starts before the first window, not when it ends
        image = torch.from_numpy(prep.array)[None, None]
        index = torch.as_tensor(channels, dtype=torch.long)
        channels_last = self.device.type == "cpu"

        def predictor(window: torch.Tensor) -> torch.Tensor:
            window = window.to(self.device)
            if channels_last:
                window = window.contiguous(memory_format=torch.channels_last_3d)
            with autocast(self.device, self.precision):
                return self.model(window, channels=index).float()

        params = meta.inference
        if openvino_network is not None:  # only the window forward changes
            # The streaming blend is done with a window's logits before the next window: it can take the
            # infer request's output buffer itself instead of a copy (113 MB less for 32 classes).
            predictor = functools.partial(openvino_network, share_output=run_mode.streaming)  # noqa: F811
        requested_set = {c.index for c in requested}
        on_window = lambda done, total: report("inference", done / total)  # noqa: E731
        probabilities = None
        try:
            if run_mode.streaming:
                weight = gaussian_weight_map(params.roi_size, params.sigma_scale, flavour=self.gaussian)
                blended = sliding_window_masks(
                    image, predictor, weight, [params.threshold], roi_size=params.roi_size, overlap=overlap,
                    placement=run_mode.placement, sw_device=self.device,
                    accumulate_dtype=getattr(torch, run_mode.accumulate_dtype),
                    keep_probabilities=keep_probabilities, cancel=cancel, on_window=on_window,
                    progress=show_progress)
                windows = blended.windows
            else:
                logits = sliding_window_logits(
                    image, predictor, roi_size=params.roi_size, overlap=overlap, sw_batch_size=self.sw_batch_size,
                    gaussian=self.gaussian, sigma_scale=params.sigma_scale, device="cpu", sw_device=self.device,
                    progress=show_progress, cancel=cancel, on_window=on_window)
                windows = count_windows(prep.shape, params.roi_size, overlap)
        finally:
            if openvino_network is not None:
                # Free the compiled network (weights and a window's intermediates, 1.05 GB for the full Swin
                # UNETR) before the masks are unpacked and post-processed, and also when the run was cancelled
                # or failed (a worker keeps its segmenter between runs); the next run compiles it again from
                # the cache in about a second.
                openvino_network.release()
        if run_mode.streaming:
            raw = {i: blended.mask(k) for k, i in enumerate(needed)}
            if keep_probabilities:
                probabilities = {i: blended.probabilities[k] for k, i in enumerate(needed) if i in requested_set}
            del blended
        else:
            raw = {i: threshold(logits[0, k], params.threshold).numpy() for k, i in enumerate(needed)}
            if keep_probabilities:
                probabilities = {i: (torch.sigmoid(logits[0, k]) * 255).round().to(torch.uint8).numpy()
                                 for k, i in enumerate(needed) if i in requested_set}
            del logits
        timings["inference"] = time.perf_counter() - t0
        check_cancel()

        t0 = time.perf_counter()
        report("postprocess", 0.0)
        try:
            cleaned = postprocess_masks(raw, [c.index for c in requested], mode=mode, taxonomy=self.taxonomy)
        except MissingInputError:
            # The checkpoint lacks a class a rule reads (e.g. a model without a pancreas channel):
            # such classes keep their thresholded prediction instead of failing the whole run.
            cleaned = {}
            for c in requested:
                try:
                    cleaned.update(postprocess_masks(raw, [c.index], mode=mode, taxonomy=self.taxonomy))
                except MissingInputError:
                    cleaned[c.index] = raw[c.index]
        timings["postprocess"] = time.perf_counter() - t0
        report("postprocess", 1.0)
        check_cancel()

        del raw  # the cleaned masks are all that is needed from here on
        t0 = time.perf_counter()
        report("invert", 0.0)
        masks = masks_on_input_grid(volume, prep, {c.index: cleaned[c.index] for c in requested})
        if masks.fill_cache():  # small enough: invert now, so this stage is timed where it happens
            for n, _ in enumerate(requested):
                report("invert", (n + 1) / len(requested))
        timings["invert"] = time.perf_counter() - t0
        return SegmentationResult(volume=volume, classes=requested, masks=masks, timings=timings, windows=windows,
                                  preprocessed=prep, probabilities=probabilities)
