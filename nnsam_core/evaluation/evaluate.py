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

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnsam_core.errors import NNSAMError
from nnsam_core.evaluation import metrics

# Longest first, so that "case.nii.gz" loses ".nii.gz" and not only ".gz".
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".png", ".tiff", ".tif")

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
                f"case {case}: prediction {name} {_fmt(pred_value)} differs from ground truth {_fmt(gt_value)}; "
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


def write_json(report: dict, path: str | Path) -> None:
    """Write the report as strict JSON (NaN as null, label values as string keys)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_jsonable(report), indent=2, allow_nan=False) + "\n")
    except OSError as error:
        raise NNSAMError(f"cannot write {path} ({error.strerror}); choose a writable --json path") from None


def format_table(report: dict, show_cases: bool = False) -> str:
    """Readable summary table (and per-case rows if ``show_cases``)."""
    classes = report["classes"]
    labels = {v: f"{v} {name}" if name else str(v) for v, name in classes.items()}
    width = max(len("class"), *(len(label) for label in labels.values()))
    counted = f"{report['n_cases']} case(s)"
    if report["scoring"].startswith("2D per slice"):
        counted += f", {report['n_items']} slice(s) scored"
    lines = [f"{counted}; {report['scoring']}"]
    if show_cases:
        for record in report["cases"]:
            for score in record["scores"]:
                where = record["case"] if score["slice"] is None else f"{record['case']} k={score['slice']}"
                cells = [
                    f"{labels[v]}: Dice {_num(s['dice'])} ASD {_num(s['asd_mm'])}" for v, s in score["classes"].items()
                ]
                lines.append(f"  {where}: " + "; ".join(cells))
    lines.append(
        f"{'class':<{width}}  {'scored':>6}  {'Dice % mean ± sd':>18}  {'ASD mm mean ± sd':>18}  "
        f"{'both empty':>10}  {'one empty':>9}"
    )
    for value, entry in report["summary"].items():
        lines.append(
            f"{labels[value]:<{width}}  {entry['dice']['n']:>6}  {_fmt_mean_sd(entry['dice']):>18}  "
            f"{_fmt_mean_sd(entry['asd_mm']):>18}  {entry['n_both_empty']:>10}  {entry['n_one_empty']:>9}"
        )
    means = report["mean_over_classes"]
    lines.append(
        f"{'mean':<{width}}  {'':>6}  {_num(means['dice']):>18}  {_num(means['asd_mm']):>18}  (of the class means)"
    )
    lines.append("Empty masks: both empty -> not scored; one empty -> Dice 0, ASD left out of the mean.")
    if report["gt_without_prediction"]:
        lines.append(f"Not scored (ground truth without prediction): {len(report['gt_without_prediction'])} cases")
    return "\n".join(lines)


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


def _nonzero_values(array: np.ndarray) -> set[int]:
    return {int(v) for v in np.unique(array) if v != 0}


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _num(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}"


def _fmt_mean_sd(stats: dict) -> str:
    if stats["n"] == 0:
        return "n/a"
    sd = "-" if math.isnan(stats["sd"]) else f"{stats['sd']:.2f}"
    return f"{stats['mean']:.2f} ± {sd}"


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"
