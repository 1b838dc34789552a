"""The SAM encoder never trains, never drifts and is never saved; the SAM branch does change the output."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nnsam_core.bundle import MODEL_FILE
from nnsam_core.encoders import load_encoder
from nnsam_core.model.bank import EmbeddingBank
from nnsam_core.model.grid import GRID_CHANNELS, grid_channels
from nnsam_core.predict import Segmenter


def test_encoder_bit_identical_after_training(trained):
    _, spy = trained
    assert spy.encoders, "training built no SAM encoder"
    for encoder, before in spy.encoders:
        after = encoder.state_fingerprint()
        assert before.keys() == after.keys()
        bn_buffers = [k for k in before if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
        assert bn_buffers, "expected BatchNorm buffers in the TinyViT"
        for key in before:
            assert torch.equal(before[key], after[key]), f"{key} changed during training"
        assert not encoder.module.training, "encoder left in train mode"
        assert not any(p.requires_grad for p in encoder.module.parameters())


def test_checkpoint_holds_no_encoder_tensors(trained):
    bundle, spy = trained
    saved = torch.load(bundle.path / MODEL_FILE, map_location="cpu", weights_only=True)["network_weights"]
    encoder_state = spy.encoders[0][0].module.state_dict()
    saved_numel = sum(t.numel() for t in saved.values())
    encoder_numel = sum(t.numel() for t in encoder_state.values())
    segmenter = Segmenter(bundle, "cpu")
    network_numel = sum(t.numel() for t in segmenter.network.state_dict().values())
    assert saved_numel == network_numel  # exactly the fused U-Net, nothing more
    assert not any(k.startswith(("patch_embed", "layers.", "neck", "image_encoder")) for k in saved)
    # and no saved tensor is a copy of an encoder tensor
    encoder_shapes = {tuple(t.shape) for t in encoder_state.values() if t.numel() > 1000}
    for key, tensor in saved.items():
        if tuple(tensor.shape) in encoder_shapes:
            assert not any(torch.equal(tensor, e) for e in encoder_state.values() if e.shape == tensor.shape), key
    assert encoder_numel > 5_000_000


def test_network_train_mode_does_not_reach_encoder(trained):
    bundle, _ = trained
    segmenter = Segmenter(bundle, "cpu")
    encoder = load_encoder("litemedsam")
    bank = EmbeddingBank(encoder, lambda keys: [np.zeros((64, 64), np.float32) for _ in keys])
    segmenter.network.attach_bank(bank)
    segmenter.network.train()
    assert not encoder.module.training
    assert all(not p.requires_grad for p in encoder.module.parameters())
    assert not any(p is q for p in segmenter.network.parameters() for q in encoder.module.parameters())


def _logits_with_embedding(network, embedding: torch.Tensor, image: np.ndarray) -> torch.Tensor:
    class FixedBank:
        def get(self, keys, device):
            return embedding.expand(len(keys), -1, -1, -1).to(device)

    network.attach_bank(FixedBank())
    x = np.concatenate([image[None, None], grid_channels((1, *image.shape), [1])])[:, 0]
    with torch.no_grad():
        return network(torch.from_numpy(x[None]).float())


def test_sam_branch_changes_logits(trained):
    bundle, _ = trained
    network = Segmenter(bundle, "cpu").network.eval()
    rng = np.random.default_rng(0)
    image = rng.normal(size=(128, 128)).astype(np.float32)
    embedding = torch.from_numpy(rng.normal(0, 0.1, size=(1, 256, 64, 64)).astype(np.float32))
    a = _logits_with_embedding(network, embedding, image)
    a_again = _logits_with_embedding(network, embedding.clone(), image)
    b = _logits_with_embedding(network, embedding * -3.0 + 0.5, image)
    assert torch.equal(a, a_again)
    assert (a - b).abs().max() > 1e-3


def test_grid_channels_follow_mirroring_and_tiling(trained):
    """Mirroring a patch mirrors the SAM features; a tile sees the crop of the whole slice's features."""
    bundle, _ = trained
    network = Segmenter(bundle, "cpu").network
    embedding = torch.arange(256 * 64 * 64, dtype=torch.float32).reshape(1, 256, 64, 64).sin()

    class FixedBank:
        def get(self, keys, device):
            return embedding.expand(len(keys), -1, -1, -1)

    network.attach_bank(FixedBank())
    grid = torch.from_numpy(grid_channels((1, 128, 128), [1])[:, 0])[None]
    full = network.sam_features(grid, (16, 16))
    flipped = network.sam_features(torch.flip(grid, (3,)), (16, 16))
    assert torch.allclose(torch.flip(flipped, (3,)), full, atol=1e-5)
    tile = network.sam_features(grid[:, :, 64:128, 32:96], (8, 8))
    assert torch.allclose(tile, full[:, :, 8:16, 4:12], atol=1e-5)
    padded = torch.nn.functional.pad(grid, (0, 16, 0, 0))  # nnU-Net pads with 0: outside the slice
    outside = network.sam_features(padded, (16, 18))
    assert torch.count_nonzero(outside[..., 16:]) == 0
    assert GRID_CHANNELS == 3


def test_embedding_norm_uses_training_statistics(trained):
    bundle, _ = trained
    weights = bundle.network_weights
    assert not torch.allclose(weights["embedding_std"], torch.ones(256))
    assert bundle.manifest["injection"]["embedding_norm"] == "standardise"


def test_sam_input_preparations():
    """nnunet: the normalised slice as it is; unit-range: each slice rescaled to [0, 1] (MedSAM's convention)."""
    encoder = load_encoder("litemedsam", pretrained=False)
    base = torch.linspace(-2, 3, 32 * 32).reshape(1, 1, 32, 32)
    slices = torch.cat([base, 10 * base + 7])   # same content, another gain and offset
    as_is = encoder.prepare(slices)
    assert as_is.shape == (2, 3, 256, 256)
    assert float(as_is[0].min()) < -1.5 and float(as_is[1].max()) > 30
    unit = encoder.prepare(slices, "unit-range")
    for s in unit:
        assert float(s.min()) == pytest.approx(0, abs=1e-6) and float(s.max()) == pytest.approx(1, abs=1e-6)
    assert torch.allclose(unit[0], unit[1], atol=1e-5)   # gain and offset no longer matter
    chosen = load_encoder("litemedsam", pretrained=False, preparation="unit-range")
    assert torch.equal(chosen.prepare(slices), unit)
    with pytest.raises(ValueError, match="unknown SAM input"):
        load_encoder("litemedsam", pretrained=False, preparation="imagenet")


def test_sam_input_defaults_to_the_encoders_convention_and_is_recorded(trained):
    from nnsam_core.config import NNSAMConfig

    assert NNSAMConfig().sam_input == "unit-range"                      # LiteMedSAM was trained on [0, 1]
    assert NNSAMConfig(encoder="mobilesam").sam_input == "nnunet"       # SAM on ImageNet-standardised pixels
    bundle, _ = trained
    assert bundle.manifest["nnsam_config"]["sam_input"] == "unit-range"
    assert bundle.manifest["sam_input_preparation"].endswith("min_max_to_unit_range_per_slice")
    # A bundle written before the setting existed was trained on the z-scored slice and must be read so.
    old = {k: v for k, v in bundle.manifest["nnsam_config"].items() if k != "sam_input"}
    assert NNSAMConfig.from_dict(old).sam_input == "nnunet"
