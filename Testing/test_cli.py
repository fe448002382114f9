"""The ``universalseg`` command on real data: outputs on the input grid, exit codes, bad input, no overwrite.

A small seeded model (5 mm, 32^3 windows) keeps every run to seconds; geometry and I/O do not depend on
the weights.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from conftest import REPO_ROOT, require_shared, small_checkpoint
from UniversalSegLib.cli import EXIT_CODES, main


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(small_checkpoint(tmp_path_factory.mktemp("model") / "small.safetensors"))


def run(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) if folder.exists() else []


def test_segment_nifti_writes_outputs_on_input_grid(model, tmp_path, capsys):
    ct = require_shared("data/totalsegmentator/example_ct.nii.gz")
    out = tmp_path / "out"
    code, stdout, stderr = run(["segment", ct, "-o", out, "--classes", "liver, spleen, kidneys", "--model", model,
                                "--device", "cpu", "--json"], capsys)
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert [c["name"] for c in summary["classes"]] == ["Spleen", "Right Kidney", "Left Kidney", "Liver"]
    assert _files(out) == ["example_ct.seg.nrrd", "example_ct_labels.labels.csv", "example_ct_labels.labels.json",
                           "example_ct_labels.nii.gz", "example_ct_summary.json"]
    source = nib.load(ct)
    labels = nib.load(out / "example_ct_labels.nii.gz")
    assert labels.shape == source.shape
    np.testing.assert_allclose(labels.affine, source.affine, atol=1e-6)
    values = np.asarray(labels.dataobj)
    for row in summary["classes"]:  # no overlaps among these classes: label counts equal class voxels
        assert int((values == row["index"]).sum()) == row["voxels"]
    import slicerio

    seg = slicerio.read_segmentation(str(out / "example_ct.seg.nrrd"))
    assert [s["name"] for s in seg["segments"]] == ["Spleen", "Right Kidney", "Left Kidney", "Liver"]
    assert json.loads((out / "example_ct_summary.json").read_text())["outputs"]["nifti"].endswith("example_ct_labels.nii.gz")


def test_existing_outputs_are_kept_unless_overwrite(model, tmp_path, capsys):
    ct = require_shared("data/totalsegmentator/example_ct_sm.nii.gz")
    out = tmp_path / "out"
    args = ["segment", ct, "-o", out, "--classes", "liver", "--model", model, "--device", "cpu", "--quiet"]
    assert run(args, capsys)[0] == 0
    before = {p: (out / p).read_bytes() for p in _files(out)}
    code, _, err = run(args, capsys)
    assert code == 5 and "exists" in err and "--overwrite" in err
    assert {p: (out / p).read_bytes() for p in _files(out)} == before
    assert run(args + ["--overwrite", "--format", "all"], capsys)[0] == 5  # dicom-seg needs DICOM input: refused first
    assert run(args + ["--overwrite", "--format", "nifti,masks,seg.nrrd"], capsys)[0] == 0
    assert "example_ct_sm_masks/liver.nii.gz" in _files(out)


def test_dicom_series_input_and_dicom_seg(model, tmp_path, capsys):
    pytest.importorskip("highdicom")
    folder = require_shared("data/dcmqi_ct3slice/dicom")
    out = tmp_path / "out"
    code, _, err = run(["segment", folder, "-o", out, "--classes", "liver", "--model", model, "--device", "cpu",
                        "--format", "nifti,dicom-seg", "--quiet"], capsys)
    assert code == 0, err
    reference = nib.load(require_shared("data/dcmqi_ct3slice/derived/ct_3slice.nii.gz"))
    labels = nib.load(out / "dicom_labels.nii.gz")
    assert labels.shape == reference.shape
    np.testing.assert_allclose(labels.affine, reference.affine, atol=1e-3)
    import pydicom

    seg = pydicom.dcmread(out / "dicom_seg.dcm")
    source = pydicom.dcmread(folder / "01.dcm")
    assert seg.Modality == "SEG" and seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID


def test_dicom_series_with_jpeg2000(model, tmp_path, capsys):
    folder = require_shared("data/totalsegmentator/example_ct_dicom")
    out = tmp_path / "out"
    code, _, err = run(["segment", folder, "-o", out, "--classes", "liver", "--model", model, "--device", "cpu",
                        "--quiet"], capsys)
    assert code == 0, err
    reference = nib.load(require_shared("data/totalsegmentator/derived/example_ct_dicom_as_nifti.nii.gz"))
    labels = nib.load(out / "example_ct_dicom_labels.nii.gz")
    assert labels.shape == reference.shape
    np.testing.assert_allclose(labels.affine, reference.affine, atol=1e-3)


def test_mr_is_refused_without_output(model, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(["segment", require_shared("data/totalsegmentator/example_mr_sm.nii.gz"), "-o", out,
                        "--model", model, "--device", "cpu"], capsys)
    assert code == 3 and "do not look like a CT" in err and "--force" in err
    assert _files(out) == []


def _write(path, array, affine=np.eye(4)):
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def _bad_inputs(tmp_path):
    ct = require_shared("data/totalsegmentator/example_ct_sm.nii.gz")
    data = ct.read_bytes()
    cases = {}
    cases["truncated"] = (tmp_path / "truncated.nii.gz", "truncated", 3)
    cases["truncated"][0].write_bytes(data[: len(data) // 3])
    cases["empty"] = (tmp_path / "empty.nii.gz", "empty", 3)
    cases["empty"][0].write_bytes(b"")
    cases["2d"] = (_write(tmp_path / "flat.nii.gz", np.zeros((64, 64), np.int16)), "2-D", 3)
    cases["4d"] = (_write(tmp_path / "time.nii.gz", np.zeros((16, 16, 16, 3), np.int16)), "4 dimensions", 3)
    nan = np.asarray(nib.load(ct).dataobj, dtype=np.float32).copy()
    nan[10:12, 10:12, 5] = np.nan
    cases["nan"] = (_write(tmp_path / "nan.nii.gz", nan, nib.load(ct).affine), "NaN", 3)
    cases["spacing"] = (_write(tmp_path / "spacing.nii.gz", np.asarray(nib.load(ct).dataobj),
                               np.diag([3.0, 3.0, 300.0, 1.0])), "spacing", 3)
    (tmp_path / "nodicom").mkdir()
    (tmp_path / "nodicom" / "notes.txt").write_text("nothing here")
    cases["no-dicom"] = (tmp_path / "nodicom", "DICOM", 3)
    cases["missing"] = (tmp_path / "does-not-exist.nii.gz", "not found", 3)
    return cases


@pytest.mark.parametrize("case", ["truncated", "empty", "2d", "4d", "nan", "spacing", "no-dicom", "missing"])
def test_bad_input_gives_specific_message_and_exit_code(case, model, tmp_path, capsys):
    path, words, expected = _bad_inputs(tmp_path)[case]
    out = tmp_path / "out"
    code, _, err = run(["segment", path, "-o", out, "--model", model, "--device", "cpu", "--quiet"], capsys)
    assert code == expected, err
    assert words.lower() in err.lower(), err
    assert "Traceback" not in err and err.startswith("universalseg: error:")
    assert _files(out) == []


def test_unknown_class_and_format_are_usage_errors(model, tmp_path, capsys):
    ct = require_shared("data/totalsegmentator/example_ct_sm.nii.gz")
    code, _, err = run(["segment", ct, "-o", tmp_path / "o", "--classes", "liver, kidny stone", "--model", model], capsys)
    assert code == 2 and 'Unknown class "kidny stone"' in err
    code, _, err = run(["segment", ct, "-o", tmp_path / "o", "--format", "png", "--model", model], capsys)
    assert code == 2 and "Unknown output format 'png'" in err
    assert _files(tmp_path / "o") == []


def test_unwritable_output_folder(model, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder is expected")
    code, _, err = run(["segment", require_shared("data/totalsegmentator/example_ct_sm.nii.gz"), "-o",
                        blocker / "out", "--model", model, "--quiet"], capsys)
    assert code == 5, err
    assert blocker.read_text() == "a file where a folder is expected"


def test_missing_model_explains_download(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("UNIVERSALSEG_HOME", str(tmp_path / "home"))
    code, _, err = run(["segment", require_shared("data/totalsegmentator/example_ct_sm.nii.gz"), "-o", tmp_path / "o",
                        "--classes", "liver"], capsys)
    assert code == 4 and "universalseg models download swinunetr" in err
    code, out, _ = run(["models", "list"], capsys)
    assert code == 0 and "not installed" in out and "CC BY-NC-ND 4.0" in out


def test_classes_command(capsys):
    code, out, _ = run(["classes"], capsys)
    assert code == 0 and "Inferior Vena Cava" in out and "IVC" in out
    code, out, _ = run(["classes", "renal tumor", "--json"], capsys)
    assert code == 0 and [c["display_name"] for c in json.loads(out)] == ["Kidney Tumor"]


def test_console_entry_point_help_lists_exit_codes():
    # The module runs as a program (the installed `universalseg` script calls the same main()).
    done = subprocess.run([sys.executable, "-m", "UniversalSegLib.cli", "--help"], capture_output=True, text=True,
                          cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert done.returncode == 0
    for code in EXIT_CODES:
        assert f"{code:>3}  " in done.stdout


def test_mode_option_selects_the_inference_mode(model, tmp_path, capsys):
    ct = require_shared("data/totalsegmentator/example_ct.nii.gz")
    results = {}
    for mode in ("fast", "default"):
        code, stdout, stderr = run(["segment", ct, "-o", tmp_path / mode, "--classes", "liver", "--model", model,
                                    "--device", "cpu", "--json", "--quiet", "--mode", mode], capsys)
        assert code == 0, stderr
        results[mode] = json.loads(stdout)
    assert results["fast"]["windows"] < results["default"]["windows"]
    code, _, stderr = run(["segment", ct, "-o", tmp_path / "both", "--classes", "liver", "--model", model,
                           "--mode", "fast", "--reference-mode"], capsys)
    assert code == 2 and "contradicts" in stderr and not (tmp_path / "both").exists()
