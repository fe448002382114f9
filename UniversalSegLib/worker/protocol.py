"""What the worker process and its client exchange, without PyTorch.

Requests are JSON lines on the worker's standard input; the worker answers with JSON lines appended to
``events.jsonl`` in the exchange folder (a file, not a pipe: the client reads it from a timer without
threads or non-blocking pipes, which Windows lacks). Voxel data travel as ``.npy``/``.npz`` files in the
same private folder; the IJK->RAS affine travels as JSON numbers, which Python writes and reads back
bit-exactly, so the geometry survives the trip unchanged.

Events: ``{"id", "event": "progress", "stage", "fraction"}``, ``{"id", "event": "result", ...}``,
``{"id", "event": "error", "type", "message", "details"}``, ``{"id", "event": "cancelled"}``. A segmentation
sent with ``"progressive": true`` to a worker on a CPU in the default mode first sends ``{"id", "event":
"preview", "output", "classes", "statistics", "mode": "fast", ...}`` (the fast layout's masks, in the result's
file format, a file of its own) and then its result; its progress events carry ``"phase": "preview"`` or
``"exact"``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import UniversalSegError

__all__ = ["EVENTS_FILE", "WorkerResult", "WorkerDied", "WorkerFailure", "encode", "write_volume", "read_volume",
           "write_result", "read_result", "error_from_event"]

#: Name of the file the worker appends its events to, inside the exchange folder.
EVENTS_FILE = "events.jsonl"


def encode(message: Mapping) -> bytes:
    """One protocol line."""
    return (json.dumps(message, separators=(",", ":")) + "\n").encode("utf-8")


def write_volume(folder: str | os.PathLike, name: str, array: np.ndarray) -> str:
    """Store a volume's voxels for the worker; returns the file name to put in the request."""
    file_name = f"{name}.npy"
    np.save(Path(folder) / file_name, np.ascontiguousarray(array), allow_pickle=False)
    return file_name


def read_volume(folder: str | os.PathLike, file_name: str) -> np.ndarray:
    return np.load(Path(folder) / file_name, allow_pickle=False)


@dataclass
class WorkerResult:
    """A segmentation as it comes back from the worker: masks on the input grid (bool, IJK), and, when
    asked for, the per-class probabilities on the preprocessed grid (uint8 0..255) with that grid."""

    shape: tuple
    masks: dict = field(default_factory=dict)
    probabilities: dict | None = None
    preprocessed_affine: np.ndarray | None = None
    preprocessed_shape: tuple | None = None


def write_result(path: str | os.PathLike, shape, masks: Mapping[int, np.ndarray],
                 probabilities: Mapping[int, np.ndarray] | None = None, preprocessed=None) -> None:
    """Masks as bit-packed bounding-box crops (a few MB even for a 512x512x800 CT), written atomically."""
    from ..helpers import bounding_box

    arrays = {"shape": np.asarray(shape, dtype=np.int64)}
    for index, mask in masks.items():
        mask = np.asarray(mask, dtype=bool)
        box = bounding_box(mask)
        if box is None:
            arrays[f"box_{index}"] = np.zeros(6, dtype=np.int64)
            continue
        arrays[f"box_{index}"] = np.asarray([v for s in box for v in (s.start, s.stop)], dtype=np.int64)
        arrays[f"bits_{index}"] = np.packbits(mask[box], axis=None)
    if probabilities is not None:
        for index, values in probabilities.items():
            arrays[f"prob_{index}"] = np.asarray(values, dtype=np.uint8)
        arrays["prep_affine"] = np.asarray(preprocessed.affine, dtype=np.float64)
        arrays["prep_shape"] = np.asarray(preprocessed.shape, dtype=np.int64)
    partial = Path(f"{path}.part")
    with open(partial, "wb") as stream:
        np.savez(stream, **arrays)
    os.replace(partial, path)


def read_result(path: str | os.PathLike) -> WorkerResult:
    with np.load(path, allow_pickle=False) as data:
        shape = tuple(int(v) for v in data["shape"])
        result = WorkerResult(shape)
        for key in data.files:
            if key.startswith("box_"):
                index = int(key[4:])
                box = [int(v) for v in data[key]]
                mask = np.zeros(shape, dtype=bool)
                if box[1] > box[0]:
                    region = tuple(slice(box[2 * a], box[2 * a + 1]) for a in range(3))
                    crop = tuple(box[2 * a + 1] - box[2 * a] for a in range(3))
                    count = int(np.prod(crop))
                    mask[region] = np.unpackbits(data[f"bits_{index}"], count=count).reshape(crop).astype(bool)
                result.masks[index] = mask
            elif key.startswith("prob_"):
                if result.probabilities is None:
                    result.probabilities = {}
                result.probabilities[int(key[5:])] = data[key]
        if "prep_affine" in data.files:
            result.preprocessed_affine = data["prep_affine"]
            result.preprocessed_shape = tuple(int(v) for v in data["prep_shape"])
    return result


class WorkerFailure(UniversalSegError, RuntimeError):
    """An error raised in the worker process that has no class of its own here (out of memory, CUDA...):
    the original type name leads the message, so the panel can still say what happened."""


class WorkerDied(UniversalSegError, RuntimeError):
    """The worker process ended in the middle of a request (killed, out of memory, crashed)."""


def error_from_event(event: Mapping) -> BaseException:
    """The worker's error as an exception of the same UniversalSeg class (so ``except NotCTError`` and
    :attr:`user_message` work in the client), else a :class:`WorkerFailure` naming the original type."""
    from .. import errors

    name, message = str(event.get("type", "Error")), str(event.get("message", ""))
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, errors.UniversalSegError):
        error = cls.__new__(cls)
        Exception.__init__(error, message)
    elif name == "MemoryError":
        error = MemoryError(message)
    else:
        error = WorkerFailure(f"{name}: {message}")
    error.worker_details = str(event.get("details", ""))
    return error
