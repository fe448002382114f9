"""Benchmark: peak memory of the training case cache, bounded vs unbounded, on a 200-case phantom dataset.

Writes a phantom dataset (default 200 cases of 64^3 voxels at 4 mm, partially labelled like KiTS),
preprocesses it once into the on-disk cache, then draws training crops through the data loader (2 worker
processes) three times, each in a fresh Python process:

* ``unbounded``: every loaded case stays in memory (what the cache did before it had a budget);
* ``budget``: cases kept in memory within ``--budget-mb`` per process, least recently used dropped first;
* ``off``: nothing kept in memory (budget 0); every crop reads its case's cache file.

It prints the peak resident set size of the main process and of the largest loader worker (``ru_maxrss``),
the size of all cases' cache files (what an unbounded cache ends up holding per process) and the crops
per second. The on-disk cache is filled first, in a separate process.

    python benchmarks/training_cache_memory.py --out /tmp/cache_bench
    python benchmarks/training_cache_memory.py --cases 200 --samples 800 --budget-mb 64
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

MODES = {"unbounded": 10**7, "budget": None, "off": 0}


def _write_dataset(out: Path, cases: int, shape: int, spacing: float) -> Path:
    from universalseg_training.phantoms import write_phantom_dataset

    spec = out / "data" / "kits" / "dataset.json"
    if not spec.is_file() or len(list((out / "data" / "kits" / "imagesTr").glob("*.nii.gz"))) != cases:
        write_phantom_dataset(out / "data", "kits", cases, base_seed=0, shape=(shape,) * 3, spacing=(spacing,) * 3)
    return spec


def _measure(args) -> None:
    """One mode, in this (fresh) process: prepare, then draw crops through a 2-worker loader."""
    import torch

    from UniversalSegLib.preprocess import PreprocessingParameters
    from universalseg_training.preprocessing import CaseCache
    from universalseg_training.sampling import CropDataset, SamplingConfig
    from universalseg_training.spec import load_dataset_spec

    torch.set_num_threads(1)
    spec = load_dataset_spec(args.spec)
    cache = CaseCache([spec], Path(args.out) / "cache", PreprocessingParameters(spacing=(args.spacing,) * 3),
                      memory_budget_mb=max(args.mode_budget, 0))
    if args.mode_budget < 0:  # the preparation run: fill the on-disk cache once, measure nothing
        cache.prepare()
        print(json.dumps({"prepared": len(cache)}))
        return
    case_mb = sum(p.stat().st_size for p in (Path(args.out) / "cache").glob("*.pt")) / 2**20
    data = CropDataset(cache, list(range(1, 33)), SamplingConfig(roi_size=(args.roi,) * 3), seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=2, num_workers=args.workers,
                                         sampler=range(args.samples))
    start = time.perf_counter()
    for _ in loader:
        pass
    seconds = time.perf_counter() - start
    main_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worker_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"main_peak_rss_mb": round(main_peak, 1), "largest_worker_peak_rss_mb": round(worker_peak, 1),
                      "all_cases_in_memory_mb": round(case_mb, 1), "crops_per_second": round(args.samples / seconds, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="/tmp/universalseg_cache_benchmark")
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--shape", type=int, default=64)
    parser.add_argument("--spacing", type=float, default=4.0)
    parser.add_argument("--roi", type=int, default=32)
    parser.add_argument("--samples", type=int, default=800)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--budget-mb", type=float, default=64.0)
    parser.add_argument("--mode-budget", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode_budget is not None:
        _measure(args)
        return
    out = Path(args.out)
    start = time.perf_counter()
    spec = _write_dataset(out, args.cases, args.shape, args.spacing)
    print(f"dataset: {args.cases} phantoms of {args.shape}^3 at {args.spacing} mm ({time.perf_counter() - start:.0f} s)")
    results = {}
    for mode, budget in [("prepare", -1), *MODES.items()]:
        budget = args.budget_mb if budget is None else budget
        command = [sys.executable, __file__, "--out", str(out), "--spec", str(spec), "--mode-budget", str(budget),
                   "--spacing", str(args.spacing), "--roi", str(args.roi), "--samples", str(args.samples),
                   "--workers", str(args.workers)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        if mode == "prepare":
            continue
        results[mode] = {"memory_budget_mb": budget, **json.loads(done.stdout.strip().splitlines()[-1])}
    print("| cache in memory | main process peak RSS (MB) | largest loader worker peak RSS (MB) | crops/s |")
    print("|---|---|---|---|")
    for mode, r in results.items():
        label = {"unbounded": "unbounded (former behaviour)", "budget": f"budget {args.budget_mb:g} MB",
                 "off": "off (budget 0)"}[mode]
        print(f"| {label} | {r['main_peak_rss_mb']:.0f} | {r['largest_worker_peak_rss_mb']:.0f} | "
              f"{r['crops_per_second']:.1f} |")
    print(json.dumps({"cases": args.cases, "samples": args.samples, "workers": args.workers, "results": results},
                     indent=1))


if __name__ == "__main__":
    main()
