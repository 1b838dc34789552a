"""Volume node <-> image <-> file: RAS/LPS and KJI conventions, against Slicer's writer and SimpleITK's reader."""

import numpy as np
import pytest
import SimpleITK as sitk

from nnsam_slicer_helpers import addVolume, loadVolumeFile, rotationRas
from nnsam_slicer_helpers import scene  # noqa: F401 - pytest fixtures
from NNSAMSegmentLib.Errors import UserError
from NNSAMSegmentLib.ImageGeometry import (LPS_FROM_RAS, VolumeImage, geometryFromVolumeNode, imageFromVolumeNode,
                                           updateVolumeNodeFromImage)

SPACING = (0.7, 0.9, 2.5)
ORIGIN_RAS = (10.0, -20.0, 30.0)


def _distinctArray(shape=(4, 5, 6)) -> np.ndarray:
    # Every voxel different, so any axis swap or flip changes the array.
    return np.arange(np.prod(shape), dtype=np.int16).reshape(shape)


def _writeWithSlicer(scene, node, path) -> None:
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    storage.SetUseCompression(0)
    assert storage.WriteData(node)


def test_volume_node_to_image_matches_simpleitk_reading_slicers_file(scene, tmp_path):
    direction = rotationRas()
    array = _distinctArray()
    volume = addVolume(scene, array, SPACING, ORIGIN_RAS, direction)
    _writeWithSlicer(scene, volume, tmp_path / "slicer.nrrd")
    reference = sitk.ReadImage(str(tmp_path / "slicer.nrrd"))

    image = imageFromVolumeNode(volume)

    np.testing.assert_array_equal(image.array, sitk.GetArrayFromImage(reference))
    np.testing.assert_allclose(image.spacing, reference.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(image.origin, reference.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(image.direction.flatten(), reference.GetDirection(), atol=1e-9)
    # LPS really is RAS with the first two axes negated.
    np.testing.assert_allclose(image.origin, [-10.0, 20.0, 30.0], atol=1e-9)
    np.testing.assert_allclose(image.direction, LPS_FROM_RAS @ direction, atol=1e-12)


def test_kji_indexing_points_at_the_same_physical_voxel(scene):
    volume = addVolume(scene, _distinctArray(), SPACING, ORIGIN_RAS, rotationRas())
    image = imageFromVolumeNode(volume)
    k, j, i = 3, 1, 4
    # Slicer: RAS of voxel (i, j, k) through the node's own IJK-to-RAS matrix.
    import vtk

    ijkToRas = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(ijkToRas)
    ras = ijkToRas.MultiplyPoint((i, j, k, 1))[:3]
    # ITK: physical (LPS) point of index (i, j, k) of the image we would write.
    lps = image.toSimpleITK().TransformIndexToPhysicalPoint((i, j, k))
    np.testing.assert_allclose(LPS_FROM_RAS @ np.array(ras), lps, atol=1e-9)
    assert image.array[k, j, i] == _distinctArray()[k, j, i]


def test_image_written_by_us_is_read_back_by_slicer_identically(scene, tmp_path):
    # Right-handed axes: Slicer's reader flips the K axis of left-handed files (same voxels in space, other order).
    direction = rotationRas(-0.7, flipK=False)
    volume = addVolume(scene, _distinctArray((3, 7, 2)), (1.5, 0.3, 4.0), (-5.0, 2.0, 1.0), direction)
    imageFromVolumeNode(volume).write(str(tmp_path / "ours.nrrd"))

    reread = loadVolumeFile(scene, tmp_path / "ours.nrrd", "reread")

    import vtk

    expected, actual = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(expected)
    reread.GetIJKToRASMatrix(actual)
    np.testing.assert_allclose([actual.GetElement(r, c) for r in range(4) for c in range(4)],
                               [expected.GetElement(r, c) for r in range(4) for c in range(4)], atol=1e-6)
    np.testing.assert_array_equal(imageFromVolumeNode(reread).array, _distinctArray((3, 7, 2)))


def test_update_volume_node_round_trip_and_same_geometry(scene):
    image = VolumeImage(_distinctArray().astype(np.float32), SPACING, (1.0, 2.0, 3.0),
                        LPS_FROM_RAS @ rotationRas())
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    updateVolumeNodeFromImage(node, image)
    back = imageFromVolumeNode(node)
    np.testing.assert_array_equal(back.array, image.array)
    assert back.sameGeometry(image)
    shifted = VolumeImage(image.array, image.spacing, (1.0, 2.0, 3.5), image.direction)
    assert not back.sameGeometry(shifted)
    assert not geometryFromVolumeNode(node).withArray(np.zeros((4, 5, 7))).sameGeometry(back)


def test_colour_volume_is_refused_with_a_clear_message(scene):
    import vtk

    node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "photo")
    imageData = vtk.vtkImageData()
    imageData.SetDimensions(4, 4, 2)
    imageData.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    node.SetAndObserveImageData(imageData)
    with pytest.raises(UserError, match="grayscale"):
        imageFromVolumeNode(node)


def test_missing_volume_message():
    with pytest.raises(UserError, match="Select an input volume"):
        imageFromVolumeNode(None)


def test_left_handed_file_read_by_slicer_puts_every_voxel_at_the_same_place(scene, tmp_path):
    import vtk

    array = _distinctArray((3, 4, 5))
    volume = addVolume(scene, array, SPACING, ORIGIN_RAS, rotationRas(0.4, flipK=True))
    imageFromVolumeNode(volume).write(str(tmp_path / "left.nrrd"))
    reread = loadVolumeFile(scene, tmp_path / "left.nrrd", "reread")
    rereadArray = imageFromVolumeNode(reread).array
    writtenIjkToRas, rereadRasToIjk = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(writtenIjkToRas)
    reread.GetRASToIJKMatrix(rereadRasToIjk)
    for k, j, i in [(0, 0, 0), (2, 3, 4), (1, 2, 0)]:
        ras = writtenIjkToRas.MultiplyPoint((i, j, k, 1))
        ii, jj, kk = (int(round(v)) for v in rereadRasToIjk.MultiplyPoint(ras)[:3])
        assert rereadArray[kk, jj, ii] == array[k, j, i]
