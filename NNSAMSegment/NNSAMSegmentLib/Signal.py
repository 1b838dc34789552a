"""A minimal signal/slot helper.

PythonQt cannot declare new Qt signals on Python classes, so logic classes use this instead. Slots are called
synchronously, in the thread that emits, which is the thread that delivers process events (Qt's main thread in
Slicer, the test's thread with :class:`~NNSAMSegmentLib.ProcessRunner.SubprocessRunner`).
"""

from __future__ import annotations

import itertools
from typing import Callable


class Signal:
    def __init__(self):
        self._slots: dict[int, Callable] = {}
        self._ids = itertools.count()

    def connect(self, slot: Callable) -> int:
        if not callable(slot):
            raise TypeError("slot must be callable")
        connectionId = next(self._ids)
        self._slots[connectionId] = slot
        return connectionId

    def disconnect(self, connectionId: int) -> bool:
        return self._slots.pop(connectionId, None) is not None

    def disconnectAll(self) -> None:
        self._slots.clear()

    def emit(self, *args, **kwargs) -> None:
        # Copy: a slot may disconnect itself while we iterate.
        for slot in list(self._slots.values()):
            slot(*args, **kwargs)

    __call__ = emit
