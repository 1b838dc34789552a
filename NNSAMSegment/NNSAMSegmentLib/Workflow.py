"""The fine-tune / segment workflow shared by the module panel, the Segment Editor effect and the self-test.

Each ``start...`` method checks the inputs (bad input -> one-line :class:`UserError` before anything runs), writes
the engine's inputs into a fresh job folder, and returns a started :class:`EngineJob`. Results are taken over
only when the engine succeeded: a fine-tuned bundle is moved into the bundle store, a prediction is imported into
the scene. One job runs at a time.

A fine-tune that is stopped or fails once training has begun keeps its job folder (inputs, the engine's work
folder with its checkpoints; never a bundle in the store) as the *resumable fine-tune*, remembered across
sessions; :meth:`NNSAMWorkflow.startResumeFineTune` runs the same command again with ``--resume`` in that folder.
A new fine-tune or :meth:`NNSAMWorkflow.discardResumableFineTune` deletes it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Callable, Optional

import numpy as np

from .Annotations import AnnotationReader, describeSlices
from .Bundles import BundleInfo, BundleStore, placeBundle, timestampedName
from .EngineCommands import EngineCommand, EngineCommandBuilder, TrainOptions
from .EngineJob import EngineJob, JobState, createJobDirectory
from .Estimates import EstimateRequest, geometryFilePath, writeGeometryHeader
from .Errors import UserError
from .FineTuneResume import FineTuneRecord, resumeNote
from .ImageGeometry import imageFromVolumeNode
from .ProcessRunner import ProcessRunner
from .ResultImport import ImportSummary, ResultImporter, SegmentationSnapshot
from .Settings import ModelMemory
from .Signal import Signal
from .Terminology import CardiacTerminology, ensureCardiacSegments

RESULT_TARGETS = ("fill", "new")


class NNSAMWorkflow:
    def __init__(self, scene, commandBuilder: EngineCommandBuilder, runnerFactory: Callable[[], ProcessRunner],
                 store: BundleStore, memory: ModelMemory, terminology: Optional[CardiacTerminology] = None,
                 jobBaseDirectory: Optional[str] = None, env: Optional[dict] = None):
        self.scene = scene
        self.commandBuilder = commandBuilder
        self.runnerFactory = runnerFactory
        self.store = store
        self.memory = memory
        self.terminology = terminology
        self.jobBaseDirectory = jobBaseDirectory
        self.env = env
        self.annotationReader = AnnotationReader(scene)
        self.importer = ResultImporter(scene, terminology)

        self.currentBundle: Optional[BundleInfo] = None
        self.currentJob: Optional[EngineJob] = None
        self.lastSnapshot: Optional[SegmentationSnapshot] = None
        self.resumableFineTune: Optional[FineTuneRecord] = None
        self.jobStarted = Signal()  # (EngineJob)
        self.bundleChanged = Signal()  # (BundleInfo or None)
        self.resumableChanged = Signal()  # (FineTuneRecord or None)

    # ------------------------------------------------------------------------------------------------ bundles
    def restoreLastBundle(self) -> Optional[BundleInfo]:
        """Make the last used bundle current again (one-click Segment after a restart)."""
        path = self.memory.lastBundlePath
        if path is None:
            return None
        try:
            self.setCurrentBundle(BundleInfo.read(path))
        except UserError:
            self.memory.lastBundlePath = None  # moved or deleted since: forget it quietly
            return None
        return self.currentBundle

    def setCurrentBundle(self, bundle: Optional[BundleInfo]) -> None:
        self.currentBundle = bundle
        self.memory.lastBundlePath = bundle.path if bundle is not None else None
        self.bundleChanged.emit(bundle)

    def loadBundle(self, path: str) -> BundleInfo:
        bundle = BundleInfo.read(path)
        self.setCurrentBundle(bundle)
        return bundle

    def saveBundle(self, parentDirectory: str, name: Optional[str] = None) -> str:
        """Copy the current bundle into ``parentDirectory`` (complete or not at all); returns the copy's path."""
        bundle = self._requireBundle()
        return placeBundle(bundle.path, parentDirectory, name or bundle.name)

    def _requireBundle(self, bundle: Optional[BundleInfo] = None) -> BundleInfo:
        bundle = bundle or self.currentBundle
        if bundle is None:
            raise UserError("No model yet: fine-tune one on your annotations, or load / import a saved bundle.")
        if not os.path.isfile(os.path.join(bundle.path, "nnsam.json")):
            raise UserError(f"The model folder {bundle.path} is gone; load another bundle.")
        return bundle

    # ------------------------------------------------------------------------------------------------ annotations
    def ensureCardiacSegments(self, segmentationNode, volumeNode=None) -> list[str]:
        """Add the missing LV, RV, LA, RA, Myo segments (standard names, codes, colours)."""
        if segmentationNode is None:
            raise UserError("Select or create the segmentation that will hold your annotations.")
        if self.terminology is None:
            raise UserError("The cardiac terminology file is missing from the extension.")
        segmentation = segmentationNode.GetSegmentation()
        if volumeNode is not None and segmentation.GetNumberOfSegments() == 0:
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        return ensureCardiacSegments(segmentation, self.terminology)

    def annotatedSlicesText(self, segmentationNode, volumeNode) -> str:
        return self.annotationStatus(segmentationNode, volumeNode)[0]

    def annotationStatus(self, segmentationNode, volumeNode) -> tuple[str, Optional[list[int]]]:
        """The panel's line about the annotated slices, and those slices (None without a volume and a
        segmentation)."""
        if segmentationNode is None or volumeNode is None or volumeNode.GetImageData() is None:
            return "Select a volume and the segmentation holding your annotations.", None
        slices = self.annotationReader.annotatedSlicesOf(segmentationNode, volumeNode)
        return describeSlices(slices, volumeNode.GetImageData().GetDimensions()[2]), slices

    # ------------------------------------------------------------------------------------------------ jobs
    @property
    def isBusy(self) -> bool:
        return self.currentJob is not None and self.currentJob.isRunning

    def stop(self) -> None:
        if self.currentJob is not None:
            self.currentJob.stop()

    def _startJob(self, kind: str, title: str, makeCommand: Callable[[str], EngineCommand],
                  onSuccess: Optional[Callable[[EngineJob], None]] = None, background: bool = False,
                  keepFolder: Optional[Callable[[EngineJob], Optional[str]]] = None,
                  jobDirectory: Optional[str] = None) -> EngineJob:
        """Create a job folder, let ``makeCommand(folder)`` write inputs and build the command, start the job.

        A ``background`` job (a quick read-only query) neither takes the one-job slot nor is announced. An existing
        ``jobDirectory`` (a resumed job) is used instead of a new one and is left alone if the job cannot start.
        """
        if self.isBusy and not background:
            raise UserError("Another nnSAM job is running; wait for it to finish or press Stop.")
        newDirectory = jobDirectory is None
        if newDirectory:
            jobDirectory = createJobDirectory(self.jobBaseDirectory)
        try:
            command = makeCommand(jobDirectory)
            job = EngineJob(self.runnerFactory(), command, jobDirectory, title=title, onSuccess=onSuccess,
                            env=self.env, kind=kind, keepFolder=keepFolder)
            if not background:
                self.currentJob = job
                self.jobStarted.emit(job)
            job.start()
        except BaseException:
            # Nothing was started: leave no new folder behind.
            if newDirectory:
                shutil.rmtree(jobDirectory, ignore_errors=True)
            raise
        return job

    def startFineTune(self, volumeNode, annotationNode, options: Optional[TrainOptions] = None) -> EngineJob:
        """Fine-tune on the annotated slices; on success the bundle is stored and becomes the current model.

        Once started it replaces (deletes) the resumable fine-tune, if any.
        """
        options = dataclasses.replace(options or TrainOptions(), resume=False)
        options.validate()
        if volumeNode is None:
            raise UserError("Select an input volume.")
        image = imageFromVolumeNode(volumeNode)
        training = self.annotationReader.trainingLabels(annotationNode, volumeNode)
        if options.startFrom:
            problem = BundleInfo.read(options.startFrom).adaptationProblem(training.classNames)
            if problem:
                raise UserError(problem)
        title = f"Fine-tuning on {len(training.slices)} slices ({', '.join(training.classNames)})"
        template = FineTuneRecord(jobDirectory="", bundleName=timestampedName(volumeNode.GetName() or "model"),
                                  title=title, slices=tuple(training.slices),
                                  classNames=tuple(training.classNames), options=options)

        def makeCommand(jobDirectory: str) -> EngineCommand:
            record = dataclasses.replace(template, jobDirectory=jobDirectory)
            image.write(record.imagePath)
            image.withArray(training.labels.astype(np.uint8)).write(record.labelsPath, useCompression=True)
            record.write()
            return self._trainCommand(record, resume=False)

        def keepFolder(job: EngineJob) -> Optional[str]:
            return self._keepForResume(job, dataclasses.replace(template, jobDirectory=job.jobDirectory),
                                       resumed=False)

        replaced = self.resumableFineTune
        job = self._startJob("fine-tune", title, makeCommand, self._adoptTrainedBundle(template.bundleName),
                             keepFolder=keepFolder)
        started = job.isRunning or job.state == JobState.SUCCEEDED  # not a failure to launch the engine at all
        if replaced is not None and self.resumableFineTune is replaced and started:
            self._forgetResumable(deleteFolder=True)
        return job

    def _trainCommand(self, record: FineTuneRecord, resume: bool) -> EngineCommand:
        return self.commandBuilder.train(record.imagePath, record.labelsPath, record.bundlePath, record.slices,
                                         record.classNames, dataclasses.replace(record.options, resume=resume))

    def _adoptTrainedBundle(self, bundleName: str) -> Callable[[EngineJob], None]:
        def onSuccess(job: EngineJob) -> None:
            produced = os.path.join(job.jobDirectory, "bundle")
            if not os.path.isfile(os.path.join(produced, "nnsam.json")):
                raise UserError("The engine finished but wrote no model bundle; see the log.")
            bundle = self.store.adopt(produced, bundleName)
            self.setCurrentBundle(bundle)
            job.result = bundle
            if self.resumableFineTune is not None and self.resumableFineTune.jobDirectory == job.jobDirectory:
                self._forgetResumable(deleteFolder=False)  # the job deletes its folder next

        return onSuccess

    def _keepForResume(self, job: EngineJob, record: FineTuneRecord, resumed: bool) -> Optional[str]:
        """``keepFolder`` of fine-tune jobs: keep a stopped or failed training that can go on."""
        resumable = (job.exitCode != 0  # the engine did not finish (a finished one left nothing to resume)
                     and record.inputsExist()
                     and (resumed or "train" in job.stagesSeen or record.hasCheckpoint()))
        if not resumable:
            if self.resumableFineTune is not None and self.resumableFineTune.jobDirectory == job.jobDirectory:
                self._forgetResumable(deleteFolder=False)  # the job deletes its folder next
            return None
        self._setResumable(record)
        return resumeNote(record)

    # ------------------------------------------------------------------------------------------------ resume
    def _setResumable(self, record: Optional[FineTuneRecord]) -> None:
        self.resumableFineTune = record
        self.memory.resumableFineTunePath = record.jobDirectory if record is not None else None
        self.resumableChanged.emit(record)

    def _forgetResumable(self, deleteFolder: bool) -> None:
        record = self.resumableFineTune
        if record is None:
            return
        self._setResumable(None)
        if deleteFolder:
            shutil.rmtree(record.jobDirectory, ignore_errors=True)

    def restoreResumableFineTune(self) -> Optional[FineTuneRecord]:
        """Offer the fine-tune stopped in an earlier session again (if its folder is still there)."""
        path = self.memory.resumableFineTunePath  # None if the folder was deleted since (e.g. temporary files)
        if path is None:
            return None
        try:
            self._setResumable(FineTuneRecord.read(path))
        except UserError:
            self.memory.resumableFineTunePath = None  # incomplete: forget it quietly
            return None
        return self.resumableFineTune

    def startResumeFineTune(self) -> EngineJob:
        """Continue the stopped fine-tune from its last checkpoint (same command, ``--resume``, same folder)."""
        record = self.resumableFineTune
        if record is None:
            raise UserError("There is no stopped fine-tune to resume.")
        if not record.inputsExist():
            self._forgetResumable(deleteFolder=True)
            raise UserError(f"The files of the stopped fine-tune in {record.jobDirectory} are gone; start a new "
                            "fine-tune.")
        return self._startJob("fine-tune", f"Resuming: {record.title}", lambda folder: self._trainCommand(record, True),
                              self._adoptTrainedBundle(record.bundleName),
                              keepFolder=lambda job: self._keepForResume(job, record, resumed=True),
                              jobDirectory=record.jobDirectory)

    def discardResumableFineTune(self) -> bool:
        """Delete the stopped fine-tune's folder; False if there was none."""
        record = self.resumableFineTune
        if record is None:
            return False
        if self.isBusy and self.currentJob.jobDirectory == record.jobDirectory:
            raise UserError("The stopped fine-tune is running again; press Stop first.")
        self._forgetResumable(deleteFolder=True)
        return True

    def startPredict(self, volumeNode, onPrediction: Callable[[np.ndarray, BundleInfo], object],
                     bundle: Optional[BundleInfo] = None, device: str = "auto", title: str = "Segmenting") \
            -> EngineJob:
        """Run the model on ``volumeNode``; ``onPrediction(labelArray, bundle)`` receives the checked result."""
        bundle = self._requireBundle(bundle)
        if volumeNode is None:
            raise UserError("Select an input volume.")
        image = imageFromVolumeNode(volumeNode)

        def makeCommand(jobDirectory: str) -> EngineCommand:
            imagePath = os.path.join(jobDirectory, "image.nrrd")
            image.write(imagePath)
            return self.commandBuilder.predict(bundle.path, imagePath, os.path.join(jobDirectory, "prediction.nrrd"),
                                               device)

        def onSuccess(job: EngineJob) -> None:
            if volumeNode.GetScene() is None:
                raise UserError(f"'{volumeNode.GetName()}' was closed while the model ran; nothing was imported.")
            path = os.path.join(job.jobDirectory, "prediction.nrrd")
            if not os.path.isfile(path):
                raise UserError("The engine finished but wrote no result; see the log.")
            job.result = onPrediction(self.importer.readPrediction(path, volumeNode), bundle)

        return self._startJob("predict", title, makeCommand, onSuccess)

    def startSegment(self, volumeNode, target: str = "fill", annotationNode=None,
                     bundle: Optional[BundleInfo] = None, device: str = "auto") -> EngineJob:
        """Segment ``volumeNode``: fill the unannotated slices of ``annotationNode``, or make a new segmentation."""
        if target not in RESULT_TARGETS:
            raise ValueError(f"unknown result target {target!r}")
        if target == "fill":
            if annotationNode is None:
                raise UserError("Select the segmentation to fill, or send the result to a new segmentation.")
            if volumeNode is not None and annotationNode.GetTransformNodeID() != volumeNode.GetTransformNodeID():
                raise UserError(f"'{annotationNode.GetName()}' and '{volumeNode.GetName()}' are under different "
                                "transforms; put them under the same transform (or harden it) first.")

        def onPrediction(prediction: np.ndarray, usedBundle: BundleInfo) -> ImportSummary:
            if target == "fill":
                if annotationNode.GetScene() is None:
                    raise UserError(f"'{annotationNode.GetName()}' was closed while the model ran; nothing was "
                                    "imported.")
                snapshot = SegmentationSnapshot(annotationNode)
                summary = self.importer.fillUnannotatedSlices(annotationNode, volumeNode, prediction,
                                                              usedBundle.classes)
                snapshot.markResult()
                self.lastSnapshot = snapshot
                return summary
            return self.importer.createSegmentationNode(volumeNode, prediction, usedBundle.classes)

        return self.startPredict(volumeNode, onPrediction, bundle, device)

    def undoLastResult(self) -> bool:
        """Put the segmentation back as it was before the last 'fill' import; False if there is nothing to undo.

        Raises :class:`UserError` (and keeps everything) if the segmentation was edited after the import.
        """
        if self.lastSnapshot is None:
            return False
        try:
            self.lastSnapshot.restore()
        except UserError:
            self.lastSnapshot = None  # the moment has passed; the Segment Editor's own undo remains
            raise
        self.lastSnapshot = None
        return True

    # ------------------------------------------------------------------------------------------------ zip, weights
    def startImportBundleZip(self, zipPath: str) -> EngineJob:
        if not os.path.isfile(zipPath):
            raise UserError(f"{zipPath} does not exist.")
        name = os.path.splitext(os.path.basename(zipPath))[0]

        def onSuccess(job: EngineJob) -> None:
            bundle = self.store.adopt(os.path.join(job.jobDirectory, "bundle"), name)
            self.setCurrentBundle(bundle)
            job.result = bundle

        return self._startJob("bundle-import", f"Importing {os.path.basename(zipPath)}",
                              lambda folder: self.commandBuilder.bundleImport(zipPath, os.path.join(folder, "bundle")),
                              onSuccess)

    def startExportBundleZip(self, zipPath: str, bundle: Optional[BundleInfo] = None) -> EngineJob:
        bundle = self._requireBundle(bundle)
        zipPath = os.path.abspath(zipPath)

        def onSuccess(job: EngineJob) -> None:
            produced = os.path.join(job.jobDirectory, "bundle.zip")
            if not os.path.isfile(produced):
                raise UserError("The engine finished but wrote no zip file; see the log.")
            # Copy next to the destination, then rename: a reader never sees a half-written zip.
            partial = zipPath + ".part"
            try:
                shutil.copyfile(produced, partial)
                os.replace(partial, zipPath)
            except OSError as error:
                raise UserError(f"Cannot write {zipPath}: {error.strerror or error}.") from error
            finally:
                if os.path.exists(partial):
                    os.remove(partial)
            job.result = zipPath

        return self._startJob("bundle-export", f"Exporting {bundle.name}",
                              lambda folder: self.commandBuilder.bundleExport(bundle.path,
                                                                              os.path.join(folder, "bundle.zip")),
                              onSuccess)

    def startWeightsDownload(self, encoder: str) -> EngineJob:
        return self._startJob("weights-download", f"Downloading {encoder} weights",
                              lambda folder: self.commandBuilder.weightsDownload(encoder))

    def startWeightsImport(self, encoder: str, filePath: str) -> EngineJob:
        if not os.path.isfile(filePath):
            raise UserError(f"{filePath} does not exist.")
        return self._startJob("weights-import", f"Importing {encoder} weights",
                              lambda folder: self.commandBuilder.weightsImport(encoder, filePath))

    def startEstimate(self, request: EstimateRequest) -> EngineJob:
        """Ask the engine how long the fine-tune ``request`` describes would take; runs in the background (it only
        reads), so callers keep it from running beside another job (see Estimates.FineTuneEstimator)."""

        def makeCommand(jobDirectory: str) -> EngineCommand:
            path = geometryFilePath(jobDirectory)
            writeGeometryHeader(path, request)
            return self.commandBuilder.estimate(path, request.painted, request.options)

        return self._startJob("estimate", "Estimating the fine-tune's time", makeCommand, background=True)

    def startWeightsStatus(self) -> EngineJob:
        """Ask which encoder weights are available; runs beside other jobs (it only reads)."""
        return self._startJob("weights-status", "Checking weights",
                              lambda folder: self.commandBuilder.weightsStatus(), background=True)

