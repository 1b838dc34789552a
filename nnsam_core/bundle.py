"""Model bundles: a folder (or a .zip of it) that says exactly what it contains.

    BUNDLE/
      nnsam.json     format version, method, trainer, encoder name + weights SHA-256, injection stage, SAM input
                     preparation, classes, versions, training slices and seed, SHA-256 of every other file
      plans.json     nnU-Net plans
      dataset.json   nnU-Net dataset.json (class names)
      model.pth      network weights only (no SAM encoder tensors, no optimizer, no pickled objects)

Bundles are untrusted input: tensors load with ``weights_only=True``, nothing in a bundle is imported or
executed, the trainer name must be on an allow-list, every file must match its hash, and .zip import refuses
absolute paths, ``..``, links and archives that would unpack beyond a size limit.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .config import NNSAM_CONFIG_FILE, NNSAMConfig
from .errors import NNSAMError
from .methods import ENCODER_NAMES, TRAINER_CATALOGUE
from .weights import sha256_of
from .zipsafe import safe_extract_zip

FORMAT_VERSION = 1
MANIFEST = "nnsam.json"
MODEL_FILE = "model.pth"
PAYLOAD_FILES = ("plans.json", "dataset.json", MODEL_FILE)
NNUNET_CHECKPOINT = "checkpoint_final.pth"


@dataclass
class Bundle:
    path: Path
    manifest: dict
    plans: dict
    dataset_json: dict
    network_weights: dict = field(repr=False, default_factory=dict)
    inference_allowed_mirroring_axes: Optional[tuple] = None

    @property
    def method(self) -> str:
        return self.manifest["method"]

    @property
    def classes(self) -> list[dict]:
        return self.manifest["classes"]

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.classes]

    @classmethod
    def load(cls, path: os.PathLike) -> "Bundle":
        """Load a bundle folder or .zip, checking everything before any tensor is touched. An nnU-Net training
        output folder (``.../TRAINER__PLANS__2d/fold_X`` from ``nnUNetv2_train``) loads too."""
        path = Path(path)
        if not path.exists():
            raise NNSAMError(f"bundle {path} does not exist; give a bundle folder or .zip made by 'nnsam train'")
        if path.is_dir() and not (path / MANIFEST).exists() and (path / NNUNET_CHECKPOINT).is_file():
            return cls.from_nnunet_results(path)
        if path.is_file():
            if not zipfile.is_zipfile(path):
                raise NNSAMError(f"{path} is neither a bundle folder nor a .zip bundle")
            with tempfile.TemporaryDirectory(prefix="nnsam-bundle-") as tmp:
                folder = safe_extract_zip(path, Path(tmp), MANIFEST)
                bundle = cls._load_folder(folder)
            bundle.path = path
            return bundle
        return cls._load_folder(path)

    @classmethod
    def _load_folder(cls, folder: Path) -> "Bundle":
        manifest_path = folder / MANIFEST
        if not manifest_path.is_file():
            raise NNSAMError(f"{folder} has no {MANIFEST}; it is not an nnSAM bundle")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            raise NNSAMError(f"{manifest_path} is not valid JSON; the bundle is damaged, export it again") from None
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        if version != FORMAT_VERSION:
            raise NNSAMError(f"bundle {folder.name} has format version {version}, this nnsam reads version "
                             f"{FORMAT_VERSION}; retrain the model or use the nnsam version that made it")
        _check_manifest_fields(manifest, folder)
        for name in PAYLOAD_FILES:
            file = folder / name
            if file.is_symlink():
                raise NNSAMError(f"bundle {folder.name}: {name} is a link; a bundle holds plain files, export it again")
            if not file.is_file():
                raise NNSAMError(f"bundle {folder.name} lacks {name}; the bundle is incomplete, export it again")
            expected = manifest["files"].get(name)
            try:
                actual = sha256_of(file)
            except OSError as exc:
                raise NNSAMError(f"bundle {folder.name}: cannot read {name} ({exc.strerror}); check its "
                                 "permissions") from None
            if actual != expected:
                raise NNSAMError(f"bundle {folder.name}: {name} does not match its SHA-256 in {MANIFEST} "
                                 "(damaged or tampered); do not use it, get the bundle again from its author")
        plans = _read_json(folder, "plans.json")
        dataset_json = _read_json(folder, "dataset.json")
        try:
            checkpoint = torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise NNSAMError(f"bundle {folder.name}: {MODEL_FILE} holds more than plain tensors or is damaged "
                             f"({exc.__class__.__name__}); refusing to load it") from None
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("network_weights"), dict):
            raise NNSAMError(f"bundle {folder.name}: {MODEL_FILE} has no network weights")
        check_consistency(folder.name, manifest, plans, dataset_json, checkpoint["network_weights"])
        mirror = checkpoint.get("inference_allowed_mirroring_axes")
        return cls(folder, manifest, plans, dataset_json, checkpoint["network_weights"],
                   tuple(mirror) if mirror is not None else None)

    @property
    def nnsam_config(self) -> Optional[NNSAMConfig]:
        """The SAM branch the model was trained with (None for plain nnU-Net); checked when the bundle loaded."""
        recorded = self.manifest.get("nnsam_config")
        return NNSAMConfig.from_dict(recorded) if recorded else None

    @classmethod
    def from_nnunet_results(cls, fold_dir: os.PathLike) -> "Bundle":
        """A bundle view of ``nnUNetv2_train ... -tr nnUNetTrainerNNSAM`` output (the plug-and-play route)."""
        import numpy as np

        fold_dir = Path(fold_dir)
        model_dir = fold_dir.parent
        trainer_name, configuration = model_dir.name.split("__")[0], model_dir.name.split("__")[-1]
        if trainer_name not in TRAINER_CATALOGUE:
            raise NNSAMError(f"{model_dir.name} was trained with '{trainer_name}', which nnsam does not know; "
                             "use nnUNetv2_predict for it")
        # nnU-Net checkpoints hold numpy scalars in their logs: allow exactly those, still no arbitrary objects.
        numpy_globals = [np._core.multiarray.scalar, np.dtype, *[getattr(np.dtypes, n) for n in np.dtypes.__all__]]
        try:
            with torch.serialization.safe_globals(numpy_globals):
                checkpoint = torch.load(fold_dir / NNUNET_CHECKPOINT, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise NNSAMError(f"{fold_dir / NNUNET_CHECKPOINT} holds more than plain tensors "
                             f"({exc.__class__.__name__}); refusing to load it") from None
        recorded_file = fold_dir / NNSAM_CONFIG_FILE
        try:
            recorded = json.loads(recorded_file.read_text()) if recorded_file.is_file() else None
            config = NNSAMConfig.of_trainer(trainer_name, recorded)
        except (ValueError, TypeError, AttributeError) as exc:
            raise NNSAMError(f"{recorded_file} is not a valid nnSAM configuration ({exc}); restore it from the "
                             "training run or delete it to use the trainer's defaults") from None
        dataset_json = _read_json(model_dir, "dataset.json")
        labels = {k: int(v) for k, v in dataset_json["labels"].items() if k != "background"}
        manifest = {
            "format_version": FORMAT_VERSION, "method": TRAINER_CATALOGUE[trainer_name].method,
            "trainer": trainer_name, "configuration": configuration,
            "encoder": {"name": config.encoder if config else None, "weights_sha256": None},
            "nnsam_config": config.as_dict() if config else None,
            "classes": [{"value": v, "name": k} for k, v in sorted(labels.items(), key=lambda kv: kv[1])],
            "files": {}, "source": f"nnU-Net results folder {fold_dir}",
        }
        _check_manifest_fields(manifest, fold_dir)
        plans = _read_json(model_dir, "plans.json")
        check_consistency(model_dir.name, manifest, plans, dataset_json, checkpoint["network_weights"])
        mirror = checkpoint.get("inference_allowed_mirroring_axes")
        return cls(fold_dir, manifest, plans, dataset_json, checkpoint["network_weights"],
                   tuple(mirror) if mirror is not None else None)


def _check_manifest_fields(manifest: dict, folder: Path) -> None:
    required = {"method": str, "trainer": str, "encoder": dict, "classes": list, "files": dict, "configuration": str}
    wrong = [k for k, kind in required.items() if not isinstance(manifest.get(k), kind)]
    if wrong:
        raise NNSAMError(f"bundle {folder.name}: {MANIFEST} lacks or garbles {', '.join(wrong)}; the bundle is damaged")
    if not all(isinstance(c, dict) and isinstance(c.get("value"), int) and isinstance(c.get("name"), str)
               for c in manifest["classes"]):
        raise NNSAMError(f"bundle {folder.name}: {MANIFEST} has malformed classes; the bundle is damaged")
    if manifest["trainer"] not in TRAINER_CATALOGUE:
        raise NNSAMError(f"bundle {folder.name} names trainer '{manifest['trainer']}', which nnsam does not know; "
                         "refusing to load it")
    if manifest["method"] != "nnunet" and manifest["encoder"].get("name") not in ENCODER_NAMES:
        raise NNSAMError(f"bundle {folder.name} needs encoder '{manifest['encoder'].get('name')}', unknown here")
    if manifest.get("nnsam_config"):
        try:
            NNSAMConfig.from_dict(manifest["nnsam_config"])
        except (ValueError, TypeError, AttributeError) as exc:
            raise NNSAMError(f"bundle {folder.name}: {MANIFEST} has an invalid nnsam_config ({exc}); the bundle "
                             "is damaged") from None
    if manifest["configuration"] != "2d":
        raise NNSAMError(f"bundle {folder.name} uses configuration {manifest['configuration']}; only 2d is supported")


def _read_json(folder: Path, name: str) -> dict:
    try:
        data = json.loads((folder / name).read_text())
    except (OSError, ValueError) as exc:
        raise NNSAMError(f"bundle {folder.name}: {name} is not readable JSON ({exc.__class__.__name__}); the "
                         "bundle is damaged, export it again") from None
    if not isinstance(data, dict):
        raise NNSAMError(f"bundle {folder.name}: {name} is not a JSON object; the bundle is damaged")
    return data


def check_consistency(name: str, manifest: dict, plans: dict, dataset_json: dict, weights: dict) -> None:
    """The manifest, nnU-Net's plans and dataset.json and the network weights describe one model: the same
    classes, a plan for the configuration, an output layer with one channel per class plus background."""
    configuration = manifest["configuration"]
    if configuration not in (plans.get("configurations") or {}):
        raise NNSAMError(f"bundle {name}: plans.json has no '{configuration}' configuration; the bundle is "
                         "inconsistent, export it again from its author")
    labels = dataset_json.get("labels")
    if not isinstance(labels, dict):
        raise NNSAMError(f"bundle {name}: dataset.json has no labels; the bundle is damaged")
    try:
        listed = {int(v) for k, v in labels.items() if k != "background"}
    except (TypeError, ValueError):
        raise NNSAMError(f"bundle {name}: dataset.json has labels that are not plain values (regions are not "
                         "supported)") from None
    declared = {c["value"] for c in manifest["classes"]}
    if listed != declared:
        raise NNSAMError(f"bundle {name}: nnsam.json lists classes {sorted(declared)} but dataset.json "
                         f"{sorted(listed)}; the bundle is inconsistent, export it again from its author")
    kept = (manifest.get("postprocessing") or {}).get("largest_component", [])
    if not isinstance(kept, list) or not all(isinstance(v, int) and v in declared for v in kept):
        raise NNSAMError(f"bundle {name}: nnsam.json's postprocessing names classes it does not list; the bundle "
                         "is inconsistent, export it again from its author")
    heads = sorted((k for k in weights if k.startswith("decoder.seg_layers.") and k.endswith(".weight")),
                   key=lambda k: int(k.split(".")[2]) if k.split(".")[2].isdigit() else -1)
    if heads and int(weights[heads[-1]].shape[0]) != len(declared) + 1:
        raise NNSAMError(f"bundle {name}: the network predicts {int(weights[heads[-1]].shape[0]) - 1} classes but "
                         f"nnsam.json lists {len(declared)}; the bundle is inconsistent")
