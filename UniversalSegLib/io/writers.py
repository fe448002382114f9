"""NIfTI outputs: a multi-label map with its label table, and one binary mask per class.

All outputs lie on the input volume's voxel grid with its IJK->RAS affine (stored as both sform and
qform, code 1 "scanner", so every NIfTI reader agrees on it). Writes are atomic and never overwrite
an existing file unless ``overwrite=True`` (see :mod:`.atomic`).

The label map comes with two sidecar files named after it (``<name>.nii.gz`` ->):

* ``<name>.labels.csv``: a 3D Slicer colour table (Slicer's CSV colour-table format with terminology
  columns); load it in Slicer as a colour table and pick it for the label map, and the labels get
  their names, colours and standard terminology;
* ``<name>.labels.json``: the same plus class keys, kinds, the full terminology string, voxel counts,
  volumes in ml and the overlap rule.

The overlap rule of the label map is documented in :mod:`.masks`.

The seg.nrrd and DICOM SEG writers live in :mod:`.seg_nrrd` and :mod:`.dicom_seg`; they are re-exported
here so that all writers can be imported from one place.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .atomic import AtomicOutputGroup, ensure_writable_folder, prepare_output_path
from .dicom_seg import write_dicom_seg
from ..errors import UnsupportedFormatError
from ..helpers import voxel_volume_ml
from .masks import OVERLAP_RULE, label_voxel_counts, paint_label_map, validate_masks
from .seg_nrrd import write_seg_nrrd
from .volume import Volume

__all__ = ["write_label_map", "write_class_masks", "write_seg_nrrd", "write_dicom_seg", "nifti_image", "sidecar_paths"]

#: NIfTI code for "scanner-based anatomical coordinates".
NIFTI_XFORM_SCANNER_ANAT = 1

#: Columns of Slicer's colour-table CSV (Docs/developer_guide/modules/colors.md, Slicer >= 5.10).
SLICER_COLOR_TABLE_COLUMNS = [
    "LabelValue", "Name", "Color_R", "Color_G", "Color_B", "Color_A",
    "Category_CodingScheme", "Category_CodeValue", "Category_CodeMeaning",
    "Type_CodingScheme", "Type_CodeValue", "Type_CodeMeaning",
    "TypeModifier_CodingScheme", "TypeModifier_CodeValue", "TypeModifier_CodeMeaning",
    "Region_CodingScheme", "Region_CodeValue", "Region_CodeMeaning",
    "RegionModifier_CodingScheme", "RegionModifier_CodeValue", "RegionModifier_CodeMeaning",
]


def _nifti_stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    raise UnsupportedFormatError(f"{path}: a NIfTI output name must end with .nii.gz or .nii.")


def sidecar_paths(label_map_path) -> tuple[Path, Path]:
    """(``<name>.labels.json``, ``<name>.labels.csv``) next to a label map ``<name>.nii[.gz]``."""
    path = Path(label_map_path)
    stem = _nifti_stem(path)
    return path.with_name(stem + ".labels.json"), path.with_name(stem + ".labels.csv")


def nifti_image(data: np.ndarray, affine: np.ndarray, is_label: bool = True):
    """NIfTI-1 image with ``affine`` as sform and qform (code scanner), units mm, label intent."""
    import nibabel as nib
    from nibabel.spatialimages import HeaderDataError

    affine = np.asarray(affine, dtype=np.float64)
    image = nib.Nifti1Image(data, affine)
    header = image.header
    header.set_sform(affine, code=NIFTI_XFORM_SCANNER_ANAT)
    try:
        header.set_qform(affine, code=NIFTI_XFORM_SCANNER_ANAT, strip_shears=False)
    except HeaderDataError:
        # A sheared grid (gantry tilt) has no quaternion form: keep the exact sform only.
        header.set_qform(affine, code=0)
    header.set_xyzt_units("mm")
    if is_label:
        header.set_intent("label")
    return image


def _terms(info) -> list[Any]:
    terminology = info.terminology
    return [terminology.category, terminology.type, terminology.type_modifier, terminology.region, terminology.region_modifier]


def _color_table_rows(masks: Mapping[int, np.ndarray], table: Mapping[int, Any]) -> list[list[Any]]:
    rows: list[list[Any]] = [[0, "Background", 0, 0, 0, 0] + [""] * 15]
    for index in masks:
        info = table[index]
        row: list[Any] = [index, info.display_name, *(int(c) for c in info.color), 255]
        for term in _terms(info):
            row += [term.scheme, term.value, term.meaning] if term is not None else ["", "", ""]
        rows.append(row)
    return rows


def _label_table(path: Path, volume: Volume, counts: Mapping[int, int], table, labels: np.ndarray) -> dict:
    voxel_ml = voxel_volume_ml(volume.affine)
    visible = label_voxel_counts(labels, minlength=max(counts, default=0) + 1)
    entries = []
    for index, count in counts.items():
        info = table[index]
        entries.append({
            "value": index,
            "key": info.key,
            "name": info.display_name,
            "kind": info.kind,
            "color": [int(c) for c in info.color],
            "terminology": info.terminology.to_slicer_string(),
            "voxel_count": count,
            "voxel_count_in_label_map": int(visible[index]),
            "volume_ml": round(count * voxel_ml, 3),
        })
    return {
        "format": "universalseg-label-table",
        "version": 1,
        "label_map": path.name,
        "background": 0,
        "overlap_rule": OVERLAP_RULE,
        "labels": entries,
    }


def write_label_map(path, volume: Volume, masks: Mapping[int, np.ndarray], classes: Any, overwrite: bool = False) -> Path:
    """Write one multi-label NIfTI (voxel value = class index) plus its ``.labels.json``/``.labels.csv``.

    Args:
        path: output ``.nii.gz`` or ``.nii``.
        volume: the input volume; the output has its shape and IJK->RAS affine.
        masks: ``{class index: bool array}`` on the volume's grid.
        classes: the taxonomy (or list of ClassInfo) that names the indices.
        overwrite: replace existing outputs (the label map and its sidecars).

    Returns the label-map path. All three files appear together or not at all.
    """
    import nibabel as nib

    path = Path(path).expanduser()
    json_path, csv_path = sidecar_paths(path)
    masks, table = validate_masks(volume, masks, classes)
    for output in (path, json_path, csv_path):  # fail before the work if a name is taken
        prepare_output_path(output, overwrite)
    labels, counts = paint_label_map(volume.shape, masks, table)  # each mask is read once
    with AtomicOutputGroup(overwrite) as group:
        nib.save(nifti_image(labels, volume.affine), str(group.add(path)))
        with open(group.add(json_path), "w", encoding="utf-8") as handle:
            json.dump(_label_table(path, volume, counts, table, labels), handle, indent=2)
        with open(group.add(csv_path), "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle, quoting=csv.QUOTE_NONNUMERIC)
            writer.writerow(SLICER_COLOR_TABLE_COLUMNS)
            writer.writerows(_color_table_rows(masks, table))
        group.commit()
    return group.final_paths[0]


def write_class_masks(folder, volume: Volume, masks: Mapping[int, np.ndarray], classes: Any, overwrite: bool = False) -> list[Path]:
    """Write one binary NIfTI (uint8, 0/1) per class: ``<folder>/<class key>.nii.gz``.

    Every file has the volume's shape and affine. The files appear together or not at all (as far
    as the file system allows). Returns the written paths in class-index order.
    """
    import nibabel as nib

    masks, table = validate_masks(volume, masks, classes)
    folder = ensure_writable_folder(folder)
    with AtomicOutputGroup(overwrite) as group:
        for index, mask in masks.items():
            temporary = group.add(folder / f"{table[index].key}.nii.gz")
            nib.save(nifti_image(mask.astype(np.uint8), volume.affine), str(temporary))
        group.commit()
    return group.final_paths
