"""The weights manifest and the engine's ``weights status`` answer.

Downloading, checking and caching weights is the engine's job (``nnsam weights download|import``); the panel
only needs to know what each encoder is, how big its download is and whether it is already there.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Optional

from .Errors import UserError

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class EncoderWeights:
    name: str
    label: str
    file: str
    url: Optional[str]
    sha256: Optional[str]
    size: Optional[int]
    offline: bool
    gitBlobSha1: Optional[str] = None
    approximateSizeMb: Optional[float] = None

    def sizeText(self) -> str:
        if self.size:
            return f"{self.size / 1e6:.0f} MB"
        if self.approximateSizeMb:
            return f"about {self.approximateSizeMb:.0f} MB"
        return "size unknown"


class WeightsManifest:
    def __init__(self, encoders: list[EncoderWeights]):
        self.encoders = {encoder.name: encoder for encoder in encoders}

    @classmethod
    def load(cls, path: str) -> "WeightsManifest":
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, ValueError) as error:
            raise UserError(f"Cannot read the weights manifest {path}: {error}.") from error
        encoders = []
        for entry in data.get("encoders", []):
            sha256 = entry.get("sha256")
            if sha256 is not None and not _SHA256.match(str(sha256)):
                raise UserError(f"The weights manifest gives {entry.get('name')} a malformed SHA-256.")
            encoders.append(EncoderWeights(
                name=entry["name"], label=entry.get("label", entry["name"]), file=entry.get("file", ""),
                url=entry.get("url"), sha256=sha256, size=entry.get("size"), offline=bool(entry.get("offline")),
                gitBlobSha1=entry.get("git_blob_sha1"), approximateSizeMb=entry.get("approximate_size_mb")))
        return cls(encoders)

    def get(self, name: str) -> EncoderWeights:
        try:
            return self.encoders[name]
        except KeyError:
            raise UserError(f"No weights are known for encoder '{name}'.") from None


_NEGATIVE = re.compile(r"\b(not cached|not available|missing|absent|false|no)\b", re.IGNORECASE)
_POSITIVE = re.compile(r"\b(available|cached|true|yes|ok|present)\b", re.IGNORECASE)


def parseWeightsStatus(text: str, encoderNames=("litemedsam", "mobilesam")) -> dict:
    """``{encoder: True | False | None}`` from ``weights status`` output (JSON or text; None = cannot tell)."""
    status = {name: None for name in encoderNames}

    def fromRecord(record) -> None:
        if isinstance(record, dict):
            name = record.get("encoder") or record.get("name")
            if name in status and isinstance(record.get("available"), bool):
                status[name] = record["available"]

    try:
        data = json.loads(text)
    except (ValueError, TypeError, RecursionError):
        data = None
    if isinstance(data, dict):
        data = data.get("encoders", data.get("weights", [data]))
    if isinstance(data, list):
        for record in data:
            fromRecord(record)
        return status

    for line in str(text).splitlines():
        stripped = line.strip()
        if stripped.startswith("{"):
            try:
                fromRecord(json.loads(stripped))
            except (ValueError, RecursionError):
                pass
            continue
        words = stripped.split(None, 1)
        if not words or words[0].rstrip(":") not in status:
            continue
        rest = words[1] if len(words) > 1 else ""
        # Negative words first: "not available" also contains "available".
        if _NEGATIVE.search(rest):
            status[words[0].rstrip(":")] = False
        elif _POSITIVE.search(rest):
            status[words[0].rstrip(":")] = True
    return status
