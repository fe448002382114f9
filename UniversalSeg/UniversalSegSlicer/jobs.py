"""Jobs: what the panel shows and cancels while the worker process runs a request.

The work itself runs in another process (:mod:`UniversalSegLib.worker`); a :class:`BackgroundJob` is its
state on Slicer's side: stage and progress, the cancel request, and the result or error. Nothing here
runs in a thread: :meth:`BackgroundJob.done` reads the worker's new events (the widget calls it from a
timer, :meth:`BackgroundJob.wait` in a loop for scripts), and the listener turns them into state.

Rules that keep the scene safe:

* the worker receives only voxel copies and paths; it never touches MRML or VTK objects;
* results are applied to the scene by the main thread after :meth:`BackgroundJob.done`, in one step, so
  cancel or failure leave the scene exactly as it was (except a quick preview the caller chose to show,
  see :meth:`BackgroundJob.preview`);
* Cancel ends the job at once (the panel is free again); the worker stops at its next check and the
  result it may still produce is discarded.
"""
from __future__ import annotations

import time
from enum import Enum
from typing import Any, Callable

from UniversalSegLib.errors import Interrupted
from UniversalSegLib.settings import CONVERT_STAGE, CONVERT_STAGE_LABEL
from UniversalSegLib.settings import STAGE_LABELS as _LIBRARY_STAGE_LABELS

__all__ = ["JobState", "JobCancelled", "BackgroundJob", "STAGE_LABELS", "STAGE_WEIGHTS", "PHASE_WEIGHTS",
           "PREVIEW_SHOWN_TEXT"]

#: Plain-language labels of the stages a job reports (the module's own around the library's).
STAGE_LABELS = {
    "queued": "Waiting for the previous run to finish",
    "load": "Loading the model",
    "download": "Downloading the model",
    "check": "Checking the input volume",
    **_LIBRARY_STAGE_LABELS,
    CONVERT_STAGE: CONVERT_STAGE_LABEL,  # OpenVINO runs only
    "done": "Finished",
}
#: Share of the whole run each stage takes, for one overall progress bar.
STAGE_WEIGHTS = {"load": 0.05, "check": 0.02, "preprocess": 0.05, CONVERT_STAGE: 0.0, "inference": 0.78,
                 "postprocess": 0.05, "invert": 0.05}
#: Share of a progressive run each phase takes: the fast layout's preview has about a quarter of the
#: default layout's windows (overlap 0 instead of 0.5 halves the windows along each axis that is long enough).
PHASE_WEIGHTS = {"preview": 0.2, "exact": 0.8}
#: What the panel says while a shown quick result waits for the exact one.
PREVIEW_SHOWN_TEXT = "Quick result shown; exact result in progress"


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobCancelled(Interrupted, RuntimeError):
    """Raised inside a job's function (through :meth:`BackgroundJob.check_cancelled`) after Cancel."""


class BackgroundJob:
    """One request to the worker as the panel sees it: state, progress, cancel, result or error.

    Args:
        description: what the job does, for messages.
        on_progress: called with ``(stage, fraction)`` on each progress report (in :meth:`done`/:meth:`wait`).
        poll: reads the worker's new events (which call :meth:`report`, :meth:`succeed`, :meth:`fail`...).
        on_cancel: tells the worker to stop.
    """

    def __init__(self, description: str, on_progress: Callable[[str, float], None] | None = None,
                 poll: Callable[[], None] | None = None, on_cancel: Callable[[], None] | None = None,
                 on_preview: Callable[[Any], None] | None = None):
        self.description = description
        self.phase: str | None = None  # progressive runs: "preview" (fast layout) or "exact"
        self._progress_shown = 0.0
        self._preview: Any = None
        self._on_preview = on_preview
        self.state = JobState.QUEUED
        self.stage = "queued"
        self.stage_fraction = 0.0
        self.started_at: float | None = time.monotonic()
        self.finished_at: float | None = None
        self.error: BaseException | None = None
        self.error_details = ""
        self._result: Any = None
        self._cancel_requested = False
        self._finished = False
        self._on_progress = on_progress
        self._poll = poll
        self._on_cancel = on_cancel
        self.metadata: dict = {}

    # -- fed by the worker's events
    def report(self, stage: str, fraction: float, phase: str | None = None) -> None:
        if self._finished:
            return
        self.state = JobState.RUNNING
        if phase is not None:
            self.phase = phase
        self.stage, self.stage_fraction = stage, min(max(float(fraction), 0.0), 1.0)
        if self._on_progress is not None:
            self._on_progress(stage, self.stage_fraction)

    def succeed(self, value: Any) -> None:
        if not self._finished:
            self._result, self.state = value, JobState.SUCCEEDED
            self.stage, self.stage_fraction = "done", 1.0
            self._finish()

    def set_preview(self, value: Any) -> None:
        """A quick result that arrived before the exact one (``on_preview(value)`` is called, in :meth:`done`)."""
        if not self._finished:
            self._preview = value
            self.phase = "exact"  # the quick result is here: what runs now is the exact one
            if self._on_preview is not None:
                self._on_preview(value)

    def preview(self) -> Any:
        """The quick result of a progressive run once it arrived (None before, and for other runs); it stays
        available after the job ended (cancelled or failed too)."""
        return self._preview

    def fail(self, error: BaseException, details: str = "") -> None:
        if not self._finished:
            if _is_cancellation(error):
                self.state = JobState.CANCELLED
            else:
                self.error, self.error_details, self.state = error, details, JobState.FAILED
            self._finish()

    def _finish(self) -> None:
        self.finished_at = time.monotonic()
        self._finished = True

    def cancelled(self) -> bool:
        return self._cancel_requested

    def check_cancelled(self) -> None:
        if self._cancel_requested:
            raise JobCancelled(f"{self.description}: cancelled")

    # -- main-thread side
    def cancel(self) -> None:
        """Stop now: the job ends as cancelled at once and the worker is told to stop (between network
        windows); whatever it still produces is discarded, so the scene stays as it was."""
        if self._finished:
            return
        self._cancel_requested = True
        if self._on_cancel is not None:
            self._on_cancel()
        self.state = JobState.CANCELLED
        self._finish()

    @property
    def finished(self) -> bool:
        """Whether the job has ended, without reading the worker's news (see :meth:`done`)."""
        return self._finished

    def done(self) -> bool:
        """Read the worker's news, then whether the job has ended."""
        if not self._finished and self._poll is not None:
            self._poll()
        return self._finished

    def wait(self, timeout: float | None = None, interval: float = 0.02) -> bool:
        """Poll until the job has finished (True) or ``timeout`` seconds passed (False). For scripts and
        tests; the panel polls from a timer instead."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(interval)
        return True

    def result(self) -> Any:
        """The job's return value; raises the job's error, or :class:`JobCancelled` after cancel."""
        if not self._finished:
            raise RuntimeError(f"{self.description} has not finished yet")
        if self.state is JobState.CANCELLED:
            raise JobCancelled(f"{self.description} was cancelled")
        if self.error is not None:
            raise self.error
        return self._result

    @property
    def progress(self) -> float:
        """Overall progress 0..1 (stage weights of :data:`STAGE_WEIGHTS`), never going back: a progressive
        run learns that it is one only after load and check, whose share then belongs to no phase."""
        self._progress_shown = max(self._progress_shown, self._progress_now())
        return self._progress_shown

    def _progress_now(self) -> float:
        if self.state is JobState.SUCCEEDED:
            return 1.0
        order = list(STAGE_WEIGHTS)
        if self.stage not in STAGE_WEIGHTS:
            return 0.0
        before = sum(STAGE_WEIGHTS[s] for s in order[: order.index(self.stage)])
        within = min(1.0, before + STAGE_WEIGHTS[self.stage] * self.stage_fraction)
        if self.phase not in PHASE_WEIGHTS:
            return within
        start = PHASE_WEIGHTS["preview"] if self.phase == "exact" else 0.0
        if self.phase == "exact" and self.stage in ("load", "check"):
            within = 0.0  # load and check ran once, before the preview
        return min(1.0, start + PHASE_WEIGHTS[self.phase] * within)

    @property
    def status_text(self) -> str:
        if self.state is JobState.RUNNING or self.state is JobState.QUEUED:
            label = STAGE_LABELS.get(self.stage, self.stage)
            text = f"{label} ({100 * self.stage_fraction:.0f} %)" if self.stage == "inference" else label
            if self.metadata.get("preview_segments"):  # set by the logic once the quick result is in the scene
                return f"{PREVIEW_SHOWN_TEXT}: {text[:1].lower()}{text[1:]}"
            return f"Quick result: {text[:1].lower()}{text[1:]}" if self.phase == "preview" else text
        if self.state is JobState.FAILED:
            return f"Failed: {self.error}"
        return {JobState.SUCCEEDED: "Finished", JobState.CANCELLED: "Cancelled"}[self.state]

    @property
    def elapsed(self) -> float:
        if self.started_at is None:
            return 0.0
        return (self.finished_at or time.monotonic()) - self.started_at


def _is_cancellation(error: BaseException) -> bool:
    """JobCancelled, or the library's InferenceCancelled: both are :class:`Interrupted`."""
    return isinstance(error, Interrupted)
