"""Segment a CT end to end: preprocess, sliding-window inference, post-processing, back to the input grid.

:class:`Segmenter` holds a loaded model; :meth:`Segmenter.segment` turns a :class:`~UniversalSegLib.io.Volume`
and a list of class names into a :class:`SegmentationResult`: one boolean mask per requested class on the
input's own voxel grid, plus per-class statistics and stage timings.

Three modes (:data:`MODES`), chosen with ``mode=`` (``reference=True`` is kept as a synonym of
``mode="reference"``):

* ``"reference"``: what the official ``pred_pseudo.py`` computes: MONAI's window placement at the
  checkpoint's overlap (0.5 for the official models), every needed class blended at full resolution in
  float32, float64 resampling, official post-processing (quirks included). For comparisons and fidelity.
* ``"default"``: the reference's windows, network, weights, Gaussian and threshold, with the official
  bugs fixed (post-processing ``mode="fixed"``) and the cost cut where labels do not move: windows are
  blended straight into masks slab by slab in float16 (no full-volume float maps), float32 resampling,
  fused window attention and channels-last convolutions on the CPU, masks brought back to the input grid
  class by class. Labels equal the reference's except where the fixed post-processing differs and for the
  rare voxels whose blended logit lies within float16 rounding of the threshold.
* ``"fast"``: ``default`` with the fewest windows that cover the body (overlap 0, spread evenly, so they
  still overlap where the image is not a multiple of the window): 27 instead of 80 windows on the shared
  example CT. For CPU users; its cost in Dice against the reference mode is measured by
  ``benchmarks/benchmark_modes.py`` and listed in the README.

All modes blend with the official MONAI 0.9 Gaussian (the checkpoint's default); ``gaussian="current"``
selects current MONAI's map, which moves logits by up to ~0.1 in window overlaps (SPEC s.4).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from .checkpoints import Checkpoint, load_checkpoint
from .device import autocast, resolve_device, set_threads
from .inference import InferenceCancelled, count_windows, gaussian_weight_map, sliding_window_logits, threshold
from .io.masks import LazyMasks, memory_order, same_order_views
from .io.volume import Volume
from .postprocess import MissingInputError, postprocess_masks, required_classes
from .preprocess import PreprocessedVolume, preprocess
from .streaming import sliding_window_masks
from .taxonomy import ClassInfo

__all__ = ["ClassStatistics", "InferenceMode", "MODES", "SegmentationResult", "Segmenter", "ProgressCallback",
           "STAGES", "masks_on_input_grid"]

#: Stages reported to progress callbacks, in order.
STAGES = ("preprocess", "inference", "postprocess", "invert")

#: Measure of the result masks: sum of the input HU under a mask (statistics give its mean).
HU_SUM = "hu_sum"

#: ``callback(stage, fraction)``: fraction in 0..1 of the current stage.
ProgressCallback = Callable[[str, float], None]


@dataclass(frozen=True)
class InferenceMode:
    """How a :class:`Segmenter` trades exactness against time and memory (see the module docs)."""

    name: str
    overlap: float | None  # None: the checkpoint's (official: 0.5)
    placement: str  # "monai" or "even" (UniversalSegLib.streaming.window_layout)
    streaming: bool  # blend straight into masks (False: full-volume float logits, as the official code)
    accumulate_dtype: torch.dtype  # per-class slab sums when streaming
    resample_dtype: type  # preprocessing arithmetic
    postprocess: str  # "official" or "fixed"


MODES: dict[str, InferenceMode] = {
    "reference": InferenceMode("reference", None, "monai", False, torch.float32, np.float64, "official"),
    "default": InferenceMode("default", None, "monai", True, torch.float16, np.float32, "fixed"),
    "fast": InferenceMode("fast", 0.0, "even", True, torch.float16, np.float32, "fixed"),
}


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
        voxel_ml = float(abs(np.linalg.det(self.volume.affine[:3, :3]))) / 1000.0
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
        threads: CPU threads for PyTorch (None: PyTorch's default).
        reference: synonym of ``mode="reference"``.
        mode: ``"default"``, ``"fast"`` or ``"reference"`` (see module docs and :data:`MODES`).
        gaussian, overlap, sw_batch_size: override the checkpoint's or the mode's inference parameters.
    """

    def __init__(self, checkpoint: Checkpoint | str, device: str = "auto", precision: str = "float32",
                 threads: int | None = None, reference: bool = False, gaussian: str | None = None,
                 overlap: float | None = None, sw_batch_size: int = 1, mode: str | None = None) -> None:
        if reference and mode not in (None, "reference"):
            raise ValueError(f"reference=True contradicts mode={mode!r}")
        mode = "reference" if reference else (mode or "default")
        if mode not in MODES:
            raise ValueError(f"Unknown mode {mode!r}; choose one of {', '.join(MODES)}.")
        self.mode = MODES[mode]
        self.checkpoint = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
        self.device = resolve_device(device)
        self.precision = precision
        autocast(self.device, precision)  # validates the precision for this device now, not mid-run
        set_threads(threads)
        self.reference = mode == "reference"
        params = self.checkpoint.metadata.inference
        self.gaussian = gaussian or params.gaussian
        mode_overlap = params.overlap if self.mode.overlap is None else min(self.mode.overlap, params.overlap)
        self.overlap = mode_overlap if overlap is None else overlap
        if self.mode.streaming and sw_batch_size != 1:
            raise ValueError(f"mode {mode!r} evaluates one window at a time (sw_batch_size=1)")
        self.sw_batch_size = sw_batch_size
        self.model = self.checkpoint.build_model(self.device)
        # Keep the metadata only: the weights now live in the model, and a second copy would cost the
        # model's size in memory (250 MB for Swin UNETR) for the whole session.
        self.checkpoint = dataclasses.replace(self.checkpoint, state_dict={})
        if self.device.type == "cpu":
            # oneDNN's 3-D convolutions are ~10 % faster on channels-last tensors (same results up to
            # float rounding); the model converts each window on entry.
            self.model = self.model.to(memory_format=torch.channels_last_3d)

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
                show_progress: bool = False, keep_probabilities: bool = False) -> SegmentationResult:
        """Segment ``classes`` (names, ClassInfo, or None for all) in ``volume``.

        ``cancel()`` is polled between windows and stages; when it returns True the run stops with
        :class:`~UniversalSegLib.inference.InferenceCancelled` and nothing is returned.
        """
        requested = self.resolve(classes)
        mode = self.mode.postprocess
        available = set(self.taxonomy.indices)
        needed = [i for i in required_classes([c.index for c in requested], mode) if i in available]
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
                          resample_dtype=self.mode.resample_dtype)
        timings["preprocess"] = time.perf_counter() - t0
        report("preprocess", 1.0)
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
        requested_set = {c.index for c in requested}
        on_window = lambda done, total: report("inference", done / total)  # noqa: E731
        probabilities = None
        if self.mode.streaming:
            weight = gaussian_weight_map(params.roi_size, params.sigma_scale, flavour=self.gaussian)
            blended = sliding_window_masks(
                image, predictor, weight, [params.threshold], roi_size=params.roi_size, overlap=self.overlap,
                placement=self.mode.placement, sw_device=self.device, accumulate_dtype=self.mode.accumulate_dtype,
                keep_probabilities=keep_probabilities, cancel=cancel, on_window=on_window,
                progress=show_progress)
            windows = blended.windows
            raw = {i: blended.masks[k] for k, i in enumerate(needed)}
            if keep_probabilities:
                probabilities = {i: blended.probabilities[k] for k, i in enumerate(needed) if i in requested_set}
            del blended
        else:
            logits = sliding_window_logits(
                image, predictor, roi_size=params.roi_size, overlap=self.overlap, sw_batch_size=self.sw_batch_size,
                gaussian=self.gaussian, sigma_scale=params.sigma_scale, device="cpu", sw_device=self.device,
                progress=show_progress, cancel=cancel, on_window=on_window)
            windows = count_windows(prep.shape, params.roi_size, self.overlap)
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
            cleaned = postprocess_masks(raw, [c.index for c in requested], mode=mode)
        except MissingInputError:
            # The checkpoint lacks a class a rule reads (e.g. a model without a pancreas channel):
            # such classes keep their thresholded prediction instead of failing the whole run.
            cleaned = {}
            for c in requested:
                try:
                    cleaned.update(postprocess_masks(raw, [c.index], mode=mode))
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
