"""The time estimate's probe: per-phase costs measured on this device in seconds, with the networks a fine-tune
would really run.

The network is nnU-Net's planned PlainConvUNet for the patch (built from the architecture nnU-Net's planner writes
for 2d), fused with the SAM branch for nnsam (model/network.py) and fed cached embeddings as during training;
nnU-Net's loss (Dice + cross-entropy with deep supervision), SGD and gradient clipping. Each timing follows one
warm-up and is the median of REPEATS. Random inputs: the costs depend on shapes, not values.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .estimate import UnitCosts

REPEATS = 3
FEATURES_BASE, FEATURES_MAX = 32, 512  # nnU-Net's 2d plan: 32 features doubling per stage up to 512


@dataclass(frozen=True)
class ProbeSpec:
    device: torch.device
    method: str
    encoder: Optional[str]      # None: no SAM branch
    patch_size: tuple           # y, x
    strides: tuple
    kernel_sizes: tuple
    batch_size: int
    classes: int                # output heads, background included


def _median_seconds(action: Callable[[], None], device: torch.device) -> float:
    action()  # warm-up: first allocations, lazy initialisation, memory layouts
    _sync(device)
    times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        action()
        _sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def build_unet(spec: ProbeSpec, deep_supervision: bool = True):
    """nnU-Net's 2d PlainConvUNet for ``spec``'s patch, as its default planner configures it."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    stages = len(spec.strides)
    return PlainConvUNet(
        input_channels=1, n_stages=stages,
        features_per_stage=[min(FEATURES_MAX, FEATURES_BASE * 2 ** i) for i in range(stages)],
        conv_op=torch.nn.Conv2d, kernel_sizes=[list(k) for k in spec.kernel_sizes],
        strides=[list(s) for s in spec.strides], n_conv_per_stage=[2] * stages, num_classes=spec.classes,
        n_conv_per_stage_decoder=[2] * (stages - 1), conv_bias=True, norm_op=torch.nn.InstanceNorm2d,
        norm_op_kwargs={"eps": 1e-5, "affine": True}, dropout_op=None, dropout_op_kwargs=None,
        nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=deep_supervision)


class _CachedEmbeddings:
    """Stands in for the embedding bank: any slice's embedding is one held tensor (a lookup, as in training)."""

    def __init__(self):
        from .encoders import EMBEDDING_CHANNELS
        self._embedding = torch.randn(EMBEDDING_CHANNELS, 64, 64).half()

    def get(self, keys, device):
        return torch.stack([self._embedding for _ in keys]).to(device=device, dtype=torch.float32)


def build_network(spec: ProbeSpec):
    """The network the fine-tune trains, and the input width it takes (image, plus grid channels for nnsam)."""
    unet = build_unet(spec)
    if spec.encoder is None:
        return unet, 1
    from .config import NNSAMConfig
    from .model.grid import GRID_CHANNELS
    from .model.network import fuse_sam_branch

    network = fuse_sam_branch(unet, NNSAMConfig(encoder=spec.encoder), enable_deep_supervision=True)
    network.attach_bank(_CachedEmbeddings())
    return network, 1 + GRID_CHANNELS


def _inputs(spec: ProbeSpec, batch: int, channels: int) -> torch.Tensor:
    from .model.grid import grid_channels

    height, width = spec.patch_size
    image = torch.randn(batch, 1, height, width)
    if channels == 1:
        return image
    grid = torch.from_numpy(grid_channels((batch, height, width), list(range(1, batch + 1))))  # (3, B, H, W)
    return torch.cat([image, grid.permute(1, 0, 2, 3)], 1)


def _loss(outputs_count: int):
    import numpy as np
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    loss = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    weights = np.array([1 / (2 ** i) for i in range(outputs_count)])
    weights[-1] = 0
    return DeepSupervisionWrapper(loss, weights / weights.sum())


def time_training_step(spec: ProbeSpec) -> float:
    device = spec.device
    network, channels = build_network(spec)
    network = network.to(device).train()
    data = _inputs(spec, spec.batch_size, channels).to(device)
    with torch.no_grad():
        outputs = network(data)
    labels = torch.randint(0, spec.classes, (spec.batch_size, 1, *spec.patch_size)).float()
    targets = [F.interpolate(labels, size=o.shape[2:], mode="nearest").to(device) for o in outputs]
    loss = _loss(len(outputs))
    optimizer = torch.optim.SGD(network.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            value = loss(network(data), targets)
        if scaler is not None:
            scaler.scale(value).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
            scaler.step(optimizer)
            scaler.update()
        else:
            value.backward()
            torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
            optimizer.step()

    return _median_seconds(step, device)


def time_augmentation(spec: ProbeSpec) -> float:
    """nnU-Net's training augmentation of one batch (2d: rotation, scaling, elastic-free spatial transform,
    intensity transforms, mirroring, deep-supervision targets), as its trainer builds it. On a CPU it runs in the
    training process between steps (fine_tune starts no augmentation workers there), so it adds to each step."""
    import numpy as np
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    scales = [list(i) for i in 1 / np.cumprod(np.vstack(spec.strides), axis=0)][:-1]
    transforms = nnUNetTrainer.get_training_transforms(
        spec.patch_size, (-np.pi, np.pi), scales, (0, 1), False, use_mask_for_norm=[False],
        foreground_labels=list(range(1, spec.classes)))
    # nnU-Net's loader hands the transforms a patch enlarged to hold any rotation; about 1.4x the patch in 2d
    height, width = (int(round(v * 1.42)) for v in spec.patch_size)
    samples = [(torch.randn(1, height, width), torch.randint(0, spec.classes, (1, height, width)).to(torch.int16))
               for _ in range(spec.batch_size)]

    def augment() -> None:
        for image, labels in samples:
            transforms(image=image.clone(), segmentation=labels.clone())
    return _median_seconds(augment, torch.device("cpu"))


def time_segmenting_slice(spec: ProbeSpec) -> float:
    """One slice through the network as nnU-Net's predictor does it in 2d: the tile and its three mirrors."""
    device = spec.device
    network, channels = build_network(spec)
    network.decoder.deep_supervision = False
    network = network.to(device).eval()
    tile = _inputs(spec, 1, channels).to(device)

    def predict() -> None:
        with torch.no_grad(), torch.autocast(device.type, enabled=device.type == "cuda"):
            total = network(tile)
            for axes in ((2,), (3,), (2, 3)):
                total += torch.flip(network(torch.flip(tile, axes)), axes)
        total.float().cpu()

    return _median_seconds(predict, device)


def time_encoder_call(spec: ProbeSpec) -> float:
    """The frozen encoder on one slice (the bank's and the segmentation's unit of work)."""
    from .encoders import get_spec, load_encoder

    encoder = load_encoder(spec.encoder, preparation=get_spec(spec.encoder).input_preparation).to(spec.device)
    height, width = spec.patch_size
    one_slice = torch.randn(1, 1, height, width)
    return _median_seconds(lambda: encoder(one_slice), spec.device)


def measure_costs(spec: ProbeSpec) -> UnitCosts:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        # On a GPU nnU-Net augments in worker processes while the network trains: only the step counts there.
        augmentation = time_augmentation(spec) if spec.device.type == "cpu" else 0.0
        return UnitCosts(train_step_s=time_training_step(spec) + augmentation,
                         encoder_call_s=time_encoder_call(spec) if spec.encoder else 0.0,
                         segment_slice_s=time_segmenting_slice(spec))
