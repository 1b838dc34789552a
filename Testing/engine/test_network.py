"""The fused network's structure: injection stage, deep supervision, configurable injection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nnsam_core.config import NNSAMConfig
from nnsam_core.model.decoder import choose_inject_skip
from nnsam_core.model.grid import grid_channels
from nnsam_core.model.network import build_nnsam_network


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


class _RecordingBank:
    """Records which way the network asked for SAM features."""

    def __init__(self):
        self.encoder_calls = 0
        self.encoded: list[torch.Tensor] = []
        self.gets = 0

    def encode(self, slices):
        self.encoder_calls += slices.shape[0]
        self.encoded.append(slices.detach().clone())
        # an embedding that depends on the input, so recomputed features follow the patch
        return slices.mean(dim=(1, 2, 3), keepdim=True).expand(-1, 256, 64, 64).clone()

    def get(self, keys, device):
        self.gets += 1
        return torch.ones((len(keys), 256, 64, 64), device=device)


def test_recomputed_embeddings_encode_each_training_patch_and_inference_uses_the_bank(trained):
    from nnsam_core.predict import Segmenter

    bundle, _ = trained
    base = Segmenter(bundle, "cpu")
    net = build_nnsam_network(base.plans_manager, base.configuration_manager, 1, 8, False,
                              NNSAMConfig(embeddings="recomputed", embedding_norm="none"))
    bank = _RecordingBank()
    net.attach_bank(bank)
    patch = list(base.configuration_manager.patch_size)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 1, *patch)).astype(np.float32)
    grids = np.stack([grid_channels((1, *patch), [k])[:, 0] for k in (1, 2)])
    grids[1, :, :, patch[1] // 2:] = 0  # the second patch's right half is padding, outside its slice
    x = torch.from_numpy(np.concatenate([images, grids], axis=1))

    net.train()
    net(x)
    assert bank.gets == 0 and bank.encoder_calls == 2
    assert len(bank.encoded) == 1 and torch.equal(bank.encoded[0], x[:, :1])  # the (augmented) patches themselves
    size = net.encoder(x[:, :1])[net.inject_skip].shape[2:]
    features = net.recomputed_sam_features(x[:, :1], x[:, 1:], size)
    assert torch.all(features[1, :, :, size[1] // 2 + 1:] == 0)   # nothing injected where the patch is padding
    assert torch.allclose(features[0], x[0, :1].mean().expand_as(features[0]))

    calls = bank.encoder_calls
    net.eval()
    net(x)
    assert bank.gets == 1 and bank.encoder_calls == calls  # inference: stored embeddings per slice, no encoder run


def test_embeddings_mode_is_validated_and_old_bundles_read_as_cached():
    with pytest.raises(ValueError, match="embeddings"):
        NNSAMConfig(embeddings="sometimes")
    old = NNSAMConfig().as_dict()
    old.pop("embeddings")
    assert NNSAMConfig.from_dict(old).embeddings == "cached"


def test_recomputed_method_names_its_trainer():
    from nnsam_core.errors import NNSAMError
    from nnsam_core.training.registry import trainer_for
    from nnsam_core.training.variants import nnUNetTrainerNNSAMRecomputed

    assert trainer_for("nnsam-recomputed", "litemedsam") is nnUNetTrainerNNSAMRecomputed
    assert nnUNetTrainerNNSAMRecomputed.nnsam_config.method == "nnsam-recomputed"
    with pytest.raises(NNSAMError, match="not available with the mobilesam encoder"):
        trainer_for("nnsam-recomputed", "mobilesam")
    with pytest.raises(NNSAMError, match="unknown method"):
        trainer_for("nnsam-fast", "litemedsam")
