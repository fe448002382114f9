#!/usr/bin/env python3
"""The Slicer module's worker process: a first run (worker start + model load + inference) against a second
run on the same model (the model stays loaded), and a third with another class choice. With
``--progressive`` the third is a progressive run instead: the time to the quick (fast layout) preview and to
the exact result, against the second run's exact result alone.

Drives :class:`UniversalSegLib.worker.WorkerProcess` exactly as the Slicer module does (voxels and affine
through the exchange folder, progress and answers from the events file, polled), on a CT file, and prints
per run: the wall time from request to answer (what the user waits for after Apply), the model-load time
inside it and the worker's own stage timings.

    python benchmarks/benchmark_worker.py [--model PATH_OR_NAME | --fixture-model swinunetr] [--ct CT.nii.gz]
        [--crop 48] [--device cpu] [--threads 2] [--runtime torch] [--progressive]

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


def run(worker: WorkerProcess, volume, model: str, device: str, threads: int, classes=None, runtime=None,
        progressive: bool = False) -> dict:
    """One request, polled as the module does; the answer with ``wall`` (request to result) and, for a
    progressive run, ``preview_wall`` (request to the preview's arrival)."""
    events = []
    request_id = worker.new_request_id()
    started = time.perf_counter()
    name = write_volume(worker.folder, request_id, volume.array)
    worker.send(request_id, "segment", events.append, volume=name, affine=volume.affine.tolist(), model=model,
                device=device, threads=threads, classes=classes, runtime=runtime, progressive=progressive)
    preview_wall = None
    while not events or events[-1]["event"] not in ("result", "error", "cancelled", "died"):
        worker.poll()
        if preview_wall is None and any(e["event"] == "preview" for e in events):
            preview_wall = time.perf_counter() - started
        time.sleep(0.01)
    answer = events[-1]
    if answer["event"] != "result":
        raise SystemExit(f"the run failed: {answer}")
    answer["wall"] = time.perf_counter() - started
    answer["preview_wall"] = preview_wall
    preview = next((e for e in events if e["event"] == "preview"), None)
    if preview is not None:
        answer["preview_timings"] = preview["timings"]
        worker.discard(preview["output"])
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
    parser.add_argument("--progressive", action="store_true",
                        help="add a progressive run: time to the quick preview and to the exact result")
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
        if args.progressive:
            progressive = run(worker, volume, args.model, args.device, args.threads, runtime=args.runtime,
                              progressive=True)
        else:
            other = run(worker, volume, args.model, args.device, args.threads, classes=first["classes"][:2],
                        runtime=args.runtime)
    finally:
        worker.stop()
        scratch.cleanup()
    if hasattr(os, "getloadavg"):  # other jobs on the machine inflate wall times: say how busy it was
        print(f"load average at the end: {', '.join(f'{v:.1f}' for v in os.getloadavg())} (1, 5, 15 min)")
    print(f"{'run':<28}{'wall s':>8}{'model load s':>14}{'loaded now':>12}  worker stages (s)")
    runs = [("first (starts the worker)", first), ("second (same model)", second)]
    if not args.progressive:
        runs.append(("third (2 classes)", other))
    for label, answer in runs:
        stages = ", ".join(f"{k} {v:.2f}" for k, v in answer["timings"].items())
        print(f"{label:<28}{answer['wall']:>8.2f}{answer['load_seconds']:>14.3f}{str(answer['model_loaded']):>12}  "
              f"{stages}")
    if args.progressive:
        if progressive["preview_wall"] is None:
            print(f"progressive run: no preview (device {progressive['device']}, mode {progressive['mode']}); "
                  f"result after {progressive['wall']:.2f} s")
            return
        quick = ", ".join(f"{k} {v:.2f}" for k, v in progressive["preview_timings"].items())
        exact = ", ".join(f"{k} {v:.2f}" for k, v in progressive["timings"].items())
        print(f"progressive run ({progressive['runtime']}): quick result after {progressive['preview_wall']:.2f} s "
              f"({quick}), exact result after {progressive['wall']:.2f} s ({exact}); the exact result alone "
              f"(second run) took {second['wall']:.2f} s: the preview comes "
              f"{second['wall'] / progressive['preview_wall']:.1f}x sooner and delays the exact result by "
              f"{progressive['wall'] - second['wall']:+.2f} s")


if __name__ == "__main__":
    main()
