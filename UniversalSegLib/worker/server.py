"""The worker process: loads a model once and serves segmentation requests until told to exit.

Started by :class:`~UniversalSegLib.worker.client.WorkerProcess` as ``python -m UniversalSegLib.worker
FOLDER`` (in 3D Slicer with ``PythonSlicer``). A reader thread takes requests from standard input, so a
``cancel`` arrives while a run is in progress; the main thread runs one request at a time. Standard input
closing (the client went away) ends the process. Every request ends with exactly one ``result``,
``error`` or ``cancelled`` event; a progressive segmentation sends one ``preview`` event before it.
"""
from __future__ import annotations

import functools
import gc
import os
import queue
import sys
import threading
import time
import traceback
from pathlib import Path

from ..errors import InferenceCancelled, Interrupted
from .protocol import EVENTS_FILE, encode, read_volume, write_result

__all__ = ["WorkerServer", "main"]

#: Seconds between two progress events of the same stage (a 1000-window run must not write 1000 lines).
PROGRESS_INTERVAL = 0.1
#: The mode of a progressive request's quick preview, and the only requested mode that gets one.
PREVIEW_MODE, EXACT_MODE = "fast", "default"


def wants_preview(progressive: bool, device_type: str, mode: str) -> bool:
    """Whether a request gets a quick preview before its result: asked for, on a CPU (a GPU finishes the
    exact run in seconds, so a preview would only delay it), and the exact default mode requested (the fast
    mode is the preview; the reference mode reproduces the official pipeline and is not previewed)."""
    return bool(progressive) and device_type == "cpu" and mode == EXACT_MODE


class WorkerServer:
    """Request handlers and the loaded model. ``segmenter_loads`` counts model loads (tests, benchmarks)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self._events = open(self.folder / EVENTS_FILE, "ab", buffering=0)
        self._lock = threading.Lock()
        self.requests: queue.Queue = queue.Queue()
        self.cancelled: set = set()
        self.segmenter = None
        self.segmenter_key = None
        self.segmenter_loads = 0

    # ------------------------------------------------------------------------------------------ events
    def emit(self, message: dict) -> None:
        with self._lock:
            self._events.write(encode(message))

    def read_requests(self, stream) -> None:
        """Reader thread: cancels take effect at once, everything else is queued in order."""
        import json

        for line in stream:
            line = line.strip()
            if not line:
                continue
            message = json.loads(line)
            if message.get("op") == "cancel":
                self.cancelled.add(message.get("id"))
            else:
                self.requests.put(message)
        self.requests.put({"op": "exit"})  # the client closed our input: it is gone

    def serve(self) -> None:
        while True:
            message = self.requests.get()
            op, request_id = message.get("op"), message.get("id")
            if op == "exit":
                return
            last = {}

            def report(stage, fraction, phase=None, request_id=request_id, last=last):
                now = time.monotonic()
                if fraction in (0.0, 1.0) or last.get((phase, stage), 0.0) + PROGRESS_INTERVAL <= now:
                    last[(phase, stage)] = now
                    event = {"id": request_id, "event": "progress", "stage": stage, "fraction": float(fraction)}
                    if phase is not None:  # progressive runs: "preview" (the fast layout) or "exact"
                        event["phase"] = phase
                    self.emit(event)

            def cancelled(request_id=request_id):
                return request_id in self.cancelled

            try:
                handler = getattr(self, f"do_{op}", None)
                if handler is None:
                    raise ValueError(f"unknown worker request {op!r}")
                if cancelled():
                    raise Interrupted("cancelled before it started")
                answer = handler(message, report, cancelled)
                self.emit({"id": request_id, "event": "result", **answer})
            except BaseException as error:  # every request gets an answer; the worker lives on
                if isinstance(error, Interrupted):
                    self.emit({"id": request_id, "event": "cancelled"})
                else:
                    self.emit({"id": request_id, "event": "error", "type": type(error).__name__,
                               "message": str(error), "details": traceback.format_exc()})
                if isinstance(error, (KeyboardInterrupt, SystemExit)):
                    raise
            finally:
                self.cancelled.discard(request_id)

    # ---------------------------------------------------------------------------------------- requests
    def _segmenter_for(self, message: dict):
        """The loaded model when the request asks for the same file and settings, else a fresh load."""
        from ..model_store import resolve_model
        from ..pipeline import Segmenter

        path = Path(resolve_model(message["model"]))
        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, message.get("device", "auto"),
               message.get("mode", "default"), message.get("runtime"), message.get("threads"))
        if key != self.segmenter_key:
            self.release()  # free the previous model before loading the next one
            self.segmenter = Segmenter(str(path), device=message.get("device", "auto"), mode=message.get("mode"),
                                       threads=message.get("threads"), runtime=message.get("runtime"))
            self.segmenter_key = key
            self.segmenter_loads += 1
        return self.segmenter

    def do_segment(self, message: dict, report, cancelled) -> dict:
        """Segment the volume of the request; masks (and probabilities) go to an ``.npz`` next to it."""
        import numpy as np

        from ..io.atomic import pause_for_tests
        from ..io.validation import ensure_ct
        from ..io.volume import Volume

        started = time.perf_counter()
        report("load", 0.0)
        loads = self.segmenter_loads
        segmenter = self._segmenter_for(message)
        load_seconds = time.perf_counter() - started
        report("load", 1.0)
        if cancelled():
            raise InferenceCancelled("cancelled")
        report("check", 0.0)
        volume = Volume(read_volume(self.folder, message["volume"]), np.asarray(message["affine"], dtype=np.float64),
                        message.get("source", "Slicer volume"), "mrml")
        ensure_ct(volume.array, volume.source)  # a clear error for MR, label maps, images not in HU
        classes = message.get("classes")
        requested = list(segmenter.taxonomy) if classes is None else [segmenter.taxonomy[i] for i in classes]
        keep = bool(message.get("keep_probabilities"))
        report("check", 1.0)
        progressive = wants_preview(message.get("progressive", False), segmenter.device.type, segmenter.mode.name)
        if progressive:
            self._send_preview(message, segmenter, volume, requested, report, cancelled, started)
            pause_for_tests("worker-after-preview", cancelled)
            if cancelled():
                raise InferenceCancelled("cancelled")
            report = functools.partial(report, phase="exact")
        result = segmenter.segment(volume, requested, progress=report, cancel=cancelled, keep_probabilities=keep)
        output = f"{message['id']}.result.npz"
        write_result(self.folder / output, volume.shape, {c.index: result.masks[c.index] for c in requested},
                     result.probabilities if keep else None, result.preprocessed)
        return {"output": output, "classes": [c.index for c in requested],
                "taxonomy": segmenter.taxonomy.to_dict(),
                "statistics": [s.to_dict() for s in result.statistics()],
                "model_loaded": self.segmenter_loads != loads, "load_seconds": load_seconds,
                "seconds": time.perf_counter() - started, "timings": result.timings,
                "runtime": segmenter.runtime, "mode": segmenter.mode.name, "device": str(segmenter.device),
                "model_loads": self.segmenter_loads, "progressive": progressive}

    def _send_preview(self, message: dict, segmenter, volume, requested, report, cancelled, started: float) -> None:
        """Run the fast layout with the loaded model (same network) and send its masks as a ``preview``
        event, in the result's file format but a file of its own; the exact run follows."""
        preview = segmenter.segment(volume, requested, progress=functools.partial(report, phase="preview"),
                                    cancel=cancelled, mode=PREVIEW_MODE)
        from ..io.atomic import pause_for_tests

        pause_for_tests("worker-before-preview", cancelled)
        if cancelled():  # a cancelled request sends no quick result
            raise InferenceCancelled("cancelled")
        output = f"{message['id']}.preview.npz"
        write_result(self.folder / output, volume.shape, {c.index: preview.masks[c.index] for c in requested})
        self.emit({"id": message["id"], "event": "preview", "output": output, "classes": [c.index for c in requested],
                   "statistics": [s.to_dict() for s in preview.statistics()], "mode": PREVIEW_MODE,
                   "seconds": time.perf_counter() - started, "timings": preview.timings,
                   "runtime": segmenter.runtime, "device": str(segmenter.device)})

    def do_download(self, message: dict, report, cancelled) -> dict:
        from ..model_store import download_model

        report("download", 0.0)
        return {"path": str(download_model(message["name"], progress=False))}

    def do_import(self, message: dict, report, cancelled) -> dict:
        """Copy a checkpoint file into the model cache (validating it loads PyTorch: done here, not in Slicer)."""
        from ..model_store import import_model

        report("download", 0.0)
        return {"path": str(import_model(message["path"], overwrite=bool(message.get("overwrite"))))}

    def do_release(self, message: dict, report, cancelled) -> dict:
        self.release()
        return {}

    def do_status(self, message: dict, report, cancelled) -> dict:
        return {"model_loads": self.segmenter_loads, "loaded": self.segmenter is not None, "pid": os.getpid()}

    def release(self) -> None:
        """Drop the model and give its memory back (GPU memory too)."""
        self.segmenter, self.segmenter_key = None, None
        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python -m UniversalSegLib.worker EXCHANGE_FOLDER (started by the Slicer module)",
              file=sys.stderr)
        return 2
    from ..memory import tune_allocator

    tune_allocator()  # this process is ours: big temporaries go back to the system when freed
    server = WorkerServer(argv[0])
    reader = threading.Thread(target=server.read_requests, args=(sys.stdin,), daemon=True)
    reader.start()
    server.emit({"id": None, "event": "ready", "pid": os.getpid()})
    server.serve()
    return 0
