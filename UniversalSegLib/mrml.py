"""Thin bridge between UniversalSeg and 3D Slicer's MRML: volume node <-> array + affine, masks <-> segments.

Everything here works inside the Slicer application and on the ``slicer-core`` wheel alike: ``slicer`` and
``vtk`` are imported inside the functions (never at module level), only VTK/MRML classes and
``slicer.util`` array helpers are used, and nothing needs ``slicer.app`` or ``slicer.mrmlScene``: the
scene and logics are passed in.

Axis order: MRML arrays (``slicer.util.arrayFromVolume``) are KJI; the library is IJK (as nibabel's
``dataobj``). Every function here takes and returns IJK arrays and converts at the boundary.

Geometry: a segment created here lies on the volume's own voxel grid (``IJKToRAS`` of the node), so
``mask_from_segment(..., volume_node)`` returns exactly the mask that was put in. The segmentation node is
placed under the volume's parent transform, so a transformed volume and its segments stay together.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .io.volume import Volume
from .errors import MRMLBridgeError
from .helpers import bounding_box

if TYPE_CHECKING:  # pragma: no cover - type names only
    from .taxonomy import ClassInfo

__all__ = [
    "MRMLBridgeError",
    "HeadlessScene",
    "TAG_CLASS_INDEX",
    "TAG_CLASS_KEY",
    "affine_of_volume_node",
    "parent_transform_to_world",
    "volume_from_node",
    "volume_node_from_volume",
    "oriented_image_from_mask",
    "set_segment_class",
    "segment_class_index",
    "mask_from_segment",
    "prepare_segmentation_node",
    "headless_scene",
]

#: Segment tags written by UniversalSeg (saved in .seg.nrrd files with the segment).
TAG_CLASS_INDEX = "UniversalSeg.ClassIndex"
TAG_CLASS_KEY = "UniversalSeg.ClassKey"


# ------------------------------------------------------------------------------------------------- volumes
def _matrix_to_array(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def _array_to_matrix(array: np.ndarray):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def parent_transform_to_world(node) -> np.ndarray:
    """4x4 matrix of the node's parent transforms (identity without one); refuses non-linear transforms."""
    import vtk

    transform_node = node.GetParentTransformNode()
    if transform_node is None:
        return np.eye(4)
    if not transform_node.IsTransformToWorldLinear():
        raise MRMLBridgeError(
            f'"{node.GetName()}" is under the non-linear transform "{transform_node.GetName()}". Harden the '
            "transform (Data module: right-click, Harden transform) or remove it before segmenting.")
    matrix = vtk.vtkMatrix4x4()
    transform_node.GetMatrixTransformToWorld(matrix)
    return _matrix_to_array(matrix)


def affine_of_volume_node(volume_node, world: bool = True) -> np.ndarray:
    """IJK->RAS 4x4 affine of a volume node; with ``world`` the linear parent transforms are included."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    affine = _matrix_to_array(matrix)
    return parent_transform_to_world(volume_node) @ affine if world else affine


def volume_from_node(volume_node, world: bool = True) -> Volume:
    """A :class:`Volume` (IJK array copy + IJK->RAS affine) from a scalar volume node.

    The array is a copy, so the result can be handed to a worker thread while the scene keeps changing.
    With ``world=True`` (default) the affine includes linear parent transforms: the model must see the
    patient's real orientation. Raises :class:`MRMLBridgeError` for label maps, vector volumes, empty
    nodes and non-linear transforms.
    """
    import slicer

    if volume_node is None:
        raise MRMLBridgeError("No input volume selected.")
    name = volume_node.GetName()
    if volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise MRMLBridgeError(f'"{name}" is a label map, not a CT image. Select the CT volume.')
    if not volume_node.IsA("vtkMRMLScalarVolumeNode"):
        raise MRMLBridgeError(f'"{name}" is a {volume_node.GetClassName()}, not a scalar (CT) volume.')
    image = volume_node.GetImageData()
    if image is None or image.GetNumberOfPoints() == 0:
        raise MRMLBridgeError(f'"{name}" holds no voxels (the volume is empty or still loading).')
    if image.GetNumberOfScalarComponents() != 1:
        raise MRMLBridgeError(
            f'"{name}" has {image.GetNumberOfScalarComponents()} components per voxel (colour or vector '
            "image); UniversalSeg needs a single-component CT volume.")
    kji = slicer.util.arrayFromVolume(volume_node)
    array = np.array(kji.transpose(2, 1, 0), copy=True)  # IJK, owned by the Volume
    return Volume(array=array, affine=affine_of_volume_node(volume_node, world), source=name, format="mrml")


def volume_node_from_volume(scene, volume: Volume, name: str = "Volume"):
    """Add a scalar volume node holding ``volume`` (voxels and geometry) to ``scene``; returns the node."""
    import slicer

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetIJKToRASMatrix(_array_to_matrix(volume.affine))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(np.asarray(volume.array).transpose(2, 1, 0)))
    node.CreateDefaultDisplayNodes()
    return node


# ------------------------------------------------------------------------------------------------ segments
def oriented_image_from_mask(mask: np.ndarray, ijk_to_ras: np.ndarray, crop: bool = True):
    """``vtkOrientedImageData`` (uint8 0/1) of an IJK mask on the grid given by ``ijk_to_ras``.

    With ``crop`` the image covers only the mask's bounding box (extent offsets keep the grid), which is
    what Slicer stores anyway and saves memory for small structures; an empty mask gives an empty extent.
    """
    import slicer
    import vtk
    from vtk.util import numpy_support

    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise MRMLBridgeError(f"a segment mask must be 3-D (IJK), got shape {mask.shape}")
    image = slicer.vtkOrientedImageData()
    image.SetImageToWorldMatrix(_array_to_matrix(np.asarray(ijk_to_ras, dtype=np.float64)))
    if crop:
        box = bounding_box(mask)
        if box is None:
            image.SetExtent(0, -1, 0, -1, 0, -1)
            image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
            return image
        first, last = np.array([b.start for b in box]), np.array([b.stop - 1 for b in box])
    else:
        first, last = np.zeros(3, dtype=int), np.array(mask.shape) - 1
    image.SetExtent(int(first[0]), int(last[0]), int(first[1]), int(last[1]), int(first[2]), int(last[2]))
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    block = mask[first[0]:last[0] + 1, first[1]:last[1] + 1, first[2]:last[2] + 1]
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    scalars[:] = np.ascontiguousarray(block.transpose(2, 1, 0), dtype=np.uint8).ravel()  # VTK order = KJI
    return image


def set_segment_class(segment, info: "ClassInfo") -> None:
    """Name, colour, standard terminology and UniversalSeg class tags of one class on a ``vtkSegment``."""
    segment.SetName(info.display_name)
    segment.SetColor(*(c / 255.0 for c in info.color))
    terminology = info.terminology.to_slicer_string()
    if hasattr(segment, "SetTerminology"):  # Slicer >= 5.10
        segment.SetTerminology(terminology)
    else:
        segment.SetTag(segment.GetTerminologyEntryTagName(), terminology)
    for setter in ("SetNameAutoGenerated", "SetColorAutoGenerated"):
        if hasattr(segment, setter):  # our names/colours are deliberate: Slicer must not replace them
            getattr(segment, setter)(False)
    segment.SetTag(TAG_CLASS_INDEX, str(info.index))
    segment.SetTag(TAG_CLASS_KEY, info.key)


def segment_class_index(segment) -> int | None:
    """The UniversalSeg class index recorded on a segment, or None for a segment UniversalSeg did not make."""
    import vtk

    value = vtk.mutable("")
    if not segment.GetTag(TAG_CLASS_INDEX, value):
        return None
    try:
        return int(str(value))
    except ValueError:
        return None


def prepare_segmentation_node(segmentation_node, volume_node) -> None:
    """Reference geometry = the volume's grid; same parent transform; default display nodes present."""
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    segmentation_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    if segmentation_node.GetScene() is not None and segmentation_node.GetDisplayNode() is None:
        segmentation_node.CreateDefaultDisplayNodes()


def _reference_image(volume_node):
    import slicer
    import vtk

    reference = slicer.vtkOrientedImageData()
    image = volume_node.GetImageData()
    reference.SetExtent(image.GetExtent())
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    reference.SetImageToWorldMatrix(matrix)
    return reference


def mask_from_segment(segmentation_node, segment_id: str, volume_node) -> np.ndarray:
    """The segment's voxels on ``volume_node``'s grid as an IJK bool array (nearest-neighbour resampling
    when the segmentation lies on another grid; a shared labelmap layer is reduced to this segment's
    label value)."""
    import slicer
    from vtk.util import numpy_support

    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        raise MRMLBridgeError(f'segmentation "{segmentation_node.GetName()}" has no segment "{segment_id}"')
    if segmentation_node.GetTransformNodeID() != volume_node.GetTransformNodeID():
        raise MRMLBridgeError(
            f'segmentation "{segmentation_node.GetName()}" and volume "{volume_node.GetName()}" are under '
            "different transforms; harden or remove the transforms first.")
    layer = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(segmentation_node, segment_id, layer)
    reference = _reference_image(volume_node)
    dims = [n for n in reference.GetDimensions()]
    extent = layer.GetExtent()
    if extent[1] < extent[0] or extent[3] < extent[2] or extent[5] < extent[4]:
        return np.zeros(dims, dtype=bool)  # empty segment
    resampled = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        layer, reference, resampled, False, False)
    values = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars())
    kji = values.reshape(dims[2], dims[1], dims[0])
    return np.ascontiguousarray((kji == segment.GetLabelValue()).transpose(2, 1, 0))


# ------------------------------------------------------------------------------------------ headless scene
@dataclass
class HeadlessScene:
    """A MRML scene with the module logics UniversalSeg uses, without the Slicer application."""

    scene: Any
    application_logic: Any
    volumes_logic: Any
    segmentations_logic: Any
    terminologies_logic: Any

    def load_volume(self, path, name: str | None = None):
        """Read a volume file with Slicer's own reader (as File > Add Data does).

        Note: for a left-handed NIfTI affine Slicer's reader reverses the K axis (IJKToRAS changes, the
        world positions of the voxels do not); :func:`volume_from_node` always reports the node's grid.
        """
        import vtk

        name = name or "Volume"
        node = self.volumes_logic.AddArchetypeVolume(str(path), name, 0, vtk.vtkStringArray())
        if node is None:
            raise MRMLBridgeError(f"Slicer could not read {path}")
        return node


def headless_scene(terminology_dir: str | None = None) -> HeadlessScene:
    """A scene plus application, colour, volumes, terminologies and segmentations logics (no Qt, no app).

    This is how UniversalSeg's logic runs outside the Slicer application (``pip install slicer-core``):
    batch scripts and the test suite. Inside Slicer use ``slicer.mrmlScene`` and the module logics.
    """
    import slicer

    scene = slicer.vtkMRMLScene()
    application_logic = slicer.vtkSlicerApplicationLogic()
    application_logic.SetMRMLScene(scene)
    colors = application_logic.GetColorLogic()
    colors.SetMRMLScene(scene)
    colors.AddDefaultColorNodes()
    application_logic.SetModuleLogic("Colors", colors)

    def register(logic, name: str, share_dir: str | None = None):
        if share_dir:
            logic.SetModuleShareDirectory(share_dir)  # before SetMRMLScene: terminologies load then
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(application_logic)
        application_logic.SetModuleLogic(name, logic)
        return logic

    volumes = register(slicer.vtkSlicerVolumesLogic(), "Volumes")
    terminologies = slicer.vtkSlicerTerminologiesModuleLogic()
    if terminology_dir:
        register(terminologies, "Terminologies", terminology_dir)
    else:
        # Without a share directory the logic would log errors for the (absent) default context files;
        # entries are still parsed and serialised, which is all UniversalSeg needs from it.
        application_logic.SetModuleLogic("Terminologies", terminologies)
    segmentations = register(slicer.vtkSlicerSegmentationsModuleLogic(), "Segmentations")
    register(slicer.vtkSlicerSubjectHierarchyModuleLogic(), "SubjectHierarchy")
    return HeadlessScene(scene, application_logic, volumes, segmentations, terminologies)
