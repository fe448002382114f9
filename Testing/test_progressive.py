"""Progressive display: on a CPU the worker sends the fast layout's result first, then the exact one.

Real worker processes, the packaged demo model (a small U-Net Universal Model) on the example CT, real MRML
from the slicer-core wheel. Checked: the preview arrives before the result; the preview's masks equal an
in-process fast-mode run and the result's masks an in-process default-mode run, voxel for voxel; one model
load and (OpenVINO) one converted network serve both phases; no preview when not asked for, in the fast
mode, or on a GPU; cancel after the preview; in the Slicer logic the preview segments are marked, replaced
by the exact ones in one step, and a preview segment a person edited is kept.
"""
from __future__ import annotations

import sys
import time

import numpy as np
import pytest

from conftest import REPO_ROOT, require_shared, segment_editor

pytest.importorskip("torch")
nib = pytest.importorskip("nibabel")

from UniversalSegLib.io.volume import Volume  # noqa: E402
from UniversalSegLib.worker import WorkerProcess, read_result  # noqa: E402
from UniversalSegLib.worker.protocol import write_volume  # noqa: E402
from UniversalSegLib.worker.server import wants_preview  # noqa: E402

DEMO_MODEL = REPO_ROOT / "UniversalSegLib" / "data" / "demo" / "demo_model.safetensors"
CT = "data/totalsegmentator/example_ct.nii.gz"
SPLEEN_INDEX = 1  # class index in the official table (the demo model's)


def _runtime() -> str:
    """OpenVINO when installed (where the two phases must share one compiled network), else PyTorch."""
    from UniversalSegLib.runtime import openvino_version

    return "openvino" if openvino_version() is not None else "torch"


@pytest.fixture(scope="module")
def ct() -> Volume:
    image = nib.load(require_shared(CT))
    return Volume(np.asarray(image.dataobj).astype(np.int16), image.affine.astype(np.float64), "example CT", "nifti")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A fresh UniversalSeg home (OpenVINO's conversion cache) for this module and its workers."""
    path = tmp_path_factory.mktemp("home")
    patch = pytest.MonkeyPatch()
    patch.setenv("UNIVERSALSEG_HOME", str(path))
    yield path
    patch.undo()


@pytest.fixture(scope="module")
def worker(home):
    process = WorkerProcess()
    yield process
    process.stop()


def _paused_worker(tmp_path_factory, point: str):
    """A worker that pauses at ``point`` (the library's test hook; it writes the point's name to a marker
    file, then waits up to 60 s or until the request is cancelled), so a cancel lands at a known moment
    however fast the machine runs the demo model."""
    marker = tmp_path_factory.mktemp("pause") / "paused"
    process = WorkerProcess(environment={"UNIVERSALSEG_TEST_PAUSE_AT": point,
                                         "UNIVERSALSEG_TEST_PAUSE_FILE": str(marker),
                                         "UNIVERSALSEG_TEST_PAUSE_SECONDS": "60"})
    return process, marker


@pytest.fixture(scope="module")
def worker_paused_after_preview(home, tmp_path_factory):
    process, _ = _paused_worker(tmp_path_factory, "worker-after-preview")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def worker_paused_before_preview(home, tmp_path_factory):
    process, marker = _paused_worker(tmp_path_factory, "worker-before-preview")
    yield process, marker
    process.stop()


def _send(worker: WorkerProcess, volume: Volume, runtime: str | None = None, **fields) -> tuple[str, list]:
    events: list = []
    request_id = worker.new_request_id()
    name = write_volume(worker.folder, request_id, volume.array)
    worker.send(request_id, "segment", events.append, volume=name, affine=volume.affine.tolist(),
                model=str(DEMO_MODEL), device="cpu", threads=1, runtime=runtime or _runtime(), **fields)
    return request_id, events


def _wait(worker: WorkerProcess, events: list, until=("result", "error", "cancelled", "died"), seconds=120.0):
    """The first event of a kind in ``until``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        worker.poll()
        found = [e for e in events if e["event"] in until]
        if found:
            return found[0]
        time.sleep(0.01)
    raise AssertionError(f"no {until} in {seconds} s: {events[-3:]}")


def test_preview_comes_first_with_the_fast_masks_then_the_exact_ones(worker, ct):
    from UniversalSegLib.pipeline import Segmenter

    _, events = _send(worker, ct, progressive=True)
    answer = _wait(worker, events)
    assert answer["event"] == "result", answer
    kinds = [e["event"] for e in events]
    assert kinds.count("preview") == 1 and kinds.index("preview") < kinds.index("result")
    preview = events[kinds.index("preview")]
    assert preview["mode"] == "fast" and answer["mode"] == "default" and answer["progressive"]
    # progress says which phase; the model is loaded once and (OpenVINO) the network converted once
    phases = [e.get("phase") for e in events if e["event"] == "progress" and e["stage"] == "inference"]
    assert phases[0] == "preview" and phases[-1] == "exact" and phases == sorted(phases, key=["preview", "exact"].index)
    assert answer["model_loads"] == 1 and answer["model_loaded"]
    assert answer["runtime"] == _runtime()
    if answer["runtime"] == "openvino":
        converts = [e for e in events if e["event"] == "progress" and e["stage"] == "convert" and e["fraction"] == 0.0]
        assert [e["phase"] for e in converts] == ["preview"]  # the exact phase reuses the compiled network

    quick = read_result(worker.folder / preview["output"])
    exact = read_result(worker.folder / answer["output"])
    expected_fast = Segmenter(str(DEMO_MODEL), device="cpu", threads=1, runtime=_runtime(), mode="fast").segment(ct)
    expected_exact = Segmenter(str(DEMO_MODEL), device="cpu", threads=1, runtime=_runtime()).segment(ct)
    assert sorted(quick.masks) == sorted(exact.masks) == sorted(c.index for c in expected_exact.classes)
    differ = 0
    for index in exact.masks:
        assert np.array_equal(quick.masks[index], expected_fast.masks[index]), index
        assert np.array_equal(exact.masks[index], expected_exact.masks[index]), index
        differ += int(np.count_nonzero(quick.masks[index] != exact.masks[index]))
    assert differ > 0  # the two layouts really differ on this CT (the preview is not the exact result)
    assert {row["index"]: row["voxels"] for row in preview["statistics"]} == {
        row.index: row.voxels for row in expected_fast.statistics()}
    print(f"\nprogressive demo run: preview after {preview['seconds']:.2f} s, result after {answer['seconds']:.2f} s "
          f"({answer['runtime']}); {differ} voxels differ between the layouts")
    worker.discard(preview["output"])
    worker.discard(answer["output"])


def test_no_preview_when_not_asked_in_the_fast_mode_or_on_a_gpu(worker, ct):
    for fields in ({"progressive": False}, {"progressive": True, "mode": "fast"}):
        _, events = _send(worker, ct, classes=[1], **fields)
        assert _wait(worker, events)["event"] == "result"
        assert "preview" not in [e["event"] for e in events], fields
        assert not any("phase" in e for e in events)
    # the decision itself: a GPU's exact run takes seconds, a preview would only delay it
    assert wants_preview(True, "cpu", "default")
    assert not wants_preview(True, "cuda", "default") and not wants_preview(True, "cpu", "reference")
    assert not wants_preview(False, "cpu", "default")


def test_cancel_in_either_phase_stops_the_run(worker_paused_after_preview, worker_paused_before_preview, ct):
    # after the quick result was sent, before the exact run: cancelled, no result, the preview's file whole
    worker = worker_paused_after_preview
    request_id, events = _send(worker, ct, runtime="torch", progressive=True)
    preview = _wait(worker, events, until=("preview",))
    worker.cancel(request_id)
    final = _wait(worker, events)
    assert final["event"] == "cancelled", final
    assert "result" not in [e["event"] for e in events]
    assert read_result(worker.folder / preview["output"]).masks
    worker.discard(preview["output"])
    # in the preview phase (its windows done, the quick result not sent yet): no preview, no result
    worker, marker = worker_paused_before_preview
    request_id, events = _send(worker, ct, runtime="torch", progressive=True)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert time.monotonic() < deadline, events[-3:]
        worker.poll()
        time.sleep(0.01)
    worker.cancel(request_id)
    assert _wait(worker, events)["event"] == "cancelled"
    assert "preview" not in [e["event"] for e in events]
    assert {e.get("phase") for e in events if e["event"] == "progress"} <= {None, "preview"}
    # and the worker serves the next request with the same model
    _, events = _send(worker, ct, runtime="torch", classes=[1])
    assert not _wait(worker, events)["model_loaded"]


def test_the_segmenter_runs_another_streaming_mode_per_call(ct):
    from UniversalSegLib.errors import UsageError
    from UniversalSegLib.pipeline import Segmenter

    segmenter = Segmenter(str(DEMO_MODEL), device="cpu", threads=1, runtime="torch")
    fast = segmenter.segment(ct, "spleen, liver", mode="fast")
    exact = segmenter.segment(ct, "spleen, liver")
    assert fast.windows < exact.windows and segmenter.mode.name == "default"
    with pytest.raises(UsageError, match="reference"):
        segmenter.segment(ct, "spleen", mode="reference")
    with pytest.raises(UsageError, match="Unknown mode"):
        segmenter.segment(ct, "spleen", mode="quick")


# ------------------------------------------------------------------------------------------ Slicer logic
@pytest.fixture
def scene_logic(worker):
    pytest.importorskip("slicer", reason="the slicer-core wheel is needed for MRML tests")
    sys.path.insert(0, str(REPO_ROOT / "UniversalSeg"))
    from UniversalSegLib.mrml import headless_scene
    from UniversalSegSlicer.logic import SegmentationLogic

    headless = headless_scene()
    logic = SegmentationLogic(headless.scene, threads=1, worker=worker)
    yield headless, logic
    logic.shutdown()


def _segment_names(segmentation_node) -> dict:
    segmentation = segmentation_node.GetSegmentation()
    return {sid: segmentation.GetSegment(sid).GetName() for sid in segmentation.GetSegmentIDs()}


def test_logic_shows_the_preview_then_replaces_it_keeping_edits_and_other_segments(scene_logic, ct):
    from UniversalSegLib.mrml import affine_of_volume_node, mask_from_segment, oriented_image_from_mask
    from UniversalSegSlicer.results import preview_mode

    headless, logic = scene_logic
    node = headless.load_volume(require_shared(CT), "ct")
    # a segmentation that already holds a segment of the user's own
    output = headless.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    output.SetReferenceImageGeometryParameterFromVolumeNode(node)
    own = np.zeros(ct.shape, bool)
    own[10:20, 10:20, 10:20] = True
    output.AddSegmentFromBinaryLabelmapRepresentation(
        oriented_image_from_mask(own, affine_of_volume_node(node), crop=False), "My notes", [1.0, 0.0, 0.0])
    notes_id = output.GetSegmentation().GetSegmentIdBySegmentName("My notes")

    arrived = []
    job = logic.start_segmentation(node, "liver, spleen, right kidney", DEMO_MODEL, "cpu", progressive=True,
                                   on_preview=arrived.append)
    assert job.wait(120) and job.preview() is not None and arrived == [job.preview()]
    quick = dict(job.preview().result.masks)  # apply_preview drops them from the job (memory)
    shown = logic.apply_preview(job, node, output)
    assert logic.apply_preview(job, node, output) is None  # shown once
    assert not job.preview().result.masks
    segmentation = output.GetSegmentation()
    names = _segment_names(output)
    assert names[notes_id] == "My notes"
    preview_ids = dict(shown.segment_ids)
    assert sorted(names[sid] for sid in preview_ids.values()) == [
        "Liver (quick result)", "Right Kidney (quick result)", "Spleen (quick result)"]
    assert all(preview_mode(segmentation.GetSegment(sid)) == "fast" for sid in preview_ids.values())
    for index, sid in preview_ids.items():
        assert np.array_equal(mask_from_segment(output, sid, node), quick[index]), index

    # a person edits the liver preview (Segment Editor logic, as Paint does) before the exact result is applied
    liver = next(i for i, info in enumerate(job.preview().classes) if info.key == "liver")
    liver_index = job.preview().classes[liver].index
    editor, _ = segment_editor(headless, output, node)
    stroke = np.zeros(ct.shape, bool)
    stroke[60:63, 50:53, 50:53] = True
    editor.ModifySegmentByLabelmap(output, preview_ids[liver_index],
                                   oriented_image_from_mask(stroke, affine_of_volume_node(node), crop=False),
                                   editor.ModificationModeAdd, False, False)
    edited = mask_from_segment(output, preview_ids[liver_index], node)
    assert np.array_equal(edited, quick[liver_index] | stroke)

    applied = logic.apply_result(job, node)  # no node given: the preview's
    assert applied.segmentation_node is output
    exact = job.result().result.masks
    assert applied.kept_previews == {liver_index: preview_ids[liver_index]}
    names = _segment_names(output)
    assert names[notes_id] == "My notes" and np.array_equal(mask_from_segment(output, notes_id, node), own)
    assert len(names) == 4  # notes, the kept liver preview, spleen and kidney: no duplicates
    for index, sid in preview_ids.items():
        segment = segmentation.GetSegment(sid)
        if index == liver_index:  # kept as edited, still marked as the quick result
            assert preview_mode(segment) == "fast" and names[sid] == "Liver (quick result)"
            assert np.array_equal(mask_from_segment(output, sid, node), edited)
        else:  # replaced in place: same ID, the exact mask, no preview mark
            assert applied.segment_ids[index] == sid and not preview_mode(segment)
            assert "quick result" not in names[sid]
            assert np.array_equal(mask_from_segment(output, sid, node), exact[index]), index


def test_logic_cancel_after_the_preview_keeps_it_marked(worker_paused_after_preview):
    pytest.importorskip("slicer", reason="the slicer-core wheel is needed for MRML tests")
    sys.path.insert(0, str(REPO_ROOT / "UniversalSeg"))
    from UniversalSegLib.mrml import headless_scene
    from UniversalSegSlicer.jobs import PREVIEW_SHOWN_TEXT, JobCancelled, JobState
    from UniversalSegSlicer.logic import SegmentationLogic
    from UniversalSegSlicer.results import preview_mode

    headless = headless_scene()
    # the worker pauses between the quick result and the exact run, so the cancel lands in the exact phase
    logic = SegmentationLogic(headless.scene, threads=1, worker=worker_paused_after_preview)
    try:
        node = headless.load_volume(require_shared(CT), "ct")
        files = sorted(p.name for p in logic.worker.folder.iterdir())
        # the user's liver segment (from an earlier run, maybe corrected); the run below is meant to replace it
        output = logic.segment(node, "liver", DEMO_MODEL, "cpu", runtime="torch").segmentation_node
        own_liver = output.GetSegmentation().GetSegmentIdBySegmentName("Liver")
        job = logic.start_segmentation(node, "liver, spleen", DEMO_MODEL, "cpu", runtime="torch", progressive=True)
        deadline = time.monotonic() + 120
        while job.preview() is None and not job.done():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert job.preview() is not None and not job.finished, "the exact run ended with its preview"
        shown = logic.apply_preview(job, node, output)
        assert shown.segmentation_node is output and list(shown.segment_ids) == [SPLEEN_INDEX], \
            "a preview never replaces an existing segment"
        assert job.status_text.startswith(PREVIEW_SHOWN_TEXT) and job.phase == "exact"
        job.cancel()
        assert job.state is JobState.CANCELLED
        with pytest.raises(JobCancelled):
            logic.apply_result(job, node)
        segmentation = shown.segmentation_node.GetSegmentation()
        assert sorted(segmentation.GetSegment(sid).GetName() for sid in segmentation.GetSegmentIDs()) == [
            "Liver", "Spleen (quick result)"]
        assert segmentation.GetSegment(own_liver) is not None and not preview_mode(segmentation.GetSegment(own_liver))
        assert logic.unfinished_note(job).startswith(" The quick result stays")
        deadline = time.monotonic() + 30
        while "worker_stopped_at" not in job.metadata and time.monotonic() < deadline:
            logic.worker.poll()
            time.sleep(0.02)
        assert sorted(p.name for p in logic.worker.folder.iterdir()) == files  # the job left no files behind
    finally:
        logic.shutdown()


def test_logic_without_progressive_gets_no_preview_and_the_choice_is_a_parameter(scene_logic):
    from UniversalSegSlicer.parameters import ModuleParameters

    headless, logic = scene_logic
    node = headless.load_volume(require_shared(CT), "ct")
    job = logic.start_segmentation(node, "liver", DEMO_MODEL, "cpu")
    assert job.wait(120) and job.preview() is None and logic.apply_preview(job, node) is None
    assert [s for s in _segment_names(logic.apply_result(job, node).segmentation_node).values()] == ["Liver"]

    parameters = headless.scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "UniversalSeg")
    assert ModuleParameters.read(parameters).progressive is None  # not chosen: follows the device
    for choice in (True, False):
        ModuleParameters(progressive=choice).write(parameters)
        assert ModuleParameters.read(parameters).progressive is choice
    assert logic.progressive_default("cpu") and not logic.progressive_default("cuda")
