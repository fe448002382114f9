"""UniversalSeg: segment abdominal organs and tumours in CT by name or by clicking on them.

This file is the Slicer entry point only: module description, a thin widget that draws the panel and
forwards to the logic, and the self-test. All work is done by ``UniversalSegSlicer`` (Qt-free, tested
with pytest on the slicer-core wheel) and the ``UniversalSegLib`` library.
"""
import logging
import os

import ctk
import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from UniversalSegSlicer import ClassCatalog, ExistingSegmentsError, JobCancelled, SegmentationLogic
from UniversalSegSlicer.dependencies import check_requirements, plan_installation, run_installation
from UniversalSegSlicer.export import suggest_case_id
from UniversalSegSlicer.messages import plain_message
from UniversalSegSlicer.parameters import DEVICES, MODES, SETTINGS_KEYS, ModuleParameters

CUSTOM_MODEL = "__file__"


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
            "image, press Apply, keep working while it runs, then review and correct the segments and export "
            "them for training. See the <a href='https://github.com/universalseg/UniversalSeg'>documentation</a>.")
        self.parent.acknowledgementText = (
            "Method: Liu et al., CLIP-Driven Universal Model for Organ Segmentation and Tumor Detection, ICCV "
            "2023. The official weights are CC BY-NC-ND 4.0 (non-commercial); UniversalSeg itself is Apache-2.0.")


class UniversalSegLogic(ScriptedLoadableModuleLogic, SegmentationLogic):
    """Slicer's logic class: the Qt-free ``SegmentationLogic`` bound to the application's scene."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        SegmentationLogic.__init__(self, slicer.mrmlScene)


class UniversalSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.job = None
        self.jobFinished = None  # what to do on the main thread when self.job is done
        self.replaceConfirmed = False
        self.pendingClick = None
        self.clickNode = None
        self.catalog = ClassCatalog()
        self.timer = qt.QTimer()
        self.timer.setInterval(200)
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
        self.ui.reviewTableWidget.setHorizontalHeaderLabels(["Segment", "Review"])
        for value, label in DEVICES:
            self.ui.deviceComboBox.addItem(label, value)
        for value, label in MODES:
            self.ui.modeComboBox.addItem(label, value)
        self.populateClasses()
        self.populateModels()
        settings = qt.QSettings()
        self.selectComboData(self.ui.modelComboBox, settings.value(SETTINGS_KEYS["model"], "swinunetr"))
        self.selectComboData(self.ui.deviceComboBox, settings.value(SETTINGS_KEYS["device"], "auto"))
        self.selectComboData(self.ui.modeComboBox, settings.value(SETTINGS_KEYS["mode"], "default"))

        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSettingsChanged)
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onOutputChanged)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onSettingsChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onSettingsChanged)
        self.ui.modeComboBox.connect("currentIndexChanged(int)", self.onSettingsChanged)
        self.ui.checkpointPathLineEdit.connect("currentPathChanged(QString)", self.onSettingsChanged)
        self.ui.classTreeWidget.connect("itemChanged(QTreeWidgetItem*,int)", self.onSettingsChanged)
        self.ui.classSearchLineEdit.connect("textChanged(QString)", self.onSearch)
        self.ui.presetComboBox.connect("activated(int)", self.onPreset)
        self.ui.applyButton.connect("clicked()", self.onApply)
        self.ui.cancelButton.connect("clicked()", self.onCancel)
        self.ui.installDependenciesButton.connect("clicked()", self.onInstallDependencies)
        self.ui.downloadModelButton.connect("clicked()", self.onDownloadModel)
        self.ui.importModelButton.connect("clicked()", self.onImportModel)
        self.ui.pickByClickButton.connect("toggled(bool)", self.onPickByClick)
        self.ui.acceptButton.connect("clicked()", lambda: self.onSetReview("accepted"))
        self.ui.unreviewButton.connect("clicked()", lambda: self.onSetReview("unreviewed"))
        self.ui.exportButton.connect("clicked()", self.onExport)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()
        self.updateDependencyStatus()

    def enter(self):
        self.refreshReview()  # segments may have been edited in Segment Editor meanwhile

    def cleanup(self):
        self.onPickByClick(False)
        if self.job is not None:
            self.job.cancel()
        self.timer.stop()
        self.removeObservers()
        self.logic.shutdown()

    def onSceneStartClose(self, caller, event):
        self.onCancel()
        self.ui.pickByClickButton.checked = False

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        node = self.logic.getParameterNode()
        parameters = ModuleParameters.read(node)
        if parameters.input_volume_id is None:
            volume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            parameters.input_volume_id = volume.GetID() if volume else None
        self.ui.inputVolumeSelector.setCurrentNodeID(parameters.input_volume_id)
        self.ui.outputSegmentationSelector.setCurrentNodeID(parameters.output_segmentation_id)
        if self.ui.modelComboBox.findData(parameters.model) >= 0:
            self.selectComboData(self.ui.modelComboBox, parameters.model)
        elif parameters.model and os.path.isfile(parameters.model):
            self.selectComboData(self.ui.modelComboBox, CUSTOM_MODEL)
            self.ui.checkpointPathLineEdit.currentPath = parameters.model
        self.selectComboData(self.ui.deviceComboBox, parameters.device)
        self.selectComboData(self.ui.modeComboBox, parameters.mode)
        self.setCheckedClasses(parameters.classes)
        self.ui.show3DCheckBox.checked = parameters.show_3d
        self.onSettingsChanged()

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
        self.ui.modelComboBox.clear()
        try:
            for choice in self.logic.model_choices():
                suffix = "" if choice.path else f" - not downloaded ({choice.size_mb} MB)"
                self.ui.modelComboBox.addItem(choice.label + suffix, choice.name)
        except Exception:  # no (working) PyTorch yet: only checkpoint files until the dependencies are installed
            logging.info("UniversalSeg: model registry unavailable until the dependencies are installed")
        self.ui.modelComboBox.addItem("Checkpoint file...", CUSTOM_MODEL)

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

    def onSettingsChanged(self, *args):
        """Store the choices, and update everything that depends on them (labels, Apply button)."""
        if self.logic is None:
            return
        isFile = self.ui.modelComboBox.currentData == CUSTOM_MODEL
        self.ui.checkpointPathLineEdit.setVisible(isFile)
        self.ui.downloadModelButton.setEnabled(not isFile)
        classes = self.checkedClasses()
        volume = self.ui.inputVolumeSelector.currentNode()
        output = self.ui.outputSegmentationSelector.currentNode()
        ModuleParameters(volume.GetID() if volume else None, output.GetID() if output else None, classes,
                         str(self.model() or ""), self.ui.deviceComboBox.currentData,
                         self.ui.show3DCheckBox.checked, self.ui.modeComboBox.currentData).write(
                             self.logic.getParameterNode())
        qt.QSettings().setValue(SETTINGS_KEYS["model"], self.ui.modelComboBox.currentData)
        qt.QSettings().setValue(SETTINGS_KEYS["device"], self.ui.deviceComboBox.currentData)
        qt.QSettings().setValue(SETTINGS_KEYS["mode"], self.ui.modeComboBox.currentData)
        selected = [self.catalog.taxonomy.by_key(key) for key in classes]
        self.ui.selectionLabel.text = ClassCatalog.describe(selected)
        try:
            self.ui.licenseLabel.text = self.logic.model_license(self.model()) if self.model() else ""
        except Exception:  # the registry needs PyTorch
            self.ui.licenseLabel.text = "Install the dependencies to see the model's licence."
        if volume is not None:
            backbone = "unet" if "unet" in str(self.model()) else "swinunetr"
            estimate = self.logic.estimate(volume, self.ui.deviceComboBox.currentData, max(1, len(classes)), backbone,
                                           mode=self.ui.modeComboBox.currentData)
            self.ui.estimateLabel.text = estimate.text()
        self.ui.applyButton.enabled = self.job is None and volume is not None and bool(classes)
        self.ui.applyButton.toolTip = "" if self.ui.applyButton.enabled else "Select an input volume and classes."

    # ------------------------------------------------------------------------------------- dependencies
    def updateDependencyStatus(self):
        problems = [status for status in check_requirements() if not status.ok]
        self.ui.dependencyStatusLabel.text = ("All installed." if not problems else
                                              "Missing or incompatible: " + "; ".join(s.describe() for s in problems))
        self.ui.installDependenciesButton.enabled = bool(problems)
        if problems:
            self.ui.setupCollapsibleButton.collapsed = False
        return not problems

    def onInstallDependencies(self):
        plan = plan_installation(check_requirements(probe_imports=True))
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
            run_installation(plan, slicer.util.pip_install, installTorch)
            self.populateModels()
            if slicer.util.confirmYesNoDisplay("Packages installed. Restart Slicer now to use them?"):
                slicer.util.restart()
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

        self.startJob(self.logic.start_download(name), onDownloaded)

    def onImportModel(self):
        path = qt.QFileDialog.getOpenFileName(self.parent, "Import official checkpoint", "", "Checkpoints (*.pth)")
        if path:
            from UniversalSegLib.models import import_model

            with slicer.util.tryWithErrorDisplay("The file could not be imported.", waitCursor=True):
                import_model(path)
                self.populateModels()

    # ----------------------------------------------------------------------------------------- running
    def startJob(self, job, onFinished):
        self.job, self.jobFinished = job, onFinished
        self.ui.progressBar.show()
        self.ui.cancelButton.enabled = True
        self.ui.applyButton.enabled = False
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
            job = self.logic.start_segmentation(volume, classes, self.model(), self.ui.deviceComboBox.currentData,
                                                mode=self.ui.modeComboBox.currentData)
            self.startJob(job, lambda job: self.onSegmentationFinished(job, volume))

    def onSegmentationFinished(self, job, volume):
        output = self.ui.outputSegmentationSelector.currentNode()
        try:
            applied = self.logic.apply_result(job, volume, output, self.replaceConfirmed, self.ui.show3DCheckBox.checked)
        except ExistingSegmentsError as error:  # a segment appeared while the job ran
            if not slicer.util.confirmYesNoDisplay(str(error)):
                return
            applied = self.logic.apply_result(job, volume, output, True, self.ui.show3DCheckBox.checked)
        self.ui.outputSegmentationSelector.setCurrentNode(applied.segmentation_node)
        slicer.util.setSliceViewerLayers(background=volume)
        self.ui.statusLabel.text = f"Done in {job.elapsed:.0f} s: {len(applied.segment_ids)} segments. " \
                                   f"Statistics: table '{applied.table_node.GetName()}'."
        self.refreshReview()

    def onCancel(self):
        if self.job is not None:
            self.job.cancel()
            self.ui.statusLabel.text = "Cancelling (after the current network window)..."

    def onTimer(self):
        job = self.job
        if job is None:
            self.timer.stop()
            return
        self.ui.progressBar.value = int(100 * job.progress)
        self.ui.statusLabel.text = job.status_text
        if not job.done():
            return
        self.timer.stop()
        self.job, onFinished = None, self.jobFinished
        self.ui.progressBar.hide()
        self.ui.cancelButton.enabled = False
        try:
            onFinished(job)
        except JobCancelled:
            self.ui.statusLabel.text = "Cancelled. Nothing was changed."
        except Exception as error:
            logging.error(job.error_details or repr(error))
            self.ui.statusLabel.text = "Failed. Nothing was changed."
            slicer.util.errorDisplay(plain_message(error), detailedText=job.error_details or None)
        self.onSettingsChanged()

    # ------------------------------------------------------------------------------- click-to-select
    def onPickByClick(self, enabled):
        interaction = slicer.app.applicationLogic().GetInteractionNode()
        if enabled:
            if self.clickNode is None:
                self.clickNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "UniversalSeg click")
                self.clickNode.SetHideFromEditors(True)
                self.addObserver(self.clickNode, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onClick)
            slicer.modules.markups.logic().SetActiveList(self.clickNode)
            interaction.SetPlaceModePersistence(1)
            interaction.SetCurrentInteractionMode(interaction.Place)
            self.ui.clickResultLabel.text = "Click on an organ or lesion in a slice view."
        else:
            interaction.SetCurrentInteractionMode(interaction.ViewTransform)
            if self.clickNode is not None:
                self.removeObserver(self.clickNode, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onClick)
                slicer.mrmlScene.RemoveNode(self.clickNode)
                self.clickNode = None

    def onClick(self, caller, event):
        ras = [0.0, 0.0, 0.0]
        caller.GetNthControlPointPositionWorld(caller.GetNumberOfControlPoints() - 1, ras)
        caller.RemoveAllControlPoints()
        volume = self.ui.inputVolumeSelector.currentNode()
        with slicer.util.tryWithErrorDisplay("Click-to-select failed.", waitCursor=True):
            hits = self.logic.classes_at(volume, ras, self.model())
            if hits is None:  # first click on this volume: predict all classes once, in the background
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
            self.logic.remove_class_segment(output, choice.info.index)
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
            path = self.logic.export_for_training(volume, output, folder, caseId)
            self.ui.statusLabel.text = f"Exported {os.path.basename(path)} to {folder}."


class UniversalSegTest(ScriptedLoadableModuleTest):
    """Slicer self-test (Self Tests module or "Reload and Test"). Runs without downloading anything:
    result import, review and export always; a real segmentation only when a model is installed."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ClassPicker()
        self.setUp()
        self.test_ResultImportReviewExport()
        self.setUp()
        self.test_SegmentationIfModelInstalled()

    def _syntheticVolume(self):
        import numpy as np
        from UniversalSegLib.io.volume import Volume
        from UniversalSegLib.mrml import volume_node_from_volume

        array = np.full((40, 40, 30), -1000, dtype=np.int16)
        array[5:35, 5:35, 3:27] = 40
        array[10:20, 10:22, 8:20] = 60
        return volume_node_from_volume(slicer.mrmlScene, Volume(array, np.diag([2.0, 2.0, 3.0, 1.0]), "test", "mrml"),
                                       "UniversalSeg test CT")

    def test_ClassPicker(self):
        catalog = ClassCatalog()
        self.assertEqual([catalog.taxonomy[i].display_name for i in catalog.search("ivc")], ["Inferior Vena Cava"])
        self.assertIn(27, catalog.search("HCC"))
        self.assertEqual(dict(catalog.presets())["Liver + liver tumour"], [6, 27])

    def test_ResultImportReviewExport(self):
        import tempfile

        import numpy as np
        from UniversalSegLib.io.training_case import read_training_case
        from UniversalSegSlicer.results import insert_class_masks

        self.delayDisplay("Importing masks as segments")
        volume = self._syntheticVolume()
        logic = UniversalSegLogic()
        liver = slicer.util.arrayFromVolume(volume).transpose(2, 1, 0) > 50
        catalog = ClassCatalog()
        applied = insert_class_masks(slicer.mrmlScene, volume, {6: liver}, [catalog.taxonomy[6]])
        logic.track_edits(applied.segmentation_node)
        segmentation = applied.segmentation_node.GetSegmentation()
        self.assertEqual(segmentation.GetSegment("liver").GetName(), "Liver")
        logic.set_review_state(applied.segmentation_node, "liver", "accepted")
        with tempfile.TemporaryDirectory() as folder:
            case = read_training_case(logic.export_for_training(volume, applied.segmentation_node, folder, "selftest"))
            self.assertEqual(case.annotated, (6,))
            self.assertTrue(np.array_equal(case.class_mask(6), liver))
        logic.shutdown()
        self.delayDisplay("Result import, review and export passed")

    def test_SegmentationIfModelInstalled(self):
        if not all(status.ok for status in check_requirements()):
            self.delayDisplay("Dependencies not installed: real segmentation test skipped")
            return
        logic = UniversalSegLogic()
        try:
            model = next((c.name for c in logic.model_choices() if c.path is not None), None)
            if model is None:
                self.delayDisplay("No model downloaded: real segmentation test skipped")
                return
            import SampleData

            volume = SampleData.downloadSample("CTACardio")
            applied = logic.segment(volume, "liver, aorta", model, device="auto")
            self.assertEqual(sorted(applied.segment_ids), [6, 8])
            self.delayDisplay("Segmentation passed")
        finally:
            logic.shutdown()
