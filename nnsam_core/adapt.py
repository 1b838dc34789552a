"""Starting a fine-tune from a saved model (``--start-from``): the next scan of a study adapts the model the
previous scans made, from one or two painted slices, instead of starting from scratch.

The new training uses the parent's nnU-Net plans (so the network has the parent's shape and the new scan is
normalised as the parent's scans were), starts from the parent's weights and embedding statistics, and trains a
short schedule. The parent bundle is only read; the new bundle records which one it started from.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from .bundle import Bundle
from .config import NNSAMConfig
from .errors import NNSAMError

# Adapting needs far fewer steps than learning from scratch (the quick preset's 1000), and a tenth of nnU-Net's
# initial learning rate: at nnU-Net's own rate two painted slices undo part of what a good starter knew.
ADAPT_ITERATIONS = 250
ADAPT_LEARNING_RATE = 0.001
# The adapted model saved lies part of the way back from the trained weights to the parent's (weight-space
# ensembling of a fine-tune with its start): one or two painted slices pull the network toward this scan, the
# parent keeps most of what the scans it learned from taught it, and segmenting still runs one network.
ADAPT_KEEP_PARENT = 0.7
GENERIC_CLASS_PREFIX = "class_"  # names images.read_labels gives classes nobody named


@dataclass(frozen=True)
class Parent:
    bundle: Bundle
    path: Path

    @property
    def config(self) -> Optional[NNSAMConfig]:
        return self.bundle.nnsam_config

    def record(self) -> dict:
        """What the new bundle records about where it started: the parent's name and content hashes."""
        manifest = self.bundle.manifest
        canonical = json.dumps(manifest, sort_keys=True).encode()
        return {"name": self.path.name, "id": hashlib.sha256(canonical).hexdigest(),
                "model_sha256": (manifest.get("files") or {}).get("model.pth"), "trainer": manifest["trainer"],
                "created": manifest.get("created")}


def load_parent(path: os.PathLike, method: Optional[str] = None, encoder: Optional[str] = None) -> Parent:
    """The bundle to start from, refused in one line when a method or encoder asked for is not its own."""
    path = Path(path)
    try:
        bundle = Bundle.load(path)
    except NNSAMError as exc:
        raise NNSAMError(f"--start-from: {exc}") from None
    if method is not None and bundle.method != method:
        raise NNSAMError(f"--start-from {path.name} was trained with method {bundle.method}, not {method}; "
                         f"adapt it with --method {bundle.method} or train afresh")
    config = bundle.nnsam_config
    if encoder is not None and config is not None and config.encoder != encoder:
        raise NNSAMError(f"--start-from {path.name} uses the {config.encoder} encoder, not {encoder}; adapt it with "
                         f"--encoder {config.encoder} or train afresh")
    return parent_checked(Parent(bundle, path))


def parent_checked(parent: Parent) -> Parent:
    if parent.bundle.manifest["configuration"] not in parent.bundle.plans.get("configurations", {}):
        raise NNSAMError(f"--start-from {parent.path.name} has no plan for its configuration; it cannot be adapted")
    return parent


def adapted_class_names(parent: Parent, names: Sequence[str]) -> list[str]:
    """The new labels' classes must be the parent's. A label map whose classes nobody named takes the parent's
    names when it has no more classes than the parent."""
    wanted = parent.bundle.class_names
    if all(n == f"{GENERIC_CLASS_PREFIX}{i}" for i, n in enumerate(names, start=1)) and len(names) <= len(wanted):
        return list(wanted)
    if list(names) != list(wanted):
        raise NNSAMError(f"--start-from {parent.path.name} segments {', '.join(wanted)}; the new labels have "
                         f"{', '.join(names)}; paint the same classes in the same order, or train afresh")
    return list(wanted)


def plans_for(parent: Parent, dataset_name: str) -> dict:
    """The parent's nnU-Net plans, for the new training's dataset."""
    plans = json.loads(json.dumps(parent.bundle.plans))
    plans["dataset_name"] = dataset_name
    return plans


def blended_with_parent(trained: dict, parent: Parent, keep: float = ADAPT_KEEP_PARENT) -> dict:
    """``keep`` of the parent's weights plus ``1 - keep`` of the trained ones, tensor by tensor (integer buffers
    are the trained network's). Both networks have the parent's shape: adapting started from its weights."""
    blended = {}
    for name, tensor in trained.items():
        start = parent.bundle.network_weights[name].to(tensor.device, tensor.dtype)
        blended[name] = torch.lerp(tensor, start, keep) if tensor.is_floating_point() else tensor
    return blended
