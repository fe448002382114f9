"""The review page: trame-slicer's scene, views and Segment Editor, bound to the module's Qt-free logic.

One :class:`ReviewApp` is one review session (one annotator): a trame server process holds one MRML scene
(trame-slicer's :class:`~trame_slicer.core.SlicerApp`) and one
:class:`~UniversalSegSlicer.logic.SegmentationLogic` on it, so runs go to the same persistent worker
process as in the Slicer module. Every browser window connected to the same process shares that one page
(trame keeps one state per server): the first window controls it, another one is told so and may take it
over. Several annotators run several ``universalseg review`` processes, and case locks keep them from
writing the same case. The widgets are built by :class:`~.page.ReviewPage`.

Rules that keep the server safe and the scene consistent:

* every path the page sends is resolved through :class:`~.folders.AllowedFolders` (never trusted);
* the worker is polled from an asyncio task on the server's event loop: no thread touches MRML;
* a case is opened for writing only while its :class:`~.locks.CaseLock` is held (heartbeat refreshed);
  a case locked by another session opens read-only;
* errors are shown as the library's plain message; tracebacks go to the server's log only.
"""
from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from trame.app import TrameApp
from trame_slicer import module as trame_slicer_module
from trame_slicer.app.logic import LayoutButtonLogic, SegmentEditorLogic
from trame_slicer.core import SlicerApp
from trame_slicer.rca_view import register_rca_factories

from UniversalSegLib.api import case_name
from UniversalSegLib.errors import UniversalSegError
from UniversalSegLib.io.atomic import ensure_writable_folder
from UniversalSegLib.mrml import segment_class_index
from UniversalSegSlicer.batch_review import BatchReview
from UniversalSegSlicer.classes import ClassCatalog
from UniversalSegSlicer.export import suggest_case_id
from UniversalSegSlicer.jobs import PREVIEW_SHOWN_TEXT, JobCancelled
from UniversalSegSlicer.messages import plain_message
from UniversalSegSlicer.logic import STATISTICS_REFERENCE, SegmentationLogic
from UniversalSegSlicer.results import ExistingSegmentsError
from UniversalSegSlicer.review import REVIEWED_STATES

from .folders import AllowedFolders
from .locks import CaseLock, CaseLocked
from .page import ReviewPage

__all__ = ["ReviewApp", "OpenCase", "page_message", "model_options"]

log = logging.getLogger(__name__)

#: How often the page reads the worker's news (seconds).
POLL_SECONDS = 0.2
#: Where exports of single CTs go unless the page names another folder (inside the first allowed folder).
DEFAULT_EXPORT_FOLDER = "training_cases"


def page_message(error: BaseException) -> str:
    """What the page shows for an error: the module's plain message (never a traceback), with the server's
    log as the place for details."""
    return plain_message(error, details="The details are in the server's log.",
                         install='Install the missing package on the server (pip install "universalseg[web]").')


def model_options(extra: str | os.PathLike | None = None) -> list[dict]:
    """The models the page offers: the given one (``--model``), the packaged demo model, and the models
    in the model cache (registered models that are downloaded); ``[{"title", "value"}]``."""
    from UniversalSegLib.demo import demo_checkpoint_path

    options: list[dict] = []
    if extra:
        options.append({"title": f"{Path(str(extra)).name} (--model)", "value": str(extra)})
    try:
        options.append({"title": "Demo model (packaged, phantom-trained)", "value": str(demo_checkpoint_path())})
    except FileNotFoundError:
        pass
    for choice in SegmentationLogic.model_choices():
        if choice.path is not None:
            options.append({"title": choice.label, "value": choice.name})
    seen, unique = set(), []
    for option in options:
        if option["value"] not in seen:
            seen.add(option["value"])
            unique.append(option)
    return unique


@dataclass
class OpenCase:
    """What is open in the page: the CT node, its segmentation, where it is exported, and its lock."""

    case_id: str
    volume_node: object
    segmentation_node: object
    lock_folder: Path
    lock: CaseLock | None = None  # None: read-only (another session holds the case)
    holder_text: str = ""
    batch_case: bool = False
    exported: bool = False  # a single CT exported since it was opened

    @property
    def read_only(self) -> bool:
        return self.lock is None


class ReviewApp(ReviewPage, TrameApp):
    """The review page of one session.

    Args:
        server: a trame server (None: a new one).
        folders: the folders the page may open and write (uploads go to the first one).
        model: the model selected at start (a checkpoint file or a registered name; default: the demo model).
        device, runtime: passed to every run (``auto``; None: ``$UNIVERSALSEG_RUNTIME`` or auto).
        max_upload_bytes: the largest accepted upload.
        holder: who this session is in case locks (default: the user name; the lock adds machine and process).
        logic: a :class:`SegmentationLogic` to use (default: one on this page's scene).
    """

    def __init__(self, server=None, folders: AllowedFolders | None = None, model: str | None = None,
                 device: str = "auto", runtime: str | None = None, max_upload_bytes: int = 1 << 30,
                 holder: str = "", logic: SegmentationLogic | None = None) -> None:
        super().__init__(server, client_type="vue3")
        self.server.enable_module(trame_slicer_module)
        self.folders = folders or AllowedFolders([Path.cwd()])
        self.device, self.runtime = device, runtime
        self.max_upload_bytes = int(max_upload_bytes)
        self.holder = holder or _default_holder()
        self.slicer_app = SlicerApp()
        register_rca_factories(self.slicer_app.view_manager, self.server)
        self.editor_logic = SegmentEditorLogic(self.server, self.slicer_app)
        self.layout_logic = LayoutButtonLogic(self.server, self.slicer_app)
        self.logic = logic or SegmentationLogic(self.slicer_app.scene, front_end="review (browser)")
        self.batch: BatchReview | None = None
        self.case: OpenCase | None = None
        self.job = None
        self._job_kind = ""
        self._pending_click = None
        self._pending_leave = None
        self._unapplied = None  # a finished run waiting for "replace the segments that appeared meanwhile?"
        self._hit_infos: dict = {}  # class index -> ClassInfo of the last click's classes
        self._closed = False
        self._replace = False
        self._click_observers: list = []
        self._tasks: list = []

        models = model_options(model)
        self._init_state(models, model or (models[0]["value"] if models else ""))
        self._build_ui()
        # Segment Editor effects build their per-view pipelines when their parameters enter the scene; the
        # views only exist now, so start from a cleared scene (as trame-slicer's own app does before loading)
        # and the pipelines are built again, with their views, when an effect is first used.
        self.slicer_app.scene.Clear()
        self.server.controller.on_server_ready.add(self._on_server_ready)
        self.server.controller.on_server_exited.add(lambda **_: self.close())
        self.state.change("us_search")(self._on_search)
        self.state.change("us_model")(self._on_model_changed)
        self.state.change("us_pick")(self._on_pick_changed)
        self.state.change("us_upload")(self._on_upload)
        # Segment Editor strokes: the rows follow (an edited model segment becomes "corrected")
        self._refreshing = False
        self.slicer_app.segmentation_editor.segmentation_modified.connect(self._on_segmentation_edited)

    # ------------------------------------------------------------------------------------------- state
    def _init_state(self, models: list[dict], model: str) -> None:
        state = self.state
        state.trame__title = "UniversalSeg review"
        state.us_models = models
        state.us_model = model
        state.us_folder = ""
        state.us_entries = []
        state.us_search = ""
        state.us_selected = []
        state.us_class_items = []
        state.us_presets = []
        state.us_replace = False
        state.us_progressive = SegmentationLogic.progressive_default(self.device)
        state.us_busy = False
        state.us_progress = 0
        state.us_stage = ""
        state.us_message = ""
        state.us_error = ""
        state.us_segments = []
        state.us_pick = False
        state.us_hits = []
        state.us_case = ""
        state.us_read_only = False
        state.us_lock_text = ""
        state.us_batch = ""
        state.us_queue = []
        state.us_export_folder = DEFAULT_EXPORT_FOLDER
        state.us_case_id = ""
        state.us_confirm_overwrite = ""  # the question naming the earlier export, while asked
        state.us_confirm_leave = ""
        state.us_confirm_replace = ""  # the question, while a finished run waits for the answer
        # which browser window controls the session: each window draws a random id (never sent back
        # unasked: client-only), the first one to say hello owns the session, another may take it over
        state.us_me = ""
        state.client_only("us_me")
        state.us_owner = ""
        state.us_owner_since = ""
        state.us_upload = None
        state.us_max_upload_mb = round(self.max_upload_bytes / 2**20)
        self._catalog = ClassCatalog(self.logic.model_classes(model))
        self._refresh_classes()
        self._list_folder("")

    # ----------------------------------------------------------------------------------------- helpers
    def _fail(self, error: BaseException, what: str) -> None:
        if not isinstance(error, UniversalSegError):
            log.exception("%s", what)
        self.state.us_error = f"{what}: {page_message(error)}"

    def _refresh_classes(self) -> None:
        taxonomy = self._catalog.taxonomy
        visible = self._catalog.search(self.state.us_search or "")
        self.state.us_class_items = [{"title": taxonomy[i].display_name, "value": taxonomy[i].key,
                                      "key": taxonomy[i].key} for i in visible]
        self.state.us_presets = [{"title": label, "value": ",".join(taxonomy[i].key for i in indices)}
                                 for label, indices in self._catalog.presets()]

    def _list_folder(self, relative: str) -> None:
        icons = {"folder": "mdi-folder", "ct": "mdi-file-image", "dicom": "mdi-folder-image",
                 "batch": "mdi-format-list-numbered", "other": "mdi-file"}
        labels = {"folder": "folder", "ct": "CT", "dicom": "DICOM series", "batch": "batch (review queue)",
                  "other": ""}
        # one allowed folder: its content at the top; several: the folders themselves
        top = self.folders.roots[0] if len(self.folders.roots) == 1 else None
        entries = self.folders.list(relative or top)
        self.state.us_folder = relative
        self.state.us_entries = [{"name": e.name, "path": self._listed_path(e.path), "kind": e.kind,
                                  "icon": icons.get(e.kind, "mdi-file"), "label": labels.get(e.kind, "")}
                                 for e in entries if e.kind != "other"]

    def _listed_path(self, path) -> str:
        """How the page names a path: relative to the allowed folder when there is one, else absolute (with
        several allowed folders, the first one's relative path "" would be the top listing)."""
        if len(self.folders.roots) == 1:
            return _relative(path, self.folders.roots[0])
        return str(Path(path).resolve())

    def _model(self) -> str:
        return self.state.us_model

    # ----------------------------------------------------------------------------------------- windows
    def hello(self, window_id: str) -> None:
        """A browser window opened the page: the first one controls the session."""
        with self.state:
            if not self.state.us_owner:
                self.take_over(window_id)

    def take_over(self, window_id: str) -> None:
        import time

        with self.state:
            self.state.us_owner = str(window_id)
            self.state.us_owner_since = time.strftime("%H:%M:%S")

    # ------------------------------------------------------------------------------------------ folders
    def folder_up(self) -> None:
        with self.state:
            try:
                current = self.folders.resolve(self.state.us_folder or ".")
                if current in self.folders.roots:  # an allowed folder's parent is the top listing
                    self._list_folder("")
                else:
                    self._list_folder(self._listed_path(current.parent))
            except Exception as error:
                self._fail(error, "Could not list the folder")

    def open_entry(self, path: str) -> None:
        """A click on a listed entry: enter a folder, open a CT or a DICOM series, open a batch."""
        with self.state:
            self.state.us_error = ""
            try:
                entry = self.folders.entry(path)  # never trust the page: inside the allowed folders
                resolved, kind = Path(entry.path), entry.kind
                if kind == "batch":
                    self._leave_then(lambda: self.open_batch(resolved))
                elif kind in ("ct", "dicom"):
                    self._leave_then(lambda: self.open_ct(resolved))
                elif resolved.is_dir():
                    self._list_folder(self._listed_path(resolved))
            except Exception as error:
                self._fail(error, f"Could not open {Path(path).name}")

    def _on_upload(self, us_upload, **_) -> None:
        if not us_upload:
            return
        from trame.app.file_upload import ClientFile

        with self.state:
            try:
                upload = ClientFile(us_upload[0] if isinstance(us_upload, list) else us_upload)
                if upload.is_empty:
                    return
                saved = self.folders.save_upload(upload.name, upload.content, self.max_upload_bytes)
                self.state.us_message = f"Uploaded {saved.name}."
                self._list_folder(self._listed_path(saved.parent))
                self._leave_then(lambda: self.open_ct(saved))  # asks first about unexported reviews
            except Exception as error:
                self._fail(error, "Upload refused")
            finally:
                self.state.us_upload = None

    # ------------------------------------------------------------------------------------------- cases
    def open_ct(self, path: Path) -> None:
        """Open a CT file or DICOM series (read by the library's reader, which checks that it is a CT)."""
        from UniversalSegLib.io import read_volume
        from UniversalSegLib.mrml import volume_node_from_volume

        case_id = self._case_id_of(path)
        # the lock lives where the case will be exported: the CT's own folder may be read-only; a case whose
        # export folder cannot be written is only viewed
        lock_folder = self.folders.resolve(self.state.us_export_folder or DEFAULT_EXPORT_FOLDER, must_exist=False)
        try:
            ensure_writable_folder(lock_folder)
        except UniversalSegError as error:
            lock, holder_text = None, f"The case cannot be exported: {error.user_message}"
        else:
            lock, holder_text = self._acquire(lock_folder, case_id)
        try:
            volume = read_volume(path)
            self.close_case()
            scene = self.slicer_app.scene
            volume_node = volume_node_from_volume(scene, volume, case_id)
            segmentation_node = self.slicer_app.segmentation_editor.create_empty_segmentation_node()
            segmentation_node.SetName(f"{case_id} segmentation")
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        self.batch = None
        self.state.us_batch = ""
        self.state.us_queue = []
        self.case = OpenCase(case_id, volume_node, segmentation_node, lock_folder, lock, holder_text)
        self.state.us_case_id = case_id
        self._show_case()
        self.state.us_message = f"Opened {path.name}" + (" (read-only)." if lock is None else ".")

    def _case_id_of(self, path: Path) -> str:
        """The case id of a CT: its name without the image ending, after the folders that lead to it inside
        its allowed folder (``a/ct.nii.gz`` and ``b/ct.nii.gz`` are two patients: ``a_ct`` and ``b_ct``)."""
        real = Path(os.path.realpath(path))
        root = self.folders.root_of(real)
        parents = real.parent.relative_to(root).parts if root is not None else ()
        return suggest_case_id("_".join([*parents, case_name(real)]))

    def open_batch(self, folder: Path) -> None:
        """Open a batch folder: its review queue, worst case first; the first case not exported is loaded."""
        batch = BatchReview(self.logic, folder, taxonomy=self._catalog.taxonomy)
        self.close_case()
        self.batch = batch
        self.state.us_batch = folder.name
        self._refresh_queue()
        self.state.us_message = f"{len(batch.cases)} cases to review in {folder.name}, worst first."
        following = batch.next_case()
        if following is not None:
            self._open_batch_case(following.case_id)

    def open_batch_case(self, case_id: str) -> None:
        """A click on a queue row (asks first when the open case has reviews that were not exported)."""
        with self.state:
            self._leave_then(lambda: self._open_batch_case(case_id))

    def _open_batch_case(self, case_id: str) -> None:
        with self.state:
            self.state.us_error = ""
            if self.batch is None:
                return
            try:
                lock, holder_text = self._acquire(self.batch.folder, case_id)
                try:
                    loaded = self.batch.load_case(case_id)  # the previous case stays if this one fails
                except BaseException:
                    if lock is not None:
                        lock.release()
                    raise
                self._leave_case_session()  # the previous case's run and lock; load_case removed its nodes
                self.case = OpenCase(case_id, loaded.volume_node, loaded.segmentation_node, self.batch.folder, lock,
                                     holder_text, batch_case=True)
                self.state.us_case_id = case_id
                self._show_case()
                self._refresh_queue()
                self.state.us_message = (f"Case {case_id} (priority {loaded.case.priority:.2f})"
                                         + (" read-only." if lock is None else "."))
            except Exception as error:
                self._fail(error, f"Could not open case {case_id}")

    def next_case(self) -> None:
        with self.state:
            if self.batch is None:
                return
            following = self.batch.next_case()
            if following is None:
                self.state.us_message = "No case left to review after this one: every later case has been exported."
                return
            self.open_batch_case(following.case_id)

    def _unexported_reviews(self) -> bool:
        """Whether the open case has accepted or corrected segments that were not exported for training."""
        case = self.case
        if case is None or case.read_only:
            return False
        if not any(state in REVIEWED_STATES for state in self.logic.review_states(case.segmentation_node).values()):
            return False
        if case.batch_case and self.batch is not None:
            return not self.batch.is_exported(case.case_id)
        return not case.exported

    def _leave_then(self, action) -> None:
        """Run ``action`` (which closes the open case) now, or after the page confirms leaving reviews that
        were not exported."""
        if self._unexported_reviews():
            self._pending_leave = action
            self.state.us_confirm_leave = (f"Case {self.case.case_id} has reviewed segments that were not exported "
                                           "for training. Close it anyway?")
            return
        action()

    def confirm_leave(self, leave: bool) -> None:
        with self.state:
            action, self._pending_leave = self._pending_leave, None
            self.state.us_confirm_leave = ""
            if leave and action is not None:
                try:
                    action()
                except Exception as error:
                    self._fail(error, "Could not open it")

    def _acquire(self, folder: Path, case_id: str):
        """The case's lock, or (None, who holds it) when another session has it: the case opens read-only."""
        current = self.case
        if current is not None and current.case_id == case_id and Path(current.lock_folder) == Path(folder):
            self.close_case()  # the same case again (re-opened): this session's own lock is not a contender
        try:
            lock = CaseLock.acquire(folder, case_id, self.holder)
        except CaseLocked as locked:
            return None, locked.user_message
        lock.keep_alive()  # heartbeat from a small thread that only rewrites the lock file
        return lock, ""

    def _show_case(self) -> None:
        case = self.case
        self.slicer_app.display_manager.show_volume(case.volume_node, do_reset_views=True)
        self.slicer_app.segmentation_editor.set_active_segmentation(case.segmentation_node, case.volume_node)
        self.logic.track_edits(case.segmentation_node)
        if case.read_only:  # viewed only: no effect stays active
            self.slicer_app.segmentation_editor.deactivate_effect()
        self.state.us_case = case.case_id
        self.state.us_read_only = case.read_only
        self.state.us_lock_text = case.holder_text + (" The case is open read-only." if case.holder_text else "")
        self.state.us_hits = []
        self._refresh_segments()

    def _refresh_queue(self) -> None:
        if self.batch is None:
            self.state.us_queue = []
            return
        rows = []
        for case in self.batch.cases:
            exported = self.batch.is_exported(case.case_id)
            rows.append({"case_id": case.case_id,
                         "title": f"{case.case_id}  ({case.priority:.2f}){'  exported' if exported else ''}",
                         "reasons": "; ".join(case.top_reasons) or "no concern"})
        self.state.us_queue = rows

    def _on_segmentation_edited(self, *_) -> None:
        if self._refreshing or self.case is None:
            return
        with self.state:
            self._changed()
            self._refresh_rows()

    def _changed(self) -> None:
        """The open case changed after its export: leaving it asks again."""
        if self.case is not None:
            self.case.exported = False

    def _refresh_segments(self) -> None:
        """The segment rows, and the Segment Editor's list and active segment."""
        self._refreshing = True
        try:
            rows = self._refresh_rows()
            editor = self.slicer_app.segmentation_editor
            if rows and editor.get_active_segment_id() not in {row["id"] for row in rows}:
                editor.set_active_segment_id(rows[0]["id"])  # the Segment Editor edits the first segment
            editor.trigger_all_signals()
        finally:
            self._refreshing = False

    def _refresh_rows(self) -> list:
        case = self.case
        if case is None:
            self.state.us_segments = []
            return []
        node = case.segmentation_node
        states = self.logic.review_states(node)
        segmentation = node.GetSegmentation()
        rows = []
        for segment_id in segmentation.GetSegmentIDs():
            segment = segmentation.GetSegment(segment_id)
            color = "#" + "".join(f"{round(255 * c):02x}" for c in segment.GetColor())
            reasons = self.batch.reasons(segment_id) if (self.batch is not None and case.batch_case) else []
            rows.append({"id": segment_id, "name": segment.GetName(), "color": color,
                         "state": states.get(segment_id, "not a model segment"), "reasons": "; ".join(reasons)})
        self.state.us_segments = rows
        return rows

    def _release_lock(self) -> None:
        if self.case is not None and self.case.lock is not None:
            try:
                self.case.lock.release()
            except Exception:  # a lock file removed by hand: nothing to release
                log.exception("releasing the lock of %s", self.case.case_id)
            self.case.lock = None

    def _leave_case_session(self) -> None:
        """Stop what belongs to the open case apart from its nodes: pick mode, its run (the page unlocks), its lock."""
        self._set_pick(False)
        if self.job is not None:  # a run on this case: its result has no volume any more
            self.job.cancel()
            self.job = None
            self.state.us_busy = False
            self.state.us_progress = 0
            self.state.us_stage = "Cancelled: another case was opened."
        self._unapplied = None  # a finished run waiting for an answer belongs to this case too
        self.state.us_confirm_replace = ""
        self._release_lock()

    def close_case(self) -> None:
        """Release the open case's lock and remove its nodes (exported files stay)."""
        self._leave_case_session()
        case, self.case = self.case, None
        if case is None:
            return
        if case.batch_case and self.batch is not None:
            self.batch.close_case()
        scene = self.slicer_app.scene
        table = case.segmentation_node.GetNodeReference(STATISTICS_REFERENCE) if case.segmentation_node else None
        for node in (case.segmentation_node, table, case.volume_node):
            if node is not None and scene.IsNodePresent(node):
                scene.RemoveNode(node)
        self.state.us_case = ""
        self.state.us_segments = []

    # -------------------------------------------------------------------------------------- classes, run
    def _on_search(self, **_) -> None:
        self._refresh_classes()

    def _on_model_changed(self, us_model, **_) -> None:
        try:
            taxonomy = self.logic.model_classes(us_model)
        except Exception as error:
            self._fail(error, "Could not read the model's classes")
            return
        if [c.key for c in taxonomy] != [c.key for c in self._catalog.taxonomy]:
            self._catalog = ClassCatalog(taxonomy)
            self._refresh_classes()
            known = {c.key for c in taxonomy}  # a fine-tuned model may not know every selected class
            self.state.us_selected = [key for key in (self.state.us_selected or []) if key in known]

    def select_class(self, key: str, selected: bool) -> None:
        with self.state:
            chosen = [k for k in (self.state.us_selected or []) if k != key]
            self.state.us_selected = chosen + [key] if selected else chosen

    def apply_preset(self, keys) -> None:
        with self.state:
            if keys:
                self.state.us_selected = list(keys.split(","))
            self.state.us_preset = None

    def run(self) -> None:
        """Run the model on the selected classes in the worker process (polled by the page's task)."""
        with self.state:
            self.state.us_error = ""
            case = self.case
            if case is None or case.read_only or self.job is not None:
                return
            try:
                classes = self._catalog.resolve(list(self.state.us_selected or []))
                if not classes:
                    self.state.us_message = "Select at least one class first."
                    return
                existing = self.logic.existing_classes(case.segmentation_node, classes)
                self._replace = bool(self.state.us_replace)
                if existing and not self._replace:
                    classes = [c for c in classes if c not in existing]
                    self.state.us_message = (f"Kept the existing {ClassCatalog.describe(existing)} (tick 'Replace' "
                                             "to segment them again).")
                    if not classes:
                        return
                job = self.logic.start_segmentation(case.volume_node, classes, self._model(), self.device,
                                                    runtime=self.runtime,
                                                    progressive=bool(self.state.us_progressive))
                self._start_job(job, "segment")
            except Exception as error:
                self._fail(error, "Could not start the segmentation")

    def _start_job(self, job, kind: str) -> None:
        self.job, self._job_kind = job, kind
        self.state.us_busy = True
        self.state.us_progress = 0
        self.state.us_stage = job.status_text

    def cancel(self) -> None:
        with self.state:
            if self.job is not None:
                self.job.cancel()  # ends at once; the worker stops at its next window
                self._poll_job()

    def _poll_job(self) -> None:
        job = self.job
        if job is None:
            return
        if not job.done():
            self.state.us_progress = round(100 * job.progress)
            self.state.us_stage = job.status_text
            if self.logic.preview_pending(job):
                self._show_preview(job)
            return
        self.job = None
        self.state.us_busy = False
        self.state.us_progress = 100
        self.state.us_stage = job.status_text
        case = self.case
        # a quick result already shown stays when the exact run is cancelled or fails
        left = self.logic.unfinished_note(job)
        try:
            outcome = job.result()
            if case is None:
                return
            if self._job_kind == "segment":
                try:
                    self._apply_segmentation(job, self._replace)
                except ExistingSegmentsError as error:  # a segment of these classes appeared (a click) meanwhile
                    self._unapplied = job  # the page asks; the result is not thrown away
                    self.state.us_confirm_replace = error.user_message
                    self.state.us_stage = "Finished: the result waits for your answer."
            elif self._job_kind == "predict" and self._pending_click is not None:
                ras, self._pending_click = self._pending_click, None
                self._answer_click(self.logic.classes_at(case.volume_node, ras, self._model()) or [])
        except JobCancelled:
            self.state.us_stage = "Cancelled." + left
        except Exception as error:
            if job.error_details:
                log.error("%s", job.error_details)
            self.state.us_stage = "Failed." + left
            self._fail(error, "The run failed")
        self._refresh_segments()

    def _apply_segmentation(self, job, replace: bool) -> None:
        case = self.case
        applied = self.logic.apply_result(job, case.volume_node, case.segmentation_node, replace)
        self._changed()
        outcome = job.result()
        loaded = "" if outcome.info and outcome.info.get("model_loaded") else ", model already loaded"
        self.state.us_stage = (f"Done in {job.elapsed:.0f} s{loaded}: {len(applied.segment_ids)} segments."
                               f"{self.logic.kept_previews_note(applied)}")

    def confirm_replace(self, replace: bool) -> None:
        """The answer to "replace the segments that appeared while the run went on?"."""
        with self.state:
            job, self._unapplied = self._unapplied, None
            self.state.us_confirm_replace = ""
            if job is None or self.case is None:
                return
            if not replace:
                self.state.us_stage = "Not applied: the existing segments were kept."
                return
            try:
                self._apply_segmentation(job, True)
            except Exception as error:
                self._fail(error, "Could not apply the result")
            self._refresh_segments()

    def _show_preview(self, job) -> None:
        """A progressive run's quick result, shown until the exact one replaces it (classes that already have
        a segment keep it until then: a preview never replaces one)."""
        case = self.case
        if case is None:
            return
        try:
            applied = self.logic.apply_preview(job, case.volume_node, case.segmentation_node)
        except Exception as error:  # marked handled by the logic: reported once
            self._fail(error, "Could not show the quick result")
            return
        if applied is not None:
            self.state.us_message = PREVIEW_SHOWN_TEXT
            self._refresh_segments()

    # -------------------------------------------------------------------------------- click-to-select
    def _on_pick_changed(self, us_pick, **_) -> None:
        self._set_pick(bool(us_pick))

    def _set_pick(self, enabled: bool) -> None:
        for interactor, tag in self._click_observers:
            interactor.RemoveObserver(tag)
        self._click_observers = []
        if enabled:
            self.slicer_app.segmentation_editor.deactivate_effect()  # a click picks, it does not paint
            for view in self.slicer_app.view_manager.get_slice_views():
                interactor = view.interactor()
                tag = interactor.AddObserver("LeftButtonPressEvent",
                                             lambda caller, event, view=view: self._on_slice_click(view), 1.0)
                self._click_observers.append((interactor, tag))
        elif self.state.us_pick:
            self.state.us_pick = False

    def _on_slice_click(self, view) -> None:
        """Map the click to RAS through the slice node's XY->RAS matrix and ask the cached prediction."""
        with self.state:
            case = self.case
            if case is None or case.read_only:
                return
            x, y = view.interactor().GetEventPosition()
            ras = list(view.get_view_node().GetXYToRAS().MultiplyPoint((float(x), float(y), 0.0, 1.0))[:3])
            try:
                hits = self.logic.classes_at(case.volume_node, ras, self._model())
                if hits is None:  # first click on this volume: every class predicted once, in the worker
                    if self.job is not None:
                        self.state.us_message = "Busy with another run; click again when it has finished."
                        return
                    self._pending_click = ras
                    self.state.us_message = "Predicting all classes once for this volume..."
                    self._start_job(self.logic.start_prediction(case.volume_node, self._model(), self.device),
                                    "predict")
                    return
                self._answer_click(hits)
            except Exception as error:
                self._fail(error, "Click-to-select failed")

    def _answer_click(self, hits) -> None:
        if not hits:
            self.state.us_message = "No class here (background for the model)."
            self.state.us_hits = []
            return
        names = [f"{hit.info.display_name} ({100 * hit.probability:.0f} %)" for hit in hits]
        if len(hits) > 1:  # the page asks which one
            self.state.us_message = "Several classes here; pick one to add or remove."
            self.state.us_hits = [{"index": hit.info.index, "title": name} for hit, name in zip(hits, names)]
            self._hit_infos = {hit.info.index: hit.info for hit in hits}
            return
        self._hit_infos = {hits[0].info.index: hits[0].info}
        self.toggle_class(hits[0].info.index, f"Here: {names[0]}. ")

    def toggle_class(self, index: int, prefix: str = "") -> None:
        """Remove the class's segment when there is one, else add it from the cached prediction."""
        with self.state:
            case = self.case
            info = self._hit_infos.get(int(index))
            if case is None or info is None or case.read_only:
                return
            self._changed()
            try:
                if self.logic.existing_classes(case.segmentation_node, [info]):
                    self.logic.remove_class_segment(case.segmentation_node, info)
                    self.state.us_message = f"{prefix}Removed {info.display_name}."
                else:
                    self.logic.add_predicted_class(case.volume_node, info.index, self._model(), case.segmentation_node)
                    self.state.us_message = f"{prefix}Added {info.display_name}."
                self.state.us_hits = []
            except Exception as error:
                self._fail(error, "Click-to-select failed")
            self._refresh_segments()

    # ------------------------------------------------------------------------------------------- review
    def accept(self, segment_id: str) -> None:
        self._set_state(segment_id, "accepted")

    def _set_state(self, segment_id: str, state: str) -> None:
        with self.state:
            case = self.case
            if case is None or case.read_only:
                return
            self._changed()
            try:
                self.logic.set_review_state(case.segmentation_node, segment_id, state)
                self.logic.update_statistics_table(case.segmentation_node, case.volume_node)
            except Exception as error:
                self._fail(error, "Could not set the review state")
            self._refresh_segments()

    def reject(self, segment_id: str) -> None:
        """Reject a model segment: it is removed, so its class stays unlabelled (never background) when the
        case is exported for training."""
        with self.state:
            case = self.case
            if case is None or case.read_only:
                return
            segment = case.segmentation_node.GetSegmentation().GetSegment(segment_id)
            if segment is None:
                return
            index = segment_class_index(segment)
            self._changed()
            try:
                if index is not None:
                    info = next((c for c in self._catalog.taxonomy if c.index == index), None)
                    self.logic.remove_class_segment(case.segmentation_node, info if info is not None else index)
                else:
                    case.segmentation_node.GetSegmentation().RemoveSegment(segment_id)
                self.state.us_message = f"Rejected {segment.GetName()}: removed."
            except Exception as error:
                self._fail(error, "Could not reject the segment")
            self._refresh_segments()

    def export(self, overwrite: bool = False) -> None:
        """"Export for training": a batch case into its batch folder, a single CT into the named folder
        (inside the allowed folders); an earlier export is replaced only after the page confirms."""
        with self.state:
            self.state.us_error = ""
            self.state.us_confirm_overwrite = ""
            case = self.case
            if case is None or case.read_only:
                return
            try:
                if case.lock is not None:
                    case.lock.refresh()  # raises CaseLocked when another session took the case over
                if case.batch_case and self.batch is not None:
                    if self.batch.is_exported(case.case_id) and not overwrite:
                        self.state.us_confirm_overwrite = (
                            f"Case {case.case_id} was exported into {_relative(self.batch.folder, self.folders.roots[0])} "
                            "before. Replace that export?")
                        return
                    path = self.batch.export(overwrite=bool(overwrite))
                    self._refresh_queue()
                else:
                    folder = self.folders.resolve(self.state.us_export_folder or DEFAULT_EXPORT_FOLDER,
                                                  must_exist=False)
                    case_id = suggest_case_id(self.state.us_case_id or case.case_id)
                    existing = folder / f"{case_id}.case.json"
                    if existing.exists() and not overwrite:
                        self.state.us_confirm_overwrite = (f"{_relative(existing, self.folders.roots[0])} exists "
                                                           "already (an earlier export). Replace it?")
                        return
                    ensure_writable_folder(folder)
                    path = self.logic.export_for_training(case.volume_node, case.segmentation_node, folder, case_id,
                                                          overwrite=bool(overwrite), taxonomy=self._catalog.taxonomy)
                    case.exported = True
                self.state.us_message = f"Exported {Path(path).name} to {_relative(Path(path).parent, self.folders.roots[0])}."
            except CaseLocked as lost:  # another session has the case now: this one only views it
                self._release_lock()
                case.holder_text = lost.user_message
                self._show_case()
                self._fail(lost, "Export refused")
            except Exception as error:
                self._fail(error, "Export failed")

    # --------------------------------------------------------------------------------------- life cycle
    def _on_server_ready(self, **_) -> None:
        self._tasks.append(asyncio.ensure_future(self._poll_loop()))

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(POLL_SECONDS)
            if self.job is None:
                continue
            with self.state:
                try:
                    self._poll_job()
                except Exception as error:  # shown on the page; polling goes on
                    self._fail(error, "Updating the page failed")

    def close(self) -> None:
        """Release the lock, cancel what runs, stop the worker (server exit, Ctrl-C); once."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        try:
            self.close_case()
        finally:
            self.logic.shutdown()


def _relative(path, root: Path) -> str:
    """``path`` as the page shows it: relative to the first allowed folder when inside it, else absolute."""
    path = Path(path)
    try:
        text = str(path.resolve().relative_to(root.resolve()))
        return "" if text == "." else text
    except ValueError:
        return str(path)


def _default_holder() -> str:
    """Who this session is in lock messages (the lock adds the machine and the process)."""
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # no user name (some containers)
        return "another reviewer"
