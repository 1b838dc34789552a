"""``nnsam-lab bench-speed``: what nnSAM costs over plain nnU-Net, measured in one run on one machine.

Four measurements, each printed in one table (and, with ``--json``, written as JSON):

1. **Training iteration**: nnU-Net (:class:`~nnsam_core.training.nnUNetTrainerFewShot`) and nnSAM with cached
   embeddings (:class:`~nnsam_core.training.nnUNetTrainerNNSAMCached`) are built on the same small preprocessed
   dataset (same plans, patch and batch size). After a warm-up, both run ``--steps`` training steps, interleaved,
   on the *same* batch (nnU-Net gets its image channel, nnSAM the image plus grid channels). The median step time
   gives ``train_step_ratio`` = nnSAM / nnU-Net. Each trainer's own data loading + augmentation is timed beside it
   (``iteration_ratio`` counts both). Encoder calls made during the timed iterations are counted (expected 0:
   the embedding bank is filled once, before training).
   nnSAM recomputes the embeddings at a random share P of its steps and samples the cache at the others
   (``--recompute-share P``; default nnsam train's, 0.1), so nnSAM's recomputing step is timed on every batch too,
   and nnSAM's step is the mix of the two in the long run, ``(1 - P) x cached + P x recomputing``: what a training
   run averages to, without the noise of drawing which few timed steps recompute. The printed
   ``train_step_ratio`` and its verdict are that step's ratio (``share_step_ratio`` in the JSON, beside the cached
   steps' ``train_step_ratio``). ``--recompute-share 0`` measures the cache alone.
2. **Encoder calls per segmented slice** (expected 1: one per slice, reused by every tile and mirror).
3. **Time-to-segmentation**: ``fine_tune`` with the quick preset (and the recompute share) on 4 annotated slices
   of a ``size x size x N`` volume, then :class:`~nnsam_core.predict.Segmenter` on every slice. Training and
   segmentation are timed separately; with ``--iterations`` (a shorter run) the quick preset's training time is
   also extrapolated from the measured time per iteration.
4. **Peak RAM of segmenting a volume**, in a fresh child process (so earlier phases do not count). Segmenting
   300 slices of 512x512 takes long on a CPU, so by default two smaller volumes are measured and the peak is
   extrapolated linearly to 300 slices (peak RAM grows linearly with the number of slices: the whole-volume
   logits dominate; a pair whose peak did not grow is allocator noise and is not extrapolated);
   ``--ram-volume-slices 300`` measures it directly.

The SAM encoder is nnsam train's default (LiteMedSAM) or ``--encoder mobilesam``; ``--random-encoder`` times
the same architecture randomly initialised, which needs no weights file (an encoder's speed does not depend on its
weights; the fine-tune's Dice is then the random-encoder control's).

The data: 4 one-slice cases (and a volume stacked from slices) of the project's cardiac CT set
(``../shared/data/Dataset901_CHD``) when it is there, resized to ``--size``; otherwise synthetic slices.
The last line printed is ``train_step_ratio=<nnSAM/nnU-Net>``.

``--scenario in-volume`` measures something else: the in-volume job at a given size, nnSAM against nnU-Net,
phase by phase (:mod:`nnsam_lab.speed_in_volume`). ``--encoder-precision`` sets the frozen encoder's CPU
precision for either scenario (default: the engine's choice).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from nnsam_core.methods import DEFAULT_RECOMPUTE_SHARE, ENCODER_NAMES

RAM_TARGET_SLICES = 300
RAM_TARGET_GB = 8.0
QUICK_ITERATIONS = 1000  # nnsam_core.finetune.PRESETS["quick"]
TARGETS = {
    "train_step_ratio": 1.15,
    "encoder_calls_per_segmented_slice": 1.0,
    "encoder_calls_per_train_iteration": 0.0,
    "time_to_segmentation_min_64_slices_cpu": 20.0,
    "time_to_segmentation_min_200_slices_gpu": 2.0,   # the issue names an H100
    "peak_ram_gb_300_slices_cpu": RAM_TARGET_GB,
}
CHD_NAME = "Dataset901_CHD"


# ------------------------------------------------------------------------------------------- helpers
def _vm_hwm_gb() -> Optional[float]:
    """Linux: this process's peak RSS since its last exec (VmHWM). ru_maxrss is no good in a child: Linux keeps the
    parent's peak across fork + exec, so a child of a big parent would report the parent's peak."""
    with contextlib.suppress(OSError, ValueError):
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024 ** 2
    return None


def _peak_rss_gb() -> dict:
    """Peak resident memory (GB) of this process and of its largest finished child (Linux: ru_maxrss in KiB)."""
    scale = 1024 ** 2 if sys.platform != "darwin" else 1024 ** 3
    hwm = _vm_hwm_gb()
    own = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / scale
    return {"self": round(own, 3), "children": round(children, 3)}


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def find_chd_dataset(explicit: Optional[str] = None) -> Optional[Path]:
    """The cardiac CT set: --data, $NNSAM_CHD_DATA, ../shared/data/ beside the working dir or the repository."""
    candidates = [explicit, os.environ.get("NNSAM_CHD_DATA"),
                  Path.cwd().parent / "shared" / "data" / CHD_NAME,
                  Path(__file__).resolve().parents[2] / "shared" / "data" / CHD_NAME]
    for c in candidates:
        if c and (Path(c) / "dataset.json").is_file() and (Path(c) / "imagesTr").is_dir():
            return Path(c)
    return None


def _resize(array: np.ndarray, size: int, labels: bool) -> np.ndarray:
    import torch
    import torch.nn.functional as F
    if array.shape == (size, size):
        return array
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    out = F.interpolate(t, size=(size, size), mode="nearest" if labels else "bilinear",
                        align_corners=None if labels else False)[0, 0].numpy()
    return out.round().astype(array.dtype) if labels or np.issubdtype(array.dtype, np.integer) else out


class SliceSource:
    """2D (image, labels) slices, real cardiac CT when available, resized to ``size``; else synthetic."""

    def __init__(self, size: int, data_dir: Optional[Path]):
        self.size = size
        self.data_dir = data_dir
        if data_dir is not None:
            meta = json.loads((data_dir / "dataset.json").read_text())
            labels = {k: int(v) for k, v in meta["labels"].items() if k != "background"}
            self.class_names = [k for k, _ in sorted(labels.items(), key=lambda kv: kv[1])]
            ending = meta.get("file_ending", ".nii.gz")
            self._cases = sorted(p.name[: -len(ending)] for p in (data_dir / "labelsTr").glob(f"*{ending}"))
            self._ending = ending
            self.description = f"{data_dir.name} cardiac CT slices ({len(self._cases)} cases), resized to {size}x{size}" \
                if size != 512 else f"{data_dir.name} cardiac CT slices ({len(self._cases)} cases), 512x512"
        else:
            self.class_names = ["class_1", "class_2", "class_3"]
            self._cases = []
            self.description = f"synthetic {size}x{size} slices (cardiac data not found)"
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def slice(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(image int16, labels uint8), both (size, size)."""
        if self._cases:
            i = i % len(self._cases)
        if i in self._cache:
            return self._cache[i]
        if self._cases:
            import SimpleITK as sitk
            name = self._cases[i]
            image = sitk.GetArrayFromImage(sitk.ReadImage(str(self.data_dir / "imagesTr" / f"{name}_0000{self._ending}")))
            labels = sitk.GetArrayFromImage(sitk.ReadImage(str(self.data_dir / "labelsTr" / f"{name}{self._ending}")))
            image = _resize(image.reshape(image.shape[-2:]).astype(np.int16), self.size, labels=False)
            labels = _resize(labels.reshape(labels.shape[-2:]).astype(np.uint8), self.size, labels=True)
        else:
            image, labels = _synthetic_slice(i, self.size)
        self._cache[i] = (image.astype(np.int16), labels.astype(np.uint8))
        return self._cache[i]

    def volume(self, n: int):
        """(image, labels) SimpleITK volumes of n slices stacked from the source (1 mm spacing)."""
        import SimpleITK as sitk
        images, labels = zip(*(self.slice(i) for i in range(n)))
        out = []
        for stack in (np.stack(images), np.stack(labels)):
            img = sitk.GetImageFromArray(stack)
            img.SetSpacing((1.0, 1.0, 1.0))
            out.append(img)
        return out[0], out[1]


def _synthetic_slice(i: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A body-like disc with three blobs of different densities (CT-like values), varying with i."""
    rng = np.random.default_rng(1000 + i)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    image = np.full((size, size), -1000.0, np.float32)
    labels = np.zeros((size, size), np.uint8)
    body = (yy - 0.5) ** 2 + (xx - 0.5) ** 2 < 0.42 ** 2
    image[body] = 0.0
    for value, hu in ((1, 300.0), (2, 120.0), (3, 60.0)):
        cy, cx = 0.5 + rng.uniform(-0.15, 0.15, 2)
        r = rng.uniform(0.06, 0.12)
        blob = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
        image[blob] = hu
        labels[blob] = value
    image += rng.normal(0, 20, image.shape).astype(np.float32)
    return image.astype(np.int16), labels


# ------------------------------------------------------------------------------------------- 1: training iteration
def _make_training_workspace(root: Path, source: SliceSource, device, n_cases: int = 4):
    import SimpleITK as sitk
    from nnsam_core.finetune import CPU_BATCH_SIZE, cap_batch_size
    from nnsam_core.workspace import TrainingCase, Workspace, plan_and_preprocess, write_raw_dataset

    workspace = Workspace(root)
    cases = []
    step = max(1, 36 // n_cases)  # spread over patients when the real set is there
    for c in range(n_cases):
        image, labels = source.slice(c * step)
        img = sitk.GetImageFromArray(image[None])
        lab = sitk.GetImageFromArray(labels[None])
        for x in (img, lab):
            x.SetSpacing((1.0, 1.0, 1.0))
        cases.append(TrainingCase(f"case_{c:03d}", img, lab))
    write_raw_dataset(workspace, cases, source.class_names, {"0": "CT"})
    plans = plan_and_preprocess(workspace)
    if device.type == "cpu":
        cap_batch_size(workspace, plans, CPU_BATCH_SIZE)  # what fine_tune does on a CPU
    return workspace


def _build_trainer(trainer_class, workspace, device, seed: int, config=None):
    import torch
    from nnsam_core.workspace import CONFIGURATION, FOLD

    plans = json.loads((workspace.preprocessed_dataset / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((workspace.preprocessed_dataset / "dataset.json").read_text())
    plans["continue_training"] = False  # nnU-Net's run_training sets this key; fine_tune does too
    torch.manual_seed(seed)
    np.random.seed(seed)
    trainer = trainer_class(plans, CONFIGURATION, FOLD, dataset_json, device)
    if config is not None:
        trainer.nnsam_config = config  # before initialisation, as fine_tune does
    trainer.set_schedule(10_000)
    trainer.on_train_start()   # dataloaders; nnSAM: encoder + embedding bank filled here, once
    trainer.on_epoch_start()   # network.train(), learning rate
    return trainer


def _shutdown(trainer) -> None:
    for dl in (getattr(trainer, "dataloader_train", None), getattr(trainer, "dataloader_val", None)):
        if dl is not None and hasattr(dl, "_finish"):
            with contextlib.suppress(Exception):
                dl._finish()


def _clone_batch(batch: dict, channels: Optional[slice] = None) -> dict:
    data = batch["data"] if channels is None else batch["data"][:, channels]
    target = batch["target"]
    return {"data": data.clone(), "target": [t.clone() for t in target] if isinstance(target, list) else target.clone()}


def on_encoder(config, encoder: str, random_weights: bool):
    """``config`` (an NNSAMConfig) with encoder ``encoder``, pretrained or randomly initialised, fed the slices
    as that encoder expects."""
    if config.encoder == encoder and config.pretrained == (not random_weights):
        return config
    return dataclasses.replace(config, encoder=encoder, pretrained=not random_weights, sam_input=None)


def measure_training_iteration(workspace, device, steps: int, warmup: int, seed: int = 0,
                               da_workers: Optional[int] = None, compare_recomputed: bool = False,
                               recompute_share: float = DEFAULT_RECOMPUTE_SHARE, encoder: str = "litemedsam",
                               random_encoder: bool = False) -> dict:
    """Interleaved, same-batch train steps of nnU-Net and nnSAM; see the module docstring.
    ``compare_recomputed`` also times nnSAM recomputing the embeddings every step (the authors' way);
    ``recompute_share`` > 0 does too, and gives nnSAM's step as the mix of the two at that share.
    ``encoder`` / ``random_encoder``: nnSAM's SAM encoder and whether it is randomly initialised."""
    from nnsam_core.model.grid import GRID_CHANNELS
    from nnsam_core.training.fewshot import nnUNetTrainerFewShot
    from nnsam_core.training.registry import config_of_trainer
    from nnsam_core.training.variants import nnUNetTrainerNNSAMCached, nnUNetTrainerNNSAMRecomputed
    from nnsam_core.workspace import nnunet_output_to_stderr, scoped_environ

    if da_workers is None:
        da_workers = 0 if device.type == "cpu" else None  # as fine_tune runs it
    env = {"nnUNet_n_proc_DA": None if da_workers is None else str(da_workers)}
    built = []  # every trainer built so far: its augmentation workers are shut down even if a later build fails

    def build(trainer_class, config=None):
        built.append(_build_trainer(trainer_class, workspace, device, seed, config))
        return built[-1]

    def nnsam(trainer_class):
        return build(trainer_class, on_encoder(config_of_trainer(trainer_class), encoder, random_encoder))

    with workspace.activated(), scoped_environ(env), nnunet_output_to_stderr():
        try:
            t0 = time.perf_counter()
            plain = build(nnUNetTrainerFewShot)
            t1 = time.perf_counter()
            sam = nnsam(nnUNetTrainerNNSAMCached)  # its cached step; a share's is mixed from it below
            t2 = time.perf_counter()
            timing_recomputed = compare_recomputed or recompute_share > 0.0
            recomputed = nnsam(nnUNetTrainerNNSAMRecomputed) if timing_recomputed else None
            bank = sam.embedding_bank
            sam_encoder = bank.encoder
            bank_fill_calls = bank.encoder_calls
            times = {"nnunet_step": [], "nnsam_step": [], "nnunet_data": [], "nnsam_data": []}
            if recomputed is not None:
                times["recomputed_step"] = []
            calls_before = recomputed_calls_before = None
            for i in range(warmup + steps):
                if i == warmup:
                    calls_before = bank.encoder_calls
                    if recomputed is not None:
                        recomputed_calls_before = recomputed.embedding_bank.encoder_calls
                # each trainer's own data loading + augmentation
                ta = time.perf_counter()
                sam_batch = next(sam.dataloader_train)
                tb = time.perf_counter()
                next(plain.dataloader_train)
                tc = time.perf_counter()
                # the same batch for both steps: nnU-Net sees the image channel(s), nnSAM also the grid channels
                b_sam = _clone_batch(sam_batch)
                b_plain = _clone_batch(sam_batch, slice(0, sam_batch["data"].shape[1] - GRID_CHANNELS))
                order = ((plain, b_plain, "nnunet_step"), (sam, b_sam, "nnsam_step"))
                if recomputed is not None:
                    order += ((recomputed, _clone_batch(sam_batch), "recomputed_step"),)
                if i % 2:
                    order = order[::-1]  # alternate who goes first
                step_times = {}
                for trainer, batch, key in order:
                    _sync(device)
                    ts = time.perf_counter()
                    trainer.train_step(batch)
                    _sync(device)
                    step_times[key] = time.perf_counter() - ts
                if i >= warmup:
                    times["nnsam_data"].append(tb - ta)
                    times["nnunet_data"].append(tc - tb)
                    for key, value in step_times.items():
                        times[key].append(value)
            calls_during = bank.encoder_calls - calls_before
            if recomputed is not None:
                recomputed_calls = recomputed.embedding_bank.encoder_calls - recomputed_calls_before
        finally:
            for trainer in built:
                _shutdown(trainer)
    med = {k: statistics.median(v) for k, v in times.items()}
    patch = list(plain.configuration_manager.patch_size)
    extra = {}
    if recomputed is not None:
        extra = {"recomputed_step_s": med["recomputed_step"],
                 "recomputed_step_ratio": med["recomputed_step"] / med["nnunet_step"],
                 "recomputed_encoder_calls_per_train_iteration": recomputed_calls / max(1, steps)}
    if recompute_share > 0.0:
        # A run draws recomputing at this share of its steps: in the long run its step costs the mix of the two.
        mixed = (1.0 - recompute_share) * med["nnsam_step"] + recompute_share * med["recomputed_step"]
        extra.update({"recompute_share": recompute_share, "share_step_s": mixed,
                      "share_step_ratio": mixed / med["nnunet_step"],
                      "share_iteration_ratio": (mixed + med["nnsam_data"]) / (med["nnunet_step"] + med["nnunet_data"]),
                      "share_encoder_calls_per_train_iteration":
                          recompute_share * extra["recomputed_encoder_calls_per_train_iteration"]})
    return {
        "patch_size": patch,
        "batch_size": int(plain.batch_size),
        # the encoder nnSAM's trainers ran, as they loaded it
        "encoder": {"name": sam_encoder.name, "pretrained": sam_encoder.pretrained,
                    "input_size": sam_encoder.spec.input_size},
        "steps_timed": steps,
        "warmup_steps": warmup,
        "da_workers": da_workers,
        "nnunet_step_s": med["nnunet_step"],
        "nnsam_step_s": med["nnsam_step"],
        "train_step_ratio": med["nnsam_step"] / med["nnunet_step"],
        "nnunet_data_s": med["nnunet_data"],
        "nnsam_data_s": med["nnsam_data"],
        "iteration_ratio": (med["nnsam_step"] + med["nnsam_data"]) / (med["nnunet_step"] + med["nnunet_data"]),
        "step_times_s": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "nnunet_setup_s": t1 - t0,
        "nnsam_setup_s": t2 - t1,
        "bank_fill_encoder_calls": bank_fill_calls,
        "encoder_calls_during_timed_iterations": calls_during,
        "encoder_calls_per_train_iteration": calls_during / max(1, steps),
        **extra,
    }


# ------------------------------------------------------------------------------------------- 3: time-to-segmentation
def annotated_indices(n_slices: int, count: int = 4) -> list[int]:
    """``count`` slices spread evenly inside the volume (not its first and last slice when it can)."""
    count = min(count, n_slices)
    if n_slices <= count:
        return list(range(n_slices))
    inside = sorted({int(round(x)) for x in np.linspace(0, n_slices - 1, count + 2)[1:-1]})
    if len(inside) == count:
        return inside
    return sorted({int(round(x)) for x in np.linspace(0, n_slices - 1, count)})


def measure_time_to_segmentation(root: Path, source: SliceSource, n_slices: int, device, iterations: Optional[int],
                                 seed: int = 0, fallback_s_per_iteration: Optional[float] = None,
                                 recompute_share: float = DEFAULT_RECOMPUTE_SHARE, encoder: str = "litemedsam",
                                 random_encoder: bool = False) -> dict:
    from nnsam_core.finetune import PRESETS, fine_tune
    from nnsam_core.predict import Segmenter
    from nnsam_core.training.nnsam import nnUNetTrainerNNSAM
    from nnsam_core.training.registry import config_of_trainer

    image, labels = source.volume(n_slices)
    slices = annotated_indices(n_slices)
    events: list[tuple[float, dict]] = []

    def progress(event: dict) -> None:
        events.append((time.perf_counter(), event))

    default = config_of_trainer(nnUNetTrainerNNSAM)  # what nnsam train runs when not told otherwise
    config = on_encoder(dataclasses.replace(default, recompute_share=recompute_share), encoder, random_encoder)
    config = None if config == default else config
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    bundle = fine_tune(image, labels, output=root / "bundle", slices=slices, class_names=source.class_names,
                       encoder=encoder, preset="quick", iterations=iterations, device=device.type, seed=seed,
                       progress=progress, nnsam_config=config)
    t1 = time.perf_counter()
    train_total = t1 - t0
    total_iters = iterations or PRESETS["quick"]
    train_events = [(t, e) for t, e in events if e.get("stage") == "train"]
    first_stage = {}
    for t, e in events:
        first_stage.setdefault(e.get("stage"), t)
    per_iter = None
    if len(train_events) >= 2:
        (ta, ea), (tb, eb) = train_events[0], train_events[-1]
        per_iter = (tb - ta) / max(1, eb["step"] - ea["step"])
    per_iter_source = "fine-tune progress events"
    if per_iter is None:  # too short a run to time an iteration: use the measured nnSAM iteration instead
        per_iter, per_iter_source = fallback_s_per_iteration, "training-iteration measurement (step + data)"
    setup = (first_stage.get("embed") or first_stage.get("train", t1)) - t0
    quick_estimate = train_total if per_iter is None else train_total + (PRESETS["quick"] - total_iters) * per_iter

    segmenter = Segmenter(bundle, device)
    _sync(device)
    s0 = time.perf_counter()
    label_map = segmenter.segment(image)
    _sync(device)
    seg_time = time.perf_counter() - s0
    if label_map.GetSize() != image.GetSize():
        raise RuntimeError(f"label map size {label_map.GetSize()} differs from the image's {image.GetSize()}")
    import SimpleITK as sitk
    predicted = sitk.GetArrayViewFromImage(label_map)
    truth = sitk.GetArrayViewFromImage(labels)
    unseen = [z for z in range(n_slices) if z not in slices]
    dice = None
    if unseen:
        p, g = predicted[unseen] > 0, truth[unseen] > 0
        denominator = int(p.sum() + g.sum())
        dice = 2.0 * int((p & g).sum()) / denominator if denominator else None
    return {
        "volume": list(image.GetSize()),
        "annotated_slices": slices,
        "iterations": total_iters,
        "quick_preset_iterations": PRESETS["quick"],
        "batch_size": bundle.manifest["training"].get("batch_size"),
        "patch_size": bundle.manifest["training"].get("patch_size"),
        "max_size": bundle.manifest["training"].get("max_size"),  # the working-resolution cap fine_tune used
        # what the bundle says it trained with (nnsam_config is None for the default trainer)
        "recompute_share": float((bundle.manifest.get("nnsam_config") or {}).get("recompute_share", 0.0)),
        "train_s": train_total,
        "train_setup_s": setup,                 # reading, planning, preprocessing (before the embedding bank)
        "train_s_per_iteration": per_iter,
        "train_s_per_iteration_from": per_iter_source,
        "train_s_quick_preset_estimate": quick_estimate,
        "segment_s": seg_time,
        "segment_s_per_slice": seg_time / n_slices,
        "time_to_segmentation_s": train_total + seg_time,
        "time_to_segmentation_quick_estimate_s": quick_estimate + seg_time,
        "encoder_calls": segmenter.encoder_calls,
        "encoder_calls_per_segmented_slice": segmenter.encoder_calls / n_slices,
        "foreground_dice_unannotated_slices": dice,
        "bundle": str(root / "bundle"),
    }


# ------------------------------------------------------------------------------------------- 4: peak RAM (child)
def _ram_child(bundle: str, n_slices: int, size: int, device: str, data: Optional[str]) -> dict:
    """Runs in a fresh process: segment an n-slice volume, report this process's peak RSS."""
    from nnsam_core.bundle import Bundle
    from nnsam_core.predict import Segmenter

    source = SliceSource(size, Path(data) if data else None)
    image, _ = source.volume(n_slices)
    segmenter = Segmenter(Bundle.load(bundle), device)
    before = _peak_rss_gb()["self"]
    t0 = time.perf_counter()
    segmenter.segment(image)
    seconds = time.perf_counter() - t0
    peak = _peak_rss_gb()
    out = {"slices": n_slices, "peak_rss_gb": peak["self"], "peak_rss_children_gb": peak["children"],
           "rss_before_segment_gb": before, "segment_s": seconds, "encoder_calls": segmenter.encoder_calls}
    import torch
    if torch.cuda.is_available() and device == "cuda":
        out["cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated() / 1024 ** 3
    return out


def parse_ram_volume_slices(text) -> list[int]:
    """``--ram-volume-slices``: "16,32" -> [16, 32]; "0" or "" -> [] (skip the measurement)."""
    from nnsam_core.errors import NNSAMError
    try:
        counts = [int(x) for x in str(text or "").split(",") if x.strip()]
    except ValueError:
        raise NNSAMError(f"--ram-volume-slices wants slice counts like 16,32 (0 skips), not {text!r}") from None
    if any(n < 0 for n in counts):
        raise NNSAMError(f"--ram-volume-slices wants positive slice counts (0 skips), not {text!r}")
    return [n for n in counts if n > 0]


def measure_peak_ram(bundle: str, slice_counts: Sequence[int], size: int, device, data: Optional[Path]) -> dict:
    runs = []
    for n in slice_counts:
        cmd = [sys.executable, "-m", "nnsam_lab.speed", "--ram-child", bundle, str(n), str(size), device.type,
               str(data) if data else ""]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"RAM measurement ({n} slices) failed: {proc.stderr.strip().splitlines()[-1:]}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {"runs": runs, "target_slices": RAM_TARGET_SLICES, **peak_ram_at_target(runs)}


def peak_ram_at_target(runs: Sequence[dict]) -> dict:
    """The peak RAM of segmenting RAM_TARGET_SLICES slices from the measured ``runs`` (each ``slices`` and
    ``peak_rss_gb``): measured when a run was that large, else extrapolated linearly from the first and last run
    when that can mean something, else None (``method`` says which, and why)."""
    from nnsam_core.predict import DEFAULT_SLAB
    direct = [r for r in runs if r["slices"] >= RAM_TARGET_SLICES]
    if direct:
        return {"peak_rss_gb_target": direct[0]["peak_rss_gb"],
                "method": f"measured at {direct[0]['slices']} slices"}
    measure_it = f"use --ram-volume-slices {RAM_TARGET_SLICES} to measure it"
    if len(runs) < 2 or runs[-1]["slices"] == runs[0]["slices"] or runs[0]["slices"] < DEFAULT_SLAB:
        # Segmentation runs in slabs of DEFAULT_SLAB slices (a slab's encoder batch and tiles are the big
        # transient); beyond one slab only whole-volume arrays grow, so only volumes of >= one slab extrapolate.
        return {"peak_rss_gb_target": None,
                "method": f"measured at {', '.join(str(r['slices']) for r in runs)} slices; no extrapolation "
                          f"(needs two volumes of >= {DEFAULT_SLAB} slices)"}
    a, b = runs[0], runs[-1]
    per_slice = (b["peak_rss_gb"] - a["peak_rss_gb"]) / (b["slices"] - a["slices"])
    if per_slice <= 0:
        # The whole-volume arrays grow with every slice, so a peak that did not grow is the allocator's noise
        # outweighing that growth: a line through the two would fall short of the truth.
        return {"peak_rss_gb_target": None, "peak_rss_gb_per_slice": per_slice,
                "method": f"no extrapolation: the peak did not grow from {a['slices']} to {b['slices']} slices "
                          f"(noise larger than the growth); {measure_it}"}
    return {"peak_rss_gb_target": b["peak_rss_gb"] + per_slice * (RAM_TARGET_SLICES - b["slices"]),
            "peak_rss_gb_per_slice": per_slice,
            "method": f"linear extrapolation from {a['slices']} and {b['slices']} slices ({measure_it})"}


# ------------------------------------------------------------------------------------------- the command
def _fmt(value, unit: str = "", digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}{unit}"
    return f"{value}{unit}"


def _verdict(value, target, lower_is_better: bool = True, exact: bool = False) -> str:
    if value is None:
        return "n/a"
    if exact:
        return "met" if abs(value - target) < 1e-9 else "MISSED"
    return "met" if (value <= target if lower_is_better else value >= target) else "MISSED"


def time_to_segmentation_target(volume: Sequence[int], device: str) -> tuple[float, bool]:
    """(minutes, whether it applies) for a ``[size, size, slices]`` volume segmented on ``device``."""
    if device == "cuda":
        return TARGETS["time_to_segmentation_min_200_slices_gpu"], list(volume) == [512, 512, 200]
    return TARGETS["time_to_segmentation_min_64_slices_cpu"], list(volume) == [512, 512, 64] and device == "cpu"


def headline_train_step_ratio(training_iteration: dict) -> float:
    """nnSAM's step over nnU-Net's as configured: the share's mix when a recompute share was given."""
    return training_iteration.get("share_step_ratio", training_iteration["train_step_ratio"])


def format_table(r: dict) -> str:
    tr, ts, ram = r["training_iteration"], r.get("time_to_segmentation"), r.get("peak_ram")
    rows = [("measure", "value", "target", "verdict")]
    rows.append((f"nnU-Net train step (median of {tr['steps_timed']}, batch {tr['batch_size']}, patch "
                 f"{'x'.join(map(str, tr['patch_size']))})", _fmt(tr["nnunet_step_s"], " s"), "", ""))
    share = tr.get("recompute_share", 0.0)
    if share:
        rows.append(("nnSAM train step, cached embeddings (same batch)", _fmt(tr["nnsam_step_s"], " s"), "", ""))
        rows.append(("nnSAM train step, recomputing (same batch)", _fmt(tr["recomputed_step_s"], " s"), "", ""))
        rows.append((f"nnSAM train step at recompute share {share:g} (mix of the two)", _fmt(tr["share_step_s"], " s"),
                     "", ""))
    else:
        rows.append(("nnSAM train step (same batch)", _fmt(tr["nnsam_step_s"], " s"), "", ""))
    ratio = headline_train_step_ratio(tr)
    rows.append((f"train_step_ratio nnSAM/nnU-Net{f' (recompute share {share:g})' if share else ''}", _fmt(ratio),
                 f"<= {TARGETS['train_step_ratio']}", _verdict(ratio, TARGETS["train_step_ratio"])))
    if share:
        rows.append(("  cached steps only / recomputing every step",
                     f"{_fmt(tr['train_step_ratio'])} / {_fmt(tr['recomputed_step_ratio'])}", "", ""))
    rows.append(("data loading+augmentation nnU-Net / nnSAM",
                 f"{_fmt(tr['nnunet_data_s'], ' s')} / {_fmt(tr['nnsam_data_s'], ' s')}", "", ""))
    rows.append(("iteration ratio incl. data loading", _fmt(tr.get("share_iteration_ratio", tr["iteration_ratio"])),
                 "", ""))
    if share:  # the target of 0 is the cache's; a share recomputes on purpose
        rows.append((f"encoder calls per training iteration (cached steps; share {share:g}: expected)",
                     f"{_fmt(tr['encoder_calls_per_train_iteration'])} ({_fmt(tr['share_encoder_calls_per_train_iteration'])})",
                     "", ""))
    else:
        rows.append(("encoder calls per training iteration", _fmt(tr["encoder_calls_per_train_iteration"]), "0",
                     _verdict(tr["encoder_calls_per_train_iteration"], 0.0, exact=True)))
    rows.append((f"  (bank fill before training: {tr['bank_fill_encoder_calls']} calls)", "", "", ""))
    if "recomputed_step_s" in tr and not share:
        rows.append(("for reference: nnSAM recomputing embeddings every step (authors' way)",
                     f"{_fmt(tr['recomputed_step_s'], ' s')} (ratio {_fmt(tr['recomputed_step_ratio'])}, "
                     f"{_fmt(tr['recomputed_encoder_calls_per_train_iteration'])} encoder calls)", "", ""))
    if ts:
        rows.append(("encoder calls per segmented slice", _fmt(ts["encoder_calls_per_segmented_slice"]), "1",
                     _verdict(ts["encoder_calls_per_segmented_slice"], 1.0, exact=True)))
        working = (f", patch {'x'.join(map(str, ts['patch_size']))} (max size {ts.get('max_size') or 'native'})"
                   if ts.get("patch_size") else "")
        recomputing = f", recompute share {ts['recompute_share']:g}" if ts.get("recompute_share") else ""
        rows.append((f"fine-tune, {len(ts['annotated_slices'])} slices, {ts['iterations']} it, batch {ts['batch_size']}"
                     f"{working}{recomputing}", _fmt(ts["train_s"] / 60, " min"), "", ""))
        rows.append(("  of which setup (read, plan, preprocess)", _fmt(ts["train_setup_s"] / 60, " min"), "", ""))
        rows.append(("  time per training iteration", _fmt(ts["train_s_per_iteration"], " s"), "", ""))
        rows.append((f"segment {'x'.join(map(str, ts['volume']))} ({_fmt(ts['segment_s_per_slice'], ' s')}/slice)",
                     _fmt(ts["segment_s"] / 60, " min"), "", ""))
        # The targets: 64 slices of 512x512 on a CPU, 200 on a GPU; other configurations get no verdict.
        target, applies = time_to_segmentation_target(ts["volume"], r["device"])
        quick = ts["iterations"] == ts["quick_preset_iterations"]
        rows.append(("time-to-segmentation (measured)", _fmt(ts["time_to_segmentation_s"] / 60, " min"),
                     f"<= {target:.0f} min" if applies and quick else "",
                     _verdict(ts["time_to_segmentation_s"] / 60, target) if applies and quick else ""))
        if not quick:
            rows.append((f"time-to-segmentation, quick preset ({ts['quick_preset_iterations']} it, extrapolated)",
                         _fmt(ts["time_to_segmentation_quick_estimate_s"] / 60, " min"),
                         f"<= {target:.0f} min" if applies else "(512x512 x64 CPU, x200 GPU)",
                         _verdict(ts["time_to_segmentation_quick_estimate_s"] / 60, target) if applies else ""))
        if ts.get("foreground_dice_unannotated_slices") is not None:
            rows.append(("  (foreground Dice on unannotated slices)", _fmt(ts["foreground_dice_unannotated_slices"]),
                         "", ""))
    if ram:
        for run in ram["runs"]:
            rows.append((f"peak RAM segmenting {run['slices']} slices (fresh process, VmHWM)", _fmt(run["peak_rss_gb"], " GB"),
                         "", ""))
        rows.append((f"peak RAM segmenting {RAM_TARGET_SLICES} slices ({ram['method'].split(' (')[0]})",
                     _fmt(ram["peak_rss_gb_target"], " GB"), f"<= {RAM_TARGET_GB:.0f} GB",
                     _verdict(ram["peak_rss_gb_target"], RAM_TARGET_GB)))
    rows.append(("peak RAM of this process / largest child", f"{_fmt(r['peak_rss_gb']['self'], ' GB')} / "
                 f"{_fmt(r['peak_rss_gb']['children'], ' GB')}", "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for k, row in enumerate(rows):
        lines.append("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |")
        if k == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _machine(device) -> dict:
    import torch
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    with contextlib.suppress(Exception):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_bench_speed(args) -> int:
    from .speed_in_volume import encoder_precision, run_in_volume
    if args.scenario == "in-volume":
        return run_in_volume(args)
    from nnsam_core.encoders import resolve_cpu_precision
    resolve_cpu_precision(args.encoder_precision)  # a bad value fails now, in one line
    with encoder_precision(args.encoder_precision):
        return _run_bench_speed(args)


def _run_bench_speed(args) -> int:
    import torch
    from nnsam_core.devices import resolve_device
    from nnsam_core.errors import NNSAMError
    from nnsam_core.methods import check_recompute_share

    device = resolve_device(args.device)
    if args.size < 32:
        raise NNSAMError("--size must be at least 32")
    if args.slices < 1 or args.steps < 1 or args.warmup < 0:
        raise NNSAMError("--slices and --steps must be at least 1, --warmup at least 0")
    check_recompute_share(args.recompute_share)
    if args.encoder == "mobilesam" and not args.random_encoder:
        from nnsam_core.weights import require_mobilesam
        try:
            require_mobilesam()  # now, not after the first measurements
        except NNSAMError as exc:
            raise NNSAMError(f"{exc}; or time the encoder without them: --random-encoder") from None
    if args.work_dir:
        # A folder the user names for the scratch files is made on demand, like nnU-Net's output folders.
        try:
            Path(args.work_dir).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise NNSAMError(f"cannot create --work-dir {args.work_dir} ({exc.strerror}); give a writable folder")
    n_slices = args.slices
    ram_counts = parse_ram_volume_slices(args.ram_volume_slices)
    data_dir = None if args.synthetic else find_chd_dataset(args.data)
    source = SliceSource(args.size, data_dir)
    machine = _machine(device)
    started = datetime.datetime.now(datetime.timezone.utc)
    root = Path(tempfile.mkdtemp(prefix="nnsam-bench-speed-", dir=args.work_dir))
    result = {"command": "nnsam-lab bench-speed " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "nnsam-lab bench-speed",
              "date_utc": started.isoformat(timespec="seconds"), "device": device.type, "machine": machine,
              "data": source.description, "size": args.size, "targets": TARGETS,
              "encoder": {"name": args.encoder, "weights": "random" if args.random_encoder else "pretrained"}}

    def say(message: str) -> None:
        print(f"[bench-speed {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    try:
        say(f"preparing 4 training cases ({source.description}) in {root}")
        workspace = _make_training_workspace(root / "workspace", source, device)
        say(f"timing {args.warmup} warm-up + {args.steps} interleaved training iterations per trainer")
        result["training_iteration"] = measure_training_iteration(workspace, device, args.steps, args.warmup,
                                                                  seed=args.seed, da_workers=args.da_workers,
                                                                  compare_recomputed=args.compare_recomputed,
                                                                  recompute_share=args.recompute_share,
                                                                  encoder=args.encoder,
                                                                  random_encoder=args.random_encoder)
        say(f"train_step_ratio {headline_train_step_ratio(result['training_iteration']):.3f}")
        if not args.skip_segmentation:
            say(f"time-to-segmentation: fine-tune on 4 of {n_slices} slices "
                f"({args.iterations or QUICK_ITERATIONS} iterations), then segment every slice")
            tr = result["training_iteration"]
            result["time_to_segmentation"] = measure_time_to_segmentation(
                root / "tts", source, n_slices, device, args.iterations, seed=args.seed,
                fallback_s_per_iteration=tr.get("share_step_s", tr["nnsam_step_s"]) + tr["nnsam_data_s"],
                recompute_share=args.recompute_share, encoder=args.encoder, random_encoder=args.random_encoder)
            if ram_counts:
                say(f"peak RAM of segmenting {', '.join(map(str, ram_counts))} slices in fresh processes")
                result["peak_ram"] = measure_peak_ram(result["time_to_segmentation"]["bundle"], ram_counts,
                                                      args.size, device, data_dir)
        result["peak_rss_gb"] = _peak_rss_gb()
        if device.type == "cuda":
            result["cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 1024 ** 3
        result["wall_s"] = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
    finally:
        if not args.keep_work_dir:
            shutil.rmtree(root, ignore_errors=True)
    write_result_json(args.json, result)
    print(f"nnsam-lab bench-speed, {result['date_utc']}, device {device.type} "
          f"({machine.get('gpu') or machine.get('cpu', '')}, {machine['cpu_count']} cores, "
          f"{machine['torch_threads']} torch threads), data: {source.description}, encoder {args.encoder}"
          f"{' (randomly initialised: timing only)' if args.random_encoder else ''}")
    print(format_table(result))
    print(f"train_step_ratio={headline_train_step_ratio(result['training_iteration']):.4f}", flush=True)
    return 0


def write_result_json(path: Optional[str], result: dict) -> None:
    """Every number of a run as JSON at ``path`` (nothing when no path was asked for)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2, default=str))


def add_bench_speed_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench-speed", help="measure nnSAM's cost over nnU-Net: training step, encoder calls, time, RAM",
        description="Measure, in one run: nnU-Net's and nnSAM's training-iteration time on the same batch "
        "(train_step_ratio), encoder calls per training iteration and per segmented slice, time-to-segmentation "
        "(quick preset, 4 annotated slices of a size x size x N volume) and peak RAM. The last line printed is "
        "train_step_ratio=<nnSAM/nnU-Net>. "
        "With --scenario in-volume: the in-volume job at a given size, nnU-Net then nnSAM, each fine-tuned on "
        "--annotated K evenly spaced slices of a --size S x S x --slices N volume and segmenting all N slices; "
        "the time to a result of each is split into phases (setup, bank fill, training encoder, training network, "
        "save, segmentation encoder, segmentation network), with the quick preset extrapolated from "
        "--iterations; --steps, --warmup, --ram-volume-slices, --skip-segmentation and --compare-recomputed do "
        "not apply to it. Its last line is time_to_result_ratio=<nnSAM/nnU-Net> (quick preset).")
    p.add_argument("--scenario", choices=("default", "in-volume"), default="default",
                   help="default: the four measurements above; in-volume: fine-tune on --annotated slices plus "
                   "segmentation of the whole volume, nnSAM against nnU-Net, phase by phase")
    p.add_argument("--annotated", type=int, default=5, metavar="K",
                   help="in-volume scenario: painted slices, evenly spaced inside the volume (default 5)")
    p.add_argument("--segment-slices", type=int, metavar="M",
                   help="in-volume scenario: segment only the middle M slices and scale the segmentation time to "
                   "all --slices (default: segment them all)")
    p.add_argument("--encoder-precision", choices=("auto", "float32", "bfloat16"),
                   help="the frozen encoder's precision on a CPU (default: the engine's choice, auto: bfloat16 "
                   "where the CPU has native bfloat16, else float32; NNSAM_ENCODER_PRECISION is honoured too)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available")
    p.add_argument("--json", metavar="OUT", help="also write every number as JSON to OUT")
    p.add_argument("--slices", type=int, default=64, help="slices of the time-to-segmentation volume (default 64)")
    p.add_argument("--size", type=int, default=512, help="in-plane size of every slice (default 512)")
    p.add_argument("--iterations", type=int, help="training iterations of the time-to-segmentation run "
                   f"(default: the quick preset's {QUICK_ITERATIONS}; fewer -> the quick preset is extrapolated)")
    p.add_argument("--steps", type=int, default=8, help="timed training iterations per trainer (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up iterations per trainer (default 2)")
    p.add_argument("--ram-volume-slices", default="16,32", metavar="N[,M]",
                   help=f"slices of the volumes whose segmentation peak RAM is measured in a fresh process "
                   f"(default 16,32, extrapolated linearly to {RAM_TARGET_SLICES}; give {RAM_TARGET_SLICES} to measure "
                   "it directly; 0 skips)")
    p.add_argument("--da-workers", type=int, help="nnU-Net augmentation workers (default: as fine_tune, 0 on CPU)")
    p.add_argument("--data", help=f"the {CHD_NAME} raw dataset folder (default: ../shared/data/{CHD_NAME} if present)")
    p.add_argument("--synthetic", action="store_true", help="use synthetic slices even when the cardiac data exist")
    p.add_argument("--skip-segmentation", action="store_true", help="only the training-iteration measurement")
    p.add_argument("--compare-recomputed", action="store_true",
                   help="also time nnSAM recomputing the embeddings on every step, as the authors' code does")
    p.add_argument("--recompute-share", type=float, default=DEFAULT_RECOMPUTE_SHARE, metavar="P",
                   help="benchmark nnSAM recomputing the embeddings at a random share P (0 to 1) of its training "
                   "steps, as nnsam train --recompute-share P: its step is timed as the mix of the cached and the "
                   "recomputing step, and the time-to-segmentation run trains with it (default "
                   f"{DEFAULT_RECOMPUTE_SHARE:g}, nnsam train's; 0: the cache only)")
    p.add_argument("--encoder", choices=ENCODER_NAMES, default=ENCODER_NAMES[0],
                   help="nnSAM's SAM encoder (default litemedsam, nnsam train's)")
    p.add_argument("--random-encoder", action="store_true",
                   help="time the encoder randomly initialised, with no weights file (its speed does not depend "
                   "on its weights; the fine-tune is then the random-encoder control)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", help="parent folder of the temporary working folder (default: system temp)")
    p.add_argument("--keep-work-dir", action="store_true")
    p.set_defaults(func=run_bench_speed)
    return p


def _main_child(argv: Sequence[str]) -> int:
    bundle, n, size, device, data = argv[:5]
    import warnings
    warnings.filterwarnings("ignore")
    with contextlib.redirect_stdout(sys.stderr):
        out = _ram_child(bundle, int(n), int(size), device, data or None)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--ram-child":
        sys.exit(_main_child(sys.argv[2:]))
    from .cli import main
    sys.exit(main(["bench-speed", *sys.argv[1:]]))
