"""Per-class masks handed to the writers: validation, class look-up, and the label-map overlap rule.

Masks are ``{class index: bool array}`` on the volume's grid (IJK, same shape as ``volume.array``);
class indices are the 1-based indices of the taxonomy (:class:`UniversalSegLib.taxonomy.ClassInfo`).

Overlap rule of a single label map (a voxel can hold one label only; the other outputs keep every
class): the class with the highest priority wins, where priority is, in order,

1. the kind: tumour and cyst > vessel > organ (a lesion or vessel lies inside an organ; painting it
   last keeps it visible);
2. the smaller mask (in voxels) wins among classes of the same kind (the smaller structure would
   otherwise vanish);
3. the lower class index wins on a tie (deterministic).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Iterable

import numpy as np

from .errors import InvalidMaskError
from .volume import Volume

#: Priority of each class kind in a label map (higher is painted later and wins).
KIND_PRIORITY = {"tumor": 3, "cyst": 3, "vessel": 2, "organ": 1}

OVERLAP_RULE = (
    "Where classes overlap, the label map holds one of them: tumour/cyst over vessel over organ; among "
    "classes of the same kind the smaller mask wins; on a tie the lower class index wins. "
    "The per-class masks, .seg.nrrd and DICOM SEG outputs keep every class."
)


class LazyMasks(Mapping):
    """Read-only ``{class index: bool mask}`` whose masks are made on access, one class at a time.

    A fine CT (512 x 512 x 800 voxels) has 210 MB per mask, so 32 classes cannot all be held at once;
    writers and statistics visit classes one by one. Masks are cached while the cache stays within
    ``cache_bytes`` (all of them for a typical CT), and recomputed on access otherwise.

    Args:
        shape: the grid of every mask.
        makers: ``{class index: function returning that class's bool mask of shape `shape`}``.
        cache_bytes: how many bytes of made masks to keep.
    """

    def __init__(self, shape: tuple[int, ...], makers: Mapping[int, Callable[[], np.ndarray]],
                 cache_bytes: int = 512 * 2**20) -> None:
        self.shape = tuple(int(n) for n in shape)
        self._makers = dict(makers)
        self._cache: dict[int, np.ndarray] = {}
        self._cache_bytes = int(cache_bytes)

    def __getitem__(self, index: int) -> np.ndarray:
        if index in self._cache:
            return self._cache[index]
        mask = self._makers[index]()
        if mask.shape != self.shape or mask.dtype != bool:
            raise InvalidMaskError(f"class {index}: made a {mask.dtype} mask of shape {mask.shape}, expected "
                                   f"bool {self.shape}")
        if (len(self._cache) + 1) * mask.nbytes <= self._cache_bytes:
            mask.setflags(write=False)  # cached masks are shared by every reader
            self._cache[index] = mask
        return mask

    def __iter__(self):
        return iter(self._makers)

    def __len__(self) -> int:
        return len(self._makers)

    def fill_cache(self) -> bool:
        """Make and cache every mask if they fit the cache budget; True when all are cached."""
        if len(self) * int(np.prod(self.shape)) > self._cache_bytes:
            return False
        for index in self:
            self[index]
        return True


def classes_by_index(classes: Any) -> dict[int, Any]:
    """``{index: ClassInfo}`` from a Taxonomy, a sequence of ClassInfo or a mapping index -> ClassInfo."""
    items: Iterable[Any] = classes.values() if isinstance(classes, Mapping) else classes
    table = {}
    for info in items:
        table[int(info.index)] = info
    return table


def validate_masks(volume: Volume, masks: Mapping[int, np.ndarray], classes: Any) -> tuple[dict[int, np.ndarray], dict[int, Any]]:
    """Check masks against the volume and the class list; return (bool masks sorted by index, class table).

    Accepts bool arrays, and integer/float arrays holding only 0 and 1. Raises :class:`InvalidMaskError`
    naming the class for an unknown class index, a wrong shape, or non-binary values.
    """
    table = classes_by_index(classes)
    if not isinstance(masks, Mapping):
        raise InvalidMaskError(f"masks must be a dict {{class index: bool array}}, got {type(masks).__name__}.")
    if isinstance(masks, LazyMasks):
        # Bool masks of a known shape by construction: check keys and grid without making them all.
        unknown = sorted(set(masks) - set(table))
        if unknown:
            raise InvalidMaskError(f"masks are given for class indices {unknown}, which are not in the class list.")
        if masks.shape != tuple(volume.shape):
            raise InvalidMaskError(f"the masks have shape {masks.shape}, but the volume has {volume.shape}.")
        return masks, table
    checked: dict[int, np.ndarray] = {}
    for key in sorted(masks, key=lambda k: int(k) if isinstance(k, (int, np.integer)) else -1):
        if not isinstance(key, (int, np.integer)) or isinstance(key, bool):
            raise InvalidMaskError(f"mask keys must be 1-based class indices (int), got {key!r}.")
        index = int(key)
        if index not in table:
            known = ", ".join(str(i) for i in sorted(table))
            raise InvalidMaskError(f"a mask is given for class index {index}, which is not in the class list ({known}).")
        name = f"class {index} ({table[index].display_name})"
        mask = np.asarray(masks[key])
        if mask.shape != volume.shape:
            raise InvalidMaskError(
                f"the mask of {name} has shape {mask.shape}, but the volume has {volume.shape}; masks must lie "
                f"on the volume's voxel grid (IJK order)."
            )
        if mask.dtype != bool:
            if not (np.issubdtype(mask.dtype, np.integer) or np.issubdtype(mask.dtype, np.floating)):
                raise InvalidMaskError(f"the mask of {name} has dtype {mask.dtype}; expected bool.")
            binary = mask != 0
            if np.any(mask[binary] != 1):
                raise InvalidMaskError(
                    f"the mask of {name} holds values other than 0 and 1 (e.g. probabilities); threshold it first."
                )
            mask = binary
        checked[index] = mask
    return checked, table


def paint_order(masks: Mapping[int, np.ndarray], table: Mapping[int, Any]) -> list[int]:
    """Class indices in the order to paint them into a label map (the last one wins; see module docstring)."""
    counts = {index: int(np.count_nonzero(mask)) for index, mask in masks.items()}

    def priority(index: int):
        return (KIND_PRIORITY.get(getattr(table[index], "kind", ""), 0), -counts[index], -index)

    return sorted(masks, key=priority)


def label_map_from_masks(shape, masks: Mapping[int, np.ndarray], table: Mapping[int, Any]) -> np.ndarray:
    """Multi-label array (uint8, or uint16 for indices > 255) with the overlap rule of this module."""
    largest = max(masks, default=0)
    if largest > np.iinfo(np.uint16).max:
        raise InvalidMaskError(f"class index {largest} does not fit a 16-bit label map.")
    dtype = np.uint8 if largest <= np.iinfo(np.uint8).max else np.uint16
    labels = np.zeros(shape, dtype=dtype)
    for index in paint_order(masks, table):
        labels[masks[index]] = index
    return labels
