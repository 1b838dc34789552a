"""Fixtures and helpers for the Slicer extension's tests: real MRML (``slicer-core``), no Qt, no Slicer application.

A uniquely named module instead of a conftest.py: the engine's tests import names from their own ``conftest``
module, and a second module of that name here would shadow it. Test modules import the fixtures they use.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPOSITORY = Path(__file__).resolve().parents[2]
MODULE_DIRECTORY = REPOSITORY / "NNSAMSegment"
EFFECT_DIRECTORY = REPOSITORY / "SegmentEditorNNSAM"
if str(MODULE_DIRECTORY) not in sys.path:
    sys.path.insert(0, str(MODULE_DIRECTORY))


@pytest.fixture
def scene():
    """A scene with the module logics Slicer registers at startup that these tests need.

    Setting the scene on the Segmentations logic registers the segmentation node classes and the representation
    conversion rules (binary labelmap <-> closed surface), as Slicer does at startup.
    """
    import slicer

    mrmlScene = slicer.vtkMRMLScene()
    logics = [slicer.vtkSlicerSegmentationsModuleLogic(), slicer.vtkSlicerSubjectHierarchyModuleLogic()]
    for logic in logics:
        logic.SetMRMLScene(mrmlScene)
    yield mrmlScene
    for logic in logics:
        logic.SetMRMLScene(None)
    mrmlScene.Clear(1)


@pytest.fixture
def chestData():
    """slicerio's small real chest CT (128x128x34) and its segmentation file."""
    import slicerio

    return slicerio.get_testdata_file("CTChest4.nrrd"), slicerio.get_testdata_file("Segmentation.seg.nrrd")


def rotationRas(angleRadians: float = 0.3, flipK: bool = True) -> np.ndarray:
    """A direction matrix (columns = I, J, K axes in RAS): oblique, and left-handed (K flipped) by default."""
    c, s = math.cos(angleRadians), math.sin(angleRadians)
    flip = -1.0 if flipK else 1.0
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, flip]]) @ np.array(
        [[1, 0, 0], [0, math.cos(0.2), -math.sin(0.2)], [0, math.sin(0.2), math.cos(0.2)]])


def addVolume(scene, array: np.ndarray, spacing=(0.7, 0.9, 2.5), originRas=(10.0, -20.0, 30.0), directionRas=None,
              name: str = "CT", labelmap: bool = False):
    """A volume node built with MRML's own setters (not with the code under test)."""
    import slicer
    import vtk
    from vtkmodules.util import numpy_support

    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode", name)
    imageData = vtk.vtkImageData()
    imageData.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    imageData.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True))
    node.SetAndObserveImageData(imageData)
    node.SetSpacing(*spacing)
    node.SetOrigin(*originRas)
    directions = vtk.vtkMatrix4x4()
    direction = np.eye(3) if directionRas is None else directionRas
    for row in range(3):
        for col in range(3):
            directions.SetElement(row, col, float(direction[row, col]))
    node.SetIJKToRASDirectionMatrix(directions)
    assert isinstance(node, slicer.vtkMRMLScalarVolumeNode)
    return node


def setSegmentFromArray(segmentationNode, segmentId: str, mask: np.ndarray, volumeNode) -> None:
    """Paint a segment from a [k, j, i] mask on the volume's grid (like a user painting in Segment Editor)."""
    import slicer
    from NNSAMSegmentLib.ImageGeometry import geometryFromVolumeNode, orientedImageFromArray

    labelValue = segmentationNode.GetSegmentation().GetSegment(segmentId).GetLabelValue()
    image = orientedImageFromArray(mask.astype(np.uint8) * labelValue, geometryFromVolumeNode(volumeNode))
    ok = slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        image, segmentationNode, segmentId, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE, None, False, [])
    assert ok


def segmentArray(scene, segmentationNode, segmentId: str, volumeNode) -> np.ndarray:
    """One segment's voxels on the volume grid, read back through Slicer's export."""
    from NNSAMSegmentLib.Annotations import AnnotationReader

    return AnnotationReader(scene).mergedLabelArray(segmentationNode, volumeNode, [segmentId]) > 0


def internalLabelmaps(segmentationNode) -> dict:
    """Each segment's own stored voxels (internal representation, no resampling): name -> (matrix, extent, array)."""
    import vtk
    from vtkmodules.util import numpy_support

    result = {}
    segmentation = segmentationNode.GetSegmentation()
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        labelmap = segment.GetRepresentation("Binary labelmap")
        matrix = vtk.vtkMatrix4x4()
        labelmap.GetImageToWorldMatrix(matrix)
        extent = tuple(labelmap.GetExtent())
        if extent[0] > extent[1]:
            array = np.zeros((0, 0, 0), np.uint8)
        else:
            dims = labelmap.GetDimensions()
            array = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(dims[::-1]).copy()
            array = array == segment.GetLabelValue()
        result[segment.GetName()] = (tuple(matrix.GetElement(r, c) for r in range(4) for c in range(4)), extent,
                                     array)
    return result


def loadVolumeFile(scene, path: str, name: str = "CT"):
    import slicer

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(os.fspath(path))
    assert storage.ReadData(node)
    node.SetAndObserveStorageNodeID(storage.GetID())
    assert isinstance(node, slicer.vtkMRMLScalarVolumeNode)
    return node


def loadSegmentationFile(scene, path: str, name: str = "Segmentation"):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(os.fspath(path))
    assert storage.ReadData(node)
    node.CreateDefaultDisplayNodes()
    return node


def writeSegmentationFile(scene, node, path: str) -> None:
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(os.fspath(path))
    assert storage.WriteData(node)
