"""Is an image file complete? ITK reads a truncated NIfTI, NRRD or MHA file with the missing voxels as zeros and
no error, so a cut-off download would train (or be scored) as if it were real. The header says how many bytes of
voxels follow; this counts them (through the compression, for gzip and zlib streams)."""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import Optional

from .errors import NNSAMError

_CHUNK = 1 << 20


def expected_voxel_bytes(path: Path) -> Optional[int]:
    """Bytes of voxel data the header of ``path`` announces (None when SimpleITK cannot tell)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None  # not an image header: reading the image will say so
    count = 1
    for size in reader.GetSize():
        count *= int(size)
    sample = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID(), reader.GetNumberOfComponents())
    per_voxel = sitk.GetArrayViewFromImage(sample).itemsize * reader.GetNumberOfComponents()
    return count * per_voxel


def _stream_length(handle, decompress=None) -> int:
    """Bytes a (possibly compressed) stream yields; raises EOFError when a compressed stream is cut short."""
    total = 0
    if decompress is None:
        while block := handle.read(_CHUNK):
            total += len(block)
        return total
    while block := handle.read(_CHUNK):
        total += len(decompress.decompress(block))
    if not decompress.eof:
        raise EOFError("compressed stream ended early")
    return total


def _nifti_payload(path: Path) -> Optional[int]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as handle:
        header = handle.read(540)
        for order in "<>":
            size = struct.unpack(order + "i", header[:4])[0] if len(header) >= 4 else 0
            if size == 348 and len(header) >= 348:  # NIfTI-1: vox_offset is a float at byte 108
                vox_offset = struct.unpack(order + "f", header[108:112])[0]
                break
            if size == 540 and len(header) >= 540:  # NIfTI-2: an int64 at byte 168
                vox_offset = struct.unpack(order + "q", header[168:176])[0]
                break
        else:
            return None if len(header) >= 348 else -1
        total = len(header) + _stream_length(handle)
    return total - int(vox_offset)


def _attached_header(path: Path, end_marker: bytes) -> tuple[dict, int]:
    """Fields and the offset of the data for a header followed by its data in the same file (NRRD, MHA)."""
    fields, offset = {}, 0
    with open(path, "rb") as handle:
        for raw in handle:
            offset += len(raw)
            line = raw.decode("latin-1").strip()
            if end_marker == b"" and line == "":
                break
            for separator in (":=", ":", "="):
                key, found, value = line.partition(separator)
                if found:
                    fields[key.strip().lower()] = value.strip()
                    break
            if end_marker and line.lower().startswith(end_marker.decode()):
                break
    return fields, offset


def _nrrd_payload(path: Path) -> Optional[int]:
    fields, offset = _attached_header(path, b"")
    if "data file" in fields or "datafile" in fields:
        return None  # detached data: ITK reads it and reports a missing file itself
    encoding = fields.get("encoding", "raw").lower()
    with open(path, "rb") as handle:
        handle.seek(offset)
        if encoding == "raw":
            return _stream_length(handle)
        if encoding in ("gzip", "gz"):
            return _stream_length(handle, zlib.decompressobj(wbits=47))
    return None  # text and other encodings: not checked


def _mha_payload(path: Path) -> Optional[int]:
    fields, offset = _attached_header(path, b"elementdatafile")
    if fields.get("elementdatafile", "").upper() != "LOCAL":
        return None
    with open(path, "rb") as handle:
        handle.seek(offset)
        if fields.get("compresseddata", "false").lower() == "true":
            return _stream_length(handle, zlib.decompressobj(wbits=47))
        return _stream_length(handle)


def check_complete(path: os.PathLike, what: str = "image") -> None:
    """One clear line when ``path`` holds fewer voxel bytes than its header announces."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        measure = _nifti_payload
    elif name.endswith(".nrrd"):
        measure = _nrrd_payload
    elif name.endswith(".mha"):
        measure = _mha_payload
    else:
        return
    try:
        found = measure(path)
    except gzip.BadGzipFile:
        return  # not gzip at all: reading the image will say what it is
    except (EOFError, zlib.error, struct.error):
        found = -1  # a compressed stream cut short: incomplete whatever the header says
    except OSError:
        return  # unreadable: reading the image will say why
    expected = expected_voxel_bytes(path) if found != -1 else 0
    if found is not None and expected is not None and found < expected:
        raise NNSAMError(f"{what} {path} is incomplete (the file is cut short: fewer voxels than its header says); "
                         "copy or export it again")
