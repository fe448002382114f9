#!/usr/bin/env python3
"""PyTorch vs OpenVINO as the CPU runtime: seconds per window against the machine's measured peak, fidelity,
labels with trained weights, and the example CT end to end.

In one run on one machine:

1. Peak: the best of several float32 GEMMs (2048^3 and 4096^3, PyTorch's and numpy's BLAS) at
   ``--threads`` threads, in GFLOP/s.
2. One 96^3 window of the full-size Swin UNETR (fixture weights, 32 classes): its FLOPs (PyTorch's
   ``FlopCounterMode``, 2 per multiply-add), seconds per window for each runtime (median of ``--repeats``
   after one warm-up), each runtime's achieved fraction of the peak, OpenVINO's first-use conversion and a
   cached start, and max |logit - official| on the fidelity fixture for both runtimes.
3. Labels with trained weights: the packaged demo model on ``--phantoms`` fresh phantoms, default mode, per
   class the share of voxels where OpenVINO's mask equals PyTorch's, and the Dice.
4. End to end on the example CT in the default mode with OpenVINO (read to written .seg.nrrd + NIfTI) in
   its own process: time per stage and peak RSS (``--skip-e2e`` to skip), with the converted network
   already in the cache (a child process converts it first, as a first run would); ``--e2e-torch`` also
   runs PyTorch (slow: ~15 min).

    python benchmarks/benchmark_runtimes.py [--threads 2] [--repeats 2] [--phantoms 3] [--output runs.jsonl]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("UNIVERSALSEG_SHARED", REPO.parent / "shared"))
FIXTURE = SHARED / "reference" / "fixture"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark_cpu import _fixture_checkpoint, _reset_peak, _rss_peak_mb  # noqa: E402

#: The official pipeline on the example CT on this machine (README): sliding window alone, and peak RSS.
OFFICIAL = {"sliding_window_s": 23.9 * 60, "peak_rss_mb": 6200}


def gemm_peak_gflops(threads: int, sizes=(2048, 4096), repeats: int = 5) -> dict:
    """Best float32 GEMM rate at ``threads`` threads, over PyTorch's and numpy's BLAS and a few sizes: the
    machine's practical FP32 peak. ``wall``: GFLOP per second of wall time (the best run is the one least
    disturbed by other processes); ``cpu``: GFLOP per CPU-second of this process times ``threads``, which
    a shared CPU disturbs less (time the threads did not run is not counted)."""
    import torch

    torch.set_num_threads(threads)
    best = {"wall": 0.0, "cpu": 0.0}
    for size in sizes:
        a, b = torch.randn(size, size), torch.randn(size, size)
        for matmul in (torch.mm, lambda x, y: x.numpy() @ y.numpy()):
            matmul(a, b)  # warm-up
            for _ in range(repeats):
                t0, c0 = time.perf_counter(), time.process_time()
                matmul(a, b)
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                best["wall"] = max(best["wall"], 2 * size**3 / wall / 1e9)
                best["cpu"] = max(best["cpu"], 2 * size**3 / (cpu / threads) / 1e9)
    return best


def window_flops(model, window) -> int:
    """FLOPs of one window's forward (convolutions, matrix products, attention), counted by PyTorch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    # The plain (autograd-path) forward: its attention is explicit matrix products the counter sees;
    # the same arithmetic as the fused inference path.
    with torch.enable_grad(), FlopCounterMode(display=False) as counter:
        for p in model.parameters():
            p.requires_grad_(False)
        model(window)
    return int(counter.get_total_flops())


def _timed(forward, window, repeats: int) -> tuple[list[float], list[float]]:
    """Wall seconds and CPU seconds of this process per call, after one warm-up call."""
    forward(window)  # warm-up: oneDNN/OpenVINO primitive creation
    walls, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        forward(window)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return walls, cpus


def _fixture_error(logits, expected) -> float:
    import numpy as np

    p = expected["points"].astype(np.int64)
    got = logits[0][:, p[:, 0], p[:, 1], p[:, 2]].T
    return float(np.abs(np.asarray(got) - expected["logits_at_points"]).max())


def window_part(args, folder: Path) -> dict:
    import numpy as np
    import torch

    from UniversalSegLib.checkpoints import load_checkpoint
    from UniversalSegLib.runtime import model_digest, openvino_version, prepare_openvino

    torch.set_num_threads(args.threads)
    record: dict = {"threads": args.threads, "torch": torch.__version__, "openvino": openvino_version()}
    peak = gemm_peak_gflops(args.threads)
    record["gemm_peak_gflops"] = {k: round(v, 1) for k, v in peak.items()}
    print(f"measured FP32 peak (best GEMM, {args.threads} threads): {peak['wall']:.0f} GFLOP/s of wall time, "
          f"{peak['cpu']:.0f} GFLOP/s of CPU time", flush=True)

    model = load_checkpoint(_fixture_checkpoint("swinunetr", folder)).build_model("cpu")
    window = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 1, 96, 96, 96)).astype(np.float32))
    expected = dict(np.load(FIXTURE / "expected_swinunetr.npz"))
    flops = window_flops(model, window)
    record["window_tflop"] = round(flops / 1e12, 3)
    print(f"one 96^3 window: {flops / 1e12:.3f} TFLOP", flush=True)

    # PyTorch as the pipeline runs it: no autograd, channels-last, fused chunked attention.
    model = model.to(memory_format=torch.channels_last_3d)
    channels = list(range(32))

    def torch_forward(x):
        with torch.no_grad():
            return model(x.contiguous(memory_format=torch.channels_last_3d), channels=channels)

    times, cpus = _timed(torch_forward, window, args.repeats)
    torch_logits = torch_forward(window).numpy()
    record["torch"] = {"times_s": [round(t, 2) for t in times], "cpu_s": [round(t, 2) for t in cpus],
                       "max_abs_logit_diff_vs_official": _fixture_error(torch_logits, expected)}

    digest = model_digest(model)
    rss_before = _rss_peak_mb()
    _reset_peak()
    first = prepare_openvino(model, channels, (96, 96, 96), args.threads, digest=digest)
    convert_rss, convert_s = _rss_peak_mb(), first.seconds
    del first
    cached = prepare_openvino(model, channels, (96, 96, 96), args.threads, digest=digest)
    times, cpus = _timed(cached, window, args.repeats)
    ov_logits = cached(window).numpy()
    record["openvino"] = {
        "times_s": [round(t, 2) for t in times], "cpu_s": [round(t, 2) for t in cpus],
        "max_abs_logit_diff_vs_official": _fixture_error(ov_logits, expected),
        "max_abs_logit_diff_vs_torch": float(np.abs(ov_logits - torch_logits).max()),
        "first_use_convert_s": round(convert_s, 1), "cached_start_s": round(cached.seconds, 2),
        "convert_peak_rss_mb": round(convert_rss, 0), "rss_before_convert_mb": round(rss_before, 0),
    }
    for name in ("torch", "openvino"):
        r = record[name]
        r["median_s"], r["median_cpu_s"] = round(statistics.median(r["times_s"]), 2), round(statistics.median(r["cpu_s"]), 2)
        r["gflops"] = round(flops / r["median_s"] / 1e9, 1)
        r["fraction_of_peak"] = round(r["gflops"] / peak["wall"], 3)
        # Per CPU-second, like the GEMM's "cpu" peak: what the threads achieve while they run.
        r["cpu_gflops"] = round(flops / (min(r["cpu_s"]) / args.threads) / 1e9, 1)
        r["cpu_fraction_of_peak"] = round(r["cpu_gflops"] / peak["cpu"], 3)
    return record


def agreement_part(args) -> dict:
    """OpenVINO vs PyTorch labels in the default mode, demo model, fresh phantoms."""
    import numpy as np

    from UniversalSegLib.checkpoints import load_checkpoint
    from UniversalSegLib.demo import demo_checkpoint_path
    from UniversalSegLib.phantom import generate_phantom
    from UniversalSegLib.pipeline import Segmenter
    from benchmark_modes import dice

    checkpoint = load_checkpoint(demo_checkpoint_path())
    settings = checkpoint.metadata.provenance["phantom"]
    segmenters = {r: Segmenter(checkpoint, device="cpu", threads=args.threads, runtime=r) for r in ("torch", "openvino")}
    names = {c.index: c.key for c in checkpoint.metadata.classes}
    agree: dict[str, list] = {}
    dices: dict[str, list] = {}
    for seed in range(3000, 3000 + args.phantoms):
        phantom = generate_phantom(seed, shape=tuple(settings["shape"]), spacing=tuple(settings["spacing"]),
                                   orientation=settings["orientation"])
        results = {r: s.segment(phantom.volume) for r, s in segmenters.items()}
        for index, ref in results["torch"].masks.items():
            mine = results["openvino"].masks[index]
            agree.setdefault(names[index], []).append(float(np.mean(mine == ref)))
            dices.setdefault(names[index], []).append(dice(mine, ref))
    return {"phantoms": args.phantoms,
            "min_voxel_agreement_per_class": {k: round(min(v), 6) for k, v in agree.items()},
            "min_dice_per_class": {k: round(min(v), 5) for k, v in dices.items()}}


def warm_cache(model_path: str, threads: int) -> float:
    """Convert the model for the default mode's 32-class run into the cache (what a first run does), in a
    child process; returns its seconds. The end-to-end run then measures the steady state."""
    import subprocess

    code = (
        "import json, sys, time\n"
        "from UniversalSegLib.pipeline import Segmenter\n"
        "from UniversalSegLib.postprocess import required_classes\n"
        "from UniversalSegLib.runtime import prepare_openvino\n"
        "s = Segmenter(%r, device='cpu', threads=%d, runtime='openvino')\n"
        "meta = s.checkpoint.metadata\n"
        "needed = required_classes(list(s.taxonomy.indices), s.mode.postprocess)\n"
        "channels = [meta.channel_of(s.taxonomy[i]) for i in needed if i in set(s.taxonomy.indices)]\n"
        "print(json.dumps(prepare_openvino(s.model, channels, meta.inference.roi_size, s.threads).seconds))\n"
    ) % (model_path, threads)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO))
    if done.returncode:
        sys.exit(f"conversion failed:\n{done.stderr[-4000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def e2e_part(args, folder: Path, runtime: str) -> dict:
    from benchmark_modes import run_mode_in_child

    e2e = argparse.Namespace(input=args.input, device="cpu", threads=args.threads, classes="all",
                             precision="float32", runtime=runtime, formats="nifti,seg.nrrd")
    model_path = str(_fixture_checkpoint("swinunetr", folder))
    warm = warm_cache(model_path, args.threads) if runtime == "openvino" else None
    record, _ = run_mode_in_child("default", e2e, model_path, folder)
    record["cache_warmed_s"] = warm
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--phantoms", type=int, default=3)
    parser.add_argument("--input", default=str(SHARED / "data/totalsegmentator/example_ct.nii.gz"))
    parser.add_argument("--skip-window", action="store_true")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--e2e-torch", action="store_true", help="also run the PyTorch runtime end to end")
    parser.add_argument("--output", help="append the JSON record to this file")
    args = parser.parse_args()
    out: dict = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
                 "load_avg": os.getloadavg()}
    print(f"{out['when']}, load average {out['load_avg'][0]:.1f} (other processes slow every timing)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        # A fresh cache: part 2 measures the first-use conversion, part 4 then starts from the cache.
        os.environ["UNIVERSALSEG_HOME"] = str(Path(tmp) / "home")
        if not args.skip_window:
            out["window"] = w = window_part(args, Path(tmp))
            print(json.dumps(w), flush=True)
            peak = w["gemm_peak_gflops"]
            print(f"\n| runtime | wall s per 96^3 window | CPU s | GFLOP/s (wall) | of peak ({peak['wall']:.0f}) "
                  f"| GFLOP/s per CPU time | of CPU-time peak ({peak['cpu']:.0f}) | max abs logit diff vs official |"
                  "\n|---|---|---|---|---|---|---|---|")
            for name in ("torch", "openvino"):
                r = w[name]
                print(f"| {name} | {r['median_s']} | {r['median_cpu_s']} | {r['gflops']} | {100 * r['fraction_of_peak']:.0f} % "
                      f"| {r['cpu_gflops']} | {100 * r['cpu_fraction_of_peak']:.0f} % "
                      f"| {r['max_abs_logit_diff_vs_official']:.2e} |")
            o = w["openvino"]
            print(f"OpenVINO first use: conversion {o['first_use_convert_s']} s (peak RSS {o['convert_peak_rss_mb']} MB); "
                  f"cached start {o['cached_start_s']} s; max |dlogit| vs PyTorch {o['max_abs_logit_diff_vs_torch']:.2e}",
                  flush=True)
        if args.phantoms:
            out["labels_demo_model"] = a = agreement_part(args)
            print(json.dumps(a), flush=True)
        if not args.skip_e2e:
            for runtime in ["openvino"] + (["torch"] if args.e2e_torch else []):
                out[f"e2e_{runtime}"] = r = e2e_part(args, Path(tmp), runtime)
                print(json.dumps(r), flush=True)
                stages = ", ".join(f"{k} {v['seconds']} s" for k, v in r["stages"].items())
                print(f"end to end, default mode, {runtime}: {r['total_seconds']} s, peak RSS {r['peak_rss_mb']:.0f} MB "
                      f"({r['windows']} windows; {stages})", flush=True)
            print(f"official pipeline (README): sliding window alone {OFFICIAL['sliding_window_s'] / 60:.1f} min, "
                  f"peak RSS {OFFICIAL['peak_rss_mb'] / 1000:.1f} GB", flush=True)
    out["load_avg_after"] = os.getloadavg()
    print(f"load average at the end: {out['load_avg_after'][0]:.1f}", flush=True)
    if args.output:
        with open(args.output, "a") as f:
            f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
