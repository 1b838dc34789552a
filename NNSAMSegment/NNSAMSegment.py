"""nnSAM Segment: annotate a few slices, fine-tune nnSAM locally, segment the heart's chambers in the whole volume.

This file only wires Slicer's GUI to the logic in ``NNSAMSegmentLib`` (which is tested without Qt). Long jobs run
in a separate process (the ``nnsam_core`` engine under PythonSlicer), so the panel stays responsive. The Slicer
self-test is ``Testing/Python/NNSAMSegmentSelfTest.py`` (run by ctest).
"""

import logging
import os
import sys

import qt

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleLogic
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

from NNSAMSegmentLib.Bundles import BundleInfo, BundleStore
from NNSAMSegmentLib.Devices import DETECTION_SCRIPT, deviceChoices, parseDetectionOutput
from NNSAMSegmentLib.EngineCommands import (DEFAULT_ENCODER, DEFAULT_RECOMPUTE_SHARE, ENCODERS, PRESETS,
                                            RECOMPUTE_SHARES, EngineCommandBuilder, TrainOptions)
from NNSAMSegmentLib.EngineJob import JobState
from NNSAMSegmentLib.Estimates import FineTuneEstimator, estimateRequest
from NNSAMSegmentLib.Errors import UserError
from NNSAMSegmentLib.FineTuneResume import mayReplaceResumable
from NNSAMSegmentLib.InstallLogic import InstallLogic, isNonInteractive
from NNSAMSegmentLib.ProcessRunner import QProcessRunner
from NNSAMSegmentLib.Progress import formatDuration
from NNSAMSegmentLib.ResultImport import ImportSummary
from NNSAMSegmentLib.Settings import ModelMemory, QtSettingsStore
from NNSAMSegmentLib.SharedResources import TERMINOLOGY_FILE, WEIGHTS_MANIFEST_FILE, sharedResourcePath
from NNSAMSegmentLib.Terminology import CardiacTerminology, loadTerminologyIntoSlicer
from NNSAMSegmentLib.Weights import WeightsManifest, parseWeightsStatus
from NNSAMSegmentLib.Workflow import NNSAMWorkflow


#
# NNSAMSegment
#


class NNSAMSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("nnSAM Segment")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Segmentations", "Terminologies"]
        self.parent.contributors = ["NNSAMSegment developers"]
        self.parent.helpText = _("""
Annotate LV, RV, LA, RA and myocardium on a few slices of the loaded CT, fine-tune an nnSAM model (nnU-Net with a
frozen Segment Anything encoder) on them on this computer, and get the whole volume segmented. Saved models segment
new scans in one click. The Segment Editor also offers the "nnSAM" effect. The extension's README describes the
workflow and the options.
""")
        self.parent.acknowledgementText = _("""
nnSAM: Li et al., "nnSAM: Plug-and-play Segment Anything Model Improves nnUNet Performance". Built on nnU-Net v2,
MobileSAM and LiteMedSAM. The process handling follows SlicerNNUNet and SlicerTotalSegmentator.
""")
        slicer.app.connect("startupCompleted()", loadCardiacTerminology)


def loadCardiacTerminology() -> None:
    """Make the cardiac codes selectable in Slicer's terminology dialogs too."""
    try:
        loadTerminologyIntoSlicer(slicer.modules.terminologies.logic(), sharedResourcePath(TERMINOLOGY_FILE))
    except Exception as error:  # a missing resource must not break Slicer's startup
        logging.warning(f"NNSAMSegment: cardiac terminology not loaded: {error}")


_sharedLogic = None


def getSharedLogic():
    """One logic for the panel and the Segment Editor effect, so they share the current model and the running job."""
    global _sharedLogic
    if _sharedLogic is None:
        _sharedLogic = NNSAMSegmentLogic()
    return _sharedLogic


#
# NNSAMSegmentWidget
#


class NNSAMSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    ANNOTATION_REFRESH_DELAY_MS = 700

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.ui = None
        self._job = None
        self._observedSegmentation = None
        self._deviceRunner = None
        self._weightsJob = None
        self._jobConnections = []  # (signal, id) of the running job's connections, dropped by cleanup()
        self._paintedSlices = None  # the annotated slices last counted (None: no volume or segmentation)

    # ---------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/NNSAMSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = getSharedLogic()
        workflow = self.logic.workflow
        memory = workflow.memory

        for encoder in ENCODERS:
            self.ui.encoderComboBox.addItem(self.logic.encoderLabel(encoder), encoder)
        self.ui.encoderComboBox.setCurrentIndex(ENCODERS.index(memory.encoder))
        for preset in PRESETS:
            self.ui.presetComboBox.addItem(preset, preset)
        self.ui.presetComboBox.setCurrentIndex(PRESETS.index(memory.preset))
        for share in RECOMPUTE_SHARES:
            self.ui.recomputeShareComboBox.addItem(self._recomputeShareLabel(share), f"{share:g}")
        self.ui.recomputeShareComboBox.setCurrentIndex(RECOMPUTE_SHARES.index(memory.recomputeShare))
        self._fillDeviceComboBox(["cpu"])
        self._detectDevices()
        self.ui.newSegmentationRadioButton.checked = memory.resultTarget == "new"
        self.ui.fillAnnotationsRadioButton.checked = memory.resultTarget == "fill"
        self.ui.progressBar.hide()

        self._annotationTimer = qt.QTimer()
        self._annotationTimer.setSingleShot(True)
        self._annotationTimer.setInterval(self.ANNOTATION_REFRESH_DELAY_MS)
        self._annotationTimer.connect("timeout()", self.updateAnnotatedSlices)
        self._statusTimer = qt.QTimer()
        self._statusTimer.setInterval(1000)
        self._statusTimer.connect("timeout()", self._refreshStatus)

        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputsChanged)
        self.ui.annotationSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputsChanged)
        self.ui.createCardiacSegmentsButton.connect("clicked(bool)", lambda checked: self._guard(self.onCreateSegments))
        self.ui.encoderComboBox.connect("currentIndexChanged(int)", self.onEncoderChanged)
        self.ui.presetComboBox.connect("currentIndexChanged(int)", self.onPresetChanged)
        self.ui.recomputeShareComboBox.connect("currentIndexChanged(int)", self.onRecomputeShareChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.fillAnnotationsRadioButton.connect("toggled(bool)", self.onResultTargetChanged)
        self.ui.downloadWeightsButton.connect("clicked(bool)", lambda checked: self._guard(self.onDownloadWeights))
        self.ui.importWeightsButton.connect("clicked(bool)", lambda checked: self._guard(self.onImportWeights))
        self.ui.saveBundleButton.connect("clicked(bool)", lambda checked: self._guard(self.onSaveBundle))
        self.ui.loadBundleButton.connect("clicked(bool)", lambda checked: self._guard(self.onLoadBundle))
        self.ui.importBundleButton.connect("clicked(bool)", lambda checked: self._guard(self.onImportBundle))
        self.ui.exportBundleButton.connect("clicked(bool)", lambda checked: self._guard(self.onExportBundle))
        self.ui.fineTuneButton.connect("clicked(bool)", lambda checked: self._guard(self.onFineTune))
        self.ui.startFromModelCheckBox.connect("toggled(bool)", lambda checked: self._requestEstimate())
        self.ui.segmentButton.connect("clicked(bool)", lambda checked: self._guard(self.onSegment))
        self.ui.stopButton.connect("clicked(bool)", lambda checked: self.logic.workflow.stop())
        self.ui.resumeFineTuneButton.connect("clicked(bool)", lambda checked: self._guard(self.onResumeFineTune))
        self.ui.discardResumeButton.connect("clicked(bool)", lambda checked: self._guard(self.onDiscardResume))
        self.ui.undoResultButton.connect("clicked(bool)", lambda checked: self._guard(self.onUndoResult))

        self._workflowConnections = [
            (workflow.jobStarted, workflow.jobStarted.connect(self.onJobStarted)),
            (workflow.bundleChanged, workflow.bundleChanged.connect(lambda bundle: self.updateBundleLabel())),
            (workflow.resumableChanged, workflow.resumableChanged.connect(self.onResumableChanged)),
            # pip lets Qt process clicks while it runs: the buttons are disabled until it has finished
            (self.logic.installLogic.busyChanged,
             self.logic.installLogic.busyChanged.connect(lambda installing: self.updateButtons())),
            (self.logic.estimator.changed, self.logic.estimator.changed.connect(self._showEstimate)),
        ]
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        if workflow.currentBundle is None:
            workflow.restoreLastBundle()  # one-click Segment with the model used last time
        if workflow.resumableFineTune is None:
            workflow.restoreResumableFineTune()  # a fine-tune stopped in an earlier session
        self.selectDefaultInputs()
        self.onResumableChanged(workflow.resumableFineTune)
        self.updateBundleLabel()
        self.onEncoderChanged()
        self._showEstimate(self.logic.estimator.text, self.logic.estimator.toolTip)
        self.updateButtons()

    def cleanup(self) -> None:
        self.removeObservers()
        for signal, connectionId in getattr(self, "_workflowConnections", []) + self._jobConnections:
            signal.disconnect(connectionId)
        self._jobConnections = []
        self._statusTimer.stop()
        self._annotationTimer.stop()

    def enter(self) -> None:
        self.selectDefaultInputs()
        self.updateAnnotatedSlices()

    def onSceneStartClose(self, caller, event) -> None:
        # The running job's nodes are about to disappear: stop it rather than import into a closed scene.
        self.logic.workflow.stop()

    def onSceneEndClose(self, caller, event) -> None:
        self.logic.workflow.lastSnapshot = None  # its segmentation is gone
        self.updateButtons()

    def selectDefaultInputs(self) -> None:
        if not self.ui.inputVolumeSelector.currentNode():
            volume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if volume:
                self.ui.inputVolumeSelector.setCurrentNode(volume)

    # ---------------------------------------------------------------------------------------------- helpers
    def _guard(self, action) -> None:
        """Run a button's action; problems the user can fix appear as one line in the panel.

        No busy cursor here: actions open dialogs first. The work after the dialogs runs under :meth:`_busy`.
        """
        self.showError("")
        try:
            action()
        except UserError as error:
            self.showError(str(error))
        except Exception as error:
            logging.exception("NNSAMSegment: unexpected error")
            self.showError(_("Unexpected error: {error} (details in the Python console)").format(error=error))
        self.updateButtons()

    def showError(self, message: str) -> None:
        self.ui.errorLabel.text = message
        self.ui.errorLabel.setVisible(bool(message))
        if message:
            self.appendLog(f"Error: {message}")

    def appendLog(self, line: str) -> None:
        self.ui.logTextEdit.appendPlainText(line)

    def _volume(self):
        return self.ui.inputVolumeSelector.currentNode()

    def _annotations(self):
        return self.ui.annotationSegmentationSelector.currentNode()

    def _resultTarget(self) -> str:
        return "fill" if self.ui.fillAnnotationsRadioButton.checked else "new"

    def _choice(self, comboBox, default: str) -> str:
        value = comboBox.itemData(comboBox.currentIndex)
        return str(value) if value else default

    def _recomputeShare(self) -> float:
        return float(self._choice(self.ui.recomputeShareComboBox, f"{DEFAULT_RECOMPUTE_SHARE:g}"))

    @staticmethod
    def _recomputeShareLabel(share: float) -> str:
        labels = {0.0: _("never: cached embeddings (fastest)"), 0.1: _("1 training step in 10 (default)"),
                  0.25: _("1 training step in 4"), 1.0: _("every training step (slowest)")}
        return labels.get(share, f"{share:g}")

    @staticmethod
    def _busy():
        return slicer.util.WaitCursor()

    def _ensureDependencies(self) -> bool:
        """Install what is missing (asks first). The buttons are disabled meanwhile: pip lets Qt process clicks."""
        installLogic = self.logic.installLogic
        installLogic.log = self.appendLog
        if not installLogic.ensureDependencies():
            raise UserError(_("nnSAM cannot run without its Python packages (installation declined)."))
        return True

    # ---------------------------------------------------------------------------------------------- inputs
    def onInputsChanged(self, node=None) -> None:
        segmentation = self._annotations()
        if segmentation is not self._observedSegmentation:
            if self._observedSegmentation is not None:
                self.removeObserver(self._observedSegmentation, slicer.vtkSegmentation.SourceRepresentationModified,
                                    self._scheduleAnnotationUpdate)
                self.removeObserver(self._observedSegmentation, slicer.vtkSegmentation.SegmentRemoved,
                                    self._scheduleAnnotationUpdate)
            self._observedSegmentation = segmentation
            if segmentation is not None:
                # Painting fires many events: recount the annotated slices once the user pauses.
                self.addObserver(segmentation, slicer.vtkSegmentation.SourceRepresentationModified,
                                 self._scheduleAnnotationUpdate)
                self.addObserver(segmentation, slicer.vtkSegmentation.SegmentRemoved, self._scheduleAnnotationUpdate)
        self.updateAnnotatedSlices()
        self.updateButtons()

    def _scheduleAnnotationUpdate(self, caller=None, event=None) -> None:
        self._annotationTimer.start()

    def updateAnnotatedSlices(self) -> None:
        try:
            text, self._paintedSlices = self.logic.workflow.annotationStatus(self._annotations(), self._volume())
        except UserError as error:
            text, self._paintedSlices = str(error), None
        self.ui.annotatedSlicesLabel.text = text
        self._requestEstimate()

    # ---------------------------------------------------------------------------------------------- expected time
    def _requestEstimate(self) -> None:
        """Ask (in the background) how long a fine-tune with the panel's choices would take."""
        if self.ui is None or self.logic is None:
            return
        volume = self._volume()
        if volume is None or volume.GetImageData() is None:
            self.logic.estimator.request(None)
        elif self.logic.installLogic.missingModules():
            self._showEstimate(_("The expected time is shown once nnSAM's Python packages are installed."), "")
        else:
            bundle = self.logic.workflow.currentBundle
            try:
                self.logic.estimator.request(estimateRequest(
                    volume.GetImageData().GetDimensions(), volume.GetSpacing(), self._paintedSlices,
                    self._trainOptions(), bundle.method if bundle else "", bundle.encoder if bundle else ""))
            except Exception:  # a bug here must not break the panel's other updates
                logging.exception("NNSAMSegment: estimating the fine-tune's time failed")
                self._showEstimate("")

    def _showEstimate(self, text: str, toolTip: str = "") -> None:
        if self.ui is None:
            return
        self.ui.fineTuneEstimateLabel.text = text
        self.ui.fineTuneEstimateLabel.toolTip = toolTip
        self.ui.fineTuneEstimateLabel.setVisible(bool(text))

    def onCreateSegments(self) -> None:
        volume = self._volume()
        segmentation = self._annotations()
        if segmentation is None:
            name = f"{volume.GetName()} annotations" if volume else "Annotations"
            segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
            segmentation.CreateDefaultDisplayNodes()
            self.ui.annotationSegmentationSelector.setCurrentNode(segmentation)
        with self._busy():
            self.logic.workflow.ensureCardiacSegments(segmentation, volume)
        self.appendLog(_("Cardiac segments ready in '{name}': paint them on a few slices in the Segment Editor.")
                       .format(name=segmentation.GetName()))

    # ---------------------------------------------------------------------------------------------- model choices
    def onEncoderChanged(self, index=None) -> None:
        encoder = self._choice(self.ui.encoderComboBox, DEFAULT_ENCODER)
        self.logic.workflow.memory.encoder = encoder
        entry = self.logic.manifest.get(encoder) if self.logic.manifest else None
        needsDownload = entry is not None and not entry.offline
        self.ui.downloadWeightsButton.setVisible(needsDownload)
        self.ui.importWeightsButton.setVisible(needsDownload)
        if not needsDownload:
            self.ui.weightsStatusLabel.text = _("Shipped with the engine; works offline.")
        else:
            self.ui.weightsStatusLabel.text = _("Download once ({size}) or import a file.").format(
                size=entry.sizeText())
            self._checkWeightsQuietly()
        self._requestEstimate()

    def _checkWeightsQuietly(self) -> None:
        """Ask the engine (in the background) whether the weights are already there, if it is installed."""
        if self.logic.installLogic.missingModules():
            return
        job = self.logic.workflow.startWeightsStatus()
        job.finished.connect(self._showWeightsStatus)
        self._weightsJob = job  # keep it alive until it has answered

    def onPresetChanged(self, index=None) -> None:
        self.logic.workflow.memory.preset = self._choice(self.ui.presetComboBox, "quick")
        self._requestEstimate()

    def onRecomputeShareChanged(self, index=None) -> None:
        self.logic.workflow.memory.recomputeShare = self._recomputeShare()
        self._requestEstimate()

    def onDeviceChanged(self, index=None) -> None:
        if self.ui.deviceComboBox.count:
            self.logic.workflow.memory.device = self._choice(self.ui.deviceComboBox, "auto")
            self._requestEstimate()

    def onResultTargetChanged(self, checked=None) -> None:
        self.logic.workflow.memory.resultTarget = self._resultTarget()
        self.updateButtons()

    def _detectDevices(self) -> None:
        """Ask a separate Python which devices torch sees (no freeze, no risk from a broken driver).

        Once per session (the logic keeps the answer), and not in testing mode: the generic tests open the panel
        on machines without PyTorch, and nothing there needs the list.
        """
        if self.logic.detectedDevices is not None:
            self._fillDeviceComboBox(self.logic.detectedDevices)
            return
        if slicer.app.testingEnabled():
            return
        runner = QProcessRunner()
        output = []

        def onFinished(exitCode, errorText) -> None:
            self.logic.detectedDevices = parseDetectionOutput(b"".join(output).decode("utf-8", "replace"))
            self._deviceRunner = None
            if self.ui is not None:
                self._fillDeviceComboBox(self.logic.detectedDevices)

        runner.stdoutReceived.connect(output.append)
        runner.finished.connect(onFinished)
        self._deviceRunner = runner  # keep it alive until it has answered
        runner.start(self.logic.workflow.commandBuilder.pythonExecutable, ["-c", DETECTION_SCRIPT])

    def _fillDeviceComboBox(self, devices) -> None:
        remembered = self.logic.workflow.memory.device
        wasBlocked = self.ui.deviceComboBox.blockSignals(True)
        self.ui.deviceComboBox.clear()
        for value, label in deviceChoices(devices):
            self.ui.deviceComboBox.addItem(label, value)
        values = [value for value, _label in deviceChoices(devices)]
        self.ui.deviceComboBox.setCurrentIndex(values.index(remembered) if remembered in values else 0)
        self.ui.deviceComboBox.blockSignals(wasBlocked)

    def updateBundleLabel(self) -> None:
        bundle = self.logic.workflow.currentBundle
        self.ui.bundleLabel.text = bundle.describe() if bundle else _("None yet: fine-tune one, or load a saved "
                                                                      "bundle.")
        self.ui.bundleLabel.toolTip = bundle.path if bundle else ""
        self.updateButtons()

    # ---------------------------------------------------------------------------------------------- bundles
    def onSaveBundle(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Save the model into folder"))
        if folder:
            with self._busy():
                path = self.logic.workflow.saveBundle(folder)
            self.appendLog(_("Model saved to {path}").format(path=path))
            self.ui.statusLabel.text = _("Model saved to {path}").format(path=path)

    def onLoadBundle(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(),
                                                     _("Choose a model bundle folder (holding nnsam.json)"),
                                                     self.logic.workflow.store.rootDirectory)
        if folder:
            bundle = self.logic.workflow.loadBundle(folder)
            self.ui.statusLabel.text = _("Model loaded: {bundle}").format(bundle=bundle.describe())

    def onImportBundle(self) -> None:
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), _("Import a model"), "",
                                              _("Model bundle (*.zip)"))
        if path:
            self._ensureDependencies()
            with self._busy():
                self.logic.workflow.startImportBundleZip(path)

    def onExportBundle(self) -> None:
        bundle = self.logic.workflow.currentBundle
        if bundle is None:
            raise UserError(_("No model to export yet."))
        path = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), _("Export the model"),
                                              f"{bundle.name}.zip", _("Model bundle (*.zip)"))
        if path:
            if not path.lower().endswith(".zip"):
                path += ".zip"
            self._ensureDependencies()
            with self._busy():
                self.logic.workflow.startExportBundleZip(path)

    # ---------------------------------------------------------------------------------------------- weights
    def onDownloadWeights(self) -> None:
        encoder = self._choice(self.ui.encoderComboBox, DEFAULT_ENCODER)
        entry = self.logic.manifest.get(encoder)
        question = _("Download the {label} weights ({size}) from\n{url}?\n\nThe file is checked before use; Stop "
                     "cancels the download.").format(label=entry.label, size=entry.sizeText(), url=entry.url)
        if not isNonInteractive() and not slicer.util.confirmOkCancelDisplay(question, _("nnSAM: download weights")):
            return
        self._ensureDependencies()
        with self._busy():
            self.logic.workflow.startWeightsDownload(encoder)

    def onImportWeights(self) -> None:
        encoder = self._choice(self.ui.encoderComboBox, DEFAULT_ENCODER)
        entry = self.logic.manifest.get(encoder)
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), _("Import {file}").format(file=entry.file),
                                              "", _("PyTorch weights (*.pt *.pth);;All files (*)"))
        if path:
            self._ensureDependencies()
            with self._busy():
                self.logic.workflow.startWeightsImport(encoder, path)

    # ---------------------------------------------------------------------------------------------- run
    def _trainOptions(self) -> TrainOptions:
        bundle = self.logic.workflow.currentBundle
        startFrom = bundle.path if bundle is not None and self.ui.startFromModelCheckBox.checked else None
        return TrainOptions(encoder=self._choice(self.ui.encoderComboBox, DEFAULT_ENCODER),
                            preset=self._choice(self.ui.presetComboBox, "quick"),
                            device=self._choice(self.ui.deviceComboBox, "auto"),
                            recomputeShare=self._recomputeShare(), startFrom=startFrom)

    def onFineTune(self) -> None:
        options = self._trainOptions()
        options.validate()
        if not mayReplaceResumable(self.logic.workflow.resumableFineTune, slicer.util.confirmOkCancelDisplay,
                                   interactive=not isNonInteractive()):
            return
        self._ensureDependencies()
        with self._busy():  # writes the image and the labels for the engine
            self.logic.workflow.startFineTune(self._volume(), self._annotations(), options)

    def onResumeFineTune(self) -> None:
        self._ensureDependencies()
        with self._busy():
            self.logic.workflow.startResumeFineTune()

    def onDiscardResume(self) -> None:
        if not isNonInteractive() and not slicer.util.confirmOkCancelDisplay(
                _("Delete the stopped fine-tune's work? It cannot be resumed afterwards."), _("nnSAM: discard")):
            return
        if self.logic.workflow.discardResumableFineTune():
            self.ui.statusLabel.text = _("The stopped fine-tune was discarded.")

    def onResumableChanged(self, record) -> None:
        tip = _("No stopped fine-tune to resume.")
        self.ui.resumeFineTuneButton.toolTip = record.describe() if record is not None else tip
        self.ui.discardResumeButton.toolTip = _("Delete the stopped fine-tune's saved work.") if record is not None \
            else tip
        self.updateButtons()

    def onSegment(self) -> None:
        self._ensureDependencies()
        with self._busy():  # writes the image for the engine
            self.logic.workflow.startSegment(self._volume(), self._resultTarget(), self._annotations(),
                                             device=self._choice(self.ui.deviceComboBox, "auto"))

    def onUndoResult(self) -> None:
        if self.logic.workflow.undoLastResult():
            self.ui.statusLabel.text = _("The last result was removed; your annotations are as before.")
            self.updateAnnotatedSlices()

    def onJobStarted(self, job) -> None:
        self._job = job
        self._jobConnections = [(job.progress, job.progress.connect(lambda event: self._refreshStatus())),
                                (job.logged, job.logged.connect(self.appendLog)),
                                (job.finished, job.finished.connect(self.onJobFinished))]
        self.ui.progressBar.show()
        self.ui.progressBar.setRange(0, 0)  # busy until the first progress line
        self.ui.statusLabel.text = f"{job.title}..."
        self._statusTimer.start()
        self.updateButtons()

    def _refreshStatus(self) -> None:
        job = self._job
        if job is None or not job.isRunning:
            return
        event = job.tracker.lastEvent
        if event is not None and event.fraction is not None:
            self.ui.progressBar.setRange(0, 1000)
            self.ui.progressBar.setValue(int(event.fraction * 1000))
        else:
            self.ui.progressBar.setRange(0, 0)
        status = job.tracker.statusText() or f"{job.title}..."
        self.ui.statusLabel.text = f"{status} ({formatDuration(job.elapsedSeconds)} so far)"

    def onJobFinished(self, job) -> None:
        self._statusTimer.stop()
        self.ui.progressBar.hide()
        if job.state == JobState.SUCCEEDED:
            self.ui.statusLabel.text = self._successText(job)
        elif job.state == JobState.STOPPED:
            self.ui.statusLabel.text = job.errorMessage
        else:
            self.ui.statusLabel.text = ""
            self.showError(job.errorMessage)
        if job.kind in ("weights-download", "weights-import"):
            self._checkWeightsQuietly()
        self.updateAnnotatedSlices()
        self.updateButtons()

    @staticmethod
    def _successText(job) -> str:
        elapsed = job.elapsedSeconds or 0
        if isinstance(job.result, BundleInfo):
            return _("Model ready ({time}): {bundle}").format(time=formatDuration(elapsed),
                                                               bundle=job.result.describe())
        if isinstance(job.result, ImportSummary):
            return f"{job.result.describe()} ({formatDuration(elapsed)})"
        if isinstance(job.result, str):
            return _("Written: {path}").format(path=job.result)
        return _("{title}: done.").format(title=job.title)

    def _showWeightsStatus(self, job) -> None:
        if job.state != JobState.SUCCEEDED:
            return  # the panel keeps its generic hint; the log has the engine's message
        encoder = self._choice(self.ui.encoderComboBox, DEFAULT_ENCODER)
        available = parseWeightsStatus(job.stdoutText).get(encoder)
        if available is True:
            self.ui.weightsStatusLabel.text = _("Downloaded and checked.")
        elif available is False:
            entry = self.logic.manifest.get(encoder)
            self.ui.weightsStatusLabel.text = _("Not downloaded yet ({size}).").format(size=entry.sizeText())

    def updateButtons(self) -> None:
        if self.ui is None or self.logic is None:
            return
        workflow = self.logic.workflow
        busy = workflow.isBusy or self.logic.installLogic.installing
        volume, annotations = self._volume(), self._annotations()
        hasModel = workflow.currentBundle is not None
        self.ui.fineTuneButton.enabled = not busy and volume is not None and annotations is not None
        self.ui.segmentButton.enabled = not busy and volume is not None and hasModel and (
            self._resultTarget() == "new" or annotations is not None)
        self.ui.stopButton.enabled = workflow.isBusy
        self.ui.startFromModelCheckBox.enabled = not busy and hasModel
        if not hasModel:
            self.ui.startFromModelCheckBox.checked = False
        resumable = workflow.resumableFineTune is not None
        self.ui.resumeFineTuneButton.enabled = not busy and resumable
        self.ui.discardResumeButton.enabled = not busy and resumable
        self.ui.undoResultButton.enabled = not busy and workflow.lastSnapshot is not None
        self.ui.createCardiacSegmentsButton.enabled = not busy
        for button in (self.ui.saveBundleButton, self.ui.exportBundleButton):
            button.enabled = not busy and hasModel
        for button in (self.ui.loadBundleButton, self.ui.importBundleButton, self.ui.downloadWeightsButton,
                       self.ui.importWeightsButton):
            button.enabled = not busy
        self.ui.fineTuneButton.toolTip = _("Fine-tune a model on the annotated slices.") if volume and annotations \
            else _("Select the input volume and the annotation segmentation first.")
        self.ui.segmentButton.toolTip = _("Segment the input volume with the current model.") if hasModel \
            else _("Fine-tune or load a model first.")

    def onReload(self) -> None:
        # Forget the library's modules so the reload picks up their edits too.
        for name in list(sys.modules):
            if name == "NNSAMSegmentLib" or name.startswith("NNSAMSegmentLib."):
                del sys.modules[name]
        global _sharedLogic
        if _sharedLogic is not None:
            _sharedLogic.estimator.close()
            _sharedLogic.workflow.stop()
        _sharedLogic = None
        ScriptedLoadableModuleWidget.onReload(self)


#
# NNSAMSegmentLogic
#


def defaultBundleFolder() -> str:
    return os.path.join(os.path.dirname(slicer.app.slicerUserSettingsFilePath), "NNSAMSegment", "bundles")


class NNSAMSegmentLogic(ScriptedLoadableModuleLogic):
    """Puts the Qt-free workflow together with Slicer's collaborators (scene, QProcess, QSettings, pip).

    Scripts can use it without the GUI::

        logic = NNSAMSegment.NNSAMSegmentLogic()
        job = logic.workflow.startFineTune(volumeNode, annotationSegmentationNode)
        job.wait()  # after a stop: logic.workflow.startResumeFineTune() continues from the last checkpoint
        job = logic.workflow.startSegment(volumeNode, target="new")
        job.wait()
    """

    def __init__(self, scene=None, runnerFactory=None, settingsStore=None):
        ScriptedLoadableModuleLogic.__init__(self)
        scene = scene or slicer.mrmlScene
        memory = ModelMemory(settingsStore or QtSettingsStore())
        try:
            terminology = CardiacTerminology()
        except (OSError, ValueError, KeyError) as error:
            logging.warning(f"NNSAMSegment: cardiac terminology unavailable: {error}")
            terminology = None
        try:
            self.manifest = WeightsManifest.load(sharedResourcePath(WEIGHTS_MANIFEST_FILE))
        except (OSError, UserError) as error:
            logging.warning(f"NNSAMSegment: weights manifest unavailable: {error}")
            self.manifest = None
        self.workflow = NNSAMWorkflow(
            scene, EngineCommandBuilder(), runnerFactory or QProcessRunner,
            BundleStore(memory.bundleFolder(defaultBundleFolder())), memory, terminology,
            jobBaseDirectory=os.path.join(slicer.app.temporaryPath, "NNSAMSegment"))
        interactive = not (isNonInteractive() or slicer.app.testingEnabled())
        self.installLogic = InstallLogic(interactive=interactive)
        # The panel's expected time of a fine-tune; it never runs beside another job (see Estimates.py).
        self.estimator = FineTuneEstimator(self.workflow)
        self.detectedDevices = None  # the compute devices torch sees, once asked (see NNSAMSegmentWidget)

    def encoderLabel(self, encoder: str) -> str:
        if self.manifest is not None and encoder in self.manifest.encoders:
            return self.manifest.encoders[encoder].label
        return encoder
