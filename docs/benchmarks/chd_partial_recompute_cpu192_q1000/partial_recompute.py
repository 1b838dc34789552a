"""``nnsam benchmark`` recomputing the embeddings of the augmented patches at a share of the steps only.

Recomputing at every step (``nnsam-recomputed``) leads the cache by about 4 points at 192x192, and no fixed set of
extra embeddings tried so far (mirrors, intensity variants, views, a pool of coupled patches) recovers it. This
measures how much of the lead fresh embeddings at a share SHARE of the steps recover: those steps run the
engine's recomputed path (the encoder on the batch's augmented patches), the others the cache. The encoder cost
per step is SHARE times recomputing's. Inference is the engine's (one embedding per slice).

    python partial_recompute.py SHARE BENCHMARK ARGUMENTS ...     # as `nnsam benchmark`, methods nnsam only
"""

import sys

import torch

from nnsam_core import cli
from nnsam_core.training import nnUNetTrainerNNSAM

engine_train_step = nnUNetTrainerNNSAM.train_step
engine_on_train_end = nnUNetTrainerNNSAM.on_train_end


def partial_recompute(share: float):
    def train_step(self, batch):
        if float(torch.rand(())) >= share:
            return engine_train_step(self, batch)
        network = self._network_module()
        network.config_dict["embeddings"] = "recomputed"
        self.recomputed_steps = getattr(self, "recomputed_steps", 0) + 1
        try:
            return engine_train_step(self, batch)
        finally:
            network.config_dict["embeddings"] = "cached"

    def on_train_end(self):
        self.print_to_log_file(f"partial recompute: {getattr(self, 'recomputed_steps', 0)} of {self._steps_done} "
                               f"steps recomputed ({self.embedding_bank.encoder_calls} encoder calls in all)")
        engine_on_train_end(self)

    return train_step, on_train_end


if __name__ == "__main__":
    nnUNetTrainerNNSAM.train_step, nnUNetTrainerNNSAM.on_train_end = partial_recompute(float(sys.argv[1]))
    sys.exit(cli.main(["benchmark", *sys.argv[2:]]))
