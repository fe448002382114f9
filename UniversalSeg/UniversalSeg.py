"""UniversalSeg: segment abdominal organs and tumours in CT by name or by clicking on them.

This file is the Slicer entry point only: module description, a thin widget that draws the panel and
forwards to the logic, and the self-test. All work is done by ``UniversalSegSlicer`` (Qt-free, tested
with pytest on the slicer-core wheel) and the ``UniversalSegLib`` library; the network runs in a separate
worker process (``UniversalSegLib.worker``), so Slicer's own process never imports PyTorch or MONAI.
"""
import importlib.util
import logging
import os
import sys

import ctk
import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from UniversalSegSlicer import ClassCatalog, ExistingSegmentsError, JobCancelled, SegmentationLogic
from UniversalSegSlicer.batch_review import BatchReview
from UniversalSegSlicer.dependencies import check_requirements, plan_installation, run_installation
from UniversalSegSlicer.export import suggest_case_id
from UniversalSegSlicer.jobs import PREVIEW_SHOWN_TEXT
from UniversalSegSlicer.logic import worker_python
from UniversalSegSlicer.messages import plain_message
from UniversalSegSlicer.parameters import DEVICES, MODES, RUNTIMES, SETTINGS_KEYS, ModuleParameters

CUSTOM_MODEL = "__file__"
#: writeParameterNode's default: keep the stored "show a quick result first" choice (or its absence).
_UNCHANGED = object()
#: Top-level packages of this extension that Reload must import afresh (not only UniversalSeg.py).
RELOADED_PACKAGES = ("UniversalSegSlicer", "UniversalSegLib")


class UniversalSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "UniversalSeg"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["UniversalSeg developers"]
        self.parent.helpText = (
            "Segment 25 abdominal organs and 6 tumour types in CT with one text-driven network (a "
            "re-implementation of the CLIP-Driven Universal Model). Choose classes by name or click on the "
            "image, press Apply, keep working while it runs (the network runs in a background process that "
            "keeps the model loaded), then review and correct the segments and export them for training. See "
            "the <a href='https://github.com/universalseg/UniversalSeg'>documentation</a>.")
        self.parent.acknowledgementText = (
            "Method: Liu et al., CLIP-Driven Universal Model for Organ Segmentation and Tumor Detection, ICCV "
            "2023. The official weights are CC BY-NC-ND 4.0 (non-commercial); UniversalSeg itself is Apache-2.0.")
        slicer.app.connect("startupCompleted()", self.onStartupCompleted)

    @staticmethod
    def onStartupCompleted():
        """Load the extension's terminology (portal/splenic vein, femoral heads) so Slicer's terminology
        selector can show every class."""
        from UniversalSegSlicer.terminology import load_terminology

        try:
            load_terminology(slicer.modules.terminologies.logic())
        except Exception as error:  # a missing terminology must not stop Slicer from starting
            logging.warning(f"UniversalSeg: the class terminology could not be loaded: {error}")


class UniversalSegLogic(SegmentationLogic, ScriptedLoadableModuleLogic):
    """Slicer's logic class: the Qt-free ``SegmentationLogic`` bound to the application's scene.

    ``SegmentationLogic`` comes first in the bases: ``ScriptedLoadableModuleLogic.__init__`` calls
    ``super().__init__()`` without arguments, which must reach ``object`` and not a class that needs the scene.
    """

    def __init__(self, parent=None):
        ScriptedLoadableModuleLogic.__init__(self, parent)
        SegmentationLogic.__init__(self, slicer.mrmlScene)


class UniversalSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.job = None
        self.jobFinished = None  # what to do on the main thread when self.job is done
        self.jobPreview = None  # what to do when self.job's quick result arrives (progressive runs)
        self.sceneChanged = False  # whether the finishing job already put something into the scene
        self.replaceConfirmed = False
        self.pendingClick = None
        self.clickNode = None
        self.batchReview = None  # the opened batch folder (BatchReview)
        self.parameterNode = None
        self.updatingGUI = False
        self.catalog = ClassCatalog()
        self.timer = qt.QTimer()
        self.timer.setInterval(100)  # polls the worker's answers: Cancel and progress feel immediate
        self.timer.connect("timeout()", self.onTimer)

    # ------------------------------------------------------------------------------------------- setup
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/UniversalSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = UniversalSegLogic()
        self.ui.progressBar.hide()
        self.ui.cancelButton.enabled = False
        self.ui.reviewTableWidget.setHorizontalHeaderLabels(["Segment", "Review"])
        self.ui.batchQueueTableWidget.setHorizontalHeaderLabels(["Case", "Priority", "Top reasons"])
        self.ui.batchQueueTableWidget.horizontalHeader().setStretchLastSection(True)
        for value, label in DEVICES:
            self.ui.deviceComboBox.addItem(label, value)
        for value, label in MODES:
            self.ui.modeComboBox.addItem(label, value)
        for value, label in RUNTIMES:
            self.ui.runtimeComboBox.addItem(label, value)
        self.populateModels()
        settings = qt.QSettings()
        self.selectComboData(self.ui.modelComboBox, settings.value(SETTINGS_KEYS["model"], "swinunetr"))
        self.selectComboData(self.ui.deviceComboBox, settings.value(SETTINGS_KEYS["device"], "auto"))
        self.selectComboData(self.ui.modeComboBox, settings.value(SETTINGS_KEYS["mode"], "default"))
        self.selectComboData(self.ui.runtimeComboBox, settings.value(SETTINGS_KEYS["runtime"], "auto"))
        self.catalog = ClassCatalog(self.logic.model_classes(self.model()))
        self.populateClasses()

        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSettingsChanged)
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onOutputChanged)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onSettingsChanged)
        self.ui.modeComboBox.connect("currentIndexChanged(int)", self.onSettingsChanged)
        self.ui.runtimeComboBox.connect("currentIndexChanged(int)", self.onSettingsChanged)
        self.ui.show3DCheckBox.connect("toggled(bool)", self.onSettingsChanged)
        self.ui.progressiveCheckBox.connect("toggled(bool)", self.onProgressiveToggled)
        self.ui.checkpointPathLineEdit.connect("currentPathChanged(QString)", self.onModelChanged)
        self.ui.classTreeWidget.connect("itemChanged(QTreeWidgetItem*,int)", self.onSettingsChanged)
        self.ui.classSearchLineEdit.connect("textChanged(QString)", self.onSearch)
        self.ui.presetComboBox.connect("activated(int)", self.onPreset)
        self.ui.applyButton.connect("clicked()", self.onApply)
        self.ui.cancelButton.connect("clicked()", self.onCancel)
        self.ui.installDependenciesButton.connect("clicked()", self.onInstallDependencies)
        self.ui.downloadModelButton.connect("clicked()", self.onDownloadModel)
        self.ui.importModelButton.connect("clicked()", self.onImportModel)
        self.ui.openModelFolderButton.connect("clicked()", self.onOpenModelFolder)
        self.ui.clearModelCacheButton.connect("clicked()", self.onClearModelCache)
        self.ui.releaseModelButton.connect("clicked()", self.onReleaseModel)
        self.ui.pickByClickButton.connect("toggled(bool)", self.onPickByClick)
        self.ui.acceptButton.connect("clicked()", lambda: self.onSetReview("accepted"))
        self.ui.unreviewButton.connect("clicked()", lambda: self.onSetReview("unreviewed"))
        self.ui.exportButton.connect("clicked()", self.onExport)
        self.ui.reviewTableWidget.connect("itemSelectionChanged()", self.showSegmentReasons)
        self.ui.batchFolderLineEdit.connect("currentPathChanged(QString)", self.onBatchFolderChanged)
        self.ui.batchQueueTableWidget.connect("cellDoubleClicked(int,int)", lambda row, column: self.onBatchLoad())
        self.ui.batchLoadButton.connect("clicked()", self.onBatchLoad)
        self.ui.batchNextButton.connect("clicked()", self.onBatchNext)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)  # .mrb loaded
        self.initializeParameterNode()
        self.updateDependencyStatus()

    def enter(self):
        self.initializeParameterNode()
        self.refreshReview()  # segments may have been edited in Segment Editor meanwhile

    def exit(self):
        self.ui.pickByClickButton.checked = False  # leaves place mode and removes the helper markup
        self.setParameterNode(None)

    def cleanup(self):
        """Module unloaded, Reload, or Slicer closing: never waits for a running job."""
        if hasattr(self, "ui"):  # setup() ran
            self.onPickByClick(False)
        if self.job is not None:
            self.job.cancel()
            self.job = None
        self.timer.stop()
        self.removeObservers()
        if self.logic is not None:
            self.logic.shutdown()  # stops the worker: its memory (and the GPU's) is given back

    def onReload(self):
        """Reload this module and its packages (UniversalSeg.py alone would keep the old logic code)."""
        for name in [name for name in sys.modules if name.split(".")[0] in RELOADED_PACKAGES]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    # --------------------------------------------------------------------------------- parameter node
    def onSceneStartClose(self, caller, event):
        self.onCancel()
        self.ui.pickByClickButton.checked = False
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.batchReview is not None:
            self.batchReview.close_case()  # its nodes went with the scene; its probabilities go too
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onSceneEndImport(self, caller, event):
        if self.parent.isEntered:  # a loaded .mrb brings its own parameter node
            self.initializeParameterNode()

    def initializeParameterNode(self):
        node = self.logic.getParameterNode()
        parameters = ModuleParameters.read(node)
        if parameters.input_volume_id is None or slicer.mrmlScene.GetNodeByID(parameters.input_volume_id) is None:
            volume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if volume is not None:
                parameters.input_volume_id = volume.GetID()
                parameters.write(node)
        self.setParameterNode(node)

    def setParameterNode(self, node):
        """Show ``node`` in the panel and follow its changes (undo, a loaded scene, a script)."""
        if self.parameterNode is not None:
            self.removeObserver(self.parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.parameterNode = node
        if node is not None:
            self.addObserver(node, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
            self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None):
        if self.parameterNode is None or self.updatingGUI:
            return
        parameters = ModuleParameters.read(self.parameterNode)
        self.updatingGUI = True
        try:
            self.ui.inputVolumeSelector.setCurrentNodeID(parameters.input_volume_id)
            self.ui.outputSegmentationSelector.setCurrentNodeID(parameters.output_segmentation_id)
            if self.ui.modelComboBox.findData(parameters.model) >= 0:
                self.selectComboData(self.ui.modelComboBox, parameters.model)
            elif parameters.model and os.path.isfile(parameters.model):
                self.selectComboData(self.ui.modelComboBox, CUSTOM_MODEL)
                self.ui.checkpointPathLineEdit.currentPath = parameters.model
            self.selectComboData(self.ui.deviceComboBox, parameters.device)
            self.selectComboData(self.ui.modeComboBox, parameters.mode)
            self.selectComboData(self.ui.runtimeComboBox, parameters.runtime)
            self.ui.show3DCheckBox.checked = parameters.show_3d
            self.ui.progressiveCheckBox.checked = self.progressiveChoice(parameters)
            self.onModelChanged()  # the model's classes, before checking the stored ones
            wasBlocked = self.ui.classTreeWidget.blockSignals(True)
            for item in self.classItems():
                checked = item.data(0, qt.Qt.UserRole) in parameters.classes
                item.setCheckState(0, qt.Qt.Checked if checked else qt.Qt.Unchecked)
            self.ui.classTreeWidget.blockSignals(wasBlocked)
        finally:
            self.updatingGUI = False
        self.updateDependentWidgets()

    def onProgressiveToggled(self, checked):
        if not self.updatingGUI:
            self.writeParameterNode(progressive=bool(checked))
            self.updateDependentWidgets()

    def writeParameterNode(self, progressive=_UNCHANGED):
        if self.parameterNode is None:
            return
        volume = self.ui.inputVolumeSelector.currentNode()
        output = self.ui.outputSegmentationSelector.currentNode()
        stored = ModuleParameters.read(self.parameterNode)
        device = self.ui.deviceComboBox.currentData
        # "Show a quick result first" is a choice only once the user clicked it (onProgressiveToggled);
        # until then it follows the device, so other settings carry the stored value over unchanged
        progressive = stored.progressive if progressive is _UNCHANGED else progressive
        chosen = ModuleParameters(volume.GetID() if volume else None, output.GetID() if output else None,
                                  self.checkedClasses(), str(self.model() or ""), device,
                                  self.ui.show3DCheckBox.checked, self.ui.modeComboBox.currentData,
                                  self.ui.runtimeComboBox.currentData, progressive)
        if chosen != stored:
            self.updatingGUI = True  # our own change: no need to read it back
            try:
                chosen.write(self.parameterNode)
            finally:
                self.updatingGUI = False

    def progressiveChoice(self, parameters):
        """"Show a quick result first": the stored choice, else on for a CPU device."""
        if parameters.progressive is not None:
            return parameters.progressive
        return self.logic.progressive_default(parameters.device)

    # -------------------------------------------------------------------------------- what the user chose
    def populateClasses(self):
        self.ui.classTreeWidget.clear()
        for group in self.catalog.groups():
            parent = qt.QTreeWidgetItem(self.ui.classTreeWidget, [group.title])
            parent.setFlags(parent.flags() | qt.Qt.ItemIsAutoTristate | qt.Qt.ItemIsUserCheckable)
            for info in group.classes:
                child = qt.QTreeWidgetItem(parent, [info.display_name])
                child.setFlags(child.flags() | qt.Qt.ItemIsUserCheckable)
                child.setCheckState(0, qt.Qt.Unchecked)
                child.setData(0, qt.Qt.UserRole, info.key)
                child.setToolTip(0, ", ".join(info.synonyms) or info.display_name)
            parent.setExpanded(True)
        self.ui.presetComboBox.clear()
        self.ui.presetComboBox.addItem("Choose a preset...", None)
        for label, indices in self.catalog.presets():
            self.ui.presetComboBox.addItem(label, ",".join(self.catalog.taxonomy[i].key for i in indices))

    def classItems(self):
        root = self.ui.classTreeWidget.invisibleRootItem()
        return [root.child(g).child(c) for g in range(root.childCount()) for c in range(root.child(g).childCount())]

    def checkedClasses(self):
        return [item.data(0, qt.Qt.UserRole) for item in self.classItems() if item.checkState(0) == qt.Qt.Checked]

    def setCheckedClasses(self, keys):
        wasBlocked = self.ui.classTreeWidget.blockSignals(True)
        for item in self.classItems():
            item.setCheckState(0, qt.Qt.Checked if item.data(0, qt.Qt.UserRole) in keys else qt.Qt.Unchecked)
        self.ui.classTreeWidget.blockSignals(wasBlocked)
        self.onSettingsChanged()

    def onSearch(self, text):
        visible = {self.catalog.taxonomy[i].key for i in self.catalog.search(text)}
        for item in self.classItems():
            item.setHidden(item.data(0, qt.Qt.UserRole) not in visible)

    def onPreset(self, row):
        keys = self.ui.presetComboBox.itemData(row)
        if keys:
            self.setCheckedClasses(keys.split(","))
        self.ui.presetComboBox.setCurrentIndex(0)

    def populateModels(self):
        """Registered models (downloaded or not) and "Checkpoint file..."; read without PyTorch."""
        current = self.ui.modelComboBox.currentData
        wasBlocked = self.ui.modelComboBox.blockSignals(True)
        self.ui.modelComboBox.clear()
        for choice in self.logic.model_choices():
            suffix = "" if choice.path else f" - not downloaded ({choice.size_mb} MB)"
            self.ui.modelComboBox.addItem(choice.label + suffix, choice.name)
        self.ui.modelComboBox.addItem("Checkpoint file...", CUSTOM_MODEL)
        self.selectComboData(self.ui.modelComboBox, current)
        self.ui.modelComboBox.blockSignals(wasBlocked)

    @staticmethod
    def selectComboData(combo, value):
        index = combo.findData(value)
        if index >= 0:
            combo.setCurrentIndex(index)

    def model(self):
        name = self.ui.modelComboBox.currentData
        return self.ui.checkpointPathLineEdit.currentPath if name == CUSTOM_MODEL else name

    def onOutputChanged(self, node):
        self.onSettingsChanged()
        self.refreshReview()

    def onModelChanged(self, *args):
        """Offer the classes of the selected model: a fine-tuned checkpoint may know other classes."""
        if self.logic is None:
            return
        taxonomy = self.logic.model_classes(self.model())
        if [c.key for c in taxonomy] != [c.key for c in self.catalog.taxonomy]:
            checked = self.checkedClasses()
            self.catalog = ClassCatalog(taxonomy)
            wasBlocked = self.ui.classTreeWidget.blockSignals(True)
            self.populateClasses()
            known = {c.key for c in taxonomy}
            for item in self.classItems():
                if item.data(0, qt.Qt.UserRole) in checked and item.data(0, qt.Qt.UserRole) in known:
                    item.setCheckState(0, qt.Qt.Checked)
            self.ui.classTreeWidget.blockSignals(wasBlocked)
        if not self.updatingGUI:
            self.onSettingsChanged()

    def onSettingsChanged(self, *args):
        """Store the choices, and update everything that depends on them (labels, buttons)."""
        if self.logic is None or self.updatingGUI:
            return
        self.writeParameterNode()
        qt.QSettings().setValue(SETTINGS_KEYS["model"], self.ui.modelComboBox.currentData)
        qt.QSettings().setValue(SETTINGS_KEYS["device"], self.ui.deviceComboBox.currentData)
        qt.QSettings().setValue(SETTINGS_KEYS["mode"], self.ui.modeComboBox.currentData)
        qt.QSettings().setValue(SETTINGS_KEYS["runtime"], self.ui.runtimeComboBox.currentData)
        self.updateDependentWidgets()

    def updateDependentWidgets(self):
        isFile = self.ui.modelComboBox.currentData == CUSTOM_MODEL
        self.ui.checkpointPathLineEdit.setVisible(isFile)
        classes = self.checkedClasses()
        volume = self.ui.inputVolumeSelector.currentNode()
        selected = [info for info in self.catalog.taxonomy if info.key in classes]
        self.ui.selectionLabel.text = ClassCatalog.describe(selected)
        self.ui.licenseLabel.text = self.logic.model_license(self.model()) if self.model() else ""
        if volume is not None:
            estimate = self.logic.estimate(volume, self.ui.deviceComboBox.currentData, max(1, len(classes)),
                                           self.model(), mode=self.ui.modeComboBox.currentData,
                                           runtime=self.ui.runtimeComboBox.currentData)
            self.ui.estimateLabel.text = estimate.text()
        if self.parameterNode is not None:  # a choice not made yet follows the device
            wasBlocked = self.ui.progressiveCheckBox.blockSignals(True)
            self.ui.progressiveCheckBox.checked = self.progressiveChoice(ModuleParameters.read(self.parameterNode))
            self.ui.progressiveCheckBox.blockSignals(wasBlocked)
        # the worker previews only the exact default mode, and never on a GPU (the exact result comes in seconds)
        self.ui.progressiveCheckBox.enabled = (self.ui.modeComboBox.currentData == "default"
                                               and self.ui.deviceComboBox.currentData != "cuda")
        idle = self.job is None
        # One job at a time: a download, an import or a cache change during a run would replace the running
        # job (its result lost) or pull the model from under the worker.
        self.ui.applyButton.enabled = idle and volume is not None and bool(classes)
        self.ui.applyButton.toolTip = "" if self.ui.applyButton.enabled or not idle else \
            "Select an input volume and classes."
        self.ui.downloadModelButton.enabled = idle and not isFile
        for button in (self.ui.importModelButton, self.ui.clearModelCacheButton, self.ui.releaseModelButton,
                       self.ui.installDependenciesButton):
            button.enabled = idle
        self.ui.cancelButton.enabled = not idle

    # ------------------------------------------------------------------------------------- dependencies
    def updateDependencyStatus(self):
        """From the installed packages' metadata only: nothing is imported into Slicer to check."""
        problems = [status for status in check_requirements() if not status.ok]
        self.ui.dependencyStatusLabel.text = ("All installed." if not problems else
                                              "Missing or incompatible: " + "; ".join(s.describe() for s in problems))
        self.ui.installDependenciesButton.enabled = bool(problems) and self.job is None
        if problems:
            self.ui.setupCollapsibleButton.collapsed = False
        return not problems

    def onInstallDependencies(self):
        # the import check runs in a separate Python: a DLL loaded here would stay locked during pip's install
        plan = plan_installation(check_requirements(probe_imports=True, python=worker_python()))
        if plan.empty and not plan.blocked:
            self.updateDependencyStatus()
            return True
        if plan.empty or not slicer.util.confirmOkCancelDisplay(plan.describe(), "Install dependencies"):
            if plan.blocked:
                slicer.util.errorDisplay(plan.describe())
            return False

        def installTorch(specifier):
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                return None
            return PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                                  torchVersionRequirement=specifier)

        with slicer.util.tryWithErrorDisplay("Installing the dependencies failed.", waitCursor=True):
            self.logic.release_model()  # a worker may hold the old packages' files open
            run_installation(plan, slicer.util.pip_install, installTorch)
            self.populateModels()
            slicer.util.infoDisplay("Packages installed. The next run uses them (no restart needed: the "
                                    "network runs in its own process).")
        return self.updateDependencyStatus()

    # ---------------------------------------------------------------------------------------- models
    def onDownloadModel(self):
        name = self.ui.modelComboBox.currentData
        if not slicer.util.confirmOkCancelDisplay(
                f"Download model '{name}'?\n\nLicence: {self.logic.model_license(name)}", "Download model"):
            return

        def onDownloaded(job):
            job.result()  # raises the download's error, shown by onTimer
            self.populateModels()
            self.selectComboData(self.ui.modelComboBox, name)
            self.ui.statusLabel.text = f"Model '{name}' downloaded."

        with slicer.util.tryWithErrorDisplay("Could not start the download.", waitCursor=True):
            self.startJob(self.logic.start_download(name), onDownloaded)

    def onImportModel(self):
        path = qt.QFileDialog.getOpenFileName(self.parent, "Import official checkpoint", "", "Checkpoints (*.pth)")
        if not path:
            return

        def onImported(job):
            job.result()
            self.populateModels()
            self.ui.statusLabel.text = f"Imported {os.path.basename(path)}."

        with slicer.util.tryWithErrorDisplay("Could not start the import.", waitCursor=True):
            self.startJob(self.logic.start_import(path), onImported)

    def onOpenModelFolder(self):
        folder = self.logic.model_folder()
        folder.mkdir(parents=True, exist_ok=True)
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(folder)))

    def onClearModelCache(self):
        folder = self.logic.model_folder()
        if not slicer.util.confirmOkCancelDisplay(
                f"Delete every downloaded and imported model in\n{folder}?\nThey can be downloaded again.",
                "Clear model cache"):
            return
        with slicer.util.tryWithErrorDisplay("The models could not all be deleted.", waitCursor=True):
            freed = self.logic.clear_model_cache()
            self.populateModels()
            self.ui.statusLabel.text = f"Model cache cleared ({freed / 1e6:.0f} MB freed)."
        self.updateDependentWidgets()

    def onReleaseModel(self):
        self.logic.release_model()
        self.ui.statusLabel.text = "Model memory released; the next run loads the model again."

    # ----------------------------------------------------------------------------------------- running
    def startJob(self, job, onFinished, onPreview=None):
        self.job, self.jobFinished, self.jobPreview = job, onFinished, onPreview
        self.ui.progressBar.value = 0
        self.ui.progressBar.show()
        self.updateDependentWidgets()
        self.timer.start()

    def onApply(self):
        if not self.updateDependencyStatus() and not self.onInstallDependencies():
            return
        volume = self.ui.inputVolumeSelector.currentNode()
        output = self.ui.outputSegmentationSelector.currentNode()
        classes = self.catalog.resolve(self.checkedClasses())
        existing = self.logic.existing_classes(output, classes)
        self.replaceConfirmed = False
        if existing:  # re-running a class: ask before replacing the segment (it may hold corrections)
            self.replaceConfirmed = slicer.util.confirmYesNoDisplay(
                f"{output.GetName()} already has {ClassCatalog.describe(existing)}. Replace these segments with "
                "the new result? Answer No to segment only the other classes. Other segments are always kept.")
            if not self.replaceConfirmed:
                classes = [c for c in classes if c not in existing]
                if not classes:
                    return
        with slicer.util.tryWithErrorDisplay("Could not start the segmentation.", waitCursor=True):
            mode = self.ui.modeComboBox.currentData
            job = self.logic.start_segmentation(volume, classes, self.model(), self.ui.deviceComboBox.currentData,
                                                mode=mode, runtime=self.ui.runtimeComboBox.currentData,
                                                progressive=self.ui.progressiveCheckBox.checked and mode == "default")
            self.startJob(job, lambda job: self.onSegmentationFinished(job, volume),
                          lambda job: self.onPreviewArrived(job, volume))

    def onPreviewArrived(self, job, volume):
        """Show the quick (fast layout) result while the exact one is computed; it is replaced when that
        arrives. Never 3D: closed surfaces would hold up the panel for a result about to be replaced."""
        output = self.ui.outputSegmentationSelector.currentNode()
        # classes that already have a segment keep it until the exact result (a preview never replaces one)
        applied = self.logic.apply_preview(job, volume, output, show_3d=False)
        if applied is not None:
            self.ui.outputSegmentationSelector.setCurrentNode(applied.segmentation_node)
            slicer.util.setSliceViewerLayers(background=volume)
            self.ui.statusLabel.text = PREVIEW_SHOWN_TEXT
            self.refreshReview()

    def onSegmentationFinished(self, job, volume):
        output = self.ui.outputSegmentationSelector.currentNode()
        try:
            applied = self.logic.apply_result(job, volume, output, self.replaceConfirmed, self.ui.show3DCheckBox.checked)
        except ExistingSegmentsError as error:  # a segment appeared while the job ran
            if not slicer.util.confirmYesNoDisplay(str(error)):
                self.ui.statusLabel.text = "Not applied: the existing segments were kept."
                return
            applied = self.logic.apply_result(job, volume, output, True, self.ui.show3DCheckBox.checked)
        self.sceneChanged = True
        self.ui.outputSegmentationSelector.setCurrentNode(applied.segmentation_node)
        slicer.util.setSliceViewerLayers(background=volume)
        loaded = "" if job.result().info.get("model_loaded") else ", model already loaded"
        table = f" Statistics: table '{applied.table_node.GetName()}'." if applied.table_node is not None else ""
        if applied.statistics_error:
            table = f" The statistics table could not be updated: {applied.statistics_error}"
        self.ui.statusLabel.text = (f"Done in {job.elapsed:.0f} s{loaded}: {len(applied.segment_ids)} segments."
                                    f"{table}{self.logic.kept_previews_note(applied)}")
        self.refreshReview()

    def onCancel(self):
        if self.job is not None:
            self.job.cancel()  # ends the job now; the worker stops at its next window
            self.onTimer()

    def onTimer(self):
        job = self.job
        if job is None:
            self.timer.stop()
            return
        finished = job.done()
        if not finished:
            if self.jobPreview is not None and self.logic.preview_pending(job):
                # a failure is shown once: apply_preview marks the preview handled before it can fail
                with slicer.util.tryWithErrorDisplay("Could not show the quick result."):
                    self.jobPreview(job)
            self.ui.progressBar.value = int(100 * job.progress)
            self.ui.statusLabel.text = job.status_text
            return
        self.timer.stop()
        self.job, onFinished = None, self.jobFinished
        self.ui.progressBar.hide()
        self.sceneChanged = False
        # A quick result already shown stays when the exact run is cancelled or fails (see logic.py).
        kept = self.logic.unfinished_note(job)
        try:
            onFinished(job)
        except JobCancelled:
            self.ui.statusLabel.text = "Cancelled." + kept
        except Exception as error:
            logging.error(job.error_details or repr(error))
            # say what the scene now holds: a step after the segments went in must not claim "nothing changed"
            self.ui.statusLabel.text = ("The segments were added, but a later step failed." if self.sceneChanged
                                        else "Failed." + kept)
            slicer.util.errorDisplay(plain_message(error), detailedText=job.error_details or None)
        self.updateDependentWidgets()

    # ------------------------------------------------------------------------------- click-to-select
    def onPickByClick(self, enabled):
        interaction = slicer.app.applicationLogic().GetInteractionNode()
        if enabled:
            if self.clickNode is None:
                node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "UniversalSeg click")
                node.SetHideFromEditors(True)  # not in the data tree
                node.SetSaveWithScene(False)  # a helper: never saved with the scene
                self.addObserver(node, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onClick)
                self.clickNode = node
            slicer.modules.markups.logic().SetActiveList(self.clickNode)
            interaction.SetPlaceModePersistence(1)
            interaction.SetCurrentInteractionMode(interaction.Place)
            if not self.hasObserver(interaction, interaction.InteractionModeChangedEvent, self.onInteractionModeChanged):
                self.addObserver(interaction, interaction.InteractionModeChangedEvent, self.onInteractionModeChanged)
            self.ui.clickResultLabel.text = "Click on an organ or lesion in a slice view (Esc to stop)."
        else:
            if self.hasObserver(interaction, interaction.InteractionModeChangedEvent, self.onInteractionModeChanged):
                self.removeObserver(interaction, interaction.InteractionModeChangedEvent, self.onInteractionModeChanged)
            interaction.SetPlaceModePersistence(0)  # place mode is global: give it back as we found it
            if interaction.GetCurrentInteractionMode() == interaction.Place:
                interaction.SetCurrentInteractionMode(interaction.ViewTransform)
            if self.clickNode is not None:
                self.removeObserver(self.clickNode, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onClick)
                if slicer.mrmlScene.IsNodePresent(self.clickNode):
                    slicer.mrmlScene.RemoveNode(self.clickNode)
                self.clickNode = None

    def onInteractionModeChanged(self, caller, event):
        """The user left place mode (Esc, right click, the toolbar): the button follows."""
        if caller.GetCurrentInteractionMode() != caller.Place and self.ui.pickByClickButton.checked:
            self.ui.pickByClickButton.checked = False

    def onClick(self, caller, event):
        ras = [0.0, 0.0, 0.0]
        caller.GetNthControlPointPositionWorld(caller.GetNumberOfControlPoints() - 1, ras)
        caller.RemoveAllControlPoints()
        volume = self.ui.inputVolumeSelector.currentNode()
        with slicer.util.tryWithErrorDisplay("Click-to-select failed.", waitCursor=True):
            hits = self.logic.classes_at(volume, ras, self.model())
            if hits is None:  # first click on this volume: predict all classes once, in the worker
                if self.job is not None:
                    self.ui.clickResultLabel.text = "Busy with another run; click again when it has finished."
                    return
                self.pendingClick = ras
                self.ui.clickResultLabel.text = "Predicting all classes once for this volume..."
                self.startJob(self.logic.start_prediction(volume, self.model(), self.ui.deviceComboBox.currentData),
                              self.onPredictionFinished)
                return
            self.answerClick(volume, hits)

    def onPredictionFinished(self, job):
        job.result()
        if self.pendingClick is not None:
            volume, ras, self.pendingClick = self.ui.inputVolumeSelector.currentNode(), self.pendingClick, None
            self.answerClick(volume, self.logic.classes_at(volume, ras, self.model()) or [])

    def answerClick(self, volume, hits):
        if not hits:
            self.ui.clickResultLabel.text = "No class here (background for the model)."
            return
        names = [f"{hit.info.display_name} ({100 * hit.probability:.0f} %)" for hit in hits]
        choice = hits[0]
        if len(hits) > 1:
            picked = qt.QInputDialog.getItem(self.parent, "UniversalSeg", "Several classes here. Add or remove:",
                                             names, 0, False)
            if not picked:
                return
            choice = hits[names.index(picked)]
        output = self.ui.outputSegmentationSelector.currentNode()
        if output is not None and self.logic.existing_classes(output, [choice.info]):
            self.logic.remove_class_segment(output, choice.info)  # the model's own class (fine-tuned too)
            self.ui.clickResultLabel.text = f"Removed {choice.info.display_name}."
        else:
            applied = self.logic.add_predicted_class(volume, choice.info.index, self.model(), output,
                                                     show_3d=self.ui.show3DCheckBox.checked)
            self.ui.outputSegmentationSelector.setCurrentNode(applied.segmentation_node)
            self.ui.clickResultLabel.text = f"Here: {', '.join(names)}. Added {choice.info.display_name}."
        self.refreshReview()

    # -------------------------------------------------------------------------------- review and export
    def refreshReview(self):
        table = self.ui.reviewTableWidget
        table.setRowCount(0)
        output = self.ui.outputSegmentationSelector.currentNode()
        if output is None:
            return
        segmentation = output.GetSegmentation()
        for row, (segmentId, state) in enumerate(self.logic.review_states(output).items()):
            table.insertRow(row)
            nameItem = qt.QTableWidgetItem(segmentation.GetSegment(segmentId).GetName())
            nameItem.setData(qt.Qt.UserRole, segmentId)
            table.setItem(row, 0, nameItem)
            table.setItem(row, 1, qt.QTableWidgetItem(state))

    def onSetReview(self, state):
        output = self.ui.outputSegmentationSelector.currentNode()
        rows = {index.row() for index in self.ui.reviewTableWidget.selectedIndexes()}
        for row in rows:
            segmentId = self.ui.reviewTableWidget.item(row, 0).data(qt.Qt.UserRole)
            self.logic.set_review_state(output, segmentId, state)
        self.refreshReview()
        volume = self.ui.inputVolumeSelector.currentNode()
        if rows and volume is not None:
            with slicer.util.tryWithErrorDisplay("Could not update the statistics.", waitCursor=True):
                self.logic.update_statistics_table(output, volume)  # corrections change volumes and mean HU

    def onExport(self):
        volume = self.ui.inputVolumeSelector.currentNode()
        output = self.ui.outputSegmentationSelector.currentNode()
        loaded = self.batchReview.current if self.batchReview is not None else None
        if loaded is not None and output is loaded.segmentation_node:
            self.exportBatchCase()
            return
        settings = qt.QSettings()
        folder = ctk.ctkFileDialog.getExistingDirectory(self.parent, "Export for training",
                                                       settings.value(SETTINGS_KEYS["export_folder"], ""))
        if not folder or volume is None or output is None:
            return
        caseId = qt.QInputDialog.getText(self.parent, "Export for training", "Case id (letters, digits, - and _):",
                                         qt.QLineEdit.Normal, suggest_case_id(volume.GetName()))
        if not caseId:
            return
        settings.setValue(SETTINGS_KEYS["export_folder"], folder)
        with slicer.util.tryWithErrorDisplay("Export failed.", waitCursor=True):
            # the selected model's class table: a fine-tuned model's extra classes are exported too
            path = self.logic.export_for_training(volume, output, folder, caseId, taxonomy=self.catalog.taxonomy)
            self.ui.statusLabel.text = f"Exported {os.path.basename(path)} to {folder}."

    # ---------------------------------------------------------------------------------------- batch review
    def onBatchFolderChanged(self, folder):
        self.batchReview = None
        self.ui.batchQueueTableWidget.setRowCount(0)
        if not folder:
            return
        try:  # called while a path is typed too: say why in the panel, no dialog for each keystroke
            self.batchReview = BatchReview(self.logic, folder)  # the packaged class table
        except Exception as error:
            self.ui.batchReasonsLabel.text = f"Not a batch to review: {plain_message(error)}"
            return
        self.ui.batchReasonsLabel.text = (f"{len(self.batchReview.cases)} cases to review, worst first. Load one; "
                                          "then select a segment to see why it is in the queue.")
        self.refreshBatchQueue()

    def refreshBatchQueue(self):
        table = self.ui.batchQueueTableWidget
        table.setRowCount(0)
        if self.batchReview is None:
            return
        current = self.batchReview.current.case.case_id if self.batchReview.current is not None else None
        for row, case in enumerate(self.batchReview.cases):
            table.insertRow(row)
            label = case.case_id + (" (exported)" if self.batchReview.is_exported(case.case_id) else "")
            label += " (loaded)" if case.case_id == current else ""
            caseItem = qt.QTableWidgetItem(label)
            caseItem.setData(qt.Qt.UserRole, case.case_id)
            table.setItem(row, 0, caseItem)
            table.setItem(row, 1, qt.QTableWidgetItem(f"{case.priority:.2f}"))
            reasons = case.top_reasons
            reasonItem = qt.QTableWidgetItem("; ".join(reasons) if reasons else "no concern")
            reasonItem.setToolTip("\n".join(reasons))
            table.setItem(row, 2, reasonItem)

    def onBatchLoad(self):
        rows = {index.row() for index in self.ui.batchQueueTableWidget.selectedIndexes()}
        if self.batchReview is None or not rows:
            return
        self.loadBatchCase(self.ui.batchQueueTableWidget.item(min(rows), 0).data(qt.Qt.UserRole))

    def onBatchNext(self):
        if self.batchReview is None:
            return
        case = self.batchReview.next_case()
        if case is None:
            self.ui.statusLabel.text = "No case left to review after this one: every later case has been exported."
            return
        self.loadBatchCase(case.case_id)

    def loadBatchCase(self, caseId):
        loaded = self.batchReview.current
        if loaded is not None and not self.batchReview.is_exported(loaded.case.case_id):
            if slicer.mrmlScene.IsNodePresent(loaded.segmentation_node) and any(
                    state != "unreviewed" for state in self.logic.review_states(loaded.segmentation_node).values()):
                if not slicer.util.confirmYesNoDisplay(
                        f"Case {loaded.case.case_id} has reviewed segments that were not exported for training. "
                        "Close it anyway?"):
                    return
        self.ui.pickByClickButton.checked = False
        with slicer.util.tryWithErrorDisplay(f"Could not load case {caseId}.", waitCursor=True):
            loaded = self.batchReview.load_case(caseId, show_3d=self.ui.show3DCheckBox.checked)
            self.ui.inputVolumeSelector.setCurrentNode(loaded.volume_node)
            self.ui.outputSegmentationSelector.setCurrentNode(loaded.segmentation_node)
            slicer.util.setSliceViewerLayers(background=loaded.volume_node, fit=True)
            self.ui.reviewCollapsibleButton.collapsed = False
            self.ui.statusLabel.text = (f"Case {caseId} loaded (priority {loaded.case.priority:.2f}); clicks answer "
                                        "from the batch's stored probabilities.")
        self.refreshReview()
        self.refreshBatchQueue()

    def showSegmentReasons(self):
        rows = {index.row() for index in self.ui.reviewTableWidget.selectedIndexes()}
        if self.batchReview is None or self.batchReview.current is None or len(rows) != 1:
            return
        segmentId = self.ui.reviewTableWidget.item(min(rows), 0).data(qt.Qt.UserRole)
        name = self.ui.reviewTableWidget.item(min(rows), 0).text()
        reasons = self.batchReview.reasons(segmentId)
        self.ui.batchReasonsLabel.text = (f"{name}: " + "; ".join(reasons)) if reasons else f"{name}: no concern."

    def exportBatchCase(self):
        case = self.batchReview.current.case
        overwrite = False
        if self.batchReview.is_exported(case.case_id):
            if not slicer.util.confirmYesNoDisplay(f"Case {case.case_id} was exported for training before. "
                                                   "Replace that export?"):
                return
            overwrite = True
        with slicer.util.tryWithErrorDisplay("Export failed.", waitCursor=True):
            path = self.batchReview.export(overwrite=overwrite)
            self.ui.statusLabel.text = f"Exported {case.case_id} for training to {os.path.dirname(path)}."
        self.refreshBatchQueue()


class UniversalSegTest(ScriptedLoadableModuleTest):
    """Slicer self-test (Self Tests module, "Reload and Test", CTest). Downloads nothing. On a machine without
    UniversalSeg's pip packages (an extension build machine) it checks what needs none of them and says
    which checks it skipped; with them installed it also segments through the worker process."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_LogicConstruction()
        self.setUp()
        self.test_ClassPicker()
        self.setUp()
        self.test_ResultImportReviewExport()
        self.setUp()
        self.test_SegmentationIfModelInstalled()

    @staticmethod
    def missingPackages(*modules):
        """Which of the modules cannot be found (looked up, not imported)."""
        return [name for name in modules if importlib.util.find_spec(name) is None]

    def _syntheticVolume(self):
        import numpy as np
        from UniversalSegLib.io.volume import Volume
        from UniversalSegLib.mrml import volume_node_from_volume

        array = np.full((40, 40, 30), -1000, dtype=np.int16)
        array[5:35, 5:35, 3:27] = 40
        array[10:20, 10:22, 8:20] = 60
        return volume_node_from_volume(slicer.mrmlScene, Volume(array, np.diag([2.0, 2.0, 3.0, 1.0]), "test", "mrml"),
                                       "UniversalSeg test CT")

    def test_LogicConstruction(self):
        logic = UniversalSegLogic()
        try:
            self.assertEqual(logic.moduleName, "UniversalSeg")
            self.assertIsNotNone(logic.getParameterNode())
            self.assertFalse(logic.worker.alive())  # the worker (and PyTorch) start with the first run only
        finally:
            logic.shutdown()
        self.delayDisplay("Logic construction passed")

    def test_ClassPicker(self):
        catalog = ClassCatalog()
        self.assertEqual([catalog.taxonomy[i].display_name for i in catalog.search("ivc")], ["Inferior Vena Cava"])
        self.assertIn(27, catalog.search("HCC"))
        self.assertEqual(dict(catalog.presets())["Liver + liver tumour"], [6, 27])

    def test_ResultImportReviewExport(self):
        import tempfile

        import numpy as np
        from UniversalSegSlicer.results import insert_class_masks

        self.delayDisplay("Importing masks as segments")
        volume = self._syntheticVolume()
        logic = UniversalSegLogic()
        try:
            liver = slicer.util.arrayFromVolume(volume).transpose(2, 1, 0) > 50
            catalog = ClassCatalog()
            applied = insert_class_masks(slicer.mrmlScene, volume, {6: liver}, [catalog.taxonomy[6]])
            logic.track_edits(applied.segmentation_node)
            segmentation = applied.segmentation_node.GetSegmentation()
            self.assertEqual(segmentation.GetSegment("liver").GetName(), "Liver")
            logic.set_review_state(applied.segmentation_node, "liver", "accepted")
            table = logic.update_statistics_table(applied.segmentation_node, volume)
            self.assertEqual(int(table.GetCellText(0, 3)), int(liver.sum()))
            missing = self.missingPackages("nibabel")
            if missing:
                self.delayDisplay(f"Export check skipped: {', '.join(missing)} not installed")
                return
            from UniversalSegLib.io.training_case import read_training_case

            with tempfile.TemporaryDirectory() as folder:
                case = read_training_case(logic.export_for_training(volume, applied.segmentation_node, folder,
                                                                    "selftest"))
                self.assertEqual(case.annotated, (6,))
                self.assertTrue(np.array_equal(case.class_mask(6), liver))
        finally:
            logic.shutdown()
        self.delayDisplay("Result import, review and export passed")

    def test_SegmentationIfModelInstalled(self):
        """With the dependencies installed: a real segmentation through the worker process, with the small
        demo model that ships with the library (nothing to download)."""
        problems = [status.describe() for status in check_requirements() if not status.ok]
        if problems:
            self.delayDisplay("Segmentation check skipped, dependencies not installed: " + "; ".join(problems))
            return
        from UniversalSegLib.demo import demo_checkpoint_path

        volume = self._syntheticVolume()
        logic = UniversalSegLogic()
        try:
            applied = logic.segment(volume, "liver, spleen", str(demo_checkpoint_path()), device="cpu", timeout=600)
            self.assertEqual(sorted(applied.segment_ids), [1, 6])
            self.assertIsNotNone(applied.table_node)
            self.delayDisplay("Segmentation through the worker passed")
        finally:
            logic.shutdown()
