"""The browser app (``covidlesionseg serve``): trame-slicer's slice and 3D views and segment editor around the
module's own logic.

Nothing here segments, measures or writes on its own: opening a CT goes through ``checks.load_volume`` (the
command line's checks and messages), Segment through :class:`~COVIDLesionSegLib.slicer_logic.SegmentationLogic`
with the worker process the Slicer module uses (progress, remaining time, Cancel; the server's event loop only
polls it), the results through ``mrml`` (segments, terminology colours, the results table), re-measuring after an
edit through ``slicer_logic.requantify`` and the downloads through the module's writers (``session.write_outputs``).

One ``serve`` process is one session: one scene, shown to every tab that opens the page; its files live in a
temporary folder removed when the server stops.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import signal
from pathlib import Path
from typing import Any, Optional

from trame.app import TrameApp
from trame.widgets import html
from trame.widgets import vuetify3 as v3
from trame_slicer import module as trame_slicer_module
from trame_slicer.app.logic import LayoutButtonLogic, SegmentEditorLogic
from trame_slicer.app.ui import LayoutButton, SegmentEditorUI, SegmentEditorUndoRedoUI, ViewerLayout
from trame_slicer.core import SlicerApp
from trame_slicer.rca_view import register_rca_factories

from .. import catalogue, mrml
from ..slicer_logic import DEVICES, SegmentationLogic, requantify, stored_report
from ..worker import classify_error, format_duration
from .session import DEFAULT_MAX_UPLOAD_MB, UPLOAD_SUFFIXES, WebSession, write_outputs

log = logging.getLogger("COVIDLesionSeg.web")

ROUTE = "/covidlesionseg"
#: Window presets of the slice views: name -> (window, level) in HU.
WINDOW_PRESETS = {"lung": (1500.0, -600.0), "mediastinum": (350.0, 40.0)}
#: The same stage names as the Slicer module's progress line.
STAGE_LABELS = {"read": "Preparing the input", "check": "Checking the image", "lungs": "Segmenting the lungs",
                "infection": "Segmenting the infection", "quantify": "Measuring", "write": "Writing the result"}
DOWNLOAD_LABELS = {"segmentation": "Segmentation (.seg.nrrd)", "labelmap": "Labelmap (.nii.gz)",
                   "csv": "Results table (CSV)", "json": "Report data (JSON)", "pdf": "Case report (PDF)",
                   "html": "Case report (HTML)"}
#: Seconds between polls of a running segmentation, and the quiet time after an edit before re-measuring.
POLL_S = 0.2
REMEASURE_DELAY_S = 0.6


def model_items() -> list[dict[str, str]]:
    """The infection models of the catalogue for the model menu (id and description, as in the module)."""
    items = []
    for entry in catalogue.list_models():
        if entry.task != "infection":
            continue
        title = f"{entry.model_id} - {entry.description}" if entry.description else entry.model_id
        if not entry.available:
            title += " (not downloaded)"
        items.append({"title": title, "value": entry.model_id})
    return items


def table_for_page(quantities: dict[str, Any]) -> dict[str, Any]:
    """The results table (``mrml.table_rows``: the module's rows and columns) as headers and text cells."""
    headers = [mrml.REGION_COLUMN] + [f"{title} ({unit})" for title, _, unit in mrml.TABLE_COLUMNS]
    rows = []
    for label, values in mrml.table_rows(quantities):
        cells = ["" if math.isnan(v) else (f"{v:.0f}" if unit == "points" else f"{v:.1f}")
                 for v, (_, _, unit) in zip(values, mrml.TABLE_COLUMNS)]
        rows.append([label] + cells)
    return {"headers": headers, "rows": rows}


class CovidLesionSegWebApp(TrameApp):
    """The page and its server-side state (see the module docstring)."""

    def __init__(self, server=None, data_dir: Optional[str | Path] = None,
                 max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, rca_encoder: Optional[str] = None,
                 session_root: Optional[str | Path] = None):
        super().__init__(server)
        self.server.enable_module(trame_slicer_module)
        self.session = WebSession(data_dir, max_upload_mb, root=session_root)
        self.slicer_app = SlicerApp()
        mrml.load_terminology(self.slicer_app.terminologies_logic)
        register_rca_factories(self.slicer_app.view_manager, self.server, rca_encoder=rca_encoder)
        self.layout_logic = LayoutButtonLogic(self.server, self.slicer_app)
        self.editor_logic = SegmentEditorLogic(self.server, self.slicer_app)
        self.logic = SegmentationLogic(self.slicer_app.scene)
        self.volume_node = None
        self.segmentation_node = None
        self.table_node = None
        self.run = None
        self._observed: list[tuple[Any, int]] = []
        self._remeasure_handle: Optional[asyncio.TimerHandle] = None
        self._writing = False
        self._watcher: Optional[asyncio.Task] = None   # the task polling a running segmentation
        self._init_state()
        self._build_ui()
        self.server.controller.on_server_bind.add(self._add_routes)
        self.server.controller.on_server_exited.add(self._on_exit)

    # -- state ---------------------------------------------------------------------------------------------------
    def _init_state(self) -> None:
        state = self.state
        state.trame__title = "COVIDLesionSeg"
        state.update({
            "cls_data_choices": self.session.data_choices(), "cls_data_choice": None,
            "cls_loaded": False, "cls_case": "", "cls_error": "", "cls_notes": [], "cls_upload_busy": False,
            "cls_models": model_items(), "cls_model": catalogue.default_model_id("infection"),
            "cls_model_description": "", "cls_devices": list(DEVICES), "cls_device": "auto",
            "cls_lungs_only": False, "cls_running": False, "cls_progress": 0, "cls_status": "Open a chest CT.",
            "cls_table": None, "cls_downloads": [], "cls_downloads_busy": False, "cls_opacity": 0.5,
            "cls_window": "lung", "cls_show_3d": True, "cls_finished": 0, "cls_edits": 0,
            "cls_max_upload_mb": int(self.session.max_upload_bytes // (1024 * 1024)),
        })
        self._describe_model(state.cls_model)
        state.change("cls_model")(lambda cls_model, **_: self._describe_model(cls_model))
        state.change("cls_opacity")(lambda cls_opacity, **_: self._set_opacity(cls_opacity))
        state.change("cls_window")(lambda cls_window, **_: self._set_window(cls_window))

    def _describe_model(self, model_id: str) -> None:
        try:
            entry = catalogue.get_entry(model_id or catalogue.default_model_id("infection"))
            parts = [entry.description, f"Licence: {entry.licence}." if entry.licence else ""]
            self.state.cls_model_description = " ".join(p for p in parts if p)
        except Exception as exc:  # noqa: BLE001 - shown as the description, as in the module
            self.state.cls_model_description = str(exc)

    # -- HTTP routes: uploads (streamed, size-limited) and downloads ---------------------------------------------
    def _add_routes(self, wslink_server) -> None:
        from aiohttp import web

        async def upload(request):
            name = request.query.get("name", "upload")

            async def chunks():
                async for chunk in request.content.iter_chunked(1 << 20):
                    yield chunk

            try:
                writer = self.session.open_upload(name)
                async for chunk in chunks():
                    writer.write(chunk)
                path = writer.close()
            except Exception as exc:  # noqa: BLE001 - every refusal is a message on the page
                return web.json_response({"error": classify_error(exc)[1]})
            return web.json_response({"path": str(path.relative_to(self.session.uploads))})

        async def download(request):
            path = self.session.output_file(request.match_info["path"])
            if path is None:
                raise web.HTTPNotFound()
            return web.FileResponse(path, headers={"Content-Disposition": f'attachment; filename="{path.name}"'})

        wslink_server.app.router.add_post(f"{ROUTE}/upload", upload)
        wslink_server.app.router.add_get(f"{ROUTE}/download/{{path:.+}}", download)

    def _on_exit(self, **_):
        if self.run is not None and not self.run.done:
            self.run.cancel()
        self.session.close()

    # -- opening a CT --------------------------------------------------------------------------------------------
    def _show_error(self, message: str) -> None:
        self.state.cls_error = message
        self.state.cls_status = "Not loaded." if not self.state.cls_loaded else self.state.cls_status

    async def on_upload(self, answer: dict) -> None:
        if answer.get("error"):
            with self.state:
                self._show_error(answer["error"])
            return
        await self._open(self.session.uploads / answer["path"], uploaded=True)

    async def on_open_data(self) -> None:
        choice = self.state.cls_data_choice
        if not choice:
            return
        try:
            path = self.session.data_path(choice)
        except Exception as exc:  # noqa: BLE001
            with self.state:
                self._show_error(classify_error(exc)[1])
            return
        await self._open(path, uploaded=False)

    async def _open(self, path: Path, uploaded: bool) -> None:
        if self.state.cls_running:
            return
        with self.state:
            self.state.cls_error = ""
            self.state.cls_status = f"Reading {path.name}..."
        try:
            source = self.session.prepare(path) if uploaded else path
            # Reading and checking take seconds on a large CT: off the event loop, so the page stays live.
            volume = await asyncio.to_thread(self.session.load, source)
        except Exception as exc:  # noqa: BLE001 - the engine's message, as the command line prints it
            with self.state:
                self._show_error(classify_error(exc)[1])
            return
        with self.state:
            self._show_volume(volume)

    def _show_volume(self, volume) -> None:
        scene = self.slicer_app.scene
        self._forget_result()
        if self.volume_node is not None:
            scene.RemoveNode(self.volume_node)
        image = volume.to_input_geometry(volume.hu)
        name = volume.name or "CT"
        self.volume_node = mrml.volume_node_from_image(image, scene, name)
        self.slicer_app.display_manager.show_volume(self.volume_node, do_reset_views=True)
        self._set_window(self.state.cls_window)
        self.state.cls_loaded = True
        self.state.cls_case = name
        self.state.cls_notes = list(volume.notes)
        self.state.cls_status = f"{name} loaded: {' x '.join(str(s) for s in image.GetSize())} voxels. Click Segment."

    def _forget_result(self) -> None:
        scene = self.slicer_app.scene
        self._stop_observing()
        self.slicer_app.segmentation_editor.deactivate_effect()
        for node in (self.segmentation_node, self.table_node):
            if node is not None and node.GetScene() is not None:
                scene.RemoveNode(node)
        self.segmentation_node = self.table_node = None
        self.state.cls_table = None
        self.state.cls_downloads = []

    # -- Segment / Cancel ----------------------------------------------------------------------------------------
    def on_segment(self) -> None:
        """Segment, or Cancel while a run is going (the same button)."""
        asyncio.get_running_loop().create_task(self._segment_or_cancel())

    async def _segment_or_cancel(self) -> None:
        if self.run is not None and not self.run.done:
            self.run.cancel()
            return
        if self.volume_node is None:
            return
        state = self.state
        with state:
            state.cls_error = ""
            state.cls_progress = 0
            state.cls_status = "Starting..."
        try:
            self.run = self.logic.process(
                self.volume_node, self.segmentation_node, model=state.cls_model, device=state.cls_device,
                lungs_only=bool(state.cls_lungs_only), wait_for_completion=False, progress_callback=self._progress,
                log_callback=lambda message: log.info(message), results_table=self.table_node,
                show_surfaces=bool(state.cls_show_3d))
        except Exception as exc:  # noqa: BLE001 - bad input found before the worker starts
            with state:
                self._show_error(classify_error(exc)[1])
            return
        with state:
            state.cls_running = True
        # Watched in a task of its own: this handler returns at once, so the page's next click (Cancel) is served.
        self._watcher = asyncio.get_running_loop().create_task(self._watch(self.run))

    async def _watch(self, run) -> None:
        state = self.state
        while True:
            try:
                going = run.poll()
            except Exception as exc:  # noqa: BLE001 - never leave a run spinning on an error
                run.cancel()
                run.error = classify_error(exc)[1]
                going = False
            if not going:
                break
            await asyncio.sleep(POLL_S)
        with state:
            self._finished(run)

    def _progress(self, progress) -> None:
        stage = STAGE_LABELS.get(progress.stage, progress.stage)
        text = f"{stage}: {progress.message}" if progress.message else stage
        if progress.remaining_s is not None:
            text += f"  (about {format_duration(progress.remaining_s)} left)"
        with self.state:
            self.state.cls_progress = int(round(100 * progress.overall))
            self.state.cls_status = text

    def _finished(self, run) -> None:
        state = self.state
        state.cls_running = False
        if run.state == "succeeded":
            result = run.result
            self.segmentation_node, self.table_node = result.segmentation_node, result.table_node
            self._set_opacity(state.cls_opacity)
            editor = self.slicer_app.segmentation_editor
            editor.set_active_segmentation(self.segmentation_node, self.volume_node)
            # The editor's own 3D switch (its Rendering section) follows the page's "3D" choice.
            self.editor_logic.data.segment_display.show_3d = bool(state.cls_show_3d)
            editor.set_surface_representation_enabled(bool(state.cls_show_3d))
            self._show_surfaces_in_3d()
            self._observe_segments()
            state.cls_progress = 100
            summary = f"Done in {format_duration(run.elapsed_s)}."
            both = mrml.quantity_entry(result.quantities, "both")
            if both.get("infected_percent") is not None and not run.request.lungs_only:
                summary += f" Infected: {both['infected_percent']:.1f} % of both lungs ({both['infection_ml']:.0f} mL)."
            state.cls_status = summary
            state.cls_notes = list(result.notes)
            state.cls_table = table_for_page(result.quantities)
            state.cls_downloads = []
            state.cls_finished += 1
        elif run.state == "cancelled":
            state.cls_progress = 0
            state.cls_status = "Cancelled; the result was not changed."
        else:
            state.cls_progress = 0
            state.cls_status = "Failed."
            state.cls_error = run.error or "The segmentation failed."

    # -- looking -------------------------------------------------------------------------------------------------
    def _show_surfaces_in_3d(self) -> None:
        """The 3D view shows the segments' surfaces, not the CT's volume rendering (which would hide them)."""
        vr = self.slicer_app.volume_rendering
        if self.volume_node is not None and vr.has_vr_display_node(self.volume_node):
            vr.get_vr_display_node(self.volume_node).SetVisibility(False)
        for view in self.slicer_app.view_manager.get_threed_views():
            view.reset_camera()
            view.schedule_render()

    def _set_opacity(self, opacity) -> None:
        display = self.segmentation_node.GetDisplayNode() if self.segmentation_node is not None else None
        if display is not None:
            display.SetOpacity2DFill(float(opacity))    # the slice views' fill; the outline stays (3D: the
                                                         # editor's Rendering section)

    def _set_window(self, preset: str) -> None:
        display = self.volume_node.GetDisplayNode() if self.volume_node is not None else None
        if display is not None and preset in WINDOW_PRESETS:
            display.AutoWindowLevelOff()
            display.SetWindowLevel(*WINDOW_PRESETS[preset])

    # -- editing: re-measure after the segments change -----------------------------------------------------------
    def _observe_segments(self) -> None:
        import slicer

        self._stop_observing()
        segmentation = self.segmentation_node.GetSegmentation()
        for event in (slicer.vtkSegmentation.RepresentationModified, slicer.vtkSegmentation.SegmentModified,
                      slicer.vtkSegmentation.SegmentRemoved):
            self._observed.append((segmentation, segmentation.AddObserver(event, self._on_segments_modified)))

    def _stop_observing(self) -> None:
        for obj, tag in self._observed:
            obj.RemoveObserver(tag)
        self._observed = []

    def _on_segments_modified(self, *_args) -> None:
        if self._writing or (self.run is not None and not self.run.done):
            return     # writing the downloads reads the segments (and fires these events); a run replaces them
        if self._remeasure_handle is not None:
            self._remeasure_handle.cancel()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._remeasure_handle = loop.call_later(REMEASURE_DELAY_S, self._remeasure)

    def _remeasure(self) -> None:
        self._remeasure_handle = None
        if self.segmentation_node is None or self.table_node is None or self.volume_node is None:
            return
        try:
            report = requantify(self.volume_node, self.segmentation_node, self.table_node)
        except Exception as exc:  # noqa: BLE001
            with self.state:
                self.state.cls_error = classify_error(exc)[1]
            return
        with self.state:
            self.state.cls_table = table_for_page(report["quantification"])
            self.state.cls_downloads = []
            self.state.cls_edits += 1

    # -- saving --------------------------------------------------------------------------------------------------
    async def on_prepare_downloads(self) -> None:
        if self.segmentation_node is None:
            return
        if self._remeasure_handle is not None:          # an edit not measured yet: measure it first
            self._remeasure_handle.cancel()
            self._remeasure()
        with self.state:
            self.state.cls_downloads_busy = True
        try:
            report = stored_report(self.table_node) or {}
            folder = self.session.new_output_folder()
            self._writing = True
            try:
                paths = write_outputs(folder, self.volume_node, self.segmentation_node, self.table_node, report,
                                      self.state.cls_case or "case")
            finally:
                self._writing = False
            links = [{"kind": kind, "label": DOWNLOAD_LABELS[kind], "name": path.name,
                      "href": f"{ROUTE}/download/{path.relative_to(self.session.outputs).as_posix()}"}
                     for kind, path in paths.items()]
            with self.state:
                self.state.cls_downloads = links
        except Exception as exc:  # noqa: BLE001
            with self.state:
                self.state.cls_error = classify_error(exc)[1]
        finally:
            with self.state:
                self.state.cls_downloads_busy = False

    # -- page ----------------------------------------------------------------------------------------------------
    def _upload_js(self) -> str:
        done = self.server.controller.trigger_name(self.on_upload)
        return (
            "cls_upload_busy = true; cls_error = '';"
            f"window.fetch('{ROUTE}/upload?name=' + encodeURIComponent($event.target.files[0].name),"
            " {method: 'POST', body: $event.target.files[0]})"
            ".then((r) => r.json())"
            f".then((answer) => trigger('{done}', [answer]))"
            f".catch((e) => trigger('{done}', [{{error: 'The upload failed: ' + e}}]))"
            ".finally(() => { cls_upload_busy = false; });"
        )

    def _build_ui(self) -> None:
        with ViewerLayout(self.server, title="COVIDLesionSeg", is_drawer_visible=True) as layout:
            self.layout = layout
            layout.title.set_text("COVIDLesionSeg: lungs and COVID-19 infection on chest CT")
            layout.typed_state.data.active_tool = "cls"
            name = layout.typed_state.name
            with layout.drawer:
                with html.Div(v_show=(f"{name.active_tool} === 'cls'",), classes="pa-3", id="cls-panel"):
                    self._build_panel()
                SegmentEditorUI(v_if=(f"{name.active_tool} === 'SegmentEditorUI'",))
            editor_ui = None
            for child in layout.drawer.children:
                if isinstance(child, SegmentEditorUI):
                    editor_ui = child
            self.editor_logic.set_ui(editor_ui)
            with layout.toolbar:
                for tool, icon, title in (("cls", "mdi-lungs", "Segment and results"),
                                          ("SegmentEditorUI", "mdi-brush", "Segment editor")):
                    v3.VBtn(icon=icon, title=title, variant="plain", id=f"tool-{tool}",
                            active=(f"{name.active_tool} === '{tool}'",), disabled=("!cls_loaded",),
                            click=f"{name.active_tool} = '{tool}'; {name.is_drawer_visible} = true;")
                self.layout_button = LayoutButton(classes="mt-1")
                self.layout_logic.set_ui(self.layout_button)
            with layout.undo_redo:
                SegmentEditorUndoRedoUI(editor_ui=editor_ui, v_if=(f"{name.active_tool} === 'SegmentEditorUI'",))
            with layout.content:
                self.layout_logic.layout_manager.initialize_layout_grid(layout)

    def _build_panel(self) -> None:
        html.Div("1. Open a chest CT", classes="text-subtitle-1")
        html.Div("NIfTI, NRRD, MetaImage, or a DICOM series as one .zip (at most {{ cls_max_upload_mb }} MB)",
                 classes="text-caption")
        html.Input(type="file", id="cls-upload", accept=",".join(UPLOAD_SUFFIXES),
                   disabled=("cls_upload_busy || cls_running",), change=self._upload_js(),
                   style="margin: 6px 0; width: 100%;")
        with html.Div(v_if=("cls_data_choices.length",), classes="d-flex align-center"):
            v3.VSelect(label="Or a case of the data folder", items=("cls_data_choices",),
                       v_model=("cls_data_choice",), density="compact", hide_details=True, id="cls-data")
            v3.VBtn("Open", click=self.on_open_data, disabled=("!cls_data_choice || cls_running",),
                    variant="tonal", classes="ml-2", id="cls-open-data")
        v3.VAlert(v_if=("cls_error",), text=("cls_error",), type="error", density="compact", classes="my-2",
                  id="cls-error")
        html.Div("{{ cls_case }}", v_if=("cls_loaded",), classes="text-body-2 my-1", id="cls-case")

        v3.VDivider(classes="my-2")
        html.Div("2. Segment", classes="text-subtitle-1")
        v3.VSelect(label="Infection model", items=("cls_models",), v_model=("cls_model",), density="compact",
                   hide_details=True, disabled=("cls_running",), id="cls-model")
        html.Div("{{ cls_model_description }}", classes="text-caption my-1", id="cls-model-description")
        with html.Div(classes="d-flex align-center"):
            v3.VSelect(label="Device", items=("cls_devices",), v_model=("cls_device",), density="compact",
                       hide_details=True, disabled=("cls_running",), style="max-width: 120px;")
            v3.VCheckbox(label="Lungs only", v_model=("cls_lungs_only",), density="compact", hide_details=True,
                         disabled=("cls_running",), classes="ml-2")
            v3.VCheckbox(label="3D", v_model=("cls_show_3d",), density="compact", hide_details=True,
                         disabled=("cls_running",))
        v3.VBtn("{{ cls_running ? 'Cancel' : 'Segment' }}", click=self.on_segment, block=True,
                color=("cls_running ? 'error' : 'primary'",), disabled=("!cls_loaded",), classes="my-2",
                id="cls-segment")
        v3.VProgressLinear(model_value=("cls_progress",), height=6, color="primary", id="cls-progress")
        html.Div("{{ cls_status }}", classes="text-body-2 my-1", id="cls-status",
                 raw_attrs=[':data-finished="cls_finished"', ':data-edits="cls_edits"'])
        with html.Ul(v_if=("cls_notes.length",), classes="text-caption ml-4", id="cls-notes"):
            html.Li("{{ note }}", v_for="note in cls_notes", key="note")

        v3.VDivider(classes="my-2")
        html.Div("3. Look", classes="text-subtitle-1")
        with v3.VBtnToggle(v_model=("cls_window",), density="compact", mandatory=True, variant="outlined",
                           divided=True, id="cls-window"):
            v3.VBtn("Lung", value="lung")
            v3.VBtn("Mediastinum", value="mediastinum")
        v3.VSlider(label="Segment opacity", v_model=("cls_opacity",), min=0, max=1, step=0.05, density="compact",
                   hide_details=True, classes="mt-2")
        html.Div("Segment toggles, paint, erase, threshold, islands and smoothing: the brush tool on the left.",
                 classes="text-caption")
        with html.Div(v_if=("cls_table",), style="overflow-x: auto;", classes="mt-2"):
            with html.Table(id="cls-table", style="font-size: 11px; border-collapse: collapse;"):
                with html.Tr():
                    html.Th("{{ h }}", v_for="h in cls_table.headers", key="h",
                            style="text-align: left; padding: 1px 4px; border-bottom: 1px solid #888;")
                with html.Tr(v_for="(row, r) in cls_table.rows", key="r"):
                    html.Td("{{ cell }}", v_for="(cell, c) in row", key="c", style="padding: 1px 4px;")

        v3.VDivider(classes="my-2")
        html.Div("4. Save", classes="text-subtitle-1")
        v3.VBtn("Prepare downloads", click=self.on_prepare_downloads, disabled=("!cls_table || cls_running",),
                loading=("cls_downloads_busy",), variant="tonal", block=True, id="cls-prepare")
        with html.Div(classes="mt-1", id="cls-downloads"):
            with html.Div(v_for="d in cls_downloads", key="d.href"):
                html.A("{{ d.label }}", href=("d.href",), download=("d.name",), target="_blank",
                       raw_attrs=[':data-kind="d.kind"'], classes="text-body-2")


def serve(port: int = 8080, host: str = "127.0.0.1", data_dir: Optional[str] = None,
          max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, open_browser: bool = False,
          rca_encoder: Optional[str] = None) -> int:
    """Start the app (blocking) on ``host:port``; ``covidlesionseg serve``."""
    app = CovidLesionSegWebApp(data_dir=data_dir, max_upload_mb=max_upload_mb, rca_encoder=rca_encoder)
    print(json.dumps({"url": f"http://{host}:{port}/", "session_folder": str(app.session.folder)}), flush=True)

    def stop(*_):
        raise KeyboardInterrupt   # a service manager's SIGTERM ends the session as Ctrl-C does: folder removed

    signal.signal(signal.SIGTERM, stop)
    try:
        app.server.start(port=port, host=host, open_browser=open_browser, show_connection_info=False)
    except KeyboardInterrupt:
        pass
    finally:
        app._on_exit()
    return 0
