"""End to end in a real browser: ``universalseg review`` from a CT to an exported training case.

The test starts the review server as a subprocess on a temporary folder holding the small real CT
(TotalSegmentator's ``example_ct_sm``, 122x101x30 voxels at 3 mm), opens the page in Debian's chromium
(Playwright), opens the CT from the folder list, runs the packaged demo model on two classes through the
worker process, checks the two segments in the segment list and in the rendered slice view (a screenshot
with the overlay's colours, not a blank image), accepts one, exports the case, and reads the export back
the way the training package reads exported cases (a dataset spec with ``case_files``). A second export
must ask before replacing the first; a second browser window is shut out until it takes over. Stopping
the server (SIGINT) must release the case lock.
"""
from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pytest

from browser import chromium, review_command, web_server  # noqa: F401  (chromium is a fixture)
from conftest import REPO_ROOT, require_shared

#: Seconds the page may take for one step (the first run starts the worker and loads the model).
STEP_TIMEOUT_MS = 120_000
LIVER, SPLEEN = 6, 1  # class indices of the official table (the demo model's table)


def _page_says(page) -> str:
    """The page's message, stage and error lines (for assertion messages)."""
    texts = [page.locator(f"[data-testid={name}]").all_inner_texts() for name in ("message", "stage", "error")]
    return " | ".join(" ".join(t) for t in texts)


def _message_contains(page, text: str) -> None:
    page.wait_for_function(
        "text => (document.querySelector('[data-testid=message]') || {}).innerText?.includes(text)", arg=text,
        timeout=STEP_TIMEOUT_MS)


def _colourful_fraction(png: bytes) -> tuple[float, float]:
    """(grey-level variance, fraction of clearly coloured pixels) of a screenshot: the CT is grey, the
    segment overlay is coloured."""
    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)
    saturation = rgb.max(axis=2) - rgb.min(axis=2)
    return float(rgb.mean(axis=2).var()), float((saturation > 40).mean())


def _select_class(page, search: str, key: str) -> None:
    page.get_by_test_id("class-search").locator("input").fill(search)
    row = page.get_by_test_id(f"class-{key}")
    row.wait_for(timeout=10_000)
    row.locator("input").check()


def test_ct_to_exported_training_case_in_the_browser(tmp_path, chromium):  # noqa: F811
    ct = require_shared("data/totalsegmentator/example_ct_sm.nii.gz")
    folder = tmp_path / "cases"
    folder.mkdir()
    shutil.copy(ct, folder / ct.name)
    env = {"UNIVERSALSEG_RUNTIME": "torch",  # no OpenVINO conversion in the test: the worker runs PyTorch
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT / "UniversalSeg"), os.environ.get("PYTHONPATH")]))}
    with web_server(review_command(str(folder), "--device", "cpu"), env=env, cwd=tmp_path) as server:
        context = chromium.new_context(viewport={"width": 1600, "height": 950})
        page = context.new_page()
        page.goto(server.address)
        page.get_by_test_id("review-panel").wait_for(timeout=STEP_TIMEOUT_MS)

        page.get_by_test_id(f"entry-{ct.name}").click()
        _message_contains(page, f"Opened {ct.name}")
        locks = list((folder / "training_cases").glob(".universalseg-review-*"))
        assert len(locks) == 1, "the open case holds a lock where it will be exported"

        view = page.locator(".v-main img, .v-main canvas").first  # the first slice view
        page.wait_for_timeout(1000)
        variance, coloured_before = _colourful_fraction(view.screenshot())
        assert variance > 100.0, f"the slice view looks blank (grey-level variance {variance:.1f})"

        _select_class(page, "liv", "liver")  # a search by the start of a name
        _select_class(page, "spleen", "spleen")
        page.get_by_test_id("progressive").locator("input").uncheck()  # one exact result, not a preview first
        page.get_by_test_id("run").click()
        liver_row = page.get_by_test_id("segment-Liver")
        spleen_row = page.get_by_test_id("segment-Spleen")
        try:
            liver_row.wait_for(timeout=STEP_TIMEOUT_MS)
            spleen_row.wait_for(timeout=STEP_TIMEOUT_MS)
        except Exception as error:
            raise AssertionError(f"no segments after the run; the page says: {_page_says(page)}\n"
                                 f"server output:\n{server.text()[-3000:]}") from error
        assert page.get_by_test_id("stage").inner_text().startswith("Done"), page.get_by_test_id("stage").inner_text()
        assert liver_row.get_attribute("data-state") == "unreviewed"
        assert not page.locator("[data-testid=error]").count(), page.locator("[data-testid=error]").inner_text()

        # The slice view still shows the CT, now with the segments' colours over it.
        page.wait_for_timeout(1500)  # the view's next image after the segments went in
        variance, coloured = _colourful_fraction(view.screenshot())
        assert variance > 100.0, f"the slice view looks blank (grey-level variance {variance:.1f})"
        assert coloured > coloured_before + 0.01, (f"no segment overlay in the slice view ({100 * coloured:.2f} % "
                                                   f"coloured pixels, {100 * coloured_before:.2f} % before the run)")

        liver_row.get_by_test_id("accept").click()
        page.wait_for_selector('[data-testid="segment-Liver"][data-state="accepted"]', timeout=10_000)
        assert spleen_row.get_attribute("data-state") == "unreviewed"

        page.get_by_test_id("export").click()
        _message_contains(page, "Exported")
        page.get_by_test_id("export").click()  # again: the page asks before replacing the export
        page.get_by_test_id("confirm-overwrite").wait_for(timeout=10_000)

        # A second window on the same session is told so, and takes over only when asked.
        second = context.new_page()
        second.goto(server.address)
        second.get_by_test_id("session-elsewhere").wait_for(timeout=STEP_TIMEOUT_MS)
        assert not page.get_by_test_id("session-elsewhere").is_visible()
        second.get_by_test_id("take-over").click()
        page.get_by_test_id("session-elsewhere").wait_for(timeout=10_000)
        second.get_by_test_id("session-elsewhere").wait_for(state="hidden", timeout=10_000)
        context.close()
    assert not list((folder / "training_cases").glob(".universalseg-review-*")), "Ctrl-C released the case lock"

    # Read the export back as training reads exported cases: a dataset spec listing case files.
    from universalseg_training.assembly import load_case
    from universalseg_training.spec import load_dataset_spec

    spec_file = tmp_path / "reviewed.json"
    spec_file.write_text(json.dumps({"name": "reviewed", "root": str(folder / "training_cases"),
                                     "case_files": "*.case.json"}))
    spec = load_dataset_spec(spec_file)
    assert [case.case_id for case in spec.cases] == ["example_ct_sm"]
    case = load_case(spec, spec.cases[0])
    assert case.annotated == (LIVER,), "only the accepted class is labelled; the spleen stays unknown"
    assert case.image.shape == (122, 101, 30)
    liver_voxels = int(case.class_mask(LIVER).sum())
    assert liver_voxels > 1000, liver_voxels
    assert int((case.labels == SPLEEN).sum()) == 0, "an unreviewed class is never written as a label"


def test_segment_editor_edits_and_review_in_the_page(tmp_path):
    """In process, without a browser: the page's Segment Editor effects work on the case it opened (their
    per-view pipelines have views), an edit marks the model segment corrected in the page's rows, reject
    removes a segment, leaving unexported reviews and a second export wait for the page's confirmation."""
    import sys

    sys.path.insert(0, str(REPO_ROOT / "UniversalSeg"))
    from trame.app import get_server
    from trame_slicer.segmentation import SegmentationEffectNoTool, SegmentationEffectPaint
    from vtk.util import numpy_support

    from UniversalSegLib.taxonomy import get_taxonomy
    from UniversalSegWeb.app import ReviewApp
    from UniversalSegWeb.folders import AllowedFolders

    ct = require_shared("data/totalsegmentator/example_ct_sm.nii.gz")
    shutil.copy(ct, tmp_path / ct.name)
    app = ReviewApp(get_server("test-web-app-in-process", client_type="vue3"), AllowedFolders([tmp_path]),
                    device="cpu")
    try:
        app.open_entry(ct.name)
        case = app.case
        assert case is not None and not case.read_only, app.state.us_error
        masks = {LIVER: np.zeros((122, 101, 30), bool), SPLEEN: np.zeros((122, 101, 30), bool)}
        masks[LIVER][40:80, 30:70, 10:20] = True
        masks[SPLEEN][85:100, 60:80, 10:20] = True
        taxonomy = get_taxonomy()
        app.logic.import_masks(case.volume_node, masks, [taxonomy[SPLEEN], taxonomy[LIVER]], case.segmentation_node)
        app._refresh_segments()
        assert {row["name"]: row["state"] for row in app.state.us_segments} == {"Spleen": "unreviewed",
                                                                                 "Liver": "unreviewed"}

        editor = app.slicer_app.segmentation_editor
        editor.set_active_effect_type(SegmentationEffectPaint)  # raised when its pipelines had no view
        editor.set_active_effect_type(SegmentationEffectNoTool)
        editor.set_active_segment_id("liver")
        labelmap = editor.create_modifier_labelmap()
        numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars())[:500] = 1  # a stroke
        labelmap.Modified()
        editor.apply_labelmap(labelmap)
        assert {row["name"]: row["state"] for row in app.state.us_segments}["Liver"] == "corrected"

        app.reject("spleen")
        assert [row["name"] for row in app.state.us_segments] == ["Liver"]
        app.open_entry(ct.name)  # leaving a corrected, unexported case: the page asks first
        assert app.state.us_confirm_leave and app.case is case
        app.confirm_leave(False)
        assert app.case is case and not app.state.us_confirm_leave
        app.export()
        assert "Exported" in app.state.us_message, app.state.us_error
        app.export()
        assert app.state.us_confirm_overwrite, "a second export asks before replacing the first"
        app.export(True)
        assert not app.state.us_error, app.state.us_error
        (exported,) = (tmp_path / "training_cases").glob("*.case.json")
        assert "UniversalSeg review (browser)" in json.loads(exported.read_text())["source"]["tool"]
    finally:
        app.close()
    assert not list((tmp_path / "training_cases").glob(".universalseg-review-*")), "closing released the lock"


def test_several_allowed_folders_open_from_the_top_listing(tmp_path):
    """With several allowed folders the top listing shows the folders themselves; opening one of them (whose
    parent lies outside every allowed folder) lists it, and a CT inside the second one opens."""
    import sys

    sys.path.insert(0, str(REPO_ROOT / "UniversalSeg"))
    from trame.app import get_server

    from UniversalSegWeb.app import ReviewApp
    from UniversalSegWeb.folders import AllowedFolders

    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    ct = require_shared("data/totalsegmentator/example_ct_sm.nii.gz")
    shutil.copy(ct, second / ct.name)
    app = ReviewApp(get_server("test-web-app-two-folders", client_type="vue3"), AllowedFolders([first, second]),
                    device="cpu")
    try:
        app._list_folder("")
        top = {entry["name"]: entry["path"] for entry in app.state.us_entries}
        assert set(top) == {"first", "second"}, top
        app.open_entry(top["second"])
        assert app.state.us_error == "", app.state.us_error
        listed = {entry["name"]: entry for entry in app.state.us_entries}
        assert listed[ct.name]["kind"] == "ct", listed
        app.open_entry(listed[ct.name]["path"])
        assert app.state.us_error == "" and app.case is not None, app.state.us_error
        app.folder_up()  # from an allowed folder: back to the top listing
        assert app.state.us_error == "" and {e["name"] for e in app.state.us_entries} == {"first", "second"}, \
            app.state.us_error
        app.open_entry(top["first"])  # the first folder is listed, not the top again
        names = {entry["name"] for entry in app.state.us_entries}
        assert app.state.us_error == "" and not names & {"first", "second"}, (app.state.us_error, names)
        assert app.state.us_folder
    finally:
        app.close()


def test_case_ids_locks_and_exports_of_single_cts(tmp_path):
    """In process: two CTs of the same name in two folders are two cases; leaving asks again after an edit
    that followed the export; a lost lock turns the case read-only at export; an export folder that cannot
    be created opens the case read-only."""
    import sys

    sys.path.insert(0, str(REPO_ROOT / "UniversalSeg"))
    from trame.app import get_server

    from UniversalSegLib.taxonomy import get_taxonomy
    from UniversalSegWeb.app import ReviewApp
    from UniversalSegWeb.folders import AllowedFolders
    from UniversalSegWeb.locks import lock_path

    ct = require_shared("data/totalsegmentator/example_ct_sm.nii.gz")
    for patient in ("a", "b"):
        (tmp_path / patient).mkdir()
        shutil.copy(ct, tmp_path / patient / ct.name)
    app = ReviewApp(get_server("test-web-app-case-ids", client_type="vue3"), AllowedFolders([tmp_path]), device="cpu")
    try:
        app.open_entry(f"a/{ct.name}")
        first = app.case
        assert first is not None and not first.read_only and first.case_id == "a_example_ct_sm", app.state.us_error
        mask = np.zeros((122, 101, 30), bool)
        mask[40:80, 30:70, 10:20] = True
        app.logic.import_masks(first.volume_node, {LIVER: mask}, [get_taxonomy()[LIVER]], first.segmentation_node)
        app.accept("liver")
        app.export()
        assert (tmp_path / "training_cases" / "a_example_ct_sm.case.json").is_file(), app.state.us_error
        assert first.exported and not app._unexported_reviews()
        spleen = np.zeros((122, 101, 30), bool)
        spleen[85:100, 60:80, 10:20] = True
        app.logic.import_masks(first.volume_node, {SPLEEN: spleen}, [get_taxonomy()[SPLEEN]], first.segmentation_node)
        app.accept("spleen")  # reviewed after the export: leaving asks again
        app.open_entry(f"b/{ct.name}")
        assert app.state.us_confirm_leave and app.case is first
        app.confirm_leave(True)
        second = app.case
        assert second is not first and second.case_id == "b_example_ct_sm", app.state.us_error
        app.export()
        assert "exists already" not in str(app.state.us_confirm_overwrite), "another patient's export is never replaced"

        lock_path(second.lock_folder, second.case_id).unlink()  # the lock was lost (removed, or taken over)
        app.export()
        assert second.read_only and app.state.us_read_only and "lost" in app.state.us_error, app.state.us_error

        app.state.us_export_folder = f"a/{ct.name}/exports"  # under a file: cannot be created
        app.open_entry(f"a/{ct.name}")
        assert app.case is not None and app.case.read_only, app.state.us_error
        assert "cannot be exported" in app.state.us_lock_text, app.state.us_lock_text
    finally:
        app.close()


def _wait_for_job(app, timeout: float = 120.0) -> None:
    """Poll the page's job the way its periodic task does, until it has been handled."""
    import time

    deadline = time.monotonic() + timeout
    while app.job is not None:
        assert time.monotonic() < deadline, f"the job did not finish: {app.state.us_stage}"
        time.sleep(0.1)
        with app.state:
            app._poll_job()


def test_click_in_a_slice_view_removes_and_adds_the_class_there(tmp_path):
    """Pick mode, in process with the real worker: a click on a liver voxel in the axial view (mapped through
    the view's XY->RAS) removes the liver segment the model made; a second click there adds it back from the
    cached prediction."""
    import sys

    from scipy import ndimage

    sys.path.insert(0, str(REPO_ROOT / "UniversalSeg"))
    from trame.app import get_server

    from UniversalSegLib.mrml import volume_from_node
    from UniversalSegWeb.app import ReviewApp
    from UniversalSegWeb.folders import AllowedFolders

    ct = require_shared("data/totalsegmentator/example_ct_sm.nii.gz")
    shutil.copy(ct, tmp_path / ct.name)
    app = ReviewApp(get_server("test-web-app-click", client_type="vue3"), AllowedFolders([tmp_path]), device="cpu")
    try:
        app.open_entry(ct.name)
        case = app.case
        assert case is not None, app.state.us_error
        job = app.logic.start_segmentation(case.volume_node, "liver", app._model(), "cpu")
        app._start_job(job, "segment")
        _wait_for_job(app)
        assert [row["name"] for row in app.state.us_segments] == ["Liver"], app.state.us_error
        liver = job.result().result.masks[LIVER]
        deepest = np.unravel_index(np.argmax(ndimage.distance_transform_edt(liver)), liver.shape)
        ras = (volume_from_node(case.volume_node).affine @ np.array([*deepest, 1.0]))[:3]

        app._set_pick(True)
        view = next(v for v in app.slicer_app.view_manager.get_slice_views()
                    if v.get_view_node().GetOrientation() == "Axial")
        slice_node = view.get_view_node()
        slice_node.JumpSliceByCentering(*ras)
        import vtk

        ras_to_xy = vtk.vtkMatrix4x4()
        vtk.vtkMatrix4x4.Invert(slice_node.GetXYToRAS(), ras_to_xy)
        x, y, z, _ = ras_to_xy.MultiplyPoint((*ras, 1.0))
        assert abs(z) < 0.5, "the slice passes through the point"

        def click() -> None:
            view.interactor().SetEventPosition(int(round(x)), int(round(y)))
            view.interactor().InvokeEvent("LeftButtonPressEvent")

        click()  # first click on this volume: every class predicted once in the worker, then answered
        _wait_for_job(app)
        assert "Removed Liver" in app.state.us_message, (app.state.us_message, app.state.us_error)
        assert [row["name"] for row in app.state.us_segments] == []
        click()  # the prediction is cached now: answered at once
        assert "Added Liver" in app.state.us_message, (app.state.us_message, app.state.us_error)
        assert [row["name"] for row in app.state.us_segments] == ["Liver"]
        app._set_pick(False)

        # a run whose class got a segment meanwhile (here: the click above) is not thrown away: the page asks
        job = app.logic.start_segmentation(case.volume_node, "liver", app._model(), "cpu")
        app._replace = False
        app._start_job(job, "segment")
        _wait_for_job(app)
        assert "Liver" in app.state.us_confirm_replace, (app.state.us_confirm_replace, app.state.us_error)
        app.confirm_replace(True)
        assert not app.state.us_confirm_replace and app.state.us_stage.startswith("Done"), app.state.us_stage
        assert [row["name"] for row in app.state.us_segments] == ["Liver"]

        app._start_job(app.logic.start_segmentation(case.volume_node, "spleen", app._model(), "cpu"), "segment")
        app.case.exported = True  # nothing to ask about: opening another case cancels the run at once
        app.open_entry(ct.name)
        assert app.job is None and not app.state.us_busy, "a cancelled run leaves the page unlocked"
        assert app.state.us_stage == "Cancelled: another case was opened.", app.state.us_stage
    finally:
        app.close()


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
