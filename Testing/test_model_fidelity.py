"""The model equals the official Universal Model: keys, shapes, and logits on the fidelity fixture.

One full-size forward per backbone (15-35 s on 2 CPU cores), loaded through the released-style official
checkpoint, so this also proves the official checkpoint path end to end.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import fixture_input, require_shared, write_released_style_checkpoint
from UniversalSegLib.checkpoints import load_checkpoint
from UniversalSegLib.model import ModelConfig, UniversalModel

ATOL = 2e-4  # float32 re-implementation vs the official float32 run (fixture README)
BACKBONES = ["swinunetr", "unet"]


@pytest.mark.parametrize("backbone", BACKBONES)
def test_state_dict_keys_shapes_and_order_equal_official(backbone):
    spec = json.loads(require_shared(f"reference/fixture/keys_{backbone}.json").read_text())
    model = UniversalModel(ModelConfig(backbone=backbone))
    state = model.state_dict()
    assert list(state) == [e["key"] for e in spec["entries"]]
    for e in spec["entries"]:
        assert list(state[e["key"]].shape) == e["shape"], e["key"]
        assert str(state[e["key"]].dtype) == e["dtype"], e["key"]
    assert sum(p.numel() for p in model.parameters()) == spec["num_parameters_total"]
    assert sum(p.numel() for p in model.backbone.parameters()) == spec["num_parameters_backbone"]


@pytest.fixture(scope="module", params=BACKBONES)
def official_run(request, tmp_path_factory):
    """Model loaded from a released-style official checkpoint, its features and all 32 logits."""
    backbone = request.param
    path = write_released_style_checkpoint(backbone, tmp_path_factory.mktemp(backbone) / "released.pth")
    model = load_checkpoint(path).build_model()
    expected = dict(np.load(require_shared(f"reference/fixture/expected_{backbone}.npz")))
    with torch.no_grad():
        deepest, decoded = model.backbone(fixture_input())
        logits = model.head(deepest, decoded)[0]
    return backbone, model, deepest, decoded, logits, expected


def test_logits_equal_official_at_all_points(official_run):
    backbone, _, _, _, logits, expected = official_run
    p = expected["points"].astype(np.int64)
    got = logits[:, p[:, 0], p[:, 1], p[:, 2]].T.numpy()
    assert got.shape == (4096, 32)
    err = np.abs(got - expected["logits_at_points"]).max()
    print(f"{backbone}: max |delta logit| at 4096 points x 32 classes = {err:.3g}")
    assert err < ATOL
    # The official run also thresholds the same way almost everywhere (sign flips only near 0).
    assert np.mean((got > 0) == (expected["logits_at_points"] > 0)) > 0.999


def test_liver_block_equals_official(official_run):
    backbone, _, _, _, logits, expected = official_run
    liver = logits[5].numpy()
    np.testing.assert_allclose(liver[::4, ::4, ::4], expected["liver_logits_stride4"], atol=ATOL, rtol=0)
    pooled = liver.reshape(24, 4, 24, 4, 24, 4).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(pooled, expected["liver_logits_avgpool4"], atol=ATOL, rtol=0)


def test_intermediates_equal_official(official_run):
    _, model, deepest, decoded, _, expected = official_run
    with torch.no_grad():
        gap = model.GAP(deepest).flatten().numpy()
        task = torch.relu(model.text_to_vision(model.organ_embedding)).numpy()
        params = model.dynamic_params(deepest)[0].numpy()
        shared = model.precls_conv(decoded)[0]
    p = expected["points"].astype(np.int64)
    np.testing.assert_allclose(gap, expected["inter_gap_feat"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(task, expected["inter_task_encoding"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(params, expected["inter_dynamic_params"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(shared[:, p[:, 0], p[:, 1], p[:, 2]].T.numpy(), expected["inter_head_input_at_points"],
                               atol=ATOL, rtol=0)
    assert list(deepest.shape[1:]) == list(expected["inter_dec4_shape"][1:])


def test_class_subset_equals_channels_of_full_run(official_run):
    _, model, deepest, decoded, logits, _ = official_run
    channels = [26, 5, 10, 31]  # any order, any subset
    with torch.no_grad():
        subset = model.head(deepest, decoded, channels)[0]
    assert subset.shape == (4, 96, 96, 96)
    assert torch.equal(subset, logits[channels]) or torch.allclose(subset, logits[channels], atol=1e-6, rtol=0)


def test_official_embedding_reaches_head_unchanged(official_run):
    _, model, _, _, _, _ = official_run
    clip = np.load(require_shared("reference/fixture/clip_txt_encoding_32x512.npy"))
    assert np.array_equal(model.organ_embedding.numpy(), clip.astype(np.float32))
