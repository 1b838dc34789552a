"""nnUNetTrainerNNSAM: nnU-Net plus a frozen SAM encoder whose embedding is concatenated at the 1/8 skip.

Each training slice's embedding is computed once and sampled from the bank; a share of the steps, drawn at
random, run the encoder on the augmented patches instead (``NNSAMConfig.recompute_share``).

The SAM branch's settings are one typed :class:`~nnsam_core.config.NNSAMConfig`: a class attribute for nnU-Net's
own command line (``-tr NAME`` finds a class), which ``fine_tune`` overrides per trainer instance
(``trainer.nnsam_config = config`` before training starts).
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Optional

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from ..config import NNSAM_CONFIG_FILE, NNSAMConfig
from ..encoders import get_spec, input_preparation_description, load_encoder
from ..model.bank import EmbeddingBank
from ..model.grid import slice_key, split_key
from ..model.network import build_nnsam_network
from .datasets import grid_dataset_class
from .fewshot import nnUNetTrainerFewShot
from .transforms import protect_grid_channels



class _UsesTrainerConfig:
    """``build_network_architecture`` with the caller's configuration: a trainer instance's own (nnU-Net calls it
    through ``self`` while initialising), or the class's when nnU-Net's predictor calls it on the class."""

    def __get__(self, instance, owner):
        config = (instance if instance is not None else owner).nnsam_config
        return functools.partial(_build_network, config)


def _build_network(config, plans_manager, configuration_manager, num_input_channels, num_output_channels,
                   enable_deep_supervision=True):
    return build_nnsam_network(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                               enable_deep_supervision, config)


class nnUNetTrainerNNSAM(nnUNetTrainerFewShot):
    nnsam_config = NNSAMConfig()
    build_network_architecture = _UsesTrainerConfig()

    def initialize(self):
        super().initialize()
        self.dataset_class = grid_dataset_class(self.preprocessed_dataset_folder)
        self.sam_encoder = None
        self.embedding_bank: Optional[EmbeddingBank] = None
        self.recomputed_steps = 0  # steps the recompute share sent down the recomputed path

    def get_dataloaders(self):
        self.dataset_class = grid_dataset_class(self.preprocessed_dataset_folder)
        return super().get_dataloaders()

    @staticmethod
    def get_training_transforms(*args, **kwargs):
        return protect_grid_channels(nnUNetTrainer.get_training_transforms(*args, **kwargs))

    def _network_module(self):
        module = self.network.module if self.is_ddp else self.network
        return getattr(module, "_orig_mod", module)

    def ensure_embedding_bank(self) -> EmbeddingBank:
        """Load the frozen encoder and fill the bank with every training slice's embedding (once)."""
        if self.embedding_bank is not None:
            return self.embedding_bank
        config = self.nnsam_config
        self.sam_encoder = load_encoder(config.encoder, pretrained=config.pretrained, seed=config.random_seed,
                                        preparation=config.sam_input).to(self.device)
        dataset = self.dataset_class(self.preprocessed_dataset_folder)
        identifiers = sorted(dataset.case_index, key=dataset.case_index.get)

        def load_slices(keys):
            out = []
            for key in keys:
                case, z = split_key(key)
                out.extend(dataset.load_image_slices(identifiers[case], [z]))
            return out

        bank = EmbeddingBank(self.sam_encoder, load_slices)
        tr_keys, _ = self.do_split()
        warm = []
        for identifier in tr_keys:
            warm.extend(slice_key(dataset.case_index[identifier], z) for z in range(dataset.num_slices(identifier)))
        if self.progress_callback is not None:
            self.progress_callback({"stage": "embed", "step": 0, "total": len(warm), "loss": None, "eta_s": None,
                                    "message": f"computing {config.encoder} embeddings of {len(warm)} training slices"})
        bank.warm(warm)
        network = self._network_module()
        if config.embedding_norm == "standardise" and self.initial_weights is None:
            # an adapted model keeps the statistics its decoder learned with (they came with its weights)
            mean, std = bank.channel_statistics()
            network.set_embedding_statistics(mean.to(self.device), std.to(self.device))
        network.attach_bank(bank)
        self.embedding_bank = bank
        return bank

    def train_step(self, batch: dict) -> dict:
        share = self.nnsam_config.partial_recompute_share
        if share <= 0.0:
            return super().train_step(batch)
        # One draw per step from torch's generator (seeded by the run): which steps recompute is reproducible.
        network = self._network_module()
        network.recompute_this_step = float(torch.rand(())) < share
        self.recomputed_steps += int(network.recompute_this_step)
        try:
            return super().train_step(batch)
        finally:
            network.recompute_this_step = False

    def on_train_end(self):
        share = self.nnsam_config.partial_recompute_share
        if share > 0.0:
            self.print_to_log_file(f"recompute share {share:g}: {self.recomputed_steps} steps recomputed of "
                                   f"{self._steps_done - self._steps_at_start} in this run")
        super().on_train_end()

    def on_train_start(self):
        super().on_train_start()
        self.ensure_embedding_bank()
        self._record_config()
        self._train_started_at = time.monotonic()  # do not count encoder time in the training ETA

    def _record_config(self) -> None:
        """Write the SAM branch's settings beside nnU-Net's checkpoints (the plug-and-play route has no bundle
        manifest), so a results folder is read as it was trained even after a default changes."""
        if self.local_rank != 0:
            return
        path = os.path.join(self.output_folder, NNSAM_CONFIG_FILE)
        os.makedirs(self.output_folder, exist_ok=True)
        with open(path + ".partial", "w") as handle:
            json.dump(self.nnsam_config.as_dict(), handle, indent=2)
        os.replace(path + ".partial", path)

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.ensure_embedding_bank()
        super().perform_actual_validation(save_probabilities)

    def describe(self) -> dict:
        config = self.nnsam_config
        network = self._network_module()
        return {
            "method": config.method, "trainer": type(self).__name__,
            "encoder": {"name": config.encoder, "pretrained": config.pretrained,
                        "weights_sha256": self.sam_encoder.weights_sha256 if self.sam_encoder is not None else None,
                        "random_seed": None if config.pretrained else config.random_seed,
                        "input_size": get_spec(config.encoder).input_size,
                        # how the training embeddings were computed (segmenting may use another precision)
                        "precision": ("bfloat16-autocast" if self.device.type == "cuda" or
                                      getattr(self.sam_encoder, "cpu_precision", None) == "bfloat16" else "float32")},
            "nnsam_config": config.as_dict(),
            "injection": {"skip_index": network.inject_skip, "target_stride": config.inject_stride,
                          "decoder_stage": network.decoder.inject_decoder_stage,
                          "embedding_norm": config.embedding_norm},
            "sam_input_preparation": input_preparation_description(config.sam_input),
        }
