"""Adapting a saved model to the next scan (--start-from): the network starts from the parent's weights, training
changes them, the parent is never modified, the new bundle records its parent, and mismatches are refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from nnsam_core.cli import main
from nnsam_core.errors import NNSAMError


def _hashes(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_adapting_starts_from_the_parents_weights_and_leaves_the_parent_untouched(trained, chest_ct, tmp_path,
                                                                                   monkeypatch):
    from nnsam_core import fine_tune
    from nnsam_core.adapt import ADAPT_LEARNING_RATE
    from nnsam_core.training.fewshot import nnUNetTrainerFewShot

    parent, _ = trained
    before = _hashes(Path(parent.path))
    at_start = {}
    initialize = nnUNetTrainerFewShot.initialize

    def spying_initialize(self):
        initialize(self)
        module = self.network
        at_start.update({k: v.detach().clone() for k, v in module.state_dict().items()})
        at_start["optimiser learning rate"] = self.optimizer.param_groups[0]["lr"]

    monkeypatch.setattr(nnUNetTrainerFewShot, "initialize", spying_initialize)
    child = fine_tune(*chest_ct, output=tmp_path / "adapted", slices=[12, 18], start_from=parent.path,
                      iterations=2, device="cpu")
    assert at_start.pop("optimiser learning rate") == ADAPT_LEARNING_RATE  # the adaptation's schedule
    assert child.manifest["training"]["learning_rate"] == ADAPT_LEARNING_RATE
    assert parent.manifest["training"]["learning_rate"] == 0.01  # nnU-Net's own when training afresh
    assert at_start and all(torch.equal(at_start[k], parent.network_weights[k].to(at_start[k].dtype))
                            for k in parent.network_weights)  # not random: the parent's weights
    changed = [k for k in parent.network_weights if k.endswith(".weight") and
               not torch.equal(child.network_weights[k], parent.network_weights[k])]
    assert changed  # training moved them
    # the statistics the parent's decoder learned with come along unchanged
    assert torch.equal(child.network_weights["embedding_mean"], parent.network_weights["embedding_mean"])
    assert _hashes(Path(parent.path)) == before
    record = child.manifest["training"]["start_from"]
    assert record["id"] == hashlib.sha256(json.dumps(parent.manifest, sort_keys=True).encode()).hexdigest()
    assert record["name"] == Path(parent.path).name and child.manifest["training"]["iterations"] == 2
    assert child.plans["configurations"]["2d"]["patch_size"] == parent.plans["configurations"]["2d"]["patch_size"]
    assert child.class_names == parent.class_names and child.nnsam_config == parent.nnsam_config


def test_the_adapted_model_saved_lies_between_the_parent_and_the_trained_network(trained, chest_ct, tmp_path,
                                                                                 monkeypatch):
    from nnsam_core import fine_tune
    from nnsam_core.adapt import ADAPT_KEEP_PARENT
    from nnsam_core.training.fewshot import nnUNetTrainerFewShot

    parent, _ = trained
    at_end = {}
    run_training = nnUNetTrainerFewShot.run_training

    def spying_run_training(self):
        run_training(self)
        at_end.update({k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()})

    monkeypatch.setattr(nnUNetTrainerFewShot, "run_training", spying_run_training)
    child = fine_tune(*chest_ct, output=tmp_path / "adapted", slices=[12, 18], start_from=parent.path,
                      iterations=2, learning_rate=0.01, device="cpu")
    keep = child.manifest["training"]["start_from"]["parent_share"]
    assert keep == ADAPT_KEEP_PARENT and 0 < keep < 1
    moved = [k for k in parent.network_weights if k.endswith(".weight")
             and not torch.allclose(at_end[k], parent.network_weights[k])]
    assert moved  # training moved them; what was saved lies part of the way back toward the parent
    for name in moved:
        between = keep * parent.network_weights[name] + (1 - keep) * at_end[name]
        assert torch.allclose(child.network_weights[name], between, atol=1e-6), name
    assert not any(torch.equal(child.network_weights[name], at_end[name]) for name in moved)


@pytest.mark.parametrize("extra, message", [
    (["--encoder", "mobilesam"], "uses the litemedsam encoder, not mobilesam"),
    (["--method", "nnunet"], "trained with method nnsam, not nnunet"),
    (["--class-names", "A,B,C,D,E,F,G"], "paint the same classes"),
    (["--max-size", "64"], "leave out --max-size"),
])
def test_a_mismatched_start_is_refused_before_any_work(trained, chest_ct, tmp_path, capsys, extra, message):
    parent, _ = trained
    out = tmp_path / "adapted"
    code = main(["train", *chest_ct, "-o", str(out), "--slices", "12", "--start-from", str(parent.path),
                 "--device", "cpu", "--progress", "none", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_learning_rate_given_for_a_study_replaces_the_adaptations(trained, chest_ct, tmp_path):
    from nnsam_core import fine_tune

    parent, _ = trained
    child = fine_tune(*chest_ct, output=tmp_path / "adapted", slices=[12], start_from=parent.path, iterations=1,
                      learning_rate=0.0005, device="cpu")
    assert child.manifest["training"]["learning_rate"] == 0.0005
    with pytest.raises(NNSAMError, match="learning_rate must be above 0"):
        fine_tune(*chest_ct, output=tmp_path / "other", slices=[12], start_from=parent.path, learning_rate=-1.0)
    assert not (tmp_path / "other").exists()


def test_an_unreadable_start_is_refused(chest_ct, tmp_path, capsys):
    code = main(["train", *chest_ct, "-o", str(tmp_path / "m"), "--slices", "12", "--start-from",
                 str(tmp_path / "missing_model")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--start-from" in err and "does not exist" in err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("seconds, expected", [(0.0, list(range(9))), (1e9, [])])
def test_fine_tune_checkpoints_by_the_clock(monkeypatch, seconds, expected):
    """Between checkpoints at least checkpoint_seconds pass (nnU-Net always writes the final one itself)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnsam_core.training.fewshot import nnUNetTrainerFewShot

    saved = []

    def epoch_end(self):  # the part of nnU-Net's on_epoch_end that matters here
        if (self.current_epoch + 1) % self.save_every == 0 and self.current_epoch != self.num_epochs - 1:
            saved.append(self.current_epoch)
        self.current_epoch += 1

    monkeypatch.setattr(nnUNetTrainer, "on_epoch_end", epoch_end)
    trainer = object.__new__(nnUNetTrainerFewShot)
    trainer.current_epoch, trainer.progress_plot = 0, "never"
    trainer.set_schedule(250)  # 10 epochs of 25
    trainer.checkpoint_seconds, trainer._last_checkpoint_at = seconds, 0.0

    class Logger:
        def plot_progress_png(self, folder):
            pass

    trainer.logger = Logger()
    for _ in range(trainer.num_epochs):
        trainer.on_epoch_end()
    assert saved == expected
