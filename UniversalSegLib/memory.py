"""The process's memory: giving what a segmentation no longer needs back to the operating system.

Peak resident memory is what decides whether a CT can be segmented on a small machine, and what the kernel
counts is not only live arrays: freed blocks the allocator keeps, and file pages a library keeps mapped,
count too. Standard library only (``ctypes``); on systems without glibc or ``/proc`` each function does
nothing.
"""
from __future__ import annotations

import os

__all__ = ["drop_mapped_pages", "trim_heap", "tune_allocator"]


def drop_mapped_pages(folder: str | os.PathLike) -> int:
    """Take the pages of shared read-only file mappings under ``folder`` out of this process's resident
    memory; returns the bytes of mappings advised (0 where ``/proc/self/maps`` or ``madvise`` is unavailable).

    OpenVINO maps the network's weights file (and its compiled-network cache file) shared and read-only and,
    while compiling, copies the weights into the layouts its kernels use; it keeps the mapping, so the
    original weights stay resident next to their copies (0.28 GB for the full Swin UNETR). ``MADV_DONTNEED``
    on a shared read-only file mapping only drops the process's references to page-cache pages: what is
    read later (OpenVINO reads about 35 MB of the full Swin UNETR's file in place at every window) is faulted
    in again from the file with the same contents, so results cannot change (a test checks the logits).
    Private mappings are never touched, even read-only ones: one written before an ``mprotect`` would lose
    its changes. Call it while nothing unmaps and remaps files under ``folder`` (the mappings are read first)."""
    import ctypes

    folder = os.path.realpath(folder) + os.sep
    try:
        with open("/proc/self/maps") as maps:
            regions = [line.split(maxsplit=5) for line in maps]
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:  # not Linux/glibc: nothing to do
        return 0
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madv_dontneed = 4
    advised = 0
    for fields in regions:
        if len(fields) < 6 or fields[1][1:] != "--s" or not fields[5].strip().startswith(folder):
            continue  # only shared mappings without write (or execute) permission
        start, end = (int(address, 16) for address in fields[0].split("-"))
        if libc.madvise(start, end - start, madv_dontneed) == 0:
            advised += end - start
    return advised


#: Blocks of at least this size are served by their own memory mapping (see :func:`tune_allocator`).
_MMAP_THRESHOLD = 2**20


def tune_allocator() -> bool:
    """Have glibc's ``malloc`` map every block of 1 MB or more on its own and unmap it when freed.

    By default glibc raises its mapping threshold to the largest block freed so far (up to 32 MB), after which
    a segmentation's many short-lived arrays (window copies, per-class temporaries, resampled volumes) come
    from the heap, whose free space is rarely returned. A fixed threshold keeps the big blocks out of the
    heap: end to end on the example CT (full Swin UNETR, OpenVINO; 2026-12-01, a 2-core VM) the peak fell by
    0.08 GB and the memory after the windows by about 0.5 GB, at 179 s instead of 173 s (freshly mapped
    blocks are zeroed on first touch; the difference is within this VM's run-to-run variation).
    Process-wide, so it is called only by the processes UniversalSeg starts (the ``universalseg`` command,
    the Slicer worker, Ray batch actors), never on import or from an API call in a user's session.
    Returns whether it took effect (False without glibc)."""
    import ctypes

    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(m_mmap_threshold, _MMAP_THRESHOLD)
                    and libc.mallopt(m_trim_threshold, _MMAP_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl)
        return False


def trim_heap(collect: bool = True) -> None:
    """Give freed heap memory back to the system (glibc's ``malloc_trim``; nothing elsewhere).

    Freed large blocks (a released PyTorch model, a window's tensors) otherwise stay in the process's
    resident memory, where they count against the peak of every later stage. ``collect`` first runs the
    garbage collector (0.1-0.2 s), needed where reference cycles may hold the memory (a PyTorch model)."""
    import ctypes
    import gc

    if collect:
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): the allocator keeps its own policy
        pass
