"""High-level Python API: segment a CT file or DICOM folder and write the results (what the CLI calls).

The output formats are those of the registry in :mod:`UniversalSegLib.io.formats`.

>>> from UniversalSegLib.api import segment_file
>>> result, written = segment_file("ct.nii.gz", "out/", classes="liver, liver tumor", model="swinunetr")  # doctest: +SKIP
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .checkpoint_metadata import read_metadata
from .io import read_volume
from .io.atomic import (MIN_OUTPUT_BYTES_PER_VOXEL, OutputTransaction, check_free_space, check_writable_folder,
                        prepare_output_path, sigterm_as_interrupt)
from .errors import InputTooLargeError, InvalidArgumentTypeError, OutputExistsError, UsageError
from .io.volume import Volume
from .io.formats import OUTPUT_FORMATS, parse_formats
from .pipeline import ProgressCallback, SegmentationResult, Segmenter
from .runtime import requested_runtime
from .settings import MODES, PRECISIONS
from .taxonomy import Taxonomy, get_taxonomy

__all__ = ["OutputPlan", "plan_outputs", "parse_formats", "segment_file", "write_result", "case_name",
           "model_classes"]

_EXTENSIONS = (".nii.gz", ".nii", ".seg.nrrd", ".nrrd", ".nhdr", ".mha", ".mhd")


def case_name(path: str | os.PathLike) -> str:
    """Name of a case from its input path: the file name without extension, or the DICOM folder's name."""
    name = Path(path).expanduser().resolve().name
    for ext in _EXTENSIONS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


@dataclass(frozen=True)
class OutputPlan:
    folder: Path
    case: str
    formats: tuple[str, ...]

    def paths(self) -> dict[str, Path]:
        out = {name: OUTPUT_FORMATS[name].path(self.folder, self.case) for name in self.formats}
        out["summary"] = self.folder / f"{self.case}_summary.json"
        return out

    def check(self, overwrite: bool, input_format: str | None = None, volume: Volume | None = None) -> None:
        """Fail before any work if the folder is not writable, an output exists (and overwrite is off), or
        a DICOM SEG is asked for an input that is not DICOM (when ``input_format`` is known) or whose
        series a SEG cannot reference (no UIDs...: when the ``volume`` read is given)."""
        for name in self.formats:
            if OUTPUT_FORMATS[name].check_input is not None:
                OUTPUT_FORMATS[name].check_input(input_format, volume)
        check_writable_folder(self.folder)  # created only when the outputs are written
        if volume is not None:
            voxels = math.prod(volume.shape)
            per_voxel = sum(MIN_OUTPUT_BYTES_PER_VOXEL["dicom-seg" if name == "dicom-seg" else "compressed"]
                            for name in self.formats)
            check_free_space(self.folder, int(voxels * per_voxel))
        for name, path in self.paths().items():
            if name in OUTPUT_FORMATS and OUTPUT_FORMATS[name].folder:
                if path.exists() and any(path.iterdir()) and not overwrite:
                    raise OutputExistsError(f"Output folder {path} exists and is not empty; use --overwrite to replace its files.")
            else:
                prepare_output_path(path, overwrite, create=False)


def plan_outputs(input_path: str | os.PathLike, output_folder: str | os.PathLike, formats=None) -> OutputPlan:
    return OutputPlan(Path(output_folder).expanduser(), case_name(input_path), parse_formats(formats))


def write_result(result: SegmentationResult, plan: OutputPlan, overwrite: bool = False) -> dict[str, Path]:
    """Write every planned output as one transaction (:class:`~UniversalSegLib.io.atomic.OutputTransaction`).

    All outputs are written beside the previous ones and then switched in together: afterwards the
    folder holds either the complete new set or, after any failure or Ctrl-C/SIGTERM, the previous set
    unchanged (output folders this call created are removed again). Raises
    :class:`~UniversalSegLib.errors.WriteInterrupted` (exit code 130) when interrupted, with a message
    that says which of the two is on disk, and :class:`~UniversalSegLib.errors.OutputWriteError` (exit
    code 5) when the disk is full.
    """
    plan.check(overwrite, result.volume.format, volume=result.volume)
    paths = plan.paths()
    taxonomy = result.classes
    masks = result.masks
    written: dict[str, Path] = {}
    # Inside the run folder every name is new: the writers never replace anything there.
    with sigterm_as_interrupt(), OutputTransaction(plan.folder, overwrite) as run:
        for name in plan.formats:
            path = paths[name]
            fmt = OUTPUT_FORMATS[name]
            for extra in fmt.extra_files(path):
                run.stage(extra)
            fmt.write(run.stage(path), result.volume, masks, taxonomy)
            written[name] = path
        written["summary"] = paths["summary"]
        summary = dict(result.summary(), outputs={k: str(v) for k, v in written.items() if k != "summary"})
        run.stage(paths["summary"]).write_text(json.dumps(summary, indent=2))
        run.commit()
    return written


def model_classes(model: str | os.PathLike) -> Taxonomy:
    """The class table of a model without loading its weights (to check class names before any slow step):
    a UniversalSeg checkpoint's own, else the official 32 classes of the official checkpoints."""
    path = Path(model).expanduser()
    if path.suffix == ".safetensors" and path.is_file():
        return read_metadata(path).classes
    return get_taxonomy()


def check_run_options(mode: str | None, runtime: str | None, precision: str, threads: int | None,
                      reference: bool = False) -> None:
    """Refuse an impossible request before anything slow happens: an unknown mode, runtime or precision, a
    thread count that is not a positive whole number (:class:`~UniversalSegLib.errors.UsageError`)."""
    if reference and mode not in (None, "reference"):
        raise UsageError(f"reference=True contradicts mode={mode!r}.")
    if mode is not None and mode not in MODES:
        raise UsageError(f"Unknown mode {mode!r}; choose one of {', '.join(MODES)}.")
    if precision not in PRECISIONS:
        raise UsageError(f"Unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}.")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise UsageError(f"The thread count must be a whole number of at least 1, got {threads!r}.")
    requested_runtime(runtime)


def segment_file(input_path: str | os.PathLike, output_folder: str | os.PathLike | None = None,
                 classes: str | Sequence[str] | None = None, model: str | os.PathLike = "swinunetr",
                 device: str = "auto", precision: str = "float32", threads: int | None = None,
                 formats: str | Sequence[str] | None = None, series_uid: str | None = None, force: bool = False,
                 overwrite: bool = False, reference: bool = False, mode: str | None = None,
                 runtime: str | None = None, progress: ProgressCallback | None = None,
                 show_progress: bool = False, segmenter: Segmenter | None = None,
                 log: Callable[[str], None] | None = None) -> tuple[SegmentationResult, dict[str, Path]]:
    """Read ``input_path``, segment ``classes`` (None = all), write the results into ``output_folder``.

    Everything that can be checked before the (slow) network runs is checked first, cheapest first: the
    output folder and existing outputs, the class names (against the model's class table), the input,
    the model. Returns the result and the written paths (empty when ``output_folder`` is None). ``mode`` is
    ``"default"``, ``"fast"`` or ``"reference"`` (:data:`UniversalSegLib.settings.MODES`);
    ``reference=True`` means ``mode="reference"``. ``runtime`` is ``"auto"``, ``"torch"`` or
    ``"openvino"`` (see :class:`~UniversalSegLib.pipeline.Segmenter`). ``progress`` also gets a
    ``"write"`` stage before the outputs are written; ``log`` gets one line each about the input, the
    model and the classes.
    """
    from .model_store import resolve_model

    say = log or (lambda line: None)
    check_run_options(mode, runtime, precision, threads, reference)
    if classes is not None and not isinstance(classes, (str, list, tuple)):
        raise InvalidArgumentTypeError(f"classes are names like 'liver, pancreas' or a list of names, got {classes!r}.")
    plan = plan_outputs(input_path, output_folder, formats) if output_folder is not None else None
    if plan is not None:
        plan.check(overwrite)  # fail before any slow step
    wanted = None if not classes or (isinstance(classes, str) and classes.strip().lower() == "all") else classes
    if wanted is not None and segmenter is None:
        wanted = model_classes(model).resolve(wanted)  # unknown names fail before the input is read

    volume: Volume = read_volume(input_path, series_uid=series_uid, force=force)
    say(f"input: {volume.describe()}")
    for note in volume.notes:
        say(f"note: {note}")
    if segmenter is None:
        checkpoint = resolve_model(model)
        segmenter = Segmenter(checkpoint, device=device, precision=precision, threads=threads, reference=reference,
                              mode=mode, runtime=runtime)
    else:
        checkpoint = segmenter.checkpoint.path
    requested = segmenter.resolve(wanted)
    if plan is not None:
        plan.check(overwrite, volume.format, volume=volume)
    say(f"model: {checkpoint} ({segmenter.checkpoint.metadata.model.backbone}) on {segmenter.device}, "
        f"{segmenter.runtime} runtime")
    say(f"classes ({len(requested)}): {', '.join(c.display_name for c in requested)}")
    try:
        result = segmenter.segment(volume, requested, progress=progress, show_progress=show_progress)
    except MemoryError:
        raise InputTooLargeError(f"{input_path}: not enough memory to segment {volume.describe()}.") from None
    if plan is None:
        return result, {}
    if progress is not None:
        progress("write", 0.0)
    return result, write_result(result, plan, overwrite)
