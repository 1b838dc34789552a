"""Finding, reading and checking the label files ``nnsam evaluate`` scores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnsam_core.errors import NNSAMError
from nnsam_core.filecheck import check_complete
from nnsam_core.evaluation.output import format_numbers

# Longest first, so that "case.nii.gz" loses ".nii.gz" and not only ".gz".
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".png", ".tiff", ".tif")


def match_cases(pred: Path, gt: Path) -> list[tuple[str, Path, Path]]:
    """(case, pred file, gt file) for two files, or for two folders matched by case name."""
    for role, path in (("prediction", pred), ("ground truth", gt)):
        if not path.exists():
            raise NNSAMError(f"{role} path {path} does not exist; check the path")
    if pred.is_file() and gt.is_file():
        return [(case_name(gt) or gt.name, pred, gt)]
    if not (pred.is_dir() and gt.is_dir()):
        raise NNSAMError(f"PRED {pred} and GT {gt} must both be image files or both be folders")
    pred_cases, gt_cases = list_cases(pred), list_cases(gt)
    if not pred_cases:
        raise NNSAMError(f"no label images ({', '.join(IMAGE_SUFFIXES)}) in {pred}; point PRED at the predictions")
    missing = sorted(set(pred_cases) - set(gt_cases))
    if len(missing) == len(pred_cases):
        raise NNSAMError(
            f"no prediction in {pred} has a ground truth of the same case name in {gt} "
            f"(e.g. {missing[0]}); match file names like case.nii.gz in both folders"
        )
    if missing:
        raise NNSAMError(f"predictions {missing[:5]} have no ground truth in {gt}; add their labels or remove them")
    return [(case, pred_cases[case], gt_cases[case]) for case in sorted(pred_cases)]


def list_cases(folder: Path) -> dict[str, Path]:
    """Case name -> image file for the label images directly in ``folder``."""
    cases: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        case = case_name(path)
        if case is None or not path.is_file():
            continue
        if case in cases:
            raise NNSAMError(f"case {case} has two files in {folder} ({cases[case].name}, {path.name}); keep one")
        cases[case] = path
    return cases


def case_name(path: Path) -> str | None:
    """File name without its image extension, or None if it is not an image file."""
    lower = path.name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix) and len(lower) > len(suffix):
            return path.name[: -len(suffix)]
    return None


def read_header(path: Path) -> sitk.ImageFileReader:
    """The image's header (size, spacing, origin, direction) without its pixels."""
    check_complete(path, "label map")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise _unreadable(path, error) from None
    return reader


def read_labels(path: Path) -> tuple[np.ndarray, tuple[float, float, float], sitk.Image]:
    """Label map as an integer (k, j, i) array, its spacing in that order, and the image.

    2D images become one-slice volumes (spacing 1 along k, which 2D scoring never uses).
    """
    check_complete(path, "label map")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise _unreadable(path, error) from None
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() not in (2, 3):
        raise NNSAMError(f"{path} is not a 2D or 3D single-channel label map; pass one label image per case")
    array = sitk.GetArrayFromImage(image)
    spacing = tuple(float(s) for s in reversed(image.GetSpacing()))
    if image.GetDimension() == 2:
        array, spacing = array[np.newaxis], (1.0, *spacing)
    if not np.issubdtype(array.dtype, np.integer):
        # Float-typed label maps are fine if every value is whole (some tools write labels as float).
        if not (np.all(np.isfinite(array)) and np.all(array == np.round(array))):
            raise NNSAMError(f"{path} holds non-integer values; pass a label map, not probabilities")
        array = array.astype(np.int64)
    return array, spacing, image


def _unreadable(path: Path, error: RuntimeError) -> NNSAMError:
    lines = str(error).strip().splitlines()
    reason = lines[-1].strip() if lines else "unknown reason"
    return NNSAMError(f"cannot read label image {path} ({reason}); pass a NIfTI/NRRD/MHA label map")


def check_same_grid(pred_image, gt_image, case: str) -> None:
    """Raise NNSAMError unless pred and gt (images or headers) share size, spacing, origin, direction."""
    checks = (
        ("size", pred_image.GetSize(), gt_image.GetSize(), 0.0),
        ("spacing", pred_image.GetSpacing(), gt_image.GetSpacing(), 1e-5),
        ("origin", pred_image.GetOrigin(), gt_image.GetOrigin(), 1e-3),  # mm; headers store float32
        ("direction", pred_image.GetDirection(), gt_image.GetDirection(), 1e-4),
    )
    for name, pred_value, gt_value, tolerance in checks:
        same = len(pred_value) == len(gt_value) and np.allclose(pred_value, gt_value, rtol=1e-5, atol=tolerance)
        if not same:
            raise NNSAMError(
                f"case {case}: prediction {name} {format_numbers(pred_value)} differs from ground truth {format_numbers(gt_value)}; "
                "resample the prediction onto the ground-truth grid"
            )


def find_label_names(gt: Path, pred: Path | None = None) -> tuple[dict[int, str], Path | None]:
    """Label value -> name from the first dataset.json beside or one level above GT (then PRED)."""
    candidates = []
    for root in (gt, pred):
        if root is not None:
            folder = root if root.is_dir() else root.parent
            candidates += [folder / "dataset.json", folder.parent / "dataset.json"]
    for path in candidates:
        if path.is_file():
            names = _label_names(path)
            if names:
                return names, path
    return {}, None


def _label_names(path: Path) -> dict[int, str]:
    """nnU-Net v2 ``{"LV": 1}`` or v1 ``{"1": "LV"}`` labels; region labels and bad files give nothing."""
    try:
        labels = json.loads(path.read_text()).get("labels", {})
    except (OSError, ValueError, AttributeError):
        return {}
    names: dict[int, str] = {}
    if not isinstance(labels, dict):
        return names
    for key, value in labels.items():
        if isinstance(value, int) and not isinstance(value, bool):  # v2: name -> value
            names[value] = str(key)
        elif str(key).isdigit() and isinstance(value, str):  # v1: "value" -> name
            names[int(key)] = value
    names.pop(0, None)
    return names
