"""The output-format registry: every kind of result file UniversalSeg writes, by name.

The output plan (which files a run writes and whether they may be written), the writing of a result, the
``--format`` help of the command line and the demo all read this registry, so a new format is one writer
function plus one :func:`register_output_format` call (see ARCHITECTURE.md).

A writer is called as ``write(path, volume, masks, classes, overwrite=False)``: ``masks`` maps class
indices to boolean arrays on the volume's grid, ``classes`` is the class table (names, colours, codes).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import DicomSegError, InvalidArgumentTypeError, UsageError
from .dicom_seg import check_dicom_seg_sources, write_dicom_seg
from .seg_nrrd import write_seg_nrrd
from .volume import Volume
from .writers import sidecar_paths, write_class_masks, write_label_map

__all__ = ["OutputFormat", "OUTPUT_FORMATS", "register_output_format", "parse_formats", "default_formats",
           "describe_formats"]


def _no_extra_files(path: Path) -> Sequence[Path]:
    return ()


@dataclass(frozen=True)
class OutputFormat:
    """One output format.

    Attributes:
        name: what ``--format`` takes (``"seg.nrrd"``).
        description: one line for the help text.
        filename: the output's name in the output folder, with ``{case}`` for the case name.
        write: the writer, ``write(path, volume, masks, classes, overwrite=False)``.
        aliases: other spellings ``--format`` accepts.
        default: written when no format is asked for.
        folder: the output is a folder of files rather than one file.
        extra_files: the files written beside the output (e.g. a label table), from its path.
        check_input: called with the input's format and (once read) the volume before any work; raises
            when this format cannot be written for that input.
    """

    name: str
    description: str
    filename: str
    write: Callable[..., Any]
    aliases: tuple[str, ...] = ()
    default: bool = False
    folder: bool = False
    extra_files: Callable[[Path], Sequence[Path]] = _no_extra_files
    check_input: Callable[[str | None, Volume | None], None] | None = None

    def path(self, folder: Path, case: str) -> Path:
        return Path(folder) / self.filename.format(case=case)


#: Registered output formats by name, in registration order (the order of ``--format all``).
OUTPUT_FORMATS: dict[str, OutputFormat] = {}


def register_output_format(fmt: OutputFormat, replace: bool = False) -> OutputFormat:
    """Make ``fmt`` available to the output plan, the command line and the API."""
    taken = {alias for other in OUTPUT_FORMATS.values() if other.name != fmt.name for alias in (other.name, *other.aliases)}
    clash = taken & {fmt.name, *fmt.aliases}
    if (fmt.name in OUTPUT_FORMATS and not replace) or clash:
        raise ValueError(f"Output format name(s) {sorted(clash or {fmt.name})} are registered already.")
    OUTPUT_FORMATS[fmt.name] = fmt
    return fmt


def default_formats() -> tuple[str, ...]:
    return tuple(name for name, fmt in OUTPUT_FORMATS.items() if fmt.default)


def describe_formats() -> str:
    """``"nifti, seg.nrrd, masks, dicom-seg, or all (default: nifti,seg.nrrd)"`` for help texts."""
    return f"{', '.join(OUTPUT_FORMATS)}, or all (default: {','.join(default_formats())})"


def parse_formats(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """Format names from ``"nifti,seg.nrrd"``, a list of names or aliases, ``"all"``, or None (the defaults)."""
    if text is None:
        return default_formats()
    if not isinstance(text, (str, list, tuple)) or not all(isinstance(t, str) for t in text):
        raise InvalidArgumentTypeError(f"Output formats are names like 'nifti,seg.nrrd' or a list of names, got {text!r}.")
    items = [t.strip().lower() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if items == ["all"]:
        return tuple(OUTPUT_FORMATS)
    aliases = {alias: fmt.name for fmt in OUTPUT_FORMATS.values() for alias in (fmt.name, *fmt.aliases)}
    out = []
    for item in items:
        name = aliases.get(item)
        if name is None:
            raise UsageError(f"Unknown output format {item!r}; choose from {', '.join(OUTPUT_FORMATS)} or all.")
        if name not in out:
            out.append(name)
    if not out:
        raise UsageError("No output format given.")
    return tuple(out)


# ---------------------------------------------------------------------------------------------- built-in
def _check_dicom_input(input_format: str | None, volume: Volume | None) -> None:
    """A DICOM SEG references the source images: only a DICOM series with its UIDs can have one."""
    if input_format is not None and input_format != "dicom":
        others = [name for name, fmt in OUTPUT_FORMATS.items() if fmt.check_input is None]
        raise DicomSegError("DICOM SEG output needs a DICOM input series (it references the source images); "
                            f"the input is {input_format}. Choose {', '.join(others[:-1])} or {others[-1]}.")
    if volume is not None:
        check_dicom_seg_sources(volume)


register_output_format(OutputFormat(
    "nifti", "multi-label NIfTI on the input grid + label table (<case>_labels.nii.gz, .labels.json, .labels.csv)",
    "{case}_labels.nii.gz", write_label_map, aliases=("nii", "nii.gz"), default=True, extra_files=sidecar_paths))
register_output_format(OutputFormat(
    "seg.nrrd", "Slicer segmentation with names, colours and terminology, overlaps kept (<case>.seg.nrrd)",
    "{case}.seg.nrrd", write_seg_nrrd, aliases=("segnrrd", "seg-nrrd", "slicer"), default=True))
register_output_format(OutputFormat(
    "masks", "one binary NIfTI per class (<case>_masks/<class>.nii.gz)",
    "{case}_masks", write_class_masks, folder=True))
register_output_format(OutputFormat(
    "dicom-seg", "DICOM SEG referencing the source series; DICOM input only (<case>_seg.dcm)",
    "{case}_seg.dcm", write_dicom_seg, aliases=("dicom", "dicomseg", "seg.dcm"), check_input=_check_dicom_input))
