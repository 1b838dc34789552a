"""Cardiac terminology and segments: codes, colours, and the round trip through Slicer's .seg.nrrd storage."""

import numpy as np
import pytest

from nnsam_slicer_helpers import (addVolume, loadSegmentationFile, rotationRas, segmentArray, setSegmentFromArray,
                                  writeSegmentationFile)
from nnsam_slicer_helpers import scene  # noqa: F401 - pytest fixtures
from NNSAMSegmentLib.SharedResources import TERMINOLOGY_FILE, candidateDirectories, sharedResourcePath
from NNSAMSegmentLib.Terminology import CardiacTerminology, ensureCardiacSegments, ensureSegment

# SNOMED CT codes Slicer's own terminology uses (DICOM master list for the chambers; Myocardium as in
# SlicerTotalSegmentator), with the context group (cid, name) and UMLS concept of Slicer 5.10's
# SegmentationCategoryTypeModifier-DICOM-Master.json for the chambers.
VENTRICLE_GROUPS = "CardiovascularAnatomicLocations,CardiacStructureSegmentationTypes"
EXPECTED = {
    "LV": ("87878005", "Left ventricle", ("3010,7152", VENTRICLE_GROUPS, "C0225897")),
    "RV": ("53085002", "Right ventricle", ("3010,7152", VENTRICLE_GROUPS, "C0225883")),
    "LA": ("82471001", "Left atrium", ("3010", "CardiovascularAnatomicLocations", "C0225860")),
    "RA": ("73829009", "Right atrium", ("3010", "CardiovascularAnatomicLocations", "C0225844")),
    "Myo": ("74281007", "Myocardium", None),
}


@pytest.fixture
def terminology():
    return CardiacTerminology()


def test_terminology_file_has_the_five_classes_with_snomed_codes_and_colours(terminology):
    assert terminology.classNames == list(EXPECTED)
    for cardiacClass in terminology.classes:
        code, meaning, _context = EXPECTED[cardiacClass.name]
        assert (cardiacClass.type.scheme, cardiacClass.type.value, cardiacClass.type.meaning) == ("SCT", code, meaning)
    assert (terminology.category.scheme, terminology.category.value) == ("SCT", "123037004")


def test_chamber_codes_carry_the_master_lists_context():
    import json

    with open(sharedResourcePath(TERMINOLOGY_FILE), encoding="utf-8") as handle:
        types = json.load(handle)["SegmentationCodes"]["Category"][0]["Type"]
    for entry in types:
        expected = EXPECTED[entry["nnsamClassName"]][2]
        if expected is not None:
            found = (str(entry["cid"]), entry["contextGroupName"], entry["UMLSConceptUID"])
            assert found == expected, entry["CodeMeaning"]


def test_the_five_colours_are_clearly_different(terminology):
    """Every pair differs by at least 100 in RGB distance (the master list's LA, RA and Heart differ by under 15)."""
    colours = {c.name: np.array(c.color255, float) for c in terminology.classes}
    names = list(colours)
    for index, first in enumerate(names):
        for second in names[index + 1:]:
            distance = float(np.linalg.norm(colours[first] - colours[second]))
            assert distance >= 100, f"{first} and {second} look alike (distance {distance:.0f})"


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
    np.testing.assert_allclose(myo.GetColor(), np.array(terminology.find("Myo").color255) / 255.0)
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


def test_a_terminology_slicer_refuses_is_reported(terminology, caplog):
    import slicer

    from NNSAMSegmentLib.Terminology import loadTerminologyIntoSlicer

    assert loadTerminologyIntoSlicer(slicer.vtkSlicerTerminologiesModuleLogic(), terminology.path)

    class RefusingLogic:  # Slicer's answer to a file it cannot read: an empty context name, no exception
        def LoadTerminologyFromFile(self, path):
            return ""

    with caplog.at_level("WARNING"):
        assert not loadTerminologyIntoSlicer(RefusingLogic(), "/broken.term.json")
    assert "could not load the cardiac terminology /broken.term.json" in caplog.text
