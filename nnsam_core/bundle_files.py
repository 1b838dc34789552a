"""Writing bundles: atomically into place, one writer at a time, and to and from .zip files."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch

from .bundle import FORMAT_VERSION, MANIFEST, MODEL_FILE, PAYLOAD_FILES, Bundle
from .errors import NNSAMError
from .outputs import bundle_output_state, check_bundle_output, check_file_output
from .weights import sha256_of
from .zipsafe import safe_extract_zip


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
    state = bundle_output_state(target)
    if state not in ("new", "bundle", "empty folder"):  # checked before any work; this guards a race since
        raise NNSAMError(f"{target} is now an existing {state}, not a bundle folder; nothing was replaced")
    if state == "empty folder":
        target.rmdir()
    if state == "bundle":
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


def export_zip(bundle_dir: os.PathLike, zip_path: os.PathLike, overwrite: bool = False) -> Path:
    zip_path = check_file_output(zip_path, [bundle_dir], overwrite, suffixes=(".zip",), option="export to")
    bundle = Bundle.load(bundle_dir)  # never export something that would not load
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


def import_zip(zip_path: os.PathLike, target: os.PathLike, overwrite: bool = False) -> Path:
    """Unpack a .zip bundle safely, check it, and place it at ``target``."""
    zip_path = Path(zip_path)
    if not zip_path.is_file():
        raise NNSAMError(f"{zip_path} does not exist; give a .zip bundle")
    target = check_bundle_output(target, [zip_path], overwrite, option="import to")
    Bundle.load(zip_path)  # unpacked and checked in the system's temporary folder: nothing beside target yet
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        folder = safe_extract_zip(zip_path, tmp, MANIFEST)
        Bundle.load(folder)
        _replace_dir(folder, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextmanager
def exclusive_output(target: os.PathLike):
    """Refuse a second writer of the same output path (two trainings to one bundle) instead of interleaving. The
    lock file lives in nnsam's cache folder, named after the output's absolute path, so nothing is left beside
    the user's files; it stays there (unlinking it would let a third writer lock a fresh inode beside a live one)."""
    import fcntl
    import hashlib

    from .weights import cache_dir

    target = Path(target)
    locks = cache_dir() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(str(target.absolute()).encode()).hexdigest()[:32]
    handle = open(locks / f"{key}.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise NNSAMError(f"another nnsam job is writing {target} right now; wait for it or choose another "
                         "output path") from None
    try:
        yield
    finally:
        handle.close()
