"""What a resumed training must share with the stopped one: the same inputs and settings (refused otherwise, so
a bundle never records one thing while its network learned another), and the SAM branch it started with."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .config import NNSAM_CONFIG_FILE, NNSAMConfig
from .errors import NNSAMError
from .workspace import TrainingCase

INPUTS_FILE = "inputs.json"  # in the work folder, written when a training starts


def fingerprint(cases: Sequence[TrainingCase], settings: dict) -> dict:
    """The training data (every case's voxels, labels and spacing) and the settings that shape the model."""
    digest = hashlib.sha256()
    for case in cases:
        digest.update(case.name.encode())
        for image in (case.image, case.labels):
            digest.update(np.ascontiguousarray(sitk.GetArrayViewFromImage(image)).tobytes())
            digest.update(repr(tuple(round(v, 6) for v in image.GetSpacing())).encode())
    return {"data_sha256": digest.hexdigest(), **settings}


def record_inputs(work_root: Path, record: dict) -> None:
    path = work_root / INPUTS_FILE
    path.write_text(json.dumps(record, indent=2))


def check_same_inputs(work_root: Path, record: dict) -> None:
    """Refuse a resume whose inputs or settings differ from the stopped training's (an unreadable or missing
    record, from an older work folder, is not checked)."""
    path = work_root / INPUTS_FILE
    try:
        before = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    differ = [key for key in sorted(set(before) | set(record)) if before.get(key) != record.get(key)]
    if differ:
        what = ", ".join("the painted data" if k == "data_sha256" else
                         f"{k} {_short(before.get(k))} then, {_short(record.get(k))} now" for k in differ)
        raise NNSAMError(f"--resume: the stopped training had other inputs or settings ({what}); resume with the "
                         "same ones, or train afresh without --resume")


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def config_as_started(config: Optional[NNSAMConfig], fold_dir: Path, requested: Optional[NNSAMConfig]):
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
