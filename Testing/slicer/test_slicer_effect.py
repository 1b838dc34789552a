"""The Segment Editor effect with stand-ins for its Slicer surroundings: Qt widgets that, like PythonQt's
wrappers, raise once their C++ object is deleted; a scripted-effect object that records what it is asked to do;
Slicer 5.10's AbstractScriptedSegmentEditorEffect (its cleanup() does nothing); real MRML from slicer-core."""

import sys
import types

import numpy as np
import pytest

from nnsam_slicer_helpers import EFFECT_DIRECTORY, addVolume, segmentArray, setSegmentFromArray
from nnsam_slicer_helpers import scene  # noqa: F401 - pytest fixtures
from NNSAMSegmentLib.Bundles import BundleInfo
from NNSAMSegmentLib.InstallLogic import InstallLogic
from NNSAMSegmentLib.Signal import Signal
from NNSAMSegmentLib.Terminology import CardiacTerminology, ensureCardiacSegments


class DeletedError(RuntimeError):
    pass


class FakeWidget:
    """Any Qt widget: attributes and methods are accepted until the C++ object is deleted."""

    deleted = False  # class-wide: Slicer deletes the effect's whole options frame

    def __init__(self, *args):
        object.__setattr__(self, "_items", [])
        object.__setattr__(self, "currentIndex", 0)

    def _check(self):
        if FakeWidget.deleted:
            raise DeletedError("underlying C++ object has been deleted")

    def __setattr__(self, name, value):
        self._check()
        object.__setattr__(self, name, value)

    def __getattr__(self, name):
        self._check()
        return lambda *args, **kwargs: None

    def addItem(self, label, data=None):
        self._check()
        self._items.append(data)

    def itemData(self, index):
        return self._items[index]

    def setCurrentIndex(self, index):
        self._check()
        object.__setattr__(self, "currentIndex", index)


class FakeScriptedEffect:
    def __init__(self, parameterNode=None):
        self.calls = []
        self._parameterNode = parameterNode

    def addLabeledOptionsWidget(self, label, widget):
        pass

    def addOptionsWidget(self, widget):
        pass

    def parameterSetNode(self):
        return self._parameterNode

    def saveStateForUndo(self):
        self.calls.append(("saveStateForUndo",))

    def modifySegmentByLabelmap(self, segmentationNode, segmentId, modifier, mode, bypassMasking=False):
        from NNSAMSegmentLib.ImageGeometry import arrayFromImageData

        self.calls.append(("modify", segmentId, arrayFromImageData(modifier).copy(), mode, bypassMasking))


class AbstractEffect:  # Slicer 5.10's AbstractScriptedSegmentEditorEffect, as far as this effect uses it
    def __init__(self, scriptedEffect):
        self.scriptedEffect = scriptedEffect

    def cleanup(self):
        pass


@pytest.fixture
def effectModule(monkeypatch, scene):
    import slicer

    qt = types.ModuleType("qt")
    for name in ("QComboBox", "QLabel", "QPushButton", "QCheckBox", "QHBoxLayout", "QProgressBar", "QIcon"):
        setattr(qt, name, FakeWidget)
    effects = types.ModuleType("SegmentEditorEffects")
    abstract = types.ModuleType("SegmentEditorEffects.AbstractScriptedSegmentEditorEffect")
    abstract.AbstractScriptedSegmentEditorEffect = AbstractEffect
    modes = types.SimpleNamespace(ModificationModeSet=0, ModificationModeAdd=1, ModificationModeRemove=2)
    workflow = types.SimpleNamespace(bundleChanged=Signal(), isBusy=False, currentBundle=None,
                                     memory=types.SimpleNamespace(encoder="litemedsam", preset="quick"))
    from NNSAMSegmentLib.ResultImport import ResultImporter

    workflow.importer = ResultImporter(scene, CardiacTerminology())
    logic = types.SimpleNamespace(workflow=workflow, installLogic=InstallLogic(engineRequirement="x"),
                                  encoderLabel=lambda encoder: encoder)
    module = types.ModuleType("NNSAMSegment")
    module.getSharedLogic = lambda: logic
    for name, value in (("qt", qt), ("SegmentEditorEffects", effects),
                        ("SegmentEditorEffects.AbstractScriptedSegmentEditorEffect", abstract),
                        ("NNSAMSegment", module)):
        monkeypatch.setitem(sys.modules, name, value)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.setattr(slicer, "qSlicerSegmentEditorAbstractEffect", modes, raising=False)
    monkeypatch.syspath_prepend(str(EFFECT_DIRECTORY))
    monkeypatch.delitem(sys.modules, "SegmentEditorNNSAMLib.SegmentEditorEffect", raising=False)
    import SegmentEditorNNSAMLib.SegmentEditorEffect as effectModule

    FakeWidget.deleted = False
    yield effectModule, logic
    FakeWidget.deleted = False


def test_after_cleanup_no_signal_reaches_the_deleted_widgets(effectModule, tmp_path):
    module, logic = effectModule
    effect = module.SegmentEditorEffect(FakeScriptedEffect())
    effect.setupOptionsFrame()
    effect.cleanup()
    FakeWidget.deleted = True  # Slicer deletes the effect after cleanup()
    bundle = BundleInfo(path=str(tmp_path), classes=(), encoder="litemedsam", method="nnsam")
    logic.workflow.bundleChanged.emit(bundle)  # a fine-tune finishing in the module panel
    logic.installLogic.busyChanged.emit(True)


def test_apply_goes_through_the_editors_masking_and_adds_only_to_unpainted_slices(effectModule, scene):
    module, logic = effectModule
    array = np.zeros((4, 5, 6), np.int16)
    volume = addVolume(scene, array)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Annotations")
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    ids = ensureCardiacSegments(node.GetSegmentation(), CardiacTerminology())
    painted = np.zeros(array.shape, bool)
    painted[1, 1:3, 1:3] = True
    setSegmentFromArray(node, ids[0], painted, volume)
    before = segmentArray(scene, node, ids[0], volume).copy()
    prediction = np.zeros(array.shape, np.uint8)
    prediction[:, 2:4, 2:4] = 1  # class 1 (LV) on every slice, the painted one included
    bundle = BundleInfo(path="/b", classes=((1, "LV"),), encoder="litemedsam", method="nnsam")
    parameterNode = types.SimpleNamespace(GetSegmentationNode=lambda: node)
    scripted = FakeScriptedEffect(parameterNode)
    effect = module.SegmentEditorEffect(scripted)
    effect.setupOptionsFrame()
    effect._prediction = (prediction, bundle, volume, node)

    effect.onApply()

    assert scripted.calls[0] == ("saveStateForUndo",)
    modifies = [call for call in scripted.calls if call[0] == "modify"]
    assert len(modifies) == 1
    _, segmentId, modifier, mode, bypassMasking = modifies[0]
    assert (segmentId, mode, bypassMasking) == (ids[0], 1, False)  # Add, masking applied
    expected = prediction.astype(bool)
    expected[1] = False  # the painted slice is the user's
    np.testing.assert_array_equal(modifier.astype(bool), expected)
    # Nothing was written around the editor: the segment is as the user left it until the editor applies it.
    np.testing.assert_array_equal(segmentArray(scene, node, ids[0], volume), before)
