"""What a checkpoint says about itself, readable without PyTorch: architecture, class table,
preprocessing and inference parameters, provenance and licence.

UniversalSeg's checkpoints are ``.safetensors`` files whose JSON header carries this metadata under the
key ``"universalseg"`` (:func:`read_metadata` reads only the header). The official ``.pth`` files carry
none; :func:`official_metadata` describes them. The Slicer module reads metadata in Slicer's own process,
so this module imports no PyTorch, MONAI or safetensors.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from . import __version__
from .errors import CheckpointError
from .model_store import OFFICIAL_LICENSE
from .settings import InferenceParameters, ModelConfig, PreprocessingParameters
from .taxonomy import PROMPT_TEMPLATE, ClassInfo, Taxonomy, get_taxonomy

__all__ = ["CheckpointMetadata", "FORMAT_NAME", "FORMAT_VERSION", "METADATA_KEY", "read_metadata",
           "official_metadata", "check_file", "is_safetensors"]

FORMAT_NAME = "universalseg-checkpoint"
#: Version 2 stores the backbone as name + ``backbone_kwargs``; version 1 files (arguments of every
#: backbone at the top level of ``model``) are still read.
FORMAT_VERSION = 2
METADATA_KEY = "universalseg"
OFFICIAL_EMBEDDING = "clip-vit-b32-openai"


@dataclass
class CheckpointMetadata:
    """Everything about a checkpoint except its tensors."""

    model: ModelConfig
    classes: Taxonomy
    preprocessing: PreprocessingParameters = field(default_factory=PreprocessingParameters)
    inference: InferenceParameters = field(default_factory=InferenceParameters)
    embedding: dict = field(default_factory=lambda: {"encoder": OFFICIAL_EMBEDDING, "template": PROMPT_TEMPLATE})
    provenance: dict = field(default_factory=dict)
    license: str = ""
    library_version: str = __version__

    def to_dict(self) -> dict:
        return {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "library_version": self.library_version,
            "model": self.model.to_dict(), "classes": self.classes.to_dict(),
            "preprocessing": self.preprocessing.to_dict(), "inference": self.inference.to_dict(),
            "embedding": dict(self.embedding),
            "provenance": dict(self.provenance), "license": self.license,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], path: str | os.PathLike | None = None) -> "CheckpointMetadata":
        if d.get("format") != FORMAT_NAME:
            raise CheckpointError(path, f"not a UniversalSeg checkpoint (metadata format {d.get('format')!r})")
        if int(d.get("format_version", 0)) > FORMAT_VERSION:
            raise CheckpointError(
                path, f"written by a newer UniversalSeg (format {d['format_version']}, this version reads "
                f"{FORMAT_VERSION}); upgrade with: pip install -U universalseg")
        try:
            return cls(
                model=ModelConfig.from_dict(d["model"]),
                classes=Taxonomy.from_dict(d["classes"]),
                preprocessing=PreprocessingParameters.from_dict(d.get("preprocessing", {})),
                inference=InferenceParameters.from_dict(d.get("inference", {})),
                embedding=dict(d.get("embedding", {})),
                provenance=dict(d.get("provenance", {})),
                license=str(d.get("license", "")),
                library_version=str(d.get("library_version", "")),
            )
        except (KeyError, TypeError, ValueError) as err:  # TaxonomyError is a ValueError
            raise CheckpointError(path, f"metadata is incomplete or invalid: {err}") from err

    def channel_of(self, info: ClassInfo) -> int:
        """Model output channel of a class: its position in this checkpoint's class table."""
        return list(self.classes.indices).index(info.index)


def official_metadata(config: ModelConfig, source: str | os.PathLike | None = None, source_sha256: str | None = None) -> CheckpointMetadata:
    """Metadata of an official checkpoint: the 32 official classes, official preprocessing and licence."""
    taxonomy = get_taxonomy()
    if config.num_classes != len(taxonomy):
        raise CheckpointError(
            source, f"class-count mismatch: the file has {config.num_classes} label embeddings, the official "
            f"class table has {len(taxonomy)}")
    provenance = {"origin": "official CLIP-Driven Universal Model release"}
    if source is not None:
        provenance["source_file"] = Path(source).name
    if source_sha256:
        provenance["source_sha256"] = source_sha256
    return CheckpointMetadata(model=config, classes=taxonomy, provenance=provenance, license=OFFICIAL_LICENSE)


def check_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(path, "file not found")
    if path.is_dir():
        raise CheckpointError(path, "is a folder, expected a checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(path, "the file is empty")


def is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: 8-byte little-endian header length, then a JSON object.
    return len(head) == 9 and head[8:9] == b"{"


def read_metadata(path: str | os.PathLike) -> CheckpointMetadata:
    """Metadata of a UniversalSeg checkpoint without reading its tensors (header only, no PyTorch).

    A safetensors file starts with the length of its JSON header (8 bytes, little endian) and the header;
    the header's ``__metadata__`` holds UniversalSeg's JSON under the key ``"universalseg"``.
    """
    path = Path(path)
    check_file(path)
    if not is_safetensors(path):
        raise CheckpointError(path, "not a UniversalSeg .safetensors checkpoint")
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > path.stat().st_size - 8:
                raise ValueError(f"the header claims {length} bytes, more than the file holds")
            header = json.loads(f.read(length)).get("__metadata__") or {}
    except (ValueError, struct.error, AttributeError) as err:  # JSONDecodeError is a ValueError
        raise CheckpointError(path, f"damaged safetensors header: {err}") from err
    if METADATA_KEY not in header:
        raise CheckpointError(path, "a safetensors file without UniversalSeg metadata (no class table, no preprocessing)")
    try:
        raw = json.loads(header[METADATA_KEY])
    except json.JSONDecodeError as err:
        raise CheckpointError(path, f"metadata is not valid JSON: {err}") from err
    return CheckpointMetadata.from_dict(raw, path)
