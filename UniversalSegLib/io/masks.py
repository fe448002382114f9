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

from ..errors import InvalidMaskError
from ..taxonomy import KIND_PRIORITY
from .volume import Volume

OVERLAP_RULE = (
    "Where classes overlap, the label map holds one of them: tumour/cyst over vessel over organ; among "
    "classes of the same kind the smaller mask wins; on a tie the lower class index wins. "
    "The per-class masks, .seg.nrrd and DICOM SEG outputs keep every class."
)


class LazyMasks(Mapping):
    """Read-only ``{class index: bool mask}`` whose masks are made on access, one class at a time.

    A fine CT (512 x 512 x 800 voxels) has 210 MB per mask, so 32 classes cannot all be held at once;
    writers and statistics visit classes one by one. Masks are cached when all of them fit ``cache_bytes``
    (a typical CT), and made again on each access otherwise.

    Whenever a mask is made, every function of ``measures`` is applied to it and the numbers are kept
    (:meth:`measure`), so that the voxel count or a statistic never costs a second pass over a mask that
    did not fit the cache. The voxel count (``"voxels"``) is always measured.

    Args:
        shape: the grid of every mask.
        makers: ``{class index: function returning that class's bool mask of shape `shape`}``.
        cache_bytes: how many bytes of made masks to keep.
        measures: ``{name: function(mask) -> value}`` evaluated on each mask when it is made.
    """

    def __init__(self, shape: tuple[int, ...], makers: Mapping[int, Callable[[], np.ndarray]],
                 cache_bytes: int = 512 * 2**20, measures: Mapping[str, Callable[[np.ndarray], Any]] | None = None) -> None:
        self.shape = tuple(int(n) for n in shape)
        self._makers = dict(makers)
        self._cache: dict[int, np.ndarray] = {}
        self._cache_bytes = int(cache_bytes)
        self._measures = {"voxels": lambda mask: int(np.count_nonzero(mask)), **(measures or {})}
        self._measured: dict[int, dict[str, Any]] = {}

    def __getitem__(self, index: int) -> np.ndarray:
        if index in self._cache:
            return self._cache[index]
        mask = self._makers[index]()
        if mask.shape != self.shape or mask.dtype != bool:
            raise InvalidMaskError(f"class {index}: made a {mask.dtype} mask of shape {mask.shape}, expected "
                                   f"bool {self.shape}")
        if index not in self._measured:
            self._measured[index] = {name: function(mask) for name, function in self._measures.items()}
        # Cache only when every mask fits: when they do not, each pass makes every class anyway, and a few
        # cached masks would only add to the peak (210 MB each on a fine CT).
        if len(self) * mask.nbytes <= self._cache_bytes:
            mask.setflags(write=False)  # cached masks are shared by every reader
            self._cache[index] = mask
        return mask

    def __iter__(self):
        return iter(self._makers)

    def __len__(self) -> int:
        return len(self._makers)

    @property
    def measures(self) -> tuple[str, ...]:
        """Names of the measures taken on every mask."""
        return tuple(self._measures)

    def measure(self, index: int, name: str = "voxels") -> Any:
        """The value of measure ``name`` on class ``index``'s mask (made now if it never was)."""
        if name not in self._measures:
            raise KeyError(f"no measure {name!r}; known: {', '.join(self._measures)}")
        if index not in self._measured:
            self[index]
        return self._measured[index][name]

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


def _priority(info: Any, count: int, index: int) -> tuple[int, int, int]:
    """Sort key of the overlap rule (module docstring): higher wins."""
    return (KIND_PRIORITY.get(getattr(info, "kind", ""), 0), -count, -index)


#: Voxels handled at a time by the slab loops below: bounds the temporaries of a fine CT (512 x 512 x 800)
#: to tens of MB.
_SLAB_VOXELS = 8 * 2**20


def memory_order(array: np.ndarray) -> str:
    """"F" for a Fortran-ordered array (nibabel and SimpleITK volumes, and masks on their grid), else "C"."""
    return "F" if array.flags.f_contiguous and not array.flags.c_contiguous else "C"


def memory_order_view(array: np.ndarray) -> np.ndarray:
    """``array`` or its transpose, whichever is C-contiguous: slabs along axis 0 of the view are contiguous,
    and numpy's element-wise loops and boolean indexing run in memory order."""
    return array.T if memory_order(array) == "F" else array


def slab_length(view: np.ndarray) -> int:
    """Rows along axis 0 of a C-contiguous ``view`` that make one slab of about ``_SLAB_VOXELS``."""
    return max(1, _SLAB_VOXELS // max(1, int(np.prod(view.shape[1:], dtype=np.int64))))


def same_order_views(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """The arrays, or all their transposes when every one is Fortran-ordered (same elements, C-contiguous views)."""
    if all(memory_order(a) == "F" for a in arrays):
        return tuple(a.T for a in arrays)
    return arrays


def paint_label_map(shape, masks: Mapping[int, np.ndarray], table: Mapping[int, Any]) -> tuple[np.ndarray, dict[int, int]]:
    """Label map with the overlap rule of this module, and every class's voxel count, in one pass over the masks.

    Each mask is read once (a :class:`LazyMasks` makes each class once): a voxel takes the new class where
    that class outranks the label already painted there. The counts come from the same read. The label map
    has the memory order of the first mask (Fortran for masks on a nibabel volume's grid).
    Returns (labels: uint8, or uint16 for indices > 255; ``{class index: voxel count}``).
    """
    shape = tuple(int(n) for n in shape)
    largest = max(masks, default=0)
    if largest > np.iinfo(np.uint16).max:
        raise InvalidMaskError(f"class index {largest} does not fit a 16-bit label map.")
    dtype = np.uint8 if largest <= np.iinfo(np.uint8).max else np.uint16
    counts: dict[int, int] = {}
    # rank[label] orders the labels painted so far (the overlap rule's priority); background ranks lowest.
    rank = np.zeros(largest + 1, dtype=dtype)
    ranked: list[tuple[tuple[int, int, int], int]] = []
    labels = None
    for index in masks:
        mask = masks[index]
        if labels is None:  # the first mask sets the memory order (no mask is made twice)
            order = memory_order(mask)
            labels = np.zeros(shape, dtype=dtype, order=order)
            flat_labels = labels.T if order == "F" else labels  # C-contiguous either way
            slab = slab_length(flat_labels)
            buffer_rank = np.empty((slab, *flat_labels.shape[1:]), dtype=dtype)
            buffer_win = np.empty((slab, *flat_labels.shape[1:]), dtype=bool)
        counts[index] = int(np.count_nonzero(mask))
        if not counts[index]:
            continue
        ranked.append((_priority(table[index], counts[index], index), index))
        ranked.sort()
        rank[[i for _, i in ranked]] = np.arange(1, len(ranked) + 1)
        mine = rank[index]
        view = mask.T if order == "F" else mask
        for start in range(0, flat_labels.shape[0], slab):
            part = view[start:start + slab]
            if not part.any():
                continue
            painted = flat_labels[start:start + slab]
            ranks, win = buffer_rank[:len(painted)], buffer_win[:len(painted)]
            np.take(rank, painted, out=ranks)
            np.less(ranks, mine, out=win)
            np.logical_and(win, part, out=win)
            np.copyto(painted, index, where=win)
    if labels is None:
        labels = np.zeros(shape, dtype=dtype)
    return labels, counts


def label_voxel_counts(labels: np.ndarray, minlength: int = 0) -> np.ndarray:
    """``np.bincount`` of a label map, slab by slab (bincount of a whole fine CT would make an int64 copy, 1.7 GB)."""
    view = memory_order_view(labels)
    slab = slab_length(view)
    total = np.zeros(max(int(minlength), 1), dtype=np.int64)
    for start in range(0, view.shape[0], slab):
        part = np.bincount(view[start:start + slab].ravel(), minlength=len(total))
        if len(part) > len(total):
            part[:len(total)] += total
            total = part
        else:
            total += part
    return total


def label_map_from_masks(shape, masks: Mapping[int, np.ndarray], table: Mapping[int, Any]) -> np.ndarray:
    """Multi-label array (uint8, or uint16 for indices > 255) with the overlap rule of this module."""
    return paint_label_map(shape, masks, table)[0]
