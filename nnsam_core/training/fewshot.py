"""nnUNetTrainerFewShot: stock nnU-Net with a schedule set in iterations, progress callbacks and a lean
checkpoint policy (the ``nnunet`` method, and the base of every nnSAM trainer)."""

from __future__ import annotations

import os
import time
from typing import Callable, Optional

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

ProgressCallback = Callable[[dict], None]


class nnUNetTrainerFewShot(nnUNetTrainer):
    """nnU-Net with a schedule set in iterations, progress callbacks and a lean checkpoint policy."""

    default_iterations = 1000  # the quick preset
    iterations_per_epoch_cap = 25
    # When nnU-Net's progress.png is drawn: "checkpoints" (with every checkpoint and after the last epoch),
    # "end" (after the last epoch only) or "never" (nobody will look: the work folder is deleted afterwards).
    progress_plot = "checkpoints"
    # Set: a resumable checkpoint at the end of the first epoch this many seconds after the last one (what
    # fine_tune uses, so a stop loses about that much training on any machine); None: every save_every epochs.
    checkpoint_seconds: Optional[float] = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.progress_callback: Optional[ProgressCallback] = None
        self.set_schedule(self.default_iterations)
        self._steps_done = 0
        self._train_started_at: Optional[float] = None
        self._last_checkpoint_at = time.monotonic()
        # Set before training: the network starts from these weights (a saved model being adapted), not at random.
        self.initial_weights: Optional[dict] = None

    def initialize(self):
        super().initialize()
        if self.initial_weights is not None:
            module = self.network.module if self.is_ddp else self.network
            module = getattr(module, "_orig_mod", module)
            try:
                module.load_state_dict(self.initial_weights, strict=True)
            except RuntimeError as exc:
                from ..errors import NNSAMError
                raise NNSAMError("the saved model's network does not fit this training "
                                 f"({str(exc).splitlines()[0][:160]}); train afresh without --start-from") from None

    def set_schedule(self, total_iterations: int, checkpoint_every: Optional[int] = None) -> None:
        """Train ``total_iterations`` steps. Epochs are nnU-Net's unit of logging and resumable checkpoints:
        by default 25 iterations with a checkpoint every tenth of the run; ``checkpoint_every`` makes epochs of
        that many iterations, each ending in a checkpoint."""
        per_epoch = checkpoint_every or self.iterations_per_epoch_cap
        per_epoch = max(1, min(per_epoch, total_iterations))
        self.num_iterations_per_epoch = per_epoch
        self.num_epochs = max(1, -(-total_iterations // per_epoch))
        # nnU-Net's per-epoch validation only feeds its pseudo-Dice log; one batch is enough for few-shot runs.
        self.num_val_iterations_per_epoch = 50 if per_epoch >= 250 else 1
        self.save_every = 1 if checkpoint_every else max(1, self.num_epochs // 10)

    @property
    def total_iterations(self) -> int:
        return self.num_epochs * self.num_iterations_per_epoch

    def _do_i_compile(self):
        # The fused network's bank lookups are Python; compile only when asked explicitly.
        return os.environ.get("nnUNet_compile", "").lower() in ("true", "1", "t") and super()._do_i_compile()

    def _draws_progress_plot(self, epoch: int) -> bool:
        last = epoch == self.num_epochs - 1
        if self.progress_plot == "checkpoints":
            return last or (epoch + 1) % self.save_every == 0
        if self.progress_plot == "end":
            return last
        if self.progress_plot == "never":
            return False
        raise ValueError(f"progress_plot must be 'checkpoints', 'end' or 'never', not {self.progress_plot!r}")

    def on_epoch_end(self):
        if self.checkpoint_seconds is not None:
            due = time.monotonic() - self._last_checkpoint_at >= self.checkpoint_seconds
            self.save_every = 1 if due else self.num_epochs + 1  # nnU-Net saves when (epoch + 1) % save_every == 0
        # nnU-Net redraws progress.png (matplotlib, over a second) after every epoch, a large share of a short GPU
        # fine-tune with epochs of 25 steps. Draw it only as often as progress_plot says.
        if self._draws_progress_plot(self.current_epoch):
            return super().on_epoch_end()
        self.logger.plot_progress_png = lambda *args, **kwargs: None  # shadows the method for this epoch only
        try:
            super().on_epoch_end()
        finally:
            del self.logger.plot_progress_png

    def save_checkpoint(self, filename: str) -> None:
        # 'best' by pseudo-Dice on the few training slices says little and costs a full write each epoch.
        if os.path.basename(filename) == "checkpoint_best.pth":
            return
        # Write under a temporary name and rename: a kill mid-write must not leave a corrupt resume point.
        partial = f"{filename}.partial"
        super().save_checkpoint(partial)
        if os.path.exists(partial):
            os.replace(partial, filename)
        self._last_checkpoint_at = time.monotonic()

    def on_train_start(self):
        super().on_train_start()
        self._steps_done = self.current_epoch * self.num_iterations_per_epoch
        self._train_started_at = self._last_checkpoint_at = time.monotonic()
        self._steps_at_start = self._steps_done

    def train_step(self, batch: dict) -> dict:
        result = super().train_step(batch)
        self._steps_done += 1
        if self.progress_callback is not None:
            elapsed = time.monotonic() - self._train_started_at
            done_here = self._steps_done - self._steps_at_start
            remaining = self.total_iterations - self._steps_done
            self.progress_callback({
                "stage": "train", "step": self._steps_done, "total": self.total_iterations,
                "loss": float(result["loss"]), "eta_s": elapsed / max(done_here, 1) * remaining,
                "message": f"epoch {self.current_epoch + 1}/{self.num_epochs}"})
        return result

    def describe(self) -> dict:
        """What this trainer trained, for the bundle manifest: method, trainer name and SAM branch (none here)."""
        return {"method": "nnunet", "trainer": type(self).__name__, "encoder": {"name": None}, "nnsam_config": None,
                "injection": None, "sam_input_preparation": None}
