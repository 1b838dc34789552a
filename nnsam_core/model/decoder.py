"""nnU-Net's UNetDecoder with one stage that also takes the SAM features, and the choice of that stage."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder

from ..encoders import EMBEDDING_CHANNELS


class FusedUNetDecoder(UNetDecoder):
    """The decoder stage that consumes skip ``inject_skip`` also takes ``extra_channels`` of SAM features."""

    def __init__(self, encoder, num_classes, n_conv_per_stage, deep_supervision, inject_skip: int,
                 extra_channels: int = EMBEDDING_CHANNELS, nonlin_first: bool = False):
        super().__init__(encoder, num_classes, n_conv_per_stage, deep_supervision, nonlin_first=nonlin_first)
        n_stages = len(encoder.output_channels)
        self.inject_skip = inject_skip
        self.inject_decoder_stage = n_stages - 2 - inject_skip  # decoder stage s consumes skips[-(s + 2)]
        s = self.inject_decoder_stage
        skip_channels = encoder.output_channels[inject_skip]
        self.stages[s] = StackedConvBlocks(
            len(self.stages[s].convs), encoder.conv_op, 2 * skip_channels + extra_channels, skip_channels,
            encoder.kernel_sizes[inject_skip], 1, encoder.conv_bias, encoder.norm_op, encoder.norm_op_kwargs,
            encoder.dropout_op, encoder.dropout_op_kwargs, encoder.nonlin, encoder.nonlin_kwargs, nonlin_first)

    def forward(self, skips, sam_features: torch.Tensor):
        lres_input = skips[-1]
        seg_outputs = []
        for s in range(len(self.stages)):
            x = self.transpconvs[s](lres_input)
            parts = [x, skips[-(s + 2)]]
            if s == self.inject_decoder_stage:
                parts.append(sam_features.to(x.dtype))
            x = self.stages[s](torch.cat(parts, 1))
            if self.deep_supervision:
                seg_outputs.append(self.seg_layers[s](x))
            elif s == len(self.stages) - 1:
                seg_outputs.append(self.seg_layers[-1](x))
            lres_input = x
        seg_outputs = seg_outputs[::-1]
        return seg_outputs if self.deep_supervision else seg_outputs[0]


def choose_inject_skip(strides: Sequence, target_stride: int) -> int:
    """Index of the encoder skip whose in-plane downsampling first reaches ``target_stride`` (never the
    bottleneck, which is no skip)."""
    cumulative = np.ones(len(np.atleast_1d(strides[0])), dtype=int)
    last_skip = len(strides) - 2
    for k, stride in enumerate(strides):
        cumulative = cumulative * np.atleast_1d(stride)
        if int(cumulative.min()) >= target_stride:
            return min(k, last_skip)
    return last_skip
