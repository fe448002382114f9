"""Atomic, no-overwrite file output.

Every output is first written under a hidden temporary name in its destination folder
(``.~universalseg-<random>-<name>``: same folder, so the final rename never crosses file systems;
same ending, so writers that pick the format from the extension still work) and only renamed to its
final name once complete. A reader therefore never sees a half-written file, and a failure leaves
no partial file behind.

Without ``overwrite`` the final rename uses a hard link, which fails if the name appeared in the
meantime, so even a race with another process cannot clobber an existing file.
"""
from __future__ import annotations

import errno
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import OutputExistsError, OutputNotWritableError

TEMP_PREFIX = ".~universalseg-"


def prepare_output_path(path, overwrite: bool = False) -> Path:
    """Check that ``path`` may be written: its folder exists or can be created and is writable, and the
    file does not exist (unless ``overwrite``). Returns the absolute path."""
    path = Path(path).expanduser().absolute()
    if path.is_dir():
        raise OutputExistsError(f"Output {path} is an existing folder, not a file name.")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"Output {path} exists already; choose another name, or use --overwrite (overwrite=True in Python) to replace it.")
    ensure_writable_folder(path.parent)
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
    return folder


def temporary_name(final: Path) -> Path:
    """A fresh hidden name next to ``final`` that keeps its full extension."""
    return final.with_name(f"{TEMP_PREFIX}{secrets.token_hex(6)}-{final.name}")


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
