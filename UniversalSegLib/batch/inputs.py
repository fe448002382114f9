"""The cases of a batch: from folders, glob patterns, or a CSV/TSV list (path and optional case id).

A folder contributes every CT file in it (the extensions :func:`~UniversalSegLib.io.readers.read_volume`
reads) and every sub-folder holding files but no such CT file (a DICOM series folder). A list file
(``.csv`` or ``.tsv``) has one case per row: the path (relative paths are relative to the list) and,
optionally, a case id; a header row naming a ``path`` column is recognised.
"""
from __future__ import annotations

import csv
import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..api import case_name
from ..errors import InputNotFoundError, UsageError
from ..io.readers import format_from_path

__all__ = ["CaseInput", "collect_cases", "LIST_SUFFIXES"]

#: Input arguments ending so are lists of cases rather than images.
LIST_SUFFIXES = (".csv", ".tsv")
_SAFE_ID = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class CaseInput:
    """One case: its id (the name of its output folder) and its CT file or DICOM folder."""

    case_id: str
    path: str


def _safe_id(text: str) -> str:
    """A case id usable as a folder name everywhere and as a training-case id (letters, digits, _ and -)."""
    cleaned = _SAFE_ID.sub("_", text.strip()).strip("_")
    if not cleaned:
        raise UsageError(f"Case id {text!r} has no usable characters; give ids of letters, digits, '_' or '-'.")
    return cleaned


def _is_ct_file(path: Path) -> bool:
    """A volume file (single DICOM slices make up a series folder instead)."""
    return path.is_file() and format_from_path(path) not in (None, "dicom")


def _folder_cases(folder: Path) -> list[Path]:
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if _is_ct_file(entry):
            found.append(entry)
        elif entry.is_dir():
            files = [f for f in entry.iterdir() if f.is_file() and not f.name.startswith(".")]
            if files and not any(_is_ct_file(f) for f in files):
                found.append(entry)  # a DICOM series folder
    return found


def _list_cases(path: Path) -> list[tuple[str | None, Path]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, newline="", encoding="utf-8-sig") as handle:
        rows = [row for row in csv.reader(handle, delimiter=delimiter) if row and any(c.strip() for c in row)]
    path_col, id_col = 0, 1
    if rows and "path" in [c.strip().lower() for c in rows[0]]:
        header = [c.strip().lower() for c in rows.pop(0)]
        path_col = header.index("path")
        id_col = next((header.index(n) for n in ("case", "case_id", "id") if n in header), None)
    out = []
    for number, row in enumerate(rows, start=1):
        if path_col >= len(row) or not row[path_col].strip():
            raise UsageError(f"{path}: row {number} has no path.")
        item = Path(row[path_col].strip()).expanduser()
        item = item if item.is_absolute() else path.parent / item
        case_id = row[id_col].strip() if id_col is not None and id_col < len(row) and row[id_col].strip() else None
        out.append((case_id, item))
    return out


def collect_cases(items: Iterable[str]) -> list[CaseInput]:
    """Expand folders, globs and list files into cases; ids must be unique (name them in a list file)."""
    cases: list[CaseInput] = []
    for item in items:
        path = Path(item).expanduser()
        if path.suffix.lower() in LIST_SUFFIXES and path.is_file():
            entries = _list_cases(path)
        elif path.is_dir() and _folder_cases(path):
            entries = [(None, p) for p in _folder_cases(path)]
        elif path.exists():
            entries = [(None, path)]  # one CT file or one DICOM folder
        else:
            matches = sorted(glob.glob(os.path.expanduser(item), recursive=True))
            if not matches:
                raise InputNotFoundError(f"{item}: no such file or folder, and no file matches it as a pattern.")
            entries = [(None, Path(m)) for m in matches]
        for case_id, entry in entries:
            cases.append(CaseInput(_safe_id(case_id or case_name(entry)), str(Path(entry).absolute())))
    seen: dict[str, str] = {}
    for case in cases:
        if case.case_id in seen and seen[case.case_id] != case.path:
            raise UsageError(f"Two inputs have the case id {case.case_id!r} ({seen[case.case_id]} and {case.path}); "
                             "list the cases in a CSV file with a unique id per row.")
        seen[case.case_id] = case.path
    unique = {c.case_id: c for c in cases}
    if not unique:
        raise UsageError("No cases found in the inputs given.")
    return list(unique.values())
