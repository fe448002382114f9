"""Every exception UniversalSeg raises on purpose, in one hierarchy.

Each class carries the exit code the ``universalseg`` command returns for it (:attr:`exit_code`) and a
message written for the person running the tool (:attr:`user_message`: the file, what is wrong and what
to do). The command line and the Slicer module read these attributes instead of testing class names.

Where a built-in exception describes the same situation (a missing file, an existing output, a bad
value), a class derives from it too, so ``except FileNotFoundError`` or ``except ValueError`` keeps
working in callers' code.

This module imports nothing but the standard library: the Slicer module imports it in Slicer's own
process, where PyTorch and MONAI are never loaded.
"""
from __future__ import annotations

import os
from typing import Sequence

__all__ = [
    # categories (one exit code each)
    "UniversalSegError", "UsageError", "InvalidArgumentTypeError", "InputError", "OutputError", "ModelError", "DeviceError",
    "RuntimeUnavailableError", "Interrupted", "BatchCasesFailed",
    "EXIT_CODES", "exit_code_of",
    # reading and writing files
    "UniversalSegIOError", "InputNotFoundError", "UnsupportedFormatError", "CorruptFileError",
    "UnsupportedDimensionsError", "NoDicomError", "DicomSeriesError", "InvalidGeometryError",
    "InvalidVoxelValuesError", "NotCTError", "InvalidImageError", "OutputExistsError", "OutputNotWritableError",
    "InvalidMaskError", "DicomSegError", "TrainingCaseError", "InputTooLargeError", "DicomSegInputError",
    "OutputWriteError", "WriteInterrupted",
    # classes, models, inference
    "TaxonomyError", "UnknownClassError", "CheckpointError", "ModelNotAvailable", "ChecksumMismatch",
    "TextEncoderUnavailable", "InferenceError", "InferenceCancelled", "PostprocessError", "MissingInputError",
    "MRMLBridgeError",
    # the browser review app (``universalseg review``)
    "AccessDenied", "UploadRejected", "CaseLocked",
]

#: Exit codes of the ``universalseg`` command (printed by ``universalseg --help``).
EXIT_CODES = {
    0: "success",
    1: "unexpected internal error (please report it with the message)",
    2: "invalid command line: unknown option, unknown class name, unknown output format",
    3: "input problem: file missing or unreadable, not a CT, bad geometry or voxel values, too large",
    4: "model problem: model not installed, checkpoint invalid, download failed",
    5: "output problem: output exists (use --overwrite), folder not writable, disk full",
    6: "device problem: GPU requested but not available, unsupported precision",
    7: "batch finished, but some cases failed (the summary and OUT/batch.sqlite say which and why)",
    130: "interrupted (Ctrl-C or SIGTERM); previous outputs kept, or the new set complete (as printed)",
}


# ------------------------------------------------------------------------------------------ categories
class UniversalSegError(Exception):
    """Base class of every error UniversalSeg raises on purpose.

    Used directly (or by a subclass that does not override :attr:`exit_code`) it means a bug or an
    inconsistency inside UniversalSeg: exit code 1.
    """

    exit_code: int = 1

    @property
    def user_message(self) -> str:
        """What to show the user: the message itself, which names the file and the problem."""
        return str(self)


class UsageError(UniversalSegError, ValueError):
    """The request itself is invalid (unknown option value, unknown class name, contradictory options)."""

    exit_code = 2


class InvalidArgumentTypeError(UsageError, TypeError):
    """An argument of the Python API has the wrong type (a number where class names are expected...)."""


class InputError(UniversalSegError):
    """The input image cannot be read or is not a CT UniversalSeg can segment."""

    exit_code = 3


class OutputError(UniversalSegError):
    """A result cannot be written where it was asked for."""

    exit_code = 5


class ModelError(UniversalSegError):
    """The model is missing, damaged or cannot be used."""

    exit_code = 4


class DeviceError(UniversalSegError, RuntimeError):
    """The requested device or precision cannot be used on this machine."""

    exit_code = 6


class RuntimeUnavailableError(DeviceError):
    """The requested inference runtime (OpenVINO) is not installed or cannot run on the chosen device."""


class Interrupted(UniversalSegError):
    """The user stopped the run; nothing was written."""

    exit_code = 130


class BatchCasesFailed(UniversalSegError):
    """A batch ran to its end but some of its cases failed (each is recorded with its error)."""

    exit_code = 7


def exit_code_of(error: BaseException) -> int:
    """The documented exit code for ``error``: its class's code, 130 for Ctrl-C, 1 for anything else."""
    if isinstance(error, KeyboardInterrupt):
        return Interrupted.exit_code
    return getattr(error, "exit_code", 1) if isinstance(error, UniversalSegError) else 1


# ---------------------------------------------------------------------------------- reading and writing
class UniversalSegIOError(UniversalSegError):
    """Base class of every problem reading an input file or writing an output file (exit code 3 unless the
    subclass is an :class:`OutputError`)."""

    exit_code = 3


class InputNotFoundError(InputError, UniversalSegIOError, FileNotFoundError):
    """The input path does not exist."""


class UnsupportedFormatError(InputError, UniversalSegIOError, ValueError):
    """The file extension is not one of the formats UniversalSeg reads."""


class CorruptFileError(InputError, UniversalSegIOError):
    """The file is empty, truncated or otherwise cannot be decoded."""


class UnsupportedDimensionsError(InputError, UniversalSegIOError, ValueError):
    """The image is not a single 3-D scalar volume (2-D, several time points or several components)."""


class NoDicomError(InputError, UniversalSegIOError):
    """A folder was given but it holds no readable DICOM image."""


class DicomSeriesError(InputError, UniversalSegIOError):
    """A DICOM series cannot be assembled into a volume (missing slices, mixed geometry, unknown UID...)."""


class InvalidGeometryError(InputError, UniversalSegIOError, ValueError):
    """The voxel spacing or orientation is absurd (zero, negative, not finite, implausibly large...)."""


class InvalidVoxelValuesError(InputError, UniversalSegIOError, ValueError):
    """The voxel values cannot be used (for example NaN or infinite values)."""


class NotCTError(InputError, UniversalSegIOError, ValueError):
    """The image is not a CT in Hounsfield units (DICOM modality or intensity distribution)."""


class InvalidImageError(InputError, ValueError):
    """The input array or its geometry cannot be a CT volume that UniversalSeg can process."""


class OutputExistsError(OutputError, UniversalSegIOError, FileExistsError):
    """An output file exists already and ``overwrite`` was not requested."""


class OutputNotWritableError(OutputError, UniversalSegIOError, PermissionError):
    """The output folder cannot be created or written to."""


class DicomSegError(OutputError, UniversalSegIOError, ValueError):
    """A DICOM SEG cannot be written (for example because the volume did not come from DICOM)."""


class InputTooLargeError(InputError, UniversalSegIOError):
    """The image (as its header describes it, or once resampled) needs more memory than is allowed or available.

    Raised before anything is allocated; the message says what was too large and by how much.
    """


class DicomSegInputError(InputError, DicomSegError):
    """The DICOM input series cannot be referenced by a DICOM SEG (no UIDs, inconsistent slices...).

    An input problem (exit code 3), found before the network runs.
    """


class OutputWriteError(OutputError, UniversalSegIOError, OSError):
    """Writing the outputs failed part way (disk full, quota, I/O error); nothing of the run was kept."""


class WriteInterrupted(Interrupted):
    """A signal (Ctrl-C, SIGTERM) arrived while the outputs were being written.

    The message says what is on disk: either nothing of this run (the previous outputs are untouched) or the
    complete new set (when the signal arrived while the finished files were being switched in).
    """


class InvalidMaskError(UniversalSegIOError, ValueError):
    """A mask handed to a writer does not fit the volume or the class list."""


class TrainingCaseError(UniversalSegIOError, ValueError):
    """A training case cannot be written or read (bad case id, inconsistent files, unknown classes...)."""


# ------------------------------------------------------------------------------- classes and models
class TaxonomyError(UniversalSegError, ValueError):
    """A class table (or one entry of it) is malformed or inconsistent."""


class UnknownClassError(UsageError, ValueError):
    """Text that names no class or group; ``suggestions`` holds the closest known names."""

    def __init__(self, message: str, query: str = "", suggestions: Sequence[str] = ()):
        super().__init__(message)
        self.query = query
        self.suggestions = tuple(suggestions)


class CheckpointError(ModelError, ValueError):
    """A checkpoint file cannot be used; the message names the file and what is wrong."""

    def __init__(self, path: str | os.PathLike | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        super().__init__(f"{problem} (checkpoint: {self.path})" if path is not None else problem)


class ModelNotAvailable(ModelError, LookupError):
    """A model name is unknown or not installed; the message says how to get it."""


class ChecksumMismatch(ModelError, RuntimeError):
    """A downloaded or imported file does not have the published checksum."""


class TextEncoderUnavailable(ModelError, RuntimeError):
    """The text encoder's package or weights are missing; the message says how to get them."""


# ------------------------------------------------------------------------- inference and results
class InferenceError(UniversalSegError, ValueError):
    """The input or the predictor's output cannot be used for sliding-window inference."""


class InferenceCancelled(Interrupted, RuntimeError):
    """The ``cancel`` callback asked to stop; no result was produced."""


class PostprocessError(UniversalSegError, ValueError):
    """The masks handed to post-processing cannot be processed as given."""


class MissingInputError(PostprocessError):
    """A rule needs the raw prediction of a class that was not passed in."""


class MRMLBridgeError(InputError, ValueError):
    """A Slicer node cannot be converted (no image, several components, non-linear transform, ...)."""


# ------------------------------------------------------------------ the browser review app (``review``)
class AccessDenied(InputError, PermissionError):
    """A path asked for through the review app lies outside the folders the server may open (after
    following ``..`` and symbolic links); the message names the path and the allowed folders."""


class UploadRejected(InputError, ValueError):
    """A file uploaded through the review app was refused (too large, a name or format that cannot be
    accepted, or content the readers reject); nothing of it was kept. The message says why."""


class CaseLocked(OutputError):
    """Another review session (another browser, process or machine) is working on the case.

    :attr:`holder` is the lock's record (``holder``, ``host``, ``pid``, ``started``, ``heartbeat``); the
    message names who holds the case and since when.
    """

    def __init__(self, message: str, holder: dict | None = None) -> None:
        super().__init__(message)
        self.holder = dict(holder or {})
