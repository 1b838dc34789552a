"""Cardiac terminology and segments: codes, colours, and the round trip through Slicer's .seg.nrrd storage."""

import numpy as np
import pytest

from nnsam_slicer_helpers import (addVolume, loadSegmentationFile, rotationRas, segmentArray, setSegmentFromArray,
                                  writeSegmentationFile)
from nnsam_slicer_helpers import scene  # noqa: F401 - pytest fixtures
from NNSAMSegmentLib.SharedResources import TERMINOLOGY_FILE, candidateDirectories, sharedResourcePath
from NNSAMSegmentLib.Terminology import CardiacTerminology, ensureCardiacSegments, ensureSegment

# SNOMED CT codes Slicer's own terminology uses (DICOM master list for the chambers; Myocardium as in
# SlicerTotalSegmentator), with their recommended colours.
EXPECTED = {
    "LV": ("87878005", "Left ventricle", (152, 55, 13)),
    "RV": ("53085002", "Right ventricle", (181, 85, 57)),
    "LA": ("82471001", "Left atrium", (203, 108, 81)),
    "RA": ("73829009", "Right atrium", (210, 115, 89)),
    "Myo": ("74281007", "Myocardium", (206, 110, 84)),
}


@pytest.fixture
def terminology():
    return CardiacTerminology()


def test_terminology_file_has_the_five_classes_with_snomed_codes_and_colours(terminology):
    assert terminology.classNames == list(EXPECTED)
    for cardiacClass in terminology.classes:
        code, meaning, colour = EXPECTED[cardiacClass.name]
        assert (cardiacClass.type.scheme, cardiacClass.type.value, cardiacClass.type.meaning) == ("SCT", code, meaning)
        assert cardiacClass.color255 == colour
    assert (terminology.category.scheme, terminology.category.value) == ("SCT", "123037004")


def test_slicer_terminology_logic_loads_the_file_and_parses_our_entries(terminology):
    import slicer

    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    contextName = logic.LoadTerminologyFromFile(terminology.path)
    assert contextName == terminology.contextName
    category = slicer.vtkSlicerTerminologyCategory()
    assert logic.GetNthCategoryInTerminology(contextName, 0, category)
    assert logic.GetNumberOfTypesInTerminologyCategory(contextName, category) == 5
    for cardiacClass in terminology.classes:
        entry = slicer.vtkSlicerTerminologyEntry()
        assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(
            terminology.entryString(cardiacClass), entry)
        assert entry.GetTerminologyContextName() == contextName
        assert entry.GetTypeObject().GetCodeValue() == cardiacClass.type.value
        assert entry.GetCategoryObject().GetCodeValue() == "123037004"
        # The colour Slicer finds for that type in the loaded terminology is ours.
        typeObject = slicer.vtkSlicerTerminologyType()
        index = terminology.classes.index(cardiacClass)
        assert logic.GetNthTypeInTerminologyCategory(contextName, category, index, typeObject)
        assert tuple(typeObject.GetRecommendedDisplayRGBValue()) == cardiacClass.color255
    # Label-map imports match by "3dSlicerLabel": Slicer finds the left ventricle by its label.
    found = slicer.vtkSlicerTerminologyEntry()
    assert logic.FindTypeInTerminologyBy3dSlicerLabel(contextName, "left ventricle of heart", found)
    assert found.GetTypeObject().GetCodeValue() == "87878005"


def test_find_accepts_short_names_and_code_meanings(terminology):
    assert terminology.find("lv").name == "LV"
    assert terminology.find("Left Ventricle").name == "LV"
    assert terminology.find("myocardium").name == "Myo"
    assert terminology.find("aorta") is None


def test_ensure_cardiac_segments_is_idempotent_and_keeps_user_segments(scene, terminology):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation = node.GetSegmentation()
    userId = segmentation.AddEmptySegment("", "LV", [0.1, 0.2, 0.3])  # the user's own LV, own colour
    ids = ensureCardiacSegments(segmentation, terminology)
    assert ids[0] == userId
    assert ensureCardiacSegments(segmentation, terminology) == ids
    assert segmentation.GetNumberOfSegments() == 5
    np.testing.assert_allclose(segmentation.GetSegment(userId).GetColor(), (0.1, 0.2, 0.3))
    myo = segmentation.GetSegment(ids[4])
    np.testing.assert_allclose(myo.GetColor(), np.array(EXPECTED["Myo"][2]) / 255.0)
    assert "SCT^74281007^Myocardium" in myo.GetTerminology()
    # A non-cardiac class gets a segment, but not a cardiac code (Slicer's default terminology instead).
    otherId = ensureSegment(segmentation, "aorta", terminology)
    assert segmentation.GetSegment(otherId).GetName() == "aorta"
    assert not any(code in segmentation.GetSegment(otherId).GetTerminology() for code, _, _ in EXPECTED.values())


def test_five_segments_round_trip_through_seg_nrrd(scene, terminology, tmp_path):
    volume = addVolume(scene, np.zeros((6, 8, 10), np.int16), directionRas=rotationRas(0.3, flipK=False))
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Annotations")
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    ids = ensureCardiacSegments(node.GetSegmentation(), terminology)
    masks = {}
    for index, segmentId in enumerate(ids):
        mask = np.zeros((6, 8, 10), bool)
        mask[index, 1 + index % 3:4 + index % 3, 2:6 + index] = True
        setSegmentFromArray(node, segmentId, mask, volume)
        masks[terminology.classes[index].name] = mask
    path = tmp_path / "annotations.seg.nrrd"
    writeSegmentationFile(scene, node, path)

    reread = loadSegmentationFile(scene, path, "reread")

    segmentation = reread.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 5
    for index, cardiacClass in enumerate(terminology.classes):
        segment = segmentation.GetNthSegment(index)
        assert segment.GetName() == cardiacClass.name
        np.testing.assert_allclose(segment.GetColor(), cardiacClass.color, atol=1e-5)
        assert segment.GetTerminology() == terminology.entryString(cardiacClass)
        np.testing.assert_array_equal(
            segmentArray(scene, reread, segmentation.GetNthSegmentID(index), volume), masks[cardiacClass.name])

    # An independent reader (slicerio) sees the same SNOMED codes in the file.
    import slicerio

    segments = {s["name"]: s for s in slicerio.read_segmentation(str(path), skip_voxels=True)["segments"]}
    for name, (code, meaning, _) in EXPECTED.items():
        assert segments[name]["terminology"]["type"] == ["SCT", code, meaning]


def test_shared_resources_are_found_in_the_checkout():
    path = sharedResourcePath(TERMINOLOGY_FILE)
    assert path.endswith("NNSAMSegmentCardiac.term.json")
    assert len(candidateDirectories()) == 2
    with pytest.raises(FileNotFoundError, match="no-such-file"):
        sharedResourcePath("no-such-file.json")
