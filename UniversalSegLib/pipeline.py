"""Segment a CT end to end: preprocess, sliding-window inference, post-processing, back to the input grid.

:class:`Segmenter` holds a loaded model; :meth:`Segmenter.segment` turns a :class:`~UniversalSegLib.io.Volume`
and a list of class names into a :class:`SegmentationResult`: one boolean mask per requested class on the
input's own voxel grid, plus per-class statistics and stage timings.

Two settings bundles:

* ``reference=False`` (default): the official method with the official bugs fixed (post-processing
  ``mode="fixed"``; see :mod:`UniversalSegLib.postprocess`).
* ``reference=True``: what the official ``pred_pseudo.py`` computes (official post-processing quirks
  included), for comparisons and fidelity checks.

Both blend windows with the official MONAI 0.9 Gaussian (``gaussian="monai09"``, the checkpoint's
default); ``gaussian="current"`` selects current MONAI's map, which moves logits by up to ~0.1 in window
overlaps (SPEC s.4).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from .checkpoints import Checkpoint, load_checkpoint
from .device import autocast, resolve_device, set_threads
from .inference import InferenceCancelled, count_windows, sliding_window_logits, threshold
from .io.volume import Volume
from .postprocess import MissingInputError, postprocess_masks, required_classes
from .preprocess import PreprocessedVolume, preprocess
from .taxonomy import ClassInfo

__all__ = ["ClassStatistics", "SegmentationResult", "Segmenter", "ProgressCallback", "STAGES"]

#: Stages reported to progress callbacks, in order.
STAGES = ("preprocess", "inference", "postprocess", "invert")
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


@dataclass
class SegmentationResult:
    """Per-class masks on the input grid (``masks[index]`` is a bool array of ``volume.shape``)."""

    volume: Volume
    classes: list[ClassInfo]
    masks: dict[int, np.ndarray]
    timings: dict[str, float] = field(default_factory=dict)
    windows: int = 0
    preprocessed: PreprocessedVolume | None = None
    #: Optional per-class sigmoid probabilities on the preprocessed grid, uint8 0..255 (see keep_probabilities).
    probabilities: dict[int, np.ndarray] | None = None

    def statistics(self) -> list[ClassStatistics]:
        voxel_ml = float(abs(np.linalg.det(self.volume.affine[:3, :3]))) / 1000.0
        out = []
        for info in self.classes:
            mask = self.masks[info.index]
            n = int(np.count_nonzero(mask))
            mean = float(self.volume.array[mask].mean(dtype=np.float64)) if n else None
            out.append(ClassStatistics(info.index, info.display_name, n, n * voxel_ml, mean))
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
        reference: reproduce the official pipeline's behaviour, bugs included (see module docs).
        gaussian, overlap, sw_batch_size: override the checkpoint's inference parameters.
    """

    def __init__(self, checkpoint: Checkpoint | str, device: str = "auto", precision: str = "float32",
                 threads: int | None = None, reference: bool = False, gaussian: str | None = None,
                 overlap: float | None = None, sw_batch_size: int = 1) -> None:
        self.checkpoint = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
        self.device = resolve_device(device)
        self.precision = precision
        autocast(self.device, precision)  # validates the precision for this device now, not mid-run
        set_threads(threads)
        self.reference = reference
        params = self.checkpoint.metadata.inference
        self.gaussian = gaussian or params.gaussian
        self.overlap = params.overlap if overlap is None else overlap
        self.sw_batch_size = sw_batch_size
        self.model = self.checkpoint.build_model(self.device)

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
        mode = "official" if self.reference else "fixed"
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
        prep = preprocess(volume.array, volume.affine, **meta.preprocessing.as_kwargs())
        timings["preprocess"] = time.perf_counter() - t0
        report("preprocess", 1.0)
        check_cancel()

        t0 = time.perf_counter()
        image = torch.from_numpy(prep.array)[None, None]
        index = torch.as_tensor(channels, dtype=torch.long)

        def predictor(window: torch.Tensor) -> torch.Tensor:
            with autocast(self.device, self.precision):
                return self.model(window.to(self.device), channels=index).float()

        params = meta.inference
        logits = sliding_window_logits(
            image, predictor, roi_size=params.roi_size, overlap=self.overlap, sw_batch_size=self.sw_batch_size,
            gaussian=self.gaussian, sigma_scale=params.sigma_scale, device="cpu", sw_device=self.device,
            progress=show_progress, cancel=cancel, on_window=lambda done, total: report("inference", done / total))
        windows = count_windows(prep.shape, params.roi_size, self.overlap)
        raw = {i: threshold(logits[0, k], params.threshold).numpy() for k, i in enumerate(needed)}
        probabilities = None
        if keep_probabilities:
            probabilities = {i: (torch.sigmoid(logits[0, k]) * 255).round().to(torch.uint8).numpy()
                             for k, i in enumerate(needed) if i in {c.index for c in requested}}
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

        t0 = time.perf_counter()
        report("invert", 0.0)
        masks = {}
        for n, c in enumerate(requested):
            masks[c.index] = prep.to_source_grid(cleaned[c.index]).astype(bool, copy=False)
            report("invert", (n + 1) / len(requested))
        timings["invert"] = time.perf_counter() - t0
        return SegmentationResult(volume=volume, classes=requested, masks=masks, timings=timings, windows=windows,
                                  preprocessed=prep, probabilities=probabilities)
