"""Annotated-slice detection and the training label map, on synthetic and on real (slicerio chest CT) data."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from nnsam_slicer_helpers import addVolume, loadSegmentationFile, loadVolumeFile, rotationRas, setSegmentFromArray
from nnsam_slicer_helpers import chestData, scene  # noqa: F401 - pytest fixtures
from NNSAMSegmentLib.Annotations import AnnotationReader, annotatedSlices, compressRanges, describeSlices
from NNSAMSegmentLib.Errors import UserError
from NNSAMSegmentLib.Terminology import CardiacTerminology, ensureCardiacSegments


def test_annotated_slices_are_the_k_indices_with_any_label():
    labels = np.zeros((5, 3, 4), np.uint8)
    labels[1, 0, 0] = 2
    labels[3, 2, 3] = 1
    assert annotatedSlices(labels) == [1, 3]
    assert annotatedSlices(np.zeros((4, 2, 2))) == []
    with pytest.raises(ValueError):
        annotatedSlices(np.zeros((4, 4)))


@settings(max_examples=60, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 6), st.integers(1, 4), st.integers(1, 4)),
              elements=st.sampled_from([0, 0, 0, 1, 5])))
def test_annotated_slices_matches_a_slice_by_slice_check(labels):
    assert annotatedSlices(labels) == [k for k in range(labels.shape[0]) if labels[k].any()]


def test_slice_descriptions():
    assert compressRanges([40, 3, 10, 11, 12, 11]) == "3, 10-12, 40"
    assert describeSlices([3, 4, 9], 20) == "3 slices annotated (K index): 3-4, 9 of 0-19"
    assert describeSlices([7]) == "1 slice annotated (K index): 7"
    assert "No annotated slices" in describeSlices([])


def _annotatedScene(scene):
    volume = addVolume(scene, np.zeros((8, 6, 7), np.int16), directionRas=rotationRas(0.5, flipK=False))
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Annotations")
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    ids = ensureCardiacSegments(node.GetSegmentation(), CardiacTerminology())
    lv = np.zeros((8, 6, 7), bool)
    lv[2, 1:3, 1:4] = True
    lv[5, 0:2, 0:2] = True
    la = np.zeros((8, 6, 7), bool)
    la[5, 4:6, 5:7] = True
    setSegmentFromArray(node, ids[0], lv, volume)  # LV on slices 2 and 5
    setSegmentFromArray(node, ids[2], la, volume)  # LA on slice 5; RV, RA, Myo stay empty
    return volume, node, ids, lv, la


def test_training_labels_keep_painted_classes_in_segment_order(scene):
    volume, node, ids, lv, la = _annotatedScene(scene)
    training = AnnotationReader(scene).trainingLabels(node, volume)
    assert training.classNames == ["LV", "LA"]
    assert training.segmentIds == [ids[0], ids[2]]
    assert training.slices == [2, 5]
    expected = np.zeros(lv.shape, np.uint8)
    expected[lv] = 1
    expected[la] = 2
    np.testing.assert_array_equal(training.labels, expected)


def test_merged_label_values_follow_the_order_given(scene):
    volume, node, ids, lv, la = _annotatedScene(scene)
    merged = AnnotationReader(scene).mergedLabelArray(node, volume, [ids[2], ids[0]])
    assert set(np.unique(merged[lv])) == {2} and set(np.unique(merged[la])) == {1}


def test_reading_annotations_leaves_no_temporary_node(scene):
    volume, node, ids, lv, la = _annotatedScene(scene)
    before = scene.GetNumberOfNodes()
    AnnotationReader(scene).annotatedSlicesOf(node, volume)
    assert scene.GetNumberOfNodes() == before


def test_clear_messages_for_missing_or_empty_annotations(scene):
    volume = addVolume(scene, np.zeros((3, 4, 4), np.int16))
    reader = AnnotationReader(scene)
    with pytest.raises(UserError, match="Select the segmentation"):
        reader.trainingLabels(None, volume)
    empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Empty")
    with pytest.raises(UserError, match="has no segments"):
        reader.trainingLabels(empty, volume)
    ensureCardiacSegments(empty.GetSegmentation(), CardiacTerminology())
    with pytest.raises(UserError, match="Nothing is painted"):
        reader.trainingLabels(empty, volume)


def test_real_chest_ct_annotations_match_an_independent_reader(scene, chestData):
    """Slicer-read CT + segmentation vs. slicerio's own reading of the same .seg.nrrd (voxels and slices)."""
    import slicerio

    ctPath, segPath = chestData
    volume = loadVolumeFile(scene, ctPath)
    node = loadSegmentationFile(scene, segPath)
    reader = AnnotationReader(scene)
    reference = slicerio.read_segmentation(segPath)
    assert reference["referenceImageExtentOffset"] == [0, 0, 0]
    voxelsKJI = reference["voxels"].transpose(2, 1, 0)  # slicerio gives [i, j, k]
    labelValue = {segment["name"]: segment["labelValue"] for segment in reference["segments"]}

    # Voxel for voxel, one segment on the CT's grid.
    segmentId = node.GetSegmentation().GetSegmentIdBySegmentName("left lung")
    ours = reader.mergedLabelArray(node, volume, [segmentId]) > 0
    np.testing.assert_array_equal(ours, voxelsKJI == labelValue["left lung"])

    # Slices of two segments that cover different parts of the scan (neck and lumbar vertebrae).
    names = ["cervical vertebral column", "lumbar vertebral column"]
    slices = reader.annotatedSlicesOf(node, volume, names)
    mask = np.isin(voxelsKJI, [labelValue[name] for name in names])
    assert slices == [k for k in range(mask.shape[0]) if mask[k].any()]
    assert 0 < len(slices) < 34


def _countAddedNodes(scene):
    added = []
    scene.AddObserver(scene.NodeAddedEvent, lambda caller, event: added.append(event))
    return added


def test_counting_annotated_slices_adds_no_node_to_the_scene(scene):
    """The panel recounts after every paint stroke: that must not export labelmaps into the scene."""
    volume, node, ids, lv, la = _annotatedScene(scene)
    added = _countAddedNodes(scene)
    assert AnnotationReader(scene).annotatedSlicesOf(node, volume) == [2, 5]
    assert added == []


def _segmentationOnAnotherGrid(scene, shiftVoxels, spacing):
    """Segments stored on the grid of a larger volume whose voxel (0, 0, 0) lies ``shiftVoxels`` before the CT's."""
    direction = rotationRas(0.5, flipK=False)
    ctSpacing = np.array([0.7, 0.9, 2.5])
    ct = addVolume(scene, np.zeros((8, 6, 7), np.int16), spacing=tuple(ctSpacing), directionRas=direction)
    origin = np.array([10.0, -20.0, 30.0]) - direction @ (np.array(shiftVoxels) * ctSpacing)
    other = addVolume(scene, np.zeros((12, 10, 11), np.int16), spacing=spacing, originRas=tuple(origin),
                      directionRas=direction, name="other")
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Annotations")
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(other)
    ids = ensureCardiacSegments(node.GetSegmentation(), CardiacTerminology())
    first, second = np.zeros((12, 10, 11), bool), np.zeros((12, 10, 11), bool)
    first[1, 4, 4] = True  # CT slice 1 - 2 = -1: outside the CT
    first[5, 3:5, 3:5] = True  # CT slice 3
    second[6, 0, 0] = True  # outside the CT in I and J: not an annotation of the CT
    second[9, 4:6, 5] = True  # CT slice 7
    setSegmentFromArray(node, ids[0], first, other)
    setSegmentFromArray(node, ids[1], second, other)
    return ct, node, ids


@pytest.mark.parametrize("spacing, fast", [((0.7, 0.9, 2.5), True), ((0.35, 0.9, 2.5), False)])
def test_counting_on_the_segments_grid_matches_the_export(scene, spacing, fast):
    from NNSAMSegmentLib.Annotations import annotatedSlicesOnSameGrid

    ct, node, ids = _segmentationOnAnotherGrid(scene, shiftVoxels=(2, 2, 2), spacing=spacing)
    reader = AnnotationReader(scene)
    exported = annotatedSlices(reader.mergedLabelArray(node, ct, ids))
    direct = annotatedSlicesOnSameGrid(node, ct, ids)
    assert (direct is not None) == fast
    if fast:
        assert direct == exported == [3, 7]
    assert reader.annotatedSlicesOf(node, ct) == exported
