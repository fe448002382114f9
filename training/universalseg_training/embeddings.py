"""Label embeddings for a new model: CLIP text features, the official ``txt_encoding.pth``, or one-hot.

``embedding`` setting:

* ``clip``: CLIP ViT-B/32 text features of each class's prompt (needs the weights; ``clip_weights`` or the
  local caches);
* ``file``: a file of precomputed embeddings, one row per class of the 32-class taxonomy in its order —
  the official ``txt_encoding.pth`` (a float16 tensor 32 x 512) or a ``.npy`` of the same shape;
* ``onehot``: the i-th unit vector for the i-th class (the paper's baseline, no text semantics);
* ``auto``: ``embedding_file`` when given, else CLIP when its weights are found; otherwise an error that
  says which setting to choose (never a silent one-hot model).

What was used is returned as ``info`` and recorded in ``run_info.json``, the text log and the exported
checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from UniversalSegLib.helpers import sha256_file
from UniversalSegLib.taxonomy import ClassInfo
from UniversalSegLib.text import PROMPT_TEMPLATE, ClipTextEncoder, OneHotEncoder, TextEncoderUnavailable, find_clip_weights

__all__ = ["EmbeddingUnavailable", "label_embeddings", "read_embedding_file", "CLIP_ENCODER_NAME"]

CLIP_ENCODER_NAME = ClipTextEncoder.name


class EmbeddingUnavailable(ValueError):
    """The configured label embedding cannot be produced; the message names the setting to change."""


def read_embedding_file(path: str | Path) -> np.ndarray:
    """Rows of an embedding file (``.pth``/``.pt`` tensor as saved by the official code, or ``.npy``), float32."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise EmbeddingUnavailable(f"embedding_file {path} does not exist; give the path of the official "
                                   "txt_encoding.pth (or a .npy of the same rows).")
    try:
        if path.suffix.lower() == ".npy":
            rows = np.load(path)
        else:
            value = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(value, dict):  # a state-dict-like wrapper around the one tensor
                tensors = [v for v in value.values() if isinstance(v, torch.Tensor)]
                value = tensors[0] if len(tensors) == 1 else value
            if not isinstance(value, torch.Tensor):
                raise EmbeddingUnavailable(f"embedding_file {path} does not hold one tensor of embeddings")
            rows = value.float().numpy()
    except EmbeddingUnavailable:
        raise
    except Exception as error:  # torch/numpy raise many types for damaged files
        raise EmbeddingUnavailable(f"embedding_file {path} cannot be read: {error}") from None
    rows = np.asarray(rows, dtype=np.float32)
    if rows.ndim != 2:
        raise EmbeddingUnavailable(f"embedding_file {path} holds an array of shape {rows.shape}; expected classes x dim")
    return rows


def _from_file(path: str, classes: Sequence[ClassInfo]) -> tuple[np.ndarray, dict]:
    rows = read_embedding_file(path)
    beyond = [c.display_name for c in classes if c.index > rows.shape[0]]
    if beyond:
        raise EmbeddingUnavailable(
            f"embedding_file {path} has {rows.shape[0]} rows (one per class index 1..{rows.shape[0]}), so it has no "
            f"embedding for {', '.join(beyond)}; use embedding: clip to embed new class names.")
    vectors = np.stack([rows[c.index - 1] for c in classes])
    info = {"encoder": CLIP_ENCODER_NAME, "template": PROMPT_TEMPLATE, "source": "file", "file": str(path),
            "sha256": sha256_file(path)}
    return vectors, info


def label_embeddings(kind: str, classes: Sequence[ClassInfo], clip_weights: str | None = None,
                     embedding_file: str | None = None) -> tuple[np.ndarray, dict]:
    """``(vectors (N, 512) float32, info)`` for ``classes`` by the ``embedding`` setting ``kind``."""
    classes = list(classes)
    if kind == "onehot":
        encoder = OneHotEncoder([c.key for c in classes], dim=512)
        return encoder.encode([c.key for c in classes]), {"encoder": "one-hot", "source": "one-hot",
                                                          "vocabulary": [c.key for c in classes]}
    if kind == "file" or (kind == "auto" and embedding_file):
        return _from_file(str(embedding_file), classes)
    weights = clip_weights or find_clip_weights()
    if kind == "auto" and weights is None:
        raise EmbeddingUnavailable(
            "embedding: auto found no label embeddings: no embedding_file was given and no CLIP ViT-B/32 weights are "
            "in the local caches. Set embedding_file to the official txt_encoding.pth (embedding: file), set "
            "clip_weights to a CLIP ViT-B/32 weights file (embedding: clip), or set embedding: onehot to train the "
            "paper's one-hot baseline on purpose.")
    try:
        encoder = ClipTextEncoder(weights=weights)
    except TextEncoderUnavailable as error:
        raise EmbeddingUnavailable(f"embedding: {kind} needs CLIP: {error} Or set embedding_file to the official "
                                   "txt_encoding.pth, or embedding: onehot.") from None
    info = {"encoder": encoder.name, "template": PROMPT_TEMPLATE, "source": "clip", "weights": str(encoder.weights_path)}
    return encoder.encode([c.prompt_name for c in classes]), info
