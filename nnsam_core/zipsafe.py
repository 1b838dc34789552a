"""Unpacking a .zip that nobody vouches for: only plain files with plain relative names, within size limits."""

from __future__ import annotations

import stat
import zipfile
import zlib
from pathlib import Path
from typing import Optional

from .errors import NNSAMError

MAX_UNPACKED_BYTES = 2 * 1024 ** 3  # a 2D nnU-Net checkpoint is well under 1 GB
MAX_ZIP_MEMBERS = 64


def safe_extract_zip(zip_path: Path, dest: Path, manifest: str, max_bytes: Optional[int] = None) -> Path:
    """Extract only plain files with plain relative names, within a total size limit; returns the folder that
    holds ``manifest``. A damaged archive (bad checksum, cut short, lying headers) is one clear error."""
    try:
        return _extract(zip_path, dest, manifest, max_bytes)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
        raise NNSAMError(f"{zip_path.name} is damaged ({_reason(exc)}); download or export it again") from None


def _reason(exc: Exception) -> str:
    text = " ".join(str(exc).split())[:80]
    return text or exc.__class__.__name__


def _extract(zip_path: Path, dest: Path, manifest: str, max_bytes: Optional[int]) -> Path:
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
    manifests = list(dest.rglob(manifest))
    if len(manifests) != 1:
        raise NNSAMError(f"{zip_path.name} holds {len(manifests)} {manifest} files; it is not one nnSAM bundle")
    return manifests[0].parent
