"""``universalseg-train``: train, resume, evaluate, and make phantom datasets.

Examples::

    universalseg-train phantoms data/phantoms --cases 8 --seed 0
    universalseg-train train config.yaml                          # one process (CPU or one GPU)
    torchrun --nproc_per_node 8 -m universalseg_training.cli train config.yaml     # 8 GPUs, DDP
    universalseg-train train config.yaml --set steps=2000 --set batch_size=4
    universalseg-train evaluate runs/x/final.safetensors data/phantoms/lits/dataset.json

Running ``train`` again with the same ``output_dir`` resumes from the latest checkpoint.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

__all__ = ["main"]


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _train(args) -> int:
    from .config import TrainConfig
    from .trainer import train

    overrides = {}
    for item in args.set or []:
        if "=" not in item:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key.strip()] = _parse_value(value)
    config = TrainConfig.from_file(args.config)
    if overrides:
        config = TrainConfig.from_dict({**config.to_dict(), **overrides})
    result = train(config)
    if result.final_checkpoint is not None:
        print(f"trained {result.steps} steps (resumed from step {result.resumed_from}); "
              f"final loss {result.last_loss:.4f}; checkpoint: {result.final_checkpoint}")
        if result.validation:
            print(json.dumps(result.validation, indent=1, default=float))
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
    from .preprocessing import CaseCache, TrainingPreprocessing
    from .spec import load_dataset_spec

    checkpoint = load_checkpoint(args.checkpoint)
    meta = checkpoint.metadata
    model = checkpoint.build_model(args.device)
    prep = TrainingPreprocessing(spacing=tuple(meta.preprocessing.spacing), hu_window=tuple(meta.preprocessing.hu_window),
                                 crop_foreground=meta.preprocessing.crop_foreground)
    specs = [load_dataset_spec(p) for p in args.datasets]
    cache = CaseCache(specs, args.cache_dir, prep)
    result = evaluate_cases(model, cache, list(meta.classes.indices), meta.inference.roi_size, torch.device(args.device),
                            overlap=args.overlap)
    summary = result.summary()
    names = {c.index: c.display_name for c in meta.classes}
    print(json.dumps({**summary, "dice": {names[k]: v for k, v in summary["dice"].items()},
                      "nsd": {names[k]: v for k, v in summary["nsd"].items()},
                      "detection": {names[k]: v for k, v in summary["detection"].items()}}, indent=1, default=float))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="universalseg-train", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train or resume (also under torchrun)")
    p.add_argument("config", type=Path, help="training configuration (.yaml or .json)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a setting (JSON value)")
    p.set_defaults(run=_train)
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
