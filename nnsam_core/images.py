"""Reading and checking the user's images and label maps (SimpleITK), with one-line errors for bad input.

Slices are always along the image's third index axis (SimpleITK's k, numpy axis 0 of ``GetArrayFromImage``;
the axial direction of an axial CT, and Slicer's K in KJI arrays).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk

from .errors import NNSAMError
from .filecheck import check_complete

MIN_SIDE = 16
GEOMETRY_TOLERANCE = 1e-4


@dataclass
class Labels:
    """A label map on the image grid plus the names of its classes (value i+1 is names[i])."""

    image: sitk.Image
    class_names: list[str]


def read_image(path: os.PathLike, what: str = "image") -> sitk.Image:
    """Any file SimpleITK reads, or a folder holding one DICOM series."""
    path = Path(path)
    if not path.exists():
        raise NNSAMError(f"{what} {path} does not exist; check the path")
    if not os.access(path, os.R_OK) or (path.is_dir() and not os.access(path, os.X_OK)):
        raise NNSAMError(f"cannot read {what} {path} (permission denied); check its permissions")
    if path.is_file():
        check_complete(path, what)
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise NNSAMError(f"{what} folder {path} holds no DICOM series; give an image file or a DICOM folder")
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), series[0]))
            return reader.Execute()
        return sitk.ReadImage(str(path))
    except NNSAMError:
        raise
    except RuntimeError as exc:
        if "permission denied" in str(exc).lower():
            raise NNSAMError(f"cannot read {what} {path} (permission denied); check its permissions") from None
        raise NNSAMError(f"{what} {path} could not be read as an image ({_first_line(exc)}); "
                         "give a NIfTI, NRRD, MHA or DICOM file") from None


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    informative = [line for line in lines if "Exception" not in line and not line.startswith("sitk::")]
    return (informative or lines or [exc.__class__.__name__])[-1][:160]


def check_image(image: sitk.Image, name: str = "image") -> None:
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise NNSAMError(f"{name} has {image.GetNumberOfComponentsPerPixel()} components per voxel (RGB or vector); "
                         "give a single-channel grey-value image")
    if image.GetDimension() not in (2, 3):
        raise NNSAMError(f"{name} is {image.GetDimension()}D; give a 2D or 3D image (one time point)")
    size = image.GetSize()
    if min(size[:2]) < MIN_SIDE:
        raise NNSAMError(f"{name} is {size[0]}x{size[1]} pixels in-plane; slices must be at least "
                         f"{MIN_SIDE} pixels a side")
    array = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise NNSAMError(f"{name} has {bad} NaN or infinite voxels; replace them (e.g. with the minimum value) first")


def as_volume(image: sitk.Image) -> sitk.Image:
    """2D images become one-slice 3D volumes so everything downstream sees (Z, Y, X)."""
    if image.GetDimension() == 3:
        return image
    return sitk.JoinSeries([image])


def plain_numbers(values: Sequence[float], digits: int = 4) -> str:
    """(1, 0.5, 2.25): numbers as a person writes them, whatever their numpy type."""
    return "(" + ", ".join(f"{float(v):.{digits}g}" for v in values) + ")"


def same_geometry(a: sitk.Image, b: sitk.Image, spatial_only: bool = False) -> Optional[str]:
    """None if ``a`` and ``b`` share size, spacing, origin and direction, else what differs (``b``'s, then
    ``a``'s). ``spatial_only``: spacing and direction only."""
    if not spatial_only and a.GetSize() != b.GetSize():
        return f"size {plain_numbers(b.GetSize())} against the image's {plain_numbers(a.GetSize())}"
    checks = [("spacing", a.GetSpacing(), b.GetSpacing()), ("direction", a.GetDirection(), b.GetDirection())]
    if not spatial_only:
        checks.insert(1, ("origin", a.GetOrigin(), b.GetOrigin()))
    for what, x, y in checks:
        scale = max(1.0, *np.abs(x))
        if not np.allclose(x, y, atol=GEOMETRY_TOLERANCE * scale):
            return f"{what} {plain_numbers(y, 3)} against the image's {plain_numbers(x, 3)}"
    return None


def read_labels(source: Union[os.PathLike, str, sitk.Image], image: sitk.Image,
                class_names: Optional[Sequence[str]] = None) -> Labels:
    """A label map (file or SimpleITK image) or a Slicer ``.seg.nrrd`` on the image's grid.

    Plain label maps must share the image's geometry exactly. A ``.seg.nrrd`` is Slicer's segmentation file:
    its segment names become the class names (value = segment order + 1), and its (often cropped) extent is
    placed onto the image grid.
    """
    if isinstance(source, sitk.Image):
        what, labels = "label map", Labels(as_volume(source), [])
    elif str(source).lower().endswith(".seg.nrrd"):
        what, labels = f"label map {Path(source).name}", _read_seg_nrrd(Path(source), image)
    else:
        what, labels = f"label map {Path(source).name}", Labels(as_volume(read_image(source, "label map")), [])
    if labels.image.GetNumberOfComponentsPerPixel() != 1:
        raise NNSAMError(f"{what} has several components per voxel; give one integer label map")
    mismatch = same_geometry(image, labels.image)
    if mismatch:
        raise NNSAMError(f"{what} does not match the image ({mismatch}); "
                         "resample the labels onto the image grid or export them from the same volume")
    array = sitk.GetArrayViewFromImage(labels.image)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or not np.array_equal(array, np.round(array)):
            raise NNSAMError(f"{what} has non-integer values; give an integer label map")
    values = np.unique(array)
    if values.min() < 0:
        raise NNSAMError(f"{what} has negative values; labels must be 0 (background) or 1..N")
    names = list(class_names) if class_names else labels.class_names
    max_value = int(values.max())
    present = [int(v) for v in values if v > 0]
    if not names and max_value > len(present):
        wanted = ", ".join(f"{v} to {i}" for i, v in enumerate(present, start=1) if v != i)
        raise NNSAMError(f"{what} has the values {', '.join(str(int(v)) for v in values)} but classes must be "
                         f"numbered 1..N without gaps; remap {wanted}, or name the classes with --class-names")
    if names:
        if max_value > len(names):
            raise NNSAMError(f"{what} uses value {max_value} but only {len(names)} classes are named "
                             f"({', '.join(names)}); name every class or fix the labels")
    else:
        names = [f"class_{v}" for v in range(1, max_value + 1)]
    labels.class_names = names
    labels.image = sitk.Cast(labels.image, sitk.sitkUInt8 if len(names) < 255 else sitk.sitkUInt16)
    return labels


def _read_seg_nrrd(path: Path, image: sitk.Image) -> Labels:
    import slicerio

    try:
        segmentation = slicerio.read_segmentation(str(path))
    except Exception as exc:  # slicerio raises several types on malformed files
        raise NNSAMError(f"{path} could not be read as a Slicer segmentation ({_first_line(exc)})") from None
    segments = segmentation["segments"]
    if not segments:
        raise NNSAMError(f"{path} contains no segments; annotate at least one segment in a few slices")
    voxels = np.asarray(segmentation["voxels"])  # IJK (or layer-first IJK for several layers)
    if voxels.ndim == 3:
        voxels = voxels[None]
    ijk_to_lps = np.asarray(segmentation["ijkToLPS"], dtype=float)
    out = np.zeros(voxels.shape[1:], dtype=np.uint16)
    for index, segment in enumerate(segments, start=1):
        layer = int(segment.get("layer", 0) or 0)
        out[voxels[layer] == int(segment["labelValue"])] = index
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    seg_image = sitk.GetImageFromArray(np.transpose(out, (2, 1, 0)).copy())  # IJK -> KJI
    seg_image.SetSpacing(tuple(spacing))
    seg_image.SetOrigin(tuple(ijk_to_lps[:3, 3]))
    seg_image.SetDirection(tuple((ijk_to_lps[:3, :3] / spacing).flatten()))
    if same_geometry(image, seg_image):
        # Slicer crops segmentations to their extent: place it on the image grid, which it must share.
        seg_image = _place_on_image_grid(seg_image, image, path)
    return Labels(seg_image, [str(s.get("name") or f"segment_{i}") for i, s in enumerate(segments, start=1)])


def annotated_slices(labels: sitk.Image) -> list[int]:
    """Indices k of the slices with any nonzero label."""
    array = sitk.GetArrayViewFromImage(labels)
    return [int(k) for k in np.flatnonzero(array.reshape(array.shape[0], -1).any(axis=1))]


def parse_slices(text: str, n_slices: Optional[int] = None) -> list[int]:
    """'12,40,77' -> [12, 40, 77], checked against the volume's slice count when it is given."""
    try:
        slices = sorted({int(part) for part in str(text).replace(" ", "").split(",") if part != ""})
    except ValueError:
        raise NNSAMError(f"--slices '{text}' is not a comma-separated list of slice indices, e.g. 12,40,77") from None
    if not slices:
        raise NNSAMError("--slices is empty; give the annotated slice indices, e.g. 12,40,77")
    negative = [s for s in slices if s < 0]
    if negative:
        raise NNSAMError(f"--slices {','.join(map(str, negative))}: slice indices count from 0; give 0 or more")
    if n_slices is not None and slices[-1] >= n_slices:
        outside = [s for s in slices if s >= n_slices]
        raise NNSAMError(f"--slices {','.join(map(str, outside))} outside the volume's {n_slices} slices "
                         f"(0..{n_slices - 1})")
    return slices


def _place_on_image_grid(seg_image: sitk.Image, image: sitk.Image, path: Path) -> sitk.Image:
    """A cropped segmentation shares the image's spacing and direction and starts on one of its voxels; anything
    else was drawn on another volume and is refused rather than resampled into nothing."""
    mismatch = same_geometry(image, seg_image, spatial_only=True)
    start = np.asarray(image.TransformPhysicalPointToContinuousIndex(seg_image.GetOrigin()))
    if mismatch is None and not np.allclose(start, np.round(start), atol=0.01):
        mismatch = f"origin {plain_numbers(seg_image.GetOrigin(), 4)} off the image's voxel grid"
    if mismatch is None:
        array = sitk.GetArrayViewFromImage(seg_image)
        begin = np.round(start).astype(int)
        end = begin + np.asarray(seg_image.GetSize())
        size = np.asarray(image.GetSize())
        lo, hi = np.maximum(begin, 0), np.minimum(end, size)
        inside = (slice(lo[2] - begin[2], hi[2] - begin[2]), slice(lo[1] - begin[1], hi[1] - begin[1]),
                  slice(lo[0] - begin[0], hi[0] - begin[0]))
        if np.any(hi <= lo) or int(np.count_nonzero(array[inside])) != int(np.count_nonzero(array)):
            mismatch = "segments painted outside the image"
    if mismatch:
        raise NNSAMError(f"{path.name} was not drawn on this image ({mismatch}); load the segmentation made on "
                         "this volume")
    return sitk.Resample(seg_image, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, seg_image.GetPixelID())
