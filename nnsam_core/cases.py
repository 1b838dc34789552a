"""From the user's inputs to nnU-Net training cases, checked before any work: one case per painted slice of a
volume, or every case of an nnU-Net raw dataset."""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk

from .errors import NNSAMError
from .images import annotated_slices, as_volume, check_image, parse_slices, read_image, read_labels
from .workspace import TrainingCase, read_raw_dataset, slice_case

ImageLike = Union[str, os.PathLike, sitk.Image]


def _as_image(value: ImageLike, what: str) -> sitk.Image:
    image = value if isinstance(value, sitk.Image) else read_image(value, what)
    check_image(image, what)
    return as_volume(image)


def cases_from_sparse_slices(image: ImageLike, labels: ImageLike, slices: Optional[Sequence[int]] = None,
                             class_names: Optional[Sequence[str]] = None) -> tuple[list[TrainingCase], list[str], list[int]]:
    """One training case per annotated axial slice; slices not annotated are never training data."""
    image = _as_image(image, "image")
    parsed = read_labels(labels, image, class_names)
    n_slices = image.GetSize()[2]
    painted = annotated_slices(parsed.image)
    chosen = parse_slices(",".join(map(str, slices)), n_slices) if slices is not None else painted
    if not chosen:
        raise NNSAMError("the label map has no annotated slice; label at least one slice (or pass --slices)")
    empty = sorted(set(chosen) - set(painted))
    if empty:
        raise NNSAMError(f"--slices {','.join(map(str, empty))} hold no label; paint the structures there or leave "
                         f"them out (painted slices: {describe_slices(painted)})")
    cases = [slice_case(image, parsed.image, k, f"slice_{k:04d}") for k in chosen]
    return cases, parsed.class_names, chosen


def cases_from_nnunet_dataset(dataset_dir: os.PathLike) -> tuple[list[TrainingCase], list[str], dict]:
    """Every case of an nnU-Net raw dataset: 2D slices as they are, volumes cut into their labelled slices
    (a slice without any label counts as unannotated, not as background)."""
    raw = read_raw_dataset(dataset_dir)
    cases = []
    for label_file in raw.label_files:
        name = raw.case_name(label_file)
        image = _as_image(raw.image_file(name), f"image of case {name}")
        parsed = read_labels(label_file, image, raw.class_names)
        if image.GetSize()[2] == 1:
            cases.append(TrainingCase(name, image, parsed.image))
        else:
            cases.extend(slice_case(image, parsed.image, k, f"{name}_z{k:03d}") for k in annotated_slices(parsed.image))
    return cases, raw.class_names, raw.dataset_json["channel_names"]


def describe_slices(slices: Sequence[int], limit: int = 12) -> str:
    if not slices:
        return "none"
    shown = ",".join(map(str, slices[:limit]))
    return shown + (f" and {len(slices) - limit} more" if len(slices) > limit else "")


def constant_image_warning(image: sitk.Image) -> Optional[str]:
    """A warning when every voxel has one value: the model could learn nothing from it."""
    array = sitk.GetArrayViewFromImage(image)
    low, high = float(np.min(array)), float(np.max(array))
    if low == high:
        return f"every voxel of the image has the value {low:g}: the model can learn nothing from it; check the image"
    return None
