"""The clinician's baseline: Slicer's "Fill between slices" on the painted slices, as a method of the benchmark.

Slicer's effect is ITK's morphological contour interpolation (Albu et al. 2008; PyPI
``itk-morphologicalcontourinterpolation``) along the slice axis. What the filter does, and so what this method
does:

- each label is interpolated on its own, between the painted slices that hold that label: a structure absent from
  one painted slice is bridged from the nearest painted slices above and below that hold it, across the slice
  where it is absent;
- slices before the first and after the last painted slice holding a label get nothing of it;
- the painted slices are returned as painted (the filter may write a bridged label onto a painted slice where that
  label is absent; the painting wins, as it does for the clinician).

Slice positions: the filter works in index space, so painted slices are placed at their real slice index on a
regular grid (a sparse volume, e.g. one patient's one-slice cases, has gaps); the distance between two painted
slices is then the real one.

ITK runs in a worker process of its own (:mod:`.itk_worker`), fed numpy arrays: ``itk`` and SimpleITK loaded in
one process abort at interpreter exit, and the benchmark needs SimpleITK.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from nnsam_core.errors import NNSAMError
from nnsam_core.methods import METHODS

FILL_BETWEEN = "fill-between"
# The lab's methods: the engine's networks plus the clinician's baseline, which trains nothing and so is the lab's
# alone (the engine's METHODS are what a bundle can be trained with).
BENCH_METHODS = METHODS + (FILL_BETWEEN,)
FILL_HELP = ("fill-between: no training; the annotated slices' labels interpolated between them along the slice "
             "axis with ITK's morphological contour interpolation (Slicer's \"Fill between slices\"), in-volume "
             "protocol only")


class _Worker:
    """The ITK worker process (see :mod:`.itk_worker`), started on first use and kept for the process's life."""

    def __init__(self):
        from .itk_worker import Pipe

        lab_root = str(Path(__file__).resolve().parents[2])  # the folder holding nnsam_lab: this very copy
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [lab_root, os.environ.get("PYTHONPATH")])))
        # stderr to a file: a pipe nobody reads could fill up and stall the worker.
        self.errors = tempfile.TemporaryFile()
        self.process = subprocess.Popen([sys.executable, "-m", "nnsam_lab.benchmark.itk_worker"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errors, env=env)
        self.requests, self.replies = Pipe(self.process.stdin), Pipe(self.process.stdout)

    def interpolate(self, labels: np.ndarray) -> np.ndarray:
        try:
            self.requests.send(labels.astype(np.uint8, copy=False))
            result = self.replies.receive()
        except (BrokenPipeError, ValueError, OSError):
            result = None
        if result is None or result.shape != labels.shape:
            raise NNSAMError(f"fill-between's ITK process failed ({self._last_error()}); pip install "
                             "itk-morphologicalcontourinterpolation if it is missing")
        return result

    def _last_error(self) -> str:
        self.process.kill()
        self.process.wait()
        self.errors.seek(0)
        lines = [line.strip() for line in self.errors.read().decode(errors="replace").splitlines() if line.strip()]
        return lines[-1][:200] if lines else f"exit status {self.process.wait()}"

    def close(self) -> int:
        """End the worker; its exit status (0: it ended cleanly)."""
        if self.process.stdin and not self.process.stdin.closed:
            self.process.stdin.close()
        code = self.process.wait(timeout=60)
        self.process.stdout.close()
        self.errors.close()
        return code


_worker: Optional[_Worker] = None


def interpolate_with_itk(labels: np.ndarray) -> np.ndarray:
    """ITK's morphological contour interpolation of a (z, y, x) label array along z, every label on its own, in
    the worker process."""
    global _worker
    if _worker is None or _worker.process.poll() is not None:
        _worker = _Worker()
        atexit.register(_worker.close)
    return _worker.interpolate(np.asarray(labels))


def close_itk() -> Optional[int]:
    """Stop the ITK worker if one runs; its exit status."""
    global _worker
    if _worker is None:
        return None
    worker, _worker = _worker, None
    atexit.unregister(worker.close)
    return worker.close()


def load_itk() -> None:
    """Start the worker and load ITK's filter in it (its modules load lazily, seconds on the first call), so a
    run's time is the interpolation's, as in a Slicer session where the effect has been used before."""
    if _worker is None or _worker.process.poll() is not None:
        interpolate_with_itk(np.zeros((3, 4, 4), np.uint8))


def fill_between(labels: np.ndarray, painted: Sequence[int], positions: Optional[Sequence[int]] = None
                 ) -> np.ndarray:
    """The volume a clinician gets from painting ``painted`` slices of ``labels`` and filling between them.

    ``labels``: (n, y, x) label stack, of which only the slices ``painted`` (indices into the stack) are read.
    ``positions``: the real slice index of each stack slice, increasing (None: 0..n-1, a regular volume); the
    painted slices are interpolated at these positions and the result read back at every stack slice, so a slice
    that lies between painted ones gets the interpolation at its real distance from them.
    """
    labels = np.asarray(labels)
    n = labels.shape[0]
    positions = list(range(n)) if positions is None else [int(p) for p in positions]
    if len(positions) != n or any(b <= a for a, b in zip(positions, positions[1:])):
        raise ValueError("positions must give one strictly increasing slice index per stack slice")
    painted = sorted({int(k) for k in painted})
    if not painted or painted[0] < 0 or painted[-1] >= n:
        raise ValueError(f"painted slices {painted} must be indices into a stack of {n} slices")
    if labels.max(initial=0) > 255:
        raise NNSAMError("fill-between handles at most 255 classes")
    out = np.zeros(labels.shape, np.uint8)
    first, last = positions[painted[0]], positions[painted[-1]]
    # Only the span between the first and last painted slice can receive anything, so only it is interpolated.
    grid = np.zeros((last - first + 1, *labels.shape[1:]), np.uint8)
    for k in painted:
        grid[positions[k] - first] = labels[k]
    if len(painted) > 1:
        grid = interpolate_with_itk(grid)
    for k, position in enumerate(positions):
        if first <= position <= last:
            out[k] = grid[position - first]
    for k in painted:
        out[k] = labels[k]  # the painting as it was
    return out
