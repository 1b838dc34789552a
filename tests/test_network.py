"""The fused network's structure: injection stage, deep supervision, configurable injection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nnsam_core.network import NNSAMConfig, build_nnsam_network, choose_inject_skip, grid_channels


@pytest.mark.parametrize("strides, target, expected", [
    ([[1, 1], [2, 2], [2, 2], [2, 2], [2, 2], [2, 2]], 8, 3),
    ([[1, 1], [2, 2], [2, 2], [2, 2], [2, 2], [2, 2]], 4, 2),
    ([[1, 1], [2, 2], [2, 2]], 8, 1),          # too shallow: the deepest skip that is not the bottleneck
    ([[1, 1], [1, 2], [2, 2], [2, 2], [2, 2]], 8, 4 - 1),  # anisotropic: both axes must reach the stride
])
def test_choose_inject_skip(strides, target, expected):
    assert choose_inject_skip(strides, target) == expected


class _Bank:
    def get(self, keys, device):
        return torch.ones((len(keys), 256, 64, 64), device=device)


@pytest.mark.parametrize("inject_stride", [8, 4])
def test_deep_supervision_and_injection(trained, inject_stride):
    from nnsam_core.predict import Segmenter

    bundle, _ = trained
    base = Segmenter(bundle, "cpu")
    config = NNSAMConfig(inject_stride=inject_stride)
    net = build_nnsam_network(base.plans_manager, base.configuration_manager, 1, 8, True, config)
    net.attach_bank(_Bank())
    patch = base.configuration_manager.patch_size
    x = np.concatenate([np.random.default_rng(0).normal(size=(1, 1, *patch)), grid_channels((1, *patch), [1])])
    x = torch.from_numpy(x[:, 0][None]).float()
    outputs = net(x)
    assert isinstance(outputs, list) and len(outputs) == len(net.decoder.stages)
    assert outputs[0].shape == (1, 8, *patch)
    skip = net.inject_skip
    skip_size = net.encoder(x[:, :1])[skip].shape[-1]
    assert patch[-1] // skip_size == inject_stride
    first_conv = net.decoder.stages[net.decoder.inject_decoder_stage].convs[0].conv
    assert first_conv.in_channels == 2 * net.encoder.output_channels[skip] + 256
    net.decoder.deep_supervision = False
    single = net(x)
    assert torch.is_tensor(single) and single.shape == (1, 8, *patch)
