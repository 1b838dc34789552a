"""Device choice: auto picks CUDA, then Apple MPS, then CPU."""

from __future__ import annotations

import os

import torch

from .errors import NNSAMError

DEVICES = ("auto", "cpu", "cuda", "mps")


def available_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_device(name: str = "auto") -> torch.device:
    if name not in DEVICES:
        raise NNSAMError(f"unknown device '{name}'; choose one of: {', '.join(DEVICES)}")
    if name == "auto":
        name = available_device()
    if name == "cuda" and not torch.cuda.is_available():
        raise NNSAMError("--device cuda was asked for but no CUDA GPU is available; use --device auto or cpu")
    if name == "mps" and available_device() != "mps":
        raise NNSAMError("--device mps was asked for but Apple MPS is not available; use --device auto or cpu")
    if name == "cpu":
        torch.set_num_threads(cpu_threads())
    return torch.device(name)


def cpu_threads() -> int:
    """Every core for the network (nnU-Net's augmentation runs in the main process on CPU), unless the user set
    OMP_NUM_THREADS, the usual way to share a machine between jobs."""
    requested = os.environ.get("OMP_NUM_THREADS", "").strip()
    if requested.isdigit() and int(requested) > 0:
        return int(requested)
    return max(1, os.cpu_count() or 1)
