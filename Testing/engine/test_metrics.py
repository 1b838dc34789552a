"""Metrics on hand-computed cases, the empty-mask conventions, and a cross-check against MedPy."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.integrate import quad

from nnsam_core.evaluation.metrics import (
    average_symmetric_surface_distance as asd,
)
from nnsam_core.evaluation.metrics import (
    dice,
    evaluate_case,
    summarize,
)


def ball(shape, spacing, center_mm, radius_mm):
    """Disk/ball sampled at voxel centres, defined in mm so that anisotropic spacing matters."""
    index = np.indices(shape, dtype=float)
    squared = sum((index[axis] * spacing[axis] - center_mm[axis]) ** 2 for axis in range(len(shape)))
    return squared <= radius_mm**2


def shifted_circle_assd(radius, shift):
    """Exact ASSD of two circles of equal radius whose centres are ``shift`` apart.

    A point at angle t on one circle is | |p - c2| - R | from the other; average over t (both
    directions are equal by symmetry).
    """
    return quad(lambda t: _gap(radius, shift, t), 0, math.pi)[0] / math.pi


def shifted_sphere_assd(radius, shift):
    """Same for spheres: surface average with area weight sin(t)/2."""
    return quad(lambda t: _gap(radius, shift, t) * math.sin(t) / 2, 0, math.pi)[0]


def _gap(radius, shift, t):
    return abs(math.sqrt(radius**2 + shift**2 - 2 * radius * shift * math.cos(t)) - radius)


# --- Dice -------------------------------------------------------------------------------------


def test_dice_of_two_offset_squares_is_exact():
    pred = np.zeros((20, 20), bool)
    gt = np.zeros((20, 20), bool)
    pred[5:15, 2:12] = True  # 10 x 10
    gt[5:15, 6:16] = True  # same square shifted 4 columns: overlap 10 x 6 = 60
    assert dice(pred, gt) == pytest.approx(2 * 60 / 200 * 100)  # 60 %
    assert dice(gt, pred) == dice(pred, gt)


def test_dice_of_nested_cubes_is_exact():
    gt = np.zeros((6, 6, 6), bool)
    gt[1:5, 1:5, 1:5] = True  # 64 voxels
    pred = np.zeros_like(gt)
    pred[1:3, 1:5, 1:5] = True  # 32 voxels, all inside gt
    assert dice(pred, gt) == pytest.approx(200 * 32 / 96)


# --- ASD ----------------------------------------------------------------------------------------


def test_asd_between_two_voxels_is_their_distance_in_mm():
    pred = np.zeros((8, 8), bool)
    gt = np.zeros((8, 8), bool)
    pred[1, 1] = True
    gt[4, 5] = True  # 3 rows and 4 columns away
    # spacing follows the array axes: 2 mm per row, 0.5 mm per column
    assert asd(pred, gt, (2.0, 0.5)) == pytest.approx(math.hypot(3 * 2.0, 4 * 0.5), rel=1e-6)
    assert asd(pred, gt, (1.0, 1.0)) == pytest.approx(5.0, rel=1e-6)


def test_asd_between_two_voxels_in_3d_uses_each_axis_spacing():
    pred = np.zeros((5, 5, 5), bool)
    gt = np.zeros((5, 5, 5), bool)
    pred[0, 0, 0] = True
    gt[2, 1, 3] = True
    expected = math.sqrt((2 * 5.0) ** 2 + (1 * 0.7) ** 2 + (3 * 0.7) ** 2)
    assert asd(pred, gt, (5.0, 0.7, 0.7)) == pytest.approx(expected, rel=1e-6)


def test_asd_of_identical_masks_is_zero():
    mask = ball((30, 30), (1.0, 1.0), (15, 15), 8)
    assert asd(mask, mask, (0.9, 1.3)) == 0.0


def test_asd_of_disk_shifted_along_coarse_axis_matches_analytic_value():
    spacing = (0.4, 0.6)  # anisotropic, mm
    radius, shift = 12.0, 3.6  # shift = 6 voxels of 0.6 mm, so both disks sample identically
    shape = (110, 75)
    pred = ball(shape, spacing, (22.0, 18.0), radius)
    gt = ball(shape, spacing, (22.0, 18.0 + shift), radius)
    expected = shifted_circle_assd(radius, shift)  # 2.28 mm
    # Voxel surfaces over-sample parts of the contour (diagonals, the finer axis), which biases
    # voxel-based ASD a few percent (3 % here); 8 % still rejects a swapped spacing order (-17 %).
    assert asd(pred, gt, spacing) == pytest.approx(expected, rel=0.08)
    assert asd(pred, gt, spacing[::-1]) != pytest.approx(expected, rel=0.08)


def test_asd_of_ball_shifted_along_slice_axis_matches_analytic_value():
    spacing = (1.6, 0.8, 0.8)  # thick slices along k
    radius, shift = 8.0, 3.2  # shift = 2 slices
    shape = (14, 28, 28)
    pred = ball(shape, spacing, (10.0, 10.0, 10.0), radius)
    gt = ball(shape, spacing, (10.0 + shift, 10.0, 10.0), radius)
    expected = shifted_sphere_assd(radius, shift)  # 1.6 mm
    # 3D voxel surfaces are biased more (+9 % here); 12 % still rejects the wrong order (-23 %).
    assert asd(pred, gt, spacing) == pytest.approx(expected, rel=0.12)
    assert asd(pred, gt, spacing[::-1]) != pytest.approx(expected, rel=0.12)


def test_object_touching_the_image_border_has_a_surface_there():
    # gt fills the left 5 columns up to the border; pred is its right edge column only. Every gt
    # surface voxel in column 0 is 4 columns away from pred, so ASD > 0 needs the border surface.
    gt = np.zeros((6, 10), bool)
    gt[:, :5] = True
    pred = np.zeros_like(gt)
    pred[:, 4] = True
    # pred's 6 voxels lie on gt's surface: 0 mm each. gt's 18 surface voxels: column 0 (6 at 4 mm),
    # rows 0 and 5 of columns 1..3 (at 3, 2, 1 mm, twice) and column 4 (6 at 0 mm). Pooled mean:
    assert asd(pred, gt, (1.0, 1.0)) == pytest.approx((6 * 4 + 2 * (3 + 2 + 1)) / (6 + 18), rel=1e-6)


def test_asd_pools_both_directions():
    # A 3x3 square against the same square missing a corner: only pred's corner voxel (1 mm from
    # gt's surface) is off; 8 + 7 surface voxels pooled give 1/15, not the mean of directions 1/16.
    pred = np.ones((3, 3), bool)
    gt = pred.copy()
    gt[0, 0] = False
    assert asd(pred, gt, (1.0, 1.0)) == pytest.approx(1 / 15, rel=1e-6)


# --- empty-mask conventions ----------------------------------------------------------------------


def test_both_empty_is_not_scored():
    empty = np.zeros((5, 5), bool)
    assert math.isnan(dice(empty, empty))
    assert math.isnan(asd(empty, empty, (1.0, 1.0)))


@pytest.mark.parametrize("pred_empty", [True, False])
def test_exactly_one_empty_gives_dice_zero_and_asd_nan(pred_empty):
    empty = np.zeros((5, 5), bool)
    mask = empty.copy()
    mask[2, 2] = True
    pred, gt = (empty, mask) if pred_empty else (mask, empty)
    assert dice(pred, gt) == 0.0
    assert math.isnan(asd(pred, gt, (1.0, 1.0)))


def test_summary_leaves_nan_out_of_mean_and_counts_empty_cases():
    gt = np.zeros((3, 8, 8), np.uint8)
    pred = np.zeros_like(gt)
    gt[0, 2:6, 2:6] = 1
    pred[0, 2:6, 2:6] = 1  # slice 0: perfect
    gt[1, 2:6, 2:6] = 1
    pred[1, 2:6, 2:4] = 1  # slice 1: Dice 200*8/24
    gt[2, 2:6, 2:6] = 1  # slice 2: prediction missing -> Dice 0, ASD NaN
    case = evaluate_case(pred, gt, (5.0, 1.0, 1.0), [1, 2], mode="2d")
    summary = summarize([score["classes"] for score in case["scores"]], [1, 2])

    dices = [100.0, 200 * 8 / 24, 0.0]
    assert summary[1]["dice"]["mean"] == pytest.approx(np.mean(dices))
    assert summary[1]["dice"]["sd"] == pytest.approx(np.std(dices, ddof=1))
    assert summary[1]["asd_mm"]["n"] == 2  # the missed slice is left out of the ASD mean...
    assert summary[1]["n_one_empty"] == 1  # ...and counted
    assert summary[2]["n_both_empty"] == 3  # class 2 is in neither: never scored
    assert summary[2]["dice"]["n"] == 0 and math.isnan(summary[2]["dice"]["mean"])


# --- evaluate_case modes --------------------------------------------------------------------------


def _stack():
    gt = np.zeros((4, 12, 12), np.uint8)
    pred = np.zeros_like(gt)
    gt[1:3, 3:9, 3:9] = 1
    pred[1:3, 3:9, 4:10] = 1
    pred[3, 5:7, 5:7] = 1  # a false positive on a slice without ground truth
    return pred, gt


def test_per_slice_mode_scores_only_slices_with_ground_truth_with_in_plane_spacing():
    pred, gt = _stack()
    result = evaluate_case(pred, gt, (10.0, 0.5, 0.5), [1], mode="2d")
    assert result["mode"] == "2d"
    assert [score["slice"] for score in result["scores"]] == [1, 2]
    in_plane = asd(pred[1] == 1, gt[1] == 1, (0.5, 0.5))
    assert result["scores"][0]["classes"][1]["asd_mm"] == pytest.approx(in_plane)
    assert result["scores"][0]["classes"][1]["dice"] == pytest.approx(200 * 30 / 72)


def test_per_slice_mode_honours_slices_and_exclude_slices():
    pred, gt = _stack()
    kept = evaluate_case(pred, gt, (1, 1, 1), [1], mode="2d", slices=[0, 2, 3])
    assert [score["slice"] for score in kept["scores"]] == [2]
    dropped = evaluate_case(pred, gt, (1, 1, 1), [1], mode="2d", exclude_slices=[1])
    assert [score["slice"] for score in dropped["scores"]] == [2]
    with pytest.raises(ValueError, match="outside"):
        evaluate_case(pred, gt, (1, 1, 1), [1], mode="2d", exclude_slices=[4])


def test_3d_mode_scores_the_volume_once_with_the_slice_spacing():
    pred, gt = _stack()
    result = evaluate_case(pred, gt, (10.0, 0.5, 0.5), [1])
    assert result["mode"] == "3d" and len(result["scores"]) == 1
    scores = result["scores"][0]["classes"][1]
    assert scores["dice"] == pytest.approx(200 * 60 / (72 + 76))  # the slice-3 false positive counts
    assert scores["asd_mm"] == pytest.approx(asd(pred == 1, gt == 1, (10.0, 0.5, 0.5)))


def test_invalid_arguments_are_rejected():
    pred, gt = _stack()
    with pytest.raises(ValueError, match="spacing"):
        evaluate_case(pred, gt, (1.0, 1.0), [1])
    with pytest.raises(ValueError, match="shape"):
        evaluate_case(pred[:2], gt, (1.0, 1.0, 1.0), [1])
    with pytest.raises(ValueError, match="3D arrays"):
        evaluate_case(pred[0], gt[0], (1.0, 1.0), [1], mode="3d")
    with pytest.raises(ValueError, match="per slice"):
        evaluate_case(pred, gt, (1.0, 1.0, 1.0), [1], mode="3d", slices=[1])


# --- cross-check against a second implementation (MedPy) -----------------------------------------


@pytest.fixture(scope="module")
def medpy_binary():
    return pytest.importorskip("medpy.metric.binary", reason="MedPy is the cross-check reference (test extra)")


@st.composite
def mask_pairs(draw):
    ndim = draw(st.sampled_from([2, 3]))
    side = st.integers(3, 12 if ndim == 2 else 6)
    shape = tuple(draw(side) for _ in range(ndim))
    masks = arrays(bool, shape).filter(lambda m: m.any())
    spacing = tuple(draw(st.floats(0.2, 5.0)) for _ in range(ndim))
    return draw(masks), draw(masks), spacing


@settings(max_examples=60, deadline=None)
@given(mask_pairs())
def test_asd_and_dice_agree_with_medpy(medpy_binary, pair):
    pred, gt, spacing = pair
    expected = medpy_binary.assd(pred, gt, voxelspacing=spacing)
    # SimpleITK's distance map is float32: agree to ~1e-6 relative.
    assert asd(pred, gt, spacing) == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert dice(pred, gt) == pytest.approx(100 * medpy_binary.dc(pred, gt))


def test_asd_of_shifted_disk_agrees_with_medpy(medpy_binary):
    spacing = (0.4, 0.6)
    pred = ball((110, 75), spacing, (22.0, 18.0), 12.0)
    gt = ball((110, 75), spacing, (25.0, 20.0), 10.0)
    assert asd(pred, gt, spacing) == pytest.approx(medpy_binary.assd(pred, gt, voxelspacing=spacing), rel=1e-5)
