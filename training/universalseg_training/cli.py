"""``universalseg-train``: train, resume, evaluate, and make phantom datasets.

Examples::

    universalseg-train phantoms data/phantoms --cases 8 --seed 0
    universalseg-train train config.yaml                          # one process (CPU or one GPU)
    torchrun --nproc_per_node 8 -m universalseg_training.cli train config.yaml     # 8 GPUs, DDP
    universalseg-train train config.yaml --set steps=2000 --set sampling.num_samples=4
    universalseg-train evaluate runs/x/final.safetensors data/phantoms/lits/dataset.json
    universalseg-train split data/lits.yaml data/kits.yaml --folds 5 --fold 0 --out data/folds
    universalseg-train presets                                    # the official datasets' presets

Running ``train`` again with the same ``output_dir`` resumes from the latest checkpoint.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

__all__ = ["main"]


def _train(args) -> int:
    from .config import TrainConfig, apply_overrides
    from .trainer import train

    config = TrainConfig.from_file(args.config)
    if args.set:
        config = TrainConfig.from_dict(apply_overrides(config.to_dict(), args.set))
    result = train(config)
    if result.final_checkpoint is not None:
        print(f"trained {result.steps} steps (resumed from step {result.resumed_from}); "
              f"final loss {result.last_loss:.4f}; checkpoint: {result.final_checkpoint}")
        summary = Path(config.output_dir) / "summary.json"
        if result.validation and summary.is_file():
            named = json.loads(summary.read_text())
            print(json.dumps({k: named[k] for k in ("step", "cases", "mean_dice", "dice", "datasets", "best")},
                             indent=1, default=float))
    return 0


def _split(args) -> int:
    from .splits import write_fold_specs

    written = write_fold_specs(args.datasets, args.folds, args.fold, args.out, seed=args.seed)
    print(json.dumps({k: [str(p) for p in v] for k, v in written.items()}, indent=1))
    return 0


def _presets(args) -> int:
    from .presets import PRESETS

    for name, entry in PRESETS.items():
        print(f"{name:20s} official {entry['official_key']:6s} crops {entry['sampling']['crops']:8s} "
              f"zoom {'yes' if entry['sampling']['zoom'] else 'no '}  raw values {sorted(entry['classes'])}")
    return 0


def _phantoms(args) -> int:
    from .phantoms import write_phantom_datasets

    paths = write_phantom_datasets(args.folder, args.datasets or None, cases=args.cases, base_seed=args.seed,
                                   shape=tuple(args.shape), spacing=tuple(args.spacing),
                                   lesion_probability=args.lesion_probability)
    for path in paths:
        print(path)
    return 0


def _evaluate(args) -> int:
    import torch

    from UniversalSegLib.checkpoints import load_checkpoint

    from .evaluation import evaluate_cases
    from .preprocessing import CaseCache
    from .spec import load_dataset_spec

    checkpoint = load_checkpoint(args.checkpoint)
    meta = checkpoint.metadata
    model = checkpoint.build_model(args.device)
    specs = [load_dataset_spec(p) for p in args.datasets]
    cache = CaseCache(specs, args.cache_dir, meta.preprocessing)
    result = evaluate_cases(model, cache, list(meta.classes.indices), meta.inference.roi_size, torch.device(args.device),
                            overlap=args.overlap, postprocess=args.postprocess,
                            class_names={c.index: c.display_name for c in meta.classes})
    named = result.named_summary()
    if args.cases_csv:
        import csv

        with open(args.cases_csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(result.records[0]) if result.records else ["dataset"])
            writer.writeheader()
            writer.writerows(result.records)
    print(json.dumps(named, indent=1, default=float))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="universalseg-train", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train or resume (also under torchrun)")
    p.add_argument("config", type=Path, help="training configuration (.yaml or .json)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a setting (JSON value); dotted keys reach nested ones: sampling.num_samples=4")
    p.set_defaults(run=_train)
    p = sub.add_parser("split", help="seeded k-fold split: training/validation specifications of one fold")
    p.add_argument("datasets", nargs="+", type=Path)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(run=_split)
    p = sub.add_parser("presets", help="list the dataset presets of the official training datasets")
    p.set_defaults(run=_presets)
    p = sub.add_parser("phantoms", help="write partially labelled phantom datasets")
    p.add_argument("folder", type=Path)
    p.add_argument("--datasets", nargs="*", help="dataset names (default: all)")
    p.add_argument("--cases", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", type=int, nargs=3, default=(96, 96, 96))
    p.add_argument("--spacing", type=float, nargs=3, default=(3.2, 3.2, 3.2))
    p.add_argument("--lesion-probability", type=float, default=0.5)
    p.set_defaults(run=_phantoms)
    p = sub.add_parser("evaluate", help="Dice, NSD and tumour detection of a checkpoint on datasets")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("datasets", nargs="+", type=Path)
    p.add_argument("--cache-dir", type=Path, default=Path(".universalseg-cache"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--overlap", type=float, default=0.25)
    p.add_argument("--postprocess", choices=["none", "fixed", "official"], default="fixed",
                   help="post-processing before scoring (fixed = what universalseg segment does by default)")
    p.add_argument("--cases-csv", type=Path, help="also write the per-case table here")
    p.set_defaults(run=_evaluate)
    return parser


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"universalseg-train: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
