"""Checkpoints: both official layouts, safe loading, our safetensors format, and specific errors."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import fixture_state_dict, require_shared, write_released_style_checkpoint
from UniversalSegLib.checkpoints import (
    OFFICIAL_LICENSE, Checkpoint, CheckpointError, CheckpointMetadata,
    convert_official_checkpoint, load_checkpoint, read_metadata, save_checkpoint, sha256_file,
)
from UniversalSegLib.inference import InferenceParameters
from UniversalSegLib.model import ModelConfig, UniversalModel
from UniversalSegLib.preprocess import PreprocessingParameters
from UniversalSegLib.taxonomy import ClassInfo, get_taxonomy


@pytest.fixture(scope="module")
def unet_state():
    return fixture_state_dict("unet")


@pytest.fixture(scope="module")
def released_unet(tmp_path_factory):
    return write_released_style_checkpoint("unet", tmp_path_factory.mktemp("ckpt") / "clip_driven_universal_unet.pth")


def _assert_same_state(a, b):
    assert list(a) == list(b) or set(a) == set(b)
    for k in b:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("backbone", ["swinunetr", "unet"])
def test_released_layout_loads_exactly(backbone, tmp_path):
    path = write_released_style_checkpoint(backbone, tmp_path / "released.pth")
    raw = torch.load(path, weights_only=True)
    if backbone == "swinunetr":  # the released Swin file has the flat, pre-2023 layout
        assert "module.swinViT.patch_embed.proj.weight" in raw["net"]
    ckpt = load_checkpoint(path)
    assert ckpt.metadata.model.backbone == backbone
    assert ckpt.metadata.model == ModelConfig(backbone=backbone)
    _assert_same_state(ckpt.state_dict, fixture_state_dict(backbone))
    assert ckpt.metadata.license == OFFICIAL_LICENSE
    assert len(ckpt.metadata.classes) == 32


def test_ddp_training_layout_with_optimizer_state_loads(tmp_path, unet_state):
    # What a DDP run of the official train.py saves: 'module.backbone...' keys plus optimizer/scheduler state.
    model = UniversalModel(ModelConfig(backbone="unet"))
    model.load_state_dict(unet_state)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    saved = {"net": {"module." + k: v for k, v in unet_state.items()}, "optimizer": optimizer.state_dict(),
             "scheduler": {"last_epoch": 50, "base_lrs": [1e-4]}, "epoch": 50}
    torch.save(saved, tmp_path / "epoch_50.pth")
    _assert_same_state(load_checkpoint(tmp_path / "epoch_50.pth").state_dict, unet_state)


def test_bare_state_dict_loads(tmp_path, unet_state):
    torch.save(unet_state, tmp_path / "bare.pth")
    _assert_same_state(load_checkpoint(tmp_path / "bare.pth", backbone="unet").state_dict, unet_state)


class _Payload:
    """Pickles to a call that writes a marker file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_malicious_pickle_is_refused_and_not_executed(tmp_path, unet_state):
    marker = tmp_path / "executed.txt"
    net = {"module." + k: v for k, v in unet_state.items()}
    net["module.evil"] = _Payload(marker)
    torch.save({"net": net}, tmp_path / "evil.pth")
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused to load") as err:
        load_checkpoint(tmp_path / "evil.pth")
    assert "evil.pth" in str(err.value)
    assert not marker.exists(), "pickled code was executed"


def test_wrong_backbone_is_named(released_unet):
    with pytest.raises(CheckpointError, match="wrong backbone: the file holds a unet model, but swinunetr was requested") as err:
        load_checkpoint(released_unet, backbone="swinunetr")
    assert "clip_driven_universal_unet.pth" in str(err.value)


def test_missing_and_extra_keys_are_named(tmp_path, unet_state):
    missing = {k: v for k, v in unet_state.items() if k != "controller.bias"}
    torch.save({"net": missing}, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\), e.g. controller.bias") as err:
        load_checkpoint(tmp_path / "missing.pth")
    assert "missing.pth" in str(err.value)

    extra = dict(unet_state, **{"backbone.out_tr.final_conv.weight": torch.zeros(1, 64, 1, 1, 1)})
    torch.save({"net": extra}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"1 unexpected key\(s\), e.g. backbone.out_tr.final_conv.weight"):
        load_checkpoint(tmp_path / "extra.pth")


def test_wrong_shape_is_named(tmp_path, unet_state):
    bad = dict(unet_state, **{"controller.weight": torch.zeros(153, 256, 1, 1, 1)})
    torch.save(bad, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"wrong shape, e.g. controller.weight \(153, 256, 1, 1, 1\) \(expected \(153, 512, 1, 1, 1\)\)"):
        load_checkpoint(tmp_path / "shape.pth")


def test_class_count_mismatch(tmp_path, unet_state):
    bad = dict(unet_state, organ_embedding=unet_state["organ_embedding"][:31])
    torch.save({"net": bad}, tmp_path / "31.pth")
    with pytest.raises(CheckpointError, match="class-count mismatch: the file has 31 label embeddings, the official class table has 32"):
        load_checkpoint(tmp_path / "31.pth")


@pytest.mark.parametrize("size", [0, 100, "half"])
def test_truncated_or_empty_file(tmp_path, released_unet, size):
    data = released_unet.read_bytes()
    cut = len(data) // 2 if size == "half" else size
    path = tmp_path / "cut.pth"
    path.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match="empty" if cut == 0 else "truncated or damaged") as err:
        load_checkpoint(path)
    assert "cut.pth" in str(err.value)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(CheckpointError, match="file not found"):
        load_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="is a folder"):
        load_checkpoint(tmp_path)


def test_not_a_universal_model(tmp_path):
    torch.save({"net": {"module.fc.weight": torch.zeros(2, 2)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a Universal Model checkpoint"):
        load_checkpoint(tmp_path / "other.pth")


def test_convert_official_to_own_format(tmp_path, released_unet, unet_state):
    out = convert_official_checkpoint(released_unet, tmp_path / "unet.safetensors")
    meta = read_metadata(out)
    assert meta.model == ModelConfig(backbone="unet")
    assert [c.prompt for c in meta.classes][7] == "A computerized tomography of a Arota"  # typo kept
    assert meta.classes == get_taxonomy()
    assert meta.preprocessing == PreprocessingParameters() and meta.inference == InferenceParameters()
    assert meta.embedding["template"] == "A computerized tomography of a {}"
    assert meta.provenance["source_sha256"] == sha256_file(released_unet)
    assert meta.provenance["source_file"] == "clip_driven_universal_unet.pth"
    assert "CC BY-NC-ND 4.0" in meta.license
    ckpt = load_checkpoint(out)
    _assert_same_state(ckpt.state_dict, unet_state)
    clip = np.load(require_shared("reference/fixture/clip_txt_encoding_32x512.npy"))
    assert np.array_equal(ckpt.label_embeddings.numpy(), clip)
    # The metadata is plain JSON inside the safetensors header, readable by any tool.
    header_len = int.from_bytes(out.read_bytes()[:8], "little")
    header = json.loads(out.read_bytes()[8:8 + header_len])
    assert json.loads(header["__metadata__"]["universalseg"])["format"] == "universalseg-checkpoint"


def test_own_format_never_overwrites_and_leaves_no_partial_file(tmp_path, released_unet):
    out = tmp_path / "unet.safetensors"
    convert_official_checkpoint(released_unet, out)
    before = out.read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        convert_official_checkpoint(released_unet, out)
    assert out.read_bytes() == before
    convert_official_checkpoint(released_unet, out, overwrite=True)
    # A failing write (wrong key set) leaves neither the target nor a temporary file behind.
    ckpt = load_checkpoint(out)
    broken = {k: v for k, v in ckpt.state_dict.items() if k != "GAP.3.bias"}
    with pytest.raises(CheckpointError, match="missing key"):
        save_checkpoint(tmp_path / "broken.safetensors", broken, ckpt.metadata)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet.safetensors"]


def test_own_format_with_extra_classes_round_trips(tmp_path):
    # A small model whose class table extends the official one (what fine-tuning to new names produces).
    config = ModelConfig.small("swinunetr", num_classes=33)
    torch.manual_seed(0)
    model = UniversalModel(config)
    taxonomy = get_taxonomy().extended([ClassInfo.from_dict({"index": 33, "display_name": "Spinal Cord"})])
    model.organ_embedding.copy_(torch.randn(33, 512))
    meta = CheckpointMetadata(model=config, classes=taxonomy, provenance={"origin": "test"})
    path = save_checkpoint(tmp_path / "small.safetensors", model.state_dict(), meta)
    ckpt = load_checkpoint(path)
    assert ckpt.metadata.classes == taxonomy
    assert ckpt.metadata.classes.resolve("spinal cord")[0].index == 33
    assert ckpt.metadata.channel_of(taxonomy[33]) == 32
    rebuilt = ckpt.build_model()
    x = torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model.eval()(x))


def test_own_format_class_table_mismatch(tmp_path):
    config = ModelConfig.small("unet", num_classes=32)
    model = UniversalModel(config)
    meta = CheckpointMetadata(model=config, classes=get_taxonomy())
    path = save_checkpoint(tmp_path / "m.safetensors", model.state_dict(), meta)
    # Rewrite the header so that the class table lists 31 classes.
    from safetensors.torch import load_file, save_file

    raw = meta.to_dict()
    raw["classes"]["classes"] = raw["classes"]["classes"][:31]
    save_file(load_file(str(path)), str(tmp_path / "bad.safetensors"), metadata={"universalseg": json.dumps(raw)})
    with pytest.raises(CheckpointError, match="class-count mismatch: 32 label embeddings, 31 classes"):
        load_checkpoint(tmp_path / "bad.safetensors")
    save_file(load_file(str(path)), str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="without UniversalSeg metadata"):
        load_checkpoint(tmp_path / "plain.safetensors")


def test_build_model_runs_subset_with_one_backbone_pass():
    config = ModelConfig.small("unet")
    model = UniversalModel(config).eval()
    calls = []
    model.backbone.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        out = model(torch.rand(1, 1, 32, 32, 32), channels=[5, 26])
    assert out.shape == (1, 2, 32, 32, 32) and len(calls) == 1
    with pytest.raises(ValueError, match="within 0..31"):
        model(torch.rand(1, 1, 32, 32, 32), channels=[32])
    with pytest.raises(ValueError, match="multiples of 8 and at least 16"):
        model(torch.rand(1, 1, 30, 32, 32))
