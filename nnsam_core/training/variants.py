"""Variants of nnUNetTrainerNNSAM for ``nnUNetv2_train ... -tr NAME``: encoder, controls and schedules. Each one's
settings are listed by name in ``nnsam_core.methods.TRAINER_CATALOGUE`` (the registry checks they agree)."""

from __future__ import annotations

from ..config import NNSAMConfig
from .nnsam import nnUNetTrainerNNSAM


class nnUNetTrainerNNSAM_MobileSAM(nnUNetTrainerNNSAM):
    nnsam_config = NNSAMConfig(encoder="mobilesam")


class nnUNetTrainerNNSAMCached(nnUNetTrainerNNSAM):
    """The fastest nnSAM: every training step samples the cached embeddings (no encoder call once the bank is
    filled), a little less accurate than the default share (docs/results.md)."""
    nnsam_config = NNSAMConfig(recompute_share=0.0)


class nnUNetTrainerNNSAMRandom(nnUNetTrainerNNSAM):
    """Control: the same network with a randomly initialised (frozen) encoder."""
    nnsam_config = NNSAMConfig(pretrained=False)


class nnUNetTrainerNNSAMRandom_MobileSAM(nnUNetTrainerNNSAM):
    nnsam_config = NNSAMConfig(encoder="mobilesam", pretrained=False)


class nnUNetTrainerNNSAMRecomputed(nnUNetTrainerNNSAM):
    """Reference for the embedding cache: the encoder runs on every augmented patch at every training step, as
    in the authors' code (slow)."""
    nnsam_config = NNSAMConfig(embeddings="recomputed", recompute_share=0.0)  # every step recomputes: no share


class nnUNetTrainerNNSAM_debug(nnUNetTrainerNNSAM):
    """Two iterations: checks a setup end to end."""
    default_iterations = 2


class nnUNetTrainerNNSAM_1epoch(nnUNetTrainerNNSAM):
    default_iterations = 25


class nnUNetTrainerNNSAM_10epochs(nnUNetTrainerNNSAM):
    default_iterations = 250


class nnUNetTrainerNNSAM_50epochs(nnUNetTrainerNNSAM):
    default_iterations = 1250


class nnUNetTrainerNNSAM_250epochs(nnUNetTrainerNNSAM):
    default_iterations = 6250


class nnUNetTrainerNNSAM_full(nnUNetTrainerNNSAM):
    """nnU-Net's default schedule: 1000 epochs x 250 iterations (the paper's setup)."""
    default_iterations = 250_000
    iterations_per_epoch_cap = 250
