"""The batch command's flow: decide which cases to run, run them on an engine, record, summarise.

>>> from UniversalSegLib.batch.run import BatchOptions, run_batch
>>> summary = run_batch(["ct/"], BatchOptions("out/", WorkerSettings("swinunetr", classes="liver")))  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..errors import UsageError
from ..helpers import sha256_file
from .inputs import CaseInput, collect_cases
from .state import BatchState, database_name, input_fingerprint, options_digest, shard_of
from .worker import CaseJob, CaseOutcome, WorkerSettings

__all__ = ["BatchOptions", "BatchSummary", "WorkerSettings", "run_batch", "parse_shard", "ENGINES"]

ENGINES = ("local", "ray")


@dataclass
class BatchOptions:
    """How a batch runs; ``segmentation`` is what each case gets (model, classes, formats, device...)."""

    output: str
    segmentation: WorkerSettings = field(default_factory=lambda: WorkerSettings("swinunetr"))
    overwrite: bool = False
    retry_failed: bool = False
    shard: tuple[int, int] | None = None
    engine: str = "local"
    address: str | None = None
    workers: int | None = None
    expected_volumes: str | None = None
    progress: bool = True
    #: Ray engine only: called with the actors' process ids whenever the pool changes (tests).
    on_workers: Callable[[list[int]], None] | None = field(default=None, repr=False)


@dataclass
class BatchSummary:
    total: int  # cases of this batch (this shard)
    ran: int
    skipped: int
    done: int  # finished successfully, this run or before
    failed: list[tuple[str, str]]  # (case id, error) of every case that stands failed
    seconds: float
    database: Path
    queue: Path | None = None
    report: Path | None = None

    @property
    def cases_per_hour(self) -> float:
        return 3600.0 * self.ran / self.seconds if self.seconds > 0 and self.ran else 0.0

    def lines(self) -> list[str]:
        out = [f"{self.total} cases: {self.done} done, {len(self.failed)} failed; this run segmented {self.ran} "
               f"({self.skipped} already up to date) in {self.seconds:.0f} s ({self.cases_per_hour:.0f} cases/hour)"]
        out += [f"  failed {case}: {error}" for case, error in self.failed]
        out.append(f"state: {self.database}")
        if self.queue is not None:
            out.append(f"review queue: {self.queue}\nreport: {self.report}")
        return out


def parse_shard(text: str) -> tuple[int, int]:
    """``"2/8"`` -> (2, 8): shard 2 of 8 (1-based)."""
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text!r}: give K/N, e.g. 2/8 (shard 2 of 8).") from None
    if not 1 <= k <= n:
        raise UsageError(f"--shard {text!r}: K must be between 1 and N.")
    return k, n


def _case_options(settings: WorkerSettings) -> str:
    """The options that change a case's outputs (device, threads, runtime and engine do not)."""
    return options_digest({"classes": settings.classes or "all", "formats": list(settings.formats),
                           "mode": settings.mode, "precision": settings.precision, "force": settings.force,
                           "cross_check": settings.cross_check and _model_checksum(settings.cross_check)})


def _model_checksum(model: str) -> str:
    from ..model_store import resolve_model

    return sha256_file(resolve_model(model))


class _Progress:
    """One bar for the batch (done/failed, cases/hour, ETA) and the current case's stage."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        self.done = self.failed = 0
        self.start = time.perf_counter()
        if enabled and total:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="case", file=sys.stderr, dynamic_ncols=True,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}] {postfix}")

    def _postfix(self, stage: str = "") -> None:
        if self.bar is None:
            return
        hours = (time.perf_counter() - self.start) / 3600
        rate = (self.done + self.failed) / hours if hours > 0 else 0.0
        self.bar.set_postfix_str(f"done {self.done}, failed {self.failed}, {rate:.0f} cases/h" + (f" | {stage}" if stage else ""))

    def stage(self, case_id: str, stage: str) -> None:
        text = f"{case_id}: {stage}"
        if text != getattr(self, "_last_stage", None):  # the sliding window reports every window
            self._last_stage = text
            self._postfix(text)

    def finished(self, ok: bool) -> None:
        if ok:
            self.done += 1
        else:
            self.failed += 1
        if self.bar is not None:
            self.bar.update(1)
            self._postfix()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_batch(inputs: Sequence[str], options: BatchOptions,
              on_outcome: Callable[[CaseOutcome], None] | None = None) -> BatchSummary:
    """Segment every case of ``inputs`` that is not up to date in ``options.output``; see the module docs."""
    from ..io.formats import parse_formats
    from ..model_store import resolve_model

    if options.engine not in ENGINES:
        raise UsageError(f"Unknown engine {options.engine!r}; choose {' or '.join(ENGINES)}.")
    try:
        settings = dataclasses.replace(options.segmentation, formats=parse_formats(options.segmentation.formats or None))
    except ValueError as err:
        raise UsageError(str(err)) from err
    out = Path(options.output).expanduser().absolute()
    cases: list[CaseInput] = collect_cases(inputs)
    if options.shard is not None:
        cases = [c for c in cases if shard_of(c.case_id, options.shard[1]) == options.shard[0]]
    out.mkdir(parents=True, exist_ok=True)
    model_checksum = sha256_file(resolve_model(settings.model))
    case_options = _case_options(settings)
    start = time.perf_counter()
    state = BatchState(out / database_name(options.shard))
    try:
        jobs, fingerprints, skipped = [], {}, 0
        for case in cases:
            fingerprints[case.case_id] = fingerprint = input_fingerprint(case.path)
            record = state.get(case.case_id)
            up_to_date = record is not None and record.matches(fingerprint, model_checksum, case_options)
            if up_to_date and (record.status == "done" or (record.status == "failed" and not options.retry_failed)):
                skipped += 1
                continue
            jobs.append(CaseJob(case.case_id, case.path, str(out / case.case_id), known=record is not None,
                                overwrite=options.overwrite))
        paths = {c.case_id: c.path for c in cases}
        progress = _Progress(len(jobs), options.progress)

        def on_start(job: CaseJob, worker: str) -> None:
            state.mark_running(job.case_id, paths[job.case_id], fingerprints[job.case_id], model_checksum,
                               case_options, worker)

        def on_done(outcome: CaseOutcome) -> None:
            state.mark_finished(outcome.case_id, outcome.ok, outcome.error, outcome.seconds, outcome.timings,
                                outcome.outputs, outcome.signals, outcome.worker)
            progress.finished(outcome.ok)
            if on_outcome is not None:
                on_outcome(outcome)

        try:
            if options.engine == "ray":
                from .engine_ray import run_on_ray

                run_on_ray(settings, jobs, on_start, on_done, progress.stage, address=options.address,
                           workers=options.workers, on_workers=options.on_workers)
            else:
                from .engine_local import run_local

                run_local(settings, jobs, on_start, on_done, progress.stage)
        finally:
            progress.close()
        records = {r.case_id: r for r in state.records()}
    finally:
        state.close()
    mine = [records[c.case_id] for c in cases if c.case_id in records]
    summary = BatchSummary(
        total=len(cases), ran=len(jobs), skipped=skipped, done=sum(r.status == "done" for r in mine),
        failed=[(r.case_id, r.error or "") for r in mine if r.status == "failed"],
        seconds=time.perf_counter() - start, database=state.path)
    if options.shard is None:
        summary.queue, summary.report = write_review(out, options.expected_volumes)
    return summary


def write_review(folder: Path, expected_volumes: str | None = None) -> tuple[Path, Path]:
    """Score the corpus view of ``folder`` and write ``review_queue.csv`` and ``report.html`` there."""
    from .queue import QUEUE_FILE, build_queue, write_queue_csv
    from .report import write_report
    from .state import corpus_rows

    records = corpus_rows(folder)
    entries = build_queue(records, expected_volumes)
    queue = write_queue_csv(folder / QUEUE_FILE, entries)
    report = write_report(folder / "report.html", records, entries)
    return queue, report
