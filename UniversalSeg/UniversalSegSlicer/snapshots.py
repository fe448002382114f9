"""Offscreen pictures of a result: slice overlays (matplotlib) and 3D surfaces (VTK, offscreen).

Used for the documentation's pictures and for visual checks without the Slicer GUI. Slices follow the
radiological convention (the patient's right on the left of the image, anterior at the top of axial
views). The 3D view renders the closed surfaces of a segmentation node from the front (patient's right on
the left), coloured like the segments. On a machine without a display VTK needs an offscreen OpenGL:
EGL (``libegl1``, ``libegl-mesa0``, ``libgl1-mesa-dri``) or OSMesa; set
``VTK_DEFAULT_OPENGL_WINDOW=vtkEGLRenderWindow`` to skip the X11 attempt.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from UniversalSegLib.taxonomy import ClassInfo

__all__ = ["axial_slice_image", "render_overlay", "render_surfaces"]


def axial_slice_image(volume_array: np.ndarray, affine: np.ndarray, k: int) -> tuple[np.ndarray, tuple]:
    """Axial slice ``k`` of an IJK volume as a 2-D image in radiological display orientation.

    Returns (image rows x columns, (flip_i, flip_j)) where rows run anterior -> posterior and columns
    patient right -> left; the flips say how the slice's i/j axes were reversed (to apply to masks).
    Assumes the i and j voxel axes are (close to) left-right and anterior-posterior.
    """
    plane = np.asarray(volume_array)[:, :, k]
    flip_i = affine[0, 0] > 0  # i runs towards the patient's right (+x in RAS): reverse, right goes first
    flip_j = affine[1, 1] > 0  # j runs towards anterior (+y): reverse, anterior goes to the top row
    return _orient(plane, flip_i, flip_j), (flip_i, flip_j)


def _orient(plane: np.ndarray, flip_i: bool, flip_j: bool) -> np.ndarray:
    if flip_i:
        plane = plane[::-1, :]
    if flip_j:
        plane = plane[:, ::-1]
    return plane.T  # rows = j (anterior first), columns = i (patient right first)


def render_overlay(path, volume_array: np.ndarray, affine: np.ndarray, masks: Mapping[int, np.ndarray],
                   classes: Sequence[ClassInfo], slices: Sequence[int], window: tuple[float, float] = (-160, 240),
                   title: str = "", dpi: int = 110) -> Path:
    """Axial slices with filled, outlined segments and a legend; written as PNG (matplotlib, no GL)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    infos = {info.index: info for info in classes}
    spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    figure, axes = plt.subplots(1, len(slices), figsize=(4.2 * len(slices), 4.6), squeeze=False)
    for ax, k in zip(axes[0], slices):
        image, flips = axial_slice_image(volume_array, affine, k)
        aspect = spacing[1] / spacing[0]  # pixel coordinates; rows are j, columns i
        ax.imshow(image, cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect, interpolation="nearest")
        for index, mask in masks.items():
            plane = _orient(np.asarray(mask)[:, :, k], *flips)
            if not plane.any():
                continue
            colour = np.array(infos[index].color) / 255.0
            ax.imshow(np.ma.masked_where(~plane, plane), cmap=ListedColormap([colour]), alpha=0.45, aspect=aspect,
                      interpolation="nearest", vmin=0, vmax=1)
            ax.contour(plane.astype(float), levels=[0.5], colors=[colour], linewidths=1.0)
        ax.set_axis_off()
        ax.text(2, 6, "R", color="white", fontsize=10, weight="bold", va="top")
        ax.text(image.shape[1] - 3, 6, "L", color="white", fontsize=10, weight="bold", va="top", ha="right")
    present = [infos[i] for i in masks if np.asarray(masks[i]).any()]
    figure.legend(handles=[Patch(color=np.array(i.color) / 255.0, label=i.display_name) for i in present],
                  loc="lower center", ncol=min(6, len(present)), frameon=False, fontsize=9)
    if title:
        figure.suptitle(title, fontsize=11)
    figure.tight_layout(rect=(0, 0.08, 1, 0.95))
    path = Path(path)
    figure.savefig(path, dpi=dpi, facecolor="white")
    plt.close(figure)
    return path


def render_surfaces(path, segmentation_node, size: tuple[int, int] = (640, 640), background=(1.0, 1.0, 1.0),
                    smoothing: float = 0.5) -> Path:
    """Render the closed surfaces of a segmentation node offscreen (front view) into a PNG."""
    import vtk

    segmentation_node.GetSegmentation().SetConversionParameter("Smoothing factor", str(smoothing))
    segmentation_node.CreateClosedSurfaceRepresentation()
    segmentation = segmentation_node.GetSegmentation()
    renderer = vtk.vtkRenderer()
    renderer.SetBackground(*background)
    for segment_id in segmentation.GetSegmentIDs():
        segment = segmentation.GetSegment(segment_id)
        polydata = vtk.vtkPolyData()
        segmentation_node.GetClosedSurfaceRepresentation(segment_id, polydata)
        if polydata.GetNumberOfPoints() == 0:
            continue
        normals = vtk.vtkPolyDataNormals()
        normals.SetInputData(polydata)
        mapper = vtk.vtkPolyDataMapper()
        mapper.SetInputConnection(normals.GetOutputPort())
        mapper.ScalarVisibilityOff()
        actor = vtk.vtkActor()
        actor.SetMapper(mapper)
        actor.GetProperty().SetColor(*segment.GetColor())
        actor.GetProperty().SetSpecular(0.2)
        renderer.AddActor(actor)
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(True)
    window.SetSize(*size)
    window.AddRenderer(renderer)
    camera = renderer.GetActiveCamera()
    camera.SetPosition(0.0, 1.0, 0.0)  # in front of the patient (anterior = +y in RAS) ...
    camera.SetFocalPoint(0.0, 0.0, 0.0)
    camera.SetViewUp(0.0, 0.0, 1.0)  # ... head up: the patient's right appears on the left
    renderer.ResetCamera()
    camera.Zoom(1.3)
    window.Render()
    capture = vtk.vtkWindowToImageFilter()
    capture.SetInput(window)
    capture.ReadFrontBufferOff()
    capture.Update()
    writer = vtk.vtkPNGWriter()
    path = Path(path)
    writer.SetFileName(str(path))
    writer.SetInputConnection(capture.GetOutputPort())
    writer.Write()
    window.Finalize()
    return path
