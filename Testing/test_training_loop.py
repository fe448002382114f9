"""The training loop: export to a library checkpoint, kill-and-resume, 2-process gloo DDP, fine-tuning to a new
class that keeps the old outputs. Tiny models and crops so that each run takes seconds on a CPU."""
from __future__ import annotations

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from UniversalSegLib.checkpoints import load_checkpoint
from UniversalSegLib.phantom import generate_phantom
from UniversalSegLib.pipeline import Segmenter
from UniversalSegLib.preprocess import PreprocessingParameters
from universalseg_training.cli import main as cli_main
from universalseg_training.config import ConfigError, TrainConfig
from universalseg_training.export import build_model_setup
from universalseg_training.phantoms import write_phantom_datasets
from universalseg_training.sampling import SamplingConfig
from universalseg_training.trainer import latest_checkpoint, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def phantom_data(tmp_path_factory):
    """Two small partially labelled phantom datasets (liver+tumour; spleen+kidneys+gallbladder...)."""
    folder = tmp_path_factory.mktemp("phantoms")
    specs = write_phantom_datasets(folder, ["lits", "btcv"], cases=2, base_seed=5, shape=(48, 48, 48),
                                   spacing=(6.4, 6.4, 6.4))
    return folder, [str(p) for p in specs]


def _config(phantom_data, output: Path, **overrides) -> TrainConfig:
    folder, specs = phantom_data
    base = TrainConfig(
        datasets=tuple(specs), output_dir=str(output), cache_dir=str(folder / "cache"), backbone="unet",
        model_size="tiny", embedding="onehot", classes=("liver", "liver tumor", "spleen", "kidneys"),
        steps=4, batch_size=2, lr=3e-3, warmup_steps=1, preprocessing=PreprocessingParameters(spacing=(6.4, 6.4, 6.4)),
        sampling=SamplingConfig(roi_size=(32, 32, 32)), checkpoint_every=2, log_every=1, threads=1, progress=False,
        tensorboard=False)
    return replace(base, **overrides)


def _subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _write_config(config: TrainConfig, path: Path) -> Path:
    path.write_text(json.dumps(config.to_dict()))
    return path


def test_config_validation():
    with pytest.raises(ConfigError, match="datasets"):
        TrainConfig()
    with pytest.raises(ConfigError, match="loss must be one of"):
        TrainConfig(datasets=("a.json",), loss="partial")
    with pytest.raises(ConfigError, match="unknown training settings: learning_rate"):
        TrainConfig.from_dict({"datasets": ["a.json"], "learning_rate": 1})
    with pytest.raises(ConfigError, match="init_checkpoint"):
        TrainConfig(datasets=("a.json",), finetune="new_embeddings")


def test_training_writes_logs_checkpoints_and_a_library_checkpoint(phantom_data, tmp_path, capsys):
    lits = phantom_data[1][0]
    result = train(_config(phantom_data, tmp_path / "run", validation=(lits,), validate_every=2))
    assert result.steps == 4 and result.resumed_from == 0 and np.isfinite(result.last_loss)
    # Validation at steps 2 and 4: Dice and NSD of the annotated classes, tumour detection counts.
    run = tmp_path / "run"
    validation = (run / "validation.csv").read_text().splitlines()
    assert validation[0].split(",")[:3] == ["step", "cases", "mean_dice"] and len(validation) == 3
    for column in ("dice_liver", "nsd_liver", "sensitivity_liver_tumor", "specificity_liver_tumor"):
        assert column in validation[0]
    assert result.validation["cases"] == 2
    # Per-case table: a pair whose truth is empty has no Dice (not a free 1.0 or a 0.0), as officially.
    with open(run / "validation" / "step_00000004_cases.csv") as handle:
        records = list(csv.DictReader(handle))
    assert {(r["case_id"], r["name"]) for r in records} == {
        (c, n) for c in ("lits_0000", "lits_0001") for n in ("Liver", "Liver Tumor")}
    for r in records:
        assert (r["dice"] == "") == (r["truth_voxels"] == "0")
    scored = {int(r["class"]) for r in records if r["dice"]}
    assert set(result.validation["dice"]) == scored and 6 in scored
    counts = result.validation["detection"][27]
    assert counts["tp"] + counts["fn"] + counts["tn"] + counts["fp"] == 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 4 and "Liver" in summary["dice"] and summary["datasets"]["lits"]["cases"] == 2
    assert len(summary["per_case"]) == 4 and summary["best"]["step"] in (2, 4)
    assert result.best_checkpoint == run / "best.safetensors" and result.best_checkpoint.is_file()
    rows = (run / "train_log.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss,bce,dice") and len(rows) == 5
    # lr column: the rate each logged step used (warm-up 1 step to 3e-3, then cosine over 3 steps).
    lrs = [float(r.split(",")[5]) for r in rows[1:]]
    np.testing.assert_allclose(lrs, [3e-3, 3e-3, 2.25e-3, 7.5e-4], rtol=1e-6)
    assert latest_checkpoint(run).name == "step_00000004.pt"
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*.pt")) == [
        "step_00000002.pt", "step_00000004.pt"]
    info = json.loads((run / "run_info.json").read_text())
    assert info["world_size"] == 1 and [d["name"] for d in info["datasets"]] == ["lits", "btcv"]
    assert info["embedding"]["encoder"] == "one-hot" and info["datasets"][0]["crops"] == "lesions"
    log = (run / "train.log").read_text()
    assert re.search(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\S* label embeddings: one-hot", log, re.M)
    assert "step 4  loss" in log and "validation at step 4" in log
    assert (run / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    checkpoint = load_checkpoint(result.final_checkpoint)
    meta = checkpoint.metadata
    assert [c.display_name for c in meta.classes] == ["Spleen", "Right Kidney", "Left Kidney", "Liver", "Liver Tumor"]
    assert meta.preprocessing.spacing == (6.4, 6.4, 6.4) and meta.inference.roi_size == (32, 32, 32)
    assert meta.embedding["encoder"] == "one-hot" and meta.provenance["steps"] == 4
    # `universalseg-train evaluate` scores it with the library's post-processing, class names in the output.
    code = cli_main(["evaluate", str(result.final_checkpoint), lits, "--cache-dir", str(tmp_path / "eval_cache"),
                     "--cases-csv", str(tmp_path / "cases.csv")])
    printed = json.loads(capsys.readouterr().out)
    assert code == 0 and printed["cases"] == 2 and "Liver" in printed["dice"] and "lits" in printed["datasets"]
    assert (tmp_path / "cases.csv").read_text().startswith("dataset,case_id,class,name")
    # The library runs it end to end on a fresh phantom.
    phantom = generate_phantom(99, shape=(48, 48, 48), spacing=(6.4, 6.4, 6.4))
    segmentation = Segmenter(checkpoint, device="cpu", threads=1).segment(phantom.volume, classes="liver, spleen")
    assert set(segmentation.masks) == {6, 1} and segmentation.masks[6].shape == phantom.shape


def test_kill_and_resume_equals_an_uninterrupted_run(phantom_data, tmp_path):
    steps = 10
    reference = train(_config(phantom_data, tmp_path / "reference", steps=steps))

    config = _config(phantom_data, tmp_path / "killed", steps=steps)
    command = [sys.executable, "-m", "universalseg_training.cli", "train", str(_write_config(config, tmp_path / "cfg.json"))]
    process = subprocess.Popen(command, env=_subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            pointer = tmp_path / "killed" / "checkpoints" / "latest.json"
            if pointer.is_file() and json.loads(pointer.read_text())["step"] >= 2:
                break
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)  # no clean-up of any kind
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    assert not (tmp_path / "killed" / "final.safetensors").exists()

    resumed = train(config)  # same output_dir: resumes from the latest checkpoint
    assert 2 <= resumed.resumed_from < steps and resumed.steps == steps
    a = load_checkpoint(reference.final_checkpoint).state_dict
    b = load_checkpoint(resumed.final_checkpoint).state_dict
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=f"weights differ at {key}")
    loss_a = [r.split(",")[1] for r in (tmp_path / "reference" / "train_log.csv").read_text().splitlines()[1:]]
    loss_b = [r.split(",")[1] for r in (tmp_path / "killed" / "train_log.csv").read_text().splitlines()[1:]]
    assert len(loss_b) == steps  # rows logged after the last checkpoint by the killed run were dropped
    np.testing.assert_allclose(np.array(loss_b, float), np.array(loss_a, float), rtol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_ddp(phantom_data, tmp_path):
    lits = phantom_data[1][0]
    config = _config(phantom_data, tmp_path / "ddp", steps=3, checkpoint_every=3, batch_size=1,
                     validation=(lits,), validate_every=3)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), "-m", "universalseg_training.cli", "train",
               str(_write_config(config, tmp_path / "cfg.json"))]
    done = subprocess.run(command, env=_subprocess_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((tmp_path / "ddp" / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["backend"] == "gloo"
    # The run checked that both processes ended with identical weights before rank 0 exported them.
    checkpoint = load_checkpoint(tmp_path / "ddp" / "final.safetensors")
    initial = build_model_setup("unet", "tiny", config.classes, "onehot").model.state_dict()
    changed = [k for k in initial if not torch.equal(initial[k], checkpoint.state_dict[k])]
    assert len(changed) > 10  # the weights were trained
    rows = (tmp_path / "ddp" / "train_log.csv").read_text().splitlines()
    assert len(rows) == 4
    # Both ranks ended bit-identical (checksum of every parameter), recorded with the run.
    assert len(info["weights_checksum"]) == 64 and info["crops_per_step"] == 2
    # Validation was shared: each rank scored one of the two cases; rank 0 wrote the gathered tables.
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["cases"] == 2 and {r["case_id"] for r in summary["per_case"]} == {"lits_0000", "lits_0001"}


def test_finetune_new_class_keeps_the_old_outputs(phantom_data, tmp_path):
    base = train(_config(phantom_data, tmp_path / "base", steps=2))
    tuned = train(_config(phantom_data, tmp_path / "tuned", steps=3, init_checkpoint=str(base.final_checkpoint),
                          classes=("gallbladder",), finetune="new_embeddings", lr=0.05, warmup_steps=0))
    old, new = load_checkpoint(base.final_checkpoint), load_checkpoint(tuned.final_checkpoint)
    assert [c.display_name for c in new.metadata.classes] == [
        "Spleen", "Right Kidney", "Left Kidney", "Gallbladder", "Liver", "Liver Tumor"]
    assert new.metadata.classes.by_key("gallbladder").index == 4  # keeps its taxonomy index and terminology
    window = torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = old.build_model()(window)
        after = new.build_model()(window)
    old_channels = [new.metadata.channel_of(c) for c in old.metadata.classes]
    assert torch.equal(after[:, old_channels], before)  # bit-identical outputs for the old classes
    gallbladder = new.metadata.channel_of(new.metadata.classes.by_key("gallbladder"))
    assert new.metadata.embedding["fine_tuned_classes"] == ["Gallbladder"]
    for key in old.state_dict:
        if key != "organ_embedding":
            assert torch.equal(old.state_dict[key], new.state_dict[key])
    # The new class's embedding started as a small random vector (one-hot space) and was learnt.
    start = torch.randn(1, 512, generator=torch.Generator().manual_seed(len(old.metadata.classes)))[0] * 0.1
    learnt = new.state_dict["organ_embedding"][gallbladder]
    assert not torch.allclose(learnt, start, atol=1e-3)
