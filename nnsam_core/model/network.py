"""NNSAMNet: nnU-Net's PlainConvUNet encoder plus the fused decoder, fed by the embedding bank."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import NNSAMConfig
from ..encoders import EMBEDDING_CHANNELS
from .bank import EmbeddingBank
from .decoder import FusedUNetDecoder, choose_inject_skip
from .grid import GRID_CHANNELS


class NNSAMNet(nn.Module):
    """Input: image channels followed by the 3 grid channels.

    ``sam_bank`` (an :class:`EmbeddingBank`) is attached by the trainer or the segmenter and, like the frozen
    encoder it holds, is not a submodule: it is never saved, optimised or switched to train mode.
    """

    def __init__(self, unet: nn.Module, config: NNSAMConfig, inject_skip: int, deep_supervision: bool):
        super().__init__()
        encoder = unet.encoder
        self.config = config
        self.encoder = encoder
        n_conv_decoder = [len(stage.convs) for stage in unet.decoder.stages]
        self.decoder = FusedUNetDecoder(encoder, unet.decoder.num_classes, n_conv_decoder, deep_supervision,
                                        inject_skip)
        self.inject_skip = inject_skip
        # Training-set statistics of the embedding; saved in checkpoints (tiny, and not encoder weights).
        self.register_buffer("embedding_mean", torch.zeros(EMBEDDING_CHANNELS))
        self.register_buffer("embedding_std", torch.ones(EMBEDDING_CHANNELS))
        object.__setattr__(self, "sam_bank", None)
        # Set by the trainer for the steps a recompute share sends down the recomputed path.
        self.recompute_this_step = False

    def attach_bank(self, bank: Optional[EmbeddingBank]) -> None:
        object.__setattr__(self, "sam_bank", bank)

    def set_embedding_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.embedding_mean.copy_(mean)
        self.embedding_std.copy_(std)

    def _bank(self) -> EmbeddingBank:
        if self.sam_bank is None:
            raise RuntimeError("no embedding bank attached to the nnSAM network")
        return self.sam_bank

    @staticmethod
    def _slice_coverage(grid: torch.Tensor, size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """At resolution ``size``: where the patch lies inside its slice (bool mask) and the slice position
        (row, col grid values) of each pooled pixel."""
        key_map = grid[:, 2:3]
        per_sample_key = key_map.flatten(1).amax(dim=1).clamp_min(1.0)[:, None, None, None]
        weight = (key_map / per_sample_key).clamp(0, 1)  # 1 inside the slice, 0 in padding, between at edges
        pooled_w = F.interpolate(weight, size=tuple(size), mode="area")
        pooled_rc = F.interpolate(grid[:, :2] * weight, size=tuple(size), mode="area")
        return pooled_w > 1e-3, pooled_rc / pooled_w.clamp_min(1e-3)

    def _standardise(self, features: torch.Tensor) -> torch.Tensor:
        if self.config.embedding_norm == "standardise":
            return (features - self.embedding_mean[None, :, None, None]) / self.embedding_std[None, :, None, None]
        return features

    def sam_features(self, grid: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Sample each patch's slice embedding at the patch's pixel positions, at resolution ``size``."""
        grid = grid.float()
        keys = torch.round(grid[:, 2].flatten(1).amax(dim=1)).long().tolist()
        inside, rc = self._slice_coverage(grid, size)
        embeddings = self._bank().get(keys, grid.device)
        positions = (2.0 * (rc - 1.0) - 1.0).flip(1)  # normalised (x=col, y=row), as grid_sample wants
        positions = torch.where(inside, positions, torch.full_like(positions, -2.0))  # zeros read outside
        sampled = F.grid_sample(embeddings, positions.permute(0, 2, 3, 1), mode="bilinear", padding_mode="zeros",
                                align_corners=False)
        return self._standardise(sampled) * inside

    def recomputed_sam_features(self, image: torch.Tensor, grid: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """The authors' way: run the frozen encoder on the augmented patches themselves, now, and resize the
        embedding to resolution ``size``."""
        embeddings = self._bank().encode(image[:, :1]).to(image.device)
        inside, _ = self._slice_coverage(grid.float(), size)
        features = F.interpolate(embeddings, size=tuple(size), mode="bilinear", align_corners=False)
        return self._standardise(features) * inside

    def forward(self, x: torch.Tensor):
        image, grid = x[:, :-GRID_CHANNELS], x[:, -GRID_CHANNELS:]
        skips = self.encoder(image)
        size = skips[self.inject_skip].shape[2:]
        recompute = self.config.embeddings == "recomputed" or self.recompute_this_step
        if self.training and recompute:
            sam = self.recomputed_sam_features(image, grid, size)
        else:
            sam = self.sam_features(grid, size)
        return self.decoder(skips, sam)


def build_nnsam_network(plans_manager, configuration_manager, num_input_channels: int, num_output_channels: int,
                        enable_deep_supervision: bool, config: NNSAMConfig) -> NNSAMNet:
    """nnU-Net's planned PlainConvUNet, fused with a SAM branch as ``config`` says."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    unet = get_network_from_plans(configuration_manager.network_arch_class_name,
                                  configuration_manager.network_arch_init_kwargs,
                                  configuration_manager.network_arch_init_kwargs_req_import,
                                  num_input_channels, num_output_channels, allow_init=True,
                                  deep_supervision=enable_deep_supervision)
    if not hasattr(unet, "encoder") or not hasattr(unet.encoder, "strides"):
        raise ValueError(f"nnSAM needs a U-Net with an encoder; plans use {configuration_manager.network_arch_class_name}")
    return fuse_sam_branch(unet, config, enable_deep_supervision)


def fuse_sam_branch(unet: nn.Module, config: NNSAMConfig, enable_deep_supervision: bool) -> NNSAMNet:
    """``unet`` (a PlainConvUNet) with the SAM branch ``config`` describes, its fused stage initialised as
    nnU-Net initialises its own."""
    inject_skip = choose_inject_skip(unet.encoder.strides, config.inject_stride)
    network = NNSAMNet(unet, config, inject_skip, enable_deep_supervision)
    if hasattr(unet, "initialize"):
        network.decoder.stages[network.decoder.inject_decoder_stage].apply(unet.initialize)
    return network
