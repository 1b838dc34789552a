"""Checks that need no Slicer: the .ui file, names the code uses, Qt-free library imports, CMake lists."""

import ast
import os
import py_compile
import re
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ElementTree

import pytest

import fake_slicer_cmake
from nnsam_slicer_helpers import EFFECT_DIRECTORY, MODULE_DIRECTORY, REPOSITORY

UI_FILE = MODULE_DIRECTORY / "Resources" / "UI" / "NNSAMSegment.ui"
MODULE_FILE = MODULE_DIRECTORY / "NNSAMSegment.py"
SELF_TEST_FILE = REPOSITORY / "Testing" / "Python" / "NNSAMSegmentSelfTest.py"
LIB_DIRECTORY = MODULE_DIRECTORY / "NNSAMSegmentLib"
SLICER_FILES = [MODULE_FILE, EFFECT_DIRECTORY / "SegmentEditorNNSAM.py",
                EFFECT_DIRECTORY / "SegmentEditorNNSAMLib" / "SegmentEditorEffect.py",
                EFFECT_DIRECTORY / "SegmentEditorNNSAMLib" / "__init__.py", SELF_TEST_FILE]


@pytest.fixture(scope="module")
def uiTree():
    return ElementTree.parse(UI_FILE)  # raises on malformed XML


def _widgets(tree):
    return {widget.get("name"): widget.get("class") for widget in tree.iter("widget")}


def test_ui_file_is_qt_designer_xml(uiTree):
    root = uiTree.getroot()
    assert root.tag == "ui" and root.get("version") == "4.0"
    assert root.findtext("class") == "NNSAMSegment"
    top = root.find("widget")
    assert (top.get("class"), top.get("name")) == ("qMRMLWidget", "NNSAMSegment")
    names = [widget.get("name") for widget in uiTree.iter("widget")]
    assert len(names) == len(set(names)), "widget names must be unique"
    layouts = [layout.get("name") for layout in uiTree.iter("layout")]
    assert len(layouts) == len(set(layouts))


def test_custom_widget_classes_are_declared(uiTree):
    declared = {custom.findtext("class") for custom in uiTree.getroot().iter("customwidget")}
    used = set(_widgets(uiTree).values())
    assert {cls for cls in used if not cls.startswith("Q")} <= declared


def test_connections_name_existing_widgets(uiTree):
    names = set(_widgets(uiTree))
    connections = list(uiTree.getroot().iter("connection"))
    assert connections, "MRML selectors need the scene from the top widget"
    for connection in connections:
        assert connection.findtext("sender") in names
        assert connection.findtext("receiver") in names
    receivers = {c.findtext("receiver") for c in connections if c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    mrmlWidgets = {name for name, cls in _widgets(uiTree).items() if cls.startswith("qMRML") and cls != "qMRMLWidget"}
    assert mrmlWidgets <= receivers


def test_every_ui_name_used_by_the_code_exists_in_the_ui_file(uiTree):
    code = MODULE_FILE.read_text()
    used = set(re.findall(r"\bui\.(\w+)", code))
    assert len(used) > 20  # the scan really found the panel's widgets
    missing = used - set(_widgets(uiTree))
    assert not missing, f"names used as self.ui.<name> but absent from the .ui file: {sorted(missing)}"


def test_slicer_side_files_compile():
    for path in SLICER_FILES:
        py_compile.compile(str(path), doraise=True)


def test_module_file_defines_the_four_scripted_classes():
    tree = ast.parse(MODULE_FILE.read_text())
    classes = {node.name: [base.id for base in node.bases if isinstance(base, ast.Name)]
               for node in tree.body if isinstance(node, ast.ClassDef)}
    assert classes["NNSAMSegment"] == ["ScriptedLoadableModule"]
    assert classes["NNSAMSegmentWidget"][0] == "ScriptedLoadableModuleWidget"
    assert classes["NNSAMSegmentLogic"] == ["ScriptedLoadableModuleLogic"]
    assert "NNSAMSegmentTest" not in classes  # the self-test lives in Testing/Python, as Slicer extensions keep it
    selfTest = ast.parse(SELF_TEST_FILE.read_text())
    testClasses = {node.name: [base.id for base in node.bases if isinstance(base, ast.Name)]
                   for node in selfTest.body if isinstance(node, ast.ClassDef)}
    assert testClasses == {"NNSAMSegmentSelfTest": ["ScriptedLoadableModuleTest"]}
    effect = ast.parse((EFFECT_DIRECTORY / "SegmentEditorNNSAMLib" / "SegmentEditorEffect.py").read_text())
    effectClasses = [node.name for node in effect.body if isinstance(node, ast.ClassDef)]
    assert effectClasses == ["SegmentEditorEffect"]  # the name Slicer's scripted-effect loader looks for


def test_library_imports_without_qt_or_slicer():
    """Importing any library module must not pull in Qt, CTK, or Slicer (only Slicer-only code paths do)."""
    modules = sorted(path.stem for path in LIB_DIRECTORY.glob("*.py") if path.stem != "__init__")
    script = textwrap.dedent(f"""
        import importlib, sys
        BLOCKED = ("qt", "ctk", "slicer", "vtk", "vtkmodules", "SimpleITK", "torch")

        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError("blocked at import time: " + name)
                return None

        sys.meta_path.insert(0, Blocker())
        sys.path.insert(0, {str(MODULE_DIRECTORY)!r})
        for name in {modules!r}:
            importlib.import_module("NNSAMSegmentLib." + name)
        print("ok", len({modules!r}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"ok {len(modules)}"


def _cmakeList(cmakeFile, variable):
    text = cmakeFile.read_text()
    block = re.search(r"set\(" + variable + r"\s+(.*?)\)", text, re.DOTALL).group(1)
    return [entry.replace("${MODULE_NAME}", re.search(r"set\(MODULE_NAME (\w+)\)", text).group(1))
            for entry in block.split()]


def test_cmake_lists_every_library_module_and_resource():
    scripts = _cmakeList(MODULE_DIRECTORY / "CMakeLists.txt", "MODULE_PYTHON_SCRIPTS")
    onDisk = {"NNSAMSegment.py"} | {f"NNSAMSegmentLib/{p.name}" for p in LIB_DIRECTORY.glob("*.py")}
    assert set(scripts) == onDisk
    for directory in (MODULE_DIRECTORY, EFFECT_DIRECTORY):
        for variable in ("MODULE_PYTHON_SCRIPTS", "MODULE_PYTHON_RESOURCES"):
            for entry in _cmakeList(directory / "CMakeLists.txt", variable):
                assert (directory / entry).is_file(), entry


@pytest.mark.skipif(not fake_slicer_cmake.cmakeAvailable(), reason="cmake is not installed")
def test_extension_configures_and_lays_out_shared_resources(tmp_path):
    result = fake_slicer_cmake.configure(tmp_path)
    build = tmp_path / "build"
    assert result.returncode == 0, result.stdout + result.stderr
    cache = (build / "CMakeCache.txt").read_text()
    assert "CMAKE_PROJECT_NAME:STATIC=NNSAMSegment" in cache
    scripted = build / "lib" / "Slicer-5.10" / "qt-scripted-modules"
    assert (scripted / "Resources" / "UI" / "NNSAMSegment.ui").is_file()
    assert (scripted / "SegmentEditorNNSAMLib" / "SegmentEditorEffect.py").is_file()
    # The library finds the shared resources where the build put them (flat qt-scripted-modules layout).
    from NNSAMSegmentLib.SharedResources import TERMINOLOGY_FILE, WEIGHTS_MANIFEST_FILE, sharedResourcePath

    libDirectory = str(scripted / "NNSAMSegmentLib")
    for resource in (TERMINOLOGY_FILE, WEIGHTS_MANIFEST_FILE):
        found = sharedResourcePath(resource, libDir=libDirectory)
        assert found == os.path.join(str(scripted), "Resources", "Shared", resource)


def test_code_carries_no_measured_figures_or_dates():
    """Measurements change; code states the rule and points to docs/results.md."""
    files = [*MODULE_DIRECTORY.rglob("*.py"), *EFFECT_DIRECTORY.rglob("*.py"), UI_FILE]
    offending = []
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if re.search(r"\bDice\b|\b20\d\d-\d\d-\d\d\b", line):
                offending.append(f"{path.name}:{number}: {line.strip()}")
    assert not offending, "\n".join(offending)


def test_qt_signals_are_connected_by_signature():
    """PythonQt binds ``obj.signal.connect(slot)`` to the overload declared first (QProcess.finished -> finished(int)),
    so Qt signals are connected as ``obj.connect("signal(types)", slot)``. ``finished`` is allowed only on the
    module's own Signal objects (jobs and runners)."""
    qtSignals = r"timeout|clicked|toggled|currentIndexChanged|readyReadStandardOutput|readyReadStandardError|" \
                r"errorOccurred|stateChanged|started"
    files = [*MODULE_DIRECTORY.rglob("*.py"), *EFFECT_DIRECTORY.rglob("*.py"), SELF_TEST_FILE]
    offending = []
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if line.lstrip().startswith("#"):
                continue
            attributeQtSignal = re.search(r"\.(" + qtSignals + r")\.connect\(", line)
            finished = re.search(r"(\w+)\.finished\.connect\(", line)
            if attributeQtSignal or (finished and finished.group(1) not in ("job", "runner")):
                offending.append(f"{path.name}:{number}: {line.strip()}")
    assert not offending, "\n".join(offending)
