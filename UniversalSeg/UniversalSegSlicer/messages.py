"""Plain-language messages for errors shown in the module panel."""
from __future__ import annotations

from UniversalSegLib.errors import UniversalSegError

__all__ = ["plain_message"]


def _is_out_of_memory(error: BaseException) -> bool:
    text = f"{type(error).__name__}: {error}".lower()
    return isinstance(error, MemoryError) or "out of memory" in text or "not enough memory" in text \
        or "defaultcpuallocator" in text


#: Where the Slicer panel's user finds the technical details of an unexpected error.
SLICER_DETAILS = ("The full report is in the Python console (View > Python Console); please include it when "
                  "reporting the problem.")
#: What the Slicer panel's user does about a missing Python package.
SLICER_INSTALL = "Open the Setup section and press 'Install dependencies'."


def plain_message(error: BaseException, details: str = SLICER_DETAILS, install: str = SLICER_INSTALL) -> str:
    """One or two sentences a clinician or researcher understands; technical details go to the log.
    ``details`` and ``install`` say where the details are and how to install a missing package in the
    front-end showing the message (the Slicer panel by default; the browser page passes its own)."""
    if _is_out_of_memory(error):
        return ("The computer ran out of memory. Select fewer classes, crop the volume to the region of interest, "
                "close other programs, or choose the CPU if the GPU memory is small.")
    # UniversalSeg's own errors carry a specific, readable message (file, problem, what to do).
    if isinstance(error, UniversalSegError):
        return error.user_message
    if isinstance(error, ModuleNotFoundError):
        return f"A Python package is missing ({error.name}). {install}"
    if isinstance(error, (FileNotFoundError, PermissionError, FileExistsError, ValueError, LookupError)):
        return str(error).strip("'\"")  # messages written for people (KeyError quotes its text)
    return f"Unexpected error ({type(error).__name__}: {error}). {details}"
