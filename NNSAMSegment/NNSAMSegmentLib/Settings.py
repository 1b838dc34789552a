"""Choices remembered between sessions: last bundle, encoder, preset, device, fresh-embedding share, bundle folder,
resumable fine-tune.

The store is anything with ``value(key, default)`` and ``setValue(key, value)``: ``qt.QSettings`` in Slicer
(through :class:`QtSettingsStore`), a dict in tests.
"""

from __future__ import annotations

import os
from typing import Optional, Protocol

from .EngineCommands import DEFAULT_ENCODER, DEFAULT_RECOMPUTE_SHARE, DEVICES, ENCODERS, PRESETS, RECOMPUTE_SHARES

GROUP = "NNSAMSegment"


class SettingsStore(Protocol):
    def value(self, key: str, default=None): ...

    def setValue(self, key: str, value) -> None: ...


class DictSettingsStore:
    def __init__(self, initial: Optional[dict] = None):
        self.values = dict(initial or {})

    def value(self, key, default=None):
        return self.values.get(key, default)

    def setValue(self, key, value) -> None:
        self.values[key] = value


class QtSettingsStore:
    """``qt.QSettings`` (Slicer's settings file); Qt is imported only when this is created."""

    def __init__(self):
        import qt

        self._settings = qt.QSettings()

    def value(self, key, default=None):
        value = self._settings.value(key)
        return default if value is None else value

    def setValue(self, key, value) -> None:
        self._settings.setValue(key, value)


class ModelMemory:
    """Typed access to the remembered choices; invalid stored values fall back to defaults."""

    def __init__(self, store: SettingsStore):
        self.store = store

    def _get(self, name: str, default: str, choices=None) -> str:
        value = self.store.value(f"{GROUP}/{name}", default)
        value = "" if value is None else str(value)
        if choices is not None and value not in choices:
            return default
        return value

    def _set(self, name: str, value) -> None:
        self.store.setValue(f"{GROUP}/{name}", "" if value is None else str(value))

    @property
    def lastBundlePath(self) -> Optional[str]:
        """The last bundle used, if it still exists."""
        path = self._get("LastBundle", "")
        return path if path and os.path.isdir(path) else None

    @lastBundlePath.setter
    def lastBundlePath(self, path: Optional[str]) -> None:
        self._set("LastBundle", path or "")

    @property
    def resumableFineTunePath(self) -> Optional[str]:
        """The job folder of a stopped fine-tune that can be resumed, if it still exists."""
        path = self._get("ResumableFineTune", "")
        return path if path and os.path.isdir(path) else None

    @resumableFineTunePath.setter
    def resumableFineTunePath(self, path: Optional[str]) -> None:
        self._set("ResumableFineTune", path or "")

    @property
    def encoder(self) -> str:
        return self._get("Encoder", DEFAULT_ENCODER, ENCODERS)

    @encoder.setter
    def encoder(self, value: str) -> None:
        self._set("Encoder", value)

    @property
    def preset(self) -> str:
        return self._get("Preset", "quick", PRESETS)

    @preset.setter
    def preset(self, value: str) -> None:
        self._set("Preset", value)

    @property
    def device(self) -> str:
        return self._get("Device", "auto", DEVICES)

    @device.setter
    def device(self, value: str) -> None:
        self._set("Device", value)

    @property
    def recomputeShare(self) -> float:
        """Share of training steps with fresh embeddings: one of the panel's choices, else the default."""
        choices = tuple(f"{share:g}" for share in RECOMPUTE_SHARES)  # as the setter writes them
        return float(self._get("RecomputeShare", f"{DEFAULT_RECOMPUTE_SHARE:g}", choices))

    @recomputeShare.setter
    def recomputeShare(self, value: float) -> None:
        self._set("RecomputeShare", f"{float(value):g}")

    @property
    def resultTarget(self) -> str:
        return self._get("ResultTarget", "fill", ("fill", "new"))

    @resultTarget.setter
    def resultTarget(self, value: str) -> None:
        self._set("ResultTarget", value)

    def bundleFolder(self, default: str) -> str:
        return self._get("BundleFolder", "") or default

    def setBundleFolder(self, path: str) -> None:
        self._set("BundleFolder", path)
