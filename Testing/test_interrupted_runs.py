"""Interrupted and failing writes: the outputs of one run are all-or-nothing, and messages match the disk.

Real ``universalseg`` processes (a small seeded model on a small real CT) are stopped with SIGTERM,
SIGINT and SIGKILL while they write. To hit the write stage at a known moment, the tests set the
documented test hook ``UNIVERSALSEG_TEST_PAUSE_AT`` (``staged``: every output written into the hidden
run folder, nothing switched in yet; ``switching``: the first output switched in): the process then
writes the word into ``UNIVERSALSEG_TEST_PAUSE_FILE`` and waits, and the test sends its signal.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT, require_shared, small_checkpoint
from UniversalSegLib.errors import OutputWriteError, WriteInterrupted
from UniversalSegLib.io.atomic import TEMP_PREFIX, OutputTransaction, remove_stale_temporaries


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(small_checkpoint(tmp_path_factory.mktemp("model") / "small.safetensors"))


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes), temporaries included."""
    if not folder.exists():
        return {}
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if p.name.startswith(TEMP_PREFIX)] if folder.exists() else []


def _command(model, out, classes, *extra):
    ct = require_shared("data/totalsegmentator/example_ct_sm.nii.gz")
    return [sys.executable, "-m", "UniversalSegLib.cli", "segment", str(ct), "-o", str(out), "--classes", classes,
            "--model", model, "--device", "cpu", "--quiet", "--threads", "1", *extra]


def _env(**extra):
    return dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONDONTWRITEBYTECODE="1", **extra)


def _run(command, **kwargs):
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300, **kwargs)


def _run_and_signal(command, pause_at, signum, tmp_path):
    """Start ``command``, wait until it pauses at ``pause_at``, send ``signum``; returns (code, stderr)."""
    marker = tmp_path / f"paused-{pause_at}-{signum}"
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
                               env=_env(UNIVERSALSEG_TEST_PAUSE_AT=pause_at, UNIVERSALSEG_TEST_PAUSE_FILE=str(marker),
                                        UNIVERSALSEG_TEST_PAUSE_SECONDS="120"))
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "the run never reached the write stage"
        time.sleep(0.05)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    return process.returncode, stderr


@pytest.fixture(scope="module")
def old_set(model, tmp_path_factory):
    """The files of a finished run (classes: liver) that the interrupted runs (liver, spleen) replace."""
    folder = tmp_path_factory.mktemp("old") / "out"
    done = _run(_command(model, folder, "liver", "--format", "nifti,seg.nrrd,masks"), env=_env())
    assert done.returncode == 0, done.stderr
    return _snapshot(folder)


NEW_COMMAND = ("liver, spleen", "--format", "nifti,seg.nrrd,masks", "--overwrite")


def _fresh_copy(snapshot: dict[str, bytes], folder: Path) -> Path:
    for name, data in snapshot.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def _is_complete_new_set(folder: Path) -> bool:
    """The outputs of the "liver, spleen" run, every one of them, and nothing else."""
    files = _snapshot(folder)
    expected = {"example_ct_sm.seg.nrrd", "example_ct_sm_labels.labels.csv", "example_ct_sm_labels.labels.json",
                "example_ct_sm_labels.nii.gz", "example_ct_sm_summary.json", "example_ct_sm_masks/liver.nii.gz",
                "example_ct_sm_masks/spleen.nii.gz"}
    if set(files) != expected:
        return False
    summary = json.loads(files["example_ct_sm_summary.json"])
    labels = json.loads(files["example_ct_sm_labels.labels.json"])
    return ([c["name"] for c in summary["classes"]] == ["Spleen", "Liver"]
            and [c["name"] for c in labels["labels"]] == ["Spleen", "Liver"])


# ------------------------------------------------------------------------------------------ real processes


def test_sigterm_before_the_switch_keeps_the_old_set_and_says_so(model, old_set, tmp_path):
    out = _fresh_copy(old_set, tmp_path / "out")
    code, stderr = _run_and_signal(_command(model, out, *NEW_COMMAND), "staged", signal.SIGTERM, tmp_path)
    assert code == 130, stderr
    assert "nothing was written" in stderr and "Traceback" not in stderr
    assert _snapshot(out) == old_set  # byte for byte, and no temporaries


def test_sigint_during_the_switch_completes_it_and_says_so(model, old_set, tmp_path):
    out = _fresh_copy(old_set, tmp_path / "out")
    code, stderr = _run_and_signal(_command(model, out, *NEW_COMMAND), "switching", signal.SIGINT, tmp_path)
    assert code == 130, stderr
    assert "new outputs are complete" in stderr and "nothing was written" not in stderr
    assert _is_complete_new_set(out) and not _temporaries(out)


def test_sigkill_during_the_switch_is_rolled_back_by_the_next_run(model, old_set, tmp_path):
    out = _fresh_copy(old_set, tmp_path / "out")
    code, _ = _run_and_signal(_command(model, out, *NEW_COMMAND), "switching", signal.SIGKILL, tmp_path)
    assert code == -signal.SIGKILL
    assert _temporaries(out) and _snapshot(out) != old_set  # a mixed set and the run folder are left behind
    # The next run into the folder first rolls the unfinished switch back (here a run that is then refused
    # because the outputs exist, before any model is loaded).
    done = _run(_command(model, out, "liver"), env=_env())
    assert done.returncode == 5 and "exists" in done.stderr, done.stderr
    assert _snapshot(out) == old_set


def test_disk_full_is_an_output_error_and_removes_the_folder_it_created(model, tmp_path):
    out = tmp_path / "new" / "out"

    def small_file_limit():  # files may not grow beyond 2 KB: the kernel answers EFBIG, like a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))

    done = subprocess.run(_command(model, out, "liver, spleen"), capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=300, env=_env(), preexec_fn=small_file_limit)
    assert done.returncode == 5, done.stderr
    assert "full" in done.stderr and "Nothing was written" in done.stderr
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------------------ the transaction


def test_failure_while_staging_leaves_nothing_and_removes_created_folders(tmp_path):
    out = tmp_path / "a" / "b"
    with pytest.raises(ZeroDivisionError):
        with OutputTransaction(out) as run:
            run.stage(out / "x.txt").write_text("new")
            1 / 0
    assert not (tmp_path / "a").exists()


def test_failing_rename_during_the_switch_restores_the_old_set(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (out / name).write_text(f"old {name}")
    (out / "d").mkdir()
    (out / "d" / "m.txt").write_text("old mask")
    before = _snapshot(out)
    real_rename = os.rename
    calls = []

    def failing_rename(source, target):
        calls.append(target)
        if len(calls) == 6:  # third file: its old copy was moved aside, the new one fails to move in
            raise OSError(28, "No space left on device")
        return real_rename(source, target)

    with pytest.raises(OSError):
        with OutputTransaction(out, overwrite=True) as run:
            for name in ("a.txt", "b.txt", "c.txt"):
                run.stage(out / name).write_text(f"new {name}")
            run.stage(out / "d").mkdir()
            monkeypatch.setattr(os, "rename", failing_rename)
            run.commit()
    monkeypatch.setattr(os, "rename", real_rename)
    assert _snapshot(out) == before


def test_enospc_while_staging_becomes_an_output_error(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputWriteError, match="disk or quota is full") as error:
        with OutputTransaction(out) as run:
            run.stage(out / "x.txt").write_text("partial")
            raise OSError(28, "No space left on device")
    assert error.value.exit_code == 5 and not out.exists()


def test_keyboard_interrupt_while_staging_says_nothing_was_written(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.txt").write_text("old")
    with pytest.raises(WriteInterrupted, match="nothing was written"):
        with OutputTransaction(out, overwrite=True) as run:
            run.stage(out / "x.txt").write_text("new")
            raise KeyboardInterrupt
    assert _snapshot(out) == {"x.txt": b"old"}


def test_a_live_run_folder_is_never_taken_by_another_writer(tmp_path):
    out = tmp_path / "out"
    with OutputTransaction(out) as run:
        run.stage(out / "x.txt").write_text("new")
        assert remove_stale_temporaries(out) == []  # its lock is held
        assert _temporaries(out)
        run.commit()
    assert _snapshot(out) == {"x.txt": b"new"}
    assert np.all([not name.startswith(TEMP_PREFIX) for name in os.listdir(out)])


def test_too_little_free_space_is_refused_before_the_work(tmp_path):
    from UniversalSegLib.errors import OutputNotWritableError
    from UniversalSegLib.io.atomic import check_free_space

    with pytest.raises(OutputNotWritableError, match="free disk space"):
        check_free_space(tmp_path / "not" / "yet", 2**62)
    check_free_space(tmp_path, 1)
    assert not (tmp_path / "not").exists()
