"""Setting a run up: the bounded case cache, label embeddings (never a silent one-hot), pretrained backbones,
dotted overrides, k-fold splits, and the errors a researcher gets instead of tracebacks (missing label
file, unlisted raw value, resuming after changing classes or datasets, a dataset annotating none of the
model's classes, warm-up longer than the run, float16 without loss scaling)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import require_shared
from UniversalSegLib.preprocess import PreprocessingParameters
from universalseg_training.assembly import AssemblyError
from universalseg_training.config import ConfigError, TrainConfig, apply_overrides
from universalseg_training.embeddings import EmbeddingUnavailable, label_embeddings
from universalseg_training.export import build_model_setup, select_classes
from universalseg_training.phantoms import write_phantom_datasets
from universalseg_training.preprocessing import CaseCache
from universalseg_training.pretrained import PretrainedWeightsError, load_pretrained_backbone
from universalseg_training.sampling import SamplingConfig
from universalseg_training.spec import DatasetSpecError, load_dataset_spec
from universalseg_training.splits import kfold_splits, write_fold_specs
from universalseg_training.state import ResumeError, load_training_state
from universalseg_training.trainer import latest_checkpoint, train

GRID = (6.4, 6.4, 6.4)


@pytest.fixture(scope="module")
def phantom_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantoms")
    specs = write_phantom_datasets(folder, ["lits", "btcv"], cases=2, base_seed=5, shape=(48, 48, 48), spacing=GRID)
    return folder, [str(p) for p in specs]


def _config(phantom_data, output: Path, **overrides) -> TrainConfig:
    folder, specs = phantom_data
    base = TrainConfig(
        datasets=tuple(specs), output_dir=str(output), cache_dir=str(folder / "cache"), model_size="tiny",
        embedding="onehot", classes=("liver", "liver tumor", "spleen"), steps=2, batch_size=1, lr=3e-3,
        warmup_steps=1, preprocessing=PreprocessingParameters(spacing=GRID), sampling=SamplingConfig(roi_size=(32,) * 3),
        checkpoint_every=1, log_every=1, threads=1, progress=False, tensorboard=False, plot=False)
    return replace(base, **overrides)


# ------------------------------------------------------------------------------------------------ cache
def test_case_cache_keeps_memory_within_its_budget(phantom_data, tmp_path):
    spec = load_dataset_spec(phantom_data[1][1])  # btcv, 2 cases
    cache = CaseCache([spec], tmp_path / "cache", PreprocessingParameters(spacing=GRID), memory_budget_mb=0)
    cache.prepare()
    first = cache[0]
    assert cache.memory_bytes == 0 and cache[0] is not first  # budget 0: every access reads the file
    size = sum(v.numel() * v.element_size() for v in first.values() if isinstance(v, torch.Tensor))
    one_case = CaseCache([spec], tmp_path / "cache", PreprocessingParameters(spacing=GRID),
                         memory_budget_mb=1.5 * size / 2**20)
    a = one_case[0]
    assert one_case[0] is a and one_case.memory_bytes == size  # kept
    one_case[1]  # does not fit next to case 0: the least recently used case is dropped
    assert one_case.memory_bytes <= 1.5 * size and one_case[0] is not a
    torch.testing.assert_close(one_case[0]["image"], a["image"])


# ------------------------------------------------------------------------------------------------ errors
def test_a_missing_label_file_is_named_before_any_preprocessing(phantom_data, tmp_path):
    spec_path = tmp_path / "broken.json"
    data = json.loads(Path(phantom_data[1][0]).read_text())
    data["root"] = str(Path(phantom_data[1][0]).parent)
    data["labels"] = "labelsTr/missing_{name}"
    spec_path.write_text(json.dumps(data))
    with pytest.raises(DatasetSpecError) as error:
        CaseCache([load_dataset_spec(spec_path)], tmp_path / "cache")
    message = str(error.value)
    assert "label map of case 'lits_0000' does not exist" in message and "missing_lits_0000.nii.gz" in message
    assert str(spec_path) in message and "labelsTr/{name}" in message and "\n" not in message


def test_an_unlisted_raw_value_is_one_paragraph_not_a_monai_traceback(phantom_data, tmp_path):
    spec_path = tmp_path / "btcv_without_duodenum.json"
    data = json.loads(Path(phantom_data[1][1]).read_text())
    data.update(root=str(Path(phantom_data[1][1]).parent), classes={k: v for k, v in data["classes"].items() if k != "14"})
    spec_path.write_text(json.dumps(data))
    cache = CaseCache([load_dataset_spec(spec_path)], tmp_path / "cache")
    with pytest.raises(AssemblyError) as error:
        cache.prepare()
    message = str(error.value)
    assert "label values [14] are not listed in 'classes'" in message and str(spec_path) in message
    assert "unlisted: drop" in message and error.value.__cause__ is None and "\n" not in message


def test_configuration_errors_name_the_setting():
    with pytest.raises(ConfigError, match=r"warmup_steps \(200\) is larger than steps \(100\).*warmup_steps = 5"):
        TrainConfig(datasets=("a.json",), steps=100, warmup_steps=200)
    with pytest.raises(ConfigError, match="embedding_file"):
        TrainConfig(datasets=("a.json",), embedding="file")
    with pytest.raises(ConfigError, match="preprocessing: Unknown preprocessing parameter"):
        TrainConfig.from_dict({"datasets": ["a.json"], "preprocessing": {"spacings": [1, 1, 1]}})


def test_a_dataset_annotating_none_of_the_classes_is_refused(phantom_data, tmp_path):
    with pytest.raises(ConfigError, match="dataset 'lits' .* annotates Liver, Liver Tumor, none of which is a class "
                                          "of the model \\(Spleen\\)"):
        train(_config(phantom_data, tmp_path / "run", classes=("spleen",)))


def test_resume_refuses_changed_classes_and_datasets(phantom_data, tmp_path):
    run = tmp_path / "run"
    train(_config(phantom_data, run, steps=1, warmup_steps=0))
    with pytest.raises(ResumeError, match="classes .*Spleen.* restore 'classes'.*new 'output_dir'"):
        train(_config(phantom_data, run, steps=2, classes=("liver", "spleen")))
    with pytest.raises(ResumeError, match="datasets \\['lits', 'btcv'\\].*now lists \\['btcv'\\]"):
        train(_config(phantom_data, run, steps=2, datasets=(phantom_data[1][1],), classes=("liver", "liver tumor", "spleen")))


def test_float16_trains_with_a_gradient_scaler(phantom_data, tmp_path):
    result = train(_config(phantom_data, tmp_path / "fp16", precision="float16", device="cpu", grad_clip=1.0, steps=1,
                           warmup_steps=0))
    assert np.isfinite(result.last_loss)
    state = load_training_state(latest_checkpoint(tmp_path / "fp16"))
    assert state["scaler"]["scale"] > 1  # loss scaling was active and is resumed with the run
    info = json.loads((tmp_path / "fp16" / "run_info.json").read_text())
    assert info["precision"] == "float16"


# ------------------------------------------------------------------------------------------------ embeddings
def test_auto_embedding_never_falls_back_to_one_hot(monkeypatch):
    monkeypatch.setattr("universalseg_training.embeddings.find_clip_weights", lambda: None)
    with pytest.raises(EmbeddingUnavailable, match="embedding_file .*txt_encoding.pth.*clip_weights.*embedding: onehot"):
        label_embeddings("auto", list(select_classes(["liver"])))


@pytest.mark.parametrize("suffix", [".pth", ".npy"])
def test_the_official_txt_encoding_file_gives_the_embeddings(phantom_data, tmp_path, suffix):
    official = np.load(require_shared("reference/fixture/clip_txt_encoding_32x512.npy"))
    path = tmp_path / f"txt_encoding{suffix}"
    if suffix == ".pth":  # as the official clip_embedding.py saves it: a float16 tensor, 32 x 512
        torch.save(torch.from_numpy(official).half(), path)
        expected = torch.from_numpy(official).half().float()
    else:
        np.save(path, official)
        expected = torch.from_numpy(official)
    setup = build_model_setup("unet", "tiny", ["liver tumor", "spleen"], "auto", embedding_file=str(path))
    torch.testing.assert_close(setup.model.organ_embedding, expected[[0, 26]])  # classes 1 and 27, in index order
    assert setup.embedding_info["source"] == "file" and setup.embedding_info["file"] == str(path)
    if suffix == ".pth":  # recorded where a researcher looks
        train(_config(phantom_data, tmp_path / "run", embedding="file", embedding_file=str(path), steps=1,
                      warmup_steps=0))
        info = json.loads((tmp_path / "run" / "run_info.json").read_text())
        assert info["embedding"]["file"] == str(path) and len(info["embedding"]["sha256"]) == 64
        assert f"label embeddings: clip-vit-b32-openai ({path})" in (tmp_path / "run" / "train.log").read_text()


# ------------------------------------------------------------------------------------------------ pretrained backbones
def test_models_genesis_unet_weights_initialise_the_backbone(tmp_path):
    source = build_model_setup("unet", "tiny", ["liver"], "onehot").model.backbone
    genesis = {f"module.{k}": torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v
               for k, v in source.state_dict().items()}
    genesis["module.out_tr.final_conv.weight"] = torch.randn(1, 32, 1, 1, 1)  # the pretext task's output layer
    path = tmp_path / "Genesis_Chest_CT.pt"
    torch.save({"state_dict": genesis}, path)
    setup = build_model_setup("unet", "tiny", ["liver"], "onehot", pretrained_backbone=str(path))
    loaded = setup.model.backbone.state_dict()
    for key, value in genesis.items():
        if not key.startswith("module.out_tr"):
            assert torch.equal(loaded[key[len("module."):]], value), key
    assert setup.pretrained["entries_loaded"] == len(genesis) - 1
    with pytest.raises(PretrainedWeightsError, match="not weights of the swinunetr backbone"):
        load_pretrained_backbone(build_model_setup("swinunetr", "small", ["liver"], "onehot").model, path, "swinunetr")


def test_self_supervised_swin_weights_initialise_the_backbone(tmp_path):
    model = build_model_setup("swinunetr", "small", ["liver"], "onehot").model
    ssl = {k: torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v
           for k, v in model.backbone.state_dict().items()}
    ssl["out.conv.conv.weight"] = torch.randn(14, 12, 1, 1, 1)  # MONAI SwinUNETR's segmentation head
    torch.save({"state_dict": ssl, "epoch": 5000}, tmp_path / "ssl.pt")
    info = load_pretrained_backbone(model, tmp_path / "ssl.pt", "swinunetr")
    assert info["entries_loaded"] == len(ssl) - 1
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, ssl[key]), key


# ------------------------------------------------------------------------------------------------ overrides, splits
def test_dotted_overrides_reach_nested_settings(phantom_data, tmp_path):
    config = _config(phantom_data, tmp_path / "run")
    data = apply_overrides(config.to_dict(), ["sampling.num_samples=3", "sampling.roi_size=[16,16,16]", "steps=7",
                                              "preprocessing.crop_margin=[1,1,1]"])
    changed = TrainConfig.from_dict(data)
    assert changed.sampling.num_samples == 3 and changed.sampling.roi_size == (16, 16, 16) and changed.steps == 7
    assert changed.preprocessing.crop_margin == (1, 1, 1) and changed.lr == config.lr
    with pytest.raises(ConfigError, match="sampling: unknown sampling setting 'num_sample'"):
        TrainConfig.from_dict(apply_overrides(config.to_dict(), ["sampling.num_sample=3"]))
    with pytest.raises(ConfigError, match="steps is not a group"):
        apply_overrides(config.to_dict(), ["steps.value=3"])


def test_kfold_splits_are_seeded_disjoint_and_complete(phantom_data, tmp_path):
    ids = [f"case_{i:03d}" for i in range(23)]
    folds = kfold_splits(ids, 5, seed=3)
    assert folds == kfold_splits(list(reversed(ids)), 5, seed=3) and folds != kfold_splits(ids, 5, seed=4)
    assert sorted(c for f in folds for c in f["val"]) == ids
    assert all(set(f["train"]) | set(f["val"]) == set(ids) and not set(f["train"]) & set(f["val"]) for f in folds)
    assert sorted(len(f["val"]) for f in folds) == [4, 4, 5, 5, 5]
    written = write_fold_specs([phantom_data[1][1]], 2, 1, tmp_path / "folds", seed=0)
    train_spec, val_spec = load_dataset_spec(written["datasets"][0]), load_dataset_spec(written["validation"][0])
    assert len(train_spec.cases) == len(val_spec.cases) == 1 and train_spec.cases[0].labels.is_file()
    assert train_spec.fingerprint() == val_spec.fingerprint() == load_dataset_spec(phantom_data[1][1]).fingerprint()
