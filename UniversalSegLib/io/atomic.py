"""Atomic, no-overwrite file output, and the all-or-nothing output set of one run.

Every output is first written under a hidden temporary name in its destination folder
(``.~universalseg-<pid>-<random>-<name>``: same folder, so the final rename never crosses file systems;
same ending, so writers that pick the format from the extension still work) and only renamed to its
final name once complete. A reader therefore never sees a half-written file, and a failure leaves
no partial file behind.

Without ``overwrite`` the final rename uses a hard link, which fails if the name appeared in the
meantime, so even a race with another process cannot clobber an existing file.

:class:`OutputTransaction` makes the several outputs of one run a transaction (written beside the old
set, switched in together, rolled back on failure, signal or SIGKILL), and :func:`remove_stale_temporaries`
removes what killed processes left behind; every writer into a folder calls it first.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import OutputExistsError, OutputNotWritableError, OutputWriteError, WriteInterrupted

logger = logging.getLogger(__name__)

#: Start of every temporary name UniversalSeg creates in an output folder (files and run folders).
TEMP_PREFIX = ".~universalseg-"
#: Start of the folder in which one run stages its outputs (see :class:`OutputTransaction`).
RUN_PREFIX = TEMP_PREFIX + "run-"
#: Test hook: with this environment variable set to a pause point, the process pauses there for up to
#: UNIVERSALSEG_TEST_PAUSE_SECONDS seconds (default 30), after writing the point's name to the file named by
#: UNIVERSALSEG_TEST_PAUSE_FILE, so that tests can deliver a signal or a cancel at a known moment. Points:
#: ``staged`` and ``switching`` in a transaction (after every output is staged; after the first output is
#: switched in), ``worker-before-preview`` and ``worker-after-preview`` in the worker process (a progressive
#: run's quick result computed but not sent; sent, exact run not started).
PAUSE_ENV = "UNIVERSALSEG_TEST_PAUSE_AT"
#: Age (seconds) after which a loose temporary file of a process that no longer exists is removed.
STALE_AFTER_S = 3600


def prepare_output_path(path, overwrite: bool = False, create: bool = True) -> Path:
    """Check that ``path`` may be written: its folder exists or can be created and is writable, and the
    file does not exist (unless ``overwrite``). Returns the absolute path. The folder is created only
    when ``create`` (a check made before the work must not leave a folder behind if the work fails)."""
    path = Path(path).expanduser().absolute()
    if path.is_dir():
        raise OutputExistsError(f"Output {path} is an existing folder, not a file name.")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"Output {path} exists already; choose another name, or use --overwrite (overwrite=True in Python) to replace it.")
    if create:
        ensure_writable_folder(path.parent)
    else:
        check_writable_folder(path.parent)
    return path


def ensure_writable_folder(folder) -> Path:
    """Create ``folder`` if needed and check that files can be created in it."""
    folder = Path(folder).expanduser().absolute()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputNotWritableError(f"Cannot write into {folder}: a file of that name exists where a folder is needed.") from None
    except NotADirectoryError:
        raise OutputNotWritableError(f"Cannot create output folder {folder}: part of the path is a file, not a folder.") from None
    except OSError as error:
        raise OutputNotWritableError(f"Cannot create output folder {folder} ({error.strerror or error}).") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputNotWritableError(f"Output folder {folder} is not writable (permission denied).")
    remove_stale_temporaries(folder)
    return folder


def check_writable_folder(folder) -> Path:
    """Check, without creating anything, that ``folder`` exists and is writable or can be created."""
    folder = Path(folder).expanduser().absolute()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == folder and folder.is_dir():
        remove_stale_temporaries(folder)  # what killed runs left here, before anything is decided about it
    if not existing.is_dir():
        raise OutputNotWritableError(f"Cannot create output folder {folder}: {existing} is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputNotWritableError(f"Output folder {existing} is not writable (permission denied).")
    return folder


#: Fewest bytes per voxel a run's outputs take on disk (compressed label maps of CT are about 1/50 byte per
#: voxel and more; a DICOM SEG frame is 1/8 byte per voxel, uncompressed).
MIN_OUTPUT_BYTES_PER_VOXEL = {"compressed": 1 / 64, "dicom-seg": 1 / 8}


def check_free_space(folder, n_bytes: int) -> None:
    """Refuse, before the work, a folder whose file system has less than ``n_bytes`` free (a lower
    estimate: the transaction still reports a full disk found while writing as an output error)."""
    folder = Path(folder).expanduser().absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < n_bytes:
        raise OutputNotWritableError(
            f"Not enough free disk space in {folder}: {free / 2**20:.1f} MiB free, the outputs need at least "
            f"{n_bytes / 2**20:.1f} MiB."
        )


def temporary_name(final: Path) -> Path:
    """A fresh hidden name next to ``final`` that keeps its full extension and names the writing process
    (``.~universalseg-<pid>-<random>-<name>``), so that a later run can remove it if that process died."""
    return final.with_name(f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}-{final.name}")


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def commit(temporary: Path, final: Path, overwrite: bool) -> None:
    """Move a finished temporary file to its final name (atomically; never clobbering unless ``overwrite``)."""
    if overwrite:
        os.replace(temporary, final)
        return
    try:
        os.link(temporary, final)  # fails with EEXIST if the final name exists
    except FileExistsError:
        raise OutputExistsError(f"Output {final} exists already (created while writing); it was not overwritten.") from None
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        # File systems without hard links: check, then rename (a tiny race window remains).
        if final.exists():
            raise OutputExistsError(f"Output {final} exists already (created while writing); it was not overwritten.") from None
        os.replace(temporary, final)
        return
    _remove_quietly(temporary)


@contextmanager
def atomic_output(path, overwrite: bool = False) -> Iterator[Path]:
    """Context manager yielding a temporary path to write ``path``; renamed on success, removed on error.

    >>> with atomic_output("out/labels.nii.gz") as tmp:   # doctest: +SKIP
    ...     nibabel.save(image, tmp)
    """
    final = prepare_output_path(path, overwrite)
    temporary = temporary_name(final)
    try:
        yield temporary
        if not temporary.exists():
            raise RuntimeError(f"internal error: nothing was written to {temporary}")
        commit(temporary, final, overwrite)
    finally:
        _remove_quietly(temporary)


class AtomicOutputGroup:
    """Several files that appear together or not at all (as far as a file system allows).

    All files are written to temporary names first; :meth:`commit` checks every final name again and
    then renames them one after the other. If anything fails before the renames start, no final file
    appears; temporary files are always removed.

    >>> with AtomicOutputGroup(overwrite=False) as group:   # doctest: +SKIP
    ...     for name, image in images.items():
    ...         nibabel.save(image, group.add(folder / name))
    """

    def __init__(self, overwrite: bool = False) -> None:
        self.overwrite = overwrite
        self._pairs: list[tuple[Path, Path]] = []

    def add(self, path) -> Path:
        """Register an output; returns the temporary path to write it to."""
        final = prepare_output_path(path, self.overwrite)
        if any(final == existing for _, existing in self._pairs):
            raise OutputExistsError(f"Output {final} is requested twice in one group.")
        temporary = temporary_name(final)
        self._pairs.append((temporary, final))
        return temporary

    @property
    def final_paths(self) -> list[Path]:
        return [final for _, final in self._pairs]

    def commit(self) -> list[Path]:
        """Rename every temporary file to its final name; returns the final paths."""
        for temporary, final in self._pairs:
            if not temporary.exists():
                raise RuntimeError(f"internal error: nothing was written to {temporary}")
            if final.exists() and not self.overwrite:
                raise OutputExistsError(f"Output {final} exists already (created while writing); nothing was written.")
        done: list[Path] = []
        try:
            for temporary, final in self._pairs:
                commit(temporary, final, self.overwrite)
                done.append(final)
        except BaseException:
            if not self.overwrite:  # the renamed files were new: take them back for all-or-nothing
                for final in done:
                    _remove_quietly(final)
            raise
        return done

    def discard(self) -> None:
        """Remove every temporary file (called automatically when the ``with`` block ends)."""
        for temporary, _ in self._pairs:
            _remove_quietly(temporary)

    def __enter__(self) -> "AtomicOutputGroup":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.discard()


# ------------------------------------------------------------------------------------------------
# interrupted runs: stale temporaries, signals, and the output transaction of one run


def process_alive(pid: int) -> bool:
    """True when a process with this id exists on this machine (it may belong to another user)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but belongs to someone else
    return True


def _lock_is_free(lock_path: Path) -> bool:
    """True when no process holds the run folder's lock (its owner ended, even by SIGKILL)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: never take another run's folder
        return False
    try:
        fd = os.open(lock_path, os.O_RDWR)
    except OSError:
        return True  # no lock file: the run died before it took the lock
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)  # closing releases a lock taken here
    return True


def remove_stale_temporaries(folder) -> list[str]:
    """Remove what killed runs left in ``folder``; returns the names removed.

    Loose temporary files are stale when the process named in them no longer exists and they are older
    than :data:`STALE_AFTER_S`; a run folder is stale when its lock is free (released by the kernel when
    its process ends, however it ends). A run folder that was killed while switching its outputs in is first
    rolled back, so the folder again holds the previous outputs, whole (see :class:`OutputTransaction`).
    """
    folder = Path(folder)
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(TEMP_PREFIX):
            continue
        path = folder / name
        try:
            if name.startswith(RUN_PREFIX):
                if not _lock_is_free(path / "lock"):
                    continue
                _roll_back_journal(path, folder)
                shutil.rmtree(path)
            else:
                pid = int(name[len(TEMP_PREFIX):].split("-", 1)[0])
                # An hour's age as well: the pid may belong to another machine sharing the folder.
                if process_alive(pid) or time.time() - path.lstat().st_mtime < STALE_AFTER_S:
                    continue
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        except (ValueError, OSError):
            continue  # not one of ours (no pid), or already gone: leave it
        removed.append(name)
        logger.warning("%s: removed %s left by an interrupted run", folder, name)
    return removed


class _SignalsAsInterrupt:
    """Within the block, SIGTERM raises KeyboardInterrupt like SIGINT (batch systems stop jobs with SIGTERM).

    Only the main thread can install handlers; elsewhere the block changes nothing.
    """

    def __enter__(self):
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            def handler(signum, frame):
                raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

            self._previous = signal.signal(signal.SIGTERM, handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def sigterm_as_interrupt() -> _SignalsAsInterrupt:
    """Context manager: SIGTERM behaves like Ctrl-C (KeyboardInterrupt) inside the block."""
    return _SignalsAsInterrupt()


class _DeferredSignals:
    """Within the block, SIGINT/SIGTERM are recorded instead of acted on (a switch must not stop halfway)."""

    def __enter__(self):
        self.received: list[int] = []
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, lambda n, f: self.received.append(n))
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def pause_for_tests(point: str, stop=None) -> None:
    """The test hook of :data:`PAUSE_ENV`: pause at ``point`` when the environment asks for it, until the
    time is up or ``stop()`` is true (a signal arrived, the request was cancelled)."""
    if os.environ.get(PAUSE_ENV) != point:
        return
    marker = os.environ.get("UNIVERSALSEG_TEST_PAUSE_FILE")
    if marker:
        Path(marker).write_text(point)
    end = time.monotonic() + float(os.environ.get("UNIVERSALSEG_TEST_PAUSE_SECONDS", "30"))
    while time.monotonic() < end and not (stop is not None and stop()):
        time.sleep(0.05)


def _write_json(path: Path, data) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data))
    os.replace(temporary, path)


def _remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _roll_back_journal(run: Path, folder: Path) -> None:
    """Undo a switch that did not finish (the process was killed): put every previous output back."""
    journal = run / "journal.json"
    try:
        state = json.loads(journal.read_text())
    except (OSError, ValueError):
        return  # no journal: the switch never started, nothing in the folder was touched
    if state.get("state") != "switching":
        return  # "done": the new set is complete in the folder
    for name in reversed(state["names"]):
        new, old, final = run / "new" / name, run / "old" / name, folder / name
        if old.exists() or old.is_symlink():
            if not (new.exists() or new.is_symlink()):
                _remove_path(final)  # the new output had been switched in
            os.replace(old, final) if not old.is_dir() else os.rename(old, final)
        elif name not in state["existed"] and not (new.exists() or new.is_symlink()):
            _remove_path(final)  # a new name that had been switched in


def _describe_oserror(error: OSError) -> str:
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"the disk or quota is full ({error.strerror})"
    return error.strerror or str(error)


class OutputTransaction:
    """The outputs of one run: all of them appear, replacing the previous set, or none does.

    Every output is written into a hidden run folder inside the destination (``.~universalseg-run-...``,
    same file system), under its final name. :meth:`commit` then switches them in: each previous output
    is moved aside into the run folder and the new one renamed into place, with a journal that lists the
    names. Ctrl-C and SIGTERM are held back while the renames run (they take milliseconds), so the switch
    is never left halfway by a signal; a failing rename puts the previous outputs back. A run killed
    with SIGKILL leaves its run folder; the next run (or any writer into that folder) sees that its lock
    is free and rolls the switch back, so the folder holds the previous set, whole. Folders the
    transaction created are removed again when nothing was written.

    >>> with OutputTransaction("out", overwrite=True) as run:   # doctest: +SKIP
    ...     nibabel.save(image, run.stage("out/case_labels.nii.gz"))
    ...     run.commit()
    """

    def __init__(self, folder, overwrite: bool = False) -> None:
        self.folder = Path(folder).expanduser().absolute()
        self.overwrite = overwrite
        self.names: list[str] = []
        self.committed = False
        self.interrupted_during_switch = False
        self._created: list[Path] = []
        self._lock_fd: int | None = None

    # ----------------------------------------------------------------------------- life cycle
    def __enter__(self) -> "OutputTransaction":
        missing = []
        parent = self.folder
        while not parent.exists() and parent != parent.parent:
            missing.append(parent)
            parent = parent.parent
        ensure_writable_folder(self.folder)
        self._created = missing  # deepest first
        self.run = self.folder / f"{RUN_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            (self.run / "new").mkdir(parents=True)
            (self.run / "old").mkdir()
            self._lock_fd = os.open(self.run / "lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                import fcntl

                fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            except ImportError:  # pragma: no cover
                pass
        except OSError as error:
            self._cleanup()
            raise OutputWriteError(f"Cannot write into {self.folder}: {_describe_oserror(error)}.") from None
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._cleanup()
        if exc_type is None or self.committed:
            return
        if issubclass(exc_type, KeyboardInterrupt):
            raise WriteInterrupted(
                f"interrupted while writing the outputs; nothing was written to {self.folder} (any previous "
                f"outputs there are unchanged)."
            ) from None
        if issubclass(exc_type, OSError) and not isinstance(exc, (OutputExistsError, OutputNotWritableError, OutputWriteError)):
            raise OutputWriteError(
                f"Writing the outputs into {self.folder} failed: {_describe_oserror(exc)}. Nothing was written "
                f"(any previous outputs there are unchanged)."
            ) from None

    def _cleanup(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        run = getattr(self, "run", None)
        if run is not None and run.exists():
            shutil.rmtree(run, ignore_errors=True)
        if not self.committed:
            for folder in self._created:  # deepest first; only if still empty
                try:
                    folder.rmdir()
                except OSError:
                    break

    # ----------------------------------------------------------------------------- staging
    def stage(self, path) -> Path:
        """Register the output ``path`` (a file or a folder directly inside the transaction's folder) and
        return where to write it now. An existing output is an error unless ``overwrite``."""
        final = Path(path).expanduser().absolute()
        if final.parent != self.folder:
            raise ValueError(f"{final} is not directly inside {self.folder}")
        if final.name not in self.names:
            if (final.exists() or final.is_symlink()) and not self.overwrite and not _is_empty_folder(final):
                raise OutputExistsError(f"Output {final} exists already; use --overwrite (overwrite=True in Python) to replace it.")
            self.names.append(final.name)
        return self.run / "new" / final.name

    # ----------------------------------------------------------------------------- switching
    def commit(self) -> list[Path]:
        """Switch every staged output in (see the class documentation); returns the final paths."""
        pause_for_tests("staged")
        for name in self.names:
            if not (self.run / "new" / name).exists():
                raise RuntimeError(f"internal error: nothing was written for {name}")
            final = self.folder / name
            if (final.exists() or final.is_symlink()) and not self.overwrite and not _is_empty_folder(final):
                raise OutputExistsError(f"Output {final} exists already (created while writing); nothing was written.")
        existed = [n for n in self.names if (self.folder / n).exists() or (self.folder / n).is_symlink()]
        with _DeferredSignals() as deferred:
            _write_json(self.run / "journal.json", {"state": "switching", "names": self.names, "existed": existed})
            done: list[str] = []
            try:
                for name in self.names:
                    new, old, final = self.run / "new" / name, self.run / "old" / name, self.folder / name
                    if name in existed:
                        os.rename(final, old)
                    os.rename(new, final)
                    done.append(name)
                    if len(done) == 1:
                        pause_for_tests("switching", lambda: deferred.received)
                _write_json(self.run / "journal.json", {"state": "done"})
            except BaseException:
                for name in reversed(done):  # put the previous set back
                    final, old = self.folder / name, self.run / "old" / name
                    _remove_path(final)
                for name in existed:
                    old = self.run / "old" / name
                    if old.exists() or old.is_symlink():
                        os.rename(old, self.folder / name)
                raise
            self.committed = True
            self.interrupted_during_switch = bool(deferred.received)
        finals = [self.folder / name for name in self.names]
        if self.interrupted_during_switch:
            self._cleanup()
            raise WriteInterrupted(
                "interrupted while the finished outputs were being switched in; the switch was completed, so "
                "the new outputs are complete: " + ", ".join(str(f) for f in finals)
            )
        return finals


def _is_empty_folder(path: Path) -> bool:
    try:
        return path.is_dir() and not path.is_symlink() and not any(path.iterdir())
    except OSError:
        return False
