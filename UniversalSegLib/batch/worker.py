"""The work on one case, the same whichever engine runs it: read, segment, write, measure.

A :class:`CaseWorker` holds the loaded model (once per process or Ray actor) and turns a
:class:`CaseJob` into a :class:`CaseOutcome` (plain data, so it crosses process boundaries). Any error of
the case (unreadable file, not a CT, out of memory) becomes a failed outcome with its message; the batch
goes on. The outputs go to ``OUT/<case>/``: those of ``segment`` (through :func:`UniversalSegLib.api.write_result`,
one transaction), plus the model-grid probabilities and the quality signals, each written atomically;
the driver marks the case done only after all of them are on disk.
"""
from __future__ import annotations

import json
import os
import socket
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import InputTooLargeError, Interrupted, OutputExistsError, UniversalSegError
from .quality import measure_case, thumbnails

__all__ = ["CaseJob", "CaseOutcome", "CaseWorker", "WorkerSettings", "case_files"]


@dataclass(frozen=True)
class WorkerSettings:
    """What each case gets: the model (and a cross-check model), classes, formats, device, mode...; every
    worker loads its model(s) from these."""

    model: str
    classes: str | None = None
    #: Output formats of ``segment`` (names or aliases; empty: its defaults).
    formats: tuple[str, ...] = ()
    device: str = "auto"
    precision: str = "float32"
    threads: int | None = None
    mode: str = "default"
    runtime: str | None = None
    force: bool = False
    cross_check: str | None = None


@dataclass(frozen=True)
class CaseJob:
    case_id: str
    input: str
    output_folder: str
    #: The batch database already knows this case (its folder may be replaced); otherwise an existing,
    #: non-empty case folder is the user's data and is kept unless ``overwrite``.
    known: bool = False
    overwrite: bool = False


@dataclass
class CaseOutcome:
    case_id: str
    ok: bool
    error: str | None = None
    seconds: float = 0.0
    timings: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    signals: dict = field(default_factory=dict)
    worker: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def case_files(folder: str | os.PathLike, case_id: str) -> dict[str, Path]:
    """The batch's own files of a case, beside those of ``segment``."""
    folder = Path(folder)
    return {"probabilities": folder / f"{case_id}_probabilities.npz",
            "quality": folder / f"{case_id}_quality.json",
            "thumbnails": folder / f"{case_id}_thumbnails.npz"}


def _describe(error: BaseException) -> str:
    if isinstance(error, UniversalSegError):
        return error.user_message
    if isinstance(error, MemoryError):
        return "out of memory while segmenting this case"
    return f"{type(error).__name__}: {error}"


class CaseWorker:
    """The loaded model(s) of one process; :meth:`run` segments one case."""

    def __init__(self, settings: WorkerSettings) -> None:
        from ..model_store import resolve_model
        from ..pipeline import Segmenter

        self.settings = settings
        self.name = f"{socket.gethostname()}:{os.getpid()}"

        def load(model: str) -> Segmenter:
            return Segmenter(str(resolve_model(model)), device=settings.device, precision=settings.precision,
                             threads=settings.threads, mode=settings.mode, runtime=settings.runtime)

        self.segmenter = load(settings.model)
        self.checker = load(settings.cross_check) if settings.cross_check else None

    def pid(self) -> int:
        return os.getpid()

    def run(self, job: CaseJob, stage: Callable[[str], None] | None = None) -> CaseOutcome:
        """Segment one case; never raises for a problem of the case (the outcome says what failed)."""
        start = time.perf_counter()
        try:
            outcome = self._run(job, stage or (lambda name: None))
        except (KeyboardInterrupt, Interrupted):  # Ctrl-C or SIGTERM stops the batch, not just this case
            raise
        except BaseException as error:  # noqa: BLE001 - one bad case must not stop the batch
            detail = _describe(error)
            if not isinstance(error, (UniversalSegError, MemoryError, OSError)):
                detail += " | " + traceback.format_exc(limit=3).strip().splitlines()[-1]
            outcome = CaseOutcome(job.case_id, ok=False, error=detail)
        outcome.seconds = round(time.perf_counter() - start, 3)
        outcome.worker = self.name
        return outcome

    def _run(self, job: CaseJob, stage: Callable[[str], None]) -> CaseOutcome:
        from ..api import OutputPlan, write_result
        from ..io import read_volume
        from ..io.atomic import atomic_output

        folder = Path(job.output_folder)
        if not job.known and not job.overwrite and folder.is_dir() and any(folder.iterdir()):
            raise OutputExistsError(f"Case folder {folder} exists and is not from this batch; use --overwrite "
                                    "to replace its files.")
        stage("read")
        volume = read_volume(job.input, force=self.settings.force)
        segmenter = self.segmenter
        requested = segmenter.resolve(self.settings.classes)
        progress = lambda name, fraction: stage(name)  # noqa: E731
        try:
            result = segmenter.segment(volume, requested, progress=progress, keep_probabilities=True)
            cross = None
            if self.checker is not None:
                stage("cross-check")
                mine = {c.key: c.index for c in requested}  # two models may number their classes differently
                shared = [c for c in self.checker.resolve(None) if c.key in mine]
                other = self.checker.segment(volume, shared)
                cross = {mine[c.key]: other.masks[c.index] for c in shared}
        except MemoryError:
            raise InputTooLargeError(f"{job.input}: not enough memory to segment {volume.describe()}.") from None

        stage("quality")
        volumes = {s.index: s.volume_ml for s in result.statistics()}
        probabilities = result.probabilities or {}
        signals = measure_case(probabilities, result.classes, volumes, cross_check=cross, masks=result.masks)

        stage("write")
        plan = OutputPlan(folder, job.case_id, self.settings.formats)
        files = case_files(folder, job.case_id)
        folder.mkdir(parents=True, exist_ok=True)
        order = [c.index for c in result.classes if c.index in probabilities]
        with atomic_output(files["probabilities"], overwrite=True) as temporary:
            with open(temporary, "wb") as handle:
                np.savez_compressed(
                    handle, probabilities=np.stack([probabilities[i] for i in order]) if order else np.zeros((0, 1, 1, 1), np.uint8),
                    class_indices=np.asarray(order, dtype=np.int32),
                    class_keys=np.asarray([c.key for c in result.classes if c.index in probabilities]),
                    affine=result.preprocessed.affine, scale=np.asarray(255, dtype=np.int32))
        with atomic_output(files["thumbnails"], overwrite=True) as temporary:
            with open(temporary, "wb") as handle:
                np.savez_compressed(handle, **thumbnails(result.preprocessed.array, probabilities, result.classes))
        with atomic_output(files["quality"], overwrite=True) as temporary:
            temporary.write_text(json.dumps({"case": job.case_id, "input": job.input, "classes": signals}, indent=1))
        written = write_result(result, plan, overwrite=True)
        outputs = {name: str(path) for name, path in written.items()}
        outputs.update({name: str(path) for name, path in files.items()})
        return CaseOutcome(job.case_id, ok=True, timings=dict(result.timings), outputs=outputs, signals=signals)

