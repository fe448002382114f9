"""High-level Python API: segment a CT file or DICOM folder and write the results (what the CLI calls).

>>> from UniversalSegLib.api import segment_file
>>> result, written = segment_file("ct.nii.gz", "out/", classes="liver, liver tumor", model="swinunetr")  # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .io import read_volume, write_class_masks, write_dicom_seg, write_label_map, write_seg_nrrd
from .io.atomic import atomic_output, ensure_writable_folder, prepare_output_path
from .io.errors import DicomSegError, OutputExistsError
from .io.volume import Volume
from .io.writers import sidecar_paths
from .pipeline import ProgressCallback, SegmentationResult, Segmenter

__all__ = ["FORMATS", "DEFAULT_FORMATS", "OutputPlan", "plan_outputs", "parse_formats", "segment_file", "write_result", "case_name"]

#: Output formats: name -> what is written.
FORMATS = {
    "nifti": "multi-label NIfTI on the input grid + label table (<case>_labels.nii.gz, .labels.json, .labels.csv)",
    "seg.nrrd": "Slicer segmentation with names, colours and terminology, overlaps kept (<case>.seg.nrrd)",
    "masks": "one binary NIfTI per class (<case>_masks/<class>.nii.gz)",
    "dicom-seg": "DICOM SEG referencing the source series; DICOM input only (<case>_seg.dcm)",
}
DEFAULT_FORMATS = ("nifti", "seg.nrrd")
_EXTENSIONS = (".nii.gz", ".nii", ".seg.nrrd", ".nrrd", ".nhdr", ".mha", ".mhd")


def case_name(path: str | os.PathLike) -> str:
    """Name of a case from its input path: the file name without extension, or the DICOM folder's name."""
    name = Path(path).expanduser().resolve().name
    for ext in _EXTENSIONS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def parse_formats(text: str | Sequence[str] | None) -> tuple[str, ...]:
    if text is None:
        return DEFAULT_FORMATS
    items = [t.strip().lower() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if items == ["all"]:
        return tuple(FORMATS)
    aliases = {"nii": "nifti", "nii.gz": "nifti", "segnrrd": "seg.nrrd", "seg-nrrd": "seg.nrrd", "slicer": "seg.nrrd",
               "dicom": "dicom-seg", "dicomseg": "dicom-seg", "seg.dcm": "dicom-seg"}
    out = []
    for item in items:
        name = aliases.get(item, item)
        if name not in FORMATS:
            raise ValueError(f"Unknown output format {item!r}; choose from {', '.join(FORMATS)} or all.")
        if name not in out:
            out.append(name)
    if not out:
        raise ValueError("No output format given.")
    return tuple(out)


@dataclass(frozen=True)
class OutputPlan:
    folder: Path
    case: str
    formats: tuple[str, ...]

    def paths(self) -> dict[str, Path]:
        f, c = self.folder, self.case
        table = {"nifti": f / f"{c}_labels.nii.gz", "seg.nrrd": f / f"{c}.seg.nrrd", "masks": f / f"{c}_masks",
                 "dicom-seg": f / f"{c}_seg.dcm"}
        out = {name: table[name] for name in self.formats}
        out["summary"] = f / f"{c}_summary.json"
        return out

    def check(self, overwrite: bool, input_format: str | None = None) -> None:
        """Fail before any work if the folder is not writable, an output exists (and overwrite is off), or
        a DICOM SEG is asked for an input that is not DICOM (when ``input_format`` is known)."""
        if input_format is not None and "dicom-seg" in self.formats and input_format != "dicom":
            raise DicomSegError("DICOM SEG output needs a DICOM input series (it references the source images); "
                                f"the input is {input_format}. Choose nifti, seg.nrrd or masks.")
        ensure_writable_folder(self.folder)
        for name, path in self.paths().items():
            if name == "masks":
                if path.exists() and any(path.iterdir()) and not overwrite:
                    raise OutputExistsError(f"Output folder {path} exists and is not empty; use --overwrite to replace its files.")
            else:
                prepare_output_path(path, overwrite)


def plan_outputs(input_path: str | os.PathLike, output_folder: str | os.PathLike, formats=None) -> OutputPlan:
    return OutputPlan(Path(output_folder).expanduser(), case_name(input_path), parse_formats(formats))


def write_result(result: SegmentationResult, plan: OutputPlan, overwrite: bool = False) -> dict[str, Path]:
    """Write every planned output. If one fails, the outputs this call already created are removed again."""
    plan.check(overwrite, result.volume.format)
    paths = plan.paths()
    taxonomy = result.classes
    masks = result.masks
    created: list[Path] = []
    written: dict[str, Path] = {}
    writers: dict[str, Callable] = {
        "nifti": lambda p: write_label_map(p, result.volume, masks, taxonomy, overwrite),
        "seg.nrrd": lambda p: write_seg_nrrd(p, result.volume, masks, taxonomy, overwrite),
        "masks": lambda p: write_class_masks(p, result.volume, masks, taxonomy, overwrite),
        "dicom-seg": lambda p: write_dicom_seg(p, result.volume, masks, taxonomy, overwrite),
    }
    try:
        for name in plan.formats:
            path = paths[name]
            files = [path, *sidecar_paths(path)] if name == "nifti" else [path]
            new = [f for f in files if not f.exists()]
            writers[name](path)
            created.extend(new)
            written[name] = path
        summary = dict(result.summary(), outputs={k: str(v) for k, v in written.items()})
        with atomic_output(paths["summary"], overwrite) as tmp:
            tmp.write_text(json.dumps(summary, indent=2))
        written["summary"] = paths["summary"]
    except BaseException:
        for path in reversed(created):
            _remove_output(path)
        raise
    return written


def _remove_output(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def segment_file(input_path: str | os.PathLike, output_folder: str | os.PathLike | None = None,
                 classes: str | Sequence[str] | None = None, model: str | os.PathLike = "swinunetr",
                 device: str = "auto", precision: str = "float32", threads: int | None = None,
                 formats: str | Sequence[str] | None = None, series_uid: str | None = None, force: bool = False,
                 overwrite: bool = False, reference: bool = False, mode: str | None = None,
                 progress: ProgressCallback | None = None,
                 show_progress: bool = False, segmenter: Segmenter | None = None) -> tuple[SegmentationResult, dict[str, Path]]:
    """Read ``input_path``, segment ``classes`` (None = all), write the results into ``output_folder``.

    Everything that can be checked before the (slow) network runs is checked first: the input, the class
    names, the model, the output folder and existing outputs. Returns the result and the written paths
    (empty when ``output_folder`` is None). ``mode`` is ``"default"``, ``"fast"`` or ``"reference"``
    (:data:`UniversalSegLib.pipeline.MODES`); ``reference=True`` means ``mode="reference"``.
    """
    from .models import resolve_model

    plan = plan_outputs(input_path, output_folder, formats) if output_folder is not None else None
    volume: Volume = read_volume(input_path, series_uid=series_uid, force=force)
    if segmenter is None:
        segmenter = Segmenter(resolve_model(model), device=device, precision=precision, threads=threads, reference=reference,
                              mode=mode)
    requested = segmenter.resolve(classes)
    if plan is not None:
        plan.check(overwrite, volume.format)
    result = segmenter.segment(volume, requested, progress=progress, show_progress=show_progress)
    written = write_result(result, plan, overwrite) if plan is not None else {}
    return result, written
