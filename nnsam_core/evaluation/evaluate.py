"""Score prediction files against ground-truth files: Dice (%) and ASD (mm) per class and case.

PRED and GT are each a label image or a folder of them; folders are matched by case name, the file
name without its image extension (nnU-Net style ``case.nii.gz``), so ``.nii.gz`` predictions can
be scored against ``.nrrd`` labels. Every prediction needs a ground truth; ground truths without a
prediction are skipped and listed in the report. Images are read with SimpleITK and pred and GT must
share their grid (size, spacing, origin, direction): ASD in mm is only meaningful on one grid.

Scoring, per :func:`evaluate` (see :mod:`.metrics` for the metric and empty-mask conventions):
  * cases that are single slices (a 2D image or a third axis of size 1) are scored in 2D;
  * volumes are scored in 3D, or with ``per_slice=True`` each axial slice (k, SimpleITK's third
    axis) that has ground truth is scored on its own in 2D, optionally restricted to ``slices`` or
    without ``exclude_slices`` (the in-volume protocol scores only the slices not annotated).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from nnsam_core.errors import NNSAMError
from nnsam_core.evaluation import metrics
from nnsam_core.evaluation.files import (IMAGE_SUFFIXES, case_name, check_same_grid, find_label_names,  # noqa: F401
                                         list_cases, match_cases, read_header, read_labels)
from nnsam_core.evaluation.output import format_table, write_json  # noqa: F401


CONVENTIONS = (
    "Dice in %. ASD: average symmetric surface distance in mm from the image spacing, the mean over "
    "the surface voxels of both masks of the distance to the other surface (as MedPy 0.5 assd). "
    "Class absent from both pred and gt: Dice and ASD NaN (not scored, counted as both_empty). "
    "Class in exactly one: Dice 0, ASD NaN (counted as one_empty). NaN is left out of mean and SD "
    "(sample SD, ddof=1); JSON writes NaN as null."
)

SliceSpec = Iterable[int] | Mapping[str, Iterable[int]] | None


def evaluate(
    pred: str | Path,
    gt: str | Path,
    classes: Mapping[int, str | None] | Iterable[int] | None = None,
    *,
    per_slice: bool = False,
    slices: SliceSpec = None,
    exclude_slices: SliceSpec = None,
) -> dict:
    """Score PRED against GT and return the report (the structure written by :func:`write_json`).

    ``classes``: label values, or a mapping value -> name (None for no name); default: every nonzero
    value in the ground truth, named from a ``dataset.json`` beside or above GT (or PRED) if any.
    ``slices`` / ``exclude_slices`` (only with ``per_slice``): k indices applied to every case, or a
    mapping case name -> k indices for per-case lists.
    """
    pred, gt = Path(pred), Path(gt)
    pairs = match_cases(pred, gt)
    if (slices is not None or exclude_slices is not None) and not per_slice:
        raise NNSAMError("slice selection only applies to per-slice scoring; add --per-slice")
    for name, spec in (("slices", slices), ("exclude_slices", exclude_slices)):
        if isinstance(spec, Mapping):
            unknown = sorted(set(spec) - {case for case, _, _ in pairs})
            if unknown:
                raise NNSAMError(f"{name} names cases {unknown[:5]} that are not evaluated; check the case names")

    names, names_file = find_label_names(gt, pred)
    if classes is None:
        values = sorted(set().union(*(_nonzero_values(read_labels(g)[0]) for _, _, g in pairs)))
        if not values:
            raise NNSAMError(f"the ground truth in {gt} holds no nonzero label; pass the classes with --classes")
        classes = {v: None for v in values}
    elif not isinstance(classes, Mapping):
        classes = {int(v): None for v in classes}
    classes = {int(v): (name or names.get(int(v))) for v, name in classes.items()}
    if not classes:
        raise NNSAMError("no classes to evaluate; pass label values with --classes, e.g. --classes 1=LV 2=RV")

    # Headers first: grid mismatches and the 2D/3D decision need no pixel data, and cases are then
    # read one at a time so a large dataset never sits in memory at once.
    single_slice = []
    for case, pred_path, gt_path in pairs:
        gt_header = read_header(gt_path)
        check_same_grid(read_header(pred_path), gt_header, case)
        single_slice.append(gt_header.GetDimension() == 2 or gt_header.GetSize()[2] == 1)
    if per_slice:
        mode, scoring = "2d", "2D per slice: each axial (k) slice with ground truth scored separately"
    elif all(single_slice):
        mode, scoring = "2d", "2D: each case is a single slice"
    elif not any(single_slice):
        mode, scoring = "3d", "3D: each case scored as one volume"
    else:
        raise NNSAMError("some cases are single slices and some are volumes; add --per-slice to score all in 2D")

    records, rows = [], []
    for case, pred_path, gt_path in pairs:
        gt_array, spacing, gt_image = read_labels(gt_path)
        pred_array, _, pred_image = read_labels(pred_path)
        check_same_grid(pred_image, gt_image, case)  # headers were checked; this guards the pixel grids
        if per_slice:
            keep = _slices_for(slices, case, gt_array.shape[0], "slices")
            drop = _slices_for(exclude_slices, case, gt_array.shape[0], "exclude_slices")
            result = metrics.evaluate_case(
                pred_array, gt_array, spacing, classes, "2d", slices=keep, exclude_slices=drop
            )
        elif mode == "2d":  # single-slice cases: score the one slice whatever it holds
            result = metrics.evaluate_case(pred_array[0], gt_array[0], spacing[1:], classes, "2d")
        else:
            result = metrics.evaluate_case(pred_array, gt_array, spacing, classes, "3d")
        rows.extend(score["classes"] for score in result["scores"])
        records.append(
            {
                "case": case,
                "pred_file": str(pred_path),
                "gt_file": str(gt_path),
                "spacing_mm": list(gt_image.GetSpacing()),  # SimpleITK order (i, j, k)
                "scores": result["scores"],
            }
        )

    summary = {value: {"name": classes[value], **entry} for value, entry in metrics.summarize(rows, classes).items()}
    class_means = {metric: _nanmean([summary[v][metric]["mean"] for v in classes]) for metric in ("dice", "asd_mm")}
    gt_only = sorted(set(list_cases(gt)) - {case for case, _, _ in pairs}) if gt.is_dir() else []
    return {
        "pred": str(pred),
        "gt": str(gt),
        "mode": mode,
        "scoring": scoring,
        "units": {"dice": "%", "asd_mm": "mm"},
        "conventions": CONVENTIONS,
        "classes": classes,
        "label_names_from": str(names_file) if names_file else None,
        "n_cases": len(records),
        "n_items": len(rows),
        "gt_without_prediction": gt_only,
        "summary": summary,
        "mean_over_classes": class_means,
        "cases": records,
    }


def parse_class_specs(specs: Sequence[str]) -> dict[int, str | None]:
    """``["1=LV", "2"]`` -> ``{1: "LV", 2: None}``; raises NNSAMError on a malformed entry."""
    classes: dict[int, str | None] = {}
    for spec in specs:
        value, sep, name = str(spec).partition("=")
        try:
            number = int(value)
        except ValueError:
            raise NNSAMError(f"class {spec!r} is not a label value; write values or value=name, e.g. 1=LV") from None
        if number <= 0 or (sep and not name.strip()):
            raise NNSAMError(f"class {spec!r}: use a positive label value and a non-empty name, e.g. 1=LV")
        classes[number] = name.strip() or None
    return classes


def parse_slice_specs(specs: Sequence[str]) -> list[int]:
    """``["3", "5-7", "9,10"]`` -> ``[3, 5, 6, 7, 9, 10]``; raises NNSAMError on a malformed entry."""
    indices: list[int] = []
    for token in (t for spec in specs for t in str(spec).split(",") if t.strip()):
        first, dash, last = token.strip().partition("-")
        try:
            start = int(first)
            stop = int(last) if dash else start
        except ValueError:
            raise NNSAMError(f"slice {token!r} is not an index or a range; write e.g. 3 5-7") from None
        if start < 0 or stop < start:
            raise NNSAMError(f"slice range {token!r} is empty or negative; write e.g. 5-7")
        indices.extend(range(start, stop + 1))
    return indices


def _slices_for(spec: SliceSpec, case: str, depth: int, name: str) -> list[int] | None:
    """This case's k indices from a global list or a per-case mapping (None: no restriction)."""
    if isinstance(spec, Mapping):
        if case not in spec:
            return None  # a per-case mapping that does not name this case leaves it unrestricted
        spec = spec[case]
    if spec is None:
        return None
    indices = [int(k) for k in spec]
    outside = sorted({k for k in indices if not 0 <= k < depth})
    if outside:
        raise NNSAMError(f"{name} {outside} are outside case {case}, which has slices 0..{depth - 1}; fix the indices")
    return indices


def _nonzero_values(array: np.ndarray) -> set[int]:
    return {int(v) for v in np.unique(array) if v != 0}


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")

