"""Benchmark: masked back-propagation vs naive training on partially labelled phantom datasets.

Trains the same model twice (same data, seed and schedule) and prints the README table of per-class Dice on
fresh phantoms with complete truth. The CI-sized version is Testing/test_training_experiment.py.

    python benchmarks/masked_vs_naive.py --out /tmp/masked_vs_naive            # default: the README run (1200 steps)
    python benchmarks/masked_vs_naive.py --steps 400                           # the shorter README run
    python benchmarks/masked_vs_naive.py --steps 3000 --model-size small       # longer, wider
"""
from __future__ import annotations

import argparse
import json
import time

from universalseg_training.experiment import markdown_table, masked_vs_naive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="/tmp/universalseg_masked_vs_naive")
    parser.add_argument("--datasets", nargs="+", default=["lits", "kits", "msd_spleen", "msd_pancreas"])
    parser.add_argument("--classes", nargs="+", default=["liver", "spleen", "kidneys", "pancreas"])
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--roi", type=int, default=48)
    parser.add_argument("--spacing", type=float, default=4.8)
    parser.add_argument("--phantom-shape", type=int, default=64)
    parser.add_argument("--model-size", default="tiny", choices=["tiny", "small", "official"])
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-cases", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    start = time.perf_counter()
    result = masked_vs_naive(args.out, datasets=args.datasets, classes=args.classes, cases=args.cases,
                             steps=args.steps, batch_size=args.batch_size, roi=args.roi, spacing=args.spacing,
                             phantom_shape=args.phantom_shape, model_size=args.model_size, lr=args.lr, seed=args.seed,
                             eval_seeds=tuple(range(1000, 1000 + args.eval_cases)), threads=args.threads, progress=True)
    print(markdown_table(result))
    print(json.dumps({"seconds": result.seconds, "total_seconds": time.perf_counter() - start,
                      "settings": result.settings}, indent=1))


if __name__ == "__main__":
    main()
