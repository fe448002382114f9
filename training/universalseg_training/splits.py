"""Seeded k-fold cross-validation splits of the cases of some datasets (nnU-Net-style ``splits.json``).

Cases are shuffled per dataset with a generator seeded by ``seed`` and dealt round robin into ``k`` folds,
so every fold gets a share of every dataset. Fold ``f``'s validation cases are fold ``f``; its training
cases are all others. :func:`write_fold_specs` writes, for one fold, a training and a validation copy of
each dataset specification with an explicit case list, ready for the ``datasets`` and ``validation`` keys.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from .spec import DatasetSpec, load_dataset_spec

__all__ = ["kfold_splits", "write_fold_specs"]


def kfold_splits(case_ids: Sequence[str], k: int, seed: int = 0) -> list[dict[str, list[str]]]:
    """``[{"train": [...], "val": [...]}, ...]`` for ``k`` folds of ``case_ids`` (sorted within each list)."""
    ids = sorted(set(str(c) for c in case_ids))
    if k < 2:
        raise ValueError(f"k-fold needs k >= 2; got {k}")
    if len(ids) < k:
        raise ValueError(f"{len(ids)} cases cannot fill {k} folds; use k <= {len(ids)}")
    order = np.random.default_rng(seed).permutation(len(ids))
    folds = [sorted(ids[i] for i in order[f::k]) for f in range(k)]
    return [{"train": sorted(c for g, fold in enumerate(folds) if g != f for c in fold), "val": folds[f]}
            for f in range(k)]


def _case_entries(spec: DatasetSpec, ids: set[str]) -> list[dict]:
    return [{"id": c.case_id, "image": str(Path(c.image).resolve()), "labels": str(Path(c.labels).resolve())}
            for c in spec.cases if c.case_id in ids]


def write_fold_specs(spec_paths: Sequence[str | Path], k: int, fold: int, out_dir: str | Path,
                     seed: int = 0) -> dict[str, list[Path]]:
    """Training and validation specifications of fold ``fold`` (0-based) for each dataset; also
    ``splits_<name>.json`` with all folds. Returns ``{"datasets": [...], "validation": [...]}``."""
    if not 0 <= fold < k:
        raise ValueError(f"fold must be in 0..{k - 1}; got {fold}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[Path]] = {"datasets": [], "validation": []}
    for path in spec_paths:
        path = Path(path)
        spec = load_dataset_spec(path)
        if spec.is_case_format:
            raise ValueError(f"{path}: k-fold splits need image/label datasets (not case_files)")
        splits = kfold_splits([c.case_id for c in spec.cases], k, seed)
        (out / f"splits_{spec.name}.json").write_text(json.dumps(splits, indent=1))
        document = json.loads(path.read_text()) if path.suffix.lower() == ".json" else _yaml(path)
        for part, key in (("train", "datasets"), ("val", "validation")):
            entry = {k2: v for k2, v in document.items() if k2 not in ("images", "labels", "cases", "root")}
            names = entry.get("label_names")
            if isinstance(names, dict) and "file" in names:  # relative to the original specification
                entry["label_names"] = {**names, "file": str((path.parent / names["file"]).resolve())}
            entry["cases"] = _case_entries(spec, set(splits[fold][part]))
            target = out / f"{spec.name}_fold{fold}_{part}.json"
            target.write_text(json.dumps(entry, indent=1))
            written[key].append(target)
    return written


def _yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8"))
