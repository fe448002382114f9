"""Where reviewed corrections of a batch live: "Export for training" of a batch case writes a training
case (:mod:`UniversalSegLib.io.training_case`) into a subfolder of the case's own folder,
``OUT/<case>/corrected/<case>.case.json`` with its ``_ct.nii.gz`` and ``_labels.nii.gz``, under the batch's
case id (a subfolder: the model's own ``<case>_labels.nii.gz`` beside it is the batch's output and stays).
The training package reads them back as a dataset (``batch: OUT`` in a dataset specification).
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputNotFoundError
from ..io.training_case import CASE_JSON_SUFFIX, case_paths
from .state import database_paths

__all__ = ["correction_paths", "exported_corrections", "CORRECTIONS_FOLDER"]

#: Subfolder of a case's folder holding its exported training case.
CORRECTIONS_FOLDER = "corrected"


def correction_paths(batch_folder: str | os.PathLike, case_id: str) -> dict[str, Path]:
    """The training-case files of case ``case_id`` of a batch (``{"json", "image", "labels"}``)."""
    return case_paths(Path(batch_folder) / case_id / CORRECTIONS_FOLDER, case_id)


def exported_corrections(batch_folder: str | os.PathLike) -> list[Path]:
    """The ``.case.json`` of every case of the batch in ``batch_folder`` that has been exported for training."""
    folder = Path(batch_folder).expanduser()
    if not database_paths(folder):
        raise InputNotFoundError(f"{folder} is not a batch folder (no batch.sqlite); give the -o folder of "
                                 "'universalseg batch'.")
    found = folder.glob(f"*/{CORRECTIONS_FOLDER}/*{CASE_JSON_SUFFIX}")
    return sorted(p for p in found if p.name == f"{p.parent.parent.name}{CASE_JSON_SUFFIX}")
