"""``nnsam benchmark`` with Gaussian noise added to the cached SAM features in training (an experiment).

Recomputing the embedding on every augmented patch (``nnsam-recomputed``) hands the decoder features that differ
from the clean slice's embedding at every step, while the cache hands it the same features for the same pixels
every time; inference uses the clean embedding either way. If recomputing's lead over the cache comes from that
variability (a regulariser) rather than from more faithful features, noise of the same size on the cached
features should recover it at the cache's speed. NOISE is the standard deviation of the noise in units of the
standardised features; feature_gap.py measures how far recomputing's features are from the cache's per element.

    python feature_noise.py NOISE BENCHMARK ARGUMENTS ...          # as `nnsam benchmark`, methods nnsam only
"""

import sys

import torch

from nnsam_core import cli
from nnsam_core.network import NNSAMNet

engine_sam_features = NNSAMNet.sam_features


def noisy_sam_features(noise: float):
    def sam_features(self, grid, size):
        features = engine_sam_features(self, grid, size)
        if not self.training:  # inference: the clean embedding, as in the engine
            return features
        inside, _ = self._slice_coverage(grid.float(), size)
        return features + noise * torch.randn_like(features) * inside

    return sam_features


if __name__ == "__main__":
    NNSAMNet.sam_features = noisy_sam_features(float(sys.argv[1]))
    sys.exit(cli.main(["benchmark", *sys.argv[2:]]))
