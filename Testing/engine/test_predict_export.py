"""Slab-wise export gives exactly nnU-Net's whole-volume export, without holding whole-volume logits."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch


def test_slab_export_equals_nnunet_export(trained, chest_ct):
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    from nnsam_core.predict import Segmenter, _SlabToLabels

    segmenter = Segmenter(trained[0], "cpu")
    volume = sitk.ReadImage(chest_ct[0])[:, :, 8:13]
    volume.SetSpacing((2.0, 2.5, 7.0))  # in-plane resampling happens both ways
    data = sitk.GetArrayFromImage(volume).astype(np.float32)[None]
    data, _, properties = DefaultPreprocessor(verbose=False).run_case_npy(
        data, None, {"spacing": list(volume.GetSpacing())[::-1]}, segmenter.plans_manager,
        segmenter.configuration_manager, trained[0].dataset_json)
    n_classes = segmenter.label_manager.num_segmentation_heads
    logits = torch.from_numpy(np.random.default_rng(0).normal(size=(n_classes, *data.shape[1:])).astype(np.float32))

    expected = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits.clone(), segmenter.plans_manager, segmenter.configuration_manager, segmenter.label_manager,
        dict(properties), return_probabilities=False)
    slabs = _SlabToLabels(segmenter.plans_manager, segmenter.configuration_manager, segmenter.label_manager,
                          properties)
    for z0 in range(0, data.shape[1], 2):
        z1 = min(data.shape[1], z0 + 2)
        slabs.add(z0, z1, logits[:, z0:z1])
    result = slabs.result()
    assert result.shape == tuple(volume.GetSize())[::-1]
    assert np.array_equal(result, np.asarray(expected))


def _with_scheme(bundle, scheme: str, median_slices: int):
    import copy
    changed = copy.deepcopy(bundle)
    changed.plans["configurations"]["2d"]["normalization_schemes"] = [scheme]
    changed.plans["original_median_shape_after_transp"][0] = median_slices
    return changed


def _two_slices_one_brighter(chest_ct, bundle) -> sitk.Image:
    # The same slice twice, the second with another gain and offset (as MR intensities drift between slices),
    # at the planned spacing so that nnU-Net does not resample.
    base = sitk.GetArrayFromImage(sitk.ReadImage(chest_ct[0])[:, :, 20:21]).astype(np.float32)
    volume = sitk.GetImageFromArray(np.concatenate([base, base * 3 + 500]))
    row, column = bundle.plans["configurations"]["2d"]["spacing"]
    volume.SetSpacing((column, row, 5.0))
    return volume


def test_per_image_normalisation_is_per_slice_for_slice_trained_models(trained, chest_ct):
    """fine_tune trains on one-slice cases, so a z-score model must see each slice normalised on its own."""
    from nnsam_core.predict import Segmenter

    volume = _two_slices_one_brighter(chest_ct, trained[0])
    segmenter = Segmenter(_with_scheme(trained[0], "ZScoreNormalization", 1), "cpu")
    data, _ = segmenter.preprocess(volume)
    assert np.allclose(data[0, 0], data[0, 1], atol=1e-4)
    alone, _ = segmenter.preprocess(volume[:, :, 1:2])  # as a one-slice training case is preprocessed
    assert np.allclose(data[0, 1], alone[0, 0], atol=1e-5)


def test_volume_trained_and_ct_models_keep_nnunets_normalisation(trained, chest_ct):
    from nnsam_core.predict import Segmenter

    volume = _two_slices_one_brighter(chest_ct, trained[0])
    # A model trained by nnUNetv2_train on whole volumes: one z-score over the volume, as nnU-Net does.
    data, _ = Segmenter(_with_scheme(trained[0], "ZScoreNormalization", 40), "cpu").preprocess(volume)
    assert not np.allclose(data[0, 0], data[0, 1], atol=1e-2)
    # CT: fixed window and statistics from the training set, whatever the slice.
    ct_bundle = _with_scheme(trained[0], "CTNormalization", 1)
    data, _ = Segmenter(ct_bundle, "cpu").preprocess(volume)
    props = ct_bundle.plans["foreground_intensity_properties_per_channel"]["0"]
    raw = sitk.GetArrayFromImage(volume)[0]
    expected = (np.clip(raw, props["percentile_00_5"], props["percentile_99_5"]) - props["mean"]) / max(props["std"], 1e-8)
    assert np.allclose(data[0, 0], expected, atol=1e-4)
