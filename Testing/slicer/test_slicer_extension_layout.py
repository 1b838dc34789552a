"""The extension as the Extensions Manager delivers it: build and install the tree the CMake describes, then
install the engine from that tree alone into a fresh virtual environment, without network or the checkout."""

import os
import subprocess
import sys

import pytest

import fake_slicer_cmake
from fake_slicer_cmake import SCRIPTED_MODULES
from nnsam_slicer_helpers import REPOSITORY
from NNSAMSegmentLib.InstallLogic import ENGINE_FOLDER, defaultEngineRequirement, stageEngineSource

pytestmark = pytest.mark.skipif(not fake_slicer_cmake.cmakeAvailable(), reason="cmake is not installed")


@pytest.fixture(scope="module")
def installTree(tmp_path_factory):
    root = tmp_path_factory.mktemp("extension")
    configured = fake_slicer_cmake.configure(root)
    assert configured.returncode == 0, configured.stdout + configured.stderr
    for step in (["cmake", "--build", str(root / "build")],
                 ["cmake", "--install", str(root / "build"), "--prefix", str(root / "install")]):
        result = subprocess.run(step, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
    return root


def test_the_install_tree_carries_the_engine_beside_the_module(installTree):
    scripted = installTree / "install" / SCRIPTED_MODULES
    assert (scripted / "NNSAMSegment.py").is_file()
    assert (scripted / "NNSAMSegmentLib" / "InstallLogic.py").is_file()
    engine = scripted / ENGINE_FOLDER
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        assert (engine / name).is_file(), name
    assert (engine / "nnsam_core" / "cli.py").is_file()
    assert not list(engine.rglob("__pycache__"))
    assert not (scripted / "nnsam_core").exists(), "importable before its dependencies are installed"
    # The installed module finds the engine it ships with, never a PyPI name.
    assert defaultEngineRequirement(str(scripted), environ={}) == str(engine)
    # The build tree has it too (Slicer run from a build folder).
    assert (installTree / "build" / SCRIPTED_MODULES / ENGINE_FOLDER / "nnsam_core" / "cli.py").is_file()


def test_the_engine_installs_from_the_install_tree_into_a_fresh_environment(installTree, tmp_path):
    engine = installTree / "install" / SCRIPTED_MODULES / ENGINE_FOLDER
    staged = stageEngineSource(str(engine), str(tmp_path / "staging"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    outside = tmp_path / "elsewhere"  # not the checkout: its nnsam_core must not be on the path
    outside.mkdir()
    environment = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    environment.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    # The wheel is built with this interpreter's setuptools (the fresh environment's may lack bdist_wheel), from
    # the staged copy of the install tree, offline; the fresh environment then installs it offline.
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index", "--no-build-isolation", "-w",
         str(tmp_path / "wheels"), staged], capture_output=True, text=True, timeout=300, cwd=outside, env=environment)
    assert built.returncode == 0, built.stdout + built.stderr
    wheels = list((tmp_path / "wheels").glob("nnsam_core-*.whl"))
    assert len(wheels) == 1, os.listdir(tmp_path / "wheels")
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheels[0])],
        capture_output=True, text=True, timeout=300, cwd=outside, env=environment)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    found = subprocess.run([str(python), "-c", "import nnsam_core, sys; print(nnsam_core.__file__); print(sys.prefix)"],
                           capture_output=True, text=True, timeout=60, cwd=outside, env=environment)
    assert found.returncode == 0, found.stderr
    location, prefix = found.stdout.split()
    assert os.path.realpath(prefix) == os.path.realpath(venv)
    assert os.path.realpath(location).startswith(os.path.realpath(venv)), location
    assert not os.path.realpath(location).startswith(os.path.realpath(REPOSITORY)), location
