"""nnU-Net's progress.png is drawn only as often as asked: with checkpoints, at the end, or never."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("policy, expected", [
    ("checkpoints", list(range(3, 40, 4))),  # a checkpoint every 4th epoch, the last one included
    ("end", [39]),
    ("never", []),
])
def test_progress_plot_is_drawn_only_as_often_as_asked(monkeypatch, policy, expected):
    """nnU-Net redraws progress.png after every epoch (about 1.4 s each); the few-shot trainer draws it with its
    checkpoints (nnUNetv2_train), at the end (a kept work folder) or never (fine_tune deletes the folder)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnsam_core.training.fewshot import nnUNetTrainerFewShot

    drawn = []

    class Logger:
        def plot_progress_png(self, folder):
            drawn.append(trainer.current_epoch)

    def epoch_end(self):  # the part of nnU-Net's on_epoch_end that matters here
        self.logger.plot_progress_png("output")
        self.current_epoch += 1

    monkeypatch.setattr(nnUNetTrainer, "on_epoch_end", epoch_end)
    trainer = object.__new__(nnUNetTrainerFewShot)
    trainer.logger, trainer.current_epoch = Logger(), 0
    trainer.set_schedule(1000)  # 40 epochs of 25 iterations, a checkpoint every 4th epoch
    trainer.progress_plot = policy
    for _ in range(trainer.num_epochs):
        trainer.on_epoch_end()
    assert drawn == expected
    assert "plot_progress_png" not in vars(trainer.logger)  # the method is back after every skipped epoch


@pytest.mark.parametrize("keep_work_dir, draws", [(False, 0), (True, 1)])
def test_fine_tune_draws_the_progress_plot_only_for_a_kept_work_folder(chest_ct, tmp_path, monkeypatch,
                                                                       keep_work_dir, draws):
    from nnunetv2.training.logging.nnunet_logger import MetaLogger

    from conftest import CHEST_SLICES
    from nnsam_core.finetune import _work_dir_for, fine_tune

    drawn = []
    draw = MetaLogger.plot_progress_png

    def counted_draw(self, folder):
        drawn.append(folder)
        return draw(self, folder)

    monkeypatch.setattr(MetaLogger, "plot_progress_png", counted_draw)
    output = tmp_path / "model.nnsam"
    fine_tune(*chest_ct, output=output, slices=CHEST_SLICES, method="nnunet", iterations=2, checkpoint_every=1,
              device="cpu", keep_work_dir=keep_work_dir)
    assert len(drawn) == draws  # two epochs, each ending in a checkpoint
    plots = list(_work_dir_for(output).rglob("progress.png"))
    assert len(plots) == draws
