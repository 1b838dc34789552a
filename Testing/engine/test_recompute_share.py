"""Partial recomputing (NNSAMConfig.recompute_share): a random share of the training steps runs the frozen encoder
on the augmented patches, as nnsam-recomputed does at every step; the other steps and inference use the cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nnsam_core.errors import NNSAMError
from nnsam_core.config import NNSAMConfig
from nnsam_core.model.grid import grid_channels
from nnsam_core.model.network import NNSAMNet, build_nnsam_network


def test_share_is_validated_and_old_configs_have_none():
    for share in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="recompute_share"):
            NNSAMConfig(recompute_share=share)
    assert NNSAMConfig(recompute_share=1.0).recompute_share == 1.0
    old = NNSAMConfig().as_dict()
    old.pop("recompute_share")
    assert NNSAMConfig.from_dict(old).recompute_share == 0.0


class _RecordingBank:
    def __init__(self):
        self.encoder_calls = 0
        self.gets = 0

    def encode(self, slices):
        self.encoder_calls += slices.shape[0]
        return slices.mean(dim=(1, 2, 3), keepdim=True).expand(-1, 256, 64, 64).clone()

    def get(self, keys, device):
        self.gets += 1
        return torch.ones((len(keys), 256, 64, 64), device=device)


def test_a_cached_network_recomputes_only_the_training_steps_it_is_told(trained):
    from nnsam_core.predict import Segmenter

    base = Segmenter(trained[0], "cpu")
    net = build_nnsam_network(base.plans_manager, base.configuration_manager, 1, 8, False,
                              NNSAMConfig(recompute_share=0.5, embedding_norm="none"))
    bank = _RecordingBank()
    net.attach_bank(bank)
    patch = list(base.configuration_manager.patch_size)
    image = np.random.default_rng(0).normal(size=(1, 1, *patch)).astype(np.float32)
    x = torch.from_numpy(np.concatenate([image, grid_channels((1, *patch), [1])[:, 0][None]], axis=1))

    net.train()
    net(x)
    assert (bank.gets, bank.encoder_calls) == (1, 0)          # not told: the cache
    net.recompute_this_step = True
    net(x)
    assert (bank.gets, bank.encoder_calls) == (1, 1)          # told: the encoder on the patch
    net.eval()
    net(x)
    assert (bank.gets, bank.encoder_calls) == (2, 1)          # inference never recomputes


def test_fine_tune_recomputes_a_share_of_the_steps_and_records_it(chest_ct, tmp_path, monkeypatch):
    from conftest import CHEST_SLICES
    from nnsam_core import fine_tune
    from nnsam_core.predict import Segmenter

    paths = []  # (training?, recomputed?) per forward pass
    cached, recomputed = NNSAMNet.sam_features, NNSAMNet.recomputed_sam_features

    def recording_cached(self, grid, size):
        paths.append((self.training, False))
        return cached(self, grid, size)

    def recording_recomputed(self, image, grid, size):
        paths.append((self.training, True))
        return recomputed(self, image, grid, size)

    monkeypatch.setattr(NNSAMNet, "sam_features", recording_cached)
    monkeypatch.setattr(NNSAMNet, "recomputed_sam_features", recording_recomputed)
    iterations = 8
    bundle = fine_tune(*chest_ct, output=tmp_path / "model.nnsam", slices=CHEST_SLICES, iterations=iterations,
                       device="cpu", nnsam_config=NNSAMConfig(recompute_share=0.5))
    training = [was_recomputed for in_training, was_recomputed in paths if in_training]
    assert len(training) == iterations
    assert 0 < sum(training) < iterations                      # some steps each way, drawn per step
    assert not any(was_recomputed for in_training, was_recomputed in paths if not in_training)  # validation: cache
    assert bundle.manifest["nnsam_config"]["recompute_share"] == 0.5

    paths.clear()
    import SimpleITK as sitk
    volume = sitk.GetImageFromArray(np.random.default_rng(0).normal(0, 300, size=(2, 48, 48)).astype(np.float32))
    Segmenter(bundle, "cpu").segment(volume)
    assert paths and not any(was_recomputed for _, was_recomputed in paths)  # inference: one embedding per slice



# ----------------------------------------------------------------------------------------- the default share
def test_nnsam_trains_at_a_tenth_by_default_and_the_cached_variant_at_none():
    from nnsam_core.methods import DEFAULT_RECOMPUTE_SHARE
    from nnsam_core.training.nnsam import nnUNetTrainerNNSAM
    from nnsam_core.training.registry import config_of_trainer
    from nnsam_core.training.variants import (nnUNetTrainerNNSAMCached, nnUNetTrainerNNSAMRandom,
                                              nnUNetTrainerNNSAMRecomputed)

    assert DEFAULT_RECOMPUTE_SHARE == 0.1 == NNSAMConfig().recompute_share
    assert config_of_trainer(nnUNetTrainerNNSAM).recompute_share == 0.1
    assert config_of_trainer(nnUNetTrainerNNSAMRandom).recompute_share == 0.1  # the control differs in weights only
    assert config_of_trainer(nnUNetTrainerNNSAMCached).recompute_share == 0.0
    assert config_of_trainer(nnUNetTrainerNNSAMRecomputed).recompute_share == 0.0  # every step: no share


@pytest.mark.parametrize("argv, share", [([], 0.1), (["--recompute-share", "0"], 0.0),
                                         (["--recompute-share", "0.25"], 0.25)])
def test_nnsam_train_passes_the_default_share_or_the_one_given(argv, share, monkeypatch, tmp_path):
    import nnsam_core.finetune as finetune
    from nnsam_core.cli import main
    from nnsam_core.training.registry import config_of_trainer, trainer_for

    seen = {}
    monkeypatch.setattr(finetune, "fine_tune", lambda *a, **kw: seen.update(kw))
    assert main(["train", "i.nrrd", "l.nrrd", "-o", str(tmp_path / "b"), *argv]) == 0
    config = seen["nnsam_config"] or config_of_trainer(trainer_for(seen["method"] or "nnsam", "litemedsam"))
    assert config.recompute_share == share and config.embeddings == "cached"


def test_nnunet_takes_no_share(monkeypatch, tmp_path, capsys):
    import nnsam_core.finetune as finetune
    from nnsam_core.cli import main

    monkeypatch.setattr(finetune, "fine_tune", lambda *a, **kw: None)
    assert main(["train", "i.nrrd", "l.nrrd", "-o", str(tmp_path / "b"), "--method", "nnunet"]) == 0
    assert main(["train", "i.nrrd", "l.nrrd", "-o", str(tmp_path / "b"), "--method", "nnunet",
                 "--recompute-share", "0.1"]) == 2
    assert "--recompute-share applies to nnSAM's embeddings; method nnunet has none" in capsys.readouterr().err


