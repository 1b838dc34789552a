"""Importing a predicted label map: annotated slices stay bit-identical, nothing the user made is lost."""

import numpy as np
import pytest

from nnsam_slicer_helpers import (addVolume, internalLabelmaps, loadSegmentationFile, loadVolumeFile, rotationRas,
                                  segmentArray, setSegmentFromArray)
from nnsam_slicer_helpers import chestData, scene  # noqa: F401 - pytest fixtures
from NNSAMSegmentLib.Annotations import AnnotationReader
from NNSAMSegmentLib.Bundles import BundleClass
from NNSAMSegmentLib.Errors import UserError
from NNSAMSegmentLib.ImageGeometry import VolumeImage, geometryFromVolumeNode
from NNSAMSegmentLib.ResultImport import ResultImporter, SegmentationSnapshot
from NNSAMSegmentLib.Terminology import CardiacTerminology, ensureCardiacSegments

SHAPE = (8, 6, 7)
CLASSES = [BundleClass(1, "LV"), BundleClass(2, "RV"), BundleClass(3, "LA"), BundleClass(4, "RA"),
           BundleClass(5, "Myo")]


@pytest.fixture
def annotated(scene):
    """A volume and a segmentation with LV/LA painted on slices 2 and 5, and an unrelated 'aorta' on slice 6."""
    volume = addVolume(scene, np.zeros(SHAPE, np.int16), directionRas=rotationRas(0.5, flipK=False))
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Annotations")
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    ids = ensureCardiacSegments(node.GetSegmentation(), CardiacTerminology())
    lv = np.zeros(SHAPE, bool)
    lv[2, 1:3, 1:4] = True
    lv[5, 0:2, 0:2] = True
    la = np.zeros(SHAPE, bool)
    la[5, 4:6, 5:7] = True
    setSegmentFromArray(node, ids[0], lv, volume)
    setSegmentFromArray(node, ids[2], la, volume)
    aortaId = node.GetSegmentation().AddEmptySegment("", "aorta", [0.8, 0.1, 0.1])
    aorta = np.zeros(SHAPE, bool)
    aorta[6, 2:4, 2:4] = True
    setSegmentFromArray(node, aortaId, aorta, volume)
    return volume, node


def _prediction():
    """Every class somewhere on every slice (also where the user painted), plus an unknown label 9."""
    prediction = np.zeros(SHAPE, np.uint8)
    prediction[:, 0:2, :] = 1
    prediction[:, 2:3, :] = 2
    prediction[:, 3:4, :] = 3
    prediction[:, 4:5, :] = 4
    prediction[:, 5:6, 0:3] = 5
    prediction[:, 5, 6] = 9
    return prediction


def test_fill_leaves_annotated_slices_bit_identical_and_fills_the_others(scene, annotated):
    volume, node = annotated
    before = internalLabelmaps(node)
    beforeOnGrid = {name: segmentArray(scene, node, node.GetSegmentation().GetSegmentIdBySegmentName(name), volume)
                    for name in before}

    summary = ResultImporter(scene, CardiacTerminology()).fillUnannotatedSlices(node, volume, _prediction(), CLASSES)

    kept = [2, 5, 6]  # LV/LA slices and the aorta's slice
    assert summary.keptSlices == kept
    assert summary.filledSlices == [0, 1, 3, 4, 7]
    after = internalLabelmaps(node)
    prediction = _prediction()
    for name in before:
        segmentId = node.GetSegmentation().GetSegmentIdBySegmentName(name)
        onGrid = segmentArray(scene, node, segmentId, volume)
        # Annotated slices: exactly what the user painted, voxel for voxel.
        np.testing.assert_array_equal(onGrid[kept], beforeOnGrid[name][kept])
        if name == "aorta":
            assert after[name][0] == before[name][0]  # same grid
            np.testing.assert_array_equal(onGrid, beforeOnGrid[name])  # untouched everywhere
            continue
        value = next(c.value for c in CLASSES if c.name == name)
        np.testing.assert_array_equal(onGrid[[0, 1, 3, 4, 7]], (prediction == value)[[0, 1, 3, 4, 7]])
    assert summary.classVoxels["Myo"] == 5 * 3
    assert AnnotationReader(scene).annotatedSlicesOf(node, volume) == list(range(8))


def test_fill_keeps_the_stored_voxels_of_annotated_slices(scene, annotated):
    """Bit-identical in the segmentation's own storage, not only after export to the volume grid."""
    volume, node = annotated
    lvId = node.GetSegmentation().GetSegmentIdBySegmentName("LV")
    before = internalLabelmaps(node)["LV"]
    ResultImporter(scene).fillUnannotatedSlices(node, volume, _prediction(), CLASSES)
    matrix, extent, array = internalLabelmaps(node)["LV"]
    assert matrix == before[0]
    # Map the stored extents to volume slices and compare the painted slices.
    for k in (2, 5):
        beforeSlice = before[2][k - before[1][4]]
        afterSlice = array[k - extent[4]]
        # Same voxels within the union of both extents (extents may grow in i/j because of new slices).
        full = np.zeros(SHAPE[1:], bool)
        full[before[1][2]:before[1][3] + 1, before[1][0]:before[1][1] + 1] = beforeSlice
        fullAfter = np.zeros(SHAPE[1:], bool)
        fullAfter[extent[2]:extent[3] + 1, extent[0]:extent[1] + 1] = afterSlice
        np.testing.assert_array_equal(fullAfter, full)
    assert segmentArray(scene, node, lvId, volume)[0].any()


def test_undo_snapshot_restores_the_segmentation_exactly(scene, annotated):
    volume, node = annotated
    before = {name: value[2] for name, value in internalLabelmaps(node).items()}
    snapshot = SegmentationSnapshot(node)
    ResultImporter(scene).fillUnannotatedSlices(node, volume, _prediction(), CLASSES)
    assert not np.array_equal(internalLabelmaps(node)["RV"][2], before["RV"])
    snapshot.restore()
    after = {name: value[2] for name, value in internalLabelmaps(node).items()}
    assert list(after) == list(before)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])


def test_fill_creates_missing_class_segments_with_terminology(scene):
    volume = addVolume(scene, np.zeros(SHAPE, np.int16))
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Empty")
    summary = ResultImporter(scene, CardiacTerminology()).fillUnannotatedSlices(node, volume, _prediction(),
                                                                                 CLASSES[:2])
    segmentation = node.GetSegmentation()
    assert [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())] == \
        ["LV", "RV"]
    assert "87878005" in segmentation.GetNthSegment(0).GetTerminology()
    assert summary.keptSlices == [] and summary.filledSlices == list(range(8))


def test_fill_refuses_a_segmentation_on_another_grid(scene):
    volume = addVolume(scene, np.zeros(SHAPE, np.int16))
    other = addVolume(scene, np.zeros((4, 12, 14), np.int16), spacing=(0.35, 0.45, 2.5), name="fine")
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Fine")
    node.SetReferenceImageGeometryParameterFromVolumeNode(other)
    segmentId = node.GetSegmentation().AddEmptySegment("", "LV")
    mask = np.zeros((4, 12, 14), bool)
    mask[1, 2:5, 2:5] = True
    setSegmentFromArray(node, segmentId, mask, other)
    before = internalLabelmaps(node)["LV"][2].copy()
    with pytest.raises(UserError, match="different voxel grid"):
        ResultImporter(scene).fillUnannotatedSlices(node, volume, _prediction(), CLASSES)
    np.testing.assert_array_equal(internalLabelmaps(node)["LV"][2], before)


def test_fill_refuses_different_transforms(scene, annotated):
    volume, node = annotated
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    node.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(UserError, match="different transforms"):
        ResultImporter(scene).fillUnannotatedSlices(node, volume, _prediction(), CLASSES)


def test_new_segmentation_holds_the_whole_prediction_next_to_the_volume(scene):
    import slicer

    volume = addVolume(scene, np.zeros(SHAPE, np.int16), name="Heart CT")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    volume.SetAndObserveTransformNodeID(transform.GetID())
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = shNode.CreateFolderItem(shNode.GetSceneItemID(), "Study")
    shNode.CreateItem(study, volume)

    summary = ResultImporter(scene, CardiacTerminology()).createSegmentationNode(volume, _prediction(), CLASSES)

    node = summary.segmentationNode
    assert node.GetName() == "Heart CT nnSAM"
    assert node.GetTransformNodeID() == transform.GetID()
    assert shNode.GetItemParent(shNode.GetItemByDataNode(node)) == study
    segmentation = node.GetSegmentation()
    for index, cardiacClass in enumerate(CLASSES):
        assert segmentation.GetNthSegment(index).GetName() == cardiacClass.name
        segmentId = segmentation.GetNthSegmentID(index)
        np.testing.assert_array_equal(segmentArray(scene, node, segmentId, volume),
                                      _prediction() == cardiacClass.value)
    assert "label 9" not in summary.describe() and "found: LV, RV, LA, RA, Myo" in summary.describe()


def test_read_prediction_checks_the_grid(scene, tmp_path):
    volume = addVolume(scene, np.zeros(SHAPE, np.int16), directionRas=rotationRas(0.2, flipK=False))
    geometry = geometryFromVolumeNode(volume)
    good = tmp_path / "good.nrrd"
    geometry.withArray(_prediction()).write(str(good))
    np.testing.assert_array_equal(ResultImporter.readPrediction(str(good), volume), _prediction())

    shifted = VolumeImage(_prediction(), geometry.spacing, np.array(geometry.origin) + [0, 0, 1.0],
                          geometry.direction)
    shifted.write(str(tmp_path / "shifted.nrrd"))
    with pytest.raises(UserError, match="voxel grid"):
        ResultImporter.readPrediction(str(tmp_path / "shifted.nrrd"), volume)
    geometry.withArray(np.zeros((8, 6, 6), np.uint8)).write(str(tmp_path / "small.nrrd"))
    with pytest.raises(UserError, match="another image"):
        ResultImporter.readPrediction(str(tmp_path / "small.nrrd"), volume)
    (tmp_path / "garbage.nrrd").write_text("not an image")
    with pytest.raises(UserError, match="Cannot read"):
        ResultImporter.readPrediction(str(tmp_path / "garbage.nrrd"), volume)


def test_fill_on_real_chest_ct_keeps_four_annotated_slices(scene, chestData):
    """The self-test's scenario without the engine: keep 4 slices of the real segmentation, fill the rest."""
    ctPath, segPath = chestData
    volume = loadVolumeFile(scene, ctPath)
    node = loadSegmentationFile(scene, segPath)
    reader = AnnotationReader(scene)
    segmentation = node.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    full = reader.mergedLabelArray(node, volume, ids)
    keep = [8, 14, 20, 26]
    # Erase every other slice, as if the user had painted only four.
    for index, segmentId in enumerate(ids):
        mask = full == index + 1
        mask[[k for k in range(full.shape[0]) if k not in keep]] = False
        setSegmentFromArray(node, segmentId, mask, volume)
    assert reader.annotatedSlicesOf(node, volume) == keep
    painted = reader.mergedLabelArray(node, volume, ids)

    classes = [BundleClass(i + 1, segmentation.GetNthSegment(i).GetName()) for i in range(len(ids))]
    # A "prediction" that differs from the painting everywhere (shifted by 3 voxels).
    prediction = np.roll(full, 3, axis=2)
    ResultImporter(scene).fillUnannotatedSlices(node, volume, prediction, classes)

    result = reader.mergedLabelArray(node, volume, ids)
    np.testing.assert_array_equal(result[keep], painted[keep])
    others = [k for k in range(full.shape[0]) if k not in keep]
    np.testing.assert_array_equal(result[others], prediction[others])


def test_undo_is_refused_after_the_user_edited_the_result(scene, annotated):
    volume, node = annotated
    snapshot = SegmentationSnapshot(node)
    ResultImporter(scene).fillUnannotatedSlices(node, volume, _prediction(), CLASSES)
    snapshot.markResult()
    assert not snapshot.editedSinceResult()
    # The user corrects slice 0 of RV after the import...
    rvId = node.GetSegmentation().GetSegmentIdBySegmentName("RV")
    corrected = segmentArray(scene, node, rvId, volume)
    corrected[0] = False
    setSegmentFromArray(node, rvId, corrected, volume)
    assert snapshot.editedSinceResult()
    with pytest.raises(UserError, match="was edited after the result"):
        snapshot.restore()
    np.testing.assert_array_equal(segmentArray(scene, node, rvId, volume), corrected)  # their edit is kept
