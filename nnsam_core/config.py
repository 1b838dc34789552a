"""NNSAMConfig: what makes an nnSAM network different from plain nnU-Net. One typed object travels from
``fine_tune`` to the trainer to the network, and every bundle records it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Optional

from .methods import (DEFAULT_INJECT_STRIDE, DEFAULT_RECOMPUTE_SHARE, EMBEDDING_MODES, EMBEDDING_NORMS,
                      ENCODER_NAMES, ENCODER_SAM_INPUT, INJECT_STRIDES, LEGACY_RECOMPUTE_SHARE, SAM_INPUTS,
                      TRAINER_CATALOGUE)

NNSAM_CONFIG_FILE = "nnsam_config.json"  # the record nnUNetTrainerNNSAM writes beside nnU-Net's checkpoints
# What records written before a field existed trained with. The one place for these rules.
LEGACY_DEFAULTS = {"sam_input": "nnunet", "recompute_share": LEGACY_RECOMPUTE_SHARE}


@dataclass(frozen=True)
class NNSAMConfig:
    encoder: str = ENCODER_NAMES[0]
    pretrained: bool = True          # False: the nnsam-random control (same encoder, random frozen weights)
    random_seed: int = 0             # seed of the random control's weights
    inject_stride: int = DEFAULT_INJECT_STRIDE  # inject at the skip with this in-plane downsampling factor
    embedding_norm: str = "standardise"  # per-channel z-score with the training slices' statistics, or "none"
    sam_input: Optional[str] = None  # methods.SAM_INPUTS; None: the encoder's own convention
    # "cached": each slice's embedding computed once and sampled through the grid channels; "recomputed": in
    # training the encoder runs on every augmented patch at every step (the authors' way; the cache's reference).
    embeddings: str = "cached"
    # "cached" only: the share of training steps (drawn per step) that run the encoder on the augmented patches.
    recompute_share: float = DEFAULT_RECOMPUTE_SHARE

    def __post_init__(self):
        checks = (("encoder", self.encoder, ENCODER_NAMES), ("embeddings", self.embeddings, EMBEDDING_MODES),
                  ("embedding_norm", self.embedding_norm, EMBEDDING_NORMS),
                  ("inject_stride", self.inject_stride, INJECT_STRIDES))
        for name, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}, not {value!r}")
        if not 0.0 <= float(self.recompute_share) <= 1.0:
            raise ValueError(f"recompute_share must be 0 to 1, not {self.recompute_share}")
        if self.sam_input is None:
            object.__setattr__(self, "sam_input", ENCODER_SAM_INPUT[self.encoder])
        elif self.sam_input not in SAM_INPUTS:
            raise ValueError(f"sam_input must be one of {', '.join(SAM_INPUTS)}, not {self.sam_input!r}")

    @property
    def method(self) -> str:
        """The method this branch is (methods.METHODS)."""
        if not self.pretrained:
            return "nnsam-random"
        return "nnsam-recomputed" if self.embeddings == "recomputed" else "nnsam"

    @property
    def partial_recompute_share(self) -> float:
        """The share of steps that recompute while the others sample the cache (0 when every step does one thing)."""
        return float(self.recompute_share) if self.embeddings == "cached" else 0.0

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "NNSAMConfig":
        """A recorded configuration. Fields it lacks take the value records of its time trained with; fields
        this version no longer has (experiments that were removed) are ignored: they never touched inference."""
        known = {f.name for f in fields(cls)}
        values = {**LEGACY_DEFAULTS, **{k: v for k, v in data.items() if k in known}}
        return cls(**values)

    @classmethod
    def of_trainer(cls, trainer_name: str, recorded: Optional[dict] = None) -> Optional["NNSAMConfig"]:
        """The SAM branch a trainer trained with: ``recorded`` (the nnsam_config.json beside its checkpoints)
        when there is one, else the trainer's own settings as records of that time trained with (None for plain
        nnU-Net trainers)."""
        entry = TRAINER_CATALOGUE[trainer_name]
        if entry.config is None:
            return None
        if recorded is not None:
            return cls.from_dict(recorded)
        # Folders from before the record existed: the trainer's own settings; the share came after the record.
        return replace(cls(**entry.config), recompute_share=LEGACY_RECOMPUTE_SHARE)
