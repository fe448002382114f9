"""The client side of the worker process: start it, send requests, read its answers, notice its death.

No threads and no blocking reads: :meth:`WorkerProcess.poll` reads whatever the worker has appended to
its events file since the last call, so 3D Slicer can call it from a ``QTimer`` (Slicer's main thread
keeps Python's lock while idle, so a Python thread there would hardly run). Torch-free.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from .protocol import EVENTS_FILE, WorkerDied, encode

__all__ = ["WorkerProcess", "library_path"]

#: Lines of the worker's log quoted when it dies.
LOG_TAIL_LINES = 6


def library_path() -> str:
    """The folder that holds the ``UniversalSegLib`` package (put on the worker's ``PYTHONPATH``)."""
    return str(Path(__file__).resolve().parents[2])


def _describe_exit(code: int) -> str:
    if code < 0:
        import signal

        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        reason = " (the system does this when memory runs out)" if -code == 9 else ""
        return f"was stopped by {name}{reason}"
    return f"ended with exit code {code}"


class WorkerProcess:
    """One worker process, started on the first request and again after it died or was stopped.

    Args:
        python: the interpreter (default ``sys.executable``; in 3D Slicer pass ``PythonSlicer``).
        environment: extra environment variables for the worker.
    """

    def __init__(self, python: str | None = None, environment: dict | None = None) -> None:
        self.python = python or sys.executable
        self.environment = dict(environment or {})
        self.process: subprocess.Popen | None = None
        self.folder: Path | None = None
        self._log = None
        self._offset = 0
        self._pending = b""
        self._listeners: dict[str, Callable[[dict], None]] = {}
        self._ids = itertools.count(1)
        self.started_at: float | None = None
        self.requests_sent = 0  # segmentations, downloads... (not cancels): tests check what ran the network

    # ------------------------------------------------------------------------------------------ process
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        if self.alive():
            return
        if self.process is not None:
            self.poll()  # the previous worker died: its pending requests fail with the reason first
        self._forget_process()
        self.folder = Path(tempfile.mkdtemp(prefix="universalseg-worker-"))  # private (0700) to this user
        (self.folder / EVENTS_FILE).touch()
        self._offset, self._pending = 0, b""
        env = dict(os.environ, **self.environment)
        env["PYTHONPATH"] = os.pathsep.join([library_path()] + [p for p in [env.get("PYTHONPATH")] if p])
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._log = open(self.folder / "worker.log", "wb")
        self.process = subprocess.Popen(
            [self.python, "-m", "UniversalSegLib.worker", str(self.folder)], stdin=subprocess.PIPE,
            stdout=self._log, stderr=subprocess.STDOUT, cwd=str(self.folder), env=env,
            creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
        self.started_at = time.monotonic()

    def stop(self, timeout: float = 1.0) -> None:
        """Ask the worker to exit (frees all of its memory, GPU too), kill it after ``timeout`` seconds,
        and remove its exchange folder. Pending requests end as failed."""
        if self.process is not None:
            try:
                self.process.stdin.write(encode({"op": "exit"}))
                self.process.stdin.close()
            except (OSError, ValueError):
                pass
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._fail_pending(WorkerDied("The worker was stopped."))
        self._forget_process()

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
            self.process.wait()

    def _forget_process(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()
        self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    # ----------------------------------------------------------------------------------------- requests
    def new_request_id(self) -> str:
        """An id for a request; files named after it in :attr:`folder` belong to that request."""
        self.start()
        return f"r{next(self._ids)}"

    def send(self, request_id: str, op: str, listener: Callable[[dict], None], **fields) -> None:
        """Send a request; ``listener(event)`` receives its progress and its final event from :meth:`poll`."""
        self.start()
        self._listeners[request_id] = listener
        self.requests_sent += 1
        try:
            self.process.stdin.write(encode({"op": op, "id": request_id, **fields}))
            self.process.stdin.flush()
        except OSError:  # it died between start() and now: poll() reports it
            pass

    def cancel(self, request_id: str) -> None:
        """Ask the worker to stop that request at its next check (between network windows); its listener
        still receives the final event."""
        if self.alive():
            try:
                self.process.stdin.write(encode({"op": "cancel", "id": request_id}))
                self.process.stdin.flush()
            except OSError:
                pass

    @property
    def busy(self) -> bool:
        return bool(self._listeners)

    def poll(self) -> None:
        """Deliver the events written since the last call; fail the pending requests if the worker died."""
        if self.folder is None:
            return
        # Death is checked before reading: everything a dead worker wrote is then already in the file.
        dead = self.process is not None and self.process.poll() is not None
        with open(self.folder / EVENTS_FILE, "rb") as stream:
            stream.seek(self._offset)
            data = stream.read()
        self._offset += len(data)
        lines = (self._pending + data).split(b"\n")
        self._pending = lines.pop()  # an incomplete last line waits for the next poll
        for line in lines:
            if not line.strip():
                continue
            event = json.loads(line)
            final = event.get("event") in ("result", "error", "cancelled")
            listener = self._listeners.pop(event.get("id"), None) if final else self._listeners.get(event.get("id"))
            if listener is not None:
                listener(event)
            elif event.get("output"):  # a cancelled request's result (or preview) nobody waits for
                self.discard(event["output"])
        if dead:
            code = self.process.returncode
            self._fail_pending(WorkerDied(
                f"The UniversalSeg worker process {_describe_exit(code)} during the run. Nothing was changed. "
                "The next run starts a new worker; if this repeats, select fewer classes, crop the volume or "
                f"use the CPU.{self._log_tail()}"))
            self._forget_process()

    def discard(self, file_name: str) -> None:
        if self.folder is not None:
            try:
                (self.folder / file_name).unlink()
            except OSError:
                pass

    def _fail_pending(self, error: BaseException) -> None:
        listeners, self._listeners = self._listeners, {}
        for request_id, listener in listeners.items():
            listener({"id": request_id, "event": "died", "error": error})

    def _log_tail(self) -> str:
        try:
            lines = (self.folder / "worker.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        tail = "\n".join(lines[-LOG_TAIL_LINES:])
        return f"\n\nLast output of the worker:\n{tail}" if tail else ""
