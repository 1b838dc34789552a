"""Bringing the engine's predicted label map into Slicer without losing anything the user made.

Two targets:

- the annotation segmentation itself: only slices nobody annotated (no voxel of any segment) are filled. The
  prediction is masked to those slices and OR-ed into each class segment (``MODE_MERGE_MAX``); since those slices
  hold no voxel, that writes exactly the prediction there, and annotated slices stay bit for bit as they were.
  Other segments of the same layer are never overwritten (an empty "segments to overwrite" list).
- a new segmentation node next to the volume (same parent transform, same folder in the Data module).

:class:`SegmentationSnapshot` gives the panel an undo for the first target; the Segment Editor effect uses the
editor's own ``saveStateForUndo`` instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from .Annotations import AnnotationReader
from .Errors import UserError
from .ImageGeometry import VolumeImage, geometryFromVolumeNode, orientedImageFromArray
from .Terminology import CardiacTerminology, ensureSegment


@dataclass
class ImportSummary:
    segmentationNode: object
    classVoxels: dict = field(default_factory=dict)  # class name -> voxels written
    filledSlices: list = field(default_factory=list)
    keptSlices: list = field(default_factory=list)  # annotated slices left untouched

    def describe(self) -> str:
        painted = [name for name, count in self.classVoxels.items() if count]
        empty = [name for name, count in self.classVoxels.items() if not count]
        text = f"Result in '{self.segmentationNode.GetName()}'"
        if self.keptSlices:
            text += f"; {len(self.keptSlices)} annotated slice(s) kept as painted"
        text += f"; found: {', '.join(painted) if painted else 'nothing'}"
        if empty:
            text += f"; not found: {', '.join(empty)}"
        return text + "."


def segmentationFingerprint(segmentationNode) -> str:
    """A digest of a segmentation's segments (ids, names, label values, layers) and stored voxels."""
    import hashlib

    from vtkmodules.util import numpy_support

    segmentation = segmentationNode.GetSegmentation()
    digest = hashlib.sha1()
    for index in range(segmentation.GetNumberOfSegments()):
        segmentId = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segmentId)
        digest.update(f"{segmentId}|{segment.GetName()}|{segment.GetLabelValue()}|"
                      f"{segmentation.GetLayerIndex(segmentId)};".encode())
    for layer in range(segmentation.GetNumberOfLayers()):
        labelmap = segmentation.GetLayerDataObject(layer)
        if labelmap is None:
            continue
        digest.update(str(labelmap.GetExtent()).encode())
        scalars = labelmap.GetPointData().GetScalars()
        if scalars is not None:
            digest.update(numpy_support.vtk_to_numpy(scalars).tobytes())
    return digest.hexdigest()


class SegmentationSnapshot:
    """A deep copy of a segmentation, to undo a result import from the panel.

    Undo is refused once the user has edited the segmentation after the import (``markResult`` records the state
    right after it): restoring then would silently throw their edits away.
    """

    def __init__(self, segmentationNode):
        import slicer

        self.segmentationNode = segmentationNode
        self._copy = slicer.vtkSegmentation()
        self._copy.DeepCopy(segmentationNode.GetSegmentation())
        self._resultFingerprint = None

    def markResult(self) -> None:
        self._resultFingerprint = segmentationFingerprint(self.segmentationNode)

    def editedSinceResult(self) -> bool:
        return self._resultFingerprint is not None and \
            segmentationFingerprint(self.segmentationNode) != self._resultFingerprint

    def restore(self) -> None:
        if self.editedSinceResult():
            raise UserError(f"'{self.segmentationNode.GetName()}' was edited after the result was added; undoing "
                            "now would lose those edits. Use the Segment Editor's Undo or erase by hand.")
        self.segmentationNode.GetSegmentation().DeepCopy(self._copy)
        self.segmentationNode.Modified()


def _checkSameFrame(segmentationNode, volumeNode) -> None:
    if segmentationNode.GetTransformNodeID() != volumeNode.GetTransformNodeID():
        raise UserError(f"'{segmentationNode.GetName()}' and '{volumeNode.GetName()}' are under different "
                        "transforms; put them under the same transform (or harden it) first.")


def _matrixOf(orientedImage) -> np.ndarray:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    orientedImage.GetImageToWorldMatrix(matrix)
    return np.array([[matrix.GetElement(row, col) for col in range(4)] for row in range(4)])


def _classPairs(classes: Sequence) -> list[tuple]:
    """(value, name) pairs from bundle classes (``.value``/``.name``) or from (value, name) tuples."""
    pairs = []
    for c in classes:
        value, name = (c.value, c.name) if hasattr(c, "value") else c
        pairs.append((int(value), str(name)))
    return pairs


class ResultImporter:
    def __init__(self, scene, terminology: Optional[CardiacTerminology] = None):
        self.scene = scene
        self.terminology = terminology
        self.annotationReader = AnnotationReader(scene)

    # ------------------------------------------------------------------------------------------------ reading
    @staticmethod
    def readPrediction(path: str, volumeNode) -> np.ndarray:
        """The predicted ``[k, j, i]`` label array, checked to lie on the volume's voxel grid."""
        prediction = VolumeImage.read(path)
        expected = geometryFromVolumeNode(volumeNode)
        dimensions = volumeNode.GetImageData().GetDimensions()
        if prediction.array.shape != (dimensions[2], dimensions[1], dimensions[0]):
            raise UserError(f"The result has {prediction.array.shape[::-1]} voxels but the volume has "
                            f"{tuple(dimensions)}; it belongs to another image.")
        if not expected.withArray(prediction.array).sameGeometry(prediction):
            raise UserError("The result does not lie on the volume's voxel grid (different origin, spacing or "
                            "axes); it belongs to another image.")
        if prediction.array.min() < 0:
            raise UserError("The result holds negative labels; it is not a label map.")
        return prediction.array

    # ------------------------------------------------------------------------------------------------ writing
    @staticmethod
    def _setSegmentVoxels(segmentationNode, segmentId: str, mask: np.ndarray, geometry: VolumeImage,
                          merge: bool) -> None:
        import slicer

        logic = slicer.vtkSlicerSegmentationsModuleLogic
        # The modifier carries the segment's own label value: with MODE_MERGE_MAX Slicer takes the voxel-wise
        # maximum with the (possibly shared) layer, which is only right when the written value is that label.
        labelValue = segmentationNode.GetSegmentation().GetSegment(segmentId).GetLabelValue()
        modifier = mask.astype(np.uint8 if labelValue < 256 else np.uint16) * labelValue
        orientedImage = orientedImageFromArray(modifier, geometry)
        mode = logic.MODE_MERGE_MAX if merge else logic.MODE_REPLACE
        # Empty "segments to overwrite": voxels of other segments sharing the layer are never taken over.
        if not logic.SetBinaryLabelmapToSegment(orientedImage, segmentationNode, segmentId, mode, None, False, []):
            raise UserError(f"Could not write segment '{segmentId}' into '{segmentationNode.GetName()}'.")

    @staticmethod
    def _checkSameGrid(segmentationNode, geometry: VolumeImage, volumeName: str) -> None:
        """Refuse to fill a segmentation stored on another voxel grid: writing would resample the annotations."""
        segmentation = segmentationNode.GetSegmentation()
        expected = geometry.ijkToRas()
        for layer in range(segmentation.GetNumberOfLayers()):
            labelmap = segmentation.GetLayerDataObject(layer)
            if labelmap is None:
                continue
            extent = labelmap.GetExtent()
            if extent[0] > extent[1] or extent[2] > extent[3] or extent[4] > extent[5]:
                continue  # empty layer: nothing to resample
            matrix = _matrixOf(labelmap)
            scale = max(min(geometry.spacing), 1e-6)
            if not np.allclose(matrix, expected, rtol=0, atol=1e-3 * scale):
                raise UserError(f"'{segmentationNode.GetName()}' uses a different voxel grid from '{volumeName}'; "
                                "filling it would resample your annotations. Send the result to a new segmentation "
                                "instead.")

    def fillUnannotatedSlices(self, segmentationNode, volumeNode, prediction: np.ndarray,
                              classes: Sequence, writeSegment=None) -> ImportSummary:
        """Write the prediction into the slices of ``segmentationNode`` that hold no class voxel yet.

        ``classes`` are (value, name) pairs, e.g. a bundle's classes; segments are matched by name and created
        (with the standard terminology for cardiac names) when missing. ``writeSegment(segmentationNode,
        segmentId, mask, geometry)`` writes one class (default: OR-ed into the segment, other segments untouched);
        the Segment Editor effect passes one that applies the editor's masking and overwrite settings.
        """
        if segmentationNode is None:
            raise UserError("Select the segmentation to fill.")
        _checkSameFrame(segmentationNode, volumeNode)
        classes = _classPairs(classes)
        # Any painted segment makes a slice the user's (as in training); decided now, not when training began,
        # because the user may have painted more slices meanwhile.
        keptSlices = self.annotationReader.annotatedSlicesOf(segmentationNode, volumeNode)
        if not segmentationNode.GetNodeReference(segmentationNode.GetReferenceImageGeometryReferenceRole()) and \
                segmentationNode.GetSegmentation().GetNumberOfSegments() == 0:
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        geometry = geometryFromVolumeNode(volumeNode)
        self._checkSameGrid(segmentationNode, geometry, volumeNode.GetName())
        unannotated = np.ones(prediction.shape[0], dtype=bool)
        unannotated[keptSlices] = False

        summary = ImportSummary(segmentationNode, keptSlices=keptSlices,
                                filledSlices=[int(k) for k in np.flatnonzero(unannotated)])
        segmentation = segmentationNode.GetSegmentation()
        wasModifying = segmentationNode.StartModify()
        try:
            for value, name in classes:
                segmentId = ensureSegment(segmentation, name, self.terminology)
                mask = (prediction == value) & unannotated[:, None, None]
                summary.classVoxels[name] = int(mask.sum())
                if not summary.classVoxels[name]:
                    continue
                if writeSegment is None:
                    self._setSegmentVoxels(segmentationNode, segmentId, mask, geometry, merge=True)
                else:
                    writeSegment(segmentationNode, segmentId, mask, geometry)
        finally:
            segmentationNode.EndModify(wasModifying)
        return summary

    def createSegmentationNode(self, volumeNode, prediction: np.ndarray, classes: Sequence,
                               name: Optional[str] = None) -> ImportSummary:
        """A new segmentation node holding the whole prediction, placed next to the volume."""
        segmentationNode = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                        name or f"{volumeNode.GetName()} nnSAM")
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        segmentationNode.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
        self._placeNextTo(segmentationNode, volumeNode)
        geometry = geometryFromVolumeNode(volumeNode)
        summary = ImportSummary(segmentationNode, filledSlices=list(range(prediction.shape[0])))
        for value, className in _classPairs(classes):
            segmentId = ensureSegment(segmentationNode.GetSegmentation(), className, self.terminology)
            mask = prediction == value
            summary.classVoxels[className] = int(mask.sum())
            if summary.classVoxels[className]:
                self._setSegmentVoxels(segmentationNode, segmentId, mask, geometry, merge=False)
        return summary

    def _placeNextTo(self, node, referenceNode) -> None:
        """Same parent folder/study as ``referenceNode`` in the subject hierarchy, when there is one."""
        import slicer

        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene)
        if shNode is None:
            return
        referenceItem = shNode.GetItemByDataNode(referenceNode)
        if not referenceItem:
            return
        parentItem = shNode.GetItemParent(referenceItem)
        item = shNode.GetItemByDataNode(node)
        if item:
            shNode.SetItemParent(item, parentItem)
        else:  # Slicer's GUI creates items on node addition; bare MRML (scripts, tests) does not
            shNode.CreateItem(parentItem, node)
