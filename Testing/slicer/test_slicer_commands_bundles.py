"""Engine command lines, bundles and the bundle store, remembered settings, devices."""

import json
import os
import shutil

import pytest

import nnsam_slicer_helpers  # noqa: F401 - puts the module's folder on sys.path (so the file runs alone)
from NNSAMSegmentLib.Bundles import BundleInfo, BundleStore, placeBundle, safeName, timestampedName
from NNSAMSegmentLib.Devices import DETECTION_SCRIPT, deviceChoices, parseDetectionOutput
from NNSAMSegmentLib.EngineCommands import (DEFAULT_RECOMPUTE_SHARE, METHODS, RECOMPUTE_SHARES,
                                            EngineCommandBuilder, TrainOptions, validateClassNames, validateSlices)
from NNSAMSegmentLib.Errors import UserError
from NNSAMSegmentLib.Settings import DictSettingsStore, ModelMemory


def test_train_command_follows_the_engine_interface():
    builder = EngineCommandBuilder("/opt/Slicer/bin/PythonSlicer")
    command = builder.train("/j/image.nrrd", "/j/labels.nrrd", "/j/bundle", [77, 12, 40, 12], ["LV", "RV", "Myo"],
                            TrainOptions(encoder="mobilesam", preset="full", device="cuda", iterations=2))
    assert command.program == "/opt/Slicer/bin/PythonSlicer"
    assert list(command.args) == [
        "-m", "nnsam_core.cli", "train", "/j/image.nrrd", "/j/labels.nrrd", "-o", "/j/bundle",
        "--slices", "12,40,77", "--class-names", "LV,RV,Myo", "--encoder", "mobilesam", "--method", "nnsam",
        "--preset", "full", "--device", "cuda", "--iterations", "2", "--progress", "json"]
    resumed = builder.train("/j/image.nrrd", "/j/labels.nrrd", "/j/bundle", [12], ["LV"],
                            TrainOptions(resume=True))
    assert list(resumed.args[-5:]) == ["--device", "auto", "--resume", "--progress", "json"]
    fresh = builder.train("/j/image.nrrd", "/j/labels.nrrd", "/j/bundle", [12], ["LV"],
                          TrainOptions(recomputeShare=0.25))
    assert list(fresh.args[-5:]) == ["auto", "--recompute-share", "0.25", "--progress", "json"]
    cached = builder.train("/j/image.nrrd", "/j/labels.nrrd", "/j/bundle", [12], ["LV"], TrainOptions(recomputeShare=0))
    assert cached.args[cached.args.index("--recompute-share") + 1] == "0"


def test_other_commands():
    builder = EngineCommandBuilder("py")
    assert builder.predict("/b", "/i.nrrd", "/o.nrrd", "mps").args[2:] == (
        "predict", "/b", "/i.nrrd", "-o", "/o.nrrd", "--device", "mps", "--progress", "json")
    assert builder.weightsStatus().args[2:] == ("weights", "status", "--json")
    assert builder.weightsDownload("mobilesam").args[2:] == ("weights", "download", "mobilesam", "--progress", "json")
    assert builder.weightsImport("mobilesam", "/d/mobile_sam.pt").args[2:] == (
        "weights", "import", "mobilesam", "/d/mobile_sam.pt")
    assert builder.bundleExport("/b", "/x.zip").args[2:] == ("bundle", "export", "/b", "/x.zip")
    assert builder.bundleImport("/x.zip", "/b").args[2:] == ("bundle", "import", "/x.zip", "/b")
    assert "nnsam_core.cli predict" in builder.predict("/b", "/i", "/o").commandLine()


@pytest.mark.parametrize("options, message", [
    (TrainOptions(encoder="vit_h"), "Unknown encoder 'vit_h'"),
    (TrainOptions(preset="long"), "Unknown preset"),
    (TrainOptions(device="tpu"), "Unknown device"),
    (TrainOptions(iterations=0), "iterations"),
    (TrainOptions(iterations=2.5), "iterations"),
    (TrainOptions(iterations=True), "iterations"),
    (TrainOptions(iterations="many"), "iterations"),
    (TrainOptions(recomputeShare=1.5), "fresh embeddings must be a number from 0 to 1"),
    (TrainOptions(recomputeShare=-0.1), "fresh embeddings must be a number from 0 to 1"),
    (TrainOptions(recomputeShare=float("nan")), "fresh embeddings must be a number from 0 to 1"),
    (TrainOptions(recomputeShare=True), "fresh embeddings must be a number from 0 to 1"),
    (TrainOptions(recomputeShare="often"), "fresh embeddings must be a number from 0 to 1"),
    (TrainOptions(method="nnunet", recomputeShare=0.25), "method nnunet does not have"),
])
def test_bad_options_give_one_line_messages(options, message):
    with pytest.raises(UserError, match=message) as raised:
        options.validate()
    assert "\n" not in str(raised.value)


def test_class_names_and_slices_are_checked():
    assert validateClassNames(["LV", "right lung"]) == ["LV", "right lung"]
    for names, message in ((["LV", "LV"], "Two segments"), (["a,b"], "comma"), ([" "], "empty name"),
                           ([], "No classes")):
        with pytest.raises(UserError, match=message):
            validateClassNames(names)
    assert validateSlices([5, 1, 5]) == [1, 5]
    with pytest.raises(UserError, match="No annotated slices"):
        validateSlices([])
    with pytest.raises(UserError, match="negative"):
        validateSlices([-1, 3])


def _writeBundle(path, classes=({"value": 1, "name": "LV"}, {"value": 2, "name": "RV"}), **extra):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "nnsam.json"), "w") as handle:
        json.dump({"format_version": 1, "method": "nnsam", "encoder": {"name": "litemedsam"},
                   "classes": list(classes), **extra}, handle)
    with open(os.path.join(path, "weights.bin"), "wb") as handle:
        handle.write(os.urandom(1024))
    return str(path)


def test_bundle_info_reads_the_manifest(tmp_path):
    info = BundleInfo.read(_writeBundle(tmp_path / "b"))
    assert info.classNames == ["LV", "RV"]
    assert (info.encoder, info.method, info.formatVersion) == ("litemedsam", "nnsam", 1)
    assert info.describe() == "b (litemedsam, nnsam; classes: LV, RV)"


@pytest.mark.parametrize("content, message", [
    (None, "no nnsam.json"),
    ("{not json", "Cannot read"),
    ("[]", "expected a JSON object"),
    ('{"classes": []}', "lists no classes"),
    ('{"classes": [{"value": 0, "name": "LV"}]}', "malformed class"),
    ('{"classes": [{"value": 1}]}', "malformed class"),
    ('{"classes": [{"value": 1, "name": "a"}, {"value": 1, "name": "b"}]}', "same value"),
])
def test_broken_bundles_are_refused_with_a_message(tmp_path, content, message):
    folder = tmp_path / "broken"
    folder.mkdir()
    if content is not None:
        (folder / "nnsam.json").write_text(content)
    with pytest.raises(UserError, match=message):
        BundleInfo.read(str(folder))
    with pytest.raises(UserError, match="not a folder"):
        BundleInfo.read(str(tmp_path / "missing"))


def test_place_bundle_never_leaves_a_partial_copy(tmp_path, monkeypatch):
    source = _writeBundle(tmp_path / "source")
    destination = tmp_path / "library"

    def failingCopy(src, dst, *args, **kwargs):
        os.makedirs(dst)
        with open(os.path.join(dst, "nnsam.json"), "w") as handle:
            handle.write("{}")  # half-way...
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copytree", failingCopy)
    with pytest.raises(OSError):
        placeBundle(source, str(destination), "model")
    assert os.listdir(destination) == []  # neither the bundle nor the hidden temporary folder
    monkeypatch.undo()

    placed = placeBundle(source, str(destination), "model")
    placedAgain = placeBundle(source, str(destination), "model")
    assert os.path.basename(placed) == "model" and os.path.basename(placedAgain) == "model-2"
    assert BundleInfo.read(placedAgain).classNames == ["LV", "RV"]
    assert os.path.isdir(source)


def test_store_lists_valid_bundles_newest_first_and_adopts_by_moving(tmp_path):
    store = BundleStore(str(tmp_path / "store"))
    assert store.bundles() == []
    older = store.adopt(_writeBundle(tmp_path / "job1" / "bundle"), "CT one")
    os.utime(older.path, (1, 1))
    newer = store.adopt(_writeBundle(tmp_path / "job2" / "bundle"), "CT one")
    _writeBundle(tmp_path / "store" / ".incoming-x")  # an unfinished copy
    os.makedirs(tmp_path / "store" / "junk")
    assert [b.name for b in store.bundles()] == [newer.name, older.name]
    assert older.name == "CT_one" and newer.name == "CT_one-2"
    assert not os.path.exists(tmp_path / "job1" / "bundle")


def test_names():
    assert safeName(" Heart CT: 3/4 ") == "Heart_CT_3_4"
    assert safeName("...") == "model"
    assert timestampedName("CT", now=0).startswith("CT-19")


def test_model_memory_forgets_missing_bundles_and_bad_values(tmp_path):
    store = DictSettingsStore({"NNSAMSegment/Encoder": "vit_h", "NNSAMSegment/Device": "cuda"})
    memory = ModelMemory(store)
    assert memory.encoder == "litemedsam"  # invalid stored value -> default
    assert memory.device == "cuda"
    bundle = _writeBundle(tmp_path / "b")
    memory.lastBundlePath = bundle
    assert memory.lastBundlePath == bundle
    shutil.rmtree(bundle)
    assert memory.lastBundlePath is None
    memory.preset = "full"
    assert store.value("NNSAMSegment/Preset") == "full" and memory.preset == "full"
    assert memory.recomputeShare == 0.1  # nothing stored: the engine's default
    memory.recomputeShare = 0
    assert store.value("NNSAMSegment/RecomputeShare") == "0" and memory.recomputeShare == 0.0
    for stored in ("0.3", "often", ""):  # not one of the panel's choices -> the default
        store.setValue("NNSAMSegment/RecomputeShare", stored)
        assert memory.recomputeShare == 0.1
    jobFolder = tmp_path / "job"
    jobFolder.mkdir()
    memory.resumableFineTunePath = str(jobFolder)
    assert store.value("NNSAMSegment/ResumableFineTune") == str(jobFolder)
    assert memory.resumableFineTunePath == str(jobFolder)
    jobFolder.rmdir()
    assert memory.resumableFineTunePath is None
    assert memory.bundleFolder("/default") == "/default"
    memory.setBundleFolder("/mine")
    assert memory.bundleFolder("/default") == "/mine"


def test_device_choices():
    assert deviceChoices(["cuda", "cpu"]) == [("auto", "auto (CUDA GPU found)"), ("cuda", "CUDA GPU"), ("cpu", "CPU")]
    assert deviceChoices(["mps", "cpu"])[0] == ("auto", "auto (Apple GPU found)")
    assert deviceChoices(["cpu"]) == [("auto", "auto (CPU only: slow)"), ("cpu", "CPU")]


def test_commands_parse_with_the_real_engine_command_line():
    """Contract check against the engine's own argparse parser (cheap: building it imports no torch)."""
    cli = pytest.importorskip("nnsam_core.cli")
    parser = cli.build_parser()
    builder = EngineCommandBuilder("python")
    from nnsam_core.methods import DEFAULT_RECOMPUTE_SHARE as engineDefault
    assert DEFAULT_RECOMPUTE_SHARE == engineDefault and DEFAULT_RECOMPUTE_SHARE in RECOMPUTE_SHARES

    def parse(command):
        assert list(command.args[:2]) == ["-m", "nnsam_core.cli"]
        return parser.parse_args(list(command.args[2:]))

    for encoder in ("litemedsam", "mobilesam"):
        for method in METHODS:
            for preset in ("quick", "full"):
                for device in ("auto", "cpu", "cuda", "mps"):
                    share = 0.0 if method == "nnunet" else 0.25
                    options = TrainOptions(encoder=encoder, method=method, preset=preset, device=device,
                                           iterations=2, resume=True,
                                           recomputeShare=share)
                    args = parse(builder.train("i.nrrd", "l.nrrd", "out", [40, 12], ["LV", "right lung"], options))
                    assert (args.verb, args.image, args.labels, args.output) == ("train", "i.nrrd", "l.nrrd", "out")
                    assert (args.slices, args.class_names) == ("12,40", "LV,right lung")
                    assert (args.encoder, args.method, args.preset, args.device) == (encoder, method, preset, device)
                    assert (args.iterations, args.resume, args.progress) == (2, True, "json")
                    assert args.recompute_share == share and args.start_from is None
    adapting = parse(builder.train("i.nrrd", "l.nrrd", "out", [3], ["LV"], TrainOptions(startFrom="/m/heart")))
    assert adapting.start_from == "/m/heart" and adapting.encoder is None and adapting.method is None
    args = parse(builder.predict("b", "i.nrrd", "o.nrrd", "cuda"))
    assert (args.verb, args.bundle, args.image, args.output, args.device, args.progress) == (
        "predict", "b", "i.nrrd", "o.nrrd", "cuda", "json")
    assert parse(builder.weightsStatus()).json is True
    assert parse(builder.weightsDownload("mobilesam")).progress == "json"
    assert parse(builder.weightsImport("mobilesam", "/w/mobile_sam.pt")).file == "/w/mobile_sam.pt"
    assert parse(builder.bundleExport("b", "b.zip")).zip == "b.zip"
    assert parse(builder.bundleImport("b.zip", "out")).output == "out"


@pytest.mark.parametrize("cuda, mps, expected", [(True, False, ["cuda", "cpu"]), (False, True, ["mps", "cpu"]),
                                                  (False, False, ["cpu"])])
def test_device_detection_script_in_a_separate_python(tmp_path, cuda, mps, expected):
    """The script the panel runs in a subprocess, against a stand-in torch package (the real one loads slowly)."""
    import subprocess
    import sys

    fakeTorch = tmp_path / "torch"
    fakeTorch.mkdir()
    (fakeTorch / "__init__.py").write_text(
        "import types\n"
        f"cuda = types.SimpleNamespace(is_available=lambda: {cuda})\n"
        f"backends = types.SimpleNamespace(mps=types.SimpleNamespace(is_available=lambda: {mps}))\n")
    result = subprocess.run([sys.executable, "-c", DETECTION_SCRIPT], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert parseDetectionOutput(result.stdout) == expected
    (fakeTorch / "__init__.py").write_text("raise OSError('libcudart.so: cannot open shared object file')\n")
    result = subprocess.run([sys.executable, "-c", DETECTION_SCRIPT], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert parseDetectionOutput(result.stdout) == ["cpu"]


def test_detection_output_parser_is_defensive():
    assert parseDetectionOutput('warning: x\n["cuda", "cpu"]\n') == ["cuda", "cpu"]
    assert parseDetectionOutput('["cuda"]') == ["cuda", "cpu"]
    assert parseDetectionOutput('["tpu", "cpu"]') == ["cpu"]
    assert parseDetectionOutput("") == ["cpu"]


def test_the_panel_offers_only_the_user_methods():
    assert METHODS == ("nnsam", "nnunet")
    with pytest.raises(UserError, match="Unknown method 'nnsam-random'; choose one of: nnsam, nnunet"):
        TrainOptions(method="nnsam-random").validate()


def test_a_model_adapts_only_to_annotations_of_its_own_classes(tmp_path):
    import json

    folder = tmp_path / "heart"
    folder.mkdir()
    classes = [{"value": i, "name": n} for i, n in enumerate(("LV", "RV", "Myo"), start=1)]
    (folder / "nnsam.json").write_text(json.dumps({"format_version": 1, "method": "nnsam", "classes": classes,
                                                   "encoder": {"name": "litemedsam"}}))
    info = BundleInfo.read(str(folder))
    assert info.adaptationProblem(["LV", "RV", "Myo"]) is None
    for other in (["LV", "RV"], ["RV", "LV", "Myo"], ["LV", "RV", "Myo", "LA"]):
        problem = info.adaptationProblem(other)
        assert "segments LV, RV, Myo" in problem and ", ".join(other) in problem
