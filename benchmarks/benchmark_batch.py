#!/usr/bin/env python3
"""Batch throughput: cases per hour with 1 and 2 workers (packaged demo model, phantom CTs, CPU).

Runs ``universalseg batch`` over ``--cases`` phantoms (96^3 voxels of 3.2 mm, the demo model's setting)
three times into fresh folders: the in-process engine (one worker), and the Ray engine with 1 and with
2 actors (``--threads`` CPU threads each, a local Ray instance). Prints the wall time and cases/hour of
each; the Ray figures include starting the actors and loading the model in each (not Ray itself).

    python benchmarks/benchmark_batch.py [--cases 12] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runtime", default="torch", help="torch (default) or openvino/auto")
    args = parser.parse_args()

    import nibabel as nib

    from UniversalSegLib.batch.run import BatchOptions, WorkerSettings, run_batch
    from UniversalSegLib.demo import demo_checkpoint_path
    from UniversalSegLib.io.writers import nifti_image
    from UniversalSegLib.phantom import generate_phantom

    work = Path(tempfile.mkdtemp(prefix="batch-bench-"))
    inputs = work / "ct"
    inputs.mkdir()
    for n in range(args.cases):
        phantom = generate_phantom(3000 + n)
        nib.save(nifti_image(phantom.image, phantom.affine, is_label=False), str(inputs / f"case{n:02d}.nii.gz"))

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    rows = []
    for label, engine, workers in (("in-process, 1 worker", "local", None), ("Ray, 1 actor", "ray", 1),
                                   ("Ray, 2 actors", "ray", 2)):
        segmentation = WorkerSettings(str(demo_checkpoint_path()), device="cpu", threads=args.threads,
                                      runtime=args.runtime)
        options = BatchOptions(str(work / f"out-{engine}-{workers}"), segmentation, engine=engine, workers=workers,
                               progress=False, expected_volumes="phantom")
        start = time.perf_counter()
        summary = run_batch([str(inputs)], options)
        seconds = time.perf_counter() - start
        assert summary.done == args.cases, summary.failed
        rows.append((label, seconds, 3600 * args.cases / seconds))
    ray.shutdown()
    print(f"{args.cases} phantoms (96^3), demo model, CPU, {args.threads} thread(s) per worker, "
          f"{args.runtime} runtime, {os.cpu_count()} cores")
    print("| engine | wall s | cases/hour |")
    print("|---|---|---|")
    for label, seconds, rate in rows:
        print(f"| {label} | {seconds:.1f} | {rate:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
