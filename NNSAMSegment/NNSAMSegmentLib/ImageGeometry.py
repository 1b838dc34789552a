"""Volume nodes <-> images (numpy array + geometry) <-> files, with Slicer's and ITK's conventions made explicit.

- Arrays are indexed ``[k, j, i]`` (KJI), as ``slicer.util.arrayFromVolume`` returns them and as SimpleITK's
  ``GetArrayFromImage`` does; ``k`` is the slice index the engine's ``--slices`` uses.
- Slicer's world is RAS; ITK files (and SimpleITK) are LPS. The two differ by the sign of the first two axes.
- ``direction`` is 3x3 with the unit vectors of the I, J, K axes as columns (ITK's convention), in LPS.
- Only the volume's own IJK-to-RAS geometry is used: parent transforms are not applied (the engine's output is
  imported back into the same local frame).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .Errors import UserError

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])  # its own inverse


@dataclass
class VolumeImage:
    array: Optional[np.ndarray]  # [k, j, i]; None for a geometry-only description
    spacing: tuple  # (i, j, k) in mm
    origin: tuple  # LPS, mm: centre of voxel (0, 0, 0)
    direction: np.ndarray  # 3x3, columns = I, J, K axis directions in LPS

    def __post_init__(self):
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(o) for o in self.origin)
        self.direction = np.asarray(self.direction, dtype=float).reshape(3, 3)

    @property
    def shapeKJI(self) -> tuple:
        return tuple(self.array.shape) if self.array is not None else ()

    def ijkToLps(self) -> np.ndarray:
        matrix = np.eye(4)
        matrix[:3, :3] = self.direction @ np.diag(self.spacing)
        matrix[:3, 3] = self.origin
        return matrix

    def ijkToRas(self) -> np.ndarray:
        matrix = self.ijkToLps()
        matrix[:3, :] = LPS_FROM_RAS @ matrix[:3, :]
        return matrix

    def withArray(self, array: np.ndarray) -> "VolumeImage":
        return VolumeImage(array, self.spacing, self.origin, self.direction)

    def sameGeometry(self, other: "VolumeImage", tolerance: float = 1e-3) -> bool:
        """Same voxel grid: equal shapes and IJK-to-LPS matrices equal within ``tolerance`` (relative to spacing)."""
        if self.array is not None and other.array is not None and self.array.shape != other.array.shape:
            return False
        scale = max(min(self.spacing), 1e-6)
        return bool(np.allclose(self.ijkToLps(), other.ijkToLps(), rtol=0, atol=tolerance * scale))

    # ------------------------------------------------------------------------------------------- SimpleITK I/O
    def toSimpleITK(self):
        import SimpleITK as sitk

        array = self.array.astype(np.uint8) if self.array.dtype == bool else self.array
        image = sitk.GetImageFromArray(np.ascontiguousarray(array))
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(tuple(self.direction.flatten()))
        return image

    @classmethod
    def fromSimpleITK(cls, image) -> "VolumeImage":
        import SimpleITK as sitk

        if image.GetDimension() != 3:
            raise UserError(f"Expected a 3D image, got {image.GetDimension()}D.")
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise UserError("Expected a single-component image.")
        return cls(sitk.GetArrayFromImage(image), image.GetSpacing(), image.GetOrigin(),
                   np.array(image.GetDirection()).reshape(3, 3))

    def write(self, path: str, useCompression: bool = False) -> None:
        import SimpleITK as sitk

        sitk.WriteImage(self.toSimpleITK(), path, useCompression)

    @classmethod
    def read(cls, path: str) -> "VolumeImage":
        import SimpleITK as sitk

        try:
            image = sitk.ReadImage(path)
        except RuntimeError as error:
            raise UserError(f"Cannot read image {path}: {str(error).splitlines()[0] if str(error) else error}") \
                from error
        return cls.fromSimpleITK(image)


# --------------------------------------------------------------------------------------------------- VTK / MRML
def _numpySupport():
    from vtkmodules.util import numpy_support

    return numpy_support


def _matrixToNumpy(vtkMatrix) -> np.ndarray:
    return np.array([[vtkMatrix.GetElement(row, col) for col in range(4)] for row in range(4)])


def _numpyToMatrix(array: np.ndarray):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for col in range(4):
            matrix.SetElement(row, col, float(array[row, col]))
    return matrix


def arrayFromImageData(imageData) -> np.ndarray:
    """Copy of a ``vtkImageData``'s scalars as a ``[k, j, i]`` array."""
    if imageData is None or imageData.GetPointData() is None or imageData.GetPointData().GetScalars() is None:
        raise UserError("The volume has no voxel data; load the image again.")
    if imageData.GetNumberOfScalarComponents() != 1:
        raise UserError("The volume has several components per voxel (colour or vector); choose a grayscale volume.")
    dimensions = imageData.GetDimensions()
    scalars = _numpySupport().vtk_to_numpy(imageData.GetPointData().GetScalars())
    return scalars.reshape(dimensions[2], dimensions[1], dimensions[0]).copy()


def geometryFromVolumeNode(volumeNode, array: Optional[np.ndarray] = None) -> VolumeImage:
    import vtk

    directionsRas = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASDirectionMatrix(directionsRas)
    directionRas = _matrixToNumpy(directionsRas)[:3, :3]
    return VolumeImage(array, volumeNode.GetSpacing(), LPS_FROM_RAS @ np.array(volumeNode.GetOrigin()),
                       LPS_FROM_RAS @ directionRas)


def imageFromVolumeNode(volumeNode) -> VolumeImage:
    """Array (a copy) and LPS geometry of a scalar volume node."""
    if volumeNode is None:
        raise UserError("Select an input volume.")
    return geometryFromVolumeNode(volumeNode, arrayFromImageData(volumeNode.GetImageData()))


def vtkImageDataFromArray(array: np.ndarray, imageData=None):
    """A ``vtkImageData`` (deep copy) with the array's voxels; origin/spacing left at 0/1 as MRML expects."""
    import vtk

    numpySupport = _numpySupport()
    array = np.ascontiguousarray(array.astype(np.uint8) if array.dtype == bool else array)
    if imageData is None:
        imageData = vtk.vtkImageData()
    imageData.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    imageData.GetPointData().SetScalars(numpySupport.numpy_to_vtk(array.ravel(), deep=True))
    return imageData


def updateVolumeNodeFromImage(volumeNode, image: VolumeImage) -> None:
    """Make ``volumeNode`` hold ``image`` (voxels and geometry)."""
    volumeNode.SetAndObserveImageData(vtkImageDataFromArray(image.array))
    volumeNode.SetSpacing(*image.spacing)
    volumeNode.SetOrigin(*(LPS_FROM_RAS @ np.array(image.origin)))
    directions = np.eye(4)
    directions[:3, :3] = LPS_FROM_RAS @ image.direction
    volumeNode.SetIJKToRASDirectionMatrix(_numpyToMatrix(directions))


def orientedImageFromArray(array: np.ndarray, geometry: VolumeImage):
    """A ``vtkOrientedImageData`` with the array's voxels on the geometry's grid (for segmentation updates)."""
    import slicer

    orientedImage = slicer.vtkOrientedImageData()
    vtkImageDataFromArray(array, orientedImage)
    orientedImage.SetImageToWorldMatrix(_numpyToMatrix(geometry.ijkToRas()))
    return orientedImage
