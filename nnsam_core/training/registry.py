"""The trainer classes by name: the catalogue in ``nnsam_core.methods`` made real (and checked against it)."""

from __future__ import annotations

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from ..config import NNSAMConfig
from ..methods import TRAINER_CATALOGUE, trainer_name_for
from . import variants
from .fewshot import nnUNetTrainerFewShot
from .nnsam import nnUNetTrainerNNSAM

TRAINER_CLASSES = {cls.__name__: cls for cls in (
    nnUNetTrainer, nnUNetTrainerFewShot, nnUNetTrainerNNSAM,
    *(getattr(variants, name) for name in TRAINER_CATALOGUE if hasattr(variants, name)))}


def config_of_trainer(trainer_class) -> "NNSAMConfig | None":
    return getattr(trainer_class, "nnsam_config", None)


def trainer_for(method: str, encoder: str):
    """The trainer class a (method, encoder) trains with; one clear line for a pair that does not exist."""
    return TRAINER_CLASSES[trainer_name_for(method, encoder)]


def _check_catalogue() -> None:
    if set(TRAINER_CLASSES) != set(TRAINER_CATALOGUE):
        raise RuntimeError(f"trainer catalogue and classes disagree: {set(TRAINER_CLASSES) ^ set(TRAINER_CATALOGUE)}")
    for name, cls in TRAINER_CLASSES.items():
        entry = TRAINER_CATALOGUE[name]
        expected = None if entry.config is None else NNSAMConfig(**entry.config)
        if entry.method != (expected.method if expected else "nnunet") or config_of_trainer(cls) != expected:
            raise RuntimeError(f"trainer {name}: catalogue says {expected}, class has {config_of_trainer(cls)}")


_check_catalogue()
