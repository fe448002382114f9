"""``universalseg batch``: resumable corpus segmentation, shards, a failing case, kill and resume, quality
signals and the review queue. Real demo model, real files, small phantoms (48^3 voxels)."""
from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from UniversalSegLib.batch.inputs import collect_cases
from UniversalSegLib.batch.quality import conflicting_pairs, measure_case, paired_organs
from UniversalSegLib.batch.queue import build_queue
from UniversalSegLib.batch.run import BatchOptions, run_batch
from UniversalSegLib.batch.state import CaseRecord, corpus_rows, shard_of
from UniversalSegLib.batch.worker import WorkerSettings
from UniversalSegLib.cli import main
from UniversalSegLib.demo import demo_checkpoint_path
from UniversalSegLib.io.atomic import TEMP_PREFIX
from UniversalSegLib.io.writers import nifti_image
from UniversalSegLib.phantom import generate_phantom
from UniversalSegLib.taxonomy import get_taxonomy

MODEL = str(demo_checkpoint_path())


def write_phantom(path: Path, seed: int) -> Path:
    phantom = generate_phantom(seed, shape=(48, 48, 48), spacing=(6.4, 6.4, 6.4))
    nib.save(nifti_image(phantom.image, phantom.affine, is_label=False), str(path))
    return path


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "ct"
    folder.mkdir()
    for seed in range(4):
        write_phantom(folder / f"case{seed}.nii.gz", seed)
    (folder / "broken.nii.gz").write_bytes(b"this is not a NIfTI file")
    (folder / "notes.txt").write_text("ignored: not a CT file")
    return folder


def options(out: Path, classes=None, cross_check=None, **kwargs) -> BatchOptions:
    segmentation = WorkerSettings(MODEL, classes=classes, device="cpu", threads=1, runtime="torch",
                                  cross_check=cross_check)
    return BatchOptions(str(out), segmentation, progress=False, expected_volumes="phantom", **kwargs)


def database(out: Path, name: str = "batch.sqlite") -> dict[str, dict]:
    with sqlite3.connect(out / name) as connection:
        rows = connection.execute("SELECT case_id, status, runs, finished, error FROM cases").fetchall()
    return {r[0]: {"status": r[1], "runs": r[2], "finished": r[3], "error": r[4]} for r in rows}


def check_case_outputs(out: Path, case: str) -> None:
    """Every output of a finished case is there, whole, and there once."""
    folder = out / case
    names = sorted(p.name for p in folder.iterdir() if not p.name.startswith(TEMP_PREFIX))
    assert names == sorted([f"{case}.seg.nrrd", f"{case}_labels.labels.csv", f"{case}_labels.labels.json",
                            f"{case}_labels.nii.gz", f"{case}_probabilities.npz", f"{case}_quality.json",
                            f"{case}_summary.json", f"{case}_thumbnails.npz"])
    labels = np.asarray(nib.load(str(folder / f"{case}_labels.nii.gz")).dataobj)
    assert labels.shape == (48, 48, 48) and labels.max() > 0
    with np.load(folder / f"{case}_probabilities.npz") as data:
        assert data["probabilities"].dtype == np.uint8
        assert data["probabilities"].shape[0] == len(data["class_indices"]) == 14
    assert json.loads((folder / f"{case}_quality.json").read_text())["classes"]["liver"]["volume_ml"] > 0


def test_batch_records_failures_skips_finished_and_redoes_changes(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["batch", str(corpus), "-o", str(out), "--model", MODEL, "--device", "cpu", "--threads", "1",
                 "--runtime", "torch", "--quiet", "--expected-volumes", "phantom"])
    printed = capsys.readouterr().out
    assert code == 7  # finished, with a failed case
    assert "5 cases: 4 done, 1 failed" in printed and "failed broken:" in printed
    state = database(out)
    assert state["broken"]["status"] == "failed" and "not a readable NIfTI" in state["broken"]["error"]
    for case in ("case0", "case1", "case2", "case3"):
        assert state[case]["status"] == "done" and state[case]["runs"] == 1
        check_case_outputs(out, case)
    with open(out / "review_queue.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 * 14 and {r["case"] for r in rows} == {"case0", "case1", "case2", "case3"}
    priorities = [float(r["priority"]) for r in rows]
    assert priorities == sorted(priorities, reverse=True) and rows[0]["reasons"].startswith(rows[0]["class"] + ":")
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "broken" in page and "http" not in page

    # Same command again: nothing to do; the failure stays recorded (not retried).
    again = run_batch([str(corpus)], options(out))
    assert (again.ran, again.skipped, len(again.failed)) == (0, 5, 1)
    assert database(out)["case0"]["finished"] == state["case0"]["finished"]
    # A changed input is re-done, and only it; --retry-failed retries the failure.
    write_phantom(corpus / "case1.nii.gz", 99)
    changed = run_batch([str(corpus)], options(out, retry_failed=True))
    assert changed.ran == 2 and database(out)["case1"]["runs"] == 2 and database(out)["broken"]["runs"] == 2
    # Changed options (other classes, a cross-check model) re-do every case, the failed one included.
    fewer = run_batch([str(corpus)], options(out, classes="liver, spleen", cross_check=MODEL))
    assert fewer.ran == 5 and fewer.done == 4
    with np.load(out / "case2" / "case2_probabilities.npz") as data:
        assert list(data["class_keys"]) == ["spleen", "liver"]
    quality = json.loads((out / "case2" / "case2_quality.json").read_text())["classes"]
    assert quality["liver"]["cross_check_dice"] == 1.0  # the same model twice agrees with itself


def test_kill_the_driver_and_resume_loses_and_duplicates_nothing(tmp_path):
    inputs = tmp_path / "ct"
    inputs.mkdir()
    for seed in range(6):
        write_phantom(inputs / f"case{seed}.nii.gz", seed)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "UniversalSegLib.cli", "batch", str(inputs), "-o", str(out), "--model", MODEL,
               "--device", "cpu", "--threads", "1", "--runtime", "torch", "--quiet", "--expected-volumes", "phantom"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if (out / "batch.sqlite").exists():
                try:
                    done = [c for c, r in database(out).items() if r["status"] == "done"]
                except sqlite3.OperationalError:
                    done = []
                if len(done) >= 2:
                    break
            assert process.poll() is None, "the batch ended before it could be killed"
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    before = database(out)
    finished_before = {c: r["finished"] for c, r in before.items() if r["status"] == "done"}
    assert 2 <= len(finished_before) < 6

    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    after = database(out)
    assert sorted(after) == [f"case{n}" for n in range(6)]
    for case, record in after.items():
        assert record["status"] == "done"
        check_case_outputs(out, case)
        if case in finished_before:  # finished before the kill: not done again
            assert record["finished"] == finished_before[case] and record["runs"] == 1
        else:  # at most the one case in progress when killed ran twice
            assert record["runs"] == before.get(case, {"runs": 0})["runs"] + 1


def test_shards_split_the_corpus_and_merge_into_one_view(tmp_path):
    inputs = tmp_path / "ct"
    inputs.mkdir()
    ids = [f"patient-{n}" for n in range(5)]
    listing = tmp_path / "cases.csv"
    with open(listing, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "case_id"])
        for n, case in enumerate(ids):
            writer.writerow([f"ct/scan{n}.nii.gz", case])
            write_phantom(inputs / f"scan{n}.nii.gz", n)
    assert [c.case_id for c in collect_cases([str(listing)])] == ids
    out = tmp_path / "out"
    for k in (1, 2):
        summary = run_batch([str(listing)], options(out, shard=(k, 2)))
        assert summary.queue is None  # shards leave the queue to the merge
        mine = set(database(out, f"batch-shard-{k}-of-2.sqlite"))
        assert mine == {c for c in ids if shard_of(c, 2) == k}
    assert {r.case_id for r in corpus_rows(out)} == set(ids)
    assert main(["batch-merge", str(out), "--expected-volumes", "phantom"]) == 0
    assert set(database(out)) == set(ids) and all(r["status"] == "done" for r in database(out).values())
    assert (out / "review_queue.csv").is_file() and (out / "report.html").is_file()
    # The merged database is the corpus view: an unsharded run finds everything done.
    assert run_batch([str(listing)], options(out)).ran == 0


def test_quality_signals_and_queue_reasons():
    taxonomy = get_taxonomy()
    classes = [taxonomy.by_key(k) for k in ("liver", "liver_tumor", "stomach", "left_kidney", "right_kidney",
                                            "pancreas", "hepatic_vessel")]
    pairs = {frozenset((taxonomy[a].key, taxonomy[b].key)) for a, b in conflicting_pairs(classes)}
    assert {"liver", "stomach"} in pairs and {"liver_tumor", "stomach"} in pairs
    assert not any("hepatic_vessel" in p for p in pairs) and {"liver", "liver_tumor"} not in pairs
    assert [(a.key, b.key) for a, b in paired_organs(classes)] == [("left_kidney", "right_kidney")]

    shape = (20, 20, 20)
    prob = {c.index: np.zeros(shape, np.uint8) for c in classes}
    liver, stomach = taxonomy.by_key("liver").index, taxonomy.by_key("stomach").index
    prob[liver][2:8, 2:8, 5:10] = 250
    prob[liver][12:16, 12:16, 5:10] = 150  # a second, hesitant piece
    prob[stomach][6:10, 2:8, 5:10] = 240  # overlaps the liver on two slices
    signals = measure_case(prob, classes, {c.index: 0.0 for c in classes})
    assert signals["liver"]["pieces"] == 2 and signals["liver"]["largest_share"] == pytest.approx(180 / 260, abs=1e-3)
    assert signals["liver"]["uncertain_share"] == pytest.approx(80 / 260, abs=1e-3)
    assert signals["stomach"]["overlaps"]["liver"] == pytest.approx(0.5)
    assert signals["liver"]["cut_by_fov"] is False

    def record(case, volumes, extra=None):
        s = {k: {"volume_ml": v, "uncertain_share": 0.05, "pieces": 1 if v else 0, "largest_share": 1.0 if v else None,
                 "cut_by_fov": False} for k, v in volumes.items()}
        for key, values in (extra or {}).items():
            s[key].update(values)
        return CaseRecord(case, "x", "f", "m", "{}", "done", signals=s, outputs={})

    normal = {"liver": 1000.0, "left_kidney": 105.0, "right_kidney": 100.0, "pancreas": 40.0, "spleen": 160.0}
    records = [record(f"ok{n}", {k: v * (1 + 0.02 * n) for k, v in normal.items()}) for n in range(6)]
    records.append(record("bad", dict(normal, pancreas=0.0, left_kidney=30.0, liver=2600.0),
                          {"liver": {"pieces": 3, "largest_share": 0.5}}))
    queue = build_queue(records, "phantom")
    worst = {(e.case, e.key): e for e in queue}
    assert queue[0].case == "bad"
    assert "not found although" in " ".join(worst["bad", "pancreas"].reasons)
    assert "asymmetry" in " ".join(worst["bad", "left_kidney"].reasons)
    liver_reasons = " ".join(worst["bad", "liver"].reasons)
    assert "3 pieces" in liver_reasons and "above the expected" in liver_reasons and "robust SDs above" in liver_reasons
    assert all(e.priority == 0 for e in queue if e.case.startswith("ok"))


def test_training_reads_a_batch_folders_exported_corrections(tmp_path):
    from universalseg_training.assembly import load_case
    from universalseg_training.spec import DatasetSpecError, load_dataset_spec

    from UniversalSegLib.batch.corrections import correction_paths, exported_corrections
    from UniversalSegLib.batch.state import BatchState
    from UniversalSegLib.io.training_case import write_training_case

    out = tmp_path / "batch"
    out.mkdir()
    spec_file = tmp_path / "corrected.yaml"
    spec_file.write_text("name: corrected\nbatch: batch\n")
    with pytest.raises(DatasetSpecError, match="not a batch folder"):
        load_dataset_spec(spec_file)
    BatchState(out / "batch.sqlite").close()
    with pytest.raises(DatasetSpecError, match="no case exported"):
        load_dataset_spec(spec_file)
    phantom = generate_phantom(3, shape=(32, 32, 32), spacing=(9.6, 9.6, 9.6))
    liver = get_taxonomy().by_key("liver").index
    for case in ("p-1", "p-2"):  # exported after review; p-3 was segmented but not reviewed yet
        write_training_case(correction_paths(out, case)["json"].parent, case, phantom.volume,
                            {liver: phantom.masks[liver]}, [liver],
                            review={liver: "corrected"})
    (out / "p-3").mkdir()
    assert exported_corrections(out) == [correction_paths(out, c)["json"] for c in ("p-1", "p-2")]
    spec = load_dataset_spec(spec_file)
    assert [c.case_id for c in spec.cases] == ["p-1", "p-2"] and spec.is_case_format
    case = load_case(spec, spec.cases[1])
    assert case.annotated == (liver,)
    np.testing.assert_array_equal(case.class_mask(liver), phantom.masks[liver])
