"""Partially labelled training cases on disk: the exchange format between the Slicer module's
"Export for training", the library and the training package (``universalseg_training``).

A case is three files in one folder, named from a case id ``<id>`` (letters, digits, ``-``, ``_``):

* ``<id>_ct.nii.gz``: the CT in Hounsfield units (int16 when that is lossless, else float32), its own grid;
* ``<id>_labels.nii.gz``: a label map on exactly the CT's grid whose values are taxonomy class indices
  (uint8, uint16 for indices > 255). Overlaps are resolved lesion over vessel over organ (the rule of
  :mod:`.masks`), so a liver-tumour voxel holds 27; the reader re-derives "the liver includes its tumour"
  from ``ClassInfo.parent_organs`` (organ channels include their lesions, as in the official training);
* ``<id>.case.json``: which classes were annotated (checked by a person or a curated dataset). Every other
  class is UNKNOWN in this case, never background: the training loss ignores it.

.. code-block:: json

    {"format": "universalseg-case", "version": 1,
     "image": "<id>_ct.nii.gz", "labels": "<id>_labels.nii.gz",
     "taxonomy": [...ClassInfo.to_dict()...],      (omitted when it is the default 32-class taxonomy)
     "annotated": [6, 27], "review": {"6": "accepted", "27": "corrected"},
     "source": {"tool": "...", "model": "...", "input": "..."}, "created": "2026-11-28T20:00:00+00:00"}

A lesion whose class has several possible parent organs (a kidney tumour: right or left kidney) is
given, per connected component, to the parent organ nearest to it (in millimetres).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from ..taxonomy import Taxonomy, TaxonomyError, get_taxonomy
from .atomic import AtomicOutputGroup, prepare_output_path
from ..errors import InputNotFoundError, TrainingCaseError
from ..helpers import bounding_box
from .masks import label_map_from_masks, validate_masks
from .volume import Volume, spacing_from_affine
from .writers import nifti_image

__all__ = [
    "CASE_FORMAT",
    "CASE_VERSION",
    "TrainingCase",
    "TrainingCaseError",
    "case_paths",
    "read_training_case",
    "write_training_case",
]

CASE_FORMAT = "universalseg-case"
CASE_VERSION = 1
CASE_JSON_SUFFIX = ".case.json"
_CASE_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")
#: Two grids are "the same" when their affines agree to this many millimetres.
_GRID_TOLERANCE_MM = 1e-3


# ------------------------------------------------------------------------------------------------ the case
@dataclass
class TrainingCase:
    """One partially labelled case in memory.

    Attributes:
        case_id: the case id (file name stem).
        image: CT in HU, IJK order.
        affine: 4x4 IJK->RAS affine of ``image`` and ``labels``.
        labels: integer label map (taxonomy indices; lesions painted over their organs).
        annotated: classes whose labels are known in this case (sorted); all others are unknown.
        review: optional per-class review state (``{6: "accepted"}``).
        taxonomy: the classes the label values refer to.
        source: free-form provenance (tool, model, input).
        created: ISO-8601 creation time, when recorded.
        path: the ``.case.json`` the case was read from, if any.
    """

    case_id: str
    image: np.ndarray
    affine: np.ndarray
    labels: np.ndarray
    annotated: tuple[int, ...]
    review: dict[int, str] = field(default_factory=dict)
    taxonomy: Taxonomy = field(default_factory=get_taxonomy)
    source: dict = field(default_factory=dict)
    created: str | None = None
    path: Path | None = None
    _lesion_owner: dict[int, np.ndarray] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def volume(self) -> Volume:
        """The CT as a library :class:`Volume`."""
        return Volume(array=self.image, affine=self.affine, source=str(self.path or self.case_id), format="nifti")

    @property
    def spacing(self) -> tuple[float, float, float]:
        return spacing_from_affine(self.affine)

    def is_annotated(self, index: int) -> bool:
        return int(index) in self.annotated

    def class_mask(self, index: int) -> np.ndarray:
        """Bool mask of class ``index`` with "organ includes its lesions" applied.

        The result is meaningful only for annotated classes; for any other class it is whatever the
        label map happens to hold (use :meth:`is_annotated`).
        """
        index = int(index)
        if index not in self.taxonomy.indices:
            raise TrainingCaseError(f"case {self.case_id}: class index {index} is not in the case's taxonomy.")
        mask = self.labels == index
        extra = self._lesions_of_organs().get(index)
        if extra is not None:
            mask |= extra
        return mask

    def class_masks(self, indices: Iterable[int] | None = None) -> dict[int, np.ndarray]:
        """``{index: class_mask(index)}`` for ``indices`` (default: the annotated classes)."""
        return {int(i): self.class_mask(i) for i in (self.annotated if indices is None else indices)}

    def _lesions_of_organs(self) -> dict[int, np.ndarray]:
        """organ index -> bool mask of the lesion voxels that belong to that organ (computed once)."""
        if self._lesion_owner is None:
            self._lesion_owner = lesion_voxels_by_organ(self.labels, self.taxonomy, self.spacing)
        return self._lesion_owner


def lesion_voxels_by_organ(labels: np.ndarray, taxonomy: Taxonomy, spacing=(1.0, 1.0, 1.0)) -> dict[int, np.ndarray]:
    """For each organ, the voxels of lesions that lie in it (organ channels include their lesions).

    A lesion class with one parent organ gives all its voxels to that organ. With several possible parents
    (kidney tumour -> right or left kidney) each connected component goes to the parent organ whose voxels
    are nearest to it (physical distance, majority over the component's voxels); a component with none of
    its parent organs in the label map stays a lesion only.
    """
    present = set(np.unique(labels).tolist())
    owners: dict[int, np.ndarray] = {}

    def give(organ: int, voxels: np.ndarray) -> None:
        if organ in owners:
            owners[organ] |= voxels
        else:
            owners[organ] = voxels.copy()

    for info in taxonomy:
        if info.index not in present or not info.parent_organs:
            continue
        lesion = labels == info.index
        parents = [p for p in info.parent_organs if p in taxonomy.indices]
        if len(parents) == 1:
            give(parents[0], lesion)
            continue
        for organ, voxels in _split_lesion_by_nearest_organ(labels, lesion, parents, spacing).items():
            give(organ, voxels)
    return owners


def _split_lesion_by_nearest_organ(labels, lesion, parents, spacing) -> dict[int, np.ndarray]:
    import cc3d
    from scipy import ndimage

    parent_voxels = np.isin(labels, parents)
    if not parent_voxels.any():
        return {}
    # Work in the bounding box of lesion + parents: the distance transform is the costly step.
    box = bounding_box(lesion | parent_voxels)
    sub_labels, sub_lesion, sub_parents = labels[box], lesion[box], parent_voxels[box]
    _, nearest = ndimage.distance_transform_edt(~sub_parents, sampling=spacing, return_indices=True)
    nearest_label = sub_labels[tuple(nearest)]
    components = cc3d.connected_components(sub_lesion.astype(np.uint8), connectivity=26)
    result: dict[int, np.ndarray] = {}
    for component in range(1, int(components.max()) + 1):
        voxels = components == component
        votes = np.bincount(nearest_label[voxels].ravel(), minlength=max(parents) + 1)
        organ = int(max(parents, key=lambda p: votes[p]))
        full = np.zeros(labels.shape, dtype=bool)
        full[box] = voxels
        result[organ] = result[organ] | full if organ in result else full
    return result


# ---------------------------------------------------------------------------------------------- file names
def case_paths(folder, case_id: str) -> dict[str, Path]:
    """``{"json", "image", "labels"}`` paths of case ``case_id`` in ``folder``."""
    _check_case_id(case_id)
    folder = Path(folder).expanduser()
    return {
        "json": folder / f"{case_id}{CASE_JSON_SUFFIX}",
        "image": folder / f"{case_id}_ct.nii.gz",
        "labels": folder / f"{case_id}_labels.nii.gz",
    }


def _check_case_id(case_id: str) -> None:
    if not isinstance(case_id, str) or not _CASE_ID_PATTERN.match(case_id):
        raise TrainingCaseError(
            f"case id {case_id!r} is not allowed: use only letters, digits, '-' and '_' (it names the files)."
        )


# ------------------------------------------------------------------------------------------------- writing
def _ct_array_for_file(array: np.ndarray) -> np.ndarray:
    """int16 when every value is an integer in int16 range (lossless), else float32."""
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(np.int16)
        if array.size == 0 or (array.min() >= info.min and array.max() <= info.max):
            return array.astype(np.int16)
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array).all()
        if finite and array.size and np.all(array == np.round(array)) and array.min() >= -32768 and array.max() <= 32767:
            return array.astype(np.int16)
        return array.astype(np.float32)
    raise TrainingCaseError(f"the CT array has dtype {array.dtype}; expected integer or floating-point HU values.")


def _class_indices(values: Iterable[Any], taxonomy: Taxonomy, what: str) -> tuple[int, ...]:
    indices = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TrainingCaseError(f"{what} must list class indices (integers), got {value!r}.")
        if int(value) not in taxonomy.indices:
            raise TrainingCaseError(
                f"{what} lists class index {int(value)}, which is not in the taxonomy "
                f"(known indices: {', '.join(map(str, taxonomy.indices))})."
            )
        indices.append(int(value))
    return tuple(sorted(set(indices)))


def write_training_case(
    folder,
    case_id: str,
    volume: Volume,
    masks: Mapping[int, np.ndarray],
    annotated: Iterable[int],
    review: Mapping[int, str] | None = None,
    source: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    taxonomy: Taxonomy | None = None,
) -> Path:
    """Write a training case (CT, label map, ``.case.json``) into ``folder``; return the ``.case.json`` path.

    Args:
        folder: output folder (created if needed).
        case_id: letters, digits, ``-``, ``_``; names the three files.
        volume: the CT (HU) with its geometry; the label map gets the same grid.
        masks: ``{class index: bool array}`` on the volume's grid. Only annotated classes may have a mask
            (an unannotated class is unknown, so a mask for it would be a contradiction).
        annotated: every class whose labels are known; an annotated class without a mask (or with an
            empty one) means "checked, absent".
        review: optional per-class review state, e.g. ``{6: "accepted", 27: "corrected"}``.
        source: provenance (``{"tool": ..., "model": ..., "input": ...}``).
        overwrite: replace an existing case of the same id.
        taxonomy: the class table (default: the 32 official classes; any other table is stored in the file).

    All three files appear together or not at all; nothing is overwritten unless ``overwrite``.
    """
    taxonomy = taxonomy or get_taxonomy()
    paths = case_paths(folder, case_id)
    annotated_indices = _class_indices(annotated, taxonomy, "annotated")
    masks, table = validate_masks(volume, masks, taxonomy)
    unannotated = sorted(set(masks) - set(annotated_indices))
    if unannotated:
        names = ", ".join(f"{i} ({table[i].display_name})" for i in unannotated)
        raise TrainingCaseError(
            f"masks are given for classes that are not listed as annotated: {names}. Add them to 'annotated' "
            "if their labels were checked, or leave their masks out (unannotated classes are unknown)."
        )
    review_entries: dict[str, str] = {}
    for key, state in (review or {}).items():
        index = _class_indices([key], taxonomy, "review")[0]
        if not isinstance(state, str) or not state:
            raise TrainingCaseError(f"the review state of class {index} must be a non-empty string, got {state!r}.")
        review_entries[str(index)] = state
    for path in paths.values():  # fail before any work if a name is taken
        prepare_output_path(path, overwrite)

    labels = label_map_from_masks(volume.shape, masks, table)
    ct = _ct_array_for_file(np.asarray(volume.array))
    document: dict[str, Any] = {
        "format": CASE_FORMAT,
        "version": CASE_VERSION,
        "image": paths["image"].name,
        "labels": paths["labels"].name,
    }
    if taxonomy != get_taxonomy():
        document["taxonomy"] = [info.to_dict() for info in taxonomy]
    document.update({
        "annotated": list(annotated_indices),
        "review": review_entries,
        "source": dict(source or {}),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    import nibabel as nib

    with AtomicOutputGroup(overwrite) as group:
        ct_image = nifti_image(ct, volume.affine, is_label=False)
        ct_image.header.set_xyzt_units("mm")
        nib.save(ct_image, str(group.add(paths["image"])))
        nib.save(nifti_image(labels, volume.affine, is_label=True), str(group.add(paths["labels"])))
        with open(group.add(paths["json"]), "w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=1)
            handle.write("\n")
        group.commit()
    return paths["json"].absolute()


# ------------------------------------------------------------------------------------------------- reading
def _load_nifti(path: Path, what: str, case: Path):
    import nibabel as nib

    if not path.is_file():
        raise InputNotFoundError(f"training case {case}: its {what} file {path} does not exist.")
    try:
        image = nib.load(str(path))
        array = np.asanyarray(image.dataobj)
    except Exception as error:  # nibabel raises many types for damaged files
        raise TrainingCaseError(f"training case {case}: cannot read its {what} file {path} ({error}).") from None
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise TrainingCaseError(f"training case {case}: its {what} file {path} is not a 3-D volume (shape {array.shape}).")
    return array, np.asarray(image.affine, dtype=np.float64)


def _case_taxonomy(document: Mapping[str, Any], case: Path) -> Taxonomy:
    entries = document.get("taxonomy")
    if entries is None:
        return get_taxonomy()
    try:
        if isinstance(entries, Mapping):  # a full Taxonomy.to_dict() is accepted too
            return Taxonomy.from_dict(entries)
        return Taxonomy.from_dict({"classes": list(entries)})
    except (TaxonomyError, TypeError) as error:
        raise TrainingCaseError(f"training case {case}: its class table is invalid ({error}).") from None


def read_training_case(path) -> TrainingCase:
    """Read a case from its ``.case.json`` (or from the folder + id, ``folder/<id>.case.json``).

    Raises :class:`InputNotFoundError` for missing files and :class:`TrainingCaseError` for a wrong
    format, a label map on another grid than the CT, label values or annotated classes that are not in
    the case's taxonomy.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputNotFoundError(f"training case file {path} does not exist.")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TrainingCaseError(f"{path} is not a valid training case description (JSON error: {error}).") from None
    if not isinstance(document, dict) or document.get("format") != CASE_FORMAT:
        raise TrainingCaseError(f"{path} is not a UniversalSeg training case (its 'format' is not {CASE_FORMAT!r}).")
    version = document.get("version")
    if not isinstance(version, int) or version > CASE_VERSION:
        raise TrainingCaseError(
            f"{path}: training case format version {version!r} is not supported (this library reads up to "
            f"{CASE_VERSION}); please update UniversalSeg."
        )
    for key in ("image", "labels", "annotated"):
        if key not in document:
            raise TrainingCaseError(f"{path}: the case description lacks {key!r}.")
    case_id = path.name[: -len(CASE_JSON_SUFFIX)] if path.name.endswith(CASE_JSON_SUFFIX) else path.stem
    taxonomy = _case_taxonomy(document, path)
    try:
        annotated = _class_indices(document["annotated"], taxonomy, "'annotated'")
        review = {_class_indices([int(k)], taxonomy, "'review'")[0]: str(v) for k, v in (document.get("review") or {}).items()}
    except ValueError as error:
        raise TrainingCaseError(f"{path}: {error}") from None

    image, image_affine = _load_nifti(path.parent / document["image"], "image", path)
    labels, labels_affine = _load_nifti(path.parent / document["labels"], "label map", path)
    if labels.shape != image.shape or not np.allclose(labels_affine, image_affine, atol=_GRID_TOLERANCE_MM):
        raise TrainingCaseError(
            f"training case {path}: the label map ({labels.shape}) does not lie on the CT's voxel grid "
            f"({image.shape}); both files must have the same shape and affine."
        )
    if np.issubdtype(labels.dtype, np.floating):
        if not np.all(labels == np.round(labels)):
            raise TrainingCaseError(f"training case {path}: the label map holds non-integer values.")
    labels = np.asarray(labels).astype(np.int32 if labels.max(initial=0) > 32767 else np.int16, copy=False)
    values = set(np.unique(labels).tolist()) - {0}
    unknown = sorted(v for v in values if v not in taxonomy.indices)
    if unknown:
        raise TrainingCaseError(
            f"training case {path}: the label map holds values {unknown} that are not class indices of the "
            f"case's taxonomy ({', '.join(map(str, taxonomy.indices))})."
        )
    unannotated = sorted(v for v in values if v not in annotated)
    if unannotated:
        raise TrainingCaseError(
            f"training case {path}: the label map holds classes {unannotated} that are not listed as annotated."
        )
    return TrainingCase(
        case_id=case_id, image=image, affine=image_affine, labels=labels, annotated=annotated, review=review,
        taxonomy=taxonomy, source=dict(document.get("source") or {}), created=document.get("created"), path=path,
    )
