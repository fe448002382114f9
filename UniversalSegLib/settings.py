"""Settings shared by the library, the Slicer module and training, without PyTorch or MONAI.

* :class:`ModelConfig`: the network's architecture (backbone name and arguments, class count).
* :class:`PreprocessingParameters` and :class:`InferenceParameters`: what a checkpoint carries besides
  its weights (official values by default).
* The window layout of the sliding window (:func:`window_starts`, :func:`window_layout`,
  :func:`count_windows`), which estimates need before any network is loaded.
* The inference modes (:data:`MODES`) with their labels, and the stages a run reports (:data:`STAGES`).

The Slicer module imports this module in Slicer's own process, so it imports only numpy and the
standard library; the pipeline turns the dtype names of a mode into torch/numpy types where it runs.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np

from .backbones import get_backbone
from .errors import InferenceError, RuntimeUnavailableError, UsageError

__all__ = [
    "ModelConfig", "PreprocessingParameters", "InferenceParameters",
    "PLACEMENTS", "window_starts", "window_layout", "count_windows",
    "InferenceMode", "MODES", "STAGES", "STAGE_LABELS", "PRECISIONS", "RUNTIMES", "CONVERT_STAGE", "CONVERT_STAGE_LABEL",
    "RUNTIME_ENV", "OPENVINO_INSTALL_HINT", "requested_runtime", "choose_runtime",
]


# ------------------------------------------------------------------------------------------ the model
def _plain(value: Any) -> Any:
    """Lists (JSON) -> tuples, so configs read from a file compare equal to the ones written."""
    return tuple(_plain(v) for v in value) if isinstance(value, (list, tuple)) else value


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Universal Model: a registered backbone with its arguments, plus the head's sizes.

    ``backbone_kwargs`` holds the backbone class's keyword arguments; those not given take the
    backbone's official defaults (:mod:`UniversalSegLib.backbones`), so a config always lists them all.
    """

    backbone: str = "swinunetr"
    num_classes: int = 32
    embedding_dim: int = 512
    norm_groups: int = 16
    backbone_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        spec = get_backbone(self.backbone)  # ValueError naming the registered backbones
        if self.num_classes < 1:
            raise ValueError(f"A model needs at least one class, got num_classes={self.num_classes}.")
        kwargs = {**spec.defaults, **dict(self.backbone_kwargs)}
        object.__setattr__(self, "backbone_kwargs", {k: _plain(v) for k, v in kwargs.items()})

    def __hash__(self) -> int:
        return hash((self.backbone, self.num_classes, self.embedding_dim, self.norm_groups,
                     tuple(sorted(self.backbone_kwargs.items()))))

    @classmethod
    def small(cls, backbone: str, num_classes: int = 32, embedding_dim: int = 512) -> "ModelConfig":
        """A reduced-width configuration (same structure, ~1/16 of the compute) for tests and demos."""
        return cls(backbone=backbone, num_classes=num_classes, embedding_dim=embedding_dim,
                   backbone_kwargs=get_backbone(backbone).small)

    def with_backbone_kwargs(self, **kwargs: Any) -> "ModelConfig":
        return replace(self, backbone_kwargs={**self.backbone_kwargs, **kwargs})

    @property
    def spatial_multiple(self) -> int:
        """Input sizes must be multiples of this."""
        return get_backbone(self.backbone).spatial_multiple

    def to_dict(self) -> dict:
        return {"backbone": self.backbone, "num_classes": self.num_classes, "embedding_dim": self.embedding_dim,
                "norm_groups": self.norm_groups,
                "backbone_kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in self.backbone_kwargs.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """Inverse of :meth:`to_dict`. Also reads the layout of the first checkpoints, which listed the
        arguments of every backbone at the top level (``feature_size``, ``num_heads``, ``base_channels``)."""
        d = dict(d)
        backbone = d.pop("backbone", cls.backbone)
        kwargs = dict(d.pop("backbone_kwargs", {}))
        own = get_backbone(backbone).defaults
        for key in list(d):
            if key in own:
                kwargs.setdefault(key, d.pop(key))
        known = {k: v for k, v in d.items() if k in ("num_classes", "embedding_dim", "norm_groups")}
        return cls(backbone=backbone, backbone_kwargs=kwargs, **known)


# ------------------------------------------------------------------------------------ preprocessing
def as_triple(value, name: str, kind: type) -> tuple:
    """One number or three numbers -> a 3-tuple of ``kind``."""
    values = np.atleast_1d(np.asarray(value, dtype=np.float64))
    if values.shape == (1,):
        values = np.repeat(values, 3)
    if values.shape != (3,):
        raise ValueError(f"{name} must be one number or three numbers, got {value!r}")
    return tuple(kind(v) for v in values)


@dataclass(frozen=True)
class PreprocessingParameters:
    """Preprocessing settings; a checkpoint carries them (the defaults are the official model's).

    ``spacing``: output voxel size in mm (x, y, z of the RAS-oriented grid). ``hu_window``: HU mapped to 0 and 1
    (clipped). ``crop_foreground``: crop to the box of voxels with scaled value > 0. ``crop_margin``: voxels
    added around that box (never beyond the image).
    """

    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)
    hu_window: tuple[float, float] = (-175.0, 250.0)
    crop_foreground: bool = True
    crop_margin: tuple[int, int, int] = (0, 0, 0)

    def as_kwargs(self) -> dict:
        """Keyword arguments for :func:`UniversalSegLib.preprocess.preprocess`."""
        return {
            "spacing": tuple(self.spacing),
            "hu_window": tuple(self.hu_window),
            "crop_foreground": self.crop_foreground,
            "crop_margin": tuple(self.crop_margin),
        }

    def to_dict(self) -> dict:
        """JSON-serialisable form (lists), e.g. for checkpoint metadata."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.as_kwargs().items()}

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessingParameters":
        """Inverse of :meth:`to_dict`; missing keys take the official defaults, unknown keys are an error."""
        unknown = set(data) - {"spacing", "hu_window", "crop_foreground", "crop_margin"}
        if unknown:
            raise ValueError(f"Unknown preprocessing parameter(s): {sorted(unknown)}")
        defaults = cls()
        return cls(
            spacing=as_triple(data.get("spacing", defaults.spacing), "spacing", float),
            hu_window=tuple(float(v) for v in data.get("hu_window", defaults.hu_window)),  # type: ignore[arg-type]
            crop_foreground=bool(data.get("crop_foreground", defaults.crop_foreground)),
            crop_margin=as_triple(data.get("crop_margin", defaults.crop_margin), "crop_margin", int),
        )


# -------------------------------------------------------------------------------------------- inference
@dataclass(frozen=True)
class InferenceParameters:
    """How windows are laid out, blended and thresholded; a checkpoint carries them (official defaults)."""

    roi_size: tuple[int, int, int] = (96, 96, 96)
    overlap: float = 0.5
    threshold: float = 0.5
    gaussian: str = "monai09"
    sigma_scale: float = 0.125

    def to_dict(self) -> dict:
        return {"roi_size": list(self.roi_size), "overlap": self.overlap, "threshold": self.threshold,
                "gaussian": self.gaussian, "sigma_scale": self.sigma_scale}

    @classmethod
    def from_dict(cls, data: dict) -> "InferenceParameters":
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"Unknown inference parameter(s): {sorted(unknown)}")
        d = cls()
        return cls(roi_size=tuple(int(v) for v in data.get("roi_size", d.roi_size)),
                   overlap=float(data.get("overlap", d.overlap)), threshold=float(data.get("threshold", d.threshold)),
                   gaussian=str(data.get("gaussian", d.gaussian)), sigma_scale=float(data.get("sigma_scale", d.sigma_scale)))


# ---------------------------------------------------------------------------------------- window layout
Placement = Literal["monai", "even"]
#: Window placements: ``"monai"`` is MONAI's (and the official code's): step ``int(roi * (1 - overlap))``
#: and the last window moved back to end at the border. ``"even"`` keeps the same number of windows per
#: axis and spreads them evenly between the borders, which maximises the smallest overlap for that count
#: (what a reduced-overlap mode wants: with ``overlap=0`` neighbours still overlap where the image is not
#: a multiple of the window, instead of meeting at one-voxel seams).
PLACEMENTS = ("monai", "even")


def window_starts(
    spatial_shape: Sequence[int], roi_size: Sequence[int] = (96, 96, 96), overlap: float = 0.5
) -> list[list[int]]:
    """Start index of every window along each axis in MONAI's placement, in the zero-padded image.

    An axis shorter than its window is padded to the window size first (half before, rounded down, as
    MONAI does; the single start is then 0). The step is ``int(roi * (1 - overlap))`` (the whole window
    when the padded axis equals it) and the last window is moved back to end at the border, so an axis of
    padded length L gets ``ceil((L - roi) / step) + 1`` windows.
    """
    shape, roi = check_shapes(spatial_shape, roi_size)
    check_overlap(overlap)
    starts = []
    for length, window in zip(shape, roi):
        padded = max(length, window)
        step = window if padded == window else max(int(window * (1 - overlap)), 1)
        count = math.ceil((padded - window) / step) + 1
        starts.append([min(i * step, padded - window) for i in range(count)])
    return starts


def window_layout(
    spatial_shape: Sequence[int], roi_size: Sequence[int] = (96, 96, 96), overlap: float = 0.5,
    placement: Placement = "monai",
) -> list[list[int]]:
    """Start of every window along each axis for ``placement`` (one of :data:`PLACEMENTS`)."""
    if placement not in PLACEMENTS:
        raise InferenceError(f"unknown window placement {placement!r}; use one of {PLACEMENTS}")
    starts = window_starts(spatial_shape, roi_size, overlap)
    if placement == "monai":
        return starts
    # The same count per axis, spread evenly from the first start (0) to the last (padded length - roi).
    return [axis if len(axis) == 1 else [round(i * axis[-1] / (len(axis) - 1)) for i in range(len(axis))]
            for axis in starts]


def count_windows(
    spatial_shape: Sequence[int], roi_size: Sequence[int] = (96, 96, 96), overlap: float = 0.5
) -> int:
    """Number of windows (network forwards at batch size 1) for an image of ``spatial_shape``."""
    return math.prod(len(axis) for axis in window_starts(spatial_shape, roi_size, overlap))


def check_roi(roi_size: Sequence[int]) -> tuple[int, ...]:
    roi = tuple(roi_size) if isinstance(roi_size, Sequence) else ()
    if len(roi) != 3 or not all(isinstance(s, (int, np.integer)) and s >= 1 for s in roi):
        raise InferenceError(f"roi_size must be three positive integers, got {roi_size!r}")
    return tuple(int(s) for s in roi)


def check_shapes(spatial_shape: Sequence[int], roi_size: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    roi = check_roi(roi_size)
    shape = tuple(int(s) for s in spatial_shape)
    if len(shape) != 3 or any(s < 1 for s in shape):
        raise InferenceError(f"the image must have three non-empty spatial axes, got {tuple(spatial_shape)}")
    return shape, roi


def check_overlap(overlap: float) -> None:
    if not isinstance(overlap, (int, float)) or not 0.0 <= overlap < 1.0:
        raise InferenceError(f"overlap must be in [0, 1), got {overlap!r}")


# ------------------------------------------------------------------------------------------------ modes
@dataclass(frozen=True)
class InferenceMode:
    """How a segmenter trades exactness against time and memory.

    * ``"reference"``: what the official ``pred_pseudo.py`` computes: MONAI's window placement at the
      checkpoint's overlap (0.5 for the official models), every needed class blended at full resolution in
      float32, float64 resampling, official post-processing (its quirks included). For comparisons.
    * ``"default"``: the reference's windows, network, weights, Gaussian and threshold, with the official
      post-processing bugs fixed, and the cost cut where labels do not move: windows blended straight into
      masks slab by slab in float16 (no full-volume float maps), float32 resampling. Labels equal the
      reference's except where the fixed post-processing differs and for the rare voxels whose blended
      logit lies within float16 rounding of the threshold.
    * ``"fast"``: ``default`` with the fewest windows that cover the body (overlap 0, spread evenly, so
      they still overlap where the image is not a multiple of the window). For CPU users; its cost in Dice
      against the reference mode is measured by ``benchmarks/benchmark_modes.py``.
    """

    name: str
    label: str  # shown to people (Slicer's mode choice)
    overlap: float | None  # None: the checkpoint's (official: 0.5)
    placement: Placement  # see PLACEMENTS
    streaming: bool  # blend straight into masks (False: full-volume float logits, as the official code)
    accumulate_dtype: str  # torch dtype name of the per-class slab sums when streaming
    resample_dtype: str  # numpy dtype name of the preprocessing arithmetic
    postprocess: str  # "official" or "fixed"

    def effective_overlap(self, checkpoint_overlap: float) -> float:
        """The overlap this mode uses with a checkpoint whose own overlap is ``checkpoint_overlap``."""
        return checkpoint_overlap if self.overlap is None else min(self.overlap, checkpoint_overlap)


#: The inference modes, by name; the first is the default.
MODES: dict[str, InferenceMode] = {
    "default": InferenceMode("default", "Default (official windows, bugs fixed)", None, "monai", True,
                             "float16", "float32", "fixed"),
    "fast": InferenceMode("fast", "Fast (fewest windows, for CPUs)", 0.0, "even", True,
                          "float16", "float32", "fixed"),
    "reference": InferenceMode("reference", "Reference (official pipeline, bugs included)", None, "monai", False,
                               "float32", "float64", "official"),
}

#: Runtimes a window's forward can run on, by name, with their labels; the first is the default.
#: ``"auto"`` takes OpenVINO on a CPU when it is installed (the ``openvino`` extra) for the default and
#: fast modes, PyTorch otherwise (a GPU, the reference mode, or no OpenVINO). Only the forward of each
#: window changes: window layout, blending and post-processing are the same.
RUNTIMES: dict[str, str] = {
    "auto": "Automatic (OpenVINO on a CPU when installed)",
    "torch": "PyTorch",
    "openvino": "OpenVINO (CPU only)",
}
#: Environment variable with the runtime used when none is given (``torch`` keeps PyTorch everywhere).
RUNTIME_ENV = "UNIVERSALSEG_RUNTIME"
OPENVINO_INSTALL_HINT = "install it with: pip install 'universalseg[openvino]'"


def requested_runtime(name: str | None) -> str:
    """The runtime choice ``name`` normalised, one of :data:`RUNTIMES` (None: ``$UNIVERSALSEG_RUNTIME`` or
    ``"auto"``)."""
    name = (name or os.environ.get(RUNTIME_ENV) or "auto").strip().lower()
    if name not in RUNTIMES:
        raise UsageError(f"Unknown runtime {name!r}; choose one of {', '.join(RUNTIMES)}.")
    return name


def choose_runtime(name: str | None, device_type: str, mode: str, openvino_installed: Callable[[], bool]) -> str:
    """``"torch"`` or ``"openvino"``: the runtime a run with the choice ``name`` (see :func:`requested_runtime`)
    uses on a ``device_type`` ("cpu", "cuda", ...) in ``mode``. Without PyTorch, so that estimates made in
    Slicer's own process follow the same rule as the runs. ``openvino_installed`` is asked only when the
    answer matters (finding out may import OpenVINO).

    ``"auto"`` takes OpenVINO on a CPU when it is installed, except in the reference mode (which reproduces
    the official PyTorch pipeline); PyTorch otherwise. ``"openvino"`` is an error on a GPU or without
    OpenVINO installed.
    """
    name = requested_runtime(name)
    if name == "torch":
        return name
    if name == "auto":
        return "openvino" if device_type == "cpu" and mode != "reference" and openvino_installed() else "torch"
    if device_type != "cpu":
        raise RuntimeUnavailableError(f"OpenVINO runs on the CPU, but the device is {device_type}; choose the "
                                      "torch runtime for a GPU, or the CPU device.")
    if not openvino_installed():
        raise RuntimeUnavailableError(f"The OpenVINO runtime was requested but OpenVINO is not installed; "
                                      f"{OPENVINO_INSTALL_HINT}, or choose the torch runtime.")
    return name

#: Arithmetic of the network's forward: float32 (exact), or bfloat16/float16 autocast on a GPU.
PRECISIONS = ("float32", "bfloat16", "float16")

#: Stages a run reports to its progress callback, in order, with what they do in plain words.
STAGE_LABELS: dict[str, str] = {
    "preprocess": "Preparing the image (orientation, 1.5 mm grid, intensity window)",
    "inference": "Running the network",
    "postprocess": "Cleaning up the masks",
    "invert": "Mapping the masks back onto the input grid",
}
STAGES = tuple(STAGE_LABELS)
#: A stage reported only by runs on OpenVINO, between preprocess and inference: the network converted from
#: PyTorch on first use of a model, class set and window size, or read back from the on-disk cache.
CONVERT_STAGE = "convert"
CONVERT_STAGE_LABEL = "Preparing the network for this CPU (OpenVINO)"
