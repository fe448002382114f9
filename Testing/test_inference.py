"""Sliding-window inference: the MONAI 0.9.0 Gaussian weight, window layout, blending, cancel, progress,
and the threshold."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import require_shared
from monai.data.utils import compute_importance_map
from scipy.special import erf

from UniversalSegLib.inference import (
    InferenceCancelled,
    InferenceError,
    count_windows,
    gaussian_weight_map,
    sliding_window_logits,
    threshold,
    window_starts,
)

ROI = (32, 32, 32)


def erf_profile(size: int, sigma: float) -> np.ndarray:
    """Float64 re-derivation of MONAI 0.9.0's 1-D weight: the erf-discretised Gaussian kernel (cut at
    round(4 sigma)) evaluated at the distance from index size // 2, normalised to 1 there."""
    tail = int(4 * sigma + 0.5)
    distance = np.abs(np.arange(size) - size // 2).astype(np.float64)
    s = sigma * math.sqrt(2)
    values = 0.5 * (erf((distance + 0.5) / s) - erf((distance - 0.5) / s))
    values[distance > tail] = 0
    return values / values[size // 2]


# -- weight map --------------------------------------------------------------------------------------


def test_monai09_weight_is_the_smoothed_impulse_of_monai_0_9():
    raw = gaussian_weight_map((96, 96, 96), flavour="monai09", min_weight=None)
    assert raw.dtype == torch.float32 and raw.shape == (96, 96, 96)
    assert raw.max().item() == 1.0 and raw[48, 48, 48].item() == 1.0  # peak at size // 2, not 47.5
    # The corner value MONAI 0.9.0's compute_importance_map((96,) * 3, "gaussian") returns (3.8e-11).
    assert raw[0, 0, 0].item() == pytest.approx(3.8326959661549864e-11, rel=1e-5)
    g = erf_profile(96, 12.0)
    expected = g[:, None, None] * g[None, :, None] * g[None, None, :]
    # float32 erf differences lose relative precision in the far tails; absolute error stays tiny.
    np.testing.assert_allclose(raw.numpy(), expected, rtol=1e-4, atol=1e-6)
    # Symmetric about index 48 (where both sides exist), i.e. one voxel off the window centre 47.5.
    assert torch.equal(raw[1:48], torch.flip(raw[49:96], dims=[0]))

    # Anisotropic window and sigma: still the separable product of the 1-D profiles.
    odd = gaussian_weight_map((20, 33, 17), sigma_scale=(0.125, 0.2, 0.1), min_weight=None)
    gx, gy, gz = erf_profile(20, 2.5), erf_profile(33, 6.6), erf_profile(17, 1.7)
    expected = gx[:, None, None] * gy[None, :, None] * gz[None, None, :]
    np.testing.assert_allclose(odd.numpy(), expected, rtol=1e-4, atol=1e-6)


def test_blending_weight_has_monai_0_9_sliding_window_floor():
    weight = gaussian_weight_map()  # what the 0.9.0 sliding window actually blends with
    raw = gaussian_weight_map(min_weight=None)
    assert weight.min().item() == pytest.approx(1e-3)
    assert torch.equal(weight, raw.clamp(min=torch.tensor(1e-3).item()))
    assert (raw < 1e-3).float().mean() > 0.3  # the floor matters for a large part of the window


def test_monai09_and_current_weights_differ_as_documented():
    ours = gaussian_weight_map(flavour="monai09")
    current = gaussian_weight_map(flavour="current")
    assert torch.equal(current, compute_importance_map((96, 96, 96), mode="gaussian", sigma_scale=0.125))
    difference = (ours - current).abs().max().item()
    assert 0.04 < difference < 0.05  # the largest difference of the two maps


# -- window layout -----------------------------------------------------------------------------------


def test_official_window_layout():
    # The phantom after official preprocessing: 74 x 57 x 116 -> padded to 96 x 96 x 116.
    assert window_starts((74, 57, 116)) == [[0], [0], [0, 20]]
    assert count_windows((74, 57, 116)) == 2
    # ceil((L - 96) / 48) + 1 per axis: a typical abdomen needs 5 x 4 x 6 windows.
    assert count_windows((250, 200, 300)) == 5 * 4 * 6
    assert window_starts((96, 97, 144)) == [[0], [0, 1], [0, 48]]
    assert count_windows((100, 60, 130), ROI, overlap=0.5) == 6 * 3 * 8  # step 16
    assert count_windows((100, 60, 130), ROI, overlap=0.25) == 4 * 3 * 6  # step 24


def position_code(shape):
    """An image whose value encodes the voxel position (1-based linear index; 0 is padding)."""
    return torch.arange(1, math.prod(shape) + 1, dtype=torch.float32).reshape(1, 1, *shape)


def decode_window_start(window: torch.Tensor, shape, pad_before) -> tuple[int, ...]:
    """Start (in the padded image) of a window, from any non-padding voxel of it."""
    inside = torch.nonzero(window[0] > 0)[0]
    linear = int(window[0][tuple(inside)].item()) - 1
    position = np.unravel_index(linear, shape)
    return tuple(int(p + before - i) for p, before, i in zip(position, pad_before, inside.tolist()))


@pytest.mark.parametrize("shape", [(74, 57, 116), (40, 20, 70)])
def test_the_windows_the_predictor_sees_follow_the_layout(shape):
    roi = (96, 96, 96) if shape[0] == 74 else ROI
    pad_before = [max(r - s, 0) // 2 for s, r in zip(shape, roi)]
    seen = []

    def predictor(windows):
        assert windows.shape[1:] == (1, *roi)
        seen.extend(decode_window_start(w, shape, pad_before) for w in windows)
        return torch.zeros((windows.shape[0], 1, *roi))

    sliding_window_logits(position_code(shape), predictor, roi_size=roi)
    starts = window_starts(shape, roi)
    expected = {(x, y, z) for x in starts[0] for y in starts[1] for z in starts[2]}
    assert len(seen) == count_windows(shape, roi) == len(expected)
    assert set(seen) == expected


# -- blending ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image():
    """A real preprocessed CT: the official preprocessing of the phantom (74 x 57 x 116, values 0..1)."""
    data = np.load(require_shared("reference/fixture/preproc_phantom.npz"))
    return torch.from_numpy(data["preprocessed"]).reshape(1, 1, 74, 57, 116)


def test_pointwise_network_gives_the_whole_image_result(image):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 1), torch.nn.Tanh(), torch.nn.Conv3d(8, 5, 1)).eval()
    with torch.no_grad():
        whole = net(image)
    for flavour in ("monai09", "current"):
        out = sliding_window_logits(image, net, roi_size=ROI, gaussian=flavour)
        assert out.shape == (1, 5, 74, 57, 116) and out.dtype == torch.float32 and out.device.type == "cpu"
        torch.testing.assert_close(out, whole, atol=2e-6, rtol=1e-5)


def test_blending_is_the_weighted_mean_of_the_windows(image):
    """Each window predicts one value per channel (its mean intensity, and that +1): the result must be
    sum(w * value) / sum(w) with the chosen Gaussian, computed here by hand."""
    crop = image[:, :, :40, :20, :70]  # axis 1 is shorter than the window: padded 6 before, 6 after
    shape, pad = crop.shape[2:], [max(r - s, 0) // 2 for s, r in zip(crop.shape[2:], ROI)]

    def predictor(windows):
        means = windows.mean(dim=(1, 2, 3, 4)).reshape(-1, 1, 1, 1, 1)
        return torch.cat([means, means + 1], dim=1).expand(-1, -1, *ROI)

    padded = torch.nn.functional.pad(crop[0, 0].double(), (0, 0, pad[1], 32 - 20 - pad[1], 0, 0))
    results = {}
    for flavour in ("monai09", "current"):
        weight = gaussian_weight_map(ROI, flavour=flavour).double()
        total = torch.zeros(padded.shape, dtype=torch.float64)
        norm = torch.zeros(padded.shape, dtype=torch.float64)
        starts = window_starts(shape, ROI)
        for x in starts[0]:
            for y in starts[1]:
                for z in starts[2]:
                    box = (slice(x, x + 32), slice(y, y + 32), slice(z, z + 32))
                    total[box] += weight * padded[box].mean()
                    norm[box] += weight
        expected = (total / norm)[:, pad[1] : pad[1] + 20, :]
        out = sliding_window_logits(crop, predictor, roi_size=ROI, gaussian=flavour)
        assert out.shape == (1, 2, 40, 20, 70)
        torch.testing.assert_close(out[0, 0].double(), expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out[0, 1].double(), expected + 1, atol=1e-6, rtol=1e-5)
        results[flavour] = out
    # The flavour really changes the blend (the two weights differ by up to 0.044).
    assert (results["monai09"] - results["current"]).abs().max() > 1e-4


def test_constant_predictor_and_batching(image):
    def constant(windows):
        return torch.full((windows.shape[0], 3, *ROI), -2.5)

    out = sliding_window_logits(image[0, 0].numpy(), constant, roi_size=ROI)  # (X, Y, Z) numpy accepted
    torch.testing.assert_close(out, torch.full((1, 3, 74, 57, 116), -2.5))

    torch.manual_seed(1)
    net = torch.nn.Conv3d(1, 2, 3, padding=1).eval()  # not pointwise: windows disagree near their edges
    one = sliding_window_logits(image, net, roi_size=ROI, sw_batch_size=1)
    three = sliding_window_logits(image, net, roi_size=ROI, sw_batch_size=3)
    buffered = sliding_window_logits(image, net, roi_size=ROI, buffer_steps=1)
    torch.testing.assert_close(three, one, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(buffered, one, atol=1e-6, rtol=1e-5)


# -- cancel, progress, errors ------------------------------------------------------------------------


def test_cancel_stops_between_windows(image):
    calls = []

    def predictor(windows):
        calls.append(windows.shape[0])
        return torch.zeros((windows.shape[0], 1, *ROI))

    with pytest.raises(InferenceCancelled, match="after 3 of 36 windows"):
        sliding_window_logits(image[:, :, :, :, :64], predictor, roi_size=ROI, cancel=lambda: len(calls) >= 3)
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(InferenceCancelled):
        sliding_window_logits(image, predictor, roi_size=ROI, cancel=lambda: True)
    assert calls == []


def test_progress_callback_and_bar(image, capsys):
    reports = []
    sliding_window_logits(
        image,
        lambda w: torch.zeros((w.shape[0], 1, *ROI)),
        roi_size=ROI,
        sw_batch_size=4,
        on_window=lambda done, total: reports.append((done, total)),
        progress=True,
    )
    total = count_windows((74, 57, 116), ROI)
    assert reports[-1] == (total, total) and len(reports) == math.ceil(total / 4)
    assert [done for done, _ in reports] == sorted(done for done, _ in reports)
    calls = math.ceil(total / 4)
    assert f"{calls}/{calls}" in capsys.readouterr().err  # the tqdm bar (stderr) reached the end


def test_bad_inputs_and_outputs_get_clear_errors(image):
    zeros = lambda w: torch.zeros((w.shape[0], 1, *ROI))  # noqa: E731
    with pytest.raises(InferenceError, match="single-channel"):
        sliding_window_logits(torch.zeros(1, 2, 40, 40, 40), zeros, roi_size=ROI)
    with pytest.raises(InferenceError, match="overlap"):
        sliding_window_logits(image, zeros, roi_size=ROI, overlap=1.0)
    with pytest.raises(InferenceError, match="roi_size"):
        sliding_window_logits(image, zeros, roi_size=(32, 32))
    with pytest.raises(InferenceError, match="returned shape"):
        sliding_window_logits(image, lambda w: torch.zeros((w.shape[0], 1, 16, 16, 16)), roi_size=ROI)
    with pytest.raises(InferenceError, match="one tensor"):
        sliding_window_logits(image, lambda w: (zeros(w),), roi_size=ROI)
    with pytest.raises(InferenceError, match="flavour"):
        gaussian_weight_map(flavour="monai12")


# -- threshold ---------------------------------------------------------------------------------------


def test_threshold_is_strict_sigmoid_greater_than():
    logits = torch.tensor([-3.0, -1e-6, 0.0, 1e-6, 0.4, 0.41, 3.0])
    # sigmoid(0) == 0.5 exactly: NOT foreground (official: probability > 0.5).
    assert threshold(logits).tolist() == [False, False, False, True, True, True, True]
    # 0.6: logit cut at log(0.6 / 0.4) = 0.405...
    assert threshold(logits, 0.6).tolist() == [False, False, False, False, False, True, True]
    rng = np.random.default_rng(0)
    many = torch.from_numpy(rng.normal(0, 3, size=(1, 4, 10, 11, 12)).astype(np.float32))
    probabilities = 1 / (1 + np.exp(-many.double().numpy()))
    assert np.array_equal(threshold(many).numpy(), probabilities > 0.5)
    per_class = [0.3, 0.5, 0.7, 0.9]
    expected = probabilities > np.array(per_class).reshape(1, 4, 1, 1, 1)
    assert np.array_equal(threshold(many, per_class).numpy(), expected)
    assert threshold(many).dtype == torch.bool


def test_threshold_errors():
    logits = torch.zeros(1, 3, 2, 2, 2)
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(InferenceError, match="strictly between 0 and 1"):
            threshold(logits, bad)
    with pytest.raises(InferenceError, match="per-class"):
        threshold(logits, [0.5, 0.5])
    with pytest.raises(InferenceError, match="float logits"):
        threshold(torch.zeros(3, dtype=torch.int64))
