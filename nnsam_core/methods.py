"""The catalogue of what the engine offers, by name: methods, encoders, SAM-branch choices and the trainers a
bundle may name. Light on purpose: the command line and the bundle format read it without importing torch or
nnU-Net's training stack (``nnsam_core.training.registry`` holds the classes and is checked against this)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

# What a user chooses between (nnsam train, the Slicer panel).
USER_METHODS = ("nnsam", "nnunet")
# Controls and references the lab also runs: the same encoder with random frozen weights; the embeddings recomputed
# on every augmented patch at every step, as the authors' code does.
LAB_METHODS = ("nnsam-random", "nnsam-recomputed")
METHODS = USER_METHODS + LAB_METHODS

# The SAM encoders (encoders.ENCODERS has their specs); the first is the default. Each one's SAM input
# preparation by default: what it was trained on (see encoders.py).
ENCODER_NAMES = ("litemedsam", "mobilesam")
ENCODER_SAM_INPUT = {"litemedsam": "unit-range", "mobilesam": "nnunet"}

# What the frozen encoder is fed (encoders.input_preparation) and where its embedding may be injected (in-plane
# downsampling of the U-Net skip); the authors inject at the 1/8 skip.
SAM_INPUTS = ("nnunet", "unit-range")
INJECT_STRIDES = (2, 4, 8, 16, 32)
DEFAULT_INJECT_STRIDE = 8
EMBEDDING_NORMS = ("standardise", "none")
EMBEDDING_MODES = ("cached", "recomputed")

# Share of the training steps that run the encoder on the augmented patches while the others sample the cache.
# The cache alone cannot follow nnU-Net's intensity augmentations; a tenth of the steps recomputing brought it to
# recomputing's accuracy for a small share of its cost (docs/results.md, "Recompute share").
DEFAULT_RECOMPUTE_SHARE = 0.1
# What a record that names no share trained with: the share came after those records (the cache alone).
LEGACY_RECOMPUTE_SHARE = 0.0


@dataclass(frozen=True)
class TrainerEntry:
    """A trainer a bundle or an nnU-Net results folder may name: its method and its SAM branch (None: none),
    as NNSAMConfig fields that differ from the defaults."""

    method: str
    config: Optional[dict] = field(default=None)


_NNSAM = TrainerEntry("nnsam", {})
# Trainers a bundle or results folder may name; anything else is refused (they are untrusted input).
TRAINER_CATALOGUE: dict[str, TrainerEntry] = {
    "nnUNetTrainer": TrainerEntry("nnunet"),
    "nnUNetTrainerFewShot": TrainerEntry("nnunet"),
    "nnUNetTrainerNNSAM": _NNSAM,
    "nnUNetTrainerNNSAM_MobileSAM": TrainerEntry("nnsam", {"encoder": "mobilesam"}),
    "nnUNetTrainerNNSAMCached": TrainerEntry("nnsam", {"recompute_share": 0.0}),
    "nnUNetTrainerNNSAMRandom": TrainerEntry("nnsam-random", {"pretrained": False}),
    "nnUNetTrainerNNSAMRandom_MobileSAM": TrainerEntry("nnsam-random", {"encoder": "mobilesam", "pretrained": False}),
    "nnUNetTrainerNNSAMRecomputed": TrainerEntry("nnsam-recomputed", {"embeddings": "recomputed",
                                                                      "recompute_share": 0.0}),
    **{f"nnUNetTrainerNNSAM_{schedule}": _NNSAM
       for schedule in ("debug", "1epoch", "10epochs", "50epochs", "250epochs", "full")},
}
# The trainer each (method, encoder) trains with.
TRAINER_FOR = {
    ("nnunet", "litemedsam"): "nnUNetTrainerFewShot",
    ("nnunet", "mobilesam"): "nnUNetTrainerFewShot",
    ("nnsam", "litemedsam"): "nnUNetTrainerNNSAM",
    ("nnsam", "mobilesam"): "nnUNetTrainerNNSAM_MobileSAM",
    ("nnsam-random", "litemedsam"): "nnUNetTrainerNNSAMRandom",
    ("nnsam-random", "mobilesam"): "nnUNetTrainerNNSAMRandom_MobileSAM",
    ("nnsam-recomputed", "litemedsam"): "nnUNetTrainerNNSAMRecomputed",
}


def trainer_name_for(method: str, encoder: str) -> str:
    from .errors import NNSAMError
    try:
        return TRAINER_FOR[(method, encoder)]
    except KeyError:
        if method in METHODS:
            raise NNSAMError(f"method '{method}' is not available with the {encoder} encoder") from None
        raise NNSAMError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}") from None


def check_recompute_share(share: float) -> None:
    """The one-line error for a --recompute-share outside 0 to 1."""
    if not 0.0 <= share <= 1.0:  # also false for nan
        from .errors import NNSAMError
        raise NNSAMError(f"--recompute-share must be 0 to 1 (a share of the training steps), not {share:g}")


METHOD_HELP = "nnsam (default); nnunet: plain nnU-Net through the same pipeline, without the SAM branch"
LAB_METHOD_HELP = (METHOD_HELP + "; nnsam-random: the same encoder with random frozen weights (the control for "
                   "pretrained features); nnsam-recomputed: embeddings recomputed on every patch at every step, as "
                   "the authors' code does (the reference for the cache; slow)")
