"""The expected time of a fine-tune in the panel: the engine command, the geometry the engine is given, the line
shown from the engine's JSON answer, and the estimator that runs one estimate at a time and ignores stale ones.

The estimator runs on the real workflow with a fake process runner: each test says when the "engine" answers."""

import json
import os

import pytest

from nnsam_slicer_helpers import scene  # noqa: F401 - pytest fixture
from NNSAMSegmentLib.Bundles import BundleStore
from NNSAMSegmentLib.EngineCommands import EngineCommandBuilder, TrainOptions
from NNSAMSegmentLib.Estimates import (ASSUMED_PAINTED, GEOMETRY_FILE, FineTuneEstimator, estimateRequest,
                                       estimateText, estimateToolTip, parseEstimate, writeGeometryHeader)
from NNSAMSegmentLib.Settings import DictSettingsStore, ModelMemory
from NNSAMSegmentLib.Signal import Signal
from NNSAMSegmentLib.Workflow import NNSAMWorkflow

ANSWER = {"device": "cpu", "method": "nnsam", "slices": 160, "painted": 5, "working_size": [128, 128],
          "iterations": 1000, "training_s": 712.0, "segmentation_s": 131.0, "total_s": 843.0,
          "phases_s": {"bank_fill_s": 5.0, "training_network_s": 500.0, "training_encoder_s": 207.0,
                       "segmentation_network_s": 40.0, "segmentation_encoder_s": 91.0}}


def test_estimate_command():
    builder = EngineCommandBuilder("/opt/Slicer/bin/PythonSlicer")
    command = builder.estimate("/j/geometry.mhd", 5, TrainOptions(device="cpu", recomputeShare=0.25))
    assert command.program == "/opt/Slicer/bin/PythonSlicer"
    assert list(command.args) == ["-m", "nnsam_core.cli", "estimate", "/j/geometry.mhd", "--slices", "5",
                                  "--method", "nnsam", "--encoder", "litemedsam", "--device", "cpu",
                                  "--preset", "quick", "--recompute-share", "0.25", "--json"]
    nnunet = builder.estimate("/g.mhd", 3, TrainOptions(method="nnunet", iterations=50))
    assert list(nnunet.args[-5:]) == ["--preset", "quick", "--iterations", "50", "--json"]
    assert "--recompute-share" not in nnunet.args


def test_estimate_command_parses_with_the_real_engine_command_line():
    cli = pytest.importorskip("nnsam_core.cli")
    builder = EngineCommandBuilder("python")
    command = builder.estimate("g.mhd", 7, TrainOptions(encoder="mobilesam", preset="full", device="cuda",
                                                        recomputeShare=0.0))
    args = cli.build_parser().parse_args(list(command.args[2:]))
    assert (args.verb, args.image, args.slices, args.encoder, args.method) == ("estimate", "g.mhd", "7",
                                                                              "mobilesam", "nnsam")
    assert (args.preset, args.device, args.recompute_share, args.json) == ("full", "cuda", 0.0, True)


def test_request_for_a_saved_model_uses_its_method_and_short_schedule():
    options = TrainOptions(encoder="litemedsam", recomputeShare=0.1, startFrom="/models/heart")
    request = estimateRequest((512, 512, 80), (0.7, 0.7, 2.5), [10, 20, 20], options, "nnunet", "")
    assert request.options.method == "nnunet" and request.options.startFrom is None
    assert request.options.iterations == 250 and request.options.recomputeShare is None
    assert (request.painted, request.paintedAssumed) == (2, False)
    fresh = estimateRequest((512, 512, 80), (0.7, 0.7, 2.5), None, TrainOptions())
    assert (fresh.painted, fresh.paintedAssumed) == (ASSUMED_PAINTED, True)


def test_the_engine_reads_the_geometry_header(tmp_path):
    request = estimateRequest((300, 200, 40), (0.5, 0.6, 3.0), [1], TrainOptions())
    path = tmp_path / GEOMETRY_FILE
    writeGeometryHeader(str(path), request)
    estimate = pytest.importorskip("nnsam_core.estimate")
    geometry = estimate.read_geometry(path)
    assert geometry.size == (300, 200, 40) and geometry.spacing == pytest.approx((0.5, 0.6, 3.0))
    assert sorted(os.listdir(tmp_path)) == [GEOMETRY_FILE]  # no voxels written


def test_label_text_from_the_engine_answer():
    stdout = "\n".join(["loading...", '{"stage": "prepare", "message": "x"}', json.dumps(ANSWER), ""])
    data = parseEstimate(stdout)
    assert data["total_s"] == 843.0
    assert estimateText(data) == ("Expected: about 14 min on this computer's CPU (training 12 min, segmenting "
                                  "2 min).")
    assert estimateText({**data, "device": "cuda", "total_s": 75, "training_s": 50, "segmentation_s": 25},
                        paintedAssumed=True) == ("Expected: about 1 min on this computer's GPU (training 50 s, "
                                                 "segmenting 25 s; for 5 painted slices).")
    assert "busy" not in estimateToolTip(data) and "busy" in estimateToolTip({**data, "measured_while_busy": True})
    assert parseEstimate("nothing\n{broken\n") is None
    assert parseEstimate('{"total_s": true}') is None


class FakeRunner:
    """A process runner whose process answers when the test says so."""

    def __init__(self, log):
        self.stdoutReceived, self.stderrReceived, self.finished = Signal(), Signal(), Signal()
        self.running = False
        self.stopped = False
        log.append(self)

    def start(self, program, args, env=None, workingDirectory=None):
        self.args, self.workingDirectory, self.running = list(args), workingDirectory, True
        if self.args[2] == "estimate":
            with open(os.path.join(workingDirectory, GEOMETRY_FILE)) as handle:
                self.geometry = handle.read()

    def answer(self, data=None, error=""):
        if data is not None:
            self.stdoutReceived.emit(b"some log text\n" + json.dumps(data).encode() + b"\n")
        if error:
            self.stderrReceived.emit(f"nnsam: error: {error}\n".encode())
        self.running = False
        self.finished.emit(2 if error else 0, "")

    def stop(self, graceSeconds=0):
        self.stopped = True
        self.running = False
        self.finished.emit(130, "")

    def isRunning(self):
        return self.running

    def waitForFinished(self, timeoutSeconds=None):
        return not self.running


@pytest.fixture
def estimator(scene, tmp_path):
    runners = []
    workflow = NNSAMWorkflow(scene, EngineCommandBuilder("python"), lambda: FakeRunner(runners),
                             BundleStore(str(tmp_path / "store")), ModelMemory(DictSettingsStore()),
                             jobBaseDirectory=str(tmp_path / "jobs"))
    estimator = FineTuneEstimator(workflow)
    shown = []
    estimator.changed.connect(lambda text, toolTip: shown.append(text))
    return estimator, runners, shown


def _request(painted=5, device="cpu"):
    return estimateRequest((128, 128, 160), (1.0, 1.0, 2.5), list(range(painted)), TrainOptions(device=device))


def test_estimate_shown_and_not_asked_twice(estimator, tmp_path):
    estimator, runners, shown = estimator
    estimator.request(_request())
    assert len(runners) == 1 and runners[0].args[2:5] == ["estimate", os.path.join(runners[0].workingDirectory,
                                                                                   GEOMETRY_FILE), "--slices"]
    assert "DimSize = 128 128 160" in runners[0].geometry
    assert shown == [FineTuneEstimator.RUNNING_TEXT]
    runners[0].answer(ANSWER)
    assert shown[-1].startswith("Expected: about 14 min") and "training, network: 8 min" in estimator.toolTip
    assert os.listdir(tmp_path / "jobs") == []  # the job folder (with the header) is gone
    estimator.request(_request())
    assert len(runners) == 1


def test_one_estimate_at_a_time_and_a_stale_answer_is_ignored(estimator):
    estimator, runners, shown = estimator
    estimator.request(_request(painted=3))
    estimator.request(_request(painted=4))
    estimator.request(_request(painted=6))
    assert len(runners) == 1                                # the others wait for the running one
    runners[0].answer({**ANSWER, "total_s": 60.0})          # for 3 painted slices: stale
    assert len(runners) == 2 and "--slices" in runners[1].args
    assert runners[1].args[runners[1].args.index("--slices") + 1] == "6"  # only the latest is asked
    assert not any("about 1 min" in text for text in shown)
    runners[1].answer(ANSWER)
    assert shown[-1].startswith("Expected: about 14 min")


def test_no_estimate_beside_another_job(estimator):
    estimator, runners, shown = estimator
    estimator.request(_request())
    assert runners[0].running
    download = estimator.workflow.startWeightsDownload("mobilesam")  # any job of the panel's, e.g. a fine-tune
    assert runners[0].stopped and runners[1].args[2] == "weights"
    assert len(runners) == 2 and estimator.text == FineTuneEstimator.WAITING_TEXT  # not started again beside it
    estimator.request(_request(painted=7))
    assert len(runners) == 2 and estimator.text == FineTuneEstimator.WAITING_TEXT
    runners[1].answer()                                       # the job has finished; the panel asks again
    assert not download.isRunning
    estimator.request(_request(painted=7))
    assert len(runners) == 3 and runners[2].args[2] == "estimate"


def test_engine_error_is_shown_and_no_volume_clears(estimator):
    estimator, runners, shown = estimator
    estimator.request(_request(device="cuda"))
    runners[0].answer(error="--device cuda was asked for but no CUDA GPU is available; use --device auto or cpu")
    assert estimator.text.startswith("No time estimate: --device cuda was asked for")
    estimator.request(None)
    assert estimator.text == FineTuneEstimator.NO_INPUT_TEXT and len(runners) == 1


def test_constants_copied_from_the_engine_agree():
    adapt = pytest.importorskip("nnsam_core.adapt")
    cli = pytest.importorskip("nnsam_core.cli")
    from NNSAMSegmentLib import Estimates

    assert Estimates.ADAPT_ITERATIONS == adapt.ADAPT_ITERATIONS
    assert Estimates.ASSUMED_PAINTED == cli.DEFAULT_PAINTED
