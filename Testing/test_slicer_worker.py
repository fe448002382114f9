"""The inference worker process (UniversalSegLib.worker) as the Slicer module drives it: real processes,
the packaged demo model (a small U-Net Universal Model) and a real CT, on the CPU.

Checked: the worker's masks equal the in-process library's voxel for voxel; the geometry crosses the
process boundary exactly; the model stays loaded between runs (a second run, and a run with other
classes, load nothing: the load times are printed); a worker killed with SIGKILL mid-run gives a clear
message and the next request gets a fresh worker.
"""
from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np
import pytest

from conftest import REPO_ROOT, require_shared

pytest.importorskip("torch")
nib = pytest.importorskip("nibabel")

from UniversalSegLib.io.volume import Volume  # noqa: E402
from UniversalSegLib.worker import WorkerDied, WorkerProcess, read_result  # noqa: E402
from UniversalSegLib.worker.protocol import write_result  # noqa: E402

DEMO_MODEL = REPO_ROOT / "UniversalSegLib" / "data" / "demo" / "demo_model.safetensors"
CT = "data/totalsegmentator/example_ct.nii.gz"


@pytest.fixture(scope="module")
def ct() -> Volume:
    image = nib.load(require_shared(CT))
    return Volume(np.asarray(image.dataobj).astype(np.int16), image.affine.astype(np.float64), "example CT", "nifti")


class Run:
    """One segmentation request and its events, collected as the Slicer logic's listener would."""

    def __init__(self, worker: WorkerProcess, volume: Volume, classes=None, **fields):
        from UniversalSegLib.worker.protocol import write_volume

        self.worker, self.events, self.started = worker, [], time.monotonic()
        self.request_id = worker.new_request_id()
        name = write_volume(worker.folder, self.request_id, volume.array)
        worker.send(self.request_id, "segment", self.events.append, volume=name,
                    affine=volume.affine.tolist(), model=str(DEMO_MODEL), device="cpu", threads=1,
                    classes=classes, **fields)

    def wait(self, seconds=90.0, until=("result", "error", "cancelled", "died")):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.worker.poll()
            if self.events and self.events[-1]["event"] in until:
                self.seconds = time.monotonic() - self.started
                return self.events[-1]
            time.sleep(0.01)
        raise AssertionError(f"no answer in {seconds} s: {self.events[-3:]}")


def test_result_files_keep_masks_and_geometry_exactly(tmp_path):
    rng = np.random.default_rng(1)
    masks = {1: rng.random((17, 9, 23)) > 0.7, 6: np.zeros((17, 9, 23), bool)}
    masks[6][3:5, 2:3, 7:20] = True
    write_result(tmp_path / "r.npz", (17, 9, 23), masks)
    back = read_result(tmp_path / "r.npz")
    assert back.shape == (17, 9, 23) and set(back.masks) == {1, 6}
    assert all(np.array_equal(back.masks[i], masks[i]) for i in masks)
    import json

    affine = np.array([[-0.7031249999999999, 1e-17, 0.1, -187.3], [0, 0.70312, 0, 1 / 3], [0, 0, 2.5, -3e-9],
                       [0, 0, 0, 1]])
    assert np.array_equal(np.asarray(json.loads(json.dumps(affine.tolist()))), affine)  # bit-exact


def test_worker_masks_equal_the_library_and_the_model_stays_loaded(ct):
    from UniversalSegLib.pipeline import Segmenter

    worker = WorkerProcess()
    try:
        first = Run(worker, ct, keep_probabilities=True)
        answer = first.wait()
        assert answer["event"] == "result", answer
        assert answer["model_loaded"] and answer["model_loads"] == 1
        stages = [e["stage"] for e in first.events if e["event"] == "progress"]
        assert stages[0] == "load" and "inference" in stages and "postprocess" in stages
        result = read_result(worker.folder / answer["output"])
        assert result.probabilities is not None and result.preprocessed_shape is not None

        expected = Segmenter(str(DEMO_MODEL), device="cpu", threads=1).segment(ct)
        assert sorted(result.masks) == sorted(c.index for c in expected.classes)
        for index, mask in result.masks.items():
            assert np.array_equal(mask, expected.masks[index]), index
        assert any(mask.any() for mask in result.masks.values())
        by_index = {row["index"]: row for row in answer["statistics"]}
        for row in expected.statistics():
            assert by_index[row.index]["voxels"] == row.voxels

        second = Run(worker, ct, classes=answer["classes"][:3])
        again = second.wait()
        other = Run(worker, ct, classes=[answer["classes"][-1]])  # another class choice: same model
        changed = other.wait()
        for run in (again, changed):
            assert run["event"] == "result" and not run["model_loaded"] and run["model_loads"] == 1
            assert run["load_seconds"] < 0.05
        print(f"\nworker on {ct.shape} CT, demo model, 1 CPU thread: first run {first.seconds:.2f} s "
              f"(worker start + model load {answer['load_seconds']:.2f} s inside it), second run "
              f"{second.seconds:.2f} s (model load {again['load_seconds'] * 1000:.1f} ms), other classes "
              f"{other.seconds:.2f} s")
    finally:
        worker.stop()


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_a_killed_worker_gives_a_clear_message_and_the_next_request_a_fresh_one(ct):
    worker = WorkerProcess()
    try:
        run = Run(worker, ct)
        run.wait(until=("progress",))  # it is working on the request
        pid = worker.process.pid
        os.kill(pid, signal.SIGKILL)
        died = run.wait()
        assert died["event"] == "died" and isinstance(died["error"], WorkerDied)
        message = died["error"].user_message
        assert "SIGKILL" in message and "memory" in message and "next run starts a new worker" in message
        assert worker.process is None and worker.folder is None  # its files are gone too

        again = Run(worker, ct, classes=[1])
        assert again.wait()["event"] == "result" and worker.process.pid != pid
    finally:
        worker.stop()


def test_downloads_run_in_their_own_process_and_cancel_at_once(tmp_path, monkeypatch):
    """Download (and import) never run in Slicer's process: errors come back as the library's own, and
    Cancel stops the download process at once."""
    sys.path.insert(0, str(REPO_ROOT / "UniversalSeg"))
    from UniversalSegLib.errors import ModelNotAvailable
    from UniversalSegSlicer.jobs import JobState
    from UniversalSegSlicer.logic import SegmentationLogic

    monkeypatch.setenv("UNIVERSALSEG_HOME", str(tmp_path))  # the worker inherits it
    logic = SegmentationLogic(scene=None)
    try:
        job = logic.start_download("no-such-model")
        assert job.wait(60) and job.state is JobState.FAILED
        assert isinstance(job.error, ModelNotAvailable) and "Unknown model 'no-such-model'" in str(job.error)
        not_a_checkpoint = tmp_path / "x.pth"
        not_a_checkpoint.write_bytes(b"not a checkpoint")
        imported = logic.start_import(not_a_checkpoint)
        assert imported.wait(90) and imported.state is JobState.FAILED and "x.pth" in str(imported.error)

        job = logic.start_download("swinunetr")  # would reach for the internet: cancelled right away
        started = time.monotonic()
        job.cancel()
        assert job.state is JobState.CANCELLED and time.monotonic() - started < 1.0
        assert not logic.downloader.alive()
        assert not [p for p in (tmp_path / "models").rglob("*") if p.is_file() and p.suffix in (".pth", ".safetensors")]
    finally:
        logic.shutdown()
