"""Hidden module that registers the "nnSAM" Segment Editor effect once Slicer has started."""

import os

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import ScriptedLoadableModule


class SegmentEditorNNSAM(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SegmentEditorNNSAM")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        # NNSAMSegment first: the effect uses its library and shares its logic (current model, running job).
        self.parent.dependencies = ["NNSAMSegment", "Segmentations"]
        self.parent.contributors = ["NNSAMSegment developers"]
        self.parent.hidden = True
        self.parent.helpText = _("This hidden module registers the nnSAM Segment Editor effect.")
        self.parent.acknowledgementText = _("See the nnSAM Segment module.")
        slicer.app.connect("startupCompleted()", self.registerEditorEffect)

    def registerEditorEffect(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as qSlicerSegmentationsEditorEffects

        instance = qSlicerSegmentationsEditorEffects.qSlicerSegmentEditorScriptedEffect(None)
        effectFilename = os.path.join(os.path.dirname(__file__), self.__class__.__name__ + "Lib",
                                      "SegmentEditorEffect.py")
        instance.setPythonSource(effectFilename.replace("\\", "/"))
        instance.self().register()
