"""``nnsam benchmark`` with the cached SAM features of a training patch dropped at random (an experiment).

With the cache, a training slice's SAM features are the same at every step, so with 4 training slices the decoder
can learn them as a key to the slices' labels; recomputing (``nnsam-recomputed``) hands it different features at
every step, and white noise on the cached features (chd_noise_cpu192_q1000) is averaged away by the decoder's
convolutions. Here each training patch's SAM features are zeroed with probability RATE (all channels, the whole
patch), so the network cannot lean on them alone; inference uses them always, as in the engine.

    python sam_dropout.py RATE BENCHMARK ARGUMENTS ...          # as `nnsam benchmark`, methods nnsam only
"""

import sys

import torch

from nnsam_core import cli
from nnsam_core.network import NNSAMNet

engine_sam_features = NNSAMNet.sam_features


def dropped_sam_features(rate: float):
    def sam_features(self, grid, size):
        features = engine_sam_features(self, grid, size)
        if not self.training:  # inference: the clean embedding, as in the engine
            return features
        kept = (torch.rand(features.shape[0], device=features.device) >= rate).to(features.dtype)
        return features * kept[:, None, None, None]

    return sam_features


if __name__ == "__main__":
    NNSAMNet.sam_features = dropped_sam_features(float(sys.argv[1]))
    sys.exit(cli.main(["benchmark", *sys.argv[2:]]))
