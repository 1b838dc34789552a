"""The per-phase costs the time estimate measured on this machine, kept in ``estimates.json`` in the cache folder
(``NNSAM_CACHE_DIR``, else ~/.cache/nnsam), so an estimate for the same kind of job measures nothing."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

from .estimate import UnitCosts

CACHE_FILE = "estimates.json"
# Part of every key: a change to what the probe measures (or how) makes earlier measurements stale.
PROBE_VERSION = 2  # 2: a CPU training step includes nnU-Net's augmentation of the batch


@dataclass(frozen=True)
class Measurement:
    costs: UnitCosts
    load: Optional[float]  # other programs' load per core while measuring (None: unknown)


def cache_key(device_type: str, method: str, encoder: Optional[str], precision: Optional[str],
              patch_size: tuple, batch_size: int) -> str:
    patch = "x".join(str(int(v)) for v in patch_size)
    return (f"v{PROBE_VERSION}|{device_type}|{method}|{encoder or '-'}|{precision or '-'}|patch {patch}"
            f"|batch {int(batch_size)}")


class CostCache:
    def __init__(self, folder: Optional[os.PathLike] = None):
        if folder is None:
            from .weights import cache_dir
            folder = cache_dir()
        self.path = Path(folder) / CACHE_FILE

    def _entries(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):  # none yet, or damaged: measure again
            return {}
        entries = data.get("entries") if isinstance(data, dict) else None
        return entries if isinstance(entries, dict) else {}

    def get(self, key: str) -> Optional[Measurement]:
        entry = self._entries().get(key)
        if not isinstance(entry, dict):
            return None
        try:
            values = {f.name: float(entry[f.name]) for f in fields(UnitCosts)}
        except (KeyError, TypeError, ValueError):
            return None
        if not all(math.isfinite(v) and v >= 0 for v in values.values()):
            return None
        load = entry.get("load_per_core")
        load = float(load) if isinstance(load, (int, float)) and math.isfinite(load) else None
        return Measurement(UnitCosts(**values), load)

    def put(self, key: str, costs: UnitCosts, load: Optional[float] = None) -> None:
        """Add or replace one entry; written under a temporary name and renamed, so a reader never sees half a
        file. A cache that cannot be written is not an error (the next estimate measures again)."""
        entries = self._entries()
        entries[key] = {**asdict(costs), "load_per_core": None if load is None else round(load, 2)}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle, partial = tempfile.mkstemp(prefix=f".{CACHE_FILE}.", dir=self.path.parent)
            with os.fdopen(handle, "w") as stream:
                json.dump({"entries": entries}, stream, indent=2, sort_keys=True)
            os.replace(partial, self.path)
        except OSError:
            try:
                os.remove(partial)
            except (OSError, UnboundLocalError):
                pass
