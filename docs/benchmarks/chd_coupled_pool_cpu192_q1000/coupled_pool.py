"""``nnsam benchmark`` with part of the training on a pool of coupled (augmented patch, its own embedding) pairs.

Recomputing the embedding of every augmented patch (``nnsam-recomputed``) couples the two branches: the decoder
gets the SAM features *of the very patch* the U-Net sees, with its shift, turn, scaling, mirroring, noise and
blur. The cache samples the clean slice's embedding at the patch's pixels instead. Here, before training, POOL
patches are drawn from the trainer's own training data loader (nnU-Net's sampling and augmentation, unchanged)
and embedded once, as recomputing would embed them; in training, a share SHARE of the steps trains on a pooled
batch with its own embeddings (the engine's recomputed path, fed the stored embeddings), the other steps on fresh
batches with the cache, as the engine does. Inference is the engine's (one embedding per slice). If coupling is
what recomputing's lead comes from, this should recover part of it for POOL encoder calls instead of one per
patch per step.

    python coupled_pool.py POOL SHARE BENCHMARK ARGUMENTS ...     # as `nnsam benchmark`, methods nnsam only
"""

import sys

import torch

from nnsam_core import cli
from nnsam_core.training import nnUNetTrainerNNSAM

engine_on_train_start = nnUNetTrainerNNSAM.on_train_start
engine_train_step = nnUNetTrainerNNSAM.train_step
engine_on_train_end = nnUNetTrainerNNSAM.on_train_end


def coupled_pool(pool_size: int, share: float):
    def on_train_start(self):
        engine_on_train_start(self)
        bank = self.embedding_bank
        self.coupled_pool, self.pooled_steps = [], 0
        while sum(len(batch["data"]) for batch, _ in self.coupled_pool) < pool_size:
            batch = next(self.dataloader_train)
            with torch.no_grad():
                embeddings = bank.encode(batch["data"][:, :1].to(self.device)).to("cpu", torch.float16)
            self.coupled_pool.append((batch, embeddings))
        self.print_to_log_file(f"coupled pool: {len(self.coupled_pool)} batches embedded "
                               f"({bank.encoder_calls} encoder calls in all), share {share}")

    def train_step(self, batch):
        if not self.coupled_pool or float(torch.rand(())) >= share:
            return engine_train_step(self, batch)
        pooled, embeddings = self.coupled_pool[int(torch.randint(len(self.coupled_pool), ()))]
        network, bank = self._network_module(), self.embedding_bank

        def stored_embeddings(slices):  # the engine's recomputed path asks the bank to encode the patch now
            assert slices.shape[0] == embeddings.shape[0] and torch.equal(slices.cpu(), pooled["data"][:, :1])
            return embeddings.to(slices.device, torch.float32)

        network.config_dict["embeddings"] = "recomputed"
        bank.encode = stored_embeddings  # shadows the method for this step only
        self.pooled_steps += 1
        try:
            return engine_train_step(self, dict(pooled))
        finally:
            network.config_dict["embeddings"] = "cached"
            del bank.encode

    def on_train_end(self):
        self.print_to_log_file(f"coupled pool: {self.pooled_steps} of {self._steps_done} steps trained on it")
        engine_on_train_end(self)

    return on_train_start, train_step, on_train_end


if __name__ == "__main__":
    (nnUNetTrainerNNSAM.on_train_start, nnUNetTrainerNNSAM.train_step,
     nnUNetTrainerNNSAM.on_train_end) = coupled_pool(int(sys.argv[1]), float(sys.argv[2]))
    sys.exit(cli.main(["benchmark", *sys.argv[3:]]))
