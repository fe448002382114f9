"""Case locks: one review session writes a case at a time, across processes and machines.

A lock is a small JSON file beside the case (``.universalseg-review-<case>.lock`` in the case's folder),
created only if absent (a fully written record linked into place without replacing anything, the way
:func:`UniversalSegLib.io.atomic.commit` finishes every output, so no one ever reads half a record). It names its holder: the label the annotator gave,
the machine, the process, when the lock was taken and when its holder last showed it was alive (the
heartbeat, refreshed by :meth:`CaseLock.refresh` or :meth:`CaseLock.keep_alive`).

A lock whose holder is gone is taken over: on the same machine when its process no longer exists; from any
machine when its heartbeat is older than :data:`STALE_AFTER_S` (the folder may be on a shared file system,
where another machine's processes cannot be checked). Only the session that took a lock removes it.
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from UniversalSegLib.errors import CaseLocked, OutputExistsError, OutputNotWritableError, UsageError
from UniversalSegLib.io.atomic import commit, process_alive, temporary_name

logger = logging.getLogger(__name__)

__all__ = ["CaseLock", "CaseLocked", "HEARTBEAT_S", "STALE_AFTER_S", "describe_holder", "lock_path", "read_holder"]

#: A lock whose heartbeat is older than this (seconds) is stale, whichever machine holds it.
STALE_AFTER_S = 5 * 60
#: How often :meth:`CaseLock.keep_alive` refreshes the heartbeat (well inside :data:`STALE_AFTER_S`).
HEARTBEAT_S = 60
#: Start of a lock file's name (hidden; not a temporary of :mod:`UniversalSegLib.io.atomic`).
LOCK_PREFIX = ".universalseg-review-"
#: A lock file being broken by someone else for longer than this (seconds) was abandoned mid-way.
_BREAK_TIMEOUT_S = 30
_BAD_CASE_ID = re.compile(r"[\\/\x00]")


def lock_path(folder, case_id: str) -> Path:
    """The lock file of ``case_id`` in ``folder``."""
    if not case_id or _BAD_CASE_ID.search(case_id) or case_id in (".", ".."):
        raise UsageError(f"Invalid case id {case_id!r} for a case lock (no path separators).")
    return Path(folder) / f"{LOCK_PREFIX}{case_id}.lock"


def read_holder(folder, case_id: str) -> Optional[dict]:
    """The record of whoever holds ``case_id`` now (None when no one does, or the lock is stale)."""
    record = _read(lock_path(folder, case_id))
    return None if record is None or _is_stale(record) else record


def _now() -> float:
    return time.time()


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _read(path: Path) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        # Unreadable or damaged: treat as a lock of unknown holder, stale once the file is old enough.
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return None
        return {"holder": "unknown (damaged lock file)", "host": "?", "pid": -1, "started": mtime,
                "heartbeat": mtime, "id": None}
    return record if isinstance(record, dict) else {}


def _is_stale(record: dict) -> bool:
    heartbeat = record.get("heartbeat")
    if not isinstance(heartbeat, (int, float)) or _now() - heartbeat > STALE_AFTER_S:
        return True
    pid = record.get("pid")
    return record.get("host") == socket.gethostname() and isinstance(pid, int) and not process_alive(pid)


def describe_holder(record: dict) -> str:
    """``"Ann (host lab-3, process 1234) since 2026-12-01 04:10:00 UTC, last active 12 s ago"``."""
    started = record.get("started")
    heartbeat = record.get("heartbeat")
    since = _iso(started) if isinstance(started, (int, float)) else "an unknown time"
    active = f", last active {max(0, _now() - heartbeat):.0f} s ago" if isinstance(heartbeat, (int, float)) else ""
    return f"{record.get('holder') or 'someone'} (host {record.get('host', '?')}, process {record.get('pid', '?')}) since {since}{active}"


class CaseLock:
    """A lock on one case, held by this process. Take it with :meth:`acquire`; use as a context manager or
    call :meth:`release`."""

    def __init__(self, path: Path, record: dict) -> None:
        self.path = path
        self.record = record
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def holder(self) -> dict:
        return dict(self.record)

    @classmethod
    def acquire(cls, folder, case_id: str, holder: str) -> "CaseLock":
        """Lock ``case_id`` in ``folder`` for ``holder`` (the annotator's label, shown to others).

        Raises :class:`CaseLocked` naming the holder and since when if a live session holds it; a stale
        lock (holder gone) is taken over, and the takeover logged.
        """
        path = lock_path(folder, case_id)
        if not Path(folder).is_dir():
            raise OutputNotWritableError(f"Cannot lock case {case_id}: {folder} is not a folder.")
        now = _now()
        record = {"holder": str(holder or "anonymous")[:200], "host": socket.gethostname(), "pid": os.getpid(),
                  "started": now, "heartbeat": now, "started_text": _iso(now), "id": secrets.token_hex(16),
                  "case": case_id}
        for _ in range(3):
            if _create_exclusive(path, record):
                return cls(path, record)
            current = _read(path)
            if current is None:
                continue  # released meanwhile: try again
            if not _is_stale(current):
                raise CaseLocked(
                    f"Case {case_id} is being reviewed by {describe_holder(current)}. Open another case, or try "
                    "again when they have finished.",
                    current,
                )
            _break_stale(path, current)
            logger.warning("case %s: took over the stale lock of %s", case_id, describe_holder(current))
        current = _read(path) or {}
        raise CaseLocked(f"Case {case_id} could not be locked: another session keeps taking it ({describe_holder(current)}).", current)

    # --------------------------------------------------------------------------------------- holding
    def owns(self) -> bool:
        """True while the lock file on disk is still this lock (not released, not taken over)."""
        current = _read(self.path)
        return current is not None and current.get("id") == self.record["id"]

    def refresh(self) -> None:
        """Record that the holder is alive (the heartbeat); raises :class:`CaseLocked` if the lock was lost."""
        if not self.owns():
            current = _read(self.path) or {}
            raise CaseLocked(
                f"The lock on case {self.record.get('case')} was lost"
                + (f"; it is now held by {describe_holder(current)}." if current else "."),
                current,
            )
        self.record["heartbeat"] = _now()
        temporary = temporary_name(self.path)
        try:
            _write_record(temporary, self.record)
            commit(temporary, self.path, overwrite=True)
        finally:
            _remove_if_present(temporary)

    def keep_alive(self, interval_s: float = HEARTBEAT_S) -> None:
        """Refresh the heartbeat every ``interval_s`` seconds in a background thread until :meth:`release`."""
        if self._thread is not None:
            return

        def beat() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.refresh()
                except Exception as error:  # lost or unwritable: stop beating, the session sees it on save
                    logger.warning("case lock %s: %s", self.path, error)
                    return

        self._thread = threading.Thread(target=beat, name=f"case-lock-{self.path.name}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Remove the lock if this session still holds it (a lock taken over by another session stays)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self.owns():
            _remove_if_present(self.path)
        else:
            logger.warning("case lock %s was no longer held by this session; left as it is", self.path)

    def __enter__(self) -> "CaseLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# ------------------------------------------------------------------------------------------ helpers
def _write_record(path: Path, record: dict) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(record, handle)
        handle.flush()
        os.fsync(handle.fileno())


def _create_exclusive(path: Path, record: dict) -> bool:
    """Create the lock file with ``record`` if it does not exist; False if it exists. The record is written
    whole under a temporary name first and linked into place without ever replacing a file."""
    temporary = temporary_name(path)
    try:
        _write_record(temporary, record)
        commit(temporary, path, overwrite=False)
        return True
    except OutputExistsError:
        return False
    finally:
        _remove_if_present(temporary)


def _remove_if_present(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _break_stale(path: Path, stale: dict) -> None:
    """Remove the stale lock ``stale`` from ``path``, unless someone replaced it meanwhile.

    Sessions breaking the same lock at once take turns through a ``.break`` file created exclusively, so
    that one of them cannot remove the fresh lock the other just took.
    """
    guard = path.with_name(path.name + ".break")
    try:
        descriptor = os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        try:
            if time.time() - guard.stat().st_mtime > _BREAK_TIMEOUT_S:
                guard.unlink()  # its breaker died mid-way
        except FileNotFoundError:
            pass
        return
    os.close(descriptor)
    try:
        current = _read(path)
        if current is not None and current.get("id") == stale.get("id") and _is_stale(current):
            _remove_if_present(path)
    finally:
        guard.unlink()
