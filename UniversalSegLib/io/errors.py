"""Exceptions raised by :mod:`UniversalSegLib.io`.

Every problem with an input or output file raises a subclass of :class:`UniversalSegIOError` whose
message names the file and says what is wrong in words a radiologist or researcher understands.
Where a built-in exception describes the same situation (a missing file, an existing output, a bad
value), the class derives from it too, so ``except FileNotFoundError`` keeps working.
"""
from __future__ import annotations


class UniversalSegIOError(Exception):
    """Base class of every reading or writing error of UniversalSeg."""


# ----------------------------------------------------------------------------------------- reading
class InputNotFoundError(UniversalSegIOError, FileNotFoundError):
    """The input path does not exist."""


class UnsupportedFormatError(UniversalSegIOError, ValueError):
    """The file extension is not one of the formats UniversalSeg reads."""


class CorruptFileError(UniversalSegIOError):
    """The file is empty, truncated or otherwise cannot be decoded."""


class UnsupportedDimensionsError(UniversalSegIOError, ValueError):
    """The image is not a single 3-D scalar volume (2-D, several time points or several components)."""


class NoDicomError(UniversalSegIOError):
    """A folder was given but it holds no readable DICOM image."""


class DicomSeriesError(UniversalSegIOError):
    """A DICOM series cannot be assembled into a volume (missing slices, mixed geometry, unknown UID...)."""


class InvalidGeometryError(UniversalSegIOError, ValueError):
    """The voxel spacing or orientation is absurd (zero, negative, not finite, implausibly large...)."""


class InvalidVoxelValuesError(UniversalSegIOError, ValueError):
    """The voxel values cannot be used (for example NaN or infinite values)."""


class NotCTError(UniversalSegIOError, ValueError):
    """The image is not a CT in Hounsfield units (DICOM modality or intensity distribution)."""


# ----------------------------------------------------------------------------------------- writing
class OutputExistsError(UniversalSegIOError, FileExistsError):
    """An output file exists already and ``overwrite`` was not requested."""


class OutputNotWritableError(UniversalSegIOError, PermissionError):
    """The output folder cannot be created or written to."""


class InvalidMaskError(UniversalSegIOError, ValueError):
    """A mask handed to a writer does not fit the volume or the class list."""


class DicomSegError(UniversalSegIOError, ValueError):
    """A DICOM SEG cannot be written (for example because the volume did not come from DICOM)."""
