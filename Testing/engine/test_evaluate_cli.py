"""`nnsam evaluate` through argparse, on small label images written into tmp_path."""

import argparse
import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnsam_core.errors import NNSAMError
from nnsam_core.evaluation.command import add_evaluate_parser
from nnsam_core.evaluation.evaluate import evaluate
from nnsam_core.evaluation.metrics import average_symmetric_surface_distance as asd


def run_cli(*argv):
    parser = argparse.ArgumentParser(prog="nnsam")
    add_evaluate_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["evaluate", *map(str, argv)])
    return args.func(args)


def write_labels(path, array, spacing=(1.0, 1.0, 1.0), origin=None):
    """Write a (k, j, i) label array; ``spacing`` is SimpleITK's (i, j, k) order."""
    image = sitk.GetImageFromArray(np.asarray(array, np.uint8))
    image.SetSpacing(spacing)
    if origin is not None:
        image.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def volume_pair():
    """GT: class 1 cube (4x4x4) and class 2 block; pred: class 1 shifted 1 voxel along i, no class 2."""
    gt = np.zeros((6, 10, 10), np.uint8)
    gt[1:5, 2:6, 2:6] = 1
    gt[1:3, 7:9, 7:9] = 2
    pred = np.zeros_like(gt)
    pred[1:5, 2:6, 3:7] = 1  # overlap 4x4x3 = 48 of 64 + 64
    return pred, gt


def test_folders_of_volumes_give_3d_scores_table_and_json(tmp_path, capsys):
    pred, gt = volume_pair()
    spacing = (0.5, 0.5, 2.0)  # i, j, k
    for case in ("case_001", "case_002"):
        write_labels(tmp_path / "pred" / f"{case}.nii.gz", pred, spacing)
        write_labels(tmp_path / "raw" / "labelsTr" / f"{case}.nii.gz", gt, spacing)
    write_labels(tmp_path / "raw" / "labelsTr" / "case_003.nii.gz", gt, spacing)  # not predicted
    (tmp_path / "raw" / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "LV": 1, "RV": 2}}))
    (tmp_path / "pred" / "plans.json").write_text("{}")  # nnU-Net leaves json files beside predictions
    out = tmp_path / "scores" / "eval.json"

    assert run_cli(tmp_path / "pred", tmp_path / "raw" / "labelsTr", "--json", out) == 0

    printed = capsys.readouterr().out
    assert "3D" in printed and "1 LV" in printed and "2 RV" in printed
    report = json.loads(out.read_text())
    assert report["mode"] == "3d" and report["n_cases"] == 2
    assert report["gt_without_prediction"] == ["case_003"]
    assert report["classes"] == {"1": "LV", "2": "RV"}
    lv = report["summary"]["1"]
    assert lv["dice"]["mean"] == pytest.approx(200 * 48 / 128)
    assert lv["dice"]["sd"] == pytest.approx(0.0)
    expected_asd = asd(pred == 1, gt == 1, spacing[::-1])  # numpy order (k, j, i)
    assert lv["asd_mm"]["mean"] == pytest.approx(expected_asd)
    rv = report["summary"]["2"]  # missed in both cases: Dice 0, ASD NaN -> null, counted
    assert rv["dice"]["mean"] == 0.0 and rv["asd_mm"]["mean"] is None and rv["n_one_empty"] == 2
    case = report["cases"][0]
    assert case["case"] == "case_001" and case["spacing_mm"] == list(spacing)
    assert case["scores"][0]["classes"]["2"]["asd_mm"] is None


def test_single_slice_cases_are_scored_in_2d_ignoring_slice_thickness(tmp_path):
    gt = np.zeros((1, 12, 12), np.uint8)
    gt[0, 3:9, 3:9] = 1
    pred = np.zeros_like(gt)
    pred[0, 3:9, 5:11] = 1
    write_labels(tmp_path / "pred" / "slice_a.nii.gz", pred, (0.8, 0.8, 8.0))
    write_labels(tmp_path / "gt" / "slice_a.nii.gz", gt, (0.8, 0.8, 8.0))
    out = tmp_path / "eval.json"

    run_cli(tmp_path / "pred", tmp_path / "gt", "--json", out)

    report = json.loads(out.read_text())
    assert report["mode"] == "2d" and "single slice" in report["scoring"]
    # Scored in-plane: the 8 mm slice thickness must not enter the distances.
    assert report["summary"]["1"]["asd_mm"]["mean"] == pytest.approx(asd(pred[0] == 1, gt[0] == 1, (0.8, 0.8)))
    assert report["classes"] == {"1": None}  # default: nonzero GT values, no names available


def test_per_slice_scores_each_slice_with_ground_truth_except_excluded(tmp_path):
    gt = np.zeros((5, 10, 10), np.uint8)
    gt[1:4, 2:8, 2:8] = 1  # slices 1, 2, 3 have ground truth
    pred = gt.copy()
    pred[2, 2:8, 2:5] = 0  # slice 2: half of it missed
    write_labels(tmp_path / "pred.nii.gz", pred, (1.0, 1.0, 5.0))
    write_labels(tmp_path / "gt.nrrd", gt, (1.0, 1.0, 5.0))
    out = tmp_path / "eval.json"

    run_cli(tmp_path / "pred.nii.gz", tmp_path / "gt.nrrd", "--per-slice", "--exclude-slices", "1", "--json", out)

    report = json.loads(out.read_text())
    assert report["mode"] == "2d" and "per slice" in report["scoring"]
    scores = report["cases"][0]["scores"]
    assert [s["slice"] for s in scores] == [2, 3]  # 0 and 4 have no GT, 1 is excluded
    assert scores[0]["classes"]["1"]["dice"] == pytest.approx(200 * 18 / 54)
    assert scores[1]["classes"]["1"]["dice"] == 100.0
    assert report["summary"]["1"]["dice"]["n"] == 2

    run_cli(tmp_path / "pred.nii.gz", tmp_path / "gt.nrrd", "--per-slice", "--slices", "0-2", "--json", out)
    assert [s["slice"] for s in json.loads(out.read_text())["cases"][0]["scores"]] == [1, 2]


def test_named_classes_override_dataset_json_and_absent_class_is_not_scored(tmp_path, capsys):
    pred, gt = volume_pair()
    write_labels(tmp_path / "pred" / "c.nii.gz", pred)
    write_labels(tmp_path / "gt" / "c.nii.gz", gt)
    (tmp_path / "gt" / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "heart"}}))
    out = tmp_path / "eval.json"

    run_cli(tmp_path / "pred", tmp_path / "gt", "--classes", "1=LV", "3", "--json", out, "--show-cases")

    report = json.loads(out.read_text())
    assert report["classes"] == {"1": "LV", "3": None}
    assert report["summary"]["3"]["n_both_empty"] == 1 and report["summary"]["3"]["dice"]["mean"] is None
    assert "c: 1 LV: Dice 75.00" in capsys.readouterr().out  # --show-cases line


def test_help_explains_usage_and_conventions(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("--help")
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for needle in ("--per-slice", "--exclude-slices", "--classes", "Empty masks", "ASD"):
        assert needle in text


# --- errors the user can fix -------------------------------------------------------------------


def _pair(tmp_path, gt_spacing=(1.0, 1.0, 1.0), gt_shape=None, gt_origin=None):
    pred, gt = volume_pair()
    if gt_shape is not None:
        gt = np.zeros(gt_shape, np.uint8)
        gt[0, 0, 0] = 1
    write_labels(tmp_path / "pred" / "c.nii.gz", pred)
    write_labels(tmp_path / "gt" / "c.nii.gz", gt, gt_spacing, gt_origin)
    return tmp_path / "pred", tmp_path / "gt"


@pytest.mark.parametrize(
    "gt_kwargs, message",
    [
        ({"gt_spacing": (1.0, 1.0, 2.5)}, "spacing"),
        ({"gt_shape": (6, 10, 11)}, "size"),
        ({"gt_origin": (0.0, 0.0, 3.0)}, "origin"),
    ],
)
def test_grid_mismatch_is_a_user_error(tmp_path, gt_kwargs, message):
    pred, gt = _pair(tmp_path, **gt_kwargs)
    with pytest.raises(NNSAMError, match=f"prediction {message} .* differs .* resample"):
        run_cli(pred, gt)


def test_missing_and_unreadable_files_are_user_errors(tmp_path):
    pred, gt = _pair(tmp_path)
    with pytest.raises(NNSAMError, match="does not exist"):
        run_cli(tmp_path / "nowhere", gt)
    (pred / "c.nii.gz").write_bytes(b"not an image")
    with pytest.raises(NNSAMError, match="cannot read label image .*c.nii.gz"):
        run_cli(pred, gt)


def test_unmatched_cases_are_user_errors(tmp_path):
    pred, gt = _pair(tmp_path)
    (gt / "c.nii.gz").rename(gt / "other.nii.gz")
    with pytest.raises(NNSAMError, match="no prediction .* has a ground truth"):
        run_cli(pred, gt)
    write_labels(gt / "c.nii.gz", volume_pair()[1])
    write_labels(pred / "extra.nii.gz", volume_pair()[0])
    with pytest.raises(NNSAMError, match=r"\['extra'\] have no ground truth"):
        run_cli(pred, gt)
    with pytest.raises(NNSAMError, match="both be image files or both be folders"):
        run_cli(pred / "c.nii.gz", gt)


def test_bad_options_are_user_errors(tmp_path):
    pred, gt = _pair(tmp_path)
    with pytest.raises(NNSAMError, match="value=name"):
        run_cli(pred, gt, "--classes", "LV")
    with pytest.raises(NNSAMError, match="add --per-slice"):
        run_cli(pred, gt, "--slices", "1")
    with pytest.raises(NNSAMError, match=r"\[6\] are outside case c"):
        run_cli(pred, gt, "--per-slice", "--exclude-slices", "6")
    with pytest.raises(NNSAMError, match="index or a range"):
        run_cli(pred, gt, "--per-slice", "--slices", "a-b")


def test_mixed_slices_and_volumes_need_per_slice(tmp_path):
    pred, gt = volume_pair()
    write_labels(tmp_path / "pred" / "vol.nii.gz", pred)
    write_labels(tmp_path / "gt" / "vol.nii.gz", gt)
    write_labels(tmp_path / "pred" / "slice.nii.gz", pred[2:3])
    write_labels(tmp_path / "gt" / "slice.nii.gz", gt[2:3])
    with pytest.raises(NNSAMError, match="add --per-slice"):
        run_cli(tmp_path / "pred", tmp_path / "gt")
    out = tmp_path / "eval.json"
    run_cli(tmp_path / "pred", tmp_path / "gt", "--per-slice", "--json", out)
    report = json.loads(out.read_text())
    assert {c["case"]: len(c["scores"]) for c in report["cases"]} == {"slice": 1, "vol": 4}


def test_probability_maps_are_rejected(tmp_path):
    pred, gt = _pair(tmp_path)
    image = sitk.GetImageFromArray(np.full((6, 10, 10), 0.4, np.float32))
    sitk.WriteImage(image, str(pred / "c.nii.gz"))
    with pytest.raises(NNSAMError, match="non-integer"):
        run_cli(pred, gt)


def test_empty_ground_truth_needs_explicit_classes(tmp_path):
    write_labels(tmp_path / "p.nii.gz", np.zeros((2, 4, 4)))
    write_labels(tmp_path / "g.nii.gz", np.zeros((2, 4, 4)))
    with pytest.raises(NNSAMError, match="--classes"):
        run_cli(tmp_path / "p.nii.gz", tmp_path / "g.nii.gz")
    out = tmp_path / "e.json"
    run_cli(tmp_path / "p.nii.gz", tmp_path / "g.nii.gz", "--classes", "1", "--json", out)
    # Strict JSON: NaN must have been written as null, which a strict parser accepts.
    report = json.loads(out.read_text(), parse_constant=reject_constant)
    assert report["summary"]["1"]["n_both_empty"] == 1 and report["summary"]["1"]["dice"]["mean"] is None


def reject_constant(name):
    raise ValueError(f"non-standard JSON constant {name}")


def test_python_api_takes_per_case_slice_lists(tmp_path):
    gt = np.zeros((5, 8, 8), np.uint8)
    gt[1:4, 2:6, 2:6] = 1
    for case in ("a", "b"):
        write_labels(tmp_path / "pred" / f"{case}.nii.gz", gt)
        write_labels(tmp_path / "gt" / f"{case}.nii.gz", gt)

    report = evaluate(tmp_path / "pred", tmp_path / "gt", per_slice=True, exclude_slices={"a": [1, 2]})

    scored = {record["case"]: [s["slice"] for s in record["scores"]] for record in report["cases"]}
    assert scored == {"a": [3], "b": [1, 2, 3]}
    with pytest.raises(NNSAMError, match=r"names cases \['c'\]"):
        evaluate(tmp_path / "pred", tmp_path / "gt", per_slice=True, exclude_slices={"c": [1]})
