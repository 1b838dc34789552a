"""Engine jobs in a separate process, with a small fake engine written by the test.

The fake accepts exactly the command line of the engine's documented interface (argparse with the same verbs and
flags), prints --progress json lines mixed with log text, writes its bundle under a temporary name and renames
it at the end, as the real engine does. Like the engine, its training writes checkpoint_latest.pth (the step
number) into the hidden work folder beside the bundle every FAKE_CHECKPOINT_EVERY steps, keeps that folder when it is
interrupted or killed, continues from it with --resume, and deletes it once the bundle is written. Behaviour is
chosen through FAKE_MODE. It implements the engine's stop hook (it ends as on Ctrl-C once the file named by
NNSAM_STOP_FILE exists) unless FAKE_IGNORES_STOP=1.
"""

import json
import os
import shutil
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
    import argparse, json, os, signal, subprocess, sys, time

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
    train.add_argument("--iterations", type=int)
    train.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    train.add_argument("--progress", choices=["text", "json"], default="text"); train.add_argument("--resume",
                                                                                               action="store_true")
    train.add_argument("--start-from"); train.add_argument("--recompute-share", type=float)
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
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as the real engine (nnsam_core.cli.interruptible)

    def watchStopFile(path):  # the engine's stop hook: end as on Ctrl-C once the stop file exists
        import _thread, threading
        def watch():
            while not os.path.exists(path):
                time.sleep(0.05)
            _thread.interrupt_main()
        threading.Thread(target=watch, daemon=True).start()

    if os.environ.get("NNSAM_STOP_FILE") and os.environ.get("FAKE_IGNORES_STOP") != "1":
        watchStopFile(os.environ["NNSAM_STOP_FILE"])

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
        import shutil
        work = os.path.join(os.path.dirname(args.o), "." + os.path.basename(args.o) + ".nnsam-work")
        checkpoint = os.path.join(work, "nnUNet_results", "fold_0", "checkpoint_latest.pth")
        first = 1
        if args.resume and os.path.isfile(checkpoint):
            with open(checkpoint) as handle:
                first = int(handle.read()) + 1
            progress("prepare", message="resuming from checkpoint_latest.pth")
        elif os.path.exists(work):
            shutil.rmtree(work)
        with open(os.environ["FAKE_FIRST_STEP"], "a") as handle:
            handle.write("%d\n" % first)
        os.makedirs(os.path.dirname(checkpoint), exist_ok=True)
        partial = args.o + ".partial"
        os.makedirs(partial, exist_ok=True)
        if mode == "slow":
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            with open(os.environ["FAKE_CHILD_PID"], "w") as handle:
                handle.write(str(child.pid))
        total = int(os.environ.get("FAKE_STEPS") or (100 if mode in ("slow", "killed") else 3))
        try:
            for step in range(first, total + 1):
                print("epoch %d: some log text" % step, flush=True)
                progress("train", step, total, loss=1.0 / step)
                with open(os.path.join(partial, "checkpoint_%d.pt" % step), "w") as handle:
                    handle.write("x")
                if step % int(os.environ.get("FAKE_CHECKPOINT_EVERY", "25")) == 0:  # the engine's own cadence
                    with open(checkpoint + ".partial", "w") as handle:
                        handle.write(str(step))
                    os.replace(checkpoint + ".partial", checkpoint)
                    if mode == "killed":  # kill -9 (or the machine's out-of-memory killer) after a checkpoint
                        import signal
                        os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(0.1 if mode == "slow" else 0.0)
        except KeyboardInterrupt:  # as the real engine: clean up, one error line, exit 130, checkpoints stay
            shutil.rmtree(partial)
            with open(os.environ["FAKE_CLEANED"], "w") as handle:
                handle.write("cleaned")
            print("nnsam: error: interrupted; any earlier bundle or output is intact (nnsam train --resume "
                  "continues a training)", file=sys.stderr, flush=True)
            sys.exit(130)
        if mode == "crash":
            print("Traceback (most recent call last):\nRuntimeError: CUDA out of memory", file=sys.stderr)
            sys.exit(1)
        with open(os.path.join(partial, "nnsam.json"), "w") as handle:
            json.dump({"format_version": 1, "method": args.method, "encoder": {"name": args.encoder},
                       "classes": [{"value": i + 1, "name": n} for i, n in enumerate(names)]}, handle)
        os.rename(partial, args.o)
        shutil.rmtree(work)
        progress("done", message="bundle saved")
    else:
        import SimpleITK as sitk
        with open(os.path.join(args.bundle, "nnsam.json")) as handle:
            classes = json.load(handle)["classes"]
        image = sitk.ReadImage(args.image)
        array = sitk.GetArrayFromImage(image)
        for step in range(1, 101 if mode == "slow" else 2):
            progress("predict", step, 100 if mode == "slow" else 1)
            time.sleep(0.1 if mode == "slow" else 0.0)
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
    monkeypatch.setenv("FAKE_FIRST_STEP", str(tmp_path / "first_step.log"))
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

    job = workflow.startFineTune(volume, annotations, TrainOptions(iterations=2))
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
    assert "--checkpoint-every" not in trainArgs  # the engine checkpoints by the clock
    assert "--resume" not in trainArgs
    assert workflow.resumableFineTune is None

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


def _checkpointStep(jobDirectory) -> int:
    """The step of the fake engine's last checkpoint in a job folder, 0 if none."""
    path = os.path.join(jobDirectory, ".bundle.nnsam-work", "nnUNet_results", "fold_0", "checkpoint_latest.pth")
    try:
        with open(path) as handle:
            return int(handle.read())
    except (OSError, ValueError):
        return 0


def _stoppedAfterCheckpoint(workflow, annotatedVolume, monkeypatch, tmp_path):
    """A fine-tune of 100 steps with a checkpoint every 2, stopped once a checkpoint of step 4 or later exists."""
    monkeypatch.setenv("FAKE_MODE", "slow")
    monkeypatch.setenv("FAKE_CHECKPOINT_EVERY", "2")
    monkeypatch.setenv("FAKE_STEPS", "100")  # 10 s of training: the stop lands mid-way even on a loaded machine
    job = workflow.startFineTune(*annotatedVolume, TrainOptions(recomputeShare=0.25))
    _waitFor(lambda: _checkpointStep(job.jobDirectory) >= 4 and (tmp_path / "child.pid").exists(), job.runner)
    assert os.path.isdir(os.path.join(job.jobDirectory, "bundle.partial"))  # the engine is mid-way through
    job.stop()
    assert job.wait(10)
    return job


def test_a_stop_that_arrives_after_the_engine_finished_keeps_the_model(workflow, annotatedVolume):
    """Stop pressed as training completes: the engine exited 0 with a bundle; the model is not thrown away."""
    job = workflow.startFineTune(*annotatedVolume, TrainOptions(iterations=2))
    deadline = time.monotonic() + 30
    while job.runner.isRunning():  # the process ends; its completion is not delivered yet
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
    job.stop()
    assert job.wait(10)
    assert job.state == JobState.SUCCEEDED, job.errorMessage
    assert job.exitCode == 0 and workflow.currentBundle == job.result
    assert os.path.dirname(job.result.path) == workflow.store.rootDirectory


def test_stop_kills_the_engine_keeps_a_resumable_folder_and_leaves_no_bundle(workflow, annotatedVolume, tmp_path,
                                                                              monkeypatch):
    job = _stoppedAfterCheckpoint(workflow, annotatedVolume, monkeypatch, tmp_path)

    assert job.state == JobState.STOPPED
    assert job.errorMessage.startswith("Stopped; no model was saved.")
    assert "Resume fine-tune continues from the last checkpoint" in job.errorMessage
    assert (tmp_path / "cleaned").read_text() == "cleaned"  # the engine got the chance to clean up
    assert job.exitCode == 130
    assert workflow.store.bundles() == [] and not os.path.exists(workflow.store.rootDirectory)
    assert workflow.currentBundle is None and workflow.memory.lastBundlePath is None
    # The folder stays, with what a resume needs, and without anything that looks like a finished bundle.
    assert job.folderKept and os.listdir(tmp_path / "jobs") == [os.path.basename(job.jobDirectory)]
    assert {"image.nrrd", "labels.nrrd"} <= set(os.listdir(job.jobDirectory))
    assert not os.path.exists(os.path.join(job.jobDirectory, "bundle"))
    assert not os.path.exists(os.path.join(job.jobDirectory, "bundle.partial"))
    assert _checkpointStep(job.jobDirectory) >= 4
    record = workflow.resumableFineTune
    assert record is not None and record.jobDirectory == job.jobDirectory and record.hasCheckpoint()
    assert workflow.memory.resumableFineTunePath == job.jobDirectory
    trainArgs = _receivedArguments(tmp_path)[0]
    childPid = int((tmp_path / "child.pid").read_text())
    _waitFor(lambda: not _alive(childPid), job.runner, timeout=5)


def test_resume_runs_the_same_command_with_resume_in_the_same_folder(workflow, annotatedVolume, tmp_path,
                                                                     monkeypatch):
    stopped = _stoppedAfterCheckpoint(workflow, annotatedVolume, monkeypatch, tmp_path)
    checkpointStep = _checkpointStep(stopped.jobDirectory)
    changes = []
    workflow.resumableChanged.connect(changes.append)
    monkeypatch.setenv("FAKE_MODE", "ok")

    job = workflow.startResumeFineTune()
    assert job.jobDirectory == stopped.jobDirectory and job.kind == "fine-tune"
    assert workflow.currentJob is job and workflow.isBusy
    assert job.wait(30)

    assert job.state == JobState.SUCCEEDED, job.errorMessage
    first, resumed = _receivedArguments(tmp_path)
    # Same inputs, same bundle path, same options (the fresh-embedding share too); only --resume is new.
    assert resumed.count("--resume") == 1 and [a for a in resumed if a != "--resume"] == first
    assert resumed[resumed.index("--recompute-share") + 1] == "0.25"
    assert resumed[resumed.index("-o") + 1] == os.path.join(stopped.jobDirectory, "bundle")
    # The engine really continued after the checkpoint instead of starting over.
    assert (tmp_path / "first_step.log").read_text().split() == ["1", str(checkpointStep + 1)]
    bundle = job.result
    assert workflow.store.bundles() == [bundle] and workflow.currentBundle == bundle
    assert bundle.classNames == ["LV", "RV", "Myo"] and bundle.name.startswith("Heart_CT-")
    assert not os.path.exists(stopped.jobDirectory) and not os.listdir(tmp_path / "jobs")
    assert workflow.resumableFineTune is None and workflow.memory.resumableFineTunePath is None
    assert changes == [None]
    with pytest.raises(UserError, match="no stopped fine-tune to resume"):
        workflow.startResumeFineTune()


def test_a_stopped_resume_stays_resumable(workflow, annotatedVolume, tmp_path, monkeypatch):
    stopped = _stoppedAfterCheckpoint(workflow, annotatedVolume, monkeypatch, tmp_path)
    record = workflow.resumableFineTune
    job = workflow.startResumeFineTune()
    with pytest.raises(UserError, match="running again"):
        workflow.discardResumableFineTune()  # its folder is in use
    with pytest.raises(UserError, match="Another nnSAM job is running"):
        workflow.startResumeFineTune()
    _waitFor(lambda: _checkpointStep(stopped.jobDirectory) >= 8, job.runner)
    job.stop()
    assert job.wait(10)
    assert job.state == JobState.STOPPED and job.folderKept
    assert workflow.resumableFineTune == record and os.path.isdir(record.jobDirectory)
    assert workflow.store.bundles() == []


def test_killed_engine_is_resumable_in_a_later_session(scene, fakeEngine, annotatedVolume, tmp_path, monkeypatch):
    settings = DictSettingsStore()

    def session():
        return NNSAMWorkflow(scene, fakeEngine, SubprocessRunner, BundleStore(str(tmp_path / "store")),
                             ModelMemory(settings), jobBaseDirectory=str(tmp_path / "jobs"))

    first = session()
    monkeypatch.setenv("FAKE_MODE", "killed")
    monkeypatch.setenv("FAKE_CHECKPOINT_EVERY", "2")  # kill -9 right after the checkpoint of step 2
    job = first.startFineTune(*annotatedVolume, TrainOptions(encoder="mobilesam", iterations=6))
    assert job.wait(30)
    assert job.state == JobState.FAILED and job.exitCode is None
    assert job.errorMessage.startswith("The engine crashed or was killed.")
    assert job.errorMessage.endswith("Resume fine-tune continues from the last checkpoint.")
    assert first.store.bundles() == [] and os.path.isdir(job.jobDirectory)

    second = session()
    assert second.resumableFineTune is None
    record = second.restoreResumableFineTune()
    assert record == first.resumableFineTune and record.jobDirectory == job.jobDirectory
    assert (record.options.encoder, record.options.iterations) == ("mobilesam", 6)
    monkeypatch.setenv("FAKE_MODE", "ok")
    monkeypatch.setenv("FAKE_STEPS", "5")
    resumed = second.startResumeFineTune()
    assert resumed.wait(30) and resumed.state == JobState.SUCCEEDED, resumed.errorMessage
    assert (tmp_path / "first_step.log").read_text().split() == ["1", "3"]
    original, again = _receivedArguments(tmp_path)
    assert "--resume" in again and [a for a in again if a != "--resume"] == original
    assert second.currentBundle.encoder == "mobilesam"
    assert not os.path.exists(job.jobDirectory) and settings.value("NNSAMSegment/ResumableFineTune") == ""
    assert session().restoreResumableFineTune() is None


def test_discard_deletes_the_kept_folder(workflow, annotatedVolume, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "killed")
    monkeypatch.setenv("FAKE_CHECKPOINT_EVERY", "2")
    job = workflow.startFineTune(*annotatedVolume, TrainOptions())
    assert job.wait(30) and job.folderKept
    changes = []
    workflow.resumableChanged.connect(changes.append)

    assert workflow.discardResumableFineTune()

    assert not os.path.exists(job.jobDirectory) and not os.listdir(tmp_path / "jobs")
    assert workflow.resumableFineTune is None and workflow.memory.resumableFineTunePath is None
    assert changes == [None]
    assert not workflow.discardResumableFineTune()
    with pytest.raises(UserError, match="no stopped fine-tune"):
        workflow.startResumeFineTune()


def test_a_new_fine_tune_deletes_the_kept_folder(workflow, annotatedVolume, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "killed")
    monkeypatch.setenv("FAKE_CHECKPOINT_EVERY", "2")
    kept = workflow.startFineTune(*annotatedVolume, TrainOptions())
    assert kept.wait(30) and kept.folderKept
    monkeypatch.setenv("FAKE_MODE", "error")
    with pytest.raises(UserError, match="number of iterations"):  # refused before anything ran: nothing deleted
        workflow.startFineTune(*annotatedVolume, TrainOptions(iterations=0))
    assert workflow.resumableFineTune.jobDirectory == kept.jobDirectory and os.path.isdir(kept.jobDirectory)

    fresh = workflow.startFineTune(*annotatedVolume)

    assert not os.path.exists(kept.jobDirectory)  # as soon as the new one runs
    assert workflow.resumableFineTune is None and workflow.memory.resumableFineTunePath is None
    assert fresh.wait(30)
    # It failed before training began: nothing to resume, nothing kept.
    assert fresh.state == JobState.FAILED and not fresh.folderKept and not os.listdir(tmp_path / "jobs")
    assert workflow.resumableFineTune is None
    assert "--resume" not in _receivedArguments(tmp_path)[1]


def test_resume_whose_files_are_gone_is_forgotten(workflow, annotatedVolume, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "killed")
    monkeypatch.setenv("FAKE_CHECKPOINT_EVERY", "2")
    job = workflow.startFineTune(*annotatedVolume, TrainOptions())
    assert job.wait(30) and job.folderKept
    os.remove(os.path.join(job.jobDirectory, "labels.nrrd"))
    with pytest.raises(UserError, match="are gone; start a new fine-tune"):
        workflow.startResumeFineTune()
    assert workflow.resumableFineTune is None and not os.path.exists(job.jobDirectory)
    assert len(_receivedArguments(tmp_path)) == 1  # the engine was not started again


def test_restore_forgets_a_broken_or_missing_folder(scene, fakeEngine, annotatedVolume, tmp_path, monkeypatch):
    settings = DictSettingsStore()

    def session():
        return NNSAMWorkflow(scene, fakeEngine, SubprocessRunner, BundleStore(str(tmp_path / "store")),
                             ModelMemory(settings), jobBaseDirectory=str(tmp_path / "jobs"))

    monkeypatch.setenv("FAKE_MODE", "killed")
    monkeypatch.setenv("FAKE_CHECKPOINT_EVERY", "2")
    job = session().startFineTune(*annotatedVolume, TrainOptions())
    assert job.wait(30) and job.folderKept
    description = os.path.join(job.jobDirectory, "nnsam-finetune.json")
    with open(description) as handle:
        text = handle.read()
    with open(description, "w") as handle:
        handle.write(text.replace('"preset": "quick"', '"preset": "turbo"'))
    assert session().restoreResumableFineTune() is None
    assert settings.value("NNSAMSegment/ResumableFineTune") == ""  # forgotten, not asked again
    with open(description, "w") as handle:
        handle.write(text)
    settings.setValue("NNSAMSegment/ResumableFineTune", job.jobDirectory)
    assert session().restoreResumableFineTune().jobDirectory == job.jobDirectory
    shutil.rmtree(job.jobDirectory)
    assert session().restoreResumableFineTune() is None


def test_checkpoints_are_left_to_the_engine_and_a_start_model_is_sent(workflow, annotatedVolume, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "error")  # fails at once: only the command lines matter here
    full = TrainOptions(preset="full")
    assert workflow.startFineTune(*annotatedVolume, full).wait(30)
    parent = tmp_path / "parent_model"
    parent.mkdir()
    classes = [{"value": i, "name": n} for i, n in enumerate(("LV", "RV", "Myo"), start=1)]
    (parent / "nnsam.json").write_text(json.dumps({"format_version": 1, "method": "nnsam", "classes": classes,
                                                   "encoder": {"name": "litemedsam"}}))
    assert workflow.startFineTune(*annotatedVolume, TrainOptions(startFrom=str(parent))).wait(30)
    fullArgs, adaptArgs = _receivedArguments(tmp_path)
    assert "--checkpoint-every" not in fullArgs and "--start-from" not in fullArgs
    assert adaptArgs[adaptArgs.index("--start-from") + 1] == str(parent)
    assert "--encoder" not in adaptArgs and "--method" not in adaptArgs  # the saved model brings its own
    assert full.startFrom is None and not full.resume  # the caller's options are left alone


def test_stopped_predict_job_still_deletes_its_folder(workflow, annotatedVolume, tmp_path, monkeypatch):
    volume, annotations = annotatedVolume
    assert workflow.startFineTune(volume, annotations).wait(30)
    monkeypatch.setenv("FAKE_MODE", "slow")
    events = []
    workflow.jobStarted.connect(lambda job: job.progress.connect(events.append))
    job = workflow.startSegment(volume, target="new")
    _waitFor(lambda: len(events) >= 2, job.runner)
    assert os.path.isfile(os.path.join(job.jobDirectory, "image.nrrd"))
    job.stop()
    assert job.wait(10)
    assert job.state == JobState.STOPPED and job.errorMessage == "Stopped; nothing was saved."
    assert not job.folderKept and not os.path.exists(job.jobDirectory) and not os.listdir(tmp_path / "jobs")
    assert workflow.resumableFineTune is None


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
    assert not job.folderKept and workflow.resumableFineTune is None  # training never began: nothing to resume


def test_crash_reports_the_last_message(workflow, annotatedVolume, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "crash")
    job = workflow.startFineTune(*annotatedVolume)
    assert job.wait(30)
    assert job.state == JobState.FAILED and job.exitCode == 1
    assert job.errorMessage.startswith("The engine stopped with exit code 1.")
    assert "CUDA out of memory" in job.errorMessage
    assert workflow.store.bundles() == []
    # It failed after training began: kept for Resume (the fake wrote no checkpoint, so it would start over).
    assert job.folderKept and workflow.resumableFineTune.jobDirectory == job.jobDirectory
    assert not workflow.resumableFineTune.hasCheckpoint() and "no checkpoint yet" in job.errorMessage


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
    # Only the stopped fine-tune may remain (kept for Resume if its training had begun); refused jobs left none.
    kept = [os.path.basename(job.jobDirectory)] if job.folderKept else []
    assert os.listdir(tmp_path / "jobs") == kept


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


def test_a_new_fine_tune_asks_before_discarding_a_resumable_one(tmp_path):
    """Module and Segment Editor effect share this rule: starting a fine-tune deletes the resumable one."""
    from NNSAMSegmentLib.FineTuneResume import FineTuneRecord, discardQuestion, mayReplaceResumable

    record = FineTuneRecord(jobDirectory=str(tmp_path), bundleName="m", title="t", slices=(1,), classNames=("LV",),
                            options=TrainOptions())
    asked = []

    def answer(reply):
        def confirm(question, title):
            asked.append(question)
            return reply
        return confirm

    assert mayReplaceResumable(None, answer(False), interactive=True) and not asked   # nothing to lose: no question
    assert not mayReplaceResumable(record, answer(False), interactive=True)           # the user keeps it
    assert mayReplaceResumable(record, answer(True), interactive=True)
    question, _title = discardQuestion()
    assert asked == [question, question] and "discard" in question
    assert mayReplaceResumable(record, answer(False), interactive=False) and len(asked) == 2  # testing/batch mode
