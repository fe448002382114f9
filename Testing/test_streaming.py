"""Slab-wise sliding window (UniversalSegLib.inference.slabs): the same masks as the official full-volume blend,
window layouts, float16 slabs, errors; and the memory-lean model forms it relies on."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from UniversalSegLib.inference import (InferenceCancelled, InferenceError, count_windows, gaussian_weight_map,
                                       sliding_window_logits, sliding_window_masks, threshold, window_layout)
from UniversalSegLib.model import ModelConfig, UniversalModel

ROI = (32, 32, 32)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    return UniversalModel(ModelConfig.small("unet", num_classes=6)).eval()


@pytest.fixture(scope="module")
def image():
    generator = torch.Generator().manual_seed(5)
    # One axis shorter than the window (padding), one long axis (several rows).
    return torch.rand((70, 50, 20), generator=generator)


@pytest.fixture(scope="module")
def reference(model, image):
    with torch.no_grad():
        logits = sliding_window_logits(image, model, roi_size=ROI, overlap=0.5)
    # Per-class thresholds at the median probability: half the voxels sit on each side, so a blending
    # difference anywhere would show up as a changed mask.
    cuts = [float(torch.sigmoid(logits[0, k].median())) for k in range(logits.shape[1])]
    return logits, cuts


@pytest.mark.parametrize("slab_axis", [0, 1, None])
def test_streamed_masks_equal_the_full_volume_blend(model, image, reference, slab_axis):
    logits, cuts = reference
    result = sliding_window_masks(image, model, gaussian_weight_map(ROI), cuts, roi_size=ROI, overlap=0.5,
                                  slab_axis=slab_axis, keep_probabilities=True)
    expected = threshold(logits, cuts)[0].numpy()
    assert result.masks.dtype == bool and result.masks.shape == expected.shape
    assert 0.3 < expected.mean() < 0.7
    assert result.windows == count_windows(image.shape, ROI, 0.5)
    if slab_axis == 0:  # MONAI's accumulation order: bit-identical
        np.testing.assert_array_equal(result.masks, expected)
    else:  # another summation order: float rounding may flip a voxel sitting exactly on the cut
        assert np.count_nonzero(result.masks != expected) <= expected.size * 1e-5
    probabilities = (torch.sigmoid(logits[0]) * 255).round().to(torch.uint8).numpy()
    assert np.abs(result.probabilities.astype(int) - probabilities).max() <= 1


def test_float16_slabs_change_almost_nothing(model, image, reference):
    logits, cuts = reference
    result = sliding_window_masks(image, model, gaussian_weight_map(ROI), cuts, roi_size=ROI, overlap=0.5,
                                  accumulate_dtype=torch.float16)
    expected = threshold(logits, cuts)[0].numpy()
    # With thresholds at the median many voxels lie near the cut; real logits are far from it almost everywhere.
    assert np.count_nonzero(result.masks != expected) / expected.size < 1e-3


def test_even_layout_keeps_the_count_and_spreads_windows():
    shape, roi = (243, 193, 223), (96, 96, 96)
    monai = window_layout(shape, roi, 0.0, "monai")
    even = window_layout(shape, roi, 0.0, "even")
    assert monai == [[0, 96, 147], [0, 96, 97], [0, 96, 127]]  # 1-voxel seam on the second axis
    assert even == [[0, 74, 147], [0, 48, 97], [0, 64, 127]]
    for axis, length in zip(even, shape):
        assert axis[0] == 0 and axis[-1] == length - 96
        steps = np.diff(axis)
        assert steps.max() - steps.min() <= 1 and steps.max() <= 96  # even, and no gaps
    assert [len(a) for a in window_layout(shape, roi, 0.5, "even")] == [len(a) for a in window_layout(shape, roi, 0.5)]
    assert window_layout((40, 96, 20), roi, 0.0, "even") == [[0], [0], [0]]  # padded axes: one window


def test_even_layout_covers_every_voxel(model):
    image = torch.rand((75, 40, 33))
    # A predictor of constant logits: every voxel that some window covers gets exactly that value.
    predictor = lambda w: torch.full((1, 2, *w.shape[2:]), 3.0)  # noqa: E731
    result = sliding_window_masks(image, predictor, gaussian_weight_map(ROI), [0.5], roi_size=ROI, overlap=0.0,
                                  placement="even", keep_probabilities=True)
    assert result.masks.all()
    assert (result.probabilities == round(255 / (1 + np.exp(-3.0)))).all()
    assert result.windows == 3 * 2 * 2


def test_cancel_and_bad_predictor_output(model, image):
    weight = gaussian_weight_map(ROI)
    with pytest.raises(InferenceCancelled):
        sliding_window_masks(image, model, weight, [0.5], roi_size=ROI, cancel=lambda: True)
    with pytest.raises(InferenceError, match="expected \\(1, classes"):
        sliding_window_masks(image, lambda w: w[:, :, :4], weight, [0.5], roi_size=ROI)
    with pytest.raises(InferenceError, match="thresholds"):
        sliding_window_masks(image, model, weight, [1.5], roi_size=ROI)
    with pytest.raises(InferenceError, match="placement"):
        window_layout((50, 50, 50), ROI, 0.5, "diagonal")
    with pytest.raises(InferenceError, match="weight"):
        sliding_window_masks(image, model, gaussian_weight_map((16, 16, 16)), [0.5], roi_size=ROI)


@pytest.mark.parametrize("backbone", ["swinunetr", "unet"])
def test_inference_forms_equal_the_training_forward(backbone):
    """Without autograd the model runs fused, chunked window attention and in-place normalisation
    (UniversalSegLib.model.low_memory); with autograd MONAI's modules. Both compute the same logits."""
    from UniversalSegLib.model import swin_unetr

    torch.manual_seed(0)
    model = UniversalModel(ModelConfig.small(backbone, num_classes=4)).eval()
    x = torch.rand((1, 1, 64, 64, 64))
    with torch.enable_grad():
        training_form = model(x).detach()
    with torch.no_grad():
        inference_form = model(x)
        channels_last = model.to(memory_format=torch.channels_last_3d)(x.contiguous(memory_format=torch.channels_last_3d))
    scale = training_form.abs().max().item()
    assert (inference_form - training_form).abs().max().item() <= 1e-5 * max(scale, 1.0)
    assert (channels_last - training_form).abs().max().item() <= 1e-5 * max(scale, 1.0)
    if backbone == "swinunetr":
        attention = [m for m in model.modules() if isinstance(m, swin_unetr.ChunkedWindowAttention)]
        assert len(attention) == 8  # every block of the 4 stages


def test_chunked_attention_uses_several_chunks_and_the_shift_mask(monkeypatch):
    """Force tiny chunks: windows split over many chunks must give MONAI's softmax result, shifted
    blocks (which add the per-window mask) included."""
    from UniversalSegLib.model import swin_unetr

    torch.manual_seed(1)
    model = UniversalModel(ModelConfig.small("swinunetr", num_classes=2)).eval()
    x = torch.rand((1, 1, 64, 64, 64))
    with torch.enable_grad():
        expected = model(x).detach()
    monkeypatch.setattr(swin_unetr, "_ATTENTION_CHUNK_BYTES", 1)  # one window per chunk
    with torch.no_grad():
        chunked = model(x)
    assert (chunked - expected).abs().max().item() <= 1e-5 * max(expected.abs().max().item(), 1.0)
