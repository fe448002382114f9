#!/usr/bin/env python3
"""Reference vs default vs fast mode: time and peak memory per stage, windows, and label agreement.

Part 1 (speed and memory): on the same CT and weights, each mode runs read -> model load -> preprocess ->
inference -> post-process -> invert -> write (.seg.nrrd + NIfTI label map). Each mode runs in a fresh
child process by default, so its peak RSS is its own (in one process, memory a previous mode freed but the
allocator kept would be charged to the next); ``--same-process`` runs them all in this process. Per stage it
prints seconds and peak RSS (kernel high-water mark, reset at each stage); on CUDA also the peak GPU
memory. The agreement of each mode with the reference mode is printed per class (Dice, voxel agreement).
Default weights: the fidelity-fixture weights (speed does not depend on weight values; their labels are
meaningless, so part 2 measures agreement with trained weights).

Part 2 (agreement with trained weights): the packaged demo model on ``--phantoms`` fresh phantoms; per
class Dice of each mode against the reference mode (and against the phantom's truth).

    python benchmarks/benchmark_modes.py                          # Swin UNETR, 32 classes, example_ct, CPU
    python benchmarks/benchmark_modes.py --classes "liver, pancreas" --modes default,fast
    python benchmarks/benchmark_modes.py --device cuda --precision bfloat16
    python benchmarks/benchmark_modes.py --skip-speed --phantoms 4   # agreement only
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("UNIVERSALSEG_SHARED", REPO.parent / "shared"))
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark_cpu import _fixture_checkpoint, _reset_peak, _rss_peak_mb  # noqa: E402

from UniversalSegLib.helpers import dice_score as dice  # noqa: E402
from UniversalSegLib.settings import PRECISIONS  # noqa: E402


class StageClock:
    """Seconds and peak RSS (and peak CUDA memory) per named stage."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.stages: dict[str, dict] = {}
        self._name: str | None = None
        self._t = 0.0

    def begin(self, name: str) -> None:
        self.end()
        _reset_peak()
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._name, self._t = name, time.perf_counter()

    def end(self) -> None:
        if self._name is None:
            return
        record = {"seconds": None, "peak_rss_mb": None}
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            record["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        record["seconds"] = round(time.perf_counter() - self._t, 2)
        record["peak_rss_mb"] = round(_rss_peak_mb(), 1)
        self.stages[self._name] = record
        self._name = None


def run_mode(mode: str, args, model_path: str, keep_masks: bool = True) -> tuple[dict, dict]:
    """One mode end to end; returns (record, masks on the input grid, or {} without ``keep_masks``)."""
    import numpy as np

    from UniversalSegLib.api import plan_outputs, write_result
    from UniversalSegLib.io import read_volume
    from UniversalSegLib.memory import tune_allocator
    from UniversalSegLib.pipeline import Segmenter

    tune_allocator()  # as the universalseg command and the workers do
    clock = StageClock(cuda=args.device.startswith("cuda"))
    t_all = time.perf_counter()
    clock.begin("read")
    volume = read_volume(args.input)
    clock.begin("load_model")
    segmenter = Segmenter(model_path, device=args.device, threads=args.threads, mode=mode, precision=args.precision,
                          runtime=getattr(args, "runtime", None))
    classes = segmenter.resolve(args.classes)

    def progress(stage: str, fraction: float) -> None:
        if stage != clock._name:
            clock.begin(stage)

    result = segmenter.segment(volume, classes, progress=progress)
    clock.begin("write")
    with tempfile.TemporaryDirectory() as out:
        write_result(result, plan_outputs(args.input, out, getattr(args, "formats", "nifti,seg.nrrd")))
    clock.end()
    masks = {i: np.array(result.masks[i]) for i in result.masks} if keep_masks else {}
    record = {
        "mode": mode, "runtime": segmenter.runtime, "backbone": segmenter.checkpoint.metadata.model.backbone,
        "classes": len(classes),
        "device": str(segmenter.device), "precision": args.precision, "threads": segmenter.threads,
        "overlap": segmenter.overlap, "placement": segmenter.mode.placement,
        "input_shape": list(volume.shape), "preprocessed_shape": list(result.preprocessed.shape),
        "windows": result.windows, "total_seconds": round(time.perf_counter() - t_all, 1),
        "peak_rss_mb": max(s["peak_rss_mb"] for s in clock.stages.values()), "stages": clock.stages,
    }
    if clock.cuda:
        record["peak_gpu_mb"] = max(s.get("peak_gpu_mb", 0) for s in clock.stages.values())
    del result, segmenter
    gc.collect()
    return record, masks


def agreement(masks: dict, reference: dict) -> dict:
    import numpy as np

    out = {}
    for index, ref in reference.items():
        mine = masks[index]
        out[index] = {"dice": round(dice(mine, ref), 5),
                      "voxel_agreement": round(float(np.count_nonzero(mine == ref)) / ref.size, 6)}
    return out


def run_mode_in_child(mode: str, args, model_path: str, folder: Path) -> tuple[dict, dict]:
    """:func:`run_mode` in a fresh Python process; masks come back through an .npz file."""
    import subprocess

    import numpy as np

    masks_file = folder / f"masks_{mode}.npz"
    code = (
        "import argparse, json, sys; sys.path.insert(0, %r)\n"
        "import numpy as np\n"
        "from benchmark_modes import run_mode\n"
        "args = argparse.Namespace(**json.loads(%r))\n"
        "record, masks = run_mode(%r, args, %r)\n"
        "np.savez_compressed(%r, **{str(k): v for k, v in masks.items()})\n"
        "print(json.dumps(record))\n"
    ) % (str(Path(__file__).resolve().parent), json.dumps(vars(args)), mode, model_path, str(masks_file))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"mode {mode} failed:\n{done.stderr[-4000:]}")
    with np.load(masks_file) as data:
        masks = {int(k): data[k] for k in data.files}
    return json.loads(done.stdout.strip().splitlines()[-1]), masks


def speed_part(args) -> list[dict]:
    from UniversalSegLib.checkpoints import load_checkpoint

    records, masks = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.model or str(_fixture_checkpoint(args.backbone, Path(tmp)))
        names = {c.index: c.key for c in load_checkpoint(model_path).metadata.classes}
        for mode in args.modes.split(","):
            if args.same_process:
                record, masks[mode] = run_mode(mode, args, model_path)
            else:
                record, masks[mode] = run_mode_in_child(mode, args, model_path, Path(tmp))
            records.append(record)
            print(json.dumps(record), flush=True)
    if "reference" in masks:
        for record in records:
            if record["mode"] != "reference":
                per_class = agreement(masks[record["mode"]], masks["reference"])
                record["agreement"] = {names[i]: v for i, v in per_class.items()}
                record["min_dice"] = min(v["dice"] for v in per_class.values())
    return records


def agreement_part(args) -> dict:
    """Per-class Dice of each mode against the reference mode, demo model on fresh phantoms."""
    import numpy as np

    from UniversalSegLib.checkpoints import load_checkpoint
    from UniversalSegLib.demo import demo_checkpoint_path
    from UniversalSegLib.phantom import generate_phantom
    from UniversalSegLib.pipeline import Segmenter

    checkpoint = load_checkpoint(demo_checkpoint_path())
    settings = checkpoint.metadata.provenance.get("phantom", {})
    modes = args.modes.split(",")
    segmenters = {m: Segmenter(checkpoint, device=args.device, threads=args.threads, mode=m, runtime=args.runtime)
                  for m in set(modes) | {"reference"}}
    names = {c.index: c.key for c in checkpoint.metadata.classes}
    dices: dict[str, dict[int, list]] = {m: {} for m in modes}
    truth_dice: dict[str, dict[int, list]] = {m: {} for m in modes}
    windows = {}
    for seed in range(2000, 2000 + args.phantoms):
        phantom = generate_phantom(seed, shape=tuple(settings.get("shape", (96,) * 3)),
                                   spacing=tuple(settings.get("spacing", (3.2,) * 3)),
                                   orientation=settings.get("orientation", "LPS"))
        results = {m: s.segment(phantom.volume) for m, s in segmenters.items()}
        ref = results["reference"]
        for m in modes:
            windows[m] = results[m].windows
            for index in ref.masks:
                dices[m].setdefault(index, []).append(dice(results[m].masks[index], ref.masks[index]))
                if index in phantom.masks:
                    truth_dice[m].setdefault(index, []).append(dice(results[m].masks[index], phantom.masks[index]))
    summary = {}
    for m in modes:
        per_class = {names[i]: round(float(np.min(v)), 5) for i, v in dices[m].items()}
        summary[m] = {"windows_per_phantom": windows[m], "min_dice_vs_reference_per_class": per_class,
                      "min_over_classes": min(per_class.values()),
                      "mean_dice_vs_truth": round(float(np.mean([np.mean(v) for v in truth_dice[m].values()])), 4)}
    return summary


def print_table(records: list[dict]) -> None:
    stages = ["read", "load_model", "preprocess", "convert", "inference", "postprocess", "invert", "write"]
    print("\n| mode | windows | total s | peak RSS MB | " + " | ".join(stages) + " | min Dice vs reference |")
    print("|---|---|---|---|" + "---|" * len(stages) + "---|")
    for r in records:
        cells = []
        for s in stages:
            st = r["stages"].get(s)
            gpu = f", {st['peak_gpu_mb']:.0f} GPU" if st and "peak_gpu_mb" in st else ""
            cells.append(f"{st['seconds']} s / {st['peak_rss_mb']:.0f} MB{gpu}" if st else "")
        print(f"| {r['mode']} | {r['windows']} | {r['total_seconds']} | {r['peak_rss_mb']:.0f} | " + " | ".join(cells)
              + f" | {r.get('min_dice', '')} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=str(SHARED / "data/totalsegmentator/example_ct.nii.gz"))
    parser.add_argument("--backbone", default="swinunetr", choices=["swinunetr", "unet"])
    parser.add_argument("--model", help="checkpoint to use instead of the fixture weights")
    parser.add_argument("--classes", default="all")
    parser.add_argument("--modes", default="reference,default,fast")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="float32", choices=list(PRECISIONS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runtime", choices=["auto", "torch", "openvino"], default="torch",
                        help="window forward runtime for every mode (default torch; benchmark_runtimes.py compares)")
    parser.add_argument("--phantoms", type=int, default=3, help="phantoms for the trained-weights agreement (0: skip)")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--same-process", action="store_true", help="run every mode in this process")
    parser.add_argument("--output", help="append the JSON records to this file")
    args = parser.parse_args()
    if args.device == "cpu" and args.precision != "float32":
        parser.error("reduced precision is a GPU option")
    output = {}
    if not args.skip_speed:
        records = speed_part(args)
        print_table(records)
        output["speed"] = records
    if args.phantoms:
        output["agreement_demo_model"] = agreement_part(args)
        print(json.dumps(output["agreement_demo_model"], indent=1))
    if args.output:
        with open(args.output, "a") as f:
            f.write(json.dumps(output) + "\n")


if __name__ == "__main__":
    main()
