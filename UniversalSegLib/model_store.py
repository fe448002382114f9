"""Model registry: the official checkpoints, where they come from, and the local model cache.

Official weights are downloaded by the user (they are CC BY-NC-ND 4.0 and not shipped with UniversalSeg),
verified by checksum, and kept in ``$UNIVERSALSEG_HOME/models`` (default ``~/.cache/universalseg/models``).
Offline machines import a file copied from elsewhere with :func:`import_model`; it is validated the same way.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from .errors import ChecksumMismatch, ModelNotAvailable, OutputExistsError

# Torch-free at import (checkpoints are only opened to validate a file): the Slicer module lists models and
# shows their licence before PyTorch is installed.
OFFICIAL_LICENSE = (
    "Weights of the CLIP-Driven Universal Model (Liu et al., ICCV 2023), released by the authors under "
    "CC BY-NC-ND 4.0: non-commercial use, no redistribution of modified weights. Obtained by the user from "
    "the official release; not distributed with UniversalSeg."
)

__all__ = [
    "ModelSpec", "REGISTRY", "OFFICIAL_LICENSE", "ModelNotAvailable", "ChecksumMismatch", "cache_home", "models_dir",
    "installed_path",
    "list_models", "download_model", "import_model", "resolve_model",
]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    backbone: str
    filename: str
    url: str
    size_mb: int
    license: str
    description: str
    sha256: str | None = None  # pinned once known; until then the MD5 below is checked and the SHA-256 recorded
    md5: str | None = None


_HF = "https://huggingface.co/ljwztc/CLIP-Driven-Universal-Model/resolve/main/"
REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="swinunetr", backbone="swinunetr", filename="clip_driven_universal_swin_unetr.pth",
            url=_HF + "clip_driven_universal_swin_unetr.pth", size_mb=250, license=OFFICIAL_LICENSE,
            description="Official Universal Model, Swin UNETR backbone (62.2M parameters); the paper's main model.",
            # MD5 as published by a third-party integration of this file (kaiko-ai eva); SHA-256 not yet pinned.
            md5="1ad7a68e904cee85141b05c6bf646ace",
        ),
        ModelSpec(
            name="unet", backbone="unet", filename="clip_driven_universal_unet.pth",
            url=_HF + "clip_driven_universal_unet.pth", size_mb=78, license=OFFICIAL_LICENSE,
            description="Official Universal Model, 3-D U-Net backbone (19.1M parameters); faster on CPU.",
        ),
    )
}


def cache_home() -> Path:
    """UniversalSeg's per-user cache: ``$UNIVERSALSEG_HOME``, default ``~/.cache/universalseg``."""
    return Path(os.environ.get("UNIVERSALSEG_HOME", Path.home() / ".cache" / "universalseg"))


def models_dir() -> Path:
    return cache_home() / "models"


def _index_path() -> Path:
    return models_dir() / "index.json"


def _read_index() -> dict:
    try:
        return json.loads(_index_path().read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _write_index(index: dict) -> None:
    path = _index_path()
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(index, indent=1, sort_keys=True))
    os.replace(tmp, path)


def installed_path(name: str) -> Path | None:
    spec = REGISTRY.get(name)
    if spec is None:
        return None
    path = models_dir() / spec.filename
    return path if path.is_file() else None


def list_models() -> list[tuple[ModelSpec, Path | None]]:
    return [(spec, installed_path(name)) for name, spec in REGISTRY.items()]


def _digests(path: Path) -> tuple[str, str]:
    sha, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**22), b""):
            sha.update(block)
            md5.update(block)
    return sha.hexdigest(), md5.hexdigest()


def _verify(spec: ModelSpec, path: Path, source: str) -> str:
    """Check the published checksum; return the file's SHA-256."""
    sha, md5 = _digests(path)
    pinned = _read_index().get(spec.name, {}).get("sha256")
    want_sha = spec.sha256 or pinned
    if want_sha and sha != want_sha:
        raise ChecksumMismatch(f"{source}: SHA-256 {sha} does not match the expected {want_sha} for model "
                               f"{spec.name!r}; the file is damaged or not the official release.")
    if not want_sha and spec.md5 and md5 != spec.md5:
        raise ChecksumMismatch(f"{source}: MD5 {md5} does not match the published {spec.md5} for model "
                               f"{spec.name!r}; the file is damaged or not the official release.")
    return sha


def _install(spec: ModelSpec, tmp: Path, source: str) -> Path:
    """Verify a complete temporary file, validate it as a checkpoint, and move it into the cache."""
    from .checkpoints import CheckpointError, load_checkpoint

    sha = _verify(spec, tmp, source)
    try:
        load_checkpoint(tmp, backbone=spec.backbone)
    except CheckpointError as err:
        raise CheckpointError(source, f"not a usable {spec.name} checkpoint: {err}") from err
    final = models_dir() / spec.filename
    os.replace(tmp, final)
    index = _read_index()
    index[spec.name] = {"sha256": sha, "source": source, "file": spec.filename}
    _write_index(index)
    return final


def _spec(name: str) -> ModelSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ModelNotAvailable(f"Unknown model {name!r}; known models: {', '.join(REGISTRY)}.") from None


def download_model(name: str, overwrite: bool = False, progress: bool = True,
                   url: str | None = None, opener: Callable = urllib.request.urlopen) -> Path:
    """Download an official model into the cache, verify its checksum, and return its path."""
    spec = _spec(name)
    existing = installed_path(name)
    if existing and not overwrite:
        return existing
    models_dir().mkdir(parents=True, exist_ok=True)
    source = url or spec.url
    tmp = models_dir() / f".{spec.filename}.{os.getpid()}.partial"
    try:
        try:
            response = opener(source, timeout=60)
        except (urllib.error.URLError, OSError) as err:
            raise ModelNotAvailable(
                f"Could not download {spec.name!r} from {source}: {getattr(err, 'reason', err)}. On a machine "
                f"without internet access, download {spec.filename} elsewhere and run: universalseg models import FILE"
            ) from err
        with response, open(tmp, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            from tqdm.auto import tqdm

            with tqdm(total=total, unit="B", unit_scale=True, desc=spec.filename, disable=not progress) as bar:
                for block in iter(lambda: response.read(2**20), b""):
                    out.write(block)
                    bar.update(len(block))
        if total and tmp.stat().st_size != total:
            raise ModelNotAvailable(f"Download of {spec.filename} was interrupted ({tmp.stat().st_size} of {total} bytes).")
        return _install(spec, tmp, source)
    finally:
        if tmp.exists():
            tmp.unlink()


def import_model(path: str | os.PathLike, name: str | None = None, overwrite: bool = False) -> Path:
    """Copy a local official checkpoint into the cache (offline machines), verified like a download."""
    src = Path(path)
    if not src.is_file():
        raise ModelNotAvailable(f"{src} is not a file.")
    if name is None:
        matches = [s.name for s in REGISTRY.values() if s.filename == src.name]
        if not matches:
            raise ModelNotAvailable(f"Cannot tell which model {src.name} is; pass the name ({', '.join(REGISTRY)}).")
        name = matches[0]
    spec = _spec(name)
    if installed_path(name) and not overwrite:
        raise OutputExistsError(f"Model {name!r} is already installed at {installed_path(name)}; use --overwrite to replace it.")
    models_dir().mkdir(parents=True, exist_ok=True)
    tmp = models_dir() / f".{spec.filename}.{os.getpid()}.partial"
    try:
        shutil.copyfile(src, tmp)
        return _install(spec, tmp, str(src))
    finally:
        if tmp.exists():
            tmp.unlink()


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A checkpoint file from a path, or an installed registered model by name."""
    text = str(name_or_path)
    if text in REGISTRY:
        path = installed_path(text)
        if path is None:
            spec = REGISTRY[text]
            raise ModelNotAvailable(
                f"Model {text!r} is not installed. Download it ({spec.size_mb} MB; licence: CC BY-NC-ND 4.0, "
                f"non-commercial) with:\n    universalseg models download {text}\nor, offline, import a copy of "
                f"{spec.filename} with:\n    universalseg models import /path/to/{spec.filename}\n(in 3D Slicer: "
                "the Download and Import buttons of the UniversalSeg module)")
        return path
    path = Path(text).expanduser()
    if path.is_file():
        return path
    raise ModelNotAvailable(f"{text!r} is neither a known model ({', '.join(REGISTRY)}) nor an existing checkpoint file.")
