"""Locate the resources the module and the Segment Editor effect share (terminology, weights manifest).

In a source checkout they live in the repository's top-level ``Resources/``; the CMake build copies them into
``NNSAMSegment/Resources/Shared/`` because an installed extension has no repository around it.
"""

from __future__ import annotations

import os

TERMINOLOGY_FILE = os.path.join("Terminology", "SegmentationCategoryTypeModifier-NNSAMSegmentCardiac.term.json")
WEIGHTS_MANIFEST_FILE = "weights_manifest.json"

_LIB_DIR = os.path.dirname(os.path.abspath(__file__))


def candidateDirectories(libDir: str = _LIB_DIR) -> list[str]:
    moduleDir = os.path.dirname(libDir)
    return [
        os.path.join(moduleDir, "Resources", "Shared"),  # built / installed extension
        os.path.join(os.path.dirname(moduleDir), "Resources"),  # source checkout
    ]


def sharedResourcePath(relativePath: str, libDir: str = _LIB_DIR) -> str:
    """Absolute path of a shared resource; raises FileNotFoundError naming every place looked at."""
    tried = []
    for directory in candidateDirectories(libDir):
        path = os.path.join(directory, relativePath)
        if os.path.isfile(path):
            return path
        tried.append(path)
    raise FileNotFoundError(f"NNSAMSegment resource {relativePath} not found; looked in: {', '.join(tried)}")
