"""Partially labelled phantom datasets on disk: images, dataset-specific label maps and their specs.

Each dataset of :data:`UniversalSegLib.phantom.PHANTOM_DATASETS` becomes a folder with
``imagesTr/<id>.nii.gz``, ``labelsTr/<id>.nii.gz`` (the dataset's own label values; every organ the
dataset does not label is background, as in real public datasets) and ``dataset.json``, a dataset
specification (:mod:`.spec`) mapping the raw values back to the taxonomy. The full per-class truth of every
phantom is kept too (``truth/<id>.nii.gz``, a taxonomy label map; ``truth/<id>_lesions.json``), for
evaluation.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Iterable, Sequence


from UniversalSegLib.io.writers import nifti_image
from UniversalSegLib.phantom import PHANTOM_DATASETS, generate_phantom, phantom_dataset_spec, phantom_raw_labels

from .presets import PRESETS

__all__ = ["write_phantom_dataset", "write_phantom_datasets", "phantom_seed"]


def phantom_seed(base_seed: int, dataset: str, case: int) -> int:
    """Seed of case ``case`` of ``dataset`` (stable across runs and Python versions)."""
    return int(base_seed) * 1_000_003 + zlib.crc32(dataset.encode()) % 100_000 * 1000 + int(case)


def write_phantom_dataset(folder: str | Path, dataset: str, cases: int, base_seed: int = 0,
                          shape: Sequence[int] = (96, 96, 96), spacing: Sequence[float] = (3.2, 3.2, 3.2),
                          orientation: str = "LPS", lesion_probability: float = 0.5,
                          labels: dict | None = None, sampling: dict | None = None) -> Path:
    """Write ``cases`` phantoms of ``dataset`` into ``folder/<dataset>``; returns the spec path.

    ``labels`` overrides the dataset's label definition (raw value -> taxonomy name), e.g. for a custom
    experiment; by default the definition in ``PHANTOM_DATASETS`` is used. ``sampling`` is the spec's
    crop/zoom entry; by default that of the official dataset's preset of the same name (if any).
    """
    import nibabel as nib

    definition = {"labels": labels} if labels is not None else PHANTOM_DATASETS[dataset]
    root = Path(folder) / dataset
    for sub in ("imagesTr", "labelsTr", "truth"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for case in range(cases):
        case_id = f"{dataset}_{case:04d}"
        phantom = generate_phantom(phantom_seed(base_seed, dataset, case), shape=shape, spacing=spacing,
                                   orientation=orientation, lesion_probability=lesion_probability)
        nib.save(nifti_image(phantom.image, phantom.affine, is_label=False), str(root / "imagesTr" / f"{case_id}.nii.gz"))
        raw = phantom_raw_labels(phantom, definition)
        nib.save(nifti_image(raw, phantom.affine), str(root / "labelsTr" / f"{case_id}.nii.gz"))
        nib.save(nifti_image(phantom.label_map(), phantom.affine), str(root / "truth" / f"{case_id}.nii.gz"))
        (root / "truth" / f"{case_id}.json").write_text(json.dumps({
            "seed": phantom.seed, "present": list(phantom.present), "parameters": phantom.parameters}, indent=1))
    spec = phantom_dataset_spec(dataset) if labels is None else {
        "name": dataset, "labels": {int(k): (None if v in ("bone", "heart") else v) for k, v in labels.items()}}
    document = {
        "name": dataset,
        "description": f"UniversalSeg phantom dataset '{dataset}' (partial labels), base seed {base_seed}",
        "images": "imagesTr/*.nii.gz",
        "labels": "labelsTr/{name}",
        "classes": {str(k): v for k, v in spec["labels"].items()},
    }
    if sampling is None and dataset in PRESETS:
        sampling = PRESETS[dataset]["sampling"]
    if sampling is not None:
        document["sampling"] = dict(sampling)
    path = root / "dataset.json"
    path.write_text(json.dumps(document, indent=1))
    return path


def write_phantom_datasets(folder: str | Path, datasets: Iterable[str] | None = None, cases: int = 4,
                           base_seed: int = 0, **kwargs) -> list[Path]:
    """Write several phantom datasets; returns their spec paths."""
    return [write_phantom_dataset(folder, name, cases, base_seed, **kwargs) for name in (datasets or PHANTOM_DATASETS)]
