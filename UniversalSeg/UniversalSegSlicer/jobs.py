"""Background jobs: run the network in a worker thread while Slicer's GUI stays responsive.

Why a thread and not a process: the model stays loaded between runs (a second Apply or a click on the
image must not reload 250 MB of weights), PyTorch releases the GIL inside its kernels so the GUI keeps
running, and results (numpy arrays) come back without serialisation. One persistent worker thread serves
all jobs, because CUDA/cuDNN keep per-thread state that is costly to rebuild.

Rules that keep the scene safe:

* a job's function receives only plain data (numpy arrays, paths); it never touches MRML or VTK objects;
* progress and state are plain attributes written by the worker and read by the main thread;
* results are applied to the scene by the main thread after :meth:`BackgroundJob.done` (the widget polls
  with a timer), in one step, so cancel or failure leave the scene exactly as it was.
"""
from __future__ import annotations

import sys
import threading
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from enum import Enum
from typing import Any, Callable

__all__ = ["JobState", "JobCancelled", "BackgroundJob", "BackgroundRunner", "STAGE_LABELS", "STAGE_WEIGHTS"]

#: Plain-language labels of the stages a job reports (library stages plus the module's own).
STAGE_LABELS = {
    "queued": "Waiting for the previous run to finish",
    "load": "Loading the model",
    "check": "Checking the input volume",
    "preprocess": "Preparing the image (orientation, 1.5 mm grid, intensity window)",
    "inference": "Running the network",
    "postprocess": "Cleaning up the masks",
    "invert": "Mapping the masks back onto the input grid",
    "done": "Finished",
}
#: Share of the whole run each stage takes, for one overall progress bar.
STAGE_WEIGHTS = {"load": 0.05, "check": 0.02, "preprocess": 0.05, "inference": 0.78, "postprocess": 0.05,
                 "invert": 0.05}


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobCancelled(RuntimeError):
    """Raised inside a job's function (through :meth:`BackgroundJob.check_cancelled`) after Cancel."""


class BackgroundJob:
    """One unit of background work: state, progress, cancel flag, result or error.

    The job function is called as ``function(job)``; it reports with :meth:`report` and polls
    :meth:`cancelled` / :meth:`check_cancelled`.
    """

    def __init__(self, description: str, on_progress: Callable[[str, float], None] | None = None):
        self.description = description
        self.state = JobState.QUEUED
        self.stage = "queued"
        self.stage_fraction = 0.0
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.error: BaseException | None = None
        self.error_details = ""
        self._result: Any = None
        self._cancel = threading.Event()
        self._finished = threading.Event()
        self._on_progress = on_progress
        self.metadata: dict = {}

    # -- worker side
    def report(self, stage: str, fraction: float) -> None:
        self.stage, self.stage_fraction = stage, min(max(float(fraction), 0.0), 1.0)
        if self._on_progress is not None:
            self._on_progress(stage, self.stage_fraction)

    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def check_cancelled(self) -> None:
        if self._cancel.is_set():
            raise JobCancelled(f"{self.description}: cancelled")

    # -- main-thread side
    def cancel(self) -> None:
        """Ask the job to stop; it does at the next check (between network windows: seconds)."""
        self._cancel.set()

    def done(self) -> bool:
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job has finished (True) or ``timeout`` seconds passed (False)."""
        return self._finished.wait(timeout)

    def result(self) -> Any:
        """The job's return value; raises the job's error, or :class:`JobCancelled` after cancel."""
        if not self._finished.is_set():
            raise RuntimeError(f"{self.description} has not finished yet")
        if self.state is JobState.CANCELLED:
            raise JobCancelled(f"{self.description} was cancelled")
        if self.error is not None:
            raise self.error
        return self._result

    @property
    def progress(self) -> float:
        """Overall progress 0..1 (stage weights of :data:`STAGE_WEIGHTS`)."""
        if self.state is JobState.SUCCEEDED:
            return 1.0
        order = list(STAGE_WEIGHTS)
        if self.stage not in STAGE_WEIGHTS:
            return 0.0
        before = sum(STAGE_WEIGHTS[s] for s in order[: order.index(self.stage)])
        return min(1.0, before + STAGE_WEIGHTS[self.stage] * self.stage_fraction)

    @property
    def status_text(self) -> str:
        if self.state is JobState.RUNNING or self.state is JobState.QUEUED:
            label = STAGE_LABELS.get(self.stage, self.stage)
            return f"{label} ({100 * self.stage_fraction:.0f} %)" if self.stage == "inference" else label
        if self.state is JobState.FAILED:
            return f"Failed: {self.error}"
        return {JobState.SUCCEEDED: "Finished", JobState.CANCELLED: "Cancelled"}[self.state]

    @property
    def elapsed(self) -> float:
        if self.started_at is None:
            return 0.0
        return (self.finished_at or time.monotonic()) - self.started_at

    # -- runner side
    def _run(self, function: Callable[["BackgroundJob"], Any]) -> None:
        self.state = JobState.RUNNING
        self.started_at = time.monotonic()
        try:
            self.check_cancelled()
            self._result = function(self)
            self.check_cancelled()
            self.state = JobState.SUCCEEDED
            self.stage, self.stage_fraction = "done", 1.0
        except BaseException as error:  # reported to the main thread, never lost in the worker
            self._result = None
            if _is_cancellation(error):
                self.state = JobState.CANCELLED
            else:
                self.error = error
                self.error_details = traceback.format_exc()
                self.state = JobState.FAILED
        finally:
            self.finished_at = time.monotonic()
            self._finished.set()


def _is_cancellation(error: BaseException) -> bool:
    """JobCancelled, or the library's InferenceCancelled (looked up only if the library is loaded: a job
    such as a download must not import PyTorch just to recognise it)."""
    if isinstance(error, JobCancelled):
        return True
    inference = sys.modules.get("UniversalSegLib.inference")
    return inference is not None and isinstance(error, inference.InferenceCancelled)


class BackgroundRunner:
    """A single persistent worker thread that runs :class:`BackgroundJob` functions one after another."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def submit(self, job: BackgroundJob, function: Callable[[BackgroundJob], Any]) -> BackgroundJob:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="UniversalSeg")
            future: Future = self._executor.submit(job._run, function)
        job.metadata["future"] = future
        return job

    def shutdown(self, wait: bool = True) -> None:
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=wait)
                self._executor = None
