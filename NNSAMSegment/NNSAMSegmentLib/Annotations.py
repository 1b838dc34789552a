"""Which slices the user annotated, and the label map the engine trains on.

A slice (index k of the input volume's ``[k, j, i]`` array, i.e. the volume's third axis) counts as annotated when
any class segment has a voxel in it; on an annotated slice every unpainted voxel is background. The engine gets
the same slice list through ``--slices``.
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
        segments = self.segmentIdsAndNames(segmentationNode, names)
        return annotatedSlices(self.mergedLabelArray(segmentationNode, volumeNode, [s for s, _ in segments]))

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
