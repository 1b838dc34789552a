"""The clean-up chosen from the painting: structures painted as one piece on every painted slice are kept to their
largest 3D piece when a bundle segments."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from nnsam_core.postprocess import keep_largest_components, single_piece_classes


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


def test_segmenting_applies_the_bundles_clean_up(trained, chest_ct):
    from scipy import ndimage

    from nnsam_core.images import read_image
    from nnsam_core.predict import Segmenter

    bundle, _ = trained
    image = read_image(chest_ct[0])
    recorded = bundle.manifest.pop("postprocessing", None)
    try:
        raw = sitk.GetArrayFromImage(Segmenter(bundle, "cpu").segment(image))
        pieces = {v: ndimage.label(raw == v)[1] for v in range(1, len(bundle.classes) + 1)}
        several = [v for v, n in pieces.items() if n > 1]
        assert several  # the few-step model leaves stray pieces: what the clean-up is for
        bundle.manifest["postprocessing"] = {"largest_component": several[:1]}
        cleaned = sitk.GetArrayFromImage(Segmenter(bundle, "cpu").segment(image))
    finally:
        bundle.manifest.pop("postprocessing", None)
        if recorded is not None:
            bundle.manifest["postprocessing"] = recorded
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
