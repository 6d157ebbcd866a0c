"""COVIDLesionSeg: lung and COVID-19 infection segmentation of chest CT in 3D Slicer.

Module | parameter node | widget (thin, Qt) | logic (no Qt) | self-test.

The widget only collects choices, asks questions and shows progress; everything else lives in the
Qt-free engine package ``COVIDLesionSegLib`` (``slicer_logic.py`` for the logic, ``mrml.py`` for the MRML
adapter, ``worker.py`` for the background process), so that scripts, the headless batch runner and the
tests (``slicer-core`` in plain Python) run the same code as the GUI.

Nothing heavy is imported when Slicer starts: the engine (numpy, SimpleITK, scipy) is imported on first use,
and torch only inside the worker process, and only for learned models.
"""

import contextlib
import enum
import logging
from pathlib import Path
from typing import Annotated, Optional

import vtk

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# The parameter node wrapper and the GUI connectors need the desktop application (Qt, CTK). The module file
# must still import without it (slicer-core in plain Python: tests, batch), so they are optional here and the
# parameter node class below stays a plain annotated class there.
try:
    import ctk
    import qt

    from slicer.parameterNodeWrapper import GuiConnector, parameterNodeGuiConnector, parameterNodeWrapper
    from slicer.parameterNodeWrapper.util import findFirstAnnotation, splitAnnotations, unannotatedType
    from slicer.parameterNodeWrapper.validators import Validator as _AnnotationBase
except ImportError:  # slicer-core without the application
    qt = ctk = None
    parameterNodeWrapper = None
    _AnnotationBase = object

from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode

MODULE_DIR = Path(__file__).resolve().parent
TERMINOLOGY_FILE = MODULE_DIR / "Resources" / "COVIDLesionSeg.term.json"
POLL_INTERVAL_MS = 200


# ============================================================================================================
# Module
# ============================================================================================================

class COVIDLesionSeg(ScriptedLoadableModule):
    """Module description shown in Slicer (title, category, help, acknowledgement)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("COVID-19 Lesion Segmentation")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["COVIDLesionSeg contributors"]
        self.parent.helpText = _("""
Segments the right lung, the left lung and COVID-19 infection (ground-glass opacity and consolidation) on a
chest CT in Hounsfield units, and measures lung and infection volumes and the infected percentage of each
lung and lung zone.
<p>Choose the CT volume and a model, then press <b>Segment</b>. The computation runs in a separate process:
Slicer stays usable, the progress bar shows the stage and the remaining time, and <b>Cancel</b> stops it
without changing the scene. Results are editable segments ("Right lung", "Left lung", "COVID-19 infection")
with standard terminology; press <b>Edit in Segment Editor</b> to correct them. The quantification appears in
the results table and can be exported as CSV. Re-running replaces only this module's segments, after asking.</p>
<p>Models: the default infection model combines the built-in Hounsfield-band method with a small learned
network (it keeps the dense opacities the network recognises and adds their faint rim); built-in
Hounsfield-unit methods need no download and no GPU; learned models (see the model list) need PyTorch, which
is installed on first use after you confirm.</p>
<p>Methods implemented by the project (see its documentation for details):</p>
<ul>
<li>Wang et al., "Does Non-COVID19 Lung Lesion Help? Investigating Transferability in COVID-19 CT Image
Segmentation", Computer Methods and Programs in Biomedicine 2021 (arXiv:2006.13877v2): hybrid encoder with
selective fusion.</li>
<li>Wang et al., the same title, earlier version (arXiv:2006.13877v1): multi-encoder variant.</li>
<li>Zhang et al., "Exploiting Shared Knowledge from Non-COVID Lesions for Annotation-Efficient COVID-19 CT
Lung Infection Segmentation" (arXiv:2012.15564).</li>
<li>Liu et al., "COVID-19 lung infection segmentation with a novel two-stage cross-domain transfer learning
framework", Medical Image Analysis 2021.</li>
<li>Bizopoulos et al., "Comprehensive Comparison of Deep Learning Models for Lung and COVID-19 Lesion
Segmentation in CT scans".</li>
</ul>
<p>Not a medical device: for research use only.</p>
""")
        self.parent.acknowledgementText = _("""
Built on 3D Slicer, SimpleITK, MONAI and PyTorch. The methods are those of the papers cited in the help
(Wang et al.; Zhang et al.; Liu et al.; Bizopoulos et al.). Test and training data: COVID-19-CT-Seg
(Ma et al., CC BY-NC-SA 4.0), COVID-CT-MD (CC BY 4.0), LIDC-IDRI (TCIA, CC BY 3.0) and the MedSeg COVID-19
CT segmentation dataset. Models trained on COVID-19-CT-Seg are for non-commercial use only.
""")
        app = getattr(slicer, "app", None)
        if app is not None:
            # Our terminology (colours and codes of the three segments) is loaded once the application has
            # started and the Terminologies module exists; this only reads a small JSON file.
            app.connect("startupCompleted()", loadTerminology)


def loadTerminology(terminologiesLogic=None) -> Optional[str]:
    """Load ``Resources/COVIDLesionSeg.term.json`` into the Terminologies logic; returns its context name.

    The loading itself is the engine's (``mrml.load_terminology``, also used by the tests and batch scenes);
    here a failure is logged instead of raised, since it runs from a start-up signal with no caller to tell.
    """
    from COVIDLesionSegLib.mrml import load_terminology

    if terminologiesLogic is None:
        terminologiesModule = getattr(slicer.modules, "terminologies", None)
        if terminologiesModule is None:
            return None
        terminologiesLogic = terminologiesModule.logic()
    try:
        return load_terminology(terminologiesLogic, TERMINOLOGY_FILE)
    except RuntimeError as exc:
        logging.error(f"COVIDLesionSeg: {exc}")
        return None


# ============================================================================================================
# Parameter node
# ============================================================================================================

class Device(enum.Enum):
    """Where the models run. ``label`` is what the device combo box shows."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"

    def label(self) -> str:
        return {"auto": _("Automatic (GPU if available)"), "cpu": _("CPU"), "cuda": _("GPU (CUDA)")}[self.value]


class ModelId(_AnnotationBase):
    """Annotation marking a ``str`` parameter as a model id chosen from the model catalogue.

    It is bound to a ``ctkComboBox`` by :class:`ModelComboBoxConnector`, which fills the list from the
    catalogue when the GUI is connected (the list can grow when the user imports a model, so it cannot be a
    fixed ``Choice``). It is a parameter-node validator so that the wrapper consumes it (no "unused
    annotation" warning) while connectors still see it in the parameter's type.
    """

    def validate(self, value) -> None:
        if not isinstance(value, str):
            raise ValueError(f"a model id must be a string, got {value!r}")


class COVIDLesionSegParameterNode:
    """The module's parameters, saved with the scene.

    inputVolume - the chest CT to segment.
    model - infection model id ("" = the catalogue's default).
    device - where to run the models.
    lungsOnly - segment the lungs only.
    fast - the fast mode (coarser grids, about twice as fast; its accuracy cost is in docs/default_models.md).
    outputSegmentation - where the segments go (None = a new segmentation is created).
    resultsTable - where the quantification goes (None = a new table is created).
    showSurfaces - also build 3D surfaces of the segments.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    model: Annotated[str, ModelId()] = ""
    device: Device = Device.AUTO
    lungsOnly: bool = False
    fast: bool = False
    outputSegmentation: vtkMRMLSegmentationNode
    resultsTable: vtkMRMLTableNode
    showSurfaces: bool = False


if parameterNodeWrapper is not None:
    COVIDLesionSegParameterNode = parameterNodeWrapper(COVIDLesionSegParameterNode)

    @parameterNodeGuiConnector
    class ModelComboBoxConnector(GuiConnector):
        """Binds an ``Annotated[str, ModelId()]`` parameter to a ``ctkComboBox`` listing the catalogue's models.

        Items show the model's description; their data is the model id. The stock QComboBox connector needs a
        fixed ``Choice`` list and only accepts exactly ``QComboBox``, hence this one for ``ctkComboBox``.
        """

        @staticmethod
        def canRepresent(widget, datatype) -> bool:
            return (isinstance(widget, ctk.ctkComboBox) and unannotatedType(datatype) == str
                    and findFirstAnnotation(splitAnnotations(datatype)[1], ModelId) is not None)

        @staticmethod
        def create(widget, datatype):
            if ModelComboBoxConnector.canRepresent(widget, datatype):
                return ModelComboBoxConnector(widget)
            return None

        def __init__(self, widget):
            super().__init__()
            self._widget = widget
            populateModelComboBox(widget)

        def _connect(self):
            self._widget.currentIndexChanged.connect(self.changed)

        def _disconnect(self):
            self._widget.currentIndexChanged.disconnect(self.changed)

        def widget(self):
            return self._widget

        def read(self) -> str:
            data = self._widget.itemData(self._widget.currentIndex)
            return str(data) if data else ""

        def write(self, value: str) -> None:
            index = self._widget.findData(value) if value else -1
            if index < 0:
                index = self._widget.findData(defaultModelId())
            self._widget.currentIndex = max(index, 0)


def defaultModelId() -> str:
    from COVIDLesionSegLib import catalogue

    return catalogue.default_model_id("infection")


def modelEntries(task: str = "infection") -> list:
    from COVIDLesionSegLib import catalogue

    return [entry for entry in catalogue.list_models() if entry.task == task]


def populateModelComboBox(comboBox) -> None:
    """Fill a combo box with the infection models (text: id and description; data: id)."""
    wasBlocked = comboBox.blockSignals(True)
    current = comboBox.itemData(comboBox.currentIndex) if comboBox.count else None
    comboBox.clear()
    for entry in modelEntries():
        text = f"{entry.model_id} - {entry.description}" if entry.description else entry.model_id
        if not entry.available:
            text += " " + _("(not downloaded)")
        comboBox.addItem(text, entry.model_id)
        comboBox.setItemData(comboBox.count - 1, entry.description, qt.Qt.ToolTipRole)
    index = comboBox.findData(current) if current else -1
    comboBox.currentIndex = index if index >= 0 else max(comboBox.findData(defaultModelId()), 0)
    comboBox.blockSignals(wasBlocked)


def describeModel(modelId: str) -> str:
    """One line for the panel: description, expected time on CPU and GPU, licence."""
    from COVIDLesionSegLib import catalogue
    from COVIDLesionSegLib.worker import format_duration

    try:
        entry = catalogue.get_entry(modelId or defaultModelId())
    except Exception as exc:  # noqa: BLE001 - shown to the user as the description
        return str(exc)
    parts = [entry.description]
    expected = entry.details.get("expected_seconds") or {}
    if expected.get("cpu") or expected.get("gpu"):
        times = []
        if expected.get("cpu"):
            times.append(_("about {duration} on CPU").format(duration=format_duration(expected["cpu"])))
        if expected.get("gpu"):
            times.append(_("about {duration} on GPU").format(duration=format_duration(expected["gpu"])))
        parts.append(_("Expected time: {times}.").format(times=", ".join(times)))
    elif entry.source == "built-in":
        parts.append(_("No GPU needed; typically under a minute on CPU."))
    if entry.licence:
        parts.append(_("Licence: {licence}.").format(licence=entry.licence))
    return " ".join(p for p in parts if p)


# ============================================================================================================
# Widget (needs the desktop application)
# ============================================================================================================

STAGE_LABELS = {
    "read": lambda: _("Preparing the input"),
    "check": lambda: _("Checking the image"),
    "lungs": lambda: _("Segmenting the lungs"),
    "infection": lambda: _("Segmenting the infection"),
    "quantify": lambda: _("Measuring"),
    "write": lambda: _("Writing the result"),
}


class COVIDLesionSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. Thin: choices, questions, progress; the work is done by :class:`COVIDLesionSegLogic`."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None
        self._timer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/COVIDLesionSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = COVIDLesionSegLogic()
        loadTerminology()  # idempotent; covers a module loaded after start-up (no startupCompleted signal then)
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.timeout.connect(self.onPollTimer)

        self.ui.modelCacheFolderPathLineEdit.currentPath = str(self.logic.modelsPath)
        self.ui.modelCacheFolderPathLineEdit.connect("currentPathChanged(QString)", self.onModelCacheFolderChanged)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.editInSegmentEditorButton.connect("clicked(bool)", self.onEditInSegmentEditor)
        self.ui.exportCsvButton.connect("clicked(bool)", self.onExportCsv)
        self.ui.reportButton.connect("clicked(bool)", self.onReport)
        self.ui.exportDicomButton.connect("clicked(bool)", self.onExportDicom)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.verifyModelsButton.connect("clicked(bool)", self.onVerifyModels)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.modelSelector.connect("currentIndexChanged(int)", self.updateModelDescription)
        self.ui.progressBar.setRange(0, 1000)
        self.ui.progressBar.value = 0

        self.initializeParameterNode()
        self.updateModelDescription()

    def cleanup(self) -> None:
        if self._run is not None and not self._run.done:
            self._run.cancel()
        if self._timer is not None:
            self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        if self._run is not None and not self._run.done:
            self._run.cancel()
            self._onRunFinished()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode and not firstVolumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()
            self.ui.resultsTableView.setMRMLTableNode(self._parameterNode.resultsTable)

    # -- state of the panel ----------------------------------------------------------------------------------------
    def _running(self) -> bool:
        return self._run is not None and not self._run.done

    def _checkCanApply(self, caller=None, event=None) -> None:
        if self._running():
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the segmentation; the scene is left as it was.")
            self.ui.applyButton.enabled = True
            return
        self.ui.applyButton.text = _("Segment")
        problem = self.logic.inputProblem(self._parameterNode.inputVolume if self._parameterNode else None)
        self.ui.applyButton.enabled = problem is None
        self.ui.applyButton.toolTip = problem or _("Segment the lungs and COVID-19 infection of the input CT.")
        table = self._parameterNode.resultsTable if self._parameterNode else None
        if self.ui.resultsTableView.mrmlTableNode() != table:
            self.ui.resultsTableView.setMRMLTableNode(table)
        hasResults = bool(self._parameterNode and self._parameterNode.outputSegmentation)
        self.ui.editInSegmentEditorButton.enabled = hasResults
        self.ui.exportCsvButton.enabled = bool(self._parameterNode and self._parameterNode.resultsTable)
        report = self.logic.storedReport(self._parameterNode.resultsTable) if self._parameterNode else None
        self.ui.reportButton.enabled = bool(hasResults and report)
        inputVolume = self._parameterNode.inputVolume if self._parameterNode else None
        self.ui.exportDicomButton.enabled = bool(hasResults and report and self.logic.dicomSourceFiles(inputVolume))

    def updateModelDescription(self, index=None) -> None:
        modelId = self.ui.modelSelector.itemData(self.ui.modelSelector.currentIndex)
        self.ui.modelDescriptionLabel.text = describeModel(str(modelId) if modelId else "")

    def appendLog(self, message: str) -> None:
        self.ui.logTextEdit.appendPlainText(message)
        logging.info(f"COVIDLesionSeg: {message}")

    # -- Segment / Cancel ------------------------------------------------------------------------------------------
    def onApplyButton(self) -> None:
        if self._running():
            self.appendLog(_("Cancelling..."))
            self._run.cancel()
            self._onRunFinished()
            return
        params = self._parameterNode
        modelId = params.model or defaultModelId()

        if not self._ensureDependencies(modelId):
            return
        if not self._ensureModelDownloaded(modelId):
            return
        replaceExisting = self._askReplaceExisting(params.outputSegmentation)
        if replaceExisting == "cancel":
            return

        self.ui.logTextEdit.clear()
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = _("Starting...")
        self._run = None
        with _errorsShown(_("Segmentation could not start.")):
            self._run = self.logic.process(
                params.inputVolume, params.outputSegmentation, model=modelId, device=params.device.value,
                lungsOnly=params.lungsOnly, waitForCompletion=False, progressCallback=self.onProgress,
                replaceExisting=replaceExisting, resultsTable=params.resultsTable,
                showSurfaces=params.showSurfaces, logCallback=self.appendLog, fast=params.fast)
        if self._run is None:
            self.ui.statusLabel.text = _("Not started.")
        elif not self._run.done:
            self._timer.start()
        self._checkCanApply()

    def _askReplaceExisting(self, segmentationNode):
        """True (replace), False (keep both), None (nothing to ask) or "cancel"."""
        existing = self.logic.existingGeneratedSegments(segmentationNode)
        if not existing:
            return None
        edited = [s.name for s in existing if s.edited]
        text = _("'{segmentation}' already holds segments from an earlier run: {names}.").format(
            segmentation=segmentationNode.GetName(), names=", ".join(s.name for s in existing))
        if edited:
            text += "\n" + _("You edited these since: {names}. Replacing them discards your edits.").format(
                names=", ".join(edited))
        text += "\n" + _("Your own segments are kept in any case.")
        box = qt.QMessageBox(slicer.util.mainWindow())
        box.setWindowTitle(_("Replace earlier results?"))
        box.setIcon(qt.QMessageBox.Question)
        box.setText(text)
        replaceButton = box.addButton(_("Replace"), qt.QMessageBox.AcceptRole)
        keepButton = box.addButton(_("Keep both"), qt.QMessageBox.ActionRole)
        box.addButton(qt.QMessageBox.Cancel)
        box.setDefaultButton(replaceButton if not edited else keepButton)
        box.exec_()
        clicked = box.clickedButton()
        if clicked == replaceButton:
            return True
        if clicked == keepButton:
            return False
        return "cancel"

    def onProgress(self, progress) -> None:
        from COVIDLesionSegLib.worker import format_duration

        self.ui.progressBar.value = int(round(1000 * progress.overall))
        stage = STAGE_LABELS.get(progress.stage, lambda: progress.stage)()
        text = f"{stage}: {progress.message}" if progress.message else stage
        if progress.remaining_s is not None:
            text += "  " + _("(about {duration} left)").format(duration=format_duration(progress.remaining_s))
        self.ui.statusLabel.text = text

    def onPollTimer(self) -> None:
        if self._run is None:
            self._timer.stop()
            return
        try:
            self._run.poll()
        except Exception as exc:  # noqa: BLE001 - never leave the timer spinning on an error
            self._run.cancel()
            self.appendLog(_("Error: {error}").format(error=exc))
        if self._run.done:
            self._onRunFinished()

    def _onRunFinished(self) -> None:
        self._timer.stop()
        run = self._run
        if run is None:
            return
        if run.state == "succeeded":
            result = run.result
            self._parameterNode.outputSegmentation = result.segmentation_node
            self._parameterNode.resultsTable = result.table_node
            self.ui.resultsTableView.setMRMLTableNode(result.table_node)
            self.ui.progressBar.value = 1000
            from COVIDLesionSegLib.mrml import quantity_entry

            both = quantity_entry(result.quantities, "both")
            summary = _("Done in {duration}.").format(duration=_formatSeconds(run.elapsed_s))
            if both.get("infected_percent") is not None and not run.request.lungs_only:
                summary += " " + _("Infected: {percent:.1f} % of both lungs ({ml:.0f} mL).").format(
                    percent=both["infected_percent"], ml=both["infection_ml"])
            self.ui.statusLabel.text = summary
            warned = {w["message"] for w in result.warnings}   # already in the log, as warnings
            for note in result.notes:
                if note not in warned:
                    self.appendLog(note)
            self.appendLog(summary)
            slicer.util.setSliceViewerLayers(background=self._parameterNode.inputVolume, fit=True)
        elif run.state == "cancelled":
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Cancelled; the scene was not changed.")
        else:
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Failed.")
            slicer.util.errorDisplay(run.error or _("The segmentation failed."),
                                     windowTitle=_("COVID-19 lesion segmentation"))
        self._checkCanApply()

    def _ensureDependencies(self, modelId: str) -> bool:
        missing = self.logic.missingDependencies(modelId)
        if not missing:
            return True
        text = _("This segmentation needs Python packages that are not installed yet: {packages}.\n"
                 "Install them now? This downloads them from the Internet and may take a few minutes.").format(
            packages=", ".join(missing))
        if not slicer.util.confirmOkCancelDisplay(text, windowTitle=_("Install dependencies")):
            self.appendLog(_("Dependencies were not installed; segmentation not started."))
            return False
        with _errorsShown(_("Installing the dependencies failed.")):
            self.logic.installDependencies(modelId)
        return not self.logic.missingDependencies(modelId)

    # -- results ---------------------------------------------------------------------------------------------------
    def onEditInSegmentEditor(self) -> None:
        segmentation = self._parameterNode.outputSegmentation
        volume = self._parameterNode.inputVolume
        if segmentation is None:
            return
        slicer.util.selectModule("SegmentEditor")
        editorWidget = slicer.modules.segmenteditor.widgetRepresentation().self()
        editor = editorWidget.editor
        editor.setSegmentationNode(segmentation)
        if volume is not None:
            if hasattr(editor, "setSourceVolumeNode"):
                editor.setSourceVolumeNode(volume)
            else:  # Slicer before 5.2
                editor.setMasterVolumeNode(volume)

    def onExportCsv(self) -> None:
        table = self._parameterNode.resultsTable
        if table is None:
            return
        path = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), _("Export results as CSV"),
                                              f"{table.GetName()}.csv", _("CSV files (*.csv)"))
        if not path:
            return
        with _errorsShown(_("Export failed.")):
            self.logic.exportTableCsv(table, path)
            self.appendLog(_("Results written to {path}").format(path=path))

    def onReport(self) -> None:
        params = self._parameterNode
        report = self.logic.storedReport(params.resultsTable)
        if report is None or params.outputSegmentation is None:
            return
        from COVIDLesionSegLib.outputs import case_report_paths

        suggested = str(case_report_paths("", str(report.get("case") or params.inputVolume.GetName()))["pdf_report"])
        path = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), _("Save the case report"), suggested,
                                              _("PDF files (*.pdf)"))
        if not path:
            return
        pdfPath = Path(path).with_suffix(".pdf")
        from COVIDLesionSegLib.dependencies import REPORT_REQUIREMENTS

        if not self._ensurePackages(REPORT_REQUIREMENTS):
            return
        with _errorsShown(_("The report could not be written.")):
            pdf, page = self.logic.writeReport(params.inputVolume, params.outputSegmentation, report, pdfPath,
                                               pdfPath.with_suffix(".html"))
            self.appendLog(_("Report written to {pdf} and {html}").format(pdf=pdf, html=page))
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(pdf)))

    def onExportDicom(self) -> None:
        params = self._parameterNode
        report = self.logic.storedReport(params.resultsTable)
        if report is None or params.outputSegmentation is None:
            return
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(),
                                                     _("Folder for the DICOM SEG and SR files"))
        if not folder:
            return
        from COVIDLesionSegLib.dependencies import DICOM_REQUIREMENTS

        if not self._ensurePackages(DICOM_REQUIREMENTS):
            return
        with _errorsShown(_("The DICOM export failed.")):
            written = self.logic.exportDicom(params.inputVolume, params.outputSegmentation, report, folder)
            self.appendLog(_("DICOM SEG written to {seg}, DICOM SR to {sr}; import them into the DICOM database "
                             "to send them to PACS.").format(seg=written["paths"]["dicom_seg"],
                                                             sr=written["paths"]["dicom_sr"]))

    def _ensurePackages(self, requirements) -> bool:
        """Install the given (import name, pip requirement) pairs after asking, as for the segmentation."""
        from COVIDLesionSegLib.dependencies import importable

        missing = [req for name, req in requirements if not importable(name)]
        if not missing:
            return True
        text = _("This needs Python packages that are not installed yet: {packages}. Install them now?").format(
            packages=", ".join(missing))
        if not slicer.util.confirmOkCancelDisplay(text, windowTitle=_("Install dependencies")):
            return False
        with _errorsShown(_("Installing the dependencies failed.")):
            self.logic.installPackages(missing)
        return all(importable(name) for name, _req in requirements)

    # -- advanced --------------------------------------------------------------------------------------------------
    def onModelCacheFolderChanged(self, path: str) -> None:
        if not path:
            return
        self.logic.modelsPath = path  # saved in the settings and used by this logic's runs and workers
        populateModelComboBox(self.ui.modelSelector)
        self.updateModelDescription()

    def _ensureModelDownloaded(self, modelId: str) -> bool:
        """A model listed only by URL is fetched when the user agrees, never silently; offline, the error says
        how to import a copy instead."""
        entry = self.logic.modelEntry(modelId)
        if entry is None or entry.available or not entry.url:
            return True  # built-in, shipped or cached (an unknown id is reported by the run itself)
        size = entry.details.get("size_bytes")
        sizeText = f"{size / 1e6:.0f} MB" if size else _("unknown size")
        question = _("Model {model} is not on this computer yet. Download it now ({size} from {url})?\n\n"
                     "Offline, download the file on another computer and use Import model.").format(
            model=modelId, size=sizeText, url=entry.url)
        if not slicer.util.confirmYesNoDisplay(question):
            return False
        with _errorsShown(_("The model could not be downloaded.")):
            self.appendLog(_("Downloading model {model} from {url}...").format(model=modelId, url=entry.url))
            slicer.app.processEvents()
            entry = self.logic.downloadModel(modelId)
            populateModelComboBox(self.ui.modelSelector)
            self.appendLog(_("Downloaded model {model} to {path}.").format(model=modelId, path=entry.path))
            return True
        return False

    def onImportModel(self) -> None:
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), _("Import a model file"), "",
                                              _("Model checkpoints (*.pt *.pth *.ckpt);;All files (*)"))
        if not path:
            return
        if not self._ensureDependencies(""):
            return
        with _errorsShown(_("The model could not be imported.")):
            entry = self.logic.importModel(path)
            populateModelComboBox(self.ui.modelSelector)
            self.appendLog(_("Imported model {model} into {folder}.").format(model=entry.model_id,
                                                                             folder=entry.path.parent))

    def onVerifyModels(self) -> None:
        with _errorsShown(_("Verification failed.")):
            for modelId, status in self.logic.verifyModels():
                self.appendLog(f"{modelId}: {status}")

    def onInstallDependencies(self) -> None:
        text = _("Install or repair the Python packages of this module (PyTorch through the PyTorch extension, "
                 "then MONAI, SciPy and scikit-image)? Slicer's own PyTorch and SimpleITK are not replaced.")
        if not slicer.util.confirmOkCancelDisplay(text, windowTitle=_("Install dependencies")):
            return
        with _errorsShown(_("Installing the dependencies failed.")):
            self.logic.installDependencies("", includeTorch=True, repair=True)
            self.appendLog(_("Dependencies are installed."))


@contextlib.contextmanager
def _errorsShown(message: str):
    """Show an error of the enclosed block in a dialog (with details) and swallow it: a button's slot must
    not end in a Python traceback the user never sees."""
    try:
        with slicer.util.tryWithErrorDisplay(message, waitCursor=True):
            yield
    except Exception:  # noqa: BLE001 - displayed by tryWithErrorDisplay
        logging.debug("COVIDLesionSeg: error shown to the user", exc_info=True)


def _formatSeconds(seconds: float) -> str:
    from COVIDLesionSegLib.worker import format_duration

    return format_duration(seconds)


# ============================================================================================================
# Logic (no Qt: runs in Slicer and on slicer-core)
# ============================================================================================================

class COVIDLesionSegLogic(ScriptedLoadableModuleLogic):
    """Segmentation logic usable without the widget (scripts, batch, tests).

    Slicer's camelCase face of the engine's :class:`COVIDLesionSegLib.slicer_logic.SegmentationLogic`
    (snake_case): it owns the settings (the model cache folder) and the services (models, dependencies) that
    the widget only asks the user about, so a script in the Python console gets the same behaviour.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._core = None
        #: How dependencies are installed (a strategy object, ``COVIDLesionSegLib.dependencies``).
        self.installer = None

    @property
    def core(self):
        if self._core is None:
            from COVIDLesionSegLib.slicer_logic import SegmentationLogic

            self._core = SegmentationLogic(slicer.mrmlScene)
        return self._core

    def getParameterNode(self):
        return COVIDLesionSegParameterNode(super().getParameterNode())

    # -- settings ----------------------------------------------------------------------------------------------
    @property
    def modelsPath(self) -> Path:
        """The model cache folder: the one saved in Slicer's settings (``COVIDLesionSeg/ModelCacheFolder``),
        else ``COVIDLESIONSEG_MODEL_DIR``, else ``~/.cache/covidlesionseg/models``. Setting it saves it."""
        return self.core.model_folder

    @modelsPath.setter
    def modelsPath(self, path) -> None:
        self.core.model_folder = path

    # -- queries ------------------------------------------------------------------------------------------------
    def inputProblem(self, volumeNode) -> Optional[str]:
        """None when ``volumeNode`` can be segmented, else the reason (for disabling the Segment button)."""
        return self.core.input_problem(volumeNode)

    def existingGeneratedSegments(self, segmentationNode) -> list:
        return self.core.existing_generated_segments(segmentationNode)

    # -- running ------------------------------------------------------------------------------------------------
    def process(self, inputVolume, outputSegmentation=None, model: Optional[str] = None, device="auto",
                lungsOnly: bool = False, waitForCompletion: bool = True, progressCallback=None,
                replaceExisting=None, lungModel: Optional[str] = None, resultsTable=None,
                useWorker: Optional[bool] = None, showSurfaces: bool = False, logCallback=None, fast: bool = False):
        """Segment the lungs and COVID-19 infection of ``inputVolume``.

        Args:
            inputVolume: ``vtkMRMLScalarVolumeNode`` with a chest CT in Hounsfield units.
            outputSegmentation: ``vtkMRMLSegmentationNode`` to write into; None creates one when the result
                arrives (named after the input).
            model: infection model id (None: the catalogue's default); ``lungModel`` likewise for the lungs.
            device: "auto", "cpu", "cuda" or a :class:`Device`.
            lungsOnly: segment the lungs only (no infection segment).
            waitForCompletion: block until done (True; in this process unless ``useWorker``) or start the
                worker process and return the running run at once (False; call ``run.poll()`` from a timer).
            progressCallback: called with a ``COVIDLesionSegLib.worker.Progress``; in blocking in-process runs
                it may raise ``COVIDLesionSegLib.progress.Cancelled`` to stop.
            replaceExisting: this module's earlier segments in ``outputSegmentation``: True replaces them,
                False keeps them (renamed "(previous)"), None replaces the unedited ones and keeps the edited
                ones. The user's own segments are never touched.
            resultsTable: ``vtkMRMLTableNode`` for the quantification (None: a new one).
            useWorker: blocking runs only: run in a worker process (True) or in this process (None/False).
            showSurfaces: also build the closed-surface (3D) representation.
            logCallback: called with each line for the user's log.
            fast: the fast mode (coarser grids, about twice as fast; ``covidlesionseg segment --fast``).

        Returns:
            a ``COVIDLesionSegLib.slicer_logic.SegmentationRun``; ``run.result`` holds the segmentation node,
            the table node and the report once it has succeeded.

        Raises (blocking runs): InputError, ModelError, Cancelled, WorkerError (``COVIDLesionSegLib.errors``);
        background runs raise only for an invalid input found before the worker starts.
        """
        if isinstance(device, Device):
            device = device.value
        return self.core.process(inputVolume, outputSegmentation, model=model, lung_model=lungModel,
                                 device=device, lungs_only=lungsOnly, wait_for_completion=waitForCompletion,
                                 use_worker=useWorker, progress_callback=progressCallback,
                                 log_callback=logCallback, replace_existing=replaceExisting,
                                 results_table=resultsTable, show_surfaces=showSurfaces, fast=fast)

    def exportTableCsv(self, tableNode, path) -> Path:
        from COVIDLesionSegLib.mrml import write_table_csv

        return write_table_csv(tableNode, path)

    def storedReport(self, tableNode):
        """The JSON report a run left on its results table, or None."""
        from COVIDLesionSegLib.slicer_logic import stored_report

        return stored_report(tableNode)

    def writeReport(self, volumeNode, segmentationNode, report, pdfPath, htmlPath):
        """Write the case report (PDF and HTML) of a result; returns both paths."""
        from COVIDLesionSegLib.slicer_logic import write_case_report

        return write_case_report(volumeNode, segmentationNode, report, pdfPath, htmlPath)

    def dicomSourceFiles(self, volumeNode) -> list:
        """The DICOM files the volume was loaded from (empty when it did not come from DICOM)."""
        from COVIDLesionSegLib.slicer_logic import dicom_source_files

        return dicom_source_files(volumeNode)

    def exportDicom(self, volumeNode, segmentationNode, report, folder, sourceFiles=None):
        """Write DICOM SEG + SR for a result whose input came from DICOM (see ``slicer_logic.export_dicom``)."""
        from COVIDLesionSegLib.slicer_logic import export_dicom

        return export_dicom(volumeNode, segmentationNode, report, folder, sourceFiles)

    def installPackages(self, requirements) -> None:
        """pip-install requirements, never letting pip replace Slicer's own torch or SimpleITK."""
        from COVIDLesionSegLib.dependencies import SlicerInstaller

        SlicerInstaller.pip_install(list(requirements))

    # -- models --------------------------------------------------------------------------------------------------------
    def importModel(self, path):
        from COVIDLesionSegLib import catalogue

        return catalogue.import_model(path)

    def modelEntry(self, modelId: str):
        """The catalogue entry of ``modelId``, or None for an unknown id."""
        from COVIDLesionSegLib import catalogue
        from COVIDLesionSegLib.errors import ModelError

        try:
            return catalogue.get_entry(modelId)
        except ModelError:
            return None

    def downloadModel(self, modelId: str):
        """Fetch a model listed with a download URL into the model cache (checked against its sha256)."""
        from COVIDLesionSegLib import catalogue

        return catalogue.download_model(modelId)

    def verifyModels(self) -> list:
        from COVIDLesionSegLib import catalogue

        return [(entry.model_id, status) for entry, status in catalogue.verify_models()]

    # -- dependencies (decided and installed by COVIDLesionSegLib.dependencies) -------------------------------------
    @staticmethod
    def modelNeedsTorch(modelId: str) -> bool:
        """Learned models need torch; the built-in Hounsfield-unit models do not. "" means a model import."""
        from COVIDLesionSegLib.dependencies import model_needs_torch

        return model_needs_torch(modelId)

    def missingDependencies(self, modelId: str, includeTorch: Optional[bool] = None) -> list:
        """Pip requirement strings (and "torch") that are not importable for running ``modelId``."""
        from COVIDLesionSegLib.dependencies import missing_dependencies

        return missing_dependencies(modelId, includeTorch)

    def installDependencies(self, modelId: str, includeTorch: Optional[bool] = None, repair: bool = False) -> None:
        """Install what ``modelId`` needs (the caller asked the user first); ``repair`` reinstalls. Needs the
        Slicer application (``COVIDLesionSegLib.dependencies.SlicerInstaller``)."""
        if self.installer is None:
            from COVIDLesionSegLib.dependencies import SlicerInstaller

            self.installer = SlicerInstaller()
        self.installer.install(modelId, includeTorch, repair)


# ============================================================================================================
# Self-test (ctest in a Slicer build; also run by the pytest suite on slicer-core)
# ============================================================================================================

class COVIDLesionSegTest(ScriptedLoadableModuleTest):
    """End-to-end checks on a synthetic chest CT with known lungs and lesions (no download needed)."""

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_SegmentPhantom()
        self.setUp()
        self.test_BackgroundRunAndRerun()

    def _phantomVolume(self, name="Phantom CT"):
        from COVIDLesionSegLib.mrml import volume_node_from_image
        from COVIDLesionSegLib.phantom import make_chest_phantom

        image, truth = make_chest_phantom()
        return volume_node_from_image(image, slicer.mrmlScene, name), truth

    def test_SegmentPhantom(self):
        """Blocking in-process run: segments, colours, terminology, geometry, table, accuracy."""
        import numpy as np

        from COVIDLesionSegLib import mrml
        from COVIDLesionSegLib.segments import SEGMENTS

        self.delayDisplay("Segmenting a synthetic chest CT")
        volume, truth = self._phantomVolume()
        progress = []
        run = COVIDLesionSegLogic().process(volume, None, waitForCompletion=True,
                                            progressCallback=lambda p: progress.append(p.overall))
        self.assertEqual(run.state, "succeeded")
        self.assertTrue(progress and progress == sorted(progress), "progress must be reported and never go back")
        segmentation = run.result.segmentation_node
        names = [segmentation.GetSegmentation().GetNthSegment(i).GetName()
                 for i in range(segmentation.GetSegmentation().GetNumberOfSegments())]
        self.assertEqual(names, [s.name for s in SEGMENTS])
        for definition in SEGMENTS:
            segment = segmentation.GetSegmentation().GetSegment(run.result.segment_ids[definition.name])
            self.assertEqual(tuple(round(c, 6) for c in segment.GetColor()),
                             tuple(round(c, 6) for c in definition.color))
            entry = vtk.reference("")
            self.assertTrue(segment.GetTag(segment.GetTerminologyEntryTagName(), entry))
            self.assertEqual(str(entry.get()), definition.terminology_entry())

        masks = mrml.masks_from_segmentation(segmentation, volume)
        # The phantom is stored in LPS with identity direction: its truth arrays are on the input grid.
        for name, key in (("Right lung", "right_lung"), ("Left lung", "left_lung")):
            predicted, reference = masks[name], truth[key]
            dice = 2 * np.count_nonzero(predicted & reference) / (predicted.sum() + reference.sum())
            self.assertGreater(dice, 0.85, f"{name}: Dice {dice:.3f}")
        self.assertTrue(masks["COVID-19 infection"].any())

        rows = {row["Region"]: row for row in mrml.table_as_dicts(run.result.table_node)}
        both = mrml.quantity_entry(run.result.quantities, "both")
        self.assertAlmostEqual(rows["Both lungs"]["Lung volume"], both["volume_ml"], places=6)
        self.assertAlmostEqual(rows["Both lungs"]["Infected"], both["infected_percent"], places=6)
        self.delayDisplay("Phantom segmented")

    def test_BackgroundRunAndRerun(self):
        """Worker-process run (as the GUI does it), then a re-run that keeps a user-added segment."""

        self.delayDisplay("Segmenting in a worker process")
        volume, _truth = self._phantomVolume("Phantom CT 2")
        logic = COVIDLesionSegLogic()
        run = logic.process(volume, None, lungsOnly=True, waitForCompletion=False)
        run.wait(timeout=300)
        self.assertEqual(run.state, "succeeded", run.error)
        segmentation = run.result.segmentation_node
        self.assertEqual(segmentation.GetSegmentation().GetNumberOfSegments(), 2)

        # The user adds a segment of their own; a re-run must not remove it.
        userId = segmentation.GetSegmentation().AddEmptySegment("", "My notes", [0.2, 0.8, 0.2])
        rerun = logic.process(volume, segmentation, lungsOnly=True, waitForCompletion=True)
        self.assertEqual(rerun.state, "succeeded")
        names = sorted(segmentation.GetSegmentation().GetNthSegment(i).GetName()
                       for i in range(segmentation.GetSegmentation().GetNumberOfSegments()))
        self.assertEqual(names, sorted(["Right lung", "Left lung", "My notes"]))
        self.assertIsNotNone(segmentation.GetSegmentation().GetSegment(userId))
        from COVIDLesionSegLib.mrml import quantity_entry

        self.assertGreater(quantity_entry(rerun.result.quantities, "both")["volume_ml"], 0)
        self.delayDisplay("Worker run and re-run passed")
