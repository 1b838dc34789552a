"""nnU-Net trainers for nnSAM, in the style of nnunetv2's trainer variants.

- :class:`nnUNetTrainerFewShot`: stock nnU-Net with a short, configurable schedule and progress reporting
  (the ``nnunet`` method, for fair comparisons through the very same pipeline).
- :class:`nnUNetTrainerNNSAM`: the same plus the frozen SAM branch (``build_network_architecture`` builds the
  fused network; the dataset appends grid channels; the embedding bank is filled once at training start).
- Variants: encoder (``_MobileSAM``), random-encoder control (``nnUNetTrainerNNSAMRandom``) and schedules
  (``_10epochs``, ``_50epochs``, ``_250epochs``), so that ``nnUNetv2_train ... -tr NAME`` reaches all of them.

The classes live here (an importable module) so that nnU-Net's data-augmentation worker processes can unpickle
the dataset classes; ``nnsam_core/trainers/`` re-exports them for ``nnUNet_extTrainer``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable, Optional

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from nnunetv2.training.dataloading.nnunet_dataset import (nnUNetDatasetBlosc2, nnUNetDatasetNumpy,
                                                          infer_dataset_class)
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from .encoders import load_encoder
from .errors import NNSAMError
from .methods import METHODS
from .network import (GRID_CHANNELS, EmbeddingBank, NNSAMConfig, build_nnsam_network, grid_channels,
                      slice_key, split_key)

ProgressCallback = Callable[[dict], None]
NNSAM_CONFIG_FILE = "nnsam_config.json"  # beside checkpoint_final.pth in an nnU-Net results fold folder
MAX_VARIANT_EMBEDDINGS = 1024  # embedding variants and views held in memory at most (about 2 GB in float16)
VIEW_SCALING = (0.7, 1.4)  # nnU-Net's training scaling range (get_training_transforms), for the geometric views


# ------------------------------------------------------------------------------------------- datasets
class _GridChannelsMixin:
    """Appends the grid channels (row, col, slice key) to every case it loads. Case indices come from the sorted
    identifiers of the whole preprocessed folder, so training, validation and the embedding bank agree."""

    def __init__(self, folder, identifiers=None, folder_with_segs_from_previous_stage=None):
        super().__init__(folder, identifiers, folder_with_segs_from_previous_stage)
        self.case_index = {k: i for i, k in enumerate(sorted(self.get_identifiers(folder)))}

    def load_case(self, identifier):
        data, seg, seg_prev, properties = super().load_case(identifier)
        data = np.asarray(data[:], dtype=np.float32)
        case = self.case_index[identifier]
        keys = [slice_key(case, z) for z in range(data.shape[1])]
        return np.concatenate([data, grid_channels(data.shape[1:], keys)]), seg, seg_prev, properties

    def num_slices(self, identifier: str) -> int:
        return super().load_case(identifier)[0].shape[1]

    def load_image_slices(self, identifier: str, zs) -> list[np.ndarray]:
        """First image channel of the given slices, without grid channels (what SAM sees)."""
        data = super().load_case(identifier)[0]
        return [np.asarray(data[0, z], dtype=np.float32) for z in zs]


class NNSAMDatasetBlosc2(_GridChannelsMixin, nnUNetDatasetBlosc2):
    pass


class NNSAMDatasetNumpy(_GridChannelsMixin, nnUNetDatasetNumpy):
    pass


def grid_dataset_class(folder: str):
    base = infer_dataset_class(folder)
    return NNSAMDatasetBlosc2 if issubclass(base, nnUNetDatasetBlosc2) else NNSAMDatasetNumpy


# ------------------------------------------------------------------------------------------- transforms
class StashGridChannels(BasicTransform):
    """Moves the grid channels out of 'image' so intensity augmentations cannot touch them."""

    def apply(self, data_dict, **params):
        image = data_dict["image"]
        data_dict["image"], data_dict["nnsam_grid"] = image[:-GRID_CHANNELS], image[-GRID_CHANNELS:]
        return data_dict


class RestoreGridChannels(BasicTransform):
    """Puts the grid channels back (before mirroring, which must move them with the image)."""

    def apply(self, data_dict, **params):
        grid = data_dict.pop("nnsam_grid")
        data_dict["image"] = torch.cat([data_dict["image"], grid.to(data_dict["image"].dtype)])
        return data_dict


def protect_grid_channels(transforms: ComposeTransforms) -> ComposeTransforms:
    steps = list(transforms.transforms)
    spatial = next(i for i, t in enumerate(steps) if isinstance(t, SpatialTransform))
    steps.insert(spatial + 1, StashGridChannels())
    mirror = next((i for i, t in enumerate(steps) if isinstance(t, MirrorTransform)), len(steps))
    steps.insert(mirror, RestoreGridChannels())
    return ComposeTransforms(steps)


def intensity_steps(protected: ComposeTransforms) -> ComposeTransforms:
    """The intensity augmentations of a pipeline made by :func:`protect_grid_channels`: the steps nnU-Net runs
    between the stash and the restore of the grid channels, with nnU-Net's own parameters and probabilities."""
    steps = list(protected.transforms)
    start = next(i for i, t in enumerate(steps) if isinstance(t, StashGridChannels))
    end = next(i for i, t in enumerate(steps) if isinstance(t, RestoreGridChannels))
    return ComposeTransforms(steps[start + 1:end])


# ------------------------------------------------------------------------------------------- trainers
class nnUNetTrainerFewShot(nnUNetTrainer):
    """nnU-Net with a schedule set in iterations, progress callbacks and a lean checkpoint policy."""

    default_iterations = 1000  # the quick preset
    iterations_per_epoch_cap = 25
    # When nnU-Net's progress.png is drawn: "checkpoints" (with every checkpoint and after the last epoch),
    # "end" (after the last epoch only) or "never" (nobody will look: the work folder is deleted afterwards).
    progress_plot = "checkpoints"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.progress_callback: Optional[ProgressCallback] = None
        self.set_schedule(self.default_iterations)
        self._steps_done = 0
        self._train_started_at: Optional[float] = None

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
        # nnU-Net redraws progress.png (matplotlib, ~1.4 s) after every epoch: with epochs of 25 short steps that
        # was 40% of a GPU fine-tune (docs/speed/gpu.md). Draw it only as often as progress_plot says.
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

    def on_train_start(self):
        super().on_train_start()
        self._steps_done = self.current_epoch * self.num_iterations_per_epoch
        self._train_started_at = time.monotonic()
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


class nnUNetTrainerNNSAM(nnUNetTrainerFewShot):
    """nnSAM: nnU-Net plus a frozen SAM encoder whose embedding is concatenated at the 1/8 skip. Each training
    slice's embedding is computed once and sampled from a cache; a tenth of the steps, drawn at random, run the
    encoder on the augmented patches instead (``NNSAMConfig.recompute_share``)."""

    nnsam_config = NNSAMConfig()

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels,
                                   num_output_channels, enable_deep_supervision=True):
        return build_nnsam_network(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision, cls.nnsam_config)

    def initialize(self):
        super().initialize()
        self.dataset_class = grid_dataset_class(self.preprocessed_dataset_folder)
        self.sam_encoder = None
        self.embedding_bank: Optional[EmbeddingBank] = None
        self.recomputed_steps = 0  # steps a recompute_share sent down the recomputed path

    def get_dataloaders(self):
        self.dataset_class = grid_dataset_class(self.preprocessed_dataset_folder)
        return super().get_dataloaders()

    @staticmethod
    def get_training_transforms(*args, **kwargs):
        return protect_grid_channels(nnUNetTrainer.get_training_transforms(*args, **kwargs))

    def intensity_augmentation(self) -> ComposeTransforms:
        """nnU-Net's intensity augmentations of this trainer's training pipeline, for the embedding variants."""
        rotation, dummy_2d, _, mirror_axes = self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        pipeline = self.get_training_transforms(
            self.configuration_manager.patch_size, rotation, self._get_deep_supervision_scales(), mirror_axes,
            dummy_2d, use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=self.is_cascaded,
            foreground_labels=self.label_manager.foreground_labels,
            regions=self.label_manager.foreground_regions if self.label_manager.has_regions else None,
            ignore_label=self.label_manager.ignore_label)
        return intensity_steps(pipeline)

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
        if config.embeddings == "cached" and config.embedding_variants + config.embedding_views > 0:
            self._warm_embedding_variants(bank, warm, config.embedding_variants, config.embedding_views)
        if config.embeddings == "cached" and config.mirror_embeddings:
            bank.warm_mirrored(warm)
        network = self._network_module()
        if config.embedding_norm == "standardise":
            mean, std = bank.channel_statistics()
            network.set_embedding_statistics(mean.to(self.device), std.to(self.device))
        network.attach_bank(bank)
        self.embedding_bank = bank
        return bank

    def _warm_embedding_variants(self, bank: EmbeddingBank, keys: list[int], variants: int, views: int = 0) -> None:
        """Embeddings of intensity-augmented copies (nnU-Net's intensity transforms) and of rotated and scaled
        copies (nnU-Net's rotation and scaling ranges) of every training slice."""
        total = (variants + views) * len(keys)
        if total > MAX_VARIANT_EMBEDDINGS:
            raise NNSAMError(f"{variants + views} embedding variants and views x {len(keys)} training slices = "
                             f"{total} embeddings, more than {MAX_VARIANT_EMBEDDINGS} (2 MB each): use fewer or 0")
        if self.progress_callback is not None:
            self.progress_callback({"stage": "embed", "step": 0, "total": total, "loss": None, "eta_s": None,
                                    "message": f"computing {total} embeddings of augmented copies"})
        if variants:
            augmentation = self.intensity_augmentation()
            bank.warm_variants(keys, variants, lambda image: augmentation(image=image)["image"])
        if views:
            rotation = self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()[0]
            bank.warm_views(keys, views, tuple(float(r) for r in rotation), VIEW_SCALING)

    @property
    def partial_recompute_share(self) -> float:
        """The share of steps that recompute while the others use the cache (0 when every step does one thing)."""
        config = self.nnsam_config
        return float(config.recompute_share) if config.embeddings == "cached" else 0.0

    def train_step(self, batch: dict) -> dict:
        share = self.partial_recompute_share
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
        if self.partial_recompute_share > 0.0:
            self.print_to_log_file(f"recompute share {self.partial_recompute_share:g}: {self.recomputed_steps} "
                                   f"steps recomputed of {self._steps_done - self._steps_at_start} in this run")
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


class nnUNetTrainerNNSAM_MobileSAM(nnUNetTrainerNNSAM):
    nnsam_config = NNSAMConfig(encoder="mobilesam")


class nnUNetTrainerNNSAMRandom(nnUNetTrainerNNSAM):
    """Control: the same network with a randomly initialised (frozen) encoder."""
    nnsam_config = NNSAMConfig(pretrained=False)


class nnUNetTrainerNNSAMRandom_MobileSAM(nnUNetTrainerNNSAM):
    nnsam_config = NNSAMConfig(encoder="mobilesam", pretrained=False)


class nnUNetTrainerNNSAMRecomputed(nnUNetTrainerNNSAM):
    """Reference for the embedding cache: the encoder runs on every augmented patch at every training step, as
    in the authors' code (slow; the cache's accuracy guard compares the two)."""
    nnsam_config = NNSAMConfig(embeddings="recomputed", recompute_share=0.0)  # every step recomputes: no share


class nnUNetTrainerNNSAMCached(nnUNetTrainerNNSAM):
    """The fastest nnSAM: every training step samples the cached embeddings (``recompute_share`` 0), no encoder
    call after the bank is filled; the default until 2026-11-28, about 4.5 Dice points below recomputing on CHD at
    192x192."""
    nnsam_config = NNSAMConfig(recompute_share=0.0)


class nnUNetTrainerNNSAMPartialRecompute(nnUNetTrainerNNSAM):
    """The cache, with the encoder run on the augmented patches at a random quarter of the training steps
    (``recompute_share`` 0.25): recomputing's accuracy at 192x192 on CHD for a quarter of its encoder calls."""
    nnsam_config = NNSAMConfig(recompute_share=0.25)


def _with_schedule(base, iterations: int, name: str):
    return type(name, (base,), {"default_iterations": iterations, "__module__": __name__,
                                "__doc__": f"{base.__name__} with {iterations} iterations."})


# Schedule variants for nnUNetv2_train -tr NAME (25 iterations per epoch). _debug checks a setup end to end.
nnUNetTrainerNNSAM_debug = _with_schedule(nnUNetTrainerNNSAM, 2, "nnUNetTrainerNNSAM_debug")
nnUNetTrainerNNSAM_1epoch = _with_schedule(nnUNetTrainerNNSAM, 25, "nnUNetTrainerNNSAM_1epoch")
nnUNetTrainerNNSAM_10epochs = _with_schedule(nnUNetTrainerNNSAM, 250, "nnUNetTrainerNNSAM_10epochs")
nnUNetTrainerNNSAM_50epochs = _with_schedule(nnUNetTrainerNNSAM, 1250, "nnUNetTrainerNNSAM_50epochs")
nnUNetTrainerNNSAM_250epochs = _with_schedule(nnUNetTrainerNNSAM, 6250, "nnUNetTrainerNNSAM_250epochs")


class nnUNetTrainerNNSAM_full(nnUNetTrainerNNSAM):
    """nnU-Net's default schedule: 1000 epochs x 250 iterations (the paper's setup)."""

    default_iterations = 250_000
    iterations_per_epoch_cap = 250


TRAINERS = {
    ("nnunet", "litemedsam"): nnUNetTrainerFewShot,
    ("nnunet", "mobilesam"): nnUNetTrainerFewShot,
    ("nnsam", "litemedsam"): nnUNetTrainerNNSAM,
    ("nnsam", "mobilesam"): nnUNetTrainerNNSAM_MobileSAM,
    ("nnsam-random", "litemedsam"): nnUNetTrainerNNSAMRandom,
    ("nnsam-random", "mobilesam"): nnUNetTrainerNNSAMRandom_MobileSAM,
    ("nnsam-recomputed", "litemedsam"): nnUNetTrainerNNSAMRecomputed,
}

# Trainers a bundle or an nnU-Net results folder may name; anything else is refused (they are untrusted input).
KNOWN_TRAINERS = {cls.__name__: cls for cls in (
    nnUNetTrainer, nnUNetTrainerFewShot, nnUNetTrainerNNSAM, nnUNetTrainerNNSAM_MobileSAM, nnUNetTrainerNNSAMRandom,
    nnUNetTrainerNNSAMRandom_MobileSAM, nnUNetTrainerNNSAMRecomputed, nnUNetTrainerNNSAMCached,
    nnUNetTrainerNNSAMPartialRecompute,
    nnUNetTrainerNNSAM_debug,
    nnUNetTrainerNNSAM_1epoch, nnUNetTrainerNNSAM_10epochs, nnUNetTrainerNNSAM_50epochs,
    nnUNetTrainerNNSAM_250epochs, nnUNetTrainerNNSAM_full)}
ALLOWED_TRAINER_NAMES = set(KNOWN_TRAINERS)


def method_of_trainer(trainer_class) -> str:
    config = config_of_trainer(trainer_class)
    if config is None:
        return "nnunet"
    if not config.pretrained:
        return "nnsam-random"
    return "nnsam-recomputed" if config.embeddings == "recomputed" else "nnsam"


def trainer_for(method: str, encoder: str):
    try:
        return TRAINERS[(method, encoder)]
    except KeyError:
        if method in METHODS:
            raise NNSAMError(f"method '{method}' is not available with the {encoder} encoder") from None
        raise NNSAMError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}") from None


def config_of_trainer(trainer_class) -> Optional[NNSAMConfig]:
    return getattr(trainer_class, "nnsam_config", None)


def with_nnsam_config(trainer_class, config: NNSAMConfig):
    """``trainer_class`` running ``config``, under the same name (what bundles and results folders record), for
    settings no named trainer has: benchmarks' variants, a resumed run's recorded settings."""
    return type(trainer_class.__name__, (trainer_class,), {"nnsam_config": config,
                                                            "__module__": trainer_class.__module__})
