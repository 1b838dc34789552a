"""Where a command may write, decided before any work: never over an input, never over a file or folder the user
had (unless they say ``--overwrite``), never into a folder that does not exist or cannot be written.

A bundle folder is replaced only as a whole, and only when it holds nothing but a bundle: a folder with the user's
own files in it is never emptied.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

from .bundle import MANIFEST, PAYLOAD_FILES
from .errors import NNSAMError

BUNDLE_FILES = frozenset({MANIFEST, *PAYLOAD_FILES})
LABEL_MAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _inside(path: Path, folder: Path) -> bool:
    try:
        return folder.is_dir() and path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def _check_parent(path: Path, option: str) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise NNSAMError(f"{option} {path}: the folder {parent} does not exist; create it first or choose another path")
    if not parent.is_dir():
        raise NNSAMError(f"{option} {path}: {parent} is not a folder; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise NNSAMError(f"{option} {path}: cannot write in {parent} (permission denied); choose a writable folder")


def _check_not_input(path: Path, inputs: Iterable[Optional[os.PathLike]], option: str) -> None:
    for given in inputs:
        if given is None:
            continue
        source = Path(given)
        if _same_path(path, source) or _inside(path, source) or _inside(source, path):
            raise NNSAMError(f"{option} {path} would overwrite the input {source}; choose another output path")


def bundle_output_state(path: Path) -> str:
    """'new' (nothing there), 'bundle' (a folder holding only a bundle's files) or what else it is."""
    if path.is_symlink():
        return "link"
    if not path.exists():
        return "new"
    if not path.is_dir():
        return "file"
    entries = {p.name for p in path.iterdir()}
    if entries and entries <= BUNDLE_FILES and MANIFEST in entries:
        return "bundle"
    return "empty folder" if not entries else "folder"


def check_bundle_output(path: os.PathLike, inputs: Sequence[Optional[os.PathLike]] = (), overwrite: bool = False,
                        option: str = "-o") -> Path:
    """A folder a bundle may be written to (see the module docstring); nothing is created here."""
    path = Path(path)
    if str(path) in ("", ".", "..") or path.name in ("", ".", ".."):
        raise NNSAMError(f"{option} {path} names a folder, not a bundle; give a new folder name, e.g. -o heart_model")
    _check_parent(path, option)
    _check_not_input(path, inputs, option)
    state = bundle_output_state(path)
    if state in ("file", "link"):
        raise NNSAMError(f"{option} {path} is an existing {state}, not a bundle folder; choose a new folder name")
    if state == "folder":
        raise NNSAMError(f"{option} {path} is a folder with other files in it; choose a new folder name (nnsam never "
                         "empties a folder that is not a bundle)")
    if state == "bundle" and not overwrite:
        raise NNSAMError(f"{option} {path} already holds a bundle; add --overwrite to replace it, or choose a new name")
    return path


def check_file_output(path: os.PathLike, inputs: Sequence[Optional[os.PathLike]] = (), overwrite: bool = False,
                      suffixes: Sequence[str] = LABEL_MAP_SUFFIXES, option: str = "-o") -> Path:
    """A file a command may write (a label map, a .zip); nothing is created here."""
    path = Path(path)
    if not any(path.name.lower().endswith(s) for s in suffixes) or path.name.lower() in suffixes:
        raise NNSAMError(f"{option} {path} needs a file name ending in {', '.join(suffixes)}")
    if path.is_dir():
        raise NNSAMError(f"{option} {path} is an existing folder; give a file name")
    _check_parent(path, option)
    _check_not_input(path, inputs, option)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise NNSAMError(f"{option} {path} already exists; add --overwrite to replace it, or choose a new name")
    if path.exists() and not os.access(path, os.W_OK):
        raise NNSAMError(f"{option} {path} is read-only; choose another name")
    return path
