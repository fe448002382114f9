"""Batch review in the Slicer module's logic, on real MRML (slicer-core wheel): a real batch of the demo
model on small phantoms is opened, its queue listed, cases loaded (CT, segments, stored probabilities),
clicked without a worker, moved through in queue order and exported where training reads it."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT

slicer = pytest.importorskip("slicer", reason="the slicer-core wheel is needed for MRML tests")
slicerio = pytest.importorskip("slicerio")

sys.path.insert(0, str(REPO_ROOT / "UniversalSeg"))

from test_batch import options, write_phantom  # noqa: E402

from UniversalSegLib.batch.corrections import correction_paths  # noqa: E402
from UniversalSegLib.batch.queue import read_queue_csv  # noqa: E402
from UniversalSegLib.batch.run import run_batch  # noqa: E402
from UniversalSegLib.errors import InputNotFoundError  # noqa: E402
from UniversalSegLib.io import read_volume  # noqa: E402
from UniversalSegLib.mrml import headless_scene, mask_from_segment, volume_from_node  # noqa: E402
from UniversalSegLib.taxonomy import get_taxonomy  # noqa: E402
from UniversalSegSlicer.batch_review import TAG_REASON_SEPARATOR, TAG_REASONS, BatchReview  # noqa: E402
from UniversalSegSlicer.clickselect import PROBABILITY_CUT  # noqa: E402
from UniversalSegSlicer.logic import SegmentationLogic  # noqa: E402
from UniversalSegSlicer.review import review_state  # noqa: E402

MODULE_DIR = REPO_ROOT / "UniversalSeg"


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """A finished batch of three phantom cases (demo model, 48^3 voxels: a few seconds)."""
    root = tmp_path_factory.mktemp("batch_review")
    (root / "ct").mkdir()
    for seed in range(3):
        write_phantom(root / "ct" / f"case{seed}.nii.gz", seed)
    summary = run_batch([str(root / "ct")], options(root / "out"))
    assert summary.done == 3 and not summary.failed
    return root / "out"


@pytest.fixture
def review(batch):
    headless = headless_scene()
    logic = SegmentationLogic(headless.scene, threads=1)
    yield BatchReview(logic, batch)
    logic.shutdown()


def _segment_tag(segment, name):
    import vtk

    value = vtk.mutable("")
    return str(value) if segment.GetTag(name, value) else None


def test_queue_in_priority_order_with_reasons(review, batch):
    entries = read_queue_csv(batch / "review_queue.csv")
    first_seen = list(dict.fromkeys(e.case for e in entries))
    assert [c.case_id for c in review.cases] == first_seen and len(first_seen) == 3
    priorities = [c.priority for c in review.cases]
    assert priorities == sorted(priorities, reverse=True) and priorities[0] > 0
    worst = entries[0]
    assert review.cases[0].top_reasons == [f"{worst.name}: {r}" for r in worst.reasons] and worst.reasons
    with pytest.raises(InputNotFoundError, match="not a batch folder"):
        BatchReview(review.logic, batch / "case0")


def test_load_case_click_next_and_export_for_training(review, batch):
    first, second = review.cases[0], review.cases[1]
    loaded = review.load_case(first.case_id)
    folder = batch / first.case_id

    # CT: the input as the batch read it (voxels and grid)
    expected = read_volume(first.input)
    ct = volume_from_node(loaded.volume_node)
    np.testing.assert_array_equal(ct.array, expected.array)
    np.testing.assert_allclose(ct.affine, expected.affine, atol=1e-6)

    # segments: the batch's .seg.nrrd, read here by an independent reader (slicerio), voxel for voxel
    written = slicerio.read_segmentation(str(folder / f"{first.case_id}.seg.nrrd"))
    ijk_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(written["ijkToLPS"])
    np.testing.assert_allclose(ijk_to_ras, expected.affine, atol=1e-4)
    segmentation = loaded.segmentation_node.GetSegmentation()
    taxonomy = get_taxonomy()
    assert len(loaded.applied.segment_ids) == len(written["segments"]) > 5
    for index, segment_id in loaded.applied.segment_ids.items():
        key = taxonomy[index].key
        assert np.array_equal(mask_from_segment(loaded.segmentation_node, segment_id, loaded.volume_node),
                              slicerio.segment_mask(written, key).astype(bool)), key
        segment = segmentation.GetSegment(segment_id)
        assert review_state(segment) == "unreviewed"
        reasons = first.classes[taxonomy[index].display_name][1]
        assert review.reasons(segment_id) == reasons
        assert _segment_tag(segment, TAG_REASONS) == TAG_REASON_SEPARATOR.join(reasons)
    assert any(review.reasons(s) for s in loaded.applied.segment_ids.values())

    # click-to-select from the stored probabilities: the liver's centre, no worker started
    liver = taxonomy.by_key("liver").index
    mask = mask_from_segment(loaded.segmentation_node, loaded.applied.segment_ids[liver], loaded.volume_node)
    voxel = np.argwhere(mask)[len(np.argwhere(mask)) // 2]
    ras = (expected.affine @ np.append(voxel, 1.0))[:3]
    with np.load(folder / f"{first.case_id}_probabilities.npz") as stored:
        grid = np.rint((np.linalg.inv(stored["affine"]) @ np.append(ras, 1.0))[:3]).astype(int)
        wanted = {int(i) for i, p in zip(stored["class_indices"], stored["probabilities"])
                  if p[tuple(grid)] >= PROBABILITY_CUT}
    hits = review.logic.classes_at(loaded.volume_node, ras, model=None)
    assert {hit.info.index for hit in hits} == wanted and liver in wanted
    assert review.logic.worker.process is None  # answered from the files: no network, no worker

    # next case: queue order
    assert review.next_case() is second
    # export the reviewed liver where training reads a batch's corrections
    review.logic.set_review_state(loaded.segmentation_node, loaded.applied.segment_ids[liver], "corrected")
    path = review.export()
    assert path == correction_paths(batch, first.case_id)["json"] and review.is_exported(first.case_id)
    from universalseg_training.assembly import load_case
    from universalseg_training.spec import load_dataset_spec

    spec_file = batch.parent / "corrected.yaml"
    spec_file.write_text(f"name: corrected\nbatch: {batch}\n")
    spec = load_dataset_spec(spec_file)
    assert [c.case_id for c in spec.cases] == [first.case_id]
    case = load_case(spec, spec.cases[0])
    assert case.annotated == (liver,)
    np.testing.assert_array_equal(case.class_mask(liver), mask)

    second_loaded = review.load_next()
    assert second_loaded.case is second and not review.logic.scene.IsNodePresent(loaded.volume_node)
    # a new review of the folder skips the exported case
    assert BatchReview(review.logic, batch).next_case().case_id == second.case_id


def test_loading_a_case_imports_no_torch(batch):
    """Slicer's process stays free of PyTorch and MONAI while a batch case is opened and clicked."""
    code = ("import sys; from UniversalSegLib.mrml import headless_scene; "
            "from UniversalSegSlicer.logic import SegmentationLogic; "
            "from UniversalSegSlicer.batch_review import BatchReview; "
            f"r = BatchReview(SegmentationLogic(headless_scene().scene), {str(batch)!r}); "
            "c = r.load_case(r.cases[-1].case_id); "
            "assert r.logic.classes_at(c.volume_node, [0, 0, 0], None) is not None; "
            "heavy = [m for m in ('torch', 'monai') if m in sys.modules]; assert not heavy, heavy")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(MODULE_DIR)])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO_ROOT)


def test_a_moved_batch_folder_opens_and_a_missing_ct_is_named(review, batch, tmp_path):
    """Batches run on a cluster are reviewed elsewhere: outputs are found in the folder as it is now."""
    import shutil

    moved = tmp_path / "copied_batch"
    shutil.copytree(batch, moved)
    copy = BatchReview(review.logic, moved)
    case = copy.cases[-1]
    loaded = copy.load_case(case.case_id)
    assert loaded.volume_node is not None and loaded.applied.segment_ids
    case.input = str(tmp_path / "gone.nii.gz")
    with pytest.raises(InputNotFoundError, match="is not there any more"):
        copy.load_case(case.case_id)
    assert copy.current is loaded  # a failed load leaves the loaded case as it was
    with pytest.raises(KeyError, match="not in the review queue"):
        copy.load_case("no-such-case")
