"""Per-class clean-up of thresholded masks, as the Universal Model does before writing results.

The input is one boolean mask per predicted class, all on the PREPROCESSED grid (RAS-oriented, 1.5 mm,
cropped to the body): array axis 0 increases towards the patient's right, axis 2 towards superior.
Each class has one rule, given as data in its class table (``postprocess`` of each class in
``data/taxonomy.json``: the rule, the classes it reads by key and, for lesions, how many organ components
to keep; :data:`CLASS_RULES` lists the official classes' rules by index). For the official classes:

=================================  ========================================================================
classes                            rule
=================================  ========================================================================
1-9, 11-14, 18-25                  keep the largest 26-connected component
10 portal/splenic vein             keep the raw vein, minus every slice below the pancreas (axis 2 < the
                                   lowest slice of the pancreas' largest component); no component filter
16 right lung, 17 left lung        union of both lung channels; the two largest components are the lungs;
                                   the one lying more to the patient's left (smaller mean axis-0 index) is
                                   the left lung, whichever channel predicted it (equal means: the
                                   larger one is the right lung)
26 kidney tumour, 27 liver tumour  raw tumour AND (closing then dilation, 5x5x5 cube, of the largest
                                   component(s) of the raw organ union: kidneys 2+3 keep two, liver 6 one)
15, 28-32, and any index > 32      unchanged
=================================  ========================================================================

Two modes:

``mode="official"`` reproduces the official ``organ_post_process`` (``utils/utils.py`` of the official
CLIP-Driven Universal Model code) exactly, quirks included (checked voxel for voxel against the official output in
the fidelity fixture). Its quirks:

* ties between equally large components go to the component met first in C-order raster scan (the
  official sorts component sizes with a stable sort of cc3d's labels; cc3d numbers components in scan
  order);
* the vein is cut below the pancreas only when class 11 is requested too, and only when 11 comes AFTER
  10 in the requested list (the plain copy made at class 10 would otherwise overwrite it);
* fewer than two lung components (touching lungs, or a single lung) -> BOTH lungs empty;
* the left lung (17) is written only by the rule of class 16, so requesting 17 without 16 gives an empty
  left lung;
* the closing before the tumour filter treats everything outside the array as background, so it erodes
  the organ mask within 2 voxels of the array border (``scipy.ndimage`` ``border_value=0``);
* an empty pancreas with the vein cut requested crashes the official code (``np.min`` of an empty
  array). Here official mode does not crash: it returns what fixed mode returns (the raw vein) and emits
  an :class:`OfficialBehaviourWarning`.

``mode="fixed"`` (default) applies the same rules with these bugs fixed; everywhere else it is identical
to official mode (and to the fixture):

1. A requested class never depends on which OTHER classes were requested: the vein is always cut below
   the pancreas (class 11 is read as an input, requested or not), and the left lung is written when
   only 17 is requested.
2. Empty pancreas: nothing to cut against, so the vein is kept as predicted (the scan may simply end
   above the pancreas while showing the portal vein).
3. Exactly one lung component (touching lungs, or a single lung): instead of dropping both lungs, each
   channel keeps the voxels only it voted for; voxels both voted for go to the side of the midpoint
   between the two groups' mean axis-0 positions where that channel's group lies; each lung then keeps
   its largest component. The parts are labelled by their votes, not by position: they are defined by
   the votes, and a thin misvoted rim on a single lung must not relabel the whole lung. When only one
   channel voted on its own (a single lung), the whole component is that lung (the channel with more
   votes in it; a tie goes by which half of the array it lies in). Two or more components still follow
   the official rule (so touching lungs plus a stray blob elsewhere are not split; no size heuristics).
4. The closing before the tumour filter treats outside-the-array as organ during the erosion
   (``border_value=1``), so it never removes organ voxels at the array border (closing becomes
   extensive as intended). Dilation still treats outside as background.

Deliberately NOT changed: tumour classes 28-32 stay unfiltered and kidney/liver tumours are filtered by
the raw organ union (not the post-processed organ), as in the official code; tumours commonly sit at the
organ boundary or displace it, and the official authors disabled those filters.

The rules read some classes that may not have been requested (the raw kidneys for kidney tumour, the
raw liver for liver tumour, the other lung, the pancreas for the vein); :func:`required_classes` lists
them so that the inference step can compute those channels too.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import Iterable, Literal, Mapping

import cc3d
import numpy as np
from scipy import ndimage
from .errors import MissingInputError, PostprocessError
from .helpers import bounding_box
from .taxonomy import ClassInfo, Taxonomy, get_taxonomy

__all__ = [
    "CLASS_RULES",
    "ClassRule",
    "MissingInputError",
    "OfficialBehaviourWarning",
    "PostprocessError",
    "Rule",
    "keep_largest_components",
    "postprocess_masks",
    "required_classes",
]

logger = logging.getLogger(__name__)

Mode = Literal["fixed", "official"]
_MODES = ("fixed", "official")

# Cube edge of the closing and of the dilation in the tumour filter (official: 5x5x5 structure).
_TUMOUR_FILTER_CUBE = 5
_TUMOUR_FILTER_RADIUS = _TUMOUR_FILTER_CUBE // 2


class OfficialBehaviourWarning(UserWarning):
    """Official mode met a case where the official code crashes; the fixed behaviour was used."""


class Rule(str, Enum):
    """What post-processing does to a class."""

    KEEP = "keep unchanged"
    LARGEST_COMPONENT = "largest 26-connected component"
    VEIN_ABOVE_PANCREAS = "raw vein without the slices below the pancreas"
    LUNG_PAIR = "two largest components of both lungs, labelled left/right by position"
    INSIDE_ORGAN = "raw lesion inside the closed and dilated organ mask"


@dataclass(frozen=True)
class ClassRule:
    """One row of the rule table.

    Attributes:
        rule: what is done.
        reads: other classes whose RAW predictions the rule reads (organs for a lesion, the pancreas for
            the vein, both lungs for the lung pair).
        organ_components: for ``INSIDE_ORGAN``, how many largest components of the organ union to keep
            (two kidneys, one liver).
        what: a few words for messages.
    """

    rule: Rule
    reads: tuple[int, ...] = ()
    organ_components: int = 1
    what: str = ""


_KEEP = ClassRule(Rule.KEEP)


def _rule_from(info: ClassInfo, taxonomy: Taxonomy) -> ClassRule:
    """The :class:`ClassRule` of a class whose post-processing is given in its class table."""
    spec = info.postprocess
    official = get_taxonomy()

    def index_of(key: str) -> int:
        try:
            return taxonomy.by_key(key).index
        except KeyError:  # a class the checkpoint lacks: its prediction will be missing (MissingInputError)
            return official.by_key(key).index

    return ClassRule(Rule[spec.rule.upper()], tuple(index_of(key) for key in spec.reads), spec.components,
                     info.display_name)


#: The rule of every class of the official class table (from ``data/taxonomy.json``), by index.
CLASS_RULES: Mapping[int, ClassRule] = MappingProxyType(
    {info.index: _rule_from(info, get_taxonomy()) for info in get_taxonomy() if info.postprocess is not None})


def _rule_of(index: int, taxonomy: Taxonomy | None = None) -> ClassRule:
    """The rule of class ``index``: the one in ``taxonomy`` (a checkpoint's class table) when it gives one;
    for a class table written before rules were data, the official class of the same index and key; else
    the mask is kept."""
    if taxonomy is not None and index in taxonomy.indices:
        info = taxonomy[index]
        if info.postprocess is not None:
            return _rule_from(info, taxonomy)
        official = get_taxonomy()
        if index in official.indices and official[index].key == info.key:
            return CLASS_RULES.get(index, _KEEP)
        return _KEEP
    return CLASS_RULES.get(index, _KEEP)


def _inputs_read(index: int, requested: Iterable[int], mode: str, taxonomy: Taxonomy | None = None) -> tuple[int, ...]:
    """Raw predictions the rule of ``index`` reads, given what else was requested."""
    rule = _rule_of(index, taxonomy)
    if mode == "official":
        requested = set(requested)
        if rule.rule is Rule.VEIN_ABOVE_PANCREAS:
            return ()  # the official code reads the pancreas only when it is requested itself
        if rule.rule is Rule.LUNG_PAIR:
            right, left = rule.reads
            if index == left and right not in requested:
                return ()  # official: the left lung without the right one is never computed
    return rule.reads


def required_classes(classes: Iterable[int], mode: Mode = "fixed", taxonomy: Taxonomy | None = None) -> list[int]:
    """Every class whose raw prediction :func:`postprocess_masks` needs to post-process ``classes``.

    That is ``classes`` plus the classes their rules read (e.g. 26 kidney tumour -> 2 and 3). Sorted.
    ``taxonomy``: the class table the rules come from (default: the official one).
    """
    _check_mode(mode)
    requested = _check_class_list(classes)
    needed = set(requested)
    for index in requested:
        needed.update(_inputs_read(index, requested, mode, taxonomy))
    return sorted(needed)


def keep_largest_components(mask: np.ndarray, k: int = 1) -> np.ndarray:
    """The ``k`` largest 26-connected components of a boolean 3-D mask (a new C-ordered bool array).

    Ties in size are broken as the official code does: the component met first in a C-order raster
    scan wins. The work is done on the mask's bounding box (connected components do not change).
    """
    mask = _as_c_bool(mask)
    out = np.zeros(mask.shape, dtype=bool)
    box = bounding_box(mask)
    if box is None or k < 1:
        return out
    out[box] = _largest_in_box(mask[box], k)
    return out


# --------------------------------------------------------------------------------------------------


def postprocess_masks(
    masks: Mapping[int, np.ndarray],
    classes: Iterable[int] | None = None,
    mode: Mode = "fixed",
    taxonomy: Taxonomy | None = None,
) -> dict[int, np.ndarray]:
    """Post-process thresholded per-class masks with the Universal Model's per-class rules.

    Args:
        masks: ``{class index (1-based): mask}`` on the preprocessed grid; all masks 3-D with one shape,
            boolean (integer or float masks must contain only 0 and 1). Besides the requested classes it
            must hold the classes their rules read (see :func:`required_classes`).
        classes: the classes to post-process and return, in order. Default: every key of ``masks``,
            ascending. The order matters only in official mode (vein/pancreas quirk).
        mode: ``"fixed"`` (default) or ``"official"``; see the module documentation.
        taxonomy: the class table whose rules apply (a checkpoint's; default: the official one).

    Returns:
        ``{class index: bool mask}`` for exactly the requested classes (new arrays, C-ordered).

    Raises:
        PostprocessError: bad masks, shapes, class indices or mode.
        MissingInputError: a rule needs a class prediction that is not in ``masks``.
    """
    _check_mode(mode)
    if not isinstance(masks, Mapping) or not masks:
        raise PostprocessError("post-processing needs a non-empty mapping {class index: mask}")
    raw = _check_masks(masks)
    requested = sorted(raw) if classes is None else _check_class_list(classes)

    missing = [index for index in requested if index not in raw]
    if missing:
        raise MissingInputError(f"no prediction was passed for the requested class(es) {missing}")
    for index in requested:
        absent = [need for need in _inputs_read(index, requested, mode, taxonomy) if need not in raw]
        if absent:
            rule = _rule_of(index, taxonomy)
            raise MissingInputError(
                f"post-processing class {index} ({rule.what}) reads the raw prediction of class(es) "
                f"{absent}; pass them in `masks` (they need not be requested; see required_classes())"
            )

    return _Postprocessor(raw, requested, mode, taxonomy).run()


class _Postprocessor:
    """One post-processing run; caches results shared by two classes (lung pair, pancreas)."""

    def __init__(self, raw: dict[int, np.ndarray], requested: list[int], mode: str,
                 taxonomy: Taxonomy | None = None) -> None:
        self.raw = raw
        self.requested = requested
        self.mode = mode
        self.rules = {index: _rule_of(index, taxonomy) for index in requested}
        self.shape = next(iter(raw.values())).shape
        self._lungs: dict[int, np.ndarray] | None = None
        self._largest: dict[int, np.ndarray] = {}

    def run(self) -> dict[int, np.ndarray]:
        handlers = {
            Rule.KEEP: self._keep,
            Rule.LARGEST_COMPONENT: self._largest_component,
            Rule.VEIN_ABOVE_PANCREAS: self._vein_above_pancreas,
            Rule.LUNG_PAIR: self._lung,
            Rule.INSIDE_ORGAN: self._inside_organ,
        }
        return {index: handlers[self.rules[index].rule](index) for index in self.requested}

    # -- rules ---------------------------------------------------------------------------------------

    def _keep(self, index: int) -> np.ndarray:
        return self.raw[index].copy()

    def _largest_component(self, index: int) -> np.ndarray:
        if index not in self._largest:
            self._largest[index] = keep_largest_components(self.raw[index], 1)
        return self._largest[index].copy()

    def _vein_above_pancreas(self, index: int) -> np.ndarray:
        vein = self.raw[index].copy()
        (pancreas_index,) = self.rules[index].reads
        if self.mode == "official":
            # Official: the cut is made while processing the pancreas, and the plain copy made at the vein
            # overwrites it if the vein comes later in the list; without the pancreas the vein stays raw.
            order = self.requested
            if pancreas_index not in order or order.index(pancreas_index) < order.index(index):
                return vein
        if pancreas_index not in self._largest:
            self._largest[pancreas_index] = keep_largest_components(self.raw[pancreas_index], 1)
        pancreas = self._largest[pancreas_index]
        slices_with_pancreas = np.flatnonzero(pancreas.any(axis=(0, 1)))
        if slices_with_pancreas.size == 0:
            if self.mode == "official":
                warnings.warn(
                    "the pancreas prediction is empty, so the official code would crash here (np.min of "
                    "an empty array); the portal/splenic vein is returned uncut, as in fixed mode",
                    OfficialBehaviourWarning,
                    stacklevel=4,
                )
            else:
                logger.info("pancreas prediction empty: portal/splenic vein kept as predicted")
            return vein
        vein[:, :, : slices_with_pancreas[0]] = False
        return vein

    def _lung(self, index: int) -> np.ndarray:
        right, left = self.rules[index].reads
        if self.mode == "official" and index == left and right not in self.requested:
            return np.zeros(self.shape, dtype=bool)  # official: only the right lung's rule writes the left
        if self._lungs is None:
            self._lungs = self._lung_pair(right, left)
        return self._lungs[index].copy()

    def _inside_organ(self, index: int) -> np.ndarray:
        rule = self.rules[index]
        organ = np.zeros(self.shape, dtype=bool)
        for organ_index in rule.reads:
            organ |= self.raw[organ_index]
        organ = keep_largest_components(organ, rule.organ_components)
        region = _closed_and_dilated(organ, border_is_organ=self.mode == "fixed")
        return self.raw[index] & region

    # -- lungs ---------------------------------------------------------------------------------------

    def _lung_pair(self, right_lung: int, left_lung: int) -> dict[int, np.ndarray]:
        """Both lungs from the raw right and left lung channels."""
        right_votes, left_votes = self.raw[right_lung], self.raw[left_lung]
        union = right_votes | left_votes
        empty = {right_lung: np.zeros(self.shape, dtype=bool), left_lung: np.zeros(self.shape, dtype=bool)}
        box = bounding_box(union)
        if box is None:
            return empty
        labels, count = cc3d.connected_components(union[box], connectivity=26, return_N=True)
        if count >= 2:
            first, second = _labels_by_size(labels, count)[:2]
            left, right = _order_left_right([labels == first, labels == second], offset=box[0].start)
            empty[left_lung][box] = left
            empty[right_lung][box] = right
        elif self.mode == "official":
            pass  # official: the IndexError is caught and both lungs are dropped
        else:
            split = _split_by_votes(union[box], right_votes[box], left_votes[box])
            if split is None:  # only one channel voted on its own: a single lung
                is_right = self._single_lung_is_right(union[box], right_votes[box], left_votes[box], box)
                empty[right_lung if is_right else left_lung][box] = union[box]
            else:
                empty[right_lung][box], empty[left_lung][box] = split
        return empty

    def _single_lung_is_right(
        self, lung: np.ndarray, right_votes: np.ndarray, left_votes: np.ndarray, box: tuple[slice, ...]
    ) -> bool:
        """Fixed mode, one lung only: the channel with more votes in it; a tie by array half."""
        right, left = np.count_nonzero(lung & right_votes), np.count_nonzero(lung & left_votes)
        if right != left:
            return right > left
        mean_axis0 = np.nonzero(lung)[0].mean() + box[0].start
        return not mean_axis0 < (self.shape[0] - 1) / 2


# -- helpers -----------------------------------------------------------------------------------------


def _split_by_votes(
    component: np.ndarray, right_votes: np.ndarray, left_votes: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """Fixed mode: split one lung component into (right, left) by the channels' votes (module doc).

    None when one of the channels has no voxel of its own (a single lung).
    """
    right_only = component & right_votes & ~left_votes
    left_only = component & left_votes & ~right_votes
    both = component & right_votes & left_votes
    if not right_only.any() or not left_only.any():
        return None
    mean_right = np.nonzero(right_only)[0].mean()
    mean_left = np.nonzero(left_only)[0].mean()
    boundary = (mean_right + mean_left) / 2
    axis0 = np.arange(component.shape[0])[:, None, None]
    right_side_is_low = mean_right < mean_left
    low = axis0 < boundary
    near_right = low if right_side_is_low else ~low
    right_part = right_only | (both & near_right)
    left_part = left_only | (both & ~near_right)
    return _largest_in_box(right_part, 1), _largest_in_box(left_part, 1)


def _order_left_right(pieces: list[np.ndarray], offset: int) -> tuple[np.ndarray, np.ndarray]:
    """(left, right) of two lung pieces: the left lung has the smaller mean axis-0 index (RAS).

    Same comparison as the official code (float64 means of the full-array indices, strict ``<``, a tie
    makes the FIRST piece the right lung). The index sums are exact integers, shifted by the crop
    offset, so the float means equal the official ones bit for bit.
    """
    means = []
    for piece in pieces:
        axis0 = np.nonzero(piece)[0]
        total = int(axis0.sum(dtype=np.int64)) + offset * axis0.size
        means.append(np.float64(total) / np.float64(axis0.size))
    first, second = pieces
    return (first, second) if means[0] < means[1] else (second, first)


def _closed_and_dilated(organ: np.ndarray, border_is_organ: bool) -> np.ndarray:
    """Binary closing then dilation with a 5x5x5 cube (the official tumour-filter region).

    Equals ``ndimage.binary_dilation(ndimage.binary_closing(organ, cube), cube)`` (scipy's default
    border: outside the array is background) when ``border_is_organ`` is False; when True the erosion
    step of the closing treats outside the array as organ, so the closing never removes organ voxels.

    Computed with separable max/min filters on the organ's bounding box grown by 4 voxels (clamped to
    the array): the closing lies within 2 voxels of the organ and the final dilation adds 2 more. A
    voxel whose erosion window leaves the box on an inner side has no organ within 2 voxels, so it is
    background whatever the filter assumes beyond the box.
    """
    out = np.zeros(organ.shape, dtype=bool)
    box = bounding_box(organ, margin=2 * _TUMOUR_FILTER_RADIUS)
    if box is None:
        return out
    cube, radius = _TUMOUR_FILTER_CUBE, _TUMOUR_FILTER_RADIUS
    dilated = ndimage.maximum_filter(organ[box].astype(np.uint8), size=cube, mode="constant", cval=0)
    if border_is_organ:
        # Pad explicitly: 1 beyond the faces that are the array border, 0 beyond inner faces.
        padded = np.pad(dilated, radius, mode="constant", constant_values=0)
        for axis, (sl, size) in enumerate(zip(box, organ.shape)):
            index = [slice(None)] * organ.ndim
            if sl.start == 0:
                index[axis] = slice(0, radius)
                padded[tuple(index)] = 1
            if sl.stop == size:
                index[axis] = slice(-radius, None)
                padded[tuple(index)] = 1
        closed = ndimage.minimum_filter(padded, size=cube, mode="constant", cval=0)
        closed = closed[tuple(slice(radius, -radius) for _ in range(organ.ndim))]
    else:
        closed = ndimage.minimum_filter(dilated, size=cube, mode="constant", cval=0)
    out[box] = ndimage.maximum_filter(closed, size=cube, mode="constant", cval=0) > 0
    return out


def _labels_by_size(labels: np.ndarray, count: int) -> np.ndarray:
    """Component labels, largest first; equal sizes keep label (raster-scan) order, as the official's
    stable sort does."""
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    return np.argsort(-sizes, kind="stable") + 1


def _largest_in_box(mask: np.ndarray, k: int) -> np.ndarray:
    labels, count = cc3d.connected_components(mask, connectivity=26, return_N=True)
    if count <= k:
        return labels > 0
    keep = _labels_by_size(labels, count)[:k]
    return labels == keep[0] if k == 1 else np.isin(labels, keep)


def _as_c_bool(mask: np.ndarray) -> np.ndarray:
    # C order matters: cc3d numbers components in scan order, which decides ties (official: C order).
    return np.ascontiguousarray(mask, dtype=bool)


def _check_mode(mode: str) -> None:
    if mode not in _MODES:
        raise PostprocessError(f"unknown post-processing mode {mode!r}; use one of {_MODES}")


def _check_class_list(classes: Iterable[int]) -> list[int]:
    if isinstance(classes, (str, bytes)):
        raise PostprocessError(f"classes must be class indices (integers), got {classes!r}")
    ordered: list[int] = []
    for index in classes:
        ordered.append(_check_index(index))
    return list(dict.fromkeys(ordered))  # drop repeats, keep first occurrence


def _check_index(index: object) -> int:
    if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)) or int(index) < 1:
        raise PostprocessError(f"class indices are 1-based integers, got {index!r}")
    return int(index)


def _check_masks(masks: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
    checked: dict[int, np.ndarray] = {}
    shape = None
    for key, mask in masks.items():
        index = _check_index(key)
        array = np.asarray(mask)
        if array.ndim != 3:
            raise PostprocessError(f"mask of class {index} must be 3-D, got shape {array.shape}")
        if shape is None:
            shape = array.shape
        elif array.shape != shape:
            raise PostprocessError(
                f"all masks must share one grid: class {index} has shape {array.shape}, others {shape}"
            )
        if array.dtype != bool:
            if array.dtype.kind not in "biuf":
                raise PostprocessError(f"mask of class {index} has unsupported dtype {array.dtype}")
            if np.any((array != 0) & (array != 1)):
                raise PostprocessError(
                    f"mask of class {index} holds values other than 0 and 1; post-processing expects "
                    "thresholded masks (apply the threshold to the probabilities first)"
                )
        checked[index] = _as_c_bool(array)
    return checked
