"""The Slicer module's logic (UniversalSeg/UniversalSegSlicer) with real MRML, a real CT and a real model.

The model is a small Universal Model (``ModelConfig.small``, U-Net) trained here in a few seconds on a
synthetic CT: a body of soft tissue (40 HU) holding a bright blob (400 HU, taught as "Liver") and a fat
blob (-120 HU, taught as "Spleen"); "Pancreas" is taught to be absent. Its checkpoint (UniversalSeg's
safetensors format, 8 mm preprocessing grid, 16^3 windows) makes every run take a second or two, and the
answers at known points are known. On the real CT it marks bone ("Liver": bright) and fat ("Spleen"),
which gives real anatomy to check the geometry against.
"""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT, require_shared, segment_editor

slicer = pytest.importorskip("slicer", reason="the slicer-core wheel is needed for MRML tests")
torch = pytest.importorskip("torch")
nib = pytest.importorskip("nibabel")

sys.path.insert(0, str(REPO_ROOT / "UniversalSeg"))

from UniversalSegLib.io.training_case import read_training_case  # noqa: E402
from UniversalSegLib.io.volume import Volume  # noqa: E402
from UniversalSegLib.mrml import (  # noqa: E402
    affine_of_volume_node,
    headless_scene,
    mask_from_segment,
    oriented_image_from_mask,
    volume_from_node,
    volume_node_from_volume,
)
from UniversalSegLib.taxonomy import get_taxonomy  # noqa: E402
from UniversalSegSlicer.estimate import OPENVINO_SECONDS_PER_WINDOW, SECONDS_PER_WINDOW  # noqa: E402
from UniversalSegSlicer.export import ExportError  # noqa: E402
from UniversalSegSlicer.jobs import JobCancelled, JobState  # noqa: E402
from UniversalSegSlicer.logic import STATISTICS_REFERENCE, SegmentationLogic  # noqa: E402
from UniversalSegSlicer.messages import plain_message  # noqa: E402
from UniversalSegSlicer.parameters import ModuleParameters  # noqa: E402
from UniversalSegSlicer.results import ExistingSegmentsError  # noqa: E402
from UniversalSegSlicer.review import layer_voxel_counts  # noqa: E402

CT = "data/totalsegmentator/example_ct.nii.gz"
MR = "data/totalsegmentator/example_mr_sm.nii.gz"
CLASSES = (1, 6, 11)  # Spleen (taught: fat blob), Liver (taught: bright blob), Pancreas (taught: absent)
SPACING_MM = 4.0
BRIGHT_CENTRE, FAT_CENTRE, BODY_POINT = (11, 18, 18), (25, 16, 18), (18, 8, 26)


# ----------------------------------------------------------------------------------------- the test model
def _ellipsoid(shape, centre, radii):
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)) <= 1.0


def synthetic_ct() -> Volume:
    shape = (36, 36, 36)
    hounsfield = np.full(shape, -1000.0)
    hounsfield[_ellipsoid(shape, (18, 18, 18), (15, 14, 14))] = 40.0
    hounsfield[_ellipsoid(shape, BRIGHT_CENTRE, (5, 6, 6))] = 400.0
    hounsfield[_ellipsoid(shape, FAT_CENTRE, (4, 4, 5))] = -120.0
    hounsfield += np.random.default_rng(0).normal(0.0, 8.0, shape)
    affine = np.diag([SPACING_MM, SPACING_MM, SPACING_MM, 1.0])
    affine[:3, 3] = (-70.0, -80.0, -60.0)
    return Volume(array=hounsfield.astype(np.int16), affine=affine, source="synthetic CT", format="mrml")


def _train_small_model(volume: Volume, embeddings: np.ndarray):
    """Train a small U-Net Universal Model on the synthetic CT (about 60 steps on one 16^3 window)."""
    from UniversalSegLib.model import ModelConfig, UniversalModel
    from UniversalSegLib.preprocess import preprocess

    torch.manual_seed(0)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    prep = preprocess(volume.array, volume.affine, spacing=(8.0, 8.0, 8.0))
    assert max(prep.shape) <= 16  # one window holds the whole body
    hounsfield = prep.array * 425.0 - 175.0
    inside = tuple(slice(0, n) for n in prep.shape)
    image = torch.zeros((1, 1, 16, 16, 16))
    image[(0, 0) + inside] = torch.from_numpy(prep.array)
    target = torch.zeros((1, len(CLASSES), 16, 16, 16))
    target[(0, 1) + inside] = torch.from_numpy((hounsfield > 150).astype(np.float32))
    target[(0, 0) + inside] = torch.from_numpy(((hounsfield > -170) & (hounsfield < -50)).astype(np.float32))
    model = UniversalModel(ModelConfig.small("unet", num_classes=len(CLASSES)))
    model.organ_embedding.copy_(torch.from_numpy(embeddings))
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    weight = torch.tensor([10.0, 10.0, 1.0]).view(1, 3, 1, 1, 1)  # the blobs are small: weigh positives
    model.train()
    for _ in range(60):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(image), target, pos_weight=weight)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    torch.set_num_threads(previous_threads)
    return model


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    from UniversalSegLib.checkpoints import CheckpointMetadata, save_checkpoint
    from UniversalSegLib.inference import InferenceParameters
    from UniversalSegLib.preprocess import PreprocessingParameters
    from UniversalSegLib.taxonomy import Taxonomy

    taxonomy = get_taxonomy()
    clip = np.load(require_shared("reference/fixture/clip_txt_encoding_32x512.npy"))  # official label embeddings
    model = _train_small_model(synthetic_ct(), clip[[index - 1 for index in CLASSES]].astype(np.float32))
    metadata = CheckpointMetadata(
        model=model.config, classes=Taxonomy([taxonomy[i] for i in CLASSES]),
        preprocessing=PreprocessingParameters(spacing=(8.0, 8.0, 8.0)),
        inference=InferenceParameters(roi_size=(16, 16, 16), overlap=0.0),
        provenance={"origin": "trained by Testing/test_slicer_logic.py on a synthetic CT"}, license="test model")
    return save_checkpoint(tmp_path_factory.mktemp("model") / "small.safetensors", model.state_dict(), metadata)


@pytest.fixture
def headless():
    return headless_scene()


@pytest.fixture(scope="module")
def worker():
    """One worker process for the module's tests (as in Slicer: one per session, the model stays loaded)."""
    from UniversalSegLib.worker import WorkerProcess

    process = WorkerProcess()
    yield process
    process.stop()


@pytest.fixture
def logic(headless, worker):
    logic = SegmentationLogic(headless.scene, threads=1, worker=worker)
    yield logic
    logic.shutdown()


def _library_masks(model_path, volume: Volume, classes=None):
    from UniversalSegLib.pipeline import Segmenter

    return Segmenter(str(model_path), device="cpu", threads=1).segment(volume, classes).masks


def _scene_state(scene):
    """Everything a run could change: node IDs, and per segmentation its segments' IDs, names, voxels."""
    nodes = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
    state = {"nodes": sorted(node.GetID() for node in nodes)}
    for node in nodes:
        if node.IsA("vtkMRMLSegmentationNode"):
            segmentation = node.GetSegmentation()
            state[node.GetID()] = [(sid, segmentation.GetSegment(sid).GetName()) for sid in segmentation.GetSegmentIDs()]
            state[node.GetID() + " voxels"] = layer_voxel_counts(segmentation)
    return state


def _wait(job, seconds=120.0):
    assert job.wait(seconds), f"{job.description} did not finish in {seconds} s"
    return job


# ------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("variant", ["ras", "lps", "las_left_handed"])
def test_background_run_gives_the_library_masks_as_segments(small_model, reference_liver, headless, logic, tmp_path,
                                                           variant):
    source = nib.load(str(require_shared(CT)))
    data = np.asarray(source.dataobj)
    axes = {"ras": (), "lps": (0, 1), "las_left_handed": (0,)}[variant]
    flip, array = np.eye(4), data
    for axis in axes:
        flip[axis, axis], flip[axis, 3] = -1.0, data.shape[axis] - 1
        array = np.flip(array, axis)
    path = tmp_path / f"ct_{variant}.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(array), source.affine @ flip), str(path))
    node = headless.load_volume(path, "ct")

    progress = []
    job = logic.start_segmentation(node, None, small_model, device="cpu", on_progress=lambda s, f: progress.append(s))
    assert not job.done() or job.state is JobState.SUCCEEDED  # start_segmentation returns at once
    applied = logic.apply_result(_wait(job), node)
    assert {"load", "check", "preprocess", "inference", "postprocess", "invert"} <= set(progress)

    volume = volume_from_node(node)
    expected = _library_masks(small_model, volume)
    segmentation_node = applied.segmentation_node
    taxonomy = get_taxonomy()
    assert segmentation_node.GetNodeReferenceID(segmentation_node.GetReferenceImageGeometryReferenceRole()) == node.GetID()
    for index in CLASSES:
        segment_id = applied.segment_ids[index]
        segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
        assert segment.GetName() == taxonomy[index].display_name
        assert segment.GetTerminology() == taxonomy[index].terminology.to_slicer_string()
        np.testing.assert_allclose(segment.GetColor(), np.array(taxonomy[index].color) / 255.0, atol=1e-6)
        assert np.array_equal(mask_from_segment(segmentation_node, segment_id, node), expected[index]), index
    # the taught classes give real anatomy: "Liver" is bone (bright), "Spleen" fat; the absent class is empty
    liver, spleen = expected[6], expected[1]
    assert liver.sum() > 500 and spleen.sum() > 500 and expected[11].sum() == 0
    # (8 mm model grid: partial volume blurs both; soft tissue is ~40 HU; a flipped or shifted mask fails this)
    assert volume.array[liver].mean() > 100 and volume.array[spleen].mean() < volume.array[liver].mean() - 100
    # whatever the storage, the result is the same in world coordinates
    canonical = nib.as_closest_canonical(nib.Nifti1Image(liver.astype(np.uint8), volume.affine))
    assert np.array_equal(np.asarray(canonical.dataobj) > 0, reference_liver)

    # no closed surfaces unless asked (built on the main thread); the statistics table, from the worker's
    # measurement, matches the masks
    assert not segmentation_node.GetSegmentation().ContainsRepresentation("Closed surface")
    table = applied.table_node
    assert segmentation_node.GetNodeReference(STATISTICS_REFERENCE) is table
    rows = {table.GetCellText(r, 0): r for r in range(table.GetNumberOfRows())}
    voxel_ml = abs(np.linalg.det(volume.affine[:3, :3])) / 1000.0
    row = rows["Liver"]
    assert int(table.GetCellText(row, 3)) == liver.sum()
    assert float(table.GetCellText(row, 2)) == pytest.approx(liver.sum() * voxel_ml, rel=1e-3)
    assert float(table.GetCellText(row, 4)) == pytest.approx(volume.array[liver].mean(), abs=0.06)
    assert table.GetCellText(row, 5) == "unreviewed"
    # measured again from the segments' labelmap layers (what Accept and corrections refresh): the same
    from UniversalSegSlicer.statistics import segment_statistics

    again = {row.class_index: row for row in segment_statistics(segmentation_node, node)}
    for index in CLASSES:
        assert again[index].voxels == expected[index].sum()
        if expected[index].any():
            assert again[index].mean_hu == pytest.approx(volume.array[expected[index]].mean(), abs=1e-6)


@pytest.fixture(scope="module")
def reference_liver(small_model) -> np.ndarray:
    """The "Liver" mask of the shared CT as stored (RAS), by the library alone, in canonical orientation."""
    source = nib.load(str(require_shared(CT)))
    volume = Volume(array=np.asarray(source.dataobj), affine=source.affine, source="ct", format="nifti")
    mask = _library_masks(small_model, volume, ["liver"])[6]
    return np.asarray(nib.as_closest_canonical(nib.Nifti1Image(mask.astype(np.uint8), source.affine)).dataobj) > 0


def _synthetic_node(headless):
    return volume_node_from_volume(headless.scene, synthetic_ct(), "synthetic CT")


def test_existing_segments_stay_and_replacing_a_class_needs_confirmation(small_model, headless, logic):
    node = _synthetic_node(headless)
    segmentation_node = headless.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my work")
    user_mask = np.zeros((36, 36, 36), dtype=bool)
    user_mask[5:12, 5:9, 20:30] = True
    user_segment = slicer.vtkSegment()
    user_segment.SetName("My annotation")
    user_segment.SetColor(0.1, 0.2, 0.3)
    user_segment.AddRepresentation("Binary labelmap", oriented_image_from_mask(user_mask, affine_of_volume_node(node)))
    segmentation_node.GetSegmentation().AddSegment(user_segment, "mine")

    first = logic.apply_result(_wait(logic.start_segmentation(node, "liver, spleen", small_model, "cpu")), node,
                               segmentation_node)
    assert first.segmentation_node is segmentation_node and not first.created_node
    segmentation = segmentation_node.GetSegmentation()
    assert list(segmentation.GetSegmentIDs()) == ["mine", "spleen", "liver"]
    assert np.array_equal(mask_from_segment(segmentation_node, "mine", node), user_mask)

    # running "liver" again: refused until confirmed, and the refusal changes nothing
    job = _wait(logic.start_segmentation(node, ["Liver"], small_model, "cpu"))
    assert [c.display_name for c in logic.existing_classes(segmentation_node, job.result().classes)] == ["Liver"]
    logic.set_review_state(segmentation_node, "liver", "accepted")
    before = _scene_state(headless.scene)
    with pytest.raises(ExistingSegmentsError, match="already has a segment for Liver"):
        logic.apply_result(job, node, segmentation_node)
    assert _scene_state(headless.scene) == before
    replaced = logic.apply_result(job, node, segmentation_node, replace_existing=True)
    assert replaced.replaced == [6] and replaced.segment_ids == {6: "liver"}
    assert list(segmentation.GetSegmentIDs()) == ["mine", "spleen", "liver"]  # same place, same ID
    assert logic.review_states(segmentation_node)["liver"] == "unreviewed"  # a new result is unreviewed again
    user = segmentation.GetSegment("mine")
    assert user.GetName() == "My annotation" and user.GetColor() == pytest.approx((0.1, 0.2, 0.3))
    assert np.array_equal(mask_from_segment(segmentation_node, "mine", node), user_mask)


def test_a_segmentation_under_another_transform_gets_its_segments_on_the_anatomy(small_model, headless, logic):
    """The output segmentation sits under a linear transform the volume does not have: the new segments
    must still cover what the model saw (seen in world coordinates), and the statistics come from the
    worker's own measurement for them."""
    import vtk

    node = _synthetic_node(headless)
    transform = headless.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 20.0)
    shift.SetElement(2, 3, -7.5)
    transform.SetMatrixTransformToParent(shift)
    existing = headless.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "existing")
    existing.SetAndObserveTransformNodeID(transform.GetID())
    existing.GetSegmentation().AddEmptySegment("mine", "My annotation")
    job = _wait(logic.start_segmentation(node, "liver", small_model, "cpu"))
    applied = logic.apply_result(job, node, existing, show_3d=True)
    assert existing.GetTransformNodeID() == transform.GetID()  # the user's transform is left alone
    assert existing.GetSegmentation().ContainsRepresentation("Closed surface")  # 3D when asked for
    assert existing.GetDisplayNode().GetPreferredDisplayRepresentationName3D() == "Closed surface"

    # harden the transform: the segmentation is then in world coordinates, where the liver must match
    slicer.vtkSlicerTransformLogic.hardenTransform(existing)
    existing.SetReferenceImageGeometryParameterFromVolumeNode(node)
    expected = _library_masks(small_model, volume_from_node(node), ["liver"])[6]
    assert expected.any()
    assert np.array_equal(mask_from_segment(existing, applied.segment_ids[6], node), expected)
    table = applied.table_node
    rows = {table.GetCellText(r, 0): int(table.GetCellText(r, 3)) for r in range(table.GetNumberOfRows())}
    assert rows == {"My annotation": 0, "Liver": int(expected.sum())}


def test_a_failing_statistics_table_does_not_hide_that_the_segments_went_in(small_model, headless, logic,
                                                                           monkeypatch):
    node = _synthetic_node(headless)
    job = _wait(logic.start_segmentation(node, "liver", small_model, "cpu"))

    def broken(*args, **kwargs):
        raise RuntimeError("table node locked")

    monkeypatch.setattr(logic, "update_statistics_table", broken)
    applied = logic.apply_result(job, node)
    assert applied.segment_ids and applied.table_node is None
    assert applied.statistics_error == "table node locked"  # the panel says so instead of "nothing changed"
    assert applied.segmentation_node.GetSegmentation().GetSegment(applied.segment_ids[6]) is not None


def test_cancel_stops_within_seconds_and_leaves_the_scene_as_it_was(small_model, headless, logic):
    node = headless.load_volume(require_shared(CT), "ct")
    before = _scene_state(headless.scene)
    cancelled_at, started = [], threading.Event()
    holder = {}

    def on_progress(stage, fraction):  # runs in the worker thread, like a user pressing Cancel mid-run
        if stage == "inference" and not cancelled_at:
            started.wait(10)
            cancelled_at.append(time.monotonic())
            holder["job"].cancel()

    holder["job"] = job = logic.start_segmentation(node, None, small_model, "cpu", on_progress=on_progress)
    started.set()
    _wait(job)
    assert job.state is JobState.CANCELLED and cancelled_at
    assert job.finished_at - cancelled_at[0] < 0.1  # the panel is free at once
    deadline = time.monotonic() + 10
    while "worker_stopped_at" not in job.metadata and time.monotonic() < deadline:
        logic.worker.poll()
        time.sleep(0.02)
    assert job.metadata["worker_stopped_at"] - cancelled_at[0] < 1.0  # and the worker within a second
    with pytest.raises(JobCancelled):
        logic.apply_result(job, node)
    assert _scene_state(headless.scene) == before
    assert sorted(p.name for p in logic.worker.folder.iterdir()) == ["events.jsonl", "worker.log"]  # no leftovers


def test_failures_leave_the_scene_as_it_was_and_say_what_is_wrong(small_model, headless, logic, tmp_path):
    ct = _synthetic_node(headless)
    existing = headless.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "existing")
    logic.apply_result(_wait(logic.start_segmentation(ct, "liver", small_model, "cpu")), ct, existing)
    mr = headless.load_volume(require_shared(MR), "mr")
    before = _scene_state(headless.scene)

    job = _wait(logic.start_segmentation(mr, None, small_model, "cpu"))
    assert job.state is JobState.FAILED
    assert type(job.error).__name__ == "NotCTError" and "Hounsfield" in plain_message(job.error)
    with pytest.raises(Exception, match="Hounsfield"):
        logic.apply_result(job, mr, existing)

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(Path(small_model).read_bytes()[: Path(small_model).stat().st_size // 2])
    job = _wait(logic.start_segmentation(ct, None, truncated, "cpu"))
    assert job.state is JobState.FAILED and type(job.error).__name__ == "CheckpointError"
    assert "truncated" in plain_message(job.error)
    assert _scene_state(headless.scene) == before


def test_click_to_select_names_the_class_and_never_reruns_the_network(small_model, headless, logic):
    node = _synthetic_node(headless)
    ijk_to_ras = affine_of_volume_node(node)

    def ras(ijk):
        return (ijk_to_ras @ np.array([*ijk, 1.0]))[:3]

    assert logic.classes_at(node, ras(BRIGHT_CENTRE), small_model) is None  # nothing cached yet
    job = _wait(logic.start_prediction(node, small_model, "cpu"))
    assert job.state is JobState.SUCCEEDED
    requests = logic.worker.requests_sent

    hits = logic.classes_at(node, ras(BRIGHT_CENTRE), small_model)
    assert [hit.info.display_name for hit in hits] == ["Liver"] and hits[0].probability > 0.5
    assert [hit.info.display_name for hit in logic.classes_at(node, ras(FAT_CENTRE), small_model)] == ["Spleen"]
    assert logic.classes_at(node, ras(BODY_POINT), small_model) == []
    assert logic.classes_at(node, ras((0, 0, 0)), small_model) == []  # air, outside the body crop
    for _ in range(5):
        logic.classes_at(node, ras(BRIGHT_CENTRE), small_model)

    applied = logic.add_predicted_class(node, 6, small_model)
    segmentation_node = applied.segmentation_node
    expected = _library_masks(small_model, volume_from_node(node))  # its own Segmenter: not counted
    assert np.array_equal(mask_from_segment(segmentation_node, applied.segment_ids[6], node), expected[6])
    logic.add_predicted_class(node, 1, small_model, segmentation_node)
    assert logic.remove_class_segment(segmentation_node, 6)
    assert list(segmentation_node.GetSegmentation().GetSegmentIDs()) == ["spleen"]
    assert logic.worker.requests_sent == requests  # clicks, adds and removals never asked the worker

    # new voxels in the volume: the cached prediction no longer applies
    slicer.util.arrayFromVolume(node)[0, 0, 0] = 0
    slicer.util.arrayFromVolumeModified(node)
    assert logic.classes_at(node, ras(BRIGHT_CENTRE), small_model) is None


def test_review_states_follow_real_segment_editor_edits(small_model, headless, logic):
    node = _synthetic_node(headless)
    applied = logic.apply_result(_wait(logic.start_segmentation(node, None, small_model, "cpu")), node)
    segmentation_node = applied.segmentation_node
    assert logic.review_states(segmentation_node) == {"spleen": "unreviewed", "liver": "unreviewed",
                                                      "pancreas": "unreviewed"}
    logic.set_review_state(segmentation_node, "spleen", "accepted")
    logic.set_review_state(segmentation_node, "pancreas", "accepted")

    # paint into "liver" with Slicer's segment editor logic (what Paint/Draw/Islands... call)
    editor, editor_node = segment_editor(headless, segmentation_node, node)
    stroke = np.zeros((36, 36, 36), dtype=bool)
    stroke[14:17, 14:17, 14:17] = True
    modifier = oriented_image_from_mask(stroke, affine_of_volume_node(node), crop=False)
    editor_node.SetSelectedSegmentID("liver")
    editor.ModifySegmentByLabelmap(segmentation_node, "liver", modifier, editor.ModificationModeAdd, False, False)
    assert logic.review_states(segmentation_node) == {"spleen": "accepted", "liver": "corrected",
                                                      "pancreas": "accepted"}

    # painting "liver" over the spleen with "overwrite other segments" erases spleen voxels: corrected too
    spleen = mask_from_segment(segmentation_node, "spleen", node)
    over = np.zeros_like(spleen)
    over[tuple(np.argwhere(spleen)[0])] = True
    editor_node.SetOverwriteMode(editor_node.OverwriteAllSegments)
    editor.ModifySegmentByLabelmap(segmentation_node, "liver",
                                   oriented_image_from_mask(over, affine_of_volume_node(node), crop=False),
                                   editor.ModificationModeAdd, False, False)
    assert mask_from_segment(segmentation_node, "spleen", node).sum() == spleen.sum() - 1
    assert logic.review_states(segmentation_node)["spleen"] == "corrected"
    assert logic.review_states(segmentation_node)["pancreas"] == "accepted"  # untouched

    # states are segment tags: they survive .seg.nrrd storage
    statistics = logic.update_statistics_table(segmentation_node, node)
    assert statistics is segmentation_node.GetNodeReference(STATISTICS_REFERENCE)
    assert {statistics.GetCellText(r, 0): statistics.GetCellText(r, 5) for r in range(3)} == {
        "Spleen": "corrected", "Liver": "corrected", "Pancreas": "accepted"}


def test_export_for_training_round_trips_into_the_training_reader(small_model, headless, logic, tmp_path):
    node = headless.load_volume(require_shared(CT), "ct")
    applied = logic.apply_result(_wait(logic.start_segmentation(node, None, small_model, "cpu")), node)
    segmentation_node = applied.segmentation_node
    with pytest.raises(ExportError, match="no segment has been reviewed"):
        logic.export_for_training(node, segmentation_node, tmp_path, "case_1")
    logic.set_review_state(segmentation_node, "liver", "accepted")
    logic.set_review_state(segmentation_node, "pancreas", "corrected")  # reviewed: checked and absent

    path = logic.export_for_training(node, segmentation_node, tmp_path, "case_1")
    case = read_training_case(path)
    assert case.annotated == (6, 11) and case.review == {6: "accepted", 11: "corrected"}
    volume = volume_from_node(node)
    assert np.array_equal(case.image, volume.array)
    np.testing.assert_allclose(case.affine, volume.affine, atol=1e-5)
    assert np.array_equal(case.class_mask(6), mask_from_segment(segmentation_node, "liver", node))
    assert not case.class_mask(11).any()
    assert not case.is_annotated(1)  # unreviewed "Spleen" is unknown for training, not background
    assert "UniversalSeg Slicer module" in case.source["tool"]
    with pytest.raises(FileExistsError):
        logic.export_for_training(node, segmentation_node, tmp_path, "case_1")


def test_parameters_live_in_the_scenes_parameter_node(headless):
    node = headless.scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "UniversalSeg")
    assert ModuleParameters.read(node) == ModuleParameters()
    volume = _synthetic_node(headless)
    chosen = ModuleParameters(input_volume_id=volume.GetID(), classes=["liver", "liver_tumor"], model="unet",
                              device="cpu", show_3d=False, mode="fast", runtime="openvino")
    chosen.write(node)
    assert ModuleParameters.read(node) == chosen


def test_runtime_choice_reaches_the_segmenter(small_model, headless, logic, tmp_path, monkeypatch):
    pytest.importorskip("openvino")
    monkeypatch.setenv("UNIVERSALSEG_HOME", str(tmp_path / "home"))  # the conversion cache
    node = _synthetic_node(headless)
    progress = []
    _wait(logic.start_segmentation(node, "liver", small_model, "cpu", on_progress=lambda s, f: progress.append(s),
                                   runtime="openvino"))
    assert logic.last_run["runtime"] == "openvino"
    assert "convert" in progress and progress.index("convert") < progress.index("inference")


def test_estimate_scales_with_the_image_and_the_device(headless, logic):
    node = headless.load_volume(require_shared(CT), "ct")
    cpu = logic.estimate(node, "cpu", runtime="torch")
    gpu = logic.estimate(node, "cuda")
    assert cpu.windows == gpu.windows > 10
    assert cpu.seconds > 20 * gpu.seconds and cpu.ram_gb > 2 and gpu.gpu_gb > 1
    assert "windows" in cpu.text() and "GPU memory" in gpu.text()
    fast = logic.estimate(node, "cpu", mode="fast", runtime="torch")
    assert fast.windows < cpu.windows and fast.seconds < cpu.seconds
    # The runtime the run will use, by the library's rule: "auto" is OpenVINO on a CPU here (installed),
    # except in the reference mode; an impossible choice (OpenVINO on a GPU) estimates the PyTorch run.
    # conftest sets UNIVERSALSEG_RUNTIME=torch for the whole suite, so "auto" is passed explicitly here.
    auto = logic.estimate(node, "cpu", runtime="auto")
    assert auto.windows == cpu.windows
    assert auto.seconds / cpu.seconds == pytest.approx(OPENVINO_SECONDS_PER_WINDOW["swinunetr"]
                                                       / SECONDS_PER_WINDOW[("swinunetr", "cpu")])
    assert logic.estimate(node, "cpu", mode="reference", runtime="auto").seconds == pytest.approx(cpu.seconds)
    assert logic.estimate(node, "cuda", runtime="openvino").seconds == pytest.approx(gpu.seconds)


def test_fast_mode_runs_from_the_module_logic(small_model, headless, logic):
    """The mode chosen in the module reaches the library: the fast run has its own (cached) segmenter and
    gives segments on the volume like a default run."""
    node = headless.load_volume(require_shared(CT), "ct")
    default = _wait(logic.start_segmentation(node, "liver, spleen", small_model, "cpu"))
    fast = _wait(logic.start_segmentation(node, "liver, spleen", small_model, "cpu", mode="fast"))
    assert fast.result().info["model_loaded"] and fast.result().info["mode"] == "fast"  # its own segmenter
    applied = logic.apply_result(fast, node)
    names = [applied.segmentation_node.GetSegmentation().GetNthSegment(i).GetName()
             for i in range(applied.segmentation_node.GetSegmentation().GetNumberOfSegments())]
    assert sorted(names) == ["Liver", "Spleen"]
    assert default.result().result.masks.keys() == fast.result().result.masks.keys()
