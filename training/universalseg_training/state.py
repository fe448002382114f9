"""Training-state checkpoints: atomic writes, the ``latest.json`` pointer, RNG states, resume checks.

A state checkpoint (``output_dir/checkpoints/step_*.pt``) holds the model, optimiser, scheduler, gradient
scaler, step, every RNG state and the configuration; ``latest.json`` names the newest one and is replaced
atomically after the checkpoint is complete, so a run killed at any moment resumes from a whole file.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from UniversalSegLib.io.atomic import atomic_output

__all__ = ["CHECKPOINT_FORMAT", "ResumeError", "latest_checkpoint", "load_training_state", "save_training_state",
           "check_resume_compatible", "atomic_write"]

CHECKPOINT_FORMAT = "universalseg-training-state"


class ResumeError(ValueError):
    """``output_dir`` holds a run that the present configuration cannot continue."""


def atomic_write(path: Path, writer) -> None:
    """Call ``writer(temporary)``, flush it to disk, then move it onto ``path`` with the library's atomic
    output (replacing an earlier version: checkpoints and ``latest.json`` are rewritten as training goes)."""
    with atomic_output(path, overwrite=True) as temporary:
        writer(temporary)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())  # a crash right after the rename must not leave an empty checkpoint


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest training-state checkpoint of a run (via ``checkpoints/latest.json``), or None."""
    pointer = Path(output_dir) / "checkpoints" / "latest.json"
    if not pointer.is_file():
        return None
    path = pointer.parent / json.loads(pointer.read_text())["file"]
    return path if path.is_file() else None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [v.tolist() if isinstance(v, np.ndarray) else v for v in np.random.get_state()]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    numpy = state["numpy"]
    np.random.set_state((numpy[0], np.asarray(numpy[1], dtype=np.uint32), *numpy[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(folder: Path, step: int, state: dict, keep: int) -> Path:
    """Write ``state`` as ``folder/step_<step>.pt``, point ``latest.json`` at it, keep the newest ``keep``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:08d}.pt"
    atomic_write(path, lambda p: torch.save({"format": CHECKPOINT_FORMAT, "step": step, **state}, p))
    atomic_write(folder / "latest.json", lambda p: p.write_text(json.dumps({"file": path.name, "step": step})))
    kept = sorted(folder.glob("step_*.pt"))
    for old in kept[: max(0, len(kept) - keep)]:
        old.unlink(missing_ok=True)
    return path


def load_training_state(path: str | Path) -> dict:
    """Read a training-state checkpoint (tensors and plain data only; no pickled code is executed)."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a universalseg-training checkpoint")
    return state


def check_resume_compatible(path: Path, state: Mapping[str, Any], classes: Sequence[str],
                            datasets: Sequence[Mapping[str, Any]]) -> None:
    """Refuse to resume when the model's classes or the training datasets changed since the checkpoint."""
    output_dir = path.parent.parent
    saved_classes = [c["display_name"] for c in state.get("classes", {}).get("classes", [])] or None
    if saved_classes is not None and list(saved_classes) != list(classes):
        raise ResumeError(
            f"{output_dir} holds a run of a model with the classes {saved_classes} (checkpoint {path.name}), but the "
            f"configuration now asks for {list(classes)}. A run cannot change its classes: restore 'classes' to "
            f"continue it, or set a new 'output_dir' (with init_checkpoint: {output_dir}/final.safetensors to "
            "fine-tune from it).")
    saved = state.get("datasets")
    if saved is not None and [(d["name"], d["fingerprint"]) for d in saved] != \
            [(d["name"], d["fingerprint"]) for d in datasets]:
        raise ResumeError(
            f"{output_dir} holds a run trained on the datasets {[d['name'] for d in saved]} (checkpoint {path.name}), "
            f"but 'datasets' now lists {[d['name'] for d in datasets]} or their specifications changed (label values, "
            "annotated classes). Resuming would not continue the same run: restore 'datasets' and their "
            "specifications, or set a new 'output_dir'.")
