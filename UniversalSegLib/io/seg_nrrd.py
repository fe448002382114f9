"""3D Slicer segmentation file (``.seg.nrrd``) with names, colours and standard terminology.

Segments are stored the way Slicer (and ``slicerio.add_segment``) does: a segment goes into the first layer
where it overlaps nothing, else into a new layer, so overlapping classes (liver and liver tumour) are both
kept exactly. :func:`pack_layers` applies that rule reading each mask once in its memory order (a fine CT's
masks are 210 MB each); slicerio writes the file. The file's grid is
the input volume's full grid (``space directions``/``space origin`` in LPS, as Slicer writes them), and
the "Reference image geometry" conversion parameter records the same grid, so Slicer treats the input
volume as the segmentation's reference geometry.

Each segment: ID = class key, Name = display name, Color = taxonomy colour, and the
``TerminologyEntry`` tag = the taxonomy's 7-part Slicer terminology string.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .atomic import atomic_output, prepare_output_path
from ..errors import UnsupportedFormatError
from .masks import memory_order, slab_length, validate_masks
from .volume import Volume

#: Name of Slicer's conversion parameter that holds the reference grid (vtkSegmentationConverter).
REFERENCE_GEOMETRY_PARAMETER = "Reference image geometry"


def serialize_image_geometry(volume: Volume) -> str:
    """Slicer's serialised image geometry: the IJK->RAS matrix row by row, then the extent, ';'-separated."""
    numbers = [format(float(v) + 0.0, ".17g") for v in volume.affine.ravel()]
    extent = [str(v) for n in volume.shape for v in (0, n - 1)]
    return ";".join(numbers + extent) + ";"


def _extent(mask: np.ndarray) -> list[int]:
    """[i_min, i_max, j_min, j_max, k_min, k_max] of a mask (Slicer's empty extent for an empty one)."""
    columns = mask.any(axis=2)  # one pass over the volume; the other projections are small
    along = [columns.any(axis=1), columns.any(axis=0), mask.any(axis=(0, 1))]
    if not along[0].any():
        return [0, -1, 0, -1, 0, -1]
    extent = []
    for axis in along:
        hits = np.flatnonzero(axis)
        extent += [int(hits[0]), int(hits[-1])]
    return extent


def pack_layers(shape, masks: Mapping[int, np.ndarray]) -> tuple[np.ndarray, dict[int, tuple[int, int, list[int]]]]:
    """Slicer's layout of segments in layers: each mask goes into the first layer where it overlaps nothing
    (and its label value fits uint8), else into a new layer.

    The same rule as ``slicerio.add_segment``, made for fine CTs: each mask is read once, in its memory order
    and slab by slab, and the layers share the masks' memory order (Fortran for nibabel volumes, which is also
    NRRD's order on disk). Returns (voxels: 3-D for one layer, else (layers, *shape);
    ``{class index: (layer, label value, extent)}``).
    """
    shape = tuple(int(n) for n in shape)
    layers: list[np.ndarray] = []
    next_label: list[int] = []
    placed: dict[int, tuple[int, int, list[int]]] = {}
    for index in masks:
        mask = masks[index]
        if not layers:  # the first mask sets the memory order
            order = memory_order(mask)
        flat_mask = mask.T if order == "F" else mask
        slab = slab_length(flat_mask)
        parts = [(start, flat_mask[start:start + slab]) for start in range(0, flat_mask.shape[0], slab)]
        parts = [(start, part) for start, part in parts if part.any()]
        target = None
        for number, layer in enumerate(layers):
            if next_label[number] > np.iinfo(np.uint8).max:
                continue
            flat_layer = layer.T if order == "F" else layer
            if not any(np.any(flat_layer[start:start + len(part)][part]) for start, part in parts):
                target = number
                break
        if target is None:
            layers.append(np.zeros(shape, dtype=np.uint8, order=order))
            next_label.append(1)
            target = len(layers) - 1
        flat_layer = layers[target].T if order == "F" else layers[target]
        label = next_label[target]
        for start, part in parts:
            np.copyto(flat_layer[start:start + len(part)], label, where=part)
        next_label[target] += 1
        placed[index] = (target, label, _extent(mask))
    if not layers:
        return np.zeros(shape, dtype=np.uint8), placed
    if len(layers) == 1:
        return layers[0], placed
    # Slicer's 4-D layout: the layer axis first (fastest on disk); copied one layer at a time.
    voxels = np.empty((len(layers), *shape), dtype=np.uint8, order="F")
    for number in range(len(layers)):
        voxels[number] = layers[number]
        layers[number] = None  # type: ignore[call-overload]
    return voxels, placed


def build_segmentation(volume: Volume, masks: Mapping[int, np.ndarray], table: Mapping[int, Any]) -> dict:
    """slicerio segmentation dict (IJK voxels, layered as Slicer stores them) for ``masks`` on ``volume``'s grid."""
    import slicerio
    from slicerio.segmentation import terminology_entry_from_string

    segmentation = slicerio.create_segmentation((1, 1, 1), volume.affine_lps, dtype="uint8")
    voxels, placed = pack_layers(volume.shape, masks)
    segmentation["voxels"] = voxels
    for index in masks:
        info = table[index]
        layer, label, extent = placed[index]
        segmentation["segments"].append({
            "id": info.key,
            "name": info.display_name,
            "color": [round(int(c) / 255.0, 6) for c in info.color],
            "nameAutoGenerated": False,
            "colorAutoGenerated": False,
            "terminology": terminology_entry_from_string(info.terminology.to_slicer_string()),
            "labelValue": label,
            "layer": layer,
            "extent": extent,
        })
    segmentation["containedRepresentationNames"] = ["Binary labelmap"]
    segmentation["masterRepresentation"] = "Binary labelmap"
    # Written as the raw header field: Slicer reads only parameters terminated by "&", which slicerio's
    # "conversionParameters" writer omits after the last one (Slicer would then ignore the geometry).
    segmentation["Segmentation_ConversionParameters"] = (
        f"{REFERENCE_GEOMETRY_PARAMETER}|{serialize_image_geometry(volume)}|&"
    )
    return segmentation


_GZIP_LEVEL = 1


def write_seg_nrrd(path, volume: Volume, masks: Mapping[int, np.ndarray], classes: Any, overwrite: bool = False) -> Path:
    """Write a Slicer ``.seg.nrrd``: one segment per class, overlapping classes kept, on the volume's grid.

    Args:
        path: output file name ending with ``.seg.nrrd``.
        volume: the input volume (its grid and geometry are written).
        masks: ``{class index: bool array}`` on the volume's grid.
        classes: the taxonomy (or list of ClassInfo) with names, colours and terminology.
        overwrite: replace an existing file.
    """
    import slicerio

    path = Path(path).expanduser()
    if not path.name.lower().endswith(".seg.nrrd"):
        raise UnsupportedFormatError(f"{path}: a Slicer segmentation file name must end with .seg.nrrd.")
    masks, table = validate_masks(volume, masks, classes)
    path = prepare_output_path(path, overwrite)  # fail before the work if the name is taken
    segmentation = build_segmentation(volume, masks, table)
    with atomic_output(path, overwrite) as temporary:
        # gzip level 1: far faster than slicerio's default 9 on 32 segments, for slightly larger files.
        slicerio.write_segmentation(str(temporary), segmentation, compression_level=_GZIP_LEVEL)
    return path
