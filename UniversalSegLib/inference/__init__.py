"""Sliding-window inference: windows over a preprocessed CT, blended and thresholded into class masks.

* :mod:`.blending`: the Gaussian weight of one window (MONAI 0.9.0's, as the official code, or current
  MONAI's).
* :mod:`.full_volume`: the official path, every class blended into float logits over the whole volume
  (:func:`sliding_window_logits`), then :func:`threshold`.
* :mod:`.slabs`: the same blend streamed slab by slab straight into masks (:func:`sliding_window_masks`).

The window layout itself is in :mod:`UniversalSegLib.settings` (no PyTorch needed to count windows).
"""
from .. import monai_import  # noqa: F401  (before the modules below: MONAI without torchvision)
from ..errors import InferenceCancelled, InferenceError
from ..settings import PLACEMENTS, InferenceParameters, count_windows, window_layout, window_starts
from .blending import FLAVOURS, gaussian_weight_map
from .full_volume import sliding_window_logits, threshold
from .slabs import BlendedMasks, sliding_window_masks

__all__ = [
    "BlendedMasks", "FLAVOURS", "InferenceCancelled", "InferenceError", "InferenceParameters", "PLACEMENTS",
    "count_windows", "gaussian_weight_map", "sliding_window_logits", "sliding_window_masks", "threshold",
    "window_layout", "window_starts",
]
