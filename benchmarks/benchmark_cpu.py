#!/usr/bin/env python3
"""CPU baseline: per-stage time and peak RSS of ``universalseg segment`` on a real CT.

Each configuration runs in its own process, so peak memory is that run's alone. Stages: read, model load,
preprocess, inference (sliding window), post-process, invert (back to the input grid), write (.seg.nrrd +
NIfTI label map). Peak RSS per stage is read from the kernel's high-water mark (``VmHWM``), reset at the
start of each stage through ``/proc/self/clear_refs``.

Weights: ``--model`` (any checkpoint), or by default the deterministic fidelity-fixture weights built from
``../shared/reference/fixture/make_weights.py`` (speed does not depend on the weight values).

    python benchmarks/benchmark_cpu.py                       # both backbones, 32 classes and 2 classes
    python benchmarks/benchmark_cpu.py --backbones unet --classes "liver, pancreas"
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("UNIVERSALSEG_SHARED", REPO.parent / "shared"))


def _rss_peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _reset_peak() -> None:
    try:  # Linux >= 4.0: "5" resets the peak RSS (VmHWM) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _fixture_checkpoint(backbone: str, folder: Path) -> Path:
    import importlib.util

    import numpy as np
    import torch

    spec = importlib.util.spec_from_file_location("make_weights", SHARED / "reference/fixture/make_weights.py")
    mw = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mw)
    state, _ = mw.build(str(SHARED / f"reference/fixture/keys_{backbone}.json"))
    path = folder / f"fixture_{backbone}.pth"
    torch.save({"net": {"module." + k: torch.from_numpy(np.array(v)) for k, v in state.items()}}, path)
    return path


def run_one(args: argparse.Namespace) -> dict:
    """One configuration, in this process; prints and returns a JSON record."""
    sys.path.insert(0, str(REPO))
    from UniversalSegLib.api import plan_outputs, write_result
    from UniversalSegLib.io import read_volume
    from UniversalSegLib.memory import tune_allocator
    from UniversalSegLib.pipeline import Segmenter

    tune_allocator()  # as the universalseg command and the workers do
    stages: dict[str, dict] = {}
    current = {"name": None, "t": 0.0}

    def begin(name: str) -> None:
        end()
        _reset_peak()
        current.update(name=name, t=time.perf_counter())

    def end() -> None:
        if current["name"]:
            stages[current["name"]] = {"seconds": round(time.perf_counter() - current["t"], 2),
                                       "peak_rss_mb": round(_rss_peak_mb(), 1)}
            current["name"] = None

    t_all = time.perf_counter()
    begin("read")
    volume = read_volume(args.input)
    begin("load_model")
    segmenter = Segmenter(args.model, device="cpu", threads=args.threads)
    classes = segmenter.resolve(args.classes)

    def progress(stage: str, fraction: float) -> None:
        if stage != current["name"]:
            begin(stage)

    result = segmenter.segment(volume, classes, progress=progress)
    begin("write")
    with tempfile.TemporaryDirectory() as out:
        write_result(result, plan_outputs(args.input, out, "nifti,seg.nrrd"))
    end()
    record = {
        "backbone": segmenter.checkpoint.metadata.model.backbone, "classes": len(classes),
        "threads": segmenter.threads, "input": str(args.input), "input_shape": list(volume.shape),
        "preprocessed_shape": list(result.preprocessed.shape), "windows": result.windows,
        "total_seconds": round(time.perf_counter() - t_all, 1),
        "seconds_per_window": round(stages["inference"]["seconds"] / max(result.windows, 1), 2),
        "peak_rss_mb": round(max(s["peak_rss_mb"] for s in stages.values()), 1), "stages": stages,
    }
    print(json.dumps(record), flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=str(SHARED / "data/totalsegmentator/example_ct.nii.gz"))
    parser.add_argument("--backbones", default="swinunetr,unet")
    parser.add_argument("--classes", action="append", help='class sets to run (default: all, and "liver, pancreas")')
    parser.add_argument("--model", help="checkpoint to use instead of the fixture weights (one backbone)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", help="also append the JSON records to this file")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: run one config here
    args = parser.parse_args()
    if args.one:
        run_one(args)
        return

    class_sets = args.classes or ["all", "liver, pancreas"]
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        models = [args.model] if args.model else [str(_fixture_checkpoint(b, Path(tmp))) for b in args.backbones.split(",")]
        for model in models:
            for classes in class_sets:
                cmd = [sys.executable, __file__, "--one", "--input", args.input, "--model", model,
                       "--classes", classes, "--threads", str(args.threads)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"benchmark run failed ({model}, {classes}):\n{done.stderr}")
                record = json.loads(done.stdout.strip().splitlines()[-1])
                records.append(record)
                if args.output:
                    with open(args.output, "a") as f:
                        f.write(json.dumps(record) + "\n")
    print(f"\n{'backbone':<10} {'classes':>7} {'windows':>7} {'s/window':>8} {'total s':>8} {'peak RSS MB':>11}   per stage: s (peak MB)")
    for r in records:
        per = ", ".join(f"{k} {v['seconds']} ({v['peak_rss_mb']:.0f})" for k, v in r["stages"].items())
        print(f"{r['backbone']:<10} {r['classes']:>7} {r['windows']:>7} {r['seconds_per_window']:>8} "
              f"{r['total_seconds']:>8} {r['peak_rss_mb']:>11}   {per}")


if __name__ == "__main__":
    main()
