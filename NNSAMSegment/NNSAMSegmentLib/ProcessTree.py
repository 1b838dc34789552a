"""Ending a process together with everything it started: the last resort of Stop.

Inside Slicer the engine runs under ``PythonSlicer``, a launcher that starts the real interpreter as its child
and forwards no signals; the engine may have worker processes of its own. Killing the launcher alone would leave
the engine running. :func:`killTree` kills the descendants first (deepest first), then the process itself.

Descendants are found with psutil when it is importable, else from ``/proc`` (Linux) or ``ps`` (macOS); on
Windows ``taskkill /T /F`` ends the tree.
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Callable, Optional


def _parentsFromProc() -> dict[int, int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as handle:
                stat = handle.read()
        except OSError:
            continue  # ended meanwhile
        # "pid (name) state ppid ...": the name may hold spaces or parentheses, so split after the last ")".
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1:
            parents[int(entry)] = int(fields[1])
    return parents


def _parentsFromPs() -> dict[int, int]:
    output = subprocess.run(["ps", "-A", "-o", "pid=,ppid="], capture_output=True, text=True, timeout=10).stdout
    parents = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            parents[int(parts[0])] = int(parts[1])
    return parents


def _parentMap() -> dict[int, int]:
    if os.path.isdir("/proc") and os.path.exists(f"/proc/{os.getpid()}/stat"):
        return _parentsFromProc()
    return _parentsFromPs()


def descendants(pid: int, parentMap: Optional[Callable[[], dict[int, int]]] = None) -> list[int]:
    """The processes started by ``pid``, their children and so on, deepest first."""
    try:
        import psutil

        return [child.pid for child in reversed(psutil.Process(pid).children(recursive=True))]
    except ImportError:
        pass
    except Exception:  # psutil.NoSuchProcess and friends: nothing left to find
        return []
    parents = (parentMap or _parentMap)()
    children: dict[int, list[int]] = {}
    for child, parent in parents.items():
        children.setdefault(parent, []).append(child)
    found, frontier = [], [pid]
    while frontier:
        nextFrontier = []
        for parent in frontier:
            for child in children.get(parent, []):
                if child not in found and child != pid:
                    found.append(child)
                    nextFrontier.append(child)
        frontier = nextFrontier
    return list(reversed(found))


def killTree(pid: int) -> None:
    """Kill ``pid`` and all its descendants; processes that already ended are skipped."""
    if pid <= 0:
        return
    if os.name == "nt":  # pragma: no cover - Windows
        subprocess.run(["taskkill", "/PID", str(pid), "/T", "/F"], capture_output=True, timeout=30)
        return
    for target in descendants(pid) + [pid]:
        try:
            os.kill(target, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
