"""Plain-language messages for errors shown in the module panel."""
from __future__ import annotations

from UniversalSegLib.errors import UniversalSegError

__all__ = ["plain_message"]


def _is_out_of_memory(error: BaseException) -> bool:
    text = f"{type(error).__name__}: {error}".lower()
    return isinstance(error, MemoryError) or "out of memory" in text or "not enough memory" in text \
        or "defaultcpuallocator" in text


def plain_message(error: BaseException) -> str:
    """One or two sentences a clinician or researcher understands; technical details go to the log."""
    if _is_out_of_memory(error):
        return ("The computer ran out of memory. Select fewer classes, crop the volume to the region of interest "
                "(Crop Volume module), close other programs, or choose the CPU if the GPU memory is small.")
    # UniversalSeg's own errors carry a specific, readable message (file, problem, what to do).
    if isinstance(error, UniversalSegError):
        return error.user_message
    if isinstance(error, ModuleNotFoundError):
        return (f"A Python package is missing ({error.name}). Open the Setup section and press "
                "'Install dependencies'.")
    if isinstance(error, (FileNotFoundError, PermissionError)):
        return str(error)
    return (f"Unexpected error ({type(error).__name__}: {error}). The full report is in the Python console "
            "(View > Python Console); please include it when reporting the problem.")
