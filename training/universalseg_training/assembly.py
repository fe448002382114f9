"""Harmonise one dataset's label map to the UniversalSeg taxonomy.

The result of a case is a :class:`HarmonisedCase`: the CT, a taxonomy label map (one class per voxel:
lesions over vessels over organs), a *host* map that says, for every lesion voxel, which organ it belongs
to (organ channels include their lesions), and the set of annotated classes. Every class mask is a
per-voxel function of these two maps, so they can be resampled with nearest-neighbour interpolation and
the masks derived afterwards, exactly (see :func:`class_masks_from_maps`).

Left/right splitting: a raw label that covers both sides of a paired organ ("kidney") is split by the
position of each connected component in PATIENT coordinates: its RAS x compared with the body's midline
(the centre of the body's voxels in the component's slab). A single component (one kidney) is therefore
labelled correctly, unlike the official ``rl_split`` that always calls it "right"; a component
that straddles the midline (a horseshoe kidney) is cut at the midline.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from UniversalSegLib.io import read_volume
from UniversalSegLib.io.training_case import lesion_voxels_by_organ, read_training_case
from UniversalSegLib.io.volume import affine_from_lps_geometry, spacing_from_affine
from UniversalSegLib.taxonomy import Taxonomy

from .spec import CaseFiles, DatasetSpec

__all__ = [
    "AssemblyError",
    "HarmonisedCase",
    "class_masks_from_maps",
    "harmonise_labels",
    "load_case",
    "read_label_map",
    "split_left_right",
]

#: Voxels above this HU count as "body" for the midline (air is -1000, fat about -100).
BODY_THRESHOLD_HU = -500.0
#: A component with at least this fraction of its voxels on one side of the midline goes wholly to that side.
WHOLE_SIDE_FRACTION = 0.8


class AssemblyError(ValueError):
    """A case cannot be harmonised (unknown label values, label map on another grid...)."""


@dataclass
class HarmonisedCase:
    """One case in taxonomy terms (see module docstring)."""

    case_id: str
    dataset: str
    image: np.ndarray
    affine: np.ndarray
    labels: np.ndarray
    host: np.ndarray
    annotated: tuple[int, ...]
    includes: dict[int, tuple[int, ...]] = field(default_factory=dict)

    def class_mask(self, index: int) -> np.ndarray:
        return class_masks_from_maps(self.labels, self.host, [index], self.includes)[index]

    def class_masks(self, indices: Sequence[int] | None = None) -> dict[int, np.ndarray]:
        return class_masks_from_maps(self.labels, self.host, self.annotated if indices is None else indices, self.includes)


def class_masks_from_maps(labels, host, indices: Sequence[int], includes: Mapping[int, Sequence[int]] | None = None) -> dict:
    """``{index: mask}`` where mask = the class's own voxels + the lesion voxels it hosts + included classes.

    Works on numpy arrays and torch tensors alike (a per-voxel function: commutes with nearest resampling
    and cropping).
    """
    includes = includes or {}
    masks = {}
    for index in indices:
        index = int(index)
        mask = (labels == index) | (host == index)
        for member in includes.get(index, ()):
            mask = mask | (labels == int(member))
        masks[index] = mask
    return masks


# ------------------------------------------------------------------------------------------- file input
def read_label_map(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(integer array in IJK order, IJK->RAS affine) of a NIfTI, NRRD or MetaImage label map."""
    path = Path(path)
    if not path.is_file():
        raise AssemblyError(f"label map {path} does not exist.")
    name = path.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            image = nib.load(str(path))
            array, affine = np.asanyarray(image.dataobj), np.asarray(image.affine, dtype=np.float64)
        else:
            import SimpleITK as sitk

            image = sitk.ReadImage(str(path))
            array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # SimpleITK is KJI
            affine = affine_from_lps_geometry(image.GetOrigin(), image.GetSpacing(), image.GetDirection())
    except AssemblyError:
        raise
    except Exception as error:  # nibabel/SimpleITK raise many types for damaged files
        raise AssemblyError(f"cannot read label map {path}: {error}") from None
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise AssemblyError(f"label map {path} is not a 3-D volume (shape {array.shape}).")
    if np.issubdtype(array.dtype, np.floating):
        rounded = np.round(array)
        if not np.allclose(array, rounded, atol=1e-3):
            raise AssemblyError(f"label map {path} holds non-integer values; is it a probability map?")
        array = rounded
    return array.astype(np.int32), affine


# ------------------------------------------------------------------------------------ left/right split
def _ras_coordinates(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def _body_points(image: np.ndarray | None, affine: np.ndarray, threshold: float) -> np.ndarray | None:
    """RAS coordinates of (a subsample of) the body voxels, or None without an image."""
    if image is None:
        return None
    stride = max(1, int(round((image.size / 2e6) ** (1 / 3))))  # keep ~2 million voxels at most
    sub = image[::stride, ::stride, ::stride]
    ijk = np.argwhere(sub > threshold).astype(np.float64) * stride
    if len(ijk) == 0:
        return None
    return _ras_coordinates(affine, ijk)


def split_left_right(mask: np.ndarray, affine: np.ndarray, image: np.ndarray | None = None,
                     body_threshold: float = BODY_THRESHOLD_HU) -> tuple[np.ndarray, np.ndarray]:
    """Split a paired organ's mask into (right, left) by the patient side of each connected component.

    The midline is the mean RAS x of the body voxels (image > ``body_threshold``) in the RAS-z slab of the
    component; without an image, the centre of the voxel grid is used.
    """
    import cc3d

    right = np.zeros(mask.shape, dtype=bool)
    left = np.zeros(mask.shape, dtype=bool)
    if not mask.any():
        return right, left
    body = _body_points(image, affine, body_threshold)
    grid_centre_x = float(_ras_coordinates(affine, (np.asarray(mask.shape, float)[None] - 1) / 2)[0, 0])
    components = cc3d.connected_components(mask.astype(np.uint8), connectivity=26)
    for component in range(1, int(components.max()) + 1):
        ijk = np.argwhere(components == component)
        ras = _ras_coordinates(affine, ijk.astype(np.float64))
        midline = grid_centre_x
        if body is not None:
            low, high = ras[:, 2].min(), ras[:, 2].max()
            slab = body[(body[:, 2] >= low - 1.0) & (body[:, 2] <= high + 1.0)]
            if len(slab) > 0:
                midline = float(slab[:, 0].mean())
        on_right = ras[:, 0] > midline  # RAS: x grows towards the patient's right
        fraction = float(on_right.mean())
        target_index = tuple(ijk.T)
        if fraction >= WHOLE_SIDE_FRACTION:
            right[target_index] = True
        elif fraction <= 1.0 - WHOLE_SIDE_FRACTION:
            left[target_index] = True
        else:  # straddles the midline: cut there
            right[tuple(ijk[on_right].T)] = True
            left[tuple(ijk[~on_right].T)] = True
    return right, left


# ------------------------------------------------------------------------------------------ harmonising
def harmonise_labels(raw: np.ndarray, affine: np.ndarray, spec: DatasetSpec, image: np.ndarray | None = None,
                     where: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Map a dataset's raw label map to (taxonomy label map, lesion host map), following ``spec``."""
    taxonomy = spec.taxonomy
    values = [int(v) for v in np.unique(raw) if v != 0]
    unknown = [v for v in values if v not in spec.targets]
    if unknown and spec.unlisted == "error":
        raise AssemblyError(
            f"{where or spec.name}: label values {unknown} are not listed in 'classes' of the dataset specification "
            f"{spec.source} (listed: {sorted(spec.targets)}). Map each to a class (e.g. '{unknown[0]}: liver'), set "
            f"it to null to drop it, or set 'unlisted: drop' to treat every unlisted value as background."
        )
    dtype = np.uint8 if max(taxonomy.indices) <= 255 else np.uint16
    labels = np.zeros(raw.shape, dtype=dtype)
    # Paint organs, then vessels, then lesions, so the label map follows the library's overlap rule even
    # when a dataset's raw values overlap after merging (they cannot overlap in a raw label map itself).
    priority = {"organ": 0, "vessel": 1, "tumor": 2, "cyst": 2}
    order = sorted((v for v in values if v in spec.targets and not spec.targets[v].dropped),
                   key=lambda v: max(priority[taxonomy[i].kind] for i in spec.targets[v].classes))
    for value in order:
        target = spec.targets[value]
        voxels = raw == value
        if target.split:
            right, left = split_left_right(voxels, affine, image)
            labels[right] = target.classes[0]
            labels[left] = target.classes[1]
        else:
            labels[voxels] = target.classes[0]
    host = lesion_host_map(labels, taxonomy, affine) if spec.lesions_in_organs else np.zeros_like(labels)
    return labels, host


def lesion_host_map(labels: np.ndarray, taxonomy: Taxonomy, affine: np.ndarray) -> np.ndarray:
    """For each lesion voxel, the organ that includes it (0 elsewhere); see ``lesion_voxels_by_organ``."""
    host = np.zeros_like(labels)
    for organ, voxels in lesion_voxels_by_organ(labels, taxonomy, spacing_from_affine(affine)).items():
        host[voxels] = organ
    return host


def load_case(spec: DatasetSpec, case: CaseFiles) -> HarmonisedCase:
    """Read one case of ``spec`` from disk and harmonise it."""
    if case.case_json is not None:
        training_case = read_training_case(case.case_json)
        labels = training_case.labels.astype(np.uint8 if max(training_case.taxonomy.indices) <= 255 else np.uint16)
        host = lesion_host_map(labels, training_case.taxonomy, training_case.affine)
        return HarmonisedCase(case.case_id, spec.name, np.asarray(training_case.image), training_case.affine, labels,
                              host, training_case.annotated)
    volume = read_volume(case.image)
    raw, raw_affine = read_label_map(case.labels)
    if raw.shape != volume.shape or not np.allclose(raw_affine, volume.affine, atol=1e-3):
        raise AssemblyError(
            f"{case.labels}: the label map ({raw.shape}) does not lie on the grid of its image {case.image} "
            f"({volume.shape}); resample it onto the image first."
        )
    labels, host = harmonise_labels(raw, volume.affine, spec, np.asarray(volume.array), where=str(case.labels))
    return HarmonisedCase(case.case_id, spec.name, np.asarray(volume.array), volume.affine, labels, host,
                          spec.annotated_for(case.case_id), dict(spec.includes))
