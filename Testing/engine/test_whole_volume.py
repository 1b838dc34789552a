"""Whole-volume training: self-training on the scan's own unpainted slices (the painted slices keep the user's
labels, unpainted ones enter the second round with the first model's labels) and the clean-up chosen from the
painting (largest 3D piece of the structures painted as one piece)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnsam_core import selftraining
from nnsam_core.postprocess import keep_largest_components, single_piece_classes
from nnsam_core.selftraining import evenly_chosen, slice_confidence, weighted_painted
from nnsam_core.workspace import TrainingCase


def test_classes_painted_as_one_piece_are_chosen_and_brush_slips_do_not_count():
    labels = np.zeros((6, 40, 40), np.uint8)
    labels[1, 5:15, 5:15] = 1
    labels[1, 30, 30] = 1                      # a slip: 1 pixel beside a 100-pixel piece
    labels[4, 6:16, 6:16] = 1
    labels[1, 20:25, 20:25] = 2                # class 2 in two real pieces on slice 4
    labels[4, 20:25, 20:25] = 2
    labels[4, 30:36, 30:36] = 2
    labels[2, 1:3, 1:3] = 3                    # class 3 only on an unpainted slice
    assert single_piece_classes(labels, [1, 4], [1, 2, 3]) == [1]


def test_largest_component_removes_only_the_stray_pieces_of_the_chosen_classes():
    labels = np.zeros((5, 30, 30), np.uint8)
    labels[1:4, 5:12, 5:12] = 1
    labels[0, 25:28, 25:28] = 1                # a stray blob of class 1 far away
    labels[1:3, 15:18, 15:18] = 2
    labels[4, 25:28, 0:3] = 2                  # a second piece of class 2, not chosen
    out = keep_largest_components(labels.copy(), [1])
    assert (out[0, 25:28, 25:28] == 0).all() and (out[1:4, 5:12, 5:12] == 1).all()
    assert (out == 2).sum() == (labels == 2).sum()


def test_evenly_chosen_spreads_over_the_whole_range():
    assert evenly_chosen(list(range(100)), 5) == [0, 25, 50, 74, 99]
    assert evenly_chosen([3, 7], 5) == [3, 7]


def test_slice_confidence_looks_at_the_structures_and_the_unsure_pixels():
    labels = np.zeros((10, 10), np.uint8)
    confidence = np.ones((10, 10), np.float16)
    assert slice_confidence(labels, confidence) == 1.0       # sure there is nothing
    labels[2:4, 2:4] = 1
    confidence[2:4, 2:4] = 0.6
    assert slice_confidence(labels, confidence) == pytest.approx(0.6, abs=1e-3)
    confidence[8, 8] = 0.5                                    # an unsure background pixel counts too
    assert slice_confidence(labels, confidence) == pytest.approx((4 * 0.6 + 0.5) / 5, abs=1e-3)


def test_painted_slices_weigh_at_least_as_much_as_the_predicted_ones():
    image = sitk.Image(4, 4, 1, sitk.sitkFloat32)
    painted = [TrainingCase(f"slice_{k:04d}", image, image) for k in (3, 9)]
    cases = weighted_painted(painted, 5)
    assert len(cases) == 6 and sorted({c.name.split("_copy")[0] for c in cases}) == ["slice_0003", "slice_0009"]
    assert weighted_painted(painted, 0) == painted


def _labels_of(folder: Path) -> dict:
    return {p.name[:-len(".nii.gz")]: sitk.GetArrayFromImage(sitk.ReadImage(str(p)))[0]
            for p in sorted((folder / "labelsTr").glob("*.nii.gz"))}


def test_self_training_learns_from_unpainted_slices_and_never_changes_the_painted_ones(chest_ct, tmp_path,
                                                                                       monkeypatch):
    from nnsam_core import fine_tune
    from nnsam_core.images import read_image, read_labels
    from nnsam_core.workspace import DATASET_NAME

    monkeypatch.setattr(selftraining, "MIN_CONFIDENCE", 0.0)  # a model of a few steps is never confident
    monkeypatch.setattr(selftraining, "CANDIDATE_SLICES", 6)
    monkeypatch.setattr(selftraining, "MAX_PSEUDO_SLICES", 4)
    out = tmp_path / "whole"
    painted = [12, 18]
    bundle = fine_tune(*chest_ct, output=out, slices=painted, iterations=2, device="cpu", method="nnunet",
                       whole_volume=True, keep_work_dir=True)

    record = bundle.manifest["training"]["self_training"]
    assert record["first_round_iterations"] == 2 and record["second_round_iterations"] == 1
    assert len(record["pseudo_slices"]) == 4 and not set(record["pseudo_slices"]) & set(painted)
    assert bundle.manifest["training"]["slices"] == painted

    image = read_image(chest_ct[0])
    user = sitk.GetArrayFromImage(read_labels(chest_ct[1], image).image)
    assert bundle.manifest["postprocessing"] == {"largest_component": single_piece_classes(
        user, painted, range(1, len(bundle.classes) + 1))}
    work = out.with_name(f".{out.name}.nnsam-work")
    second = _labels_of(work / "round2" / "nnUNet_raw" / DATASET_NAME)
    for name, labels in second.items():
        if name.startswith("slice_"):
            z = int(name.split("_")[1])
            assert z in painted and np.array_equal(labels, user[z])      # the user's labels, unchanged
    pseudo = sorted(n for n in second if n.startswith("pseudo_"))
    assert [int(n.split("_")[1]) for n in pseudo] == record["pseudo_slices"]
    assert sum(n.startswith("slice_") for n in second) >= len(pseudo)   # painted weigh at least as much
    first = _labels_of(work / "round1" / "nnUNet_raw" / DATASET_NAME)
    assert sorted(first) == [f"slice_{z:04d}" for z in painted]          # round 1: the painted slices alone
    trained_cases = json.loads((work / "round2" / "nnUNet_preprocessed" / DATASET_NAME / "dataset.json").read_text())
    assert trained_cases["numTraining"] == len(second)


def test_whole_volume_is_refused_where_it_cannot_apply(chest_ct, tmp_path, trained):
    from nnsam_core import fine_tune
    from nnsam_core.errors import NNSAMError

    parent, _ = trained
    with pytest.raises(NNSAMError, match="adapts on the painted slices alone"):
        fine_tune(*chest_ct, output=tmp_path / "x", slices=[12], start_from=parent.path, whole_volume=True)
    assert not (tmp_path / "x").exists()


def test_segmenting_applies_the_bundles_clean_up(trained, chest_ct):
    from scipy import ndimage

    from nnsam_core.images import read_image
    from nnsam_core.predict import Segmenter

    bundle, _ = trained
    image = read_image(chest_ct[0])
    raw = sitk.GetArrayFromImage(Segmenter(bundle, "cpu").segment(image))
    pieces = {v: ndimage.label(raw == v)[1] for v in range(1, len(bundle.classes) + 1)}
    several = [v for v, n in pieces.items() if n > 1]
    assert several  # the few-step model leaves stray pieces: what the clean-up is for
    bundle.manifest["postprocessing"] = {"largest_component": several[:1]}
    try:
        cleaned = sitk.GetArrayFromImage(Segmenter(bundle, "cpu").segment(image))
    finally:
        bundle.manifest.pop("postprocessing")
    assert ndimage.label(cleaned == several[0])[1] == 1
    others = raw != several[0]
    assert np.array_equal(cleaned[others], raw[others])  # the other classes untouched


def test_every_fine_tune_on_painted_slices_records_the_clean_up_its_painting_chose(trained, chest_ct):
    from nnsam_core.images import read_image, read_labels
    from conftest import CHEST_SLICES

    bundle, _ = trained  # painted slices alone
    user = sitk.GetArrayFromImage(read_labels(chest_ct[1], read_image(chest_ct[0])).image)
    chosen = single_piece_classes(user, CHEST_SLICES, range(1, len(bundle.classes) + 1))
    assert bundle.manifest["postprocessing"] == {"largest_component": chosen}
    assert 0 < len(chosen) < len(bundle.classes)  # the ribs are painted in many pieces; some structures in one
