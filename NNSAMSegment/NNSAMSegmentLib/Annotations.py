"""Which slices the user annotated, and the label map the engine trains on.

A slice (index k of the input volume's ``[k, j, i]`` array, i.e. the volume's third axis) counts as annotated when
any class segment has a voxel in it; on an annotated slice every unpainted voxel is background. The engine gets
the same slice list through ``--slices``.

The panel recounts the annotated slices after every paint stroke, so :meth:`AnnotationReader.annotatedSlicesOf`
reads the segments' own binary labelmaps when their voxel grid lines up with the volume's (the usual case: the
segmentation was made on this volume); only otherwise does it export them onto the volume's grid, which adds and
removes a label map, a display node and a colour table in the scene.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .Errors import UserError
from .ImageGeometry import arrayFromImageData


def annotatedSlices(labelArray: np.ndarray) -> list[int]:
    """Indices k of the ``[k, j, i]`` array whose slice holds any nonzero voxel."""
    array = np.asarray(labelArray)
    if array.ndim != 3:
        raise ValueError(f"expected a 3D [k, j, i] array, got shape {array.shape}")
    if array.size == 0:
        return []
    return [int(k) for k in np.flatnonzero(array.reshape(array.shape[0], -1).any(axis=1))]


def compressRanges(slices: Sequence[int]) -> str:
    """'3, 10-12, 40' for [3, 10, 11, 12, 40]."""
    values = sorted(set(int(k) for k in slices))
    parts = []
    index = 0
    while index < len(values):
        end = index
        while end + 1 < len(values) and values[end + 1] == values[end] + 1:
            end += 1
        parts.append(str(values[index]) if end == index else f"{values[index]}-{values[end]}")
        index = end + 1
    return ", ".join(parts)


def describeSlices(slices: Sequence[int], sliceCount: Optional[int] = None) -> str:
    """The panel's 'annotated slices' line."""
    if not slices:
        return "No annotated slices yet: paint the structures on a few slices."
    count = len(set(slices))
    text = f"{count} slice{'s' if count != 1 else ''} annotated (K index): {compressRanges(slices)}"
    if sliceCount:
        text += f" of 0-{sliceCount - 1}"
    return text


@dataclass
class TrainingLabels:
    labels: np.ndarray  # [k, j, i], value i = i-th class (1-based), 0 = background / not annotated
    classNames: list
    segmentIds: list
    slices: list


class AnnotationReader:
    """Reads a segmentation node's segments on the voxel grid of a volume node (the engine's input grid)."""

    def __init__(self, scene):
        self.scene = scene

    def mergedLabelArray(self, segmentationNode, volumeNode, segmentIds: Sequence[str]) -> np.ndarray:
        """``[k, j, i]`` array on the volume's grid; value n+1 where segment ``segmentIds[n]`` is (later wins)."""
        import slicer
        import vtk

        if not segmentIds:
            dimensions = volumeNode.GetImageData().GetDimensions()
            return np.zeros((dimensions[2], dimensions[1], dimensions[0]), np.uint8)
        ids = vtk.vtkStringArray()
        for segmentId in segmentIds:
            ids.InsertNextValue(segmentId)
        labelmapNode = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__nnsam_temp_annotations__")
        try:
            # Reference geometry = the volume, full extent: the result lines up voxel for voxel with the input
            # image (transforms between segmentation and volume are handled by Slicer here).
            if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                    segmentationNode, ids, labelmapNode, volumeNode, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY):
                raise UserError("Could not read the annotations on the volume's grid.")
            array = arrayFromImageData(labelmapNode.GetImageData())
        finally:
            self._removeWithDisplay(labelmapNode)
        return array

    def _removeWithDisplay(self, node) -> None:
        displayNode = node.GetDisplayNode()
        colorNode = displayNode.GetColorNode() if displayNode is not None else None
        self.scene.RemoveNode(node)
        if displayNode is not None:
            self.scene.RemoveNode(displayNode)
        # Export may create a colour table just for this node; built-in tables are singletons and stay.
        if colorNode is not None and not colorNode.GetSingletonTag():
            self.scene.RemoveNode(colorNode)

    @staticmethod
    def segmentIdsAndNames(segmentationNode, names: Optional[Sequence[str]] = None) -> list[tuple]:
        """(id, name) of the segments, in the segmentation's order, optionally only those called ``names``."""
        segmentation = segmentationNode.GetSegmentation()
        pairs = []
        for index in range(segmentation.GetNumberOfSegments()):
            segmentId = segmentation.GetNthSegmentID(index)
            name = segmentation.GetSegment(segmentId).GetName()
            if names is None or name in names:
                pairs.append((segmentId, name))
        return pairs

    def annotatedSlicesOf(self, segmentationNode, volumeNode, names: Optional[Sequence[str]] = None) -> list[int]:
        segmentIds = [s for s, _ in self.segmentIdsAndNames(segmentationNode, names)]
        slices = annotatedSlicesOnSameGrid(segmentationNode, volumeNode, segmentIds)
        if slices is not None:
            return slices
        return annotatedSlices(self.mergedLabelArray(segmentationNode, volumeNode, segmentIds))

    def trainingLabels(self, segmentationNode, volumeNode, names: Optional[Sequence[str]] = None) -> TrainingLabels:
        """The classes the user painted (segments with voxels, in segmentation order) and the training label map."""
        if segmentationNode is None:
            raise UserError("Select the segmentation that holds your annotations.")
        if volumeNode is None:
            raise UserError("Select an input volume.")
        segments = self.segmentIdsAndNames(segmentationNode, names)
        if not segments:
            raise UserError(f"The segmentation '{segmentationNode.GetName()}' has no segments; add LV, RV, LA, RA, "
                            "Myo (or your own) and paint them on a few slices.")
        merged = self.mergedLabelArray(segmentationNode, volumeNode, [s for s, _ in segments])
        present = [value for value in range(1, len(segments) + 1) if np.any(merged == value)]
        if not present:
            raise UserError(f"Nothing is painted in '{segmentationNode.GetName()}' yet: paint the structures on a "
                            "few slices of the input volume.")
        # Renumber so the painted classes are 1..N in segment order (unpainted segments are not classes).
        lookup = np.zeros(len(segments) + 1, np.uint8 if len(present) < 256 else np.uint16)
        for newValue, oldValue in enumerate(present, start=1):
            lookup[oldValue] = newValue
        labels = lookup[merged]
        chosen = [segments[value - 1] for value in present]
        return TrainingLabels(labels=labels, classNames=[name for _, name in chosen],
                              segmentIds=[segmentId for segmentId, _ in chosen], slices=annotatedSlices(labels))


def _voxelShift(labelmap, rasToIjk: np.ndarray) -> Optional[np.ndarray]:
    """The whole-voxel (i, j, k) shift from the labelmap's grid to the volume's, or None if the grids differ."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(matrix)
    imageToWorld = np.array([[matrix.GetElement(row, col) for col in range(4)] for row in range(4)])
    toVolume = rasToIjk @ imageToWorld
    shift = toVolume[:3, 3]
    if not np.allclose(toVolume[:3, :3], np.eye(3), atol=1e-4) or not np.allclose(shift, np.round(shift), atol=1e-4):
        return None
    return np.round(shift).astype(int)


def annotatedSlicesOnSameGrid(segmentationNode, volumeNode, segmentIds: Sequence[str]) -> Optional[list[int]]:
    """Annotated slices (volume K indices) read from the segments' own binary labelmaps, touching no scene.

    None when that is not exact: the segments are not stored as binary labelmaps, the segmentation and the volume
    are under different transforms, or a labelmap's voxel grid is not the volume's shifted by whole voxels.
    """
    import vtk

    from .ImageGeometry import arrayFromImageData

    if segmentationNode is None or volumeNode is None or volumeNode.GetImageData() is None:
        return None
    if segmentationNode.GetTransformNodeID() != volumeNode.GetTransformNodeID():
        return None
    segmentation = segmentationNode.GetSegmentation()
    binary = "Binary labelmap"
    sourceName = getattr(segmentation, "GetSourceRepresentationName", None) or segmentation.GetMasterRepresentationName
    if sourceName() != binary:
        return None
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetRASToIJKMatrix(matrix)
    rasToIjk = np.array([[matrix.GetElement(row, col) for col in range(4)] for row in range(4)])
    dimensions = volumeNode.GetImageData().GetDimensions()
    annotated = np.zeros(dimensions[2], bool)
    layers = {}  # a layer shared by several segments is read once
    for segmentId in segmentIds:
        segment = segmentation.GetSegment(segmentId)
        labelmap = segment.GetRepresentation(binary) if segment is not None else None
        if labelmap is None:
            continue
        extent = labelmap.GetExtent()
        if extent[0] > extent[1] or extent[2] > extent[3] or extent[4] > extent[5]:
            continue  # empty
        shift = _voxelShift(labelmap, rasToIjk)
        if shift is None:
            return None
        key = id(labelmap)
        if key not in layers:
            layers[key] = arrayFromImageData(labelmap)
        # Volume index of local voxel (0, 0, 0), then the part of the labelmap that lies inside the volume.
        start = np.array([extent[0], extent[2], extent[4]]) + shift
        low = np.maximum(-start, 0)
        high = np.minimum(np.array(dimensions) - start, np.array(layers[key].shape[::-1]))
        if np.any(high <= low):
            continue
        inside = layers[key][low[2]:high[2], low[1]:high[1], low[0]:high[0]] == segment.GetLabelValue()
        hits = np.flatnonzero(inside.reshape(inside.shape[0], -1).any(axis=1))
        annotated[hits + low[2] + start[2]] = True
    return [int(k) for k in np.flatnonzero(annotated)]
