"""The paper's central experiment on phantoms: masked back-propagation vs naive training.

Several phantom datasets label different, partial sets of organs (e.g. one labels only the liver, another
only the spleen), exactly like the public datasets the Universal Model was trained on: in every case the
unlabelled organs are present in the image but stored as background. Two models are trained with the same
data, seed and schedule:

* **masked**: the loss only counts the classes each dataset annotates (this package's method);
* **naive**: every class the model learns is supervised everywhere, unannotated organs as background.

Both are scored on fresh phantoms with complete truth (per-class Dice, through the library's
``Segmenter``). The naive model is told "no liver here" on every spleen-dataset case that shows a liver, so
it learns to doubt the liver; the masked model never sees such a contradiction.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from UniversalSegLib.phantom import PHANTOM_DATASETS, generate_phantom
from UniversalSegLib.preprocess import PreprocessingParameters
from UniversalSegLib.taxonomy import get_taxonomy

from .config import TrainConfig
from .phantoms import write_phantom_dataset
from .sampling import SamplingConfig
from .trainer import train

__all__ = ["ExperimentResult", "masked_vs_naive", "score_on_phantoms", "markdown_table"]


@dataclass
class ExperimentResult:
    """Per-class mean Dice of each mode on the evaluation phantoms, and what the runs cost."""

    dice: dict[str, dict[str, float]]  # mode -> class display name -> mean Dice
    per_case: dict[str, dict[str, list[float]]]
    seconds: dict[str, float]
    settings: dict

    def margin(self, name: str) -> float:
        return self.dice["masked"][name] - self.dice["naive"][name]


def score_on_phantoms(checkpoint: str | Path, seeds: Sequence[int], shape=(96, 96, 96), spacing=(3.2, 3.2, 3.2),
                      threads: int | None = None) -> dict[str, list[float]]:
    """Dice of every class of ``checkpoint`` on fresh phantoms (complete truth), via the library's Segmenter."""
    from UniversalSegLib.pipeline import Segmenter

    from .evaluation import dice_score

    segmenter = Segmenter(str(checkpoint), device="cpu", threads=threads)
    scores: dict[str, list[float]] = {}
    for seed in seeds:
        phantom = generate_phantom(int(seed), shape=shape, spacing=spacing)
        result = segmenter.segment(phantom.volume)
        for info in result.classes:
            scores.setdefault(info.display_name, []).append(dice_score(result.masks[info.index], phantom.masks[info.index]))
    return scores


def _pinned_sampling(dataset: str) -> dict:
    """The crops this experiment was measured with (README table): lesion-weighted crops and zoom for every
    dataset that labels a lesion, with the zoom applied to each crop (``zoom_before_crop=False``). Pinned so
    that the presets' official per-dataset sampling does not change the published experiment."""
    taxonomy = get_taxonomy()
    names = [n for n in PHANTOM_DATASETS[dataset]["labels"].values() if n not in ("bone", "heart")]
    lesions = any(info.is_lesion for name in names for info in taxonomy.resolve(name))
    return {"crops": "lesions" if lesions else "pos_neg", "zoom": lesions}


def masked_vs_naive(folder: str | Path, datasets: Sequence[str] = ("lits", "msd_spleen"),
                    classes: Sequence[str] = ("liver", "spleen"), cases: int = 3, steps: int = 40,
                    batch_size: int = 2, roi: int = 32, spacing: float = 6.4, phantom_shape: int = 48,
                    model_size: str = "tiny", lr: float = 3e-3, seed: int = 0, eval_seeds: Sequence[int] = (1000, 1001, 1002),
                    threads: int | None = 1, progress: bool = False) -> ExperimentResult:
    """Train the masked and the naive model on the same partially labelled phantom datasets and score both."""
    folder = Path(folder)
    shape = (phantom_shape,) * 3
    grid = (spacing,) * 3
    specs = [write_phantom_dataset(folder / "data", name, cases, base_seed=seed, shape=shape, spacing=grid,
                                   sampling=_pinned_sampling(name)) for name in datasets]
    base = TrainConfig(
        datasets=tuple(str(p) for p in specs), output_dir=str(folder / "masked"), cache_dir=str(folder / "cache"),
        backbone="unet", model_size=model_size, embedding="onehot", classes=tuple(classes), steps=steps,
        batch_size=batch_size, lr=lr, warmup_steps=max(1, steps // 10), seed=seed,
        preprocessing=PreprocessingParameters(spacing=grid),
        sampling=SamplingConfig(roi_size=(roi, roi, roi), zoom_before_crop=False),
        checkpoint_every=steps, log_every=max(1, steps // 10), threads=threads, progress=progress, tensorboard=False)
    dice, per_case, seconds = {}, {}, {}
    for mode in ("masked", "naive"):
        config = replace(base, loss=mode, output_dir=str(folder / mode))
        start = time.perf_counter()
        result = train(config)
        seconds[mode] = time.perf_counter() - start
        scores = score_on_phantoms(result.final_checkpoint, eval_seeds, shape=shape, spacing=grid, threads=threads)
        per_case[mode] = scores
        dice[mode] = {name: float(np.mean(values)) for name, values in scores.items()}
    settings = {"datasets": list(datasets), "classes": list(classes), "cases_per_dataset": cases, "steps": steps,
                "batch_size": batch_size, "roi": roi, "spacing_mm": spacing, "model_size": model_size, "lr": lr,
                "seed": seed, "eval_seeds": list(eval_seeds)}
    outcome = ExperimentResult(dice, per_case, seconds, settings)
    (folder / "result.json").write_text(json.dumps(
        {"dice": dice, "per_case": per_case, "seconds": seconds, "settings": settings}, indent=1))
    return outcome


def markdown_table(result: ExperimentResult) -> str:
    """The README table: mean Dice per class, masked vs naive, and the margin."""
    lines = ["| class | masked (ours) | naive (unannotated = background) | margin |", "|---|---|---|---|"]
    for name in result.dice["masked"]:
        lines.append(f"| {name} | {result.dice['masked'][name]:.3f} | {result.dice['naive'][name]:.3f} | "
                     f"{result.margin(name):+.3f} |")
    return "\n".join(lines)
