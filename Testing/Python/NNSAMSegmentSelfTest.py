"""Slicer self-test of the nnSAM Segment module, run by ctest on the extension build machine.

It needs neither PyTorch nor the network: a small stand-in engine (written to a temporary folder, run under
PythonSlicer exactly as nnsam_core would be) answers the module's command lines. What it checks in the real
application: engine jobs started through Qt's QProcess finish and their results are imported, and Stop reaches an
engine that runs behind the PythonSlicer launcher, which ends cleanly.

Set NNSAM_SELFTEST_REAL_ENGINE=1 to also fine-tune the real engine for two iterations (needs its packages).
"""

import os
import shutil
import tempfile
import textwrap
import time

import numpy as np

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

# The engine's command line for train and predict, and its stop hook (end as on Ctrl-C once NNSAM_STOP_FILE exists).
STAND_IN_ENGINE = textwrap.dedent(r'''
    import _thread, argparse, json, os, sys, threading, time
    import SimpleITK as sitk

    stopFile = os.environ.get("NNSAM_STOP_FILE")
    if stopFile:
        def watch():
            while not os.path.exists(stopFile):
                time.sleep(0.1)
            _thread.interrupt_main()
        threading.Thread(target=watch, daemon=True).start()

    def progress(stage, step=0, total=0):
        print(json.dumps(dict(stage=stage, step=step, total=total, message="")), flush=True)

    parser = argparse.ArgumentParser(prog="nnsam")
    verbs = parser.add_subparsers(dest="verb", required=True)
    train = verbs.add_parser("train")
    train.add_argument("image"); train.add_argument("labels"); train.add_argument("-o", required=True)
    for flag in ("--slices", "--class-names", "--encoder", "--method", "--preset", "--device", "--iterations",
                 "--start-from", "--recompute-share", "--progress"):
        train.add_argument(flag)
    train.add_argument("--resume", action="store_true")
    predict = verbs.add_parser("predict")
    predict.add_argument("bundle"); predict.add_argument("image"); predict.add_argument("-o", required=True)
    predict.add_argument("--device"); predict.add_argument("--progress")
    args = parser.parse_args()

    if args.verb == "train":
        names = args.class_names.split(",")
        steps = int(os.environ.get("STAND_IN_STEPS", "3"))
        try:
            for step in range(1, steps + 1):
                progress("train", step, steps)
                time.sleep(0.1)
        except KeyboardInterrupt:
            with open(os.environ["STAND_IN_CLEANED"], "w") as handle:
                handle.write(str(os.getpid()))
            print("nnsam: error: interrupted", file=sys.stderr, flush=True)
            sys.exit(130)
        os.makedirs(args.o)
        with open(os.path.join(args.o, "nnsam.json"), "w") as handle:
            json.dump({"format_version": 1, "method": args.method, "encoder": {"name": args.encoder},
                       "classes": [{"value": i + 1, "name": n} for i, n in enumerate(names)]}, handle)
        progress("done")
    else:
        with open(os.path.join(args.bundle, "nnsam.json")) as handle:
            classes = json.load(handle)["classes"]
        image = sitk.ReadImage(args.image)
        result = sitk.GetImageFromArray((sitk.GetArrayFromImage(image) > 50).astype("uint8") * classes[0]["value"])
        result.CopyInformation(image)
        sitk.WriteImage(result, args.o)
        progress("done")
''')


class NNSAMSegmentSelfTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()
        self.workDirectory = tempfile.mkdtemp(prefix="nnsam-selftest-")
        self.cleanedFile = os.path.join(self.workDirectory, "cleaned")
        os.environ["STAND_IN_CLEANED"] = self.cleanedFile
        os.environ.pop("STAND_IN_STEPS", None)

    def tearDown(self):
        shutil.rmtree(self.workDirectory, ignore_errors=True)

    def runTest(self):
        self.setUp()
        self.test_JobsFinishAndResultsAreImported()
        self.setUp()
        self.test_StopReachesTheEngineBehindTheLauncher()
        if os.environ.get("NNSAM_SELFTEST_REAL_ENGINE") == "1":
            self.setUp()
            self.test_RealEngineFineTunesAndSegments()

    # ------------------------------------------------------------------------------------------------ helpers
    def _logic(self):
        import NNSAMSegment
        from NNSAMSegmentLib.Bundles import BundleStore
        from NNSAMSegmentLib.EngineCommands import EngineCommandBuilder
        from NNSAMSegmentLib.Settings import DictSettingsStore

        logic = NNSAMSegment.NNSAMSegmentLogic(settingsStore=DictSettingsStore())  # the user's settings stay
        logic.workflow.store = BundleStore(os.path.join(self.workDirectory, "bundles"))
        engine = os.path.join(self.workDirectory, "stand_in_engine.py")
        with open(engine, "w", encoding="utf-8") as handle:
            handle.write(STAND_IN_ENGINE)
        logic.workflow.commandBuilder = EngineCommandBuilder(launcher=[engine])  # PythonSlicer runs it
        return logic

    def _annotatedVolume(self, logic):
        array = np.zeros((8, 24, 24), np.int16)
        array[:, 6:18, 6:18] = 100
        volume = slicer.util.addVolumeFromArray(array, name="SelfTest CT")
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "SelfTest annotations")
        segmentation.CreateDefaultDisplayNodes()
        ids = logic.workflow.ensureCardiacSegments(segmentation, volume)
        mask = np.zeros(array.shape, np.uint8)
        mask[2, 8:12, 8:12] = 1
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentation, ids[0], volume)
        return volume, segmentation

    # ------------------------------------------------------------------------------------------------ tests
    def test_JobsFinishAndResultsAreImported(self):
        from NNSAMSegmentLib.EngineCommands import TrainOptions
        from NNSAMSegmentLib.EngineJob import JobState

        logic = self._logic()
        volume, annotations = self._annotatedVolume(logic)
        self.delayDisplay("Fine-tuning with the stand-in engine")
        job = logic.workflow.startFineTune(volume, annotations, TrainOptions())
        self.assertTrue(job.wait(120), "the fine-tune job never finished")
        self.assertEqual(job.state, JobState.SUCCEEDED, job.errorMessage)
        self.assertEqual(job.result.classNames, ["LV"])

        self.delayDisplay("Segmenting into a new segmentation")
        job = logic.workflow.startSegment(volume, target="new")
        self.assertTrue(job.wait(120), "the segment job never finished")
        self.assertEqual(job.state, JobState.SUCCEEDED, job.errorMessage)
        self.assertEqual(job.result.segmentationNode.GetSegmentation().GetNumberOfSegments(), 1)
        self.delayDisplay("Jobs finish and results are imported")

    def test_StopReachesTheEngineBehindTheLauncher(self):
        from NNSAMSegmentLib.EngineCommands import TrainOptions
        from NNSAMSegmentLib.EngineJob import JobState

        os.environ["STAND_IN_STEPS"] = "100000"
        logic = self._logic()
        volume, annotations = self._annotatedVolume(logic)
        job = logic.workflow.startFineTune(volume, annotations, TrainOptions())
        deadline = time.monotonic() + 60
        while job.tracker.lastEvent is None:  # the engine is training
            self.assertLess(time.monotonic(), deadline, "the stand-in engine did not start")
            slicer.app.processEvents()
            time.sleep(0.05)
        started = time.monotonic()
        job.stop()
        self.assertTrue(job.wait(job.stopGraceSeconds + 30), "the job never finished after Stop")
        self.assertLess(time.monotonic() - started, job.stopGraceSeconds, "the engine was killed, not stopped")
        self.assertEqual(job.state, JobState.STOPPED)
        self.assertTrue(os.path.isfile(self.cleanedFile), "the engine's clean-up did not run")
        logic.workflow.discardResumableFineTune()
        self.delayDisplay("Stop reached the engine behind PythonSlicer")

    def test_RealEngineFineTunesAndSegments(self):
        """Opt-in: the real engine, two iterations (installs its packages without asking in testing mode)."""
        from NNSAMSegmentLib.EngineCommands import EngineCommandBuilder, TrainOptions
        from NNSAMSegmentLib.EngineJob import JobState

        logic = self._logic()
        logic.workflow.commandBuilder = EngineCommandBuilder()
        logic.installLogic.interactive = False
        self.assertTrue(logic.installLogic.ensureDependencies())
        volume, annotations = self._annotatedVolume(logic)
        job = logic.workflow.startFineTune(volume, annotations, TrainOptions(iterations=2, preset="quick"))
        self.assertTrue(job.wait(3600), "fine-tuning did not finish")
        self.assertEqual(job.state, JobState.SUCCEEDED, job.errorMessage)
        job = logic.workflow.startSegment(volume, target="new")
        self.assertTrue(job.wait(3600), "segmentation did not finish")
        self.assertEqual(job.state, JobState.SUCCEEDED, job.errorMessage)
