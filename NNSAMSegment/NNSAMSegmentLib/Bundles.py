"""Model bundles (a folder with ``nnsam.json``) and the folder where the extension keeps them.

Bundles only ever appear under their final name complete: they are copied under a hidden temporary name in the
destination folder and then renamed, which is atomic on one file system.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

from .Errors import UserError

MANIFEST_NAME = "nnsam.json"
_INCOMING_PREFIX = ".incoming-"


@dataclass(frozen=True)
class BundleClass:
    value: int
    name: str


@dataclass(frozen=True)
class BundleInfo:
    path: str
    classes: tuple
    encoder: str = ""
    method: str = ""
    formatVersion: Optional[int] = None
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path))

    @property
    def classNames(self) -> list[str]:
        return [c.name for c in self.classes]

    def adaptationProblem(self, classNames) -> Optional[str]:
        """Why annotations with ``classNames`` cannot adapt this model (None when they can): the engine's
        --start-from needs the same classes in the same order."""
        if list(classNames) != self.classNames:
            return (f"The current model segments {', '.join(self.classNames)}; the annotations have "
                    f"{', '.join(classNames)}. Paint the same segments in the same order, or untick "
                    "'Fine-tune starts from the current model'.")
        return None

    def describe(self) -> str:
        details = ", ".join(part for part in (self.encoder, self.method) if part)
        classes = ", ".join(self.classNames)
        return f"{self.name} ({details}; classes: {classes})" if details else f"{self.name} (classes: {classes})"

    @classmethod
    def read(cls, path: str) -> "BundleInfo":
        """Read and check ``path/nnsam.json``; any problem is a one-line :class:`UserError`."""
        path = os.path.abspath(os.fspath(path))
        manifestPath = os.path.join(path, MANIFEST_NAME)
        if not os.path.isdir(path):
            raise UserError(f"{path} is not a folder; choose the folder of a model bundle.")
        if not os.path.isfile(manifestPath):
            raise UserError(f"{path} is not a model bundle: it has no {MANIFEST_NAME}.")
        try:
            with open(manifestPath, encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, ValueError) as error:
            raise UserError(f"Cannot read {manifestPath}: {error}.") from error
        if not isinstance(data, dict):
            raise UserError(f"{manifestPath} is not a bundle description (expected a JSON object).")
        classes = []
        for entry in data.get("classes") or []:
            if not isinstance(entry, dict):
                raise UserError(f"{manifestPath} has a malformed class entry: {entry!r}.")
            value, name = entry.get("value"), entry.get("name")
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or not isinstance(name, str) \
                    or not name:
                raise UserError(f"{manifestPath} has a malformed class entry: {entry!r}.")
            classes.append(BundleClass(value, name))
        if not classes:
            raise UserError(f"{manifestPath} lists no classes; the bundle is incomplete.")
        if len({c.value for c in classes}) != len(classes):
            raise UserError(f"{manifestPath} gives two classes the same value.")
        encoder = data.get("encoder")
        encoderName = encoder.get("name", "") if isinstance(encoder, dict) else (encoder or "")
        formatVersion = data.get("format_version")
        return cls(path=path, classes=tuple(classes), encoder=str(encoderName), method=str(data.get("method") or ""),
                   formatVersion=formatVersion if isinstance(formatVersion, int) else None, raw=data)


def safeName(name: str) -> str:
    """A folder name from free text (volume names may hold spaces, slashes, colons)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip()).strip("._")
    return cleaned or "model"


def timestampedName(baseName: str, now: Optional[float] = None) -> str:
    return f"{safeName(baseName)}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}"


def uniquePath(parentDirectory: str, name: str) -> str:
    candidate = os.path.join(parentDirectory, safeName(name))
    index = 2
    while os.path.exists(candidate):
        candidate = os.path.join(parentDirectory, f"{safeName(name)}-{index}")
        index += 1
    return candidate


def placeBundle(sourceDirectory: str, parentDirectory: str, name: str, move: bool = False) -> str:
    """Put a complete copy of a bundle into ``parentDirectory`` under a unique name; return its path.

    The copy is built under a hidden temporary name and renamed at the end, so an interruption never leaves a
    half-copied bundle that looks complete. With ``move`` the source is renamed directly when that is possible.
    """
    BundleInfo.read(sourceDirectory)  # refuse to place something that is not a bundle
    os.makedirs(parentDirectory, exist_ok=True)
    destination = uniquePath(parentDirectory, name)
    if move:
        try:
            os.replace(sourceDirectory, destination)
            return destination
        except OSError:
            pass  # another file system: copy below
    incoming = tempfile.mkdtemp(prefix=_INCOMING_PREFIX, dir=parentDirectory)
    try:
        copied = os.path.join(incoming, "bundle")
        shutil.copytree(sourceDirectory, copied)
        os.replace(copied, destination)
    finally:
        shutil.rmtree(incoming, ignore_errors=True)
    if move:
        shutil.rmtree(sourceDirectory, ignore_errors=True)
    return destination


class BundleStore:
    """The folder where fine-tuned and imported bundles are kept (one sub-folder per bundle)."""

    def __init__(self, rootDirectory: str):
        self.rootDirectory = os.path.abspath(rootDirectory)

    def bundles(self) -> list[BundleInfo]:
        """Valid bundles, newest first; broken folders and unfinished copies are skipped."""
        if not os.path.isdir(self.rootDirectory):
            return []
        found = []
        for entry in os.scandir(self.rootDirectory):
            if not entry.is_dir() or entry.name.startswith("."):
                continue
            try:
                found.append((entry.stat().st_mtime, BundleInfo.read(entry.path)))
            except UserError:
                continue
        return [info for _, info in sorted(found, key=lambda item: item[0], reverse=True)]

    def adopt(self, sourceDirectory: str, baseName: str) -> BundleInfo:
        """Move a finished bundle (e.g. out of a job folder) into the store."""
        return BundleInfo.read(placeBundle(sourceDirectory, self.rootDirectory, baseName, move=True))
