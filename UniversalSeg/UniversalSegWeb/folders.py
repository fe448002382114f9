"""The folders a review server may open, what they hold, and uploads into them.

Every path that comes from a browser goes through :meth:`AllowedFolders.resolve`: it is resolved the way
the operating system will resolve it (``..`` and symbolic links followed) and refused unless the result
lies inside one of the allowed folders. Listing shows what the page can open: CT files (the endings the
library's readers know), DICOM folders, and batch output folders (``universalseg batch``, with their
review queue). Uploads are size-limited before anything is written, get a safe name in
``<first folder>/uploads/``, never replace a file, are written atomically and are kept only if the
library's reader accepts them as a CT.
"""
from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Union

from UniversalSegLib.batch.queue import QUEUE_FILE
from UniversalSegLib.errors import (
    AccessDenied,
    InputNotFoundError,
    OutputExistsError,
    UniversalSegIOError,
    UploadRejected,
    UsageError,
)
from UniversalSegLib.io.atomic import atomic_output, ensure_writable_folder
from UniversalSegLib.io.dicom import looks_like_dicom
from UniversalSegLib.io.formats import OUTPUT_FORMATS
from UniversalSegLib.io.readers import format_from_path, read_volume

__all__ = ["AccessDenied", "AllowedFolders", "Entry", "UPLOAD_FOLDER", "UPLOAD_SUFFIXES", "UploadRejected"]

PathLike = Union[str, "os.PathLike[str]"]

#: Sub-folder of the first allowed folder that receives uploads.
UPLOAD_FOLDER = "uploads"
#: Endings accepted for an upload: the readers' single-file formats. A DICOM series is many files, and a
#: detached header (.nhdr, .mhd) names a second file, so neither can arrive as one upload.
UPLOAD_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
#: Files looked at to recognise a DICOM folder (a series folder holds only slices; a few suffice).
_DICOM_PROBE_FILES = 16
#: Characters kept in an uploaded file's name (the rest become "_").
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
#: Longest stem kept from an uploaded file's name.
_MAX_NAME_STEM = 100
#: Bytes of an upload's header searched for a reference to a separate data file.
_HEADER_BYTES = 64 * 1024
#: Result files of UniversalSeg runs (label maps, .seg.nrrd, DICOM SEG): listed as "other", not as CT.
_RESULT_PATTERNS = tuple(fmt.filename.replace("{case}", "*").lower() for fmt in OUTPUT_FORMATS.values())


@dataclass(frozen=True)
class Entry:
    """One item of a folder listing.

    ``kind``: ``"folder"``, ``"ct"`` (an image file the readers open), ``"dicom"`` (a folder of DICOM
    files), ``"batch"`` (a ``universalseg batch`` output folder, with ``review_queue.csv``) or ``"other"``.
    ``size``: bytes, for files.
    """

    name: str
    path: Path
    kind: str
    size: Optional[int] = None


class AllowedFolders:
    """The folders a review server may read and write, given on its command line.

    Args:
        roots: existing folders; the first also receives uploads and is the base of relative paths.
    """

    def __init__(self, roots: Sequence[PathLike]) -> None:
        if isinstance(roots, (str, os.PathLike)):
            roots = [roots]
        if not roots:
            raise UsageError("Give at least one folder the review server may open.")
        resolved = []
        for root in roots:
            path = Path(os.path.realpath(Path(root).expanduser()))
            if not path.exists():
                raise InputNotFoundError(f"Allowed folder {root} does not exist.")
            if not path.is_dir():
                raise UsageError(f"Allowed folder {root} is not a folder.")
            if path not in resolved:
                resolved.append(path)
        self.roots: List[Path] = resolved

    def __repr__(self) -> str:
        return f"AllowedFolders({[str(root) for root in self.roots]})"

    # ----------------------------------------------------------------------------------------- paths
    def root_of(self, real: Path) -> Optional[Path]:
        """The allowed folder that contains the resolved path ``real``, or None."""
        for root in self.roots:
            if os.path.commonpath([str(root), str(real)]) == str(root):
                return root
        return None

    def contains(self, path: PathLike) -> bool:
        """True when ``path`` (after following ``..`` and links) lies inside an allowed folder."""
        try:
            self.resolve(path, must_exist=False)
        except AccessDenied:
            return False
        return True

    def resolve(self, path: PathLike, must_exist: bool = True) -> Path:
        """The real path of ``path`` (relative paths start at the first folder), if it lies inside an
        allowed folder; raises :class:`AccessDenied` naming the path otherwise, and
        :class:`InputNotFoundError` when ``must_exist`` and it does not exist."""
        text = os.fspath(path)
        if "\x00" in text:
            raise AccessDenied(f"{text!r} is not a valid path.")
        candidate = Path(text).expanduser()
        if not candidate.is_absolute():
            candidate = self.roots[0] / candidate
        real = Path(os.path.realpath(candidate))
        if self.root_of(real) is None:
            allowed = ", ".join(str(root) for root in self.roots)
            raise AccessDenied(
                f"{text} is outside the folders this review server may open ({allowed}); "
                "links and '..' are followed before this check."
            )
        if must_exist and not real.exists():
            raise InputNotFoundError(f"{text} does not exist.")
        return real

    # --------------------------------------------------------------------------------------- listing
    def list(self, path: Optional[PathLike] = None) -> List[Entry]:
        """What ``path`` holds (the allowed folders themselves when None), folders first, then by name.

        Hidden files (names starting with ".", such as lock files and temporaries) and links that lead
        outside the allowed folders are left out.
        """
        if path is None:
            return [self._entry(root, root.name or str(root)) for root in self.roots]
        folder = self.resolve(path)
        if not folder.is_dir():
            raise UsageError(f"{path} is a file, not a folder.")
        entries = []
        with os.scandir(folder) as scan:
            for item in scan:
                if item.name.startswith("."):
                    continue
                real = Path(os.path.realpath(item.path))
                if self.root_of(real) is None or not real.exists():
                    continue
                entries.append(self._entry(real, item.name))
        return sorted(entries, key=lambda entry: (entry.kind not in ("folder", "dicom", "batch"), entry.name.lower()))

    def entry(self, path: PathLike) -> Entry:
        """The listing entry of one path (resolved and checked like :meth:`resolve`)."""
        real = self.resolve(path)
        return self._entry(real, real.name)

    def _entry(self, real: Path, name: str) -> Entry:
        if real.is_dir():
            return Entry(name, real, _folder_kind(real))
        size = real.stat().st_size
        return Entry(name, real, _file_kind(real), size)

    # --------------------------------------------------------------------------------------- uploads
    @property
    def upload_folder(self) -> Path:
        return self.roots[0] / UPLOAD_FOLDER

    def save_upload(self, name: str, data: bytes, max_bytes: int) -> Path:
        """Keep an uploaded CT file and return where it was written.

        Refused with :class:`UploadRejected` (nothing written) when ``data`` is larger than ``max_bytes``,
        when the name's ending is not one of :data:`UPLOAD_SUFFIXES`, when a header names a separate data
        file, or when the library's reader rejects the content (the message gives the reader's reason).
        The name is reduced to safe characters; an existing file is never replaced (``-1``, ``-2``... is
        added instead).
        """
        size = len(data)
        if max_bytes is not None and size > max_bytes:
            raise UploadRejected(
                f"Upload {name!r} refused: {size / 2**20:.1f} MiB is more than the {max_bytes / 2**20:.1f} MiB "
                "this server accepts (the --max-upload-mb option)."
            )
        if size == 0:
            raise UploadRejected(f"Upload {name!r} refused: the file is empty.")
        safe_name, suffix = _safe_upload_name(name)
        _refuse_detached_data(name, suffix, data)
        if self.root_of(Path(os.path.realpath(self.upload_folder))) is None:
            raise AccessDenied(f"The upload folder {self.upload_folder} leads outside the allowed folders (a link); uploads refused.")
        created = not self.upload_folder.exists()
        folder = ensure_writable_folder(self.upload_folder)
        try:
            return self._write_upload(name, safe_name, suffix, data, folder)
        except BaseException:
            if created:  # a refused first upload leaves no empty folder behind
                try:
                    folder.rmdir()
                except OSError:
                    pass
            raise

    def _write_upload(self, name: str, safe_name: str, suffix: str, data: bytes, folder: Path) -> Path:
        stem = safe_name[: -len(suffix)]
        for attempt in range(1000):
            target = folder / (f"{stem}{suffix}" if attempt == 0 else f"{stem}-{attempt}{suffix}")
            if target.exists() or target.is_symlink():
                continue
            try:
                with atomic_output(target) as temporary:
                    with open(temporary, "wb") as handle:
                        handle.write(data)
                        handle.flush()
                        os.fsync(handle.fileno())
                    _validate_upload(name, temporary)
            except OutputExistsError:
                continue  # another upload took the name while this one was written
            return target
        raise UploadRejected(f"Upload {name!r} refused: {folder} holds too many files named {stem}{suffix}.")


# ------------------------------------------------------------------------------------------ helpers
def _folder_kind(folder: Path) -> str:
    if (folder / QUEUE_FILE).is_file():
        return "batch"
    probed = 0
    try:
        with os.scandir(folder) as scan:
            for item in scan:
                if probed >= _DICOM_PROBE_FILES:
                    break
                if item.name.startswith(".") or not item.is_file(follow_symlinks=False):
                    continue
                probed += 1
                if format_from_path(item.name) == "dicom" or looks_like_dicom(item.path):
                    return "dicom"
    except OSError:
        return "folder"
    return "folder"


def _file_kind(path: Path) -> str:
    name = path.name.lower()
    if any(fnmatch.fnmatch(name, pattern) for pattern in _RESULT_PATTERNS):
        return "other"
    fmt = format_from_path(name)
    if fmt is None:
        return "other"
    return "dicom" if fmt == "dicom" else "ct"


def _safe_upload_name(name: str) -> tuple:
    """``(safe file name, its ending)``: the last path component, unsafe characters replaced, no leading dot."""
    base = re.split(r"[\\/]", name or "")[-1]
    lower = base.lower()
    suffix = next((ending for ending in UPLOAD_SUFFIXES if lower.endswith(ending)), None)
    if suffix is None:
        raise UploadRejected(
            f"Upload {name!r} refused: upload a CT as one {', '.join(UPLOAD_SUFFIXES)} file "
            "(a DICOM series or a detached header needs several files: put it in an allowed folder instead)."
        )
    stem = _UNSAFE_NAME_CHARS.sub("_", base[: -len(suffix)]).strip("._-")[:_MAX_NAME_STEM] or "upload"
    return stem + suffix, suffix


def _refuse_detached_data(name: str, suffix: str, data: bytes) -> None:
    """Refuse a NRRD or MetaImage header that reads its voxels from another file (which could be any file
    the server can read)."""
    if suffix not in (".nrrd", ".mha"):
        return
    header = data[:_HEADER_BYTES]
    if suffix == ".nrrd":
        header = header.split(b"\n\n", 1)[0].split(b"\r\n\r\n", 1)[0]
        names_file = re.search(rb"^\s*data\s*file\s*:", header, re.IGNORECASE | re.MULTILINE) is not None
    else:
        match = re.search(rb"^\s*ElementDataFile\s*=\s*(\S+)", header, re.IGNORECASE | re.MULTILINE)
        names_file = match is not None and match.group(1).upper() != b"LOCAL"
    if names_file:
        raise UploadRejected(
            f"Upload {name!r} refused: its header reads the voxels from a separate data file; upload a file "
            "that holds its own voxels."
        )


def _validate_upload(name: str, temporary: Path) -> None:
    """Read the written file with the library's reader; its error, reworded for the upload, if it fails."""
    try:
        read_volume(temporary)
    except UniversalSegIOError as error:
        reason = str(error)
        if reason.startswith(f"{temporary}: "):  # the reader names the file first: already said here
            reason = reason[len(f"{temporary}: "):]
        reason = reason.replace(str(temporary), name)
        raise UploadRejected(f"Upload {name!r} refused: {reason}") from error
