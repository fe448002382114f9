#!/usr/bin/env python3
"""One 96^3 forward of the full-size model per backbone: time (median of N), peak RSS, and fidelity.

Loads the fidelity-fixture weights (built from ``../shared/reference/fixture/make_weights.py``) through a
released-style official checkpoint, runs the fixture input, and prints the max |logit difference| to the
official output (``expected_<backbone>.npz``) next to the timings. Each backbone runs in its own process so
its peak RSS is its own.

    python benchmarks/benchmark_forward.py [--backbones swinunetr,unet] [--repeats 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("UNIVERSALSEG_SHARED", REPO.parent / "shared"))
FIXTURE = SHARED / "reference" / "fixture"


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_one(backbone: str, repeats: int, threads: int) -> dict:
    sys.path.insert(0, str(REPO))
    import importlib.util

    import numpy as np
    import torch

    from UniversalSegLib.checkpoints import load_checkpoint

    torch.set_num_threads(threads)
    spec = importlib.util.spec_from_file_location("make_weights", FIXTURE / "make_weights.py")
    mw = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mw)
    state, _ = mw.build(str(FIXTURE / f"keys_{backbone}.json"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "released.pth"
        torch.save(mw.to_released_style({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, backbone), path)
        model = load_checkpoint(path).build_model("cpu")
    del state
    rss_before = _peak_rss_mb()
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 1, 96, 96, 96)).astype(np.float32))
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            logits = model(x)[0]
            times.append(time.perf_counter() - t0)
    expected = np.load(FIXTURE / f"expected_{backbone}.npz")
    p = expected["points"].astype(np.int64)
    got = logits[:, p[:, 0], p[:, 1], p[:, 2]].T.numpy()
    record = {
        "backbone": backbone, "threads": threads, "torch": torch.__version__, "times_s": [round(t, 2) for t in times],
        "median_s": round(statistics.median(times), 2), "peak_rss_mb": round(_peak_rss_mb(), 1),
        "peak_rss_before_forward_mb": round(rss_before, 1),
        "max_abs_logit_diff_vs_official": float(np.abs(got - expected["logits_at_points"]).max()),
        "max_abs_liver_block_diff": float(np.abs(logits[5, ::4, ::4, ::4].numpy() - expected["liver_logits_stride4"]).max()),
    }
    print(json.dumps(record), flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="swinunetr,unet")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args.one, args.repeats, args.threads)
        return
    print(f"{'backbone':<10} {'median s':>8} {'runs s':<22} {'peak RSS MB':>11} {'max |dlogit|':>12}")
    for backbone in args.backbones.split(","):
        done = subprocess.run([sys.executable, __file__, "--one", backbone, "--repeats", str(args.repeats),
                               "--threads", str(args.threads)], capture_output=True, text=True)
        if done.returncode:
            sys.exit(done.stderr)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{r['backbone']:<10} {r['median_s']:>8} {str(r['times_s']):<22} {r['peak_rss_mb']:>11} "
              f"{r['max_abs_logit_diff_vs_official']:>12.2e}")


if __name__ == "__main__":
    main()
