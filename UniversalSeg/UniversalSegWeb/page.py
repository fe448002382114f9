"""What the review page shows: the trame-slicer layout with UniversalSeg's panel, and the page's test hooks.

:class:`ReviewPage` builds the page of a :class:`~.app.ReviewApp` (which it is mixed into): trame-slicer's
viewer layout (slice and 3D views, the Segment Editor on the left with its effects and undo/redo) and, on
the right, the review panel (open, segment, segments and review, export). Controls call the app's
methods; what they do lives in the app and, below it, in the Slicer module's Qt-free logic. Every control
a test drives carries a ``data-testid``.
"""
from __future__ import annotations

from trame.widgets import client, html
from trame.widgets import vuetify3 as v3
from trame_slicer.app.ui import LayoutButton, ViewerLayout
from trame_slicer.app.ui.segmentation import SegmentEditorToolbarUI, SegmentEditorUI, SegmentEditorUndoRedoUI

__all__ = ["ReviewPage"]


class ReviewPage:
    """The page's widgets; mixed into :class:`~.app.ReviewApp`, whose server, state and methods it binds."""

    def _build_ui(self) -> None:
        with ViewerLayout(self.server, title="UniversalSeg review", is_drawer_visible=True) as layout:
            self.ui_layout = layout
            layout.typed_state.data.active_tool = SegmentEditorUI.__name__
            with layout.drawer:
                # a read-only case (locked by another session, or not exportable) is viewed, never edited
                self.editor_ui = SegmentEditorUI(v_if=("us_case && !us_read_only",))
                html.Div("Open a CT or a batch case to edit its segments here.", v_if=("!us_case",),
                         classes="pa-4 text-caption")
                html.Div("This case is open read-only: it cannot be edited here.", v_if=("us_case && us_read_only",),
                         classes="pa-4 text-caption", raw_attrs=['data-testid="editor-read-only"'])
            with layout.toolbar:
                self.layout_button = LayoutButton(classes="mt-1")
                SegmentEditorToolbarUI(editor_ui=self.editor_ui, v_if=("us_case && !us_read_only",))
            with layout.undo_redo:
                SegmentEditorUndoRedoUI(editor_ui=self.editor_ui, v_if=("us_case && !us_read_only",))
            with layout.content:
                self.layout_logic.layout_manager.initialize_layout_grid(layout)
            with v3.VNavigationDrawer(location="right", permanent=True, width=400,
                                      raw_attrs=['data-testid="review-panel"']):
                self._build_panel()
        self.editor_logic.set_ui(self.editor_ui)
        self.layout_logic.set_ui(self.layout_button)

    def _build_panel(self) -> None:
        client.ClientTriggers(mounted="us_me = Math.random().toString(36).slice(2); trigger('us_hello', [us_me])")
        self.server.trigger("us_hello")(self.hello)
        with v3.VOverlay(model_value=("!!us_owner && us_owner !== us_me",), persistent=True,
                         classes="align-center justify-center", contained=False):
            with v3.VCard(max_width=520, classes="pa-4", raw_attrs=['data-testid="session-elsewhere"']):
                html.Div("This review session is open in another browser window (since {{ us_owner_since }}). "
                         "Every window of one session shows the same case; only one controls it.")
                v3.VBtn("Take over here", color="primary", classes="mt-3", click=(self.take_over, "[us_me]"),
                        raw_attrs=['data-testid="take-over"'])
        with html.Div(classes="pa-2 d-flex flex-column", style="gap: 8px;"):
            v3.VAlert(text=("us_error",), v_if=("us_error",), type="error", density="compact", closable=True,
                      click_close="us_error = ''", raw_attrs=['data-testid="error"'])
            v3.VAlert(text=("us_lock_text",), v_if=("us_lock_text",), type="warning", density="compact",
                      raw_attrs=['data-testid="lock-text"'])
            html.Div("{{ us_message }}", classes="text-body-2", raw_attrs=['data-testid="message"'])
            _question("us_confirm_leave", "confirm-leave", "Close it", (self.confirm_leave, "[true]"),
                      "Stay", (self.confirm_leave, "[false]"))
            _question("us_confirm_replace", "confirm-replace", "Replace", (self.confirm_replace, "[true]"),
                      "Keep mine", (self.confirm_replace, "[false]"))
            with v3.VExpansionPanels(multiple=True, v_model=("us_panels", [0, 1, 2, 3])):
                self._build_open_panel()
                self._build_run_panel()
                self._build_segments_panel()
                self._build_export_panel()

    def _build_open_panel(self) -> None:
        with v3.VExpansionPanel(title="Open"):
            with v3.VExpansionPanelText():
                html.Div("Folder: {{ us_folder.startsWith('/') ? '' : '/' }}{{ us_folder }}", classes="text-caption", raw_attrs=['data-testid="folder"'])
                with v3.VList(density="compact", max_height=220, style="overflow-y: auto;",
                              raw_attrs=['data-testid="folder-list"']):
                    v3.VListItem(title="..", prepend_icon="mdi-arrow-up", v_if=("us_folder",), click=self.folder_up,
                                 raw_attrs=['data-testid="folder-up"'])
                    v3.VListItem(v_for="entry in us_entries", key="entry.path", title=("entry.name",),
                                 subtitle=("entry.label",), prepend_icon=("entry.icon",),
                                 click=(self.open_entry, "[entry.path]"),
                                 raw_attrs=[':data-testid="`entry-${entry.name}`"'])
                v3.VFileInput(v_model=("us_upload",), label="Upload a CT (NIfTI, NRRD, MHA)", density="compact",
                              hide_details=True, show_size=True, disabled=("us_busy",),
                              hint=("`at most ${us_max_upload_mb} MB`",), raw_attrs=['data-testid="upload"'])
                with html.Div(v_if=("us_batch",), raw_attrs=['data-testid="queue"']):
                    html.Div("Review queue of {{ us_batch }} (worst first)", classes="text-caption mt-2")
                    with v3.VList(density="compact", max_height=200, style="overflow-y: auto;"):
                        v3.VListItem(v_for="row in us_queue", key="row.case_id", title=("row.title",),
                                     subtitle=("row.reasons",), active=("row.case_id === us_case",),
                                     click=(self.open_batch_case, "[row.case_id]"),
                                     raw_attrs=[':data-testid="`queue-${row.case_id}`"'])
                    v3.VBtn("Next case", click=self.next_case, block=True, variant="tonal", disabled=("us_busy",),
                            raw_attrs=['data-testid="next-case"'])

    def _build_run_panel(self) -> None:
        with v3.VExpansionPanel(title="Segment"):
            with v3.VExpansionPanelText():
                v3.VSelect(label="Model", items=("us_models",), v_model=("us_model",), density="compact",
                           hide_details=True, disabled=("us_busy",), raw_attrs=['data-testid="model"'])
                v3.VSelect(label="Preset", items=("us_presets",), v_model=("us_preset", None), density="compact",
                           hide_details=True, classes="mt-2", update_modelValue=(self.apply_preset, "[$event]"),
                           raw_attrs=['data-testid="preset"'])
                v3.VTextField(v_model=("us_search",), label="Search classes (names, synonyms, groups)",
                              density="compact", hide_details=True, clearable=True, classes="mt-2",
                              raw_attrs=['data-testid="class-search"'])
                with html.Div(style="max-height: 180px; overflow-y: auto;", raw_attrs=['data-testid="class-list"']):
                    with html.Div(v_for="c in us_class_items", key="c.value",
                                  raw_attrs=[':data-testid="`class-${c.key}`"']):
                        # the server keeps the selection: each tick is one explicit call, no array sync
                        v3.VCheckbox(model_value=("us_selected.includes(c.value)",), label=("c.title",),
                                     update_modelValue=(self.select_class, "[c.value, $event]"),
                                     density="compact", hide_details=True)
                html.Div("{{ us_selected.length }} selected", classes="text-caption")
                v3.VCheckbox(v_model=("us_replace",), label="Replace segments of these classes", density="compact",
                             hide_details=True)
                v3.VCheckbox(v_model=("us_progressive",), label="Quick result first (CPU), exact result replaces it",
                             density="compact", hide_details=True, raw_attrs=['data-testid="progressive"'])
                with html.Div(classes="d-flex", style="gap: 8px;"):
                    v3.VBtn("Run", click=self.run, color="primary",
                            disabled=("us_busy || !us_case || us_read_only || !us_selected.length",),
                            raw_attrs=['data-testid="run"'])
                    v3.VBtn("Cancel", click=self.cancel, disabled=("!us_busy",), raw_attrs=['data-testid="cancel"'])
                v3.VProgressLinear(model_value=("us_progress",), v_if=("us_busy",), height=8, classes="mt-2",
                                   raw_attrs=['data-testid="progress"'])
                html.Div("{{ us_stage }}", classes="text-caption", raw_attrs=['data-testid="stage"'])
                v3.VSwitch(v_model=("us_pick",), label="Pick by click: add/remove the class under the cursor",
                           density="compact", hide_details=True, disabled=("!us_case || us_read_only",),
                           raw_attrs=['data-testid="pick"'])
                with html.Div(v_if=("us_hits.length",), raw_attrs=['data-testid="hits"']):
                    v3.VBtn(v_for="hit in us_hits", key="hit.index", text=("hit.title",), size="small",
                            classes="ma-1", variant="outlined", click=(self.toggle_class, "[hit.index]"))

    def _build_segments_panel(self) -> None:
        with v3.VExpansionPanel(title="Segments and review"):
            with v3.VExpansionPanelText():
                html.Div("No segment yet.", v_if=("!us_segments.length",), classes="text-caption")
                with html.Div(v_for="s in us_segments", key="s.id", classes="d-flex align-center py-1",
                              style="gap: 6px;", raw_attrs=[':data-testid="`segment-${s.name}`"',
                                                           ':data-state="s.state"']):
                    html.Span(style=("`display:inline-block;width:14px;height:14px;border-radius:3px;"
                                     "background:${s.color}`",))
                    with html.Div(classes="flex-grow-1"):
                        html.Div("{{ s.name }}", classes="text-body-2")
                        html.Div("{{ s.reasons }}", v_if=("s.reasons",), classes="text-caption text-warning")
                    v3.VChip(text=("s.state",), size="small", color=("s.state === 'unreviewed' ? 'grey' : 'green'",),
                             raw_attrs=['data-testid="segment-state"'])
                    v3.VBtn(icon="mdi-check", size="x-small", variant="tonal", color="green",
                            disabled=("us_read_only",), click=(self.accept, "[s.id]"),
                            raw_attrs=['data-testid="accept"', 'title="Accept"'])
                    v3.VBtn(icon="mdi-close", size="x-small", variant="tonal", color="red",
                            disabled=("us_read_only",), click=(self.reject, "[s.id]"),
                            raw_attrs=['data-testid="reject"',
                                       'title="Reject: remove the segment (the class stays unlabelled for training)"'])

    def _build_export_panel(self) -> None:
        with v3.VExpansionPanel(title="Export for training"):
            with v3.VExpansionPanelText():
                html.Div("Only accepted or corrected segments are written; the other classes stay unknown.",
                         classes="text-caption")
                v3.VTextField(v_model=("us_export_folder",), label="Folder (inside the allowed folders)",
                              v_if=("!us_batch",), density="compact", hide_details=True,
                              raw_attrs=['data-testid="export-folder"'])
                v3.VTextField(v_model=("us_case_id",), label="Case id", v_if=("!us_batch",), density="compact",
                              hide_details=True, classes="mt-2", raw_attrs=['data-testid="case-id"'])
                v3.VBtn("Export for training", click=self.export, color="primary", block=True, classes="mt-2",
                        disabled=("us_busy || !us_case || us_read_only",), raw_attrs=['data-testid="export"'])
                # the question names the earlier export
                _question("us_confirm_overwrite", "confirm-overwrite", "Replace", (self.export, "[true]"),
                          "Keep it", "us_confirm_overwrite = false", classes="mt-2")


def _question(variable: str, testid: str, yes: str, on_yes, no: str, on_no, classes: str = "") -> None:
    """A warning that asks the question held in the state ``variable`` (shown while it is set), with a
    yes button (``data-testid`` ``<testid>-yes``) and a no button."""
    with v3.VAlert(v_if=(variable,), type="warning", density="compact", classes=classes,
                   raw_attrs=[f'data-testid="{testid}"']):
        html.Div("{{ " + variable + " }}")
        v3.VBtn(yes, size="small", color="warning", click=on_yes, raw_attrs=[f'data-testid="{testid}-yes"'])
        v3.VBtn(no, size="small", variant="text", click=on_no)
