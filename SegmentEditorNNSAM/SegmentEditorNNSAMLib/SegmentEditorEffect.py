"""Segment Editor effect "nnSAM": the slices you painted -> fine-tune (or reuse the current model) -> preview of the
other slices -> Apply (undoable) or Cancel.

The work is done by the nnSAM Segment module's logic (shared, so the panel shows the same model and job); this file
only builds the options panel and handles the preview.
"""

import logging
import os

import qt

import slicer
from SegmentEditorEffects.AbstractScriptedSegmentEditorEffect import AbstractScriptedSegmentEditorEffect


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    PREVIEW_NAME = "nnSAM preview (Apply or Cancel)"

    def __init__(self, scriptedEffect):
        scriptedEffect.name = "nnSAM"
        scriptedEffect.perSegment = False
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self._previewNode = None
        self._prediction = None  # (label array, bundle, volume node, segmentation node)
        self._job = None
        self._connections = []  # (Signal, id) on the shared logic; dropped by cleanup()
        self._jobConnections = []  # (Signal, id) on the followed job

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        iconPath = os.path.join(os.path.dirname(__file__), "SegmentEditorEffect.png")
        return qt.QIcon(iconPath) if os.path.exists(iconPath) else qt.QIcon()

    def helpText(self):
        return """<html>Learn the rest of the volume from the slices you painted (nnSAM).<br>
<ol style="margin: 0">
<li>Paint every structure (e.g. LV, RV, LA, RA, Myo) on a few slices of the source volume; each painted slice counts
as fully annotated.</li>
<li>Click <b>Fine-tune and preview</b> (or <b>Preview with current model</b> to reuse the model you have).</li>
<li>Check the preview in the unpainted slices, then <b>Apply</b> (Undo reverts it) or <b>Cancel</b>.</li>
</ol>Your painted slices are never changed. Long runs continue in the background; Stop ends them.</html>"""

    # ---------------------------------------------------------------------------------------------- panel
    def setupOptionsFrame(self):
        from NNSAMSegmentLib.EngineCommands import ENCODERS, PRESETS

        logic = self._logic()
        self.encoderComboBox = qt.QComboBox()
        for encoder in ENCODERS:
            self.encoderComboBox.addItem(logic.encoderLabel(encoder), encoder)
        self.encoderComboBox.setCurrentIndex(ENCODERS.index(logic.workflow.memory.encoder))
        self.presetComboBox = qt.QComboBox()
        for preset in PRESETS:
            self.presetComboBox.addItem(preset, preset)
        self.presetComboBox.setCurrentIndex(PRESETS.index(logic.workflow.memory.preset))
        self.scriptedEffect.addLabeledOptionsWidget("SAM encoder:", self.encoderComboBox)
        self.scriptedEffect.addLabeledOptionsWidget("Preset:", self.presetComboBox)

        self.modelLabel = qt.QLabel()
        self.modelLabel.wordWrap = True
        self.scriptedEffect.addLabeledOptionsWidget("Current model:", self.modelLabel)
        self.startFromModelCheckBox = qt.QCheckBox("Fine-tune starts from the current model")
        self.startFromModelCheckBox.toolTip = ("Adapt the current model to this scan with a short schedule instead "
                                               "of learning from scratch (same segments, same order).")
        self.scriptedEffect.addOptionsWidget(self.startFromModelCheckBox)

        self.fineTuneButton = qt.QPushButton("Fine-tune and preview")
        self.fineTuneButton.toolTip = "Fine-tune on the painted slices, then preview the other slices."
        self.previewButton = qt.QPushButton("Preview with current model")
        self.previewButton.toolTip = "Skip fine-tuning: segment with the current model."
        runLayout = qt.QHBoxLayout()
        runLayout.addWidget(self.fineTuneButton)
        runLayout.addWidget(self.previewButton)
        self.scriptedEffect.addOptionsWidget(runLayout)

        self.applyButton = qt.QPushButton("Apply")
        self.applyButton.toolTip = "Write the preview into the unpainted slices (Undo reverts)."
        self.cancelButton = qt.QPushButton("Cancel")
        self.cancelButton.toolTip = "Discard the preview."
        self.stopButton = qt.QPushButton("Stop")
        self.stopButton.toolTip = "Stop the running job; nothing half-finished is kept."
        finishLayout = qt.QHBoxLayout()
        for button in (self.applyButton, self.cancelButton, self.stopButton):
            finishLayout.addWidget(button)
        self.scriptedEffect.addOptionsWidget(finishLayout)

        self.progressBar = qt.QProgressBar()
        self.progressBar.hide()
        self.statusLabel = qt.QLabel()
        self.statusLabel.wordWrap = True
        self.errorLabel = qt.QLabel()
        self.errorLabel.wordWrap = True
        self.errorLabel.styleSheet = "color: #c0392b;"
        for widget in (self.progressBar, self.statusLabel, self.errorLabel):
            self.scriptedEffect.addOptionsWidget(widget)

        self.fineTuneButton.connect("clicked()", lambda: self._guard(self.onFineTuneAndPreview))
        self.previewButton.connect("clicked()", lambda: self._guard(self.onPreview))
        self.applyButton.connect("clicked()", lambda: self._guard(self.onApply))
        self.cancelButton.connect("clicked()", lambda: self._guard(self.onCancel))
        self.stopButton.connect("clicked()", lambda: logic.workflow.stop())
        self.encoderComboBox.connect("currentIndexChanged(int)", self._rememberChoices)
        self.presetComboBox.connect("currentIndexChanged(int)", self._rememberChoices)
        # The logic outlives this effect (Slicer calls cleanup() and then deletes effects): cleanup() drops these.
        self._connections = [
            (logic.workflow.bundleChanged,
             logic.workflow.bundleChanged.connect(lambda bundle: self.updateGUIFromMRML())),
            (logic.installLogic.busyChanged,
             logic.installLogic.busyChanged.connect(lambda installing: self.updateGUIFromMRML())),
        ]

    def cleanup(self):
        """Called by Slicer before the effect is deleted: nothing may call into its widgets afterwards."""
        for signal, connectionId in self._connections + self._jobConnections:
            signal.disconnect(connectionId)
        self._connections, self._jobConnections = [], []
        self._removePreview(updateGUI=False)

    def activate(self):
        self.updateGUIFromMRML()

    def deactivate(self):
        # A preview left behind would look like a result: switching effects cancels it (a running job continues).
        self._removePreview()

    def updateGUIFromMRML(self):
        if not hasattr(self, "fineTuneButton"):
            return
        logic = self._logic()
        workflow = logic.workflow
        busy = workflow.isBusy or logic.installLogic.installing
        bundle = workflow.currentBundle
        self.modelLabel.text = bundle.describe() if bundle else "None yet: fine-tune on your painted slices."
        self.fineTuneButton.enabled = not busy
        self.startFromModelCheckBox.enabled = not busy and bundle is not None
        if bundle is None:
            self.startFromModelCheckBox.checked = False
        self.previewButton.enabled = not busy and bundle is not None
        self.applyButton.enabled = not busy and self._prediction is not None
        self.cancelButton.enabled = self._prediction is not None
        self.stopButton.enabled = workflow.isBusy

    # ---------------------------------------------------------------------------------------------- helpers
    @staticmethod
    def _logic():
        import NNSAMSegment

        return NNSAMSegment.getSharedLogic()

    def _guard(self, action):
        from NNSAMSegmentLib.Errors import UserError

        self.errorLabel.text = ""
        try:
            action()
        except UserError as error:
            self.errorLabel.text = str(error)
        except Exception as error:
            logging.exception("nnSAM effect: unexpected error")
            self.errorLabel.text = f"Unexpected error: {error} (details in the Python console)"
        self.updateGUIFromMRML()

    def _rememberChoices(self, index=None):
        memory = self._logic().workflow.memory
        memory.encoder = self.encoderComboBox.itemData(self.encoderComboBox.currentIndex)
        memory.preset = self.presetComboBox.itemData(self.presetComboBox.currentIndex)

    def _inputs(self):
        from NNSAMSegmentLib.Errors import UserError

        parameterNode = self.scriptedEffect.parameterSetNode()
        segmentationNode = parameterNode.GetSegmentationNode() if parameterNode else None
        volumeNode = parameterNode.GetSourceVolumeNode() if parameterNode else None
        if segmentationNode is None or volumeNode is None:
            raise UserError("Select a segmentation and its source volume first.")
        return volumeNode, segmentationNode

    def _ensureDependencies(self):
        from NNSAMSegmentLib.Errors import UserError

        if not self._logic().installLogic.ensureDependencies():
            raise UserError("nnSAM cannot run without its Python packages (installation declined).")

    def _follow(self, job, onSuccess=None):
        """Show a job's progress here; call ``onSuccess(job)`` when it succeeds."""
        from NNSAMSegmentLib.EngineJob import JobState

        self._job = job
        self.progressBar.show()
        self.progressBar.setRange(0, 0)
        self.statusLabel.text = f"{job.title}..."

        def onProgress(event):
            if event.fraction is not None:
                self.progressBar.setRange(0, 1000)
                self.progressBar.setValue(int(event.fraction * 1000))
            self.statusLabel.text = job.tracker.statusText()

        def onFinished(finishedJob):
            self.progressBar.hide()
            if finishedJob.state == JobState.SUCCEEDED:
                self.statusLabel.text = ""
                if onSuccess is not None:
                    self._guard(lambda: onSuccess(finishedJob))
            elif finishedJob.state == JobState.STOPPED:
                self.statusLabel.text = finishedJob.errorMessage
            else:
                self.statusLabel.text = ""
                self.errorLabel.text = finishedJob.errorMessage
            self.updateGUIFromMRML()

        for signal, connectionId in self._jobConnections:  # an earlier job's
            signal.disconnect(connectionId)
        self._jobConnections = []
        if not job.isRunning:  # it ended while starting (e.g. the engine could not be launched)
            onFinished(job)
            return
        self._jobConnections = [(job.progress, job.progress.connect(onProgress)),
                                (job.finished, job.finished.connect(onFinished))]
        self.updateGUIFromMRML()

    # ---------------------------------------------------------------------------------------------- actions
    def onFineTuneAndPreview(self):
        from NNSAMSegmentLib.EngineCommands import TrainOptions
        from NNSAMSegmentLib.FineTuneResume import mayReplaceResumable
        from NNSAMSegmentLib.InstallLogic import isNonInteractive

        volumeNode, segmentationNode = self._inputs()
        if not mayReplaceResumable(self._logic().workflow.resumableFineTune, slicer.util.confirmOkCancelDisplay,
                                   interactive=not isNonInteractive()):
            return  # the stopped fine-tune stays resumable (from the nnSAM module)
        self._removePreview()
        self._rememberChoices()
        memory = self._logic().workflow.memory
        bundle = self._logic().workflow.currentBundle
        startFrom = bundle.path if bundle is not None and self.startFromModelCheckBox.checked else None
        options = TrainOptions(encoder=memory.encoder, preset=memory.preset, device=memory.device,
                               recomputeShare=memory.recomputeShare, startFrom=startFrom)
        options.validate()
        self._ensureDependencies()
        job = self._logic().workflow.startFineTune(volumeNode, segmentationNode, options)
        self._follow(job, onSuccess=lambda finished: self.onPreview())

    def onPreview(self):
        volumeNode, segmentationNode = self._inputs()
        self._removePreview()
        self._ensureDependencies()
        workflow = self._logic().workflow

        def showPreview(prediction, bundle):
            # Only the slices nobody painted are previewed (and later applied).
            keptSlices = workflow.annotationReader.annotatedSlicesOf(segmentationNode, volumeNode)
            previewLabels = prediction.copy()
            previewLabels[keptSlices] = 0
            summary = workflow.importer.createSegmentationNode(volumeNode, previewLabels, bundle.classes,
                                                               name=self.PREVIEW_NAME)
            self._previewNode = summary.segmentationNode
            displayNode = self._previewNode.GetDisplayNode()
            if displayNode is not None:
                displayNode.SetOpacity(0.6)
            self._prediction = (prediction, bundle, volumeNode, segmentationNode)
            self.statusLabel.text = f"Preview ready ({summary.describe()}). Apply or Cancel."
            return summary

        job = workflow.startPredict(volumeNode, showPreview, device=workflow.memory.device, title="Previewing")
        self._follow(job)

    def onApply(self):
        from NNSAMSegmentLib.Errors import UserError

        if self._prediction is None:
            raise UserError("No preview to apply yet.")
        prediction, bundle, volumeNode, segmentationNode = self._prediction
        current = self.scriptedEffect.parameterSetNode().GetSegmentationNode()
        if current is not segmentationNode:
            raise UserError("The preview belongs to another segmentation; preview again.")
        self.scriptedEffect.saveStateForUndo()  # Undo in the Segment Editor reverts the whole result
        summary = self._logic().workflow.importer.fillUnannotatedSlices(segmentationNode, volumeNode, prediction,
                                                                        bundle.classes, self._writeMasked)
        self._removePreview()
        self.statusLabel.text = f"Applied. {summary.describe()}"

    def _writeMasked(self, segmentationNode, segmentId, mask, geometry):
        """Add ``mask`` to the segment as the Segment Editor's own effects do: its masking settings (editable area,
        editable intensity range) and overwrite setting apply."""
        from NNSAMSegmentLib.ImageGeometry import orientedImageFromArray

        modifier = orientedImageFromArray(mask.astype("uint8"), geometry)
        self.scriptedEffect.modifySegmentByLabelmap(segmentationNode, segmentId, modifier,
                                                    slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeAdd,
                                                    False)

    def onCancel(self):
        self._removePreview()
        self.statusLabel.text = "Preview discarded."

    def _removePreview(self, updateGUI=True):
        node = self._previewNode
        self._previewNode = None
        self._prediction = None
        if node is not None and slicer.mrmlScene.IsNodePresent(node):
            slicer.mrmlScene.RemoveNode(node)
        if updateGUI and hasattr(self, "fineTuneButton"):
            self.updateGUIFromMRML()
