"""Checkpoints: the released official ``.pth`` files and UniversalSeg's own safetensors format.

Official files (``clip_driven_universal_{swin_unetr,unet}.pth``) are PyTorch pickles. They are read with
``torch.load(weights_only=True)``, which refuses pickled code, and accept both key layouts seen in the wild:
the released one (``module.`` prefix; the Swin file in the pre-2023 flat layout without
``backbone.``) and the one a DDP run of the current official ``train.py`` writes
(``module.backbone.swinViT...``).

Our own format is a single ``.safetensors`` file: tensors under the official key names, and JSON metadata
in the safetensors header (key ``"universalseg"``; :mod:`.checkpoint_metadata`, readable without PyTorch):
the backbone's registered name and arguments, the class table with prompts, preprocessing and inference
parameters, library version, provenance and licence. The label embeddings are the ``organ_embedding``
tensor, so inference never needs a text encoder for the classes a checkpoint knows. The backbone of an
official file is recognised from its keys and sized from its tensor shapes (:mod:`.backbones`).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import pickle
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from . import __version__
from .backbones import BACKBONES, detect_backbone, get_backbone
from .checkpoint_metadata import (FORMAT_NAME, FORMAT_VERSION, METADATA_KEY, CheckpointMetadata, check_file,
                                  is_safetensors, official_metadata, read_metadata)
from .errors import CheckpointError, OutputExistsError
from .helpers import sha256_file
from .io.atomic import atomic_output
from .model import ModelConfig, UniversalModel
from .model_store import OFFICIAL_LICENSE
from .taxonomy import ClassInfo, Taxonomy

if TYPE_CHECKING:
    from .text import TextEncoder

__all__ = [
    "CheckpointError", "CheckpointMetadata", "Checkpoint",
    "OFFICIAL_LICENSE", "FORMAT_NAME", "FORMAT_VERSION",
    "load_checkpoint", "load_official_state_dict", "save_checkpoint", "convert_official_checkpoint",
    "read_metadata", "official_metadata", "sha256_file",
]

# Top-level modules of the official Swin UNETR that the released (pre-2023, flat) layout has at the root.
_FLAT_SWIN_PREFIXES = ("swinViT.", "encoder", "decoder")


@dataclass
class Checkpoint:
    """Tensors (official key names) plus metadata; :meth:`build_model` makes the ready-to-run network."""

    state_dict: dict[str, torch.Tensor]
    metadata: CheckpointMetadata
    path: str | None = None

    def build_model(self, device: str | torch.device = "cpu") -> UniversalModel:
        model = UniversalModel(self.metadata.model)
        _check_keys(model, self.state_dict, self.path)
        model.load_state_dict(self.state_dict, strict=True)
        return model.to(device).eval()

    @property
    def label_embeddings(self) -> torch.Tensor:
        return self.state_dict["organ_embedding"]

    def with_classes(self, classes: Taxonomy, embeddings: torch.Tensor, embedding_info: Mapping[str, Any] | None = None) -> "Checkpoint":
        """A copy with another class table and label embeddings (same network weights).

        The head is class-agnostic: any class with an embedding can be segmented, so this is how new class
        names are added (e.g. before fine-tuning) or the embeddings of an encoder are swapped in.
        """
        embeddings = torch.as_tensor(embeddings, dtype=torch.float32)
        if embeddings.dim() != 2 or embeddings.shape[0] != len(classes):
            raise ValueError(f"Need one embedding row per class: {len(classes)} classes, embeddings of shape {tuple(embeddings.shape)}.")
        if embeddings.shape[1] != self.metadata.model.embedding_dim:
            raise ValueError(f"Embedding dimension {embeddings.shape[1]} does not match the model's "
                             f"{self.metadata.model.embedding_dim}.")
        state = dict(self.state_dict)
        state["organ_embedding"] = embeddings.contiguous()
        meta = self.metadata
        metadata = CheckpointMetadata(
            model=replace(meta.model, num_classes=len(classes)), classes=classes, preprocessing=meta.preprocessing,
            inference=meta.inference,
            embedding=dict(embedding_info or meta.embedding), provenance=dict(meta.provenance), license=meta.license)
        return Checkpoint(state, metadata, None)

    def add_classes(self, names: Sequence[str], encoder: "TextEncoder") -> "Checkpoint":
        """A copy that also knows ``names`` (new classes), embedded with ``encoder``; old classes are unchanged.

        The encoder must be the one the checkpoint's embeddings came from (e.g. CLIP for official weights),
        otherwise the new vectors live in another space than the ones the head was trained on.
        """
        taxonomy = self.metadata.classes
        known = {c.display_name.casefold() for c in taxonomy} | {c.prompt_name.casefold() for c in taxonomy}
        clashes = [n for n in names if n.strip().casefold() in known]
        if clashes:
            raise ValueError(f"Already in the checkpoint's class table: {', '.join(clashes)}.")
        start = max(taxonomy.indices) + 1
        new = [ClassInfo.from_dict({"index": start + i, "display_name": n.strip(), "prompt_name": n.strip()})
               for i, n in enumerate(names)]
        vectors = torch.from_numpy(encoder.encode([c.prompt_name for c in new]))
        return self.with_classes(taxonomy.extended(new), torch.cat([self.label_embeddings.float(), vectors]))


# --------------------------------------------------------------------------------------------------
# Official .pth files
# --------------------------------------------------------------------------------------------------

def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only refuses anything but tensors and plain containers: never execute pickled code.
        raise CheckpointError(
            path, "refused to load: the file contains pickled Python objects or code, not only weights. "
            "Only load checkpoints from a source you trust; UniversalSeg never executes code from a checkpoint"
        ) from err
    except (EOFError, zipfile.BadZipFile) as err:
        raise CheckpointError(path, "the file is truncated or damaged (incomplete download?); download it again") from err
    except RuntimeError as err:
        msg = str(err)
        if "zip archive" in msg or "central directory" in msg or "failed finding" in msg or "PytorchStreamReader" in msg:
            raise CheckpointError(path, "the file is truncated or damaged (incomplete download?); download it again") from err
        raise CheckpointError(path, f"PyTorch could not read the file: {msg.splitlines()[0]}") from err


def _official_key(key: str) -> str:
    """Map a key of any official layout to the model's key names."""
    if key.startswith("module."):
        key = key[len("module."):]
    if key.startswith(_FLAT_SWIN_PREFIXES):
        key = "backbone." + key
    return key


def load_official_state_dict(path: str | os.PathLike, backbone: str | None = None) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Read an official checkpoint (either layout) into model key names; infer the architecture from shapes.

    ``backbone`` (optional) is what the caller expects; a file of the other backbone is an error.
    """
    path = Path(path)
    check_file(path)
    obj = _torch_load(path)
    net = obj.get("net", obj.get("state_dict", obj)) if isinstance(obj, Mapping) else None
    if not isinstance(net, Mapping) or not all(isinstance(v, torch.Tensor) for v in net.values()):
        raise CheckpointError(path, "no weights found: expected a state_dict or a dict with a 'net' state_dict")
    state = {_official_key(k): v for k, v in net.items()}
    found = detect_backbone(state)
    if found is None:
        labels = " nor ".join(spec.label for spec in BACKBONES.values())
        raise CheckpointError(path, f"not a Universal Model checkpoint: neither {labels} backbone keys found")
    if backbone is not None and backbone != found:
        raise CheckpointError(path, f"wrong backbone: the file holds a {found} model, but {backbone} was requested")
    if "organ_embedding" not in state:
        raise CheckpointError(path, "missing key 'organ_embedding' (the label embeddings of the classes)")
    return state, _config_from_state(state, found, path)


def _config_from_state(state: Mapping[str, torch.Tensor], backbone: str, path: Path) -> ModelConfig:
    emb = state["organ_embedding"]
    if emb.dim() != 2:
        raise CheckpointError(path, f"organ_embedding must be 2-D (classes x dim), found shape {tuple(emb.shape)}")
    try:
        kwargs = get_backbone(backbone).kwargs_from_state(state)
    except KeyError as err:
        raise CheckpointError(path, f"missing key {err.args[0]!r}: the file is not a complete {backbone} Universal Model") from err
    return ModelConfig(backbone=backbone, num_classes=emb.shape[0], embedding_dim=emb.shape[1], backbone_kwargs=kwargs)


# --------------------------------------------------------------------------------------------------
# Own format
# --------------------------------------------------------------------------------------------------

def _load_safetensors(path: Path) -> Checkpoint:
    from safetensors.torch import load_file

    metadata = read_metadata(path)
    try:
        state = load_file(str(path), device="cpu")
    except Exception as err:
        raise CheckpointError(path, f"the file is truncated or damaged: {err}") from err
    if "organ_embedding" not in state:
        raise CheckpointError(path, "missing key 'organ_embedding' (the label embeddings of the classes)")
    _check_widths_match_tensors(metadata, state, path)
    n_emb, n_cls = state["organ_embedding"].shape[0], len(metadata.classes)
    if n_emb != n_cls or metadata.model.num_classes != n_cls:
        raise CheckpointError(
            path, f"class-count mismatch: {n_emb} label embeddings, {n_cls} classes in the class table, "
            f"{metadata.model.num_classes} in the model configuration")
    return Checkpoint(state, metadata, str(path))


def _check_widths_match_tensors(metadata: CheckpointMetadata, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Refuse metadata whose model widths differ from the stored tensors, before the model is built from it
    (a header claiming a huge width would otherwise allocate that model first)."""
    spec = get_backbone(metadata.model.backbone)
    try:
        stored = spec.kwargs_from_state(state)
    except KeyError as err:
        raise CheckpointError(path, f"missing key {err.args[0]!r}: the file is not a complete {spec.name} model") from None
    claimed = {**dict(spec.defaults), **dict(metadata.model.backbone_kwargs)}
    differ = [f"{key} {claimed.get(key)!r} (tensors: {value!r})" for key, value in stored.items()
              if claimed.get(key) != value]
    if int(state["organ_embedding"].shape[-1]) != metadata.model.embedding_dim:
        differ.append(f"embedding_dim {metadata.model.embedding_dim} (tensors: {int(state['organ_embedding'].shape[-1])})")
    if differ:
        raise CheckpointError(path, "the model configuration in the metadata does not match the stored tensors: "
                                    + "; ".join(differ))


def load_checkpoint(path: str | os.PathLike, backbone: str | None = None) -> Checkpoint:
    """Load any supported checkpoint: UniversalSeg ``.safetensors`` or an official ``.pth``.

    The result is validated against the architecture (exact key set and shapes); errors are
    :class:`CheckpointError` naming the file and the problem.
    """
    path = Path(path)
    check_file(path)
    if backbone is not None:
        get_backbone(backbone)  # ValueError naming the registered backbones
    if is_safetensors(path):
        ckpt = _load_safetensors(path)
        if backbone is not None and ckpt.metadata.model.backbone != backbone:
            raise CheckpointError(path, f"wrong backbone: the file holds a {ckpt.metadata.model.backbone} model, "
                                        f"but {backbone} was requested")
    else:
        state, config = load_official_state_dict(path, backbone)
        ckpt = Checkpoint(state, official_metadata(config, path), str(path))
    _check_keys(UniversalModel(ckpt.metadata.model), ckpt.state_dict, ckpt.path)
    return ckpt


def _check_keys(model: UniversalModel, state: Mapping[str, torch.Tensor], path: str | None) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {', '.join(missing[:3])}")
        if extra:
            parts.append(f"{len(extra)} unexpected key(s), e.g. {', '.join(extra[:3])}")
        raise CheckpointError(path, f"does not match the {model.config.backbone} architecture: " + "; ".join(parts))
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
             for k, v in expected.items() if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise CheckpointError(path, f"{len(wrong)} tensor(s) with the wrong shape, e.g. {'; '.join(wrong[:3])}")


def save_checkpoint(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], metadata: CheckpointMetadata,
                    overwrite: bool = False) -> Path:
    """Write a UniversalSeg checkpoint atomically (:func:`~UniversalSegLib.io.atomic.atomic_output`); never
    overwrite unless asked."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"UniversalSeg checkpoints are .safetensors files; got {path.name!r}")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; choose another name or pass overwrite=True")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {path.parent} does not exist")
    _check_keys(UniversalModel(metadata.model), state_dict, str(path))
    n = state_dict["organ_embedding"].shape[0]
    if n != len(metadata.classes):
        raise CheckpointError(path, f"class-count mismatch: {n} label embeddings but {len(metadata.classes)} classes")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    header = {METADATA_KEY: json.dumps(metadata.to_dict(), ensure_ascii=False)}
    with atomic_output(path, overwrite) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return path


def convert_official_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, backbone: str | None = None,
                                overwrite: bool = False) -> Path:
    """Convert an official ``.pth`` into a UniversalSeg ``.safetensors`` (weights unchanged, metadata added)."""
    src = Path(src)
    state, config = load_official_state_dict(src, backbone)
    metadata = official_metadata(config, src, sha256_file(src))
    metadata.provenance["converted"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    metadata.provenance["converted_by"] = f"UniversalSeg {__version__}"
    return save_checkpoint(dst, state, metadata, overwrite=overwrite)
