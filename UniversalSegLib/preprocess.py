"""Inference preprocessing of a CT volume and the exact inverse back onto the input voxel grid.

Preprocessing follows the official Universal Model chain, run with MONAI transforms on
a ``MetaTensor`` so that the output affine is tracked by MONAI itself:

1. ``Orientation("RAS")``: flip/permute the voxel axes only (no interpolation; oblique direction cosines are
   kept).
2. ``Spacing(1.5 mm)``: bilinear, border padding, computed in float64 (MONAI's own output-grid rule: the first
   output voxel centre sits on the first oriented voxel centre, shape ``round((n-1)*s_in/s_out + 1)``).
3. ``ScaleIntensityRange``: HU window -175..250 -> 0..1 with clipping.
4. ``CropForeground``: bounding box of the voxels whose scaled value is > 0 (margin 0 by default).

:func:`to_source_grid` brings a mask / label map / probability stack computed on the preprocessed grid back
onto the input grid the way the official pipeline intends to (``Invertd(nearest_interp=True)``): the crop is
undone by zero padding, the resampling by NEAREST interpolation with border clamping, the orientation by the
inverse flip/permute.

Why not MONAI's own inverse machinery: it builds a float64 sampling grid of the full input size (3 values per
voxel, plus torch's 4-value base grid) and a float64 copy of every channel: measured ~40 bytes per input voxel,
i.e. ~8 GB for a 512x512x800 CT, for every class. Because the oriented grid and the resampled grid always share
their direction cosines (Spacing keeps them), the voxel map between them is axis-aligned, even for oblique
input. :func:`to_source_grid` therefore computes, once, one integer index vector per axis and gathers: memory
is the output array only, and the cost is one indexing pass per channel. The per-axis coordinates are computed
with the same float64 operations MONAI/torch use (``to_norm_affine``, ``affine_grid``'s base grid,
``grid_sample``'s unnormalisation and round-half-to-even), so that source voxels lying exactly halfway between
two resampled voxel centres (e.g. 0.75 mm or 2.25 mm input spacing) are assigned exactly like MONAI's
``Invertd`` does. A general-affine fallback (slice by slice) covers grids that are not axis-aligned.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from .errors import InvalidGeometryError, InvalidImageError
from .settings import PreprocessingParameters, as_triple
from .io.validation import MAX_SPACING_MM, check_image_size, validate_geometry

__all__ = [
    "InvalidImageError",
    "PreprocessingParameters",
    "PreprocessedVolume",
    "preprocess",
    "to_source_grid",
    "validate_image",
    "MAX_SPACING_MM",
]


_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
# Relative size of off-diagonal terms below which the oriented->resampled index map counts as axis-aligned.
_AXIS_ALIGNED_TOL = 1e-6


@dataclass
class PreprocessedVolume:
    """A preprocessed volume plus everything needed to map results back onto the input grid.

    Grids involved: *source* (the input, any orientation), *oriented* (the same voxels flipped/permuted to the
    closest RAS axes), *resampled* (``spacing`` mm, uncropped) and the cropped grid of ``array``.
    """

    array: np.ndarray  # (X, Y, Z) float32 in 0..1, RAS-oriented, resampled, cropped
    affine: np.ndarray  # 4x4 IJK->RAS of `array`
    crop_start: tuple[int, int, int]  # box of `array` in the resampled (uncropped) grid, [start, end)
    crop_end: tuple[int, int, int]
    resampled_shape: tuple[int, int, int]
    resampled_affine: np.ndarray  # 4x4 IJK->RAS of the uncropped resampled grid
    oriented_affine: np.ndarray  # 4x4 IJK->RAS of the oriented (flipped/permuted, not resampled) grid
    source_shape: tuple[int, int, int]
    source_affine: np.ndarray  # 4x4 IJK->RAS of the input grid
    spacing: tuple[float, float, float]
    parameters: PreprocessingParameters = field(default_factory=PreprocessingParameters)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.array.shape)  # type: ignore[return-value]

    def to_source_grid(self, mask_or_labels: np.ndarray, order: str = "C") -> np.ndarray:
        """Shortcut for :func:`to_source_grid`."""
        return to_source_grid(mask_or_labels, self, order)


# ----------------------------------------------------------------------------------------------------------
# validation


def validate_image(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Check that ``array`` + ``affine`` describe one 3-D scalar image; return ``(array3d, affine float64)``.

    A trailing singleton axis (``(X, Y, Z, 1)``, as nibabel gives for some NIfTI files) is dropped. Raises
    :class:`InvalidImageError` with a message that says what is wrong.
    """
    array = np.asarray(array)
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise InvalidImageError(f"The image must hold real numbers (CT values in HU), got data type {array.dtype}.")
    if array.size == 0:
        raise InvalidImageError(f"The image is empty (shape {array.shape}).")
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        if array.ndim > 3:
            raise InvalidImageError(
                f"The image has shape {array.shape}: {int(np.prod(array.shape[3:]))} components per voxel "
                "(colour, vector or time series). UniversalSeg needs a single-component 3-D CT volume."
            )
        raise InvalidImageError(
            f"The image has shape {array.shape} ({array.ndim}-D). UniversalSeg needs a 3-D CT volume "
            "(a single slice must be given as an (X, Y, 1) array)."
        )
    if np.issubdtype(array.dtype, np.floating):
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            n_nan = int(np.count_nonzero(np.isnan(array)))
            raise InvalidImageError(
                f"The image contains {bad} non-finite voxel value(s) ({n_nan} NaN, {bad - n_nan} infinite) "
                f"out of {array.size}; a CT must hold finite HU values."
            )

    try:
        affine = validate_geometry(affine, "The image")
    except InvalidGeometryError as error:
        raise InvalidImageError(str(error)) from None
    return array, affine


def check_resampled_size(shape: Sequence[int], affine: np.ndarray, spacing: Sequence[float], itemsize: int = 8) -> None:
    """Refuse, before anything is allocated, a resampled grid that is too large for the limits or the memory.

    The grid ``Spacing`` makes has about ``(n - 1) * s_in / s_out + 1`` voxels per axis, so a header with a
    large spacing (or a tiny output spacing) can ask for far more voxels than the input has. Each
    resampled voxel is held once in the resampling dtype (``itemsize`` bytes) and once in float32.
    """
    in_spacing = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    # Orientation only permutes axes: pair each input axis with the output spacing of its RAS axis.
    ras_axis = np.argmax(np.abs(np.asarray(affine, dtype=np.float64)[:3, :3]), axis=0)
    out_spacing = np.asarray(spacing, dtype=np.float64)[ras_axis]
    resampled = [int(round((n - 1) * s_in / s_out + 1)) for n, s_in, s_out in zip(shape, in_spacing, out_spacing)]
    check_image_size(resampled, itemsize + 4, "The image",
                     what=f"resampling to {', '.join(f'{s:g}' for s in spacing)} mm")


# ----------------------------------------------------------------------------------------------------------
# forward


def preprocess(
    array: np.ndarray,
    affine: np.ndarray,
    spacing: float | Sequence[float] = (1.5, 1.5, 1.5),
    hu_window: Sequence[float] = (-175.0, 250.0),
    crop_foreground: bool = True,
    crop_margin: int | Sequence[int] = 0,
    resample_dtype: type = np.float64,
) -> PreprocessedVolume:
    """Orient to RAS, resample to ``spacing`` mm, window ``hu_window`` HU to 0..1, crop to the body.

    Args:
        array: CT in HU, IJK index order (as nibabel's ``dataobj``), any real dtype.
        affine: 4x4 IJK->RAS matrix (mm) of ``array``.
        spacing: output voxel size in mm, one value or (x, y, z).
        hu_window: (low, high) HU mapped to 0 and 1; values outside are clipped.
        crop_foreground: crop to the bounding box of voxels whose windowed value is > 0.
        crop_margin: voxels kept around that box, one value or per axis (clipped at the image border).
        resample_dtype: arithmetic of the resampling: ``np.float64`` as the official MONAI ``Spacingd`` (a
            float64 copy of the whole resampled CT), or ``np.float32`` (half the memory; values within
            ~1e-6 of float64 after windowing to 0..1).

    Raises:
        InvalidImageError: the input is not a finite 3-D scalar image with a plausible geometry, or (with
            cropping) no voxel lies above the lower end of the HU window.
    """
    import torch

    from . import monai_import  # noqa: F401  (MONAI without torchvision)
    from monai.data import MetaTensor
    from monai.transforms import CropForeground, Orientation, ScaleIntensityRange, Spacing
    from monai.utils import SpaceKeys

    array, affine = validate_image(array, affine)
    params = PreprocessingParameters(
        spacing=as_triple(spacing, "spacing", float),
        hu_window=tuple(float(v) for v in hu_window),  # type: ignore[arg-type]
        crop_foreground=bool(crop_foreground),
        crop_margin=as_triple(crop_margin, "crop_margin", int),
    )
    if any(not np.isfinite(s) or s <= 0 for s in params.spacing):
        raise ValueError(f"Output spacing must be positive, got {params.spacing}")
    if len(params.hu_window) != 2 or not params.hu_window[0] < params.hu_window[1]:
        raise ValueError(f"hu_window must be (low, high) with low < high, got {params.hu_window}")
    if any(m < 0 for m in params.crop_margin):
        raise ValueError(f"crop_margin must be >= 0, got {params.crop_margin}")

    check_resampled_size(array.shape, affine, params.spacing, np.dtype(resample_dtype).itemsize)

    # float32 like the official LoadImaged; the channel axis is what MONAI's array transforms expect.
    image = MetaTensor(
        torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)[None]),
        affine=torch.as_tensor(affine, dtype=torch.float64),
        meta={"space": SpaceKeys.RAS},
    )
    image = Orientation(axcodes="RAS", labels=_RAS_LABELS)(image)
    oriented_affine = image.affine.numpy().copy()
    image = Spacing(pixdim=params.spacing, mode="bilinear", padding_mode="border", dtype=resample_dtype)(image)
    resampled_affine = image.affine.numpy().copy()
    resampled_shape = tuple(int(n) for n in image.shape[1:])
    low, high = params.hu_window
    image = ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)(image)

    if params.crop_foreground:
        if not bool((image > 0).any()):
            raise InvalidImageError(
                f"No voxel is above {low:g} HU after resampling, so there is no body to segment. "
                "Is this a CT in Hounsfield units (check rescale slope/intercept)?"
            )
        # allow_smaller=True: a margin never pads beyond the image (MONAI 0.9.0 behaviour).
        cropper = CropForeground(
            select_fn=_is_positive, margin=params.crop_margin, allow_smaller=True, return_coords=True
        )
        image, box_start, box_end = cropper(image)
        crop_start = tuple(int(v) for v in box_start)
        crop_end = tuple(int(v) for v in box_end)
    else:
        crop_start, crop_end = (0, 0, 0), resampled_shape

    return PreprocessedVolume(
        array=np.ascontiguousarray(image.as_tensor()[0].numpy(), dtype=np.float32),
        affine=image.affine.numpy().copy(),
        crop_start=crop_start,  # type: ignore[arg-type]
        crop_end=crop_end,  # type: ignore[arg-type]
        resampled_shape=resampled_shape,  # type: ignore[arg-type]
        resampled_affine=resampled_affine,
        oriented_affine=oriented_affine,
        source_shape=tuple(int(n) for n in array.shape),  # type: ignore[arg-type]
        source_affine=affine.copy(),
        spacing=params.spacing,
        parameters=params,
    )


def _is_positive(x):
    """Foreground rule of the official CropForegroundd (MONAI default select_fn)."""
    return x > 0


# ----------------------------------------------------------------------------------------------------------
# inverse


def to_source_grid(mask_or_labels: np.ndarray, prep: PreprocessedVolume, order: str = "C") -> np.ndarray:
    """Bring an array on the preprocessed grid back onto the input grid (nearest neighbour).

    Args:
        mask_or_labels: ``prep.shape`` (X, Y, Z) or (C, X, Y, Z) array on the grid of ``prep.array`` (any
            dtype: bool masks, a uint8/uint16 label map, float probabilities).
        prep: the result of :func:`preprocess` for the input image.
        order: memory order of a 3-D result, "C" or "F". Use the input array's order (nibabel and
            SimpleITK give Fortran-ordered volumes): masks and volume then share one memory layout, and
            indexing the volume with a mask runs in memory order (much faster on a fine CT).

    Returns:
        An array of the same dtype (and channel count) with shape ``prep.source_shape`` per channel, in the
        input's own axis order. Voxels outside the cropped box get 0 (False).
    """
    if order not in ("C", "F"):
        raise ValueError(f"order must be 'C' or 'F', got {order!r}")
    data = np.asarray(mask_or_labels)
    if data.shape == prep.shape:
        return _invert_channel(data, prep, _index_map(prep), order)
    if data.ndim == 4 and data.shape[1:] == prep.shape:
        index_map = _index_map(prep)
        out = np.empty((data.shape[0], *prep.source_shape), dtype=data.dtype)
        for channel in range(data.shape[0]):  # one channel at a time keeps the temporaries small
            out[channel] = _invert_channel(data[channel], prep, index_map)
        return out
    raise ValueError(
        f"Expected an array of shape {prep.shape} or (C, {', '.join(map(str, prep.shape))}) on the "
        f"preprocessed grid, got {data.shape}."
    )


@dataclass(frozen=True)
class _SeparableMap:
    """For each source axis q: the axis of the cropped array it reads (``axes[q]``) and the index per source
    position (``indices[q]``, clipped into range) plus which positions fall outside the crop (``outside[q]``)."""

    axes: tuple[int, int, int]
    indices: tuple[np.ndarray, np.ndarray, np.ndarray]
    outside: tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class _GeneralMap:
    """Fallback for non-axis-aligned grids: cropped-grid index = ``matrix @ source_ijk + offset``."""

    matrix: np.ndarray
    offset: np.ndarray


def _index_map(prep: PreprocessedVolume) -> _SeparableMap | _GeneralMap:
    """Source voxel -> cropped-grid voxel map, computed once per volume."""
    flip_permute = _axis_alignment(np.linalg.solve(prep.oriented_affine, prep.source_affine))
    if flip_permute is None:
        raise ValueError("oriented_affine is not a flip/permutation of source_affine; is `prep` consistent?")
    oriented_shape = [0, 0, 0]
    for q, (p, _sign, _offset) in enumerate(flip_permute):
        oriented_shape[p] = prep.source_shape[q]
    xform = np.linalg.solve(prep.resampled_affine, prep.oriented_affine)  # oriented ijk -> resampled ijk
    off_diagonal = xform[:3, :3] - np.diag(np.diag(xform[:3, :3]))
    if np.abs(off_diagonal).max() > _AXIS_ALIGNED_TOL * np.abs(xform[:3, :3]).max():
        # Never the case for grids made by preprocess() (Spacing keeps the direction cosines).
        return _general_map(prep)
    resampled_index = _monai_nearest_indices(xform, prep.resampled_shape, oriented_shape)

    axes, indices, outside = [], [], []
    for q, (p, sign, offset) in enumerate(flip_permute):
        oriented_pos = sign * np.arange(prep.source_shape[q]) + offset  # o_p for every s_q
        cropped = resampled_index[p][oriented_pos] - prep.crop_start[p]
        size = prep.crop_end[p] - prep.crop_start[p]
        outside_q = (cropped < 0) | (cropped >= size)
        axes.append(p)
        indices.append(np.clip(cropped, 0, size - 1).astype(np.intp))
        outside.append(outside_q)
    return _SeparableMap(tuple(axes), tuple(indices), tuple(outside))  # type: ignore[arg-type]


def _axis_alignment(matrix: np.ndarray) -> list[tuple[int, int, int]] | None:
    """If the 4x4 index map ``matrix`` is a pure flip/permutation of voxel indices, return per input axis q the
    tuple (output axis p, sign, offset) with ``out_p = sign * in_q + offset``; else None."""
    linear = matrix[:3, :3]
    result = []
    for q in range(3):
        p = int(np.argmax(np.abs(linear[:, q])))
        others = np.delete(linear[:, q], p)
        sign, offset = linear[p, q], matrix[p, 3]
        if np.any(np.abs(others) > 1e-4) or abs(abs(sign) - 1) > 1e-4 or abs(offset - round(offset)) > 1e-3:
            return None
        result.append((p, int(round(sign)), int(round(offset))))
    if sorted(r[0] for r in result) != [0, 1, 2]:
        return None
    return result


def _monai_nearest_indices(xform: np.ndarray, src_shape: Sequence[int], dst_shape: Sequence[int]) -> list[np.ndarray]:
    """Per output axis, the input index MONAI's nearest resampling (``SpatialResample`` with
    ``align_corners=False``, ``padding_mode="border"``) reads, for a diagonal index-space ``xform``.

    Mirrors the float64 arithmetic of ``to_norm_affine`` -> ``torch.nn.functional.affine_grid`` ->
    ``grid_sample``'s unnormalisation and ``nearbyint``, one axis at a time, so ties are broken identically.
    """
    import torch
    from . import monai_import  # noqa: F401  (MONAI without torchvision)
    from monai.networks.utils import to_norm_affine

    theta = to_norm_affine(
        torch.as_tensor(xform, dtype=torch.float64)[None], list(src_shape), list(dst_shape), align_corners=False
    )[0].numpy()
    indices = []
    for p in range(3):
        n_out, n_in = int(dst_shape[p]), int(src_shape[p])
        if n_out > 1:  # torch: linspace(-1, 1, n) * (n - 1) / n for align_corners=False
            base = ((torch.linspace(-1.0, 1.0, n_out, dtype=torch.float64) * (n_out - 1)) / n_out).numpy()
        else:
            base = np.zeros(1)
        grid = base * theta[p, p] + theta[p, 3]
        coordinate = ((grid + 1.0) * n_in - 1.0) / 2.0
        indices.append(np.clip(np.rint(coordinate), 0, n_in - 1).astype(np.intp))
    return indices


def _general_map(prep: PreprocessedVolume) -> _GeneralMap:
    index = np.linalg.solve(prep.resampled_affine, prep.source_affine)
    return _GeneralMap(matrix=index[:3, :3], offset=index[:3, 3])


def _invert_channel(channel: np.ndarray, prep: PreprocessedVolume, index_map, order: str = "C") -> np.ndarray:
    if isinstance(index_map, _SeparableMap):
        # View the cropped array with its axes in source order, then gather one axis at a time, ending with
        # the axis that is contiguous in the result: much faster than one outer-product (np.ix_) gather on
        # a fine CT. For a Fortran-ordered result the same runs on the transposed view.
        raw = channel.view(np.uint8) if channel.dtype == bool else channel
        view = np.transpose(raw, index_map.axes)
        steps = list(enumerate(index_map.indices))
        if order == "F":
            view, steps = view.T, [(2 - axis, indices) for axis, indices in reversed(steps)]
        out = view
        for axis, indices in steps:
            out = out.take(indices, axis=axis)
        out = out.T if order == "F" else out
        out = out.view(bool) if channel.dtype == bool else out
        for q, outside in enumerate(index_map.outside):
            if outside.any():  # zero padding of the crop
                out[(slice(None),) * q + (outside,)] = 0
        return out
    return _invert_channel_general(channel, prep, index_map, order)


def _invert_channel_general(channel: np.ndarray, prep: PreprocessedVolume, index_map: _GeneralMap,
                            order: str = "C") -> np.ndarray:
    """Slice-by-slice nearest lookup through a general affine (clamped to the resampled grid, zero outside
    the crop), so that only one slice of coordinates exists at a time."""
    out = np.zeros(prep.source_shape, dtype=channel.dtype, order=order)
    n_i, n_j, n_k = prep.source_shape
    jj, kk = np.meshgrid(np.arange(n_j), np.arange(n_k), indexing="ij")
    plane = index_map.matrix[:, 1:2, None] * jj + index_map.matrix[:, 2:3, None] * kk + index_map.offset[:, None, None]
    upper = np.asarray(prep.resampled_shape)[:, None, None] - 1
    start = np.asarray(prep.crop_start)[:, None, None]
    size = np.asarray(prep.crop_end)[:, None, None] - start
    for i in range(n_i):
        resampled = np.clip(np.rint(plane + index_map.matrix[:, 0:1, None] * i), 0, upper).astype(np.intp)
        cropped = resampled - start
        inside = np.all((cropped >= 0) & (cropped < size), axis=0)
        out[i][inside] = channel[cropped[0][inside], cropped[1][inside], cropped[2][inside]]
    return out
