"""Engine jobs in a separate process, with a small fake engine written by the test.

The fake accepts exactly the command line of the engine's documented interface (argparse with the same verbs and
flags), prints --progress json lines mixed with log text, writes its bundle under a temporary name and renames
it at the end, as the real engine does. Behaviour is chosen through FAKE_MODE.
"""

import json
import os
import sys
import textwrap
import time

import numpy as np
import pytest

from nnsam_slicer_helpers import addVolume, setSegmentFromArray
from nnsam_slicer_helpers import scene  # noqa: F401 - pytest fixtures
from NNSAMSegmentLib.Bundles import BundleInfo, BundleStore
from NNSAMSegmentLib.EngineCommands import EngineCommandBuilder, TrainOptions
from NNSAMSegmentLib.EngineJob import EngineJob, JobState, createJobDirectory
from NNSAMSegmentLib.Errors import UserError
from NNSAMSegmentLib.ProcessRunner import SubprocessRunner
from NNSAMSegmentLib.Settings import DictSettingsStore, ModelMemory
from NNSAMSegmentLib.Terminology import CardiacTerminology, ensureCardiacSegments
from NNSAMSegmentLib.Workflow import NNSAMWorkflow

FAKE_ENGINE = textwrap.dedent(r'''
    import argparse, json, os, subprocess, sys, time

    def progress(stage, step=0, total=0, loss=None, eta_s=None, message=""):
        print(json.dumps(dict(stage=stage, step=step, total=total, loss=loss, eta_s=eta_s, message=message)),
              flush=True)

    def fail(message):
        print("nnsam: error: " + message, file=sys.stderr, flush=True)
        progress("error", message=message)
        sys.exit(2)

    parser = argparse.ArgumentParser(prog="nnsam")
    verbs = parser.add_subparsers(dest="verb", required=True)
    train = verbs.add_parser("train")
    train.add_argument("image"); train.add_argument("labels"); train.add_argument("-o", required=True)
    train.add_argument("--slices"); train.add_argument("--class-names")
    train.add_argument("--encoder", choices=["litemedsam", "mobilesam"], default="litemedsam")
    train.add_argument("--method", choices=["nnsam", "nnunet"], default="nnsam")
    train.add_argument("--preset", choices=["quick", "full"], default="quick")
    train.add_argument("--iterations", type=int); train.add_argument("--seed", type=int)
    train.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    train.add_argument("--progress", choices=["text", "json"], default="text"); train.add_argument("--resume",
                                                                                               action="store_true")
    weights = verbs.add_parser("weights").add_subparsers(dest="action", required=True)
    status = weights.add_parser("status")
    status.add_argument("--json", action="store_true")
    bundle = verbs.add_parser("bundle").add_subparsers(dest="action", required=True)
    export = bundle.add_parser("export")
    export.add_argument("bundle"); export.add_argument("zip")
    unpack = bundle.add_parser("import")
    unpack.add_argument("zip"); unpack.add_argument("output")
    predict = verbs.add_parser("predict")
    predict.add_argument("bundle"); predict.add_argument("image"); predict.add_argument("-o", required=True)
    predict.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    predict.add_argument("--progress", choices=["text", "json"], default="text")
    args = parser.parse_args()

    mode = os.environ.get("FAKE_MODE", "ok")
    with open(os.environ["FAKE_ARGS_LOG"], "a") as log:
        log.write(json.dumps(sys.argv[1:]) + "\n")

    if args.verb == "weights":
        print("loading encoders...", file=sys.stderr)
        print(json.dumps([{"encoder": "litemedsam", "available": True, "path": "/x/lite_medsam.pth"},
                          {"encoder": "mobilesam", "available": False, "path": None}], indent=2))
    elif args.verb == "bundle":
        import shutil, zipfile
        if args.action == "export":
            shutil.make_archive(args.zip[:-4], "zip", args.bundle)
        else:
            zipfile.ZipFile(args.zip).extractall(args.output)
    elif args.verb == "train":
        import SimpleITK as sitk
        labels = sitk.GetArrayFromImage(sitk.ReadImage(args.labels))
        slices = [int(k) for k in args.slices.split(",")]
        names = args.class_names.split(",")
        if sorted({int(k) for k in range(labels.shape[0]) if labels[k].any()}) != slices:
            fail("slices do not match the label map")
        if int(labels.max()) != len(names):
            fail("class names do not match the label values")
        if mode == "error":
            fail("only %d annotated slices; annotate at least 8" % len(slices))
        partial = args.o + ".partial"
        os.makedirs(partial)
        if mode == "slow":
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            with open(os.environ["FAKE_CHILD_PID"], "w") as handle:
                handle.write(str(child.pid))
        total = 100 if mode == "slow" else 3
        try:
            for step in range(1, total + 1):
                print("epoch %d: some log text" % step, flush=True)
                progress("train", step, total, loss=1.0 / step)
                with open(os.path.join(partial, "checkpoint_%d.pt" % step), "w") as handle:
                    handle.write("x")
                time.sleep(0.1 if mode == "slow" else 0.0)
        except KeyboardInterrupt:  # as the real engine: clean up, one error line, exit 130
            import shutil
            shutil.rmtree(partial)
            with open(os.environ["FAKE_CLEANED"], "w") as handle:
                handle.write("cleaned")
            print("nnsam: error: interrupted", file=sys.stderr, flush=True)
            sys.exit(130)
        if mode == "crash":
            print("Traceback (most recent call last):\nRuntimeError: CUDA out of memory", file=sys.stderr)
            sys.exit(1)
        with open(os.path.join(partial, "nnsam.json"), "w") as handle:
            json.dump({"format_version": 1, "method": args.method, "encoder": {"name": args.encoder},
                       "classes": [{"value": i + 1, "name": n} for i, n in enumerate(names)]}, handle)
        os.rename(partial, args.o)
        progress("done", message="bundle saved")
    else:
        import SimpleITK as sitk
        with open(os.path.join(args.bundle, "nnsam.json")) as handle:
            classes = json.load(handle)["classes"]
        image = sitk.ReadImage(args.image)
        array = sitk.GetArrayFromImage(image)
        progress("predict", 1, 1)
        result = sitk.GetImageFromArray((array > 50).astype("uint8") * classes[-1]["value"])
        result.CopyInformation(image)
        sitk.WriteImage(result, args.o)
        progress("done")
''')


@pytest.fixture
def fakeEngine(tmp_path, monkeypatch):
    script = tmp_path / "fake_engine.py"
    script.write_text(FAKE_ENGINE)
    monkeypatch.setenv("FAKE_ARGS_LOG", str(tmp_path / "args.log"))
    monkeypatch.setenv("FAKE_CHILD_PID", str(tmp_path / "child.pid"))
    monkeypatch.setenv("FAKE_CLEANED", str(tmp_path / "cleaned"))
    monkeypatch.setenv("FAKE_MODE", "ok")
    return EngineCommandBuilder(sys.executable, launcher=[str(script)])


def _receivedArguments(tmp_path):
    return [json.loads(line) for line in (tmp_path / "args.log").read_text().splitlines()]


@pytest.fixture
def workflow(scene, fakeEngine, tmp_path):
    return NNSAMWorkflow(scene, fakeEngine, SubprocessRunner, BundleStore(str(tmp_path / "store")),
                         ModelMemory(DictSettingsStore()), CardiacTerminology(),
                         jobBaseDirectory=str(tmp_path / "jobs"))


@pytest.fixture
def annotatedVolume(scene):
    array = np.zeros((6, 10, 12), np.int16)
    array[:, 3:7, 4:9] = 100
    volume = addVolume(scene, array, name="Heart CT")
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Annotations")
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    ids = ensureCardiacSegments(node.GetSegmentation(), CardiacTerminology())
    for k, segmentIndex in ((1, 0), (3, 1), (3, 4)):
        mask = np.zeros(array.shape, bool)
        mask[k, 2 + segmentIndex, 1:4] = True
        setSegmentFromArray(node, ids[segmentIndex], mask, volume)
    return volume, node


def _waitFor(condition, runner, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        runner.processEvents()
        time.sleep(0.02)


def test_fine_tune_then_segment_end_to_end(workflow, annotatedVolume, tmp_path):
    volume, annotations = annotatedVolume
    events = []
    workflow.jobStarted.connect(lambda job: job.progress.connect(events.append))

    job = workflow.startFineTune(volume, annotations, TrainOptions(iterations=2, seed=3))
    assert job.wait(30)

    assert job.state == JobState.SUCCEEDED, job.errorMessage
    bundle = job.result
    assert bundle.classNames == ["LV", "RV", "Myo"]
    assert os.path.dirname(bundle.path) == workflow.store.rootDirectory
    assert workflow.currentBundle == bundle and workflow.memory.lastBundlePath == bundle.path
    assert [e.step for e in events if e.stage == "train"] == [1, 2, 3]
    assert any("epoch 2: some log text" in line for line in job.logLines)
    assert not os.path.exists(job.jobDirectory)
    trainArgs = _receivedArguments(tmp_path)[0]
    assert trainArgs[0] == "train" and trainArgs[trainArgs.index("--slices") + 1] == "1,3"
    assert trainArgs[trainArgs.index("--class-names") + 1] == "LV,RV,Myo"
    assert trainArgs[trainArgs.index("--iterations") + 1] == "2"
    assert trainArgs[trainArgs.index("--progress") + 1] == "json"

    segmentJob = workflow.startSegment(volume, target="new")
    assert segmentJob.wait(30)
    assert segmentJob.state == JobState.SUCCEEDED, segmentJob.errorMessage
    summary = segmentJob.result
    # The fake predicts its last class (Myo) wherever the image is bright: 6 slices x 4 x 5 voxels.
    assert summary.classVoxels == {"LV": 0, "RV": 0, "Myo": 6 * 4 * 5}
    assert summary.segmentationNode.GetName() == "Heart CT nnSAM"


def test_segment_fills_only_unannotated_slices_and_can_be_undone(workflow, annotatedVolume):
    from NNSAMSegmentLib.Annotations import AnnotationReader

    volume, annotations = annotatedVolume
    assert workflow.startFineTune(volume, annotations).wait(30)
    reader = AnnotationReader(annotations.GetScene())
    ids = [s for s, _ in reader.segmentIdsAndNames(annotations)]
    before = reader.mergedLabelArray(annotations, volume, ids)

    job = workflow.startSegment(volume, target="fill", annotationNode=annotations)
    assert job.wait(30) and job.state == JobState.SUCCEEDED, job.errorMessage

    after = reader.mergedLabelArray(annotations, volume, ids)
    np.testing.assert_array_equal(after[[1, 3]], before[[1, 3]])
    assert (after[[0, 2, 4, 5]] == 5).sum() == 4 * 4 * 5  # Myo is the 5th segment
    assert workflow.undoLastResult()
    np.testing.assert_array_equal(reader.mergedLabelArray(annotations, volume, ids), before)
    assert not workflow.undoLastResult()


def test_stop_kills_the_engine_and_leaves_no_bundle(workflow, annotatedVolume, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "slow")
    volume, annotations = annotatedVolume
    events = []
    workflow.jobStarted.connect(lambda job: job.progress.connect(events.append))
    job = workflow.startFineTune(volume, annotations)
    _waitFor(lambda: len(events) >= 2 and (tmp_path / "child.pid").exists(), job.runner)
    partial = os.path.join(job.jobDirectory, "bundle.partial")
    assert os.path.isdir(partial)  # the engine is mid-way through writing

    job.stop()
    assert job.wait(10)

    assert job.state == JobState.STOPPED
    assert "nothing was saved" in job.errorMessage
    assert (tmp_path / "cleaned").read_text() == "cleaned"  # the engine got the chance to clean up
    assert job.exitCode == 130
    assert not os.path.exists(job.jobDirectory)
    assert workflow.store.bundles() == []
    assert workflow.currentBundle is None
    assert not os.listdir(tmp_path / "jobs")
    childPid = int((tmp_path / "child.pid").read_text())
    _waitFor(lambda: not _alive(childPid), job.runner, timeout=5)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (killed, not yet reaped by its dead parent's adopter) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split()[2] != "Z"
    except OSError:
        return False


def test_engine_error_is_shown_in_plain_words(workflow, annotatedVolume, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "error")
    job = workflow.startFineTune(*annotatedVolume)
    assert job.wait(30)
    assert job.state == JobState.FAILED
    assert job.exitCode == 2
    assert job.errorMessage == "only 2 annotated slices; annotate at least 8"
    assert workflow.store.bundles() == [] and not os.path.exists(job.jobDirectory)


def test_crash_reports_the_last_message(workflow, annotatedVolume, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "crash")
    job = workflow.startFineTune(*annotatedVolume)
    assert job.wait(30)
    assert job.state == JobState.FAILED and job.exitCode == 1
    assert job.errorMessage.startswith("The engine stopped with exit code 1.")
    assert "CUDA out of memory" in job.errorMessage
    assert workflow.store.bundles() == []


def test_one_job_at_a_time_and_no_folder_left_by_refused_jobs(workflow, annotatedVolume, monkeypatch, tmp_path):
    monkeypatch.setenv("FAKE_MODE", "slow")
    volume, annotations = annotatedVolume
    job = workflow.startFineTune(volume, annotations)
    try:
        with pytest.raises(UserError, match="Another nnSAM job is running"):
            workflow.startFineTune(volume, annotations)
    finally:
        job.stop()
        job.wait(10)
    with pytest.raises(UserError, match="No model yet"):
        workflow.startSegment(volume, target="new")
    with pytest.raises(UserError, match="number of iterations"):
        workflow.startFineTune(volume, annotations, TrainOptions(iterations=0))
    assert not os.listdir(tmp_path / "jobs")


def test_program_that_cannot_start_fails_cleanly(tmp_path):
    command = EngineCommandBuilder(str(tmp_path / "no-such-python"), launcher=["-m", "x"]).weightsStatus()
    job = EngineJob(SubprocessRunner(), command, createJobDirectory(str(tmp_path)))
    job.start()
    assert job.wait(10)
    assert job.state == JobState.FAILED
    assert job.errorMessage.startswith("Could not start")
    assert not os.path.exists(job.jobDirectory)


def test_last_bundle_is_remembered_across_sessions(scene, fakeEngine, annotatedVolume, tmp_path):
    settings = DictSettingsStore()
    first = NNSAMWorkflow(scene, fakeEngine, SubprocessRunner, BundleStore(str(tmp_path / "store")),
                          ModelMemory(settings), jobBaseDirectory=str(tmp_path / "jobs"))
    assert first.startFineTune(*annotatedVolume).wait(30)
    # A new session (new workflow, same settings): one click on Segment works without loading anything.
    second = NNSAMWorkflow(scene, fakeEngine, SubprocessRunner, BundleStore(str(tmp_path / "store")),
                           ModelMemory(settings), jobBaseDirectory=str(tmp_path / "jobs"))
    restored = second.restoreLastBundle()
    assert restored == BundleInfo.read(first.currentBundle.path)
    job = second.startSegment(annotatedVolume[0], target="new")
    assert job.wait(30) and job.state == JobState.SUCCEEDED, job.errorMessage


def test_weights_status_answer_is_read_from_stdout_and_runs_beside_a_job(workflow, annotatedVolume,
                                                                         monkeypatch):
    from NNSAMSegmentLib.Weights import parseWeightsStatus

    monkeypatch.setenv("FAKE_MODE", "slow")
    training = workflow.startFineTune(*annotatedVolume)
    try:
        job = workflow.startWeightsStatus()  # does not wait for, nor block, the training
        assert job.wait(30) and job.state == JobState.SUCCEEDED, job.errorMessage
        assert workflow.currentJob is training and training.isRunning
    finally:
        training.stop()
        training.wait(10)
    assert job.kind == "weights-status"
    assert parseWeightsStatus(job.stdoutText) == {"litemedsam": True, "mobilesam": False}
    assert any("loading encoders" in line for line in job.logLines)  # stderr goes to the log only


def test_closing_the_volume_during_a_job_imports_nothing(workflow, annotatedVolume, scene):
    volume, annotations = annotatedVolume
    assert workflow.startFineTune(volume, annotations).wait(30)
    before = scene.GetNumberOfNodes()
    job = workflow.startSegment(volume, target="new")
    scene.RemoveNode(volume)
    assert job.wait(30)
    assert job.state == JobState.FAILED
    assert "was closed while the model ran" in job.errorMessage
    assert scene.GetNumberOfNodes() == before - 1  # only the volume went; no result node was added


def test_bundles_save_export_import_and_load(workflow, annotatedVolume, tmp_path):
    assert workflow.startFineTune(*annotatedVolume).wait(30)
    trained = workflow.currentBundle

    saved = workflow.saveBundle(str(tmp_path / "my models"))
    assert BundleInfo.read(saved).classNames == trained.classNames and os.path.isdir(trained.path)

    zipPath = tmp_path / "shared" / "heart.zip"
    zipPath.parent.mkdir()
    job = workflow.startExportBundleZip(str(zipPath))
    assert job.wait(30) and job.state == JobState.SUCCEEDED, job.errorMessage
    assert job.kind == "bundle-export" and zipPath.is_file()
    assert os.listdir(zipPath.parent) == ["heart.zip"]  # no ".part" left next to it

    job = workflow.startImportBundleZip(str(zipPath))
    assert job.wait(30) and job.state == JobState.SUCCEEDED, job.errorMessage
    imported = workflow.currentBundle
    assert imported.name == "heart" and os.path.dirname(imported.path) == workflow.store.rootDirectory
    assert imported.classNames == trained.classNames

    assert workflow.loadBundle(saved).path == saved and workflow.memory.lastBundlePath == saved
    with pytest.raises(UserError, match="not a model bundle"):
        workflow.loadBundle(str(tmp_path))
    assert workflow.currentBundle.path == saved  # a failed load changes nothing


def test_a_runner_that_raises_on_start_leaves_no_running_job(tmp_path):
    class BrokenRunner(SubprocessRunner):
        def start(self, *args, **kwargs):
            raise RuntimeError("QProcess: no such program")

    job = EngineJob(BrokenRunner(), EngineCommandBuilder("python").weightsStatus(), createJobDirectory(str(tmp_path)))
    finished = []
    job.finished.connect(finished.append)
    job.start()
    assert finished == [job] and job.state == JobState.FAILED and not job.isRunning
    assert "no such program" in job.errorMessage
    assert not os.path.exists(job.jobDirectory)
