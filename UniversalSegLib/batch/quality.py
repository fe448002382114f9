"""Quality signals of one segmented case, from the probabilities the network already produced.

Nothing here runs the network again. Per class, on the model's grid (where the uint8 probabilities
live, ``round(255 * sigmoid)``):

* **boundary uncertainty**: the share of the segment's voxels (probability >= 20 %) whose probability
  lies in the uncertain band 20-80 %. A crisp segment has a thin band at its surface only; a hesitant
  one has a thick band or is uncertain throughout.
* **fragmentation**: the connected pieces of the thresholded segment (before post-processing keeps
  the largest), and the share of the largest. An organ in several pieces was partly missed or confused.
* **cut by the field of view**: the segment touches the first or last axial slice, so its volume is
  partial.
* **overlap conflicts**: the share of the segment also claimed by a class it cannot overlap, from the
  taxonomy's class kinds and parents (:func:`conflicting_pairs`).
* **strongest probability**: the highest probability anywhere; an organ with none above 50 % is missing.

The volume (ml) comes from the final mask on the input grid. Batch-level signals (volume against the
expected range and the batch's own distribution, left/right asymmetry, missing expected organs) are
scored later from these measurements, in :mod:`.queue`.
"""
from __future__ import annotations

from itertools import combinations
from typing import Iterable, Mapping, Sequence

import numpy as np

from ..helpers import bounding_box, dice_score
from ..taxonomy import ClassInfo

__all__ = ["measure_case", "conflicting_pairs", "paired_organs", "UNCERTAIN_BAND", "thumbnails"]

#: Probabilities (uint8, 0..255) counted as uncertain: 20 % to 80 %.
UNCERTAIN_BAND = (51, 204)
#: uint8 probability above which a voxel belongs to the segment (the model's 0.5 threshold).
INSIDE = 127
#: Pieces smaller than this many model-grid voxels are ignored (isolated speckles).
MIN_PIECE_VOXELS = 5


def conflicting_pairs(classes: Sequence[ClassInfo]) -> list[tuple[int, int]]:
    """Pairs of class indices that cannot share voxels: two organs, or a lesion and an organ that is not
    one of the lesion's parent organs. Vessels run through organs and are never in conflict."""
    pairs = []
    for a, b in combinations(sorted(classes, key=lambda c: c.index), 2):
        if a.kind == "organ" and b.kind == "organ":
            pairs.append((a.index, b.index))
        elif a.is_lesion != b.is_lesion and "organ" in (a.kind, b.kind):
            lesion, organ = (a, b) if a.is_lesion else (b, a)
            if organ.index not in lesion.parent_organs:
                pairs.append((a.index, b.index))
    return pairs


def paired_organs(classes: Sequence[ClassInfo]) -> list[tuple[ClassInfo, ClassInfo]]:
    """(left, right) classes of the same structure: the same terminology type, opposite laterality."""
    pairs = []
    for a, b in combinations(classes, 2):
        if {a.laterality, b.laterality} == {"left", "right"} and a.terminology.type == b.terminology.type:
            pairs.append((a, b) if a.laterality == "left" else (b, a))
    return pairs


def _pieces(mask: np.ndarray) -> list[int]:
    """Sizes of the 26-connected pieces of ``mask`` (speckles dropped), largest first."""
    import cc3d

    box = bounding_box(mask)
    if box is None:
        return []
    labels, count = cc3d.connected_components(np.ascontiguousarray(mask[box]), connectivity=26, return_N=True)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    return sorted((int(s) for s in sizes if s >= MIN_PIECE_VOXELS), reverse=True)


def measure_case(probabilities: Mapping[int, np.ndarray], classes: Sequence[ClassInfo],
                 volumes_ml: Mapping[int, float], cross_check: Mapping[int, np.ndarray] | None = None,
                 masks: Mapping[int, np.ndarray] | None = None) -> dict[str, dict]:
    """Per-class measurements ``{class key: {...}}`` of one case (JSON-ready).

    Args:
        probabilities: ``{class index: uint8 probabilities on the model grid}``.
        classes: the classes segmented.
        volumes_ml: ``{class index: volume of the final mask}``.
        cross_check: ``{class index: final mask}`` of a second model, compared with ``masks`` (Dice).
        masks: this model's final masks (needed with ``cross_check``).
    """
    inside = {c.index: probabilities[c.index] > INSIDE for c in classes if c.index in probabilities}
    out: dict[str, dict] = {}
    for info in classes:
        prob = probabilities.get(info.index)
        entry: dict = {"index": info.index, "volume_ml": round(float(volumes_ml.get(info.index, 0.0)), 3)}
        if prob is not None:
            soft = int(np.count_nonzero(prob >= UNCERTAIN_BAND[0]))
            band = int(np.count_nonzero((prob >= UNCERTAIN_BAND[0]) & (prob <= UNCERTAIN_BAND[1])))
            pieces = _pieces(inside[info.index])
            along_z = inside[info.index].any(axis=(0, 1))
            entry.update(
                max_probability=round(float(prob.max()) / 255.0, 3),
                uncertain_share=round(band / soft, 4) if soft else None,
                pieces=len(pieces), largest_share=round(pieces[0] / sum(pieces), 4) if pieces else None,
                cut_by_fov=bool(along_z.size and (along_z[0] or along_z[-1])),
            )
        out[info.key] = entry
    by_index = {c.index: c for c in classes}
    for a, b in conflicting_pairs(classes):
        if a not in inside or b not in inside:
            continue
        shared = int(np.count_nonzero(inside[a] & inside[b]))
        if not shared:
            continue
        for this, other in ((a, b), (b, a)):
            total = int(np.count_nonzero(inside[this]))
            out[by_index[this].key].setdefault("overlaps", {})[by_index[other].key] = round(shared / total, 4)
    if cross_check is not None and masks is not None:
        for info in classes:
            if info.index in cross_check:
                out[info.key]["cross_check_dice"] = round(dice_score(masks[info.index], cross_check[info.index]), 4)
    return out


def thumbnails(image: np.ndarray, probabilities: Mapping[int, np.ndarray], classes: Iterable[ClassInfo],
               size: int = 128) -> dict[str, np.ndarray]:
    """Per class, the axial model-grid slice through the segment's centre: ``{key_ct, key_mask}`` uint8
    arrays of at most ``size`` pixels a side, for the report's overlays (no need to read the CT again)."""
    out = {}
    step = max(1, int(np.ceil(max(image.shape[:2]) / size)))
    for info in classes:
        prob = probabilities.get(info.index)
        if prob is None:
            continue
        mask = prob > INSIDE
        along_z = np.flatnonzero(mask.any(axis=(0, 1)))
        z = int(along_z[len(along_z) // 2]) if along_z.size else image.shape[2] // 2
        out[f"{info.key}_ct"] = (np.clip(image[::step, ::step, z], 0, 1) * 255).astype(np.uint8)
        out[f"{info.key}_mask"] = mask[::step, ::step, z].astype(np.uint8)
    return out
