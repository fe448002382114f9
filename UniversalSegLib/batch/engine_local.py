"""The in-process engine: one model loaded in this process, the cases one after another."""
from __future__ import annotations

from typing import Callable, Sequence

from .worker import CaseJob, CaseOutcome, CaseWorker, WorkerSettings

__all__ = ["run_local"]


def run_local(settings: WorkerSettings, jobs: Sequence[CaseJob], on_start: Callable[[CaseJob, str], None],
              on_done: Callable[[CaseOutcome], None], on_stage: Callable[[str, str], None]) -> None:
    """Run ``jobs`` in this process; the callbacks update the database and the progress display."""
    if not jobs:
        return
    worker = CaseWorker(settings)  # the model is loaded once for the whole batch
    for job in jobs:
        on_start(job, worker.name)
        on_done(worker.run(job, stage=lambda name, case=job.case_id: on_stage(case, name)))
