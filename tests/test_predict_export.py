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
