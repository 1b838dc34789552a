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
import shutil
import stat
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch

from .errors import NNSAMError
from .weights import sha256_of

FORMAT_VERSION = 1
MANIFEST = "nnsam.json"
MODEL_FILE = "model.pth"
PAYLOAD_FILES = ("plans.json", "dataset.json", MODEL_FILE)
NNUNET_CHECKPOINT = "checkpoint_final.pth"
MAX_UNPACKED_BYTES = 2 * 1024 ** 3  # a 2D nnU-Net checkpoint is well under 1 GB
MAX_ZIP_MEMBERS = 64


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
                folder = safe_extract_zip(path, Path(tmp))
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
            if not file.is_file() or file.is_symlink():
                raise NNSAMError(f"bundle {folder.name} lacks {name}; the bundle is incomplete, export it again")
            expected = manifest["files"].get(name)
            if sha256_of(file) != expected:
                raise NNSAMError(f"bundle {folder.name}: {name} does not match its SHA-256 in {MANIFEST} "
                                 "(damaged or tampered); do not use it, get the bundle again from its author")
        try:
            checkpoint = torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise NNSAMError(f"bundle {folder.name}: {MODEL_FILE} holds more than plain tensors "
                             f"({exc.__class__.__name__}); refusing to load it") from None
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("network_weights"), dict):
            raise NNSAMError(f"bundle {folder.name}: {MODEL_FILE} has no network weights")
        mirror = checkpoint.get("inference_allowed_mirroring_axes")
        return cls(folder, manifest, json.loads((folder / "plans.json").read_text()),
                   json.loads((folder / "dataset.json").read_text()), checkpoint["network_weights"],
                   tuple(mirror) if mirror is not None else None)


    @classmethod
    def from_nnunet_results(cls, fold_dir: os.PathLike) -> "Bundle":
        """A bundle view of ``nnUNetv2_train ... -tr nnUNetTrainerNNSAM`` output (the plug-and-play route)."""
        import numpy as np
        from .methods import LEGACY_RECOMPUTE_SHARE
        from .network import NNSAMConfig
        from .training import KNOWN_TRAINERS, NNSAM_CONFIG_FILE, config_of_trainer, method_of_trainer

        fold_dir = Path(fold_dir)
        model_dir = fold_dir.parent
        trainer_name, configuration = model_dir.name.split("__")[0], model_dir.name.split("__")[-1]
        if trainer_name not in KNOWN_TRAINERS:
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
        trainer_class = KNOWN_TRAINERS[trainer_name]
        config = config_of_trainer(trainer_class)
        recorded = fold_dir / NNSAM_CONFIG_FILE
        if config is not None and recorded.is_file():  # as trained
            try:
                config = NNSAMConfig.from_dict(json.loads(recorded.read_text()))
            except (ValueError, TypeError) as exc:
                raise NNSAMError(f"{recorded} is not a valid nnSAM configuration ({exc}); restore it from the "
                                 "training run or delete it to use the trainer's defaults") from None
        elif config is not None:
            # Folders written before the record existed: the trainer's own settings, as then; the recompute
            # share came after the record, so they trained with the cache alone.
            config = replace(config, recompute_share=LEGACY_RECOMPUTE_SHARE)
        dataset_json = json.loads((model_dir / "dataset.json").read_text())
        labels = {k: int(v) for k, v in dataset_json["labels"].items() if k != "background"}
        manifest = {
            "format_version": FORMAT_VERSION, "method": method_of_trainer(trainer_class), "trainer": trainer_name,
            "configuration": configuration, "encoder": {"name": config.encoder if config else None,
                                                        "weights_sha256": None},
            "nnsam_config": config.as_dict() if config else None,
            "classes": [{"value": v, "name": k} for k, v in sorted(labels.items(), key=lambda kv: kv[1])],
            "files": {}, "source": f"nnU-Net results folder {fold_dir}",
        }
        _check_manifest_fields(manifest, fold_dir)
        mirror = checkpoint.get("inference_allowed_mirroring_axes")
        return cls(fold_dir, manifest, json.loads((model_dir / "plans.json").read_text()), dataset_json,
                   checkpoint["network_weights"], tuple(mirror) if mirror is not None else None)


def _check_manifest_fields(manifest: dict, folder: Path) -> None:
    from .encoders import ENCODERS
    from .training import ALLOWED_TRAINER_NAMES

    required = {"method": str, "trainer": str, "encoder": dict, "classes": list, "files": dict, "configuration": str}
    wrong = [k for k, kind in required.items() if not isinstance(manifest.get(k), kind)]
    if wrong:
        raise NNSAMError(f"bundle {folder.name}: {MANIFEST} lacks or garbles {', '.join(wrong)}; the bundle is damaged")
    if not all(isinstance(c, dict) and isinstance(c.get("value"), int) and isinstance(c.get("name"), str)
               for c in manifest["classes"]):
        raise NNSAMError(f"bundle {folder.name}: {MANIFEST} has malformed classes; the bundle is damaged")
    if manifest["trainer"] not in ALLOWED_TRAINER_NAMES:
        raise NNSAMError(f"bundle {folder.name} names trainer '{manifest['trainer']}', which nnsam does not know; "
                         "refusing to load it")
    if manifest["method"] != "nnunet" and manifest["encoder"].get("name") not in ENCODERS:
        raise NNSAMError(f"bundle {folder.name} needs encoder '{manifest['encoder'].get('name')}', unknown here")
    if manifest["configuration"] != "2d":
        raise NNSAMError(f"bundle {folder.name} uses configuration {manifest['configuration']}; only 2d is supported")


def write_bundle(target: os.PathLike, manifest: dict, plans: dict, dataset_json: dict, network_weights: dict,
                 inference_allowed_mirroring_axes) -> Path:
    """Write a bundle to a temporary folder beside ``target`` and rename it into place.

    An existing bundle at ``target`` stays intact until the new one is complete; it is then replaced.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        (tmp / "plans.json").write_text(json.dumps(plans, indent=2))
        (tmp / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
        torch.save({"network_weights": {k: v.detach().cpu() for k, v in network_weights.items()},
                    "inference_allowed_mirroring_axes": list(inference_allowed_mirroring_axes or [])},
                   tmp / MODEL_FILE)
        manifest = dict(manifest, format_version=FORMAT_VERSION,
                        files={name: sha256_of(tmp / name) for name in PAYLOAD_FILES})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _replace_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def default_mode(is_dir: bool) -> int:
    """Permissions a plain mkdir/open would give (mkdtemp/mkstemp make private files)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if is_dir else 0o666) & ~umask


def _replace_dir(new: Path, target: Path) -> None:
    os.chmod(new, default_mode(True))
    if target.is_symlink() or target.is_file():
        raise NNSAMError(f"{target} exists and is not a bundle folder; choose another output path")
    if target.exists():
        if not (target / MANIFEST).is_file():
            raise NNSAMError(f"{target} exists and is not an nnSAM bundle; choose another output path")
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


def export_zip(bundle_dir: os.PathLike, zip_path: os.PathLike) -> Path:
    bundle = Bundle.load(bundle_dir)  # never export something that would not load
    zip_path = Path(zip_path)
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{zip_path.name}.", suffix=".partial", dir=zip_path.parent)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name in (MANIFEST, *PAYLOAD_FILES):
                archive.write(Path(bundle.path) / name, arcname=name)
        os.chmod(tmp, default_mode(False))
        os.replace(tmp, zip_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return zip_path


def import_zip(zip_path: os.PathLike, target: os.PathLike) -> Path:
    """Unpack a .zip bundle safely, check it, and place it at ``target``."""
    zip_path, target = Path(zip_path), Path(target)
    if not zip_path.is_file():
        raise NNSAMError(f"{zip_path} does not exist; give a .zip bundle")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        folder = safe_extract_zip(zip_path, tmp)
        Bundle.load(folder)
        _replace_dir(folder, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def safe_extract_zip(zip_path: Path, dest: Path, max_bytes: Optional[int] = None) -> Path:
    """Extract only plain files with plain relative names, within a total size limit; returns the folder."""
    max_bytes = MAX_UNPACKED_BYTES if max_bytes is None else max_bytes
    if not zipfile.is_zipfile(zip_path):
        raise NNSAMError(f"{zip_path} is not a .zip file")
    with zipfile.ZipFile(zip_path) as archive:
        members = archive.infolist()
        if len(members) > MAX_ZIP_MEMBERS:
            raise NNSAMError(f"{zip_path.name} has {len(members)} entries; a bundle has 4, refusing it")
        total = 0
        for member in members:
            name = member.filename
            parts = Path(name).parts
            if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts or "\\" in name:
                raise NNSAMError(f"{zip_path.name} contains the unsafe path '{name}'; refusing it")
            mode = member.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise NNSAMError(f"{zip_path.name} contains a link '{name}'; refusing it")
            total += member.file_size
            if total > max_bytes:
                raise NNSAMError(f"{zip_path.name} would unpack to more than {max_bytes // 1024 ** 2} MB; "
                                 "refusing it (zip bomb?)")
        dest.mkdir(parents=True, exist_ok=True)
        for member in members:
            if member.is_dir():
                continue
            out_path = dest / member.filename
            out_path.parent.mkdir(parents=True, exist_ok=True)
            written = 0
            with archive.open(member) as src, open(out_path, "wb") as out:
                # Trust no header: count what actually comes out.
                for block in iter(lambda: src.read(1 << 20), b""):
                    written += len(block)
                    if written > member.file_size or written > max_bytes:
                        raise NNSAMError(f"{zip_path.name} unpacks to more than it declares; refusing it")
                    out.write(block)
    manifests = list(dest.rglob(MANIFEST))
    if len(manifests) != 1:
        raise NNSAMError(f"{zip_path.name} holds {len(manifests)} {MANIFEST} files; it is not one nnSAM bundle")
    return manifests[0].parent


@contextmanager
def exclusive_output(target: os.PathLike):
    """Refuse a second writer of the same output path (two trainings to one bundle) instead of interleaving."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.with_name(f".{target.name}.lock")
    import fcntl

    handle = open(lock, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise NNSAMError(f"another nnsam job is writing {target} right now; wait for it or choose another "
                         "output path") from None
    try:
        yield
    finally:
        # The lock file stays: unlinking it would let a third writer lock a fresh inode beside a live one.
        handle.close()
