#!/usr/bin/env python3
"""GPU check: fixture fidelity in float32 on CUDA, and end-to-end time of a full CT on the GPU.

What it checks (one NVIDIA GPU, under 5 minutes):

1. Fidelity: for both backbones (Swin UNETR, U-Net), the deterministic fixture weights and the fixture
   input (``Testing/conftest.py``) run through the model on the GPU in real float32 (TF32 off), and the
   logits are compared with the official expected outputs (``../shared/reference/fixture/expected_*.npz``)
   at the same places as ``Testing/test_model_fidelity.py``: 4096 points x 32 classes, and the liver
   channel at stride 4 and 4x4x4-average-pooled. PASS when the largest absolute difference is below the
   test's tolerance (2e-4). The same under bfloat16 autocast is reported for information (no pass/fail).
2. Speed: ``benchmarks/benchmark_modes.run_mode`` on the shared ``example_ct.nii.gz`` with the Swin UNETR
   fixture weights, all 32 classes, modes ``default`` and ``fast``, precisions ``bfloat16`` and
   ``float32``, on ``cuda``: seconds, peak RSS and peak GPU memory per stage. Each precision gets one
   warm-up run first (CUDA context, cuDNN autotuning); the runs after it are reported. The target line
   compares the default mode's total with 10 s, without and with the model-load stage.
3. Writes everything as JSON to ``$OUT/gpu_check.json`` (or ``./gpu_check.json`` when OUT is not set).

Exit status: 0 when float32 fidelity passes for both backbones; 1 when it fails (or cannot be checked:
shared fixture files or pytest missing); 2 when CUDA is unavailable. Timing problems are reported only.

    python benchmarks/gpu_check.py                    # everything
    python benchmarks/gpu_check.py --skip-timing      # fidelity only (a few seconds)

The shared folder is ``$UNIVERSALSEG_SHARED`` or ``<repo>/../shared``, as for the tests and benchmarks.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import traceback
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
SHARED = Path(os.environ.get("UNIVERSALSEG_SHARED", REPO.parent / "shared"))
# The package, the test helpers (conftest, test_model_fidelity) and the sibling benchmarks, as plain imports.
for _path in (REPO, REPO / "Testing", BENCHMARKS):
    sys.path.insert(0, str(_path))

TARGET_SECONDS = 10.0
TIMING_MODES = ("default", "fast")
TIMING_PRECISIONS = ("bfloat16", "float32")
STAGES = ("read", "load_model", "preprocess", "inference", "postprocess", "invert", "write")


# --------------------------------------------------------------------------------------------------------
# Part 1: fixture fidelity
# --------------------------------------------------------------------------------------------------------

def _missing_fixture_files(backbones) -> list[str]:
    """Shared files the fidelity check reads; checked up front because conftest's helpers call pytest.skip."""
    names = ["make_weights.py", "clip_txt_encoding_32x512.npy"]
    for b in backbones:
        names += [f"keys_{b}.json", f"expected_{b}.npz"]
    folder = SHARED / "reference" / "fixture"
    return [str(folder / n) for n in names if not (folder / n).exists()]


def _fixture_model(backbone: str, device):
    """The official-size model holding the deterministic fixture weights (conftest's builder)."""
    from conftest import fixture_state_dict
    from UniversalSegLib.model import ModelConfig, UniversalModel

    model = UniversalModel(ModelConfig(backbone=backbone))
    model.load_state_dict(fixture_state_dict(backbone), strict=True)
    return model.to(device).eval()


def _differences(logits, expected) -> dict:
    """Largest |ours - official| at the places the fidelity test compares (logits: (32, 96, 96, 96) on CPU)."""
    import numpy as np

    p = expected["points"].astype(np.int64)
    at_points = logits[:, p[:, 0], p[:, 1], p[:, 2]].T.numpy()
    liver = logits[5].numpy()  # class 6 (liver) is channel 5
    pooled = liver.reshape(24, 4, 24, 4, 24, 4).mean(axis=(1, 3, 5))
    diffs = {
        "points_4096x32": float(np.abs(at_points - expected["logits_at_points"]).max()),
        "liver_stride4": float(np.abs(liver[::4, ::4, ::4] - expected["liver_logits_stride4"]).max()),
        "liver_avgpool4": float(np.abs(pooled - expected["liver_logits_avgpool4"]).max()),
    }
    return {"max_abs_diff": max(diffs.values()), "per_comparison": diffs,
            # The official run thresholds the same way almost everywhere (sign flips only near 0).
            "sign_agreement_points": float(np.mean((at_points > 0) == (expected["logits_at_points"] > 0)))}


def _forward(model, x, device, precision: str):
    """All 32 logits of one 96^3 window, as float32 on the CPU."""
    import torch

    from UniversalSegLib.device import autocast

    with torch.no_grad(), autocast(device, precision):
        logits = model(x)[0].float()
    torch.cuda.synchronize()
    return logits.cpu()


def check_fidelity(device) -> dict:
    """Float32 (pass/fail) and bfloat16 (informational) fixture comparison for both backbones."""
    import numpy as np
    import torch

    from conftest import fixture_input
    from test_model_fidelity import ATOL, BACKBONES

    # Real float32: TF32 matmuls/convolutions round inputs to 10 mantissa bits (~1e-3 relative), which
    # alone would exceed 2e-4. Autotuning is irrelevant here and stays off.
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    results: dict = {"tolerance": ATOL, "tf32": False, "backbones": {}}
    try:
        x = fixture_input().to(device)
        for backbone in BACKBONES:
            expected = dict(np.load(SHARED / "reference" / "fixture" / f"expected_{backbone}.npz"))
            model = _fixture_model(backbone, device)
            fp32 = _differences(_forward(model, x, device, "float32"), expected)
            fp32["passed"] = fp32["max_abs_diff"] < ATOL
            entry = {"float32": fp32}
            try:
                entry["bfloat16_autocast"] = _differences(_forward(model, x, device, "bfloat16"), expected)
            except Exception as err:  # e.g. a GPU without bf16: informational only
                entry["bfloat16_autocast"] = {"error": f"{type(err).__name__}: {err}"}
            results["backbones"][backbone] = entry
            del model
            torch.cuda.empty_cache()
            bf16 = entry["bfloat16_autocast"]
            bf16_text = f"{bf16['max_abs_diff']:.3g}" if "max_abs_diff" in bf16 else bf16["error"]
            print(f"fidelity {backbone:<9}  float32 max |delta logit| {fp32['max_abs_diff']:.3g} "
                  f"(tolerance {ATOL:g}): {'PASS' if fp32['passed'] else 'FAIL'}   "
                  f"bfloat16 autocast (info) {bf16_text}", flush=True)
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = saved
    results["passed"] = all(e["float32"]["passed"] for e in results["backbones"].values())
    return results


# --------------------------------------------------------------------------------------------------------
# Part 2: end-to-end timing of a full CT
# --------------------------------------------------------------------------------------------------------

def _mode_args(input_path: str, precision: str, threads: int | None) -> argparse.Namespace:
    """The fields benchmark_modes.run_mode reads."""
    return argparse.Namespace(input=input_path, device="cuda", threads=threads, precision=precision, classes="all",
                              runtime="torch")  # OpenVINO is a CPU runtime


def time_full_ct(input_path: str, threads: int | None) -> list[dict]:
    """Per precision: one warm-up run, then each mode once; returns run_mode's records (warm-ups dropped)."""
    import torch

    from benchmark_cpu import _fixture_checkpoint
    from benchmark_modes import run_mode

    torch.backends.cudnn.benchmark = True  # fixed 96^3 windows: let cuDNN pick its fastest kernels
    records = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model_path = str(_fixture_checkpoint("swinunetr", Path(tmp)))
            for precision in TIMING_PRECISIONS:
                args = _mode_args(input_path, precision, threads)
                torch.cuda.synchronize()
                warm, _ = run_mode(TIMING_MODES[0], args, model_path)  # autotune for this dtype; not reported
                print(f"warm-up {precision}: {warm['total_seconds']} s", flush=True)
                for mode in TIMING_MODES:
                    torch.cuda.synchronize()
                    record, _ = run_mode(mode, args, model_path)  # run_mode synchronizes at every stage edge
                    torch.cuda.synchronize()
                    record["seconds_without_load"] = round(record["total_seconds"] - record["stages"]["load_model"]["seconds"], 2)
                    records.append(record)
                    torch.cuda.empty_cache()
    finally:
        torch.backends.cudnn.benchmark = False
    return records


def print_timing_table(records: list[dict]) -> None:
    print(f"\n{'mode':<8} {'precision':<9} {'windows':>7} {'total s':>7} {'w/o load':>8} {'RSS MB':>7} "
          f"{'GPU MB':>7}   per stage: seconds")
    for r in records:
        per = ", ".join(f"{s} {r['stages'][s]['seconds']}" for s in STAGES if s in r["stages"])
        print(f"{r['mode']:<8} {r['precision']:<9} {r['windows']:>7} {r['total_seconds']:>7} "
              f"{r['seconds_without_load']:>8} {r['peak_rss_mb']:>7.0f} {r.get('peak_gpu_mb', 0):>7.0f}   {per}")


def target_lines(records: list[dict]) -> tuple[list[str], dict]:
    """The 10 s target on the default mode's total, for each precision, without and with model load."""
    lines, summary = [], {}
    for r in records:
        if r["mode"] != "default":
            continue
        for label, seconds in (("excluding model load", r["seconds_without_load"]),
                               ("including model load", r["total_seconds"])):
            met = seconds < TARGET_SECONDS
            summary[f"{r['precision']}, {label}"] = {"seconds": seconds, "met": met}
            lines.append(f"TARGET full 32-class example CT < {TARGET_SECONDS:g} s: {'MET' if met else 'NOT MET'} "
                         f"({seconds:.1f} s)   [default mode, {r['precision']}, {label}]")
    return lines, summary


# --------------------------------------------------------------------------------------------------------

def environment() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "shared": str(SHARED), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_json(report: dict) -> Path:
    path = Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else Path("gpu_check.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {path}")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=str(SHARED / "data/totalsegmentator/example_ct.nii.gz"),
                        help="CT to time (default: the shared example_ct.nii.gz)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for the CPU stages (default: PyTorch's, all cores)")
    parser.add_argument("--skip-timing", action="store_true", help="fidelity only")
    args = parser.parse_args()

    import torch

    report: dict = {"environment": environment()}
    if not torch.cuda.is_available():
        report["error"] = "CUDA unavailable"
        print("ERROR: CUDA is not available (no NVIDIA GPU or driver visible, or a CPU-only PyTorch build); "
              "this check needs a GPU.", file=sys.stderr)
        write_json(report)
        return 2
    device = torch.device("cuda")
    print(f"GPU: {report['environment']['gpu']}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)

    missing = _missing_fixture_files(("swinunetr", "unet"))
    try:
        import pytest  # noqa: F401  (conftest imports it)
    except ImportError:
        missing.append("python package pytest (Testing/conftest.py imports it): pip install pytest")
    if missing:
        report["fidelity"] = {"passed": False, "error": "cannot check", "missing": missing}
        print("FAIL: float32 fidelity cannot be checked; missing:\n  " + "\n  ".join(missing)
              + "\n(set UNIVERSALSEG_SHARED to the shared folder)", file=sys.stderr)
    else:
        try:
            report["fidelity"] = check_fidelity(device)
        except Exception:  # e.g. out of memory: counts as a failure, but timing and the JSON still follow
            report["fidelity"] = {"passed": False, "error": traceback.format_exc()}
            print("FAIL: float32 fidelity check raised:\n" + report["fidelity"]["error"], file=sys.stderr)

    target: list[str] = []
    if not args.skip_timing:
        try:
            records = time_full_ct(args.input, args.threads)
            report["timing"] = records
            print_timing_table(records)
            target, report["target"] = target_lines(records)
        except Exception:  # informational part: report and carry on to the JSON and the exit status
            report["timing_error"] = traceback.format_exc()
            print("timing failed (not counted in the exit status):\n" + report["timing_error"], file=sys.stderr)

    passed = report["fidelity"]["passed"]
    report["passed"] = passed
    print(f"\nfloat32 fixture fidelity on the GPU: {'PASS' if passed else 'FAIL'}")
    write_json(report)
    if target:  # last, so the verdict is the final output
        print("\n" + "\n".join(target))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
