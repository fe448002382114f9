"""Label embeddings: the real open_clip tokenizer and ViT-B/32 architecture (random weights, no network),
the official embedding file reaching the head unchanged, and adding classes by name."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import fixture_state_dict, require_shared
from UniversalSegLib.checkpoints import Checkpoint, CheckpointMetadata, load_checkpoint, save_checkpoint
from UniversalSegLib.model import ModelConfig, UniversalModel
from UniversalSegLib.taxonomy import get_taxonomy
from UniversalSegLib.text import (
    PROMPT_TEMPLATE, ClipTextEncoder, OneHotEncoder, TextEncoderUnavailable, find_clip_weights, prompts_for,
)

open_clip = pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory):
    """A real open_clip ViT-B/32 with random weights; its text tower saved (float16) as a user would have it."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    text_keys = [k for k in model.state_dict() if not k.startswith("visual.") and k != "logit_scale"]
    state = {k: model.state_dict()[k].half().contiguous() for k in text_keys}
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)  # reference uses the same values
    path = tmp_path_factory.mktemp("clip") / "ViT-B-32-text.safetensors"
    save_file(state, str(path))
    return model, path


def test_clip_encoder_matches_open_clip_on_official_prompts(clip_weights):
    model, path = clip_weights
    names = [c.prompt_name for c in get_taxonomy()]
    encoder = ClipTextEncoder(weights=path)
    got = encoder.encode(names)
    assert got.shape == (32, 512) and got.dtype == np.float32
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    prompts = prompts_for(names)
    assert prompts[7] == "A computerized tomography of a Arota"  # the released embeddings' typos are kept
    assert prompts[24] == "A computerized tomography of a Celiac Truck"
    with torch.no_grad():
        want = model.encode_text(tokenizer(prompts), normalize=False).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # Not normalised, like the official file; distinct prompts give distinct vectors.
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0)
    assert not np.allclose(encoder.encode(["Aorta"]), encoder.encode(["Arota"]))
    assert encoder.encode([]).shape == (0, 512)


def test_clip_weights_found_in_user_cache(tmp_path, clip_weights, monkeypatch):
    _, path = clip_weights
    snap = tmp_path / "hub" / "models--timm--vit_base_patch32_clip_224.openai" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "open_clip_model.safetensors").symlink_to(path)
    assert find_clip_weights([tmp_path / "hub"]) == snap / "open_clip_model.safetensors"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("UNIVERSALSEG_HOME", str(tmp_path / "none"))
    assert ClipTextEncoder().weights_path == snap / "open_clip_model.safetensors"


def test_missing_clip_weights_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("UNIVERSALSEG_HOME", str(tmp_path / "us"))
    assert find_clip_weights() is None
    with pytest.raises(TextEncoderUnavailable, match="No CLIP ViT-B/32 weights found") as err:
        ClipTextEncoder()
    assert "pretrained='openai'" in str(err.value) and "universalseg[clip]" in str(err.value)
    with pytest.raises(TextEncoderUnavailable, match="weights file not found"):
        ClipTextEncoder(weights=tmp_path / "nope.safetensors")


def test_wrong_weights_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"fc.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(TextEncoderUnavailable, match="not a CLIP ViT-B/32 checkpoint"):
        ClipTextEncoder(weights=tmp_path / "other.safetensors")


def test_one_hot_baseline():
    names = [c.display_name for c in get_taxonomy()]
    enc = OneHotEncoder(names)
    e = enc.encode(["liver", "Spleen"])
    assert e.shape == (2, 512) and e[0, 5] == 1 and e[1, 0] == 1 and e.sum() == 2
    with pytest.raises(ValueError, match="cannot name new classes"):
        enc.encode(["spinal cord"])


def test_official_embedding_file_reaches_the_head_unchanged(tmp_path):
    """The shipped CLIP embeddings, stored as a checkpoint's label embeddings, drive the head bit-exactly."""
    clip = np.load(require_shared("reference/fixture/clip_txt_encoding_32x512.npy"))
    expected = np.load(require_shared("reference/fixture/expected_unet.npz"))
    state = fixture_state_dict("unet")
    state["organ_embedding"] = torch.from_numpy(clip)
    meta = CheckpointMetadata(model=ModelConfig(backbone="unet"), classes=get_taxonomy())
    ckpt = load_checkpoint(save_checkpoint(tmp_path / "u.safetensors", state, meta))
    model = ckpt.build_model()
    assert np.array_equal(model.organ_embedding.numpy(), clip)
    with torch.no_grad():
        task = torch.relu(model.text_to_vision(model.organ_embedding)).numpy()
    np.testing.assert_allclose(task, expected["inter_task_encoding"], atol=2e-5, rtol=0)


def test_add_classes_by_name_keeps_old_outputs(clip_weights, tmp_path):
    _, path = clip_weights
    torch.manual_seed(1)
    config = ModelConfig.small("unet")
    model = UniversalModel(config).eval()
    model.organ_embedding.copy_(torch.from_numpy(np.load(require_shared("reference/fixture/clip_txt_encoding_32x512.npy"))))
    ckpt = Checkpoint(model.state_dict(), CheckpointMetadata(model=config, classes=get_taxonomy()))
    encoder = ClipTextEncoder(weights=path)
    extended = ckpt.add_classes(["Spinal Cord", "Sternum"], encoder)
    assert len(extended.metadata.classes) == 34 and extended.metadata.model.num_classes == 34
    assert extended.metadata.classes.resolve("spinal cord")[0].index == 33
    np.testing.assert_array_equal(extended.label_embeddings[32:].numpy(), encoder.encode(["Spinal Cord", "Sternum"]))
    saved = save_checkpoint(tmp_path / "ext.safetensors", extended.state_dict, extended.metadata)
    new_model = load_checkpoint(saved).build_model()
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        old = model(x)
        new = new_model(x)
    assert new.shape[1] == 34
    assert torch.equal(new[:, :32], old)
    with pytest.raises(ValueError, match="Already in the checkpoint's class table: liver"):
        ckpt.add_classes(["liver"], encoder)
