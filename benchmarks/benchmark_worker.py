#!/usr/bin/env python3
"""The Slicer module's worker process: a first run (worker start + model load + inference) against a second
run on the same model (the model stays loaded), and a third with another class choice.

Drives :class:`UniversalSegLib.worker.WorkerProcess` exactly as the Slicer module does (voxels and affine
through the exchange folder, progress and answers from the events file, polled), on a CT file, and prints
per run: the wall time from request to answer (what the user waits for after Apply), the model-load time
inside it and the worker's own stage timings.

    python benchmarks/benchmark_worker.py [--model PATH_OR_NAME | --fixture-model swinunetr] [--ct CT.nii.gz]
        [--crop 48] [--device cpu] [--threads 2] [--runtime torch]

Defaults: the packaged demo model and the shared example CT. ``--fixture-model`` uses the full-size network
with the fidelity fixture's weights (the official model's size: its load time is the real one);
``--crop N`` keeps the central N^3 voxels of the CT so that a CPU run of the full-size model stays short.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("UNIVERSALSEG_SHARED", REPO.parent / "shared"))
sys.path.insert(0, str(REPO))

from UniversalSegLib.worker import WorkerProcess  # noqa: E402
from UniversalSegLib.worker.protocol import write_volume  # noqa: E402


def run(worker: WorkerProcess, volume, model: str, device: str, threads: int, classes=None, runtime=None) -> dict:
    events = []
    request_id = worker.new_request_id()
    started = time.perf_counter()
    name = write_volume(worker.folder, request_id, volume.array)
    worker.send(request_id, "segment", events.append, volume=name, affine=volume.affine.tolist(), model=model,
                device=device, threads=threads, classes=classes, runtime=runtime)
    while not events or events[-1]["event"] not in ("result", "error", "cancelled", "died"):
        worker.poll()
        time.sleep(0.01)
    answer = events[-1]
    if answer["event"] != "result":
        raise SystemExit(f"the run failed: {answer}")
    answer["wall"] = time.perf_counter() - started
    worker.discard(name)
    worker.discard(answer["output"])
    return answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "UniversalSegLib" / "data" / "demo" / "demo_model.safetensors"))
    parser.add_argument("--ct", default=str(SHARED / "data" / "totalsegmentator" / "example_ct.nii.gz"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runtime", default=None, help="auto, torch or openvino (default: the library's choice)")
    parser.add_argument("--fixture-model", choices=("swinunetr", "unet"), default=None)
    parser.add_argument("--crop", type=int, default=0)
    args = parser.parse_args()

    import tempfile

    from UniversalSegLib.io import read_volume

    volume = read_volume(args.ct)
    if args.crop:
        import numpy as np

        start = [max(0, (n - args.crop) // 2) for n in volume.shape]
        volume.array = np.ascontiguousarray(volume.array[tuple(slice(s, s + args.crop) for s in start)])
        volume.affine = volume.affine.copy()
        volume.affine[:3, 3] = (volume.affine @ np.array([*start, 1.0]))[:3]
    scratch = tempfile.TemporaryDirectory(prefix="universalseg-benchmark-")
    if args.fixture_model:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from benchmark_cpu import _fixture_checkpoint

        args.model = str(_fixture_checkpoint(args.fixture_model, Path(scratch.name)))
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()}, {os.cpu_count()} cores, "
          f"device {args.device}, {args.threads} thread(s); CT {Path(args.ct).name} {volume.shape}; "
          f"model {Path(args.model).name}, runtime {args.runtime or 'default'}")
    worker = WorkerProcess()
    try:
        first = run(worker, volume, args.model, args.device, args.threads, runtime=args.runtime)
        second = run(worker, volume, args.model, args.device, args.threads, runtime=args.runtime)
        other = run(worker, volume, args.model, args.device, args.threads, classes=first["classes"][:2],
                    runtime=args.runtime)
    finally:
        worker.stop()
        scratch.cleanup()
    print(f"{'run':<28}{'wall s':>8}{'model load s':>14}{'loaded now':>12}  worker stages (s)")
    for label, answer in (("first (starts the worker)", first), ("second (same model)", second),
                          ("third (2 classes)", other)):
        stages = ", ".join(f"{k} {v:.2f}" for k, v in answer["timings"].items())
        print(f"{label:<28}{answer['wall']:>8.2f}{answer['load_seconds']:>14.3f}{str(answer['model_loaded']):>12}  "
              f"{stages}")


if __name__ == "__main__":
    main()
