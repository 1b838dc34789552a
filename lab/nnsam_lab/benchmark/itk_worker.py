"""A process of its own for ITK's morphological contour interpolation (fill between slices).

ITK's Python wrapping and SimpleITK loaded in one process corrupt the heap at interpreter exit (an abort after the
work is done), and the benchmark needs SimpleITK. So ITK lives in this worker, which imports numpy and ITK only:
the benchmark starts it once, sends label arrays and reads back the interpolated ones.

Protocol on the worker's stdin/stdout: one request is a ``numpy.save`` of a (z, y, x) uint8 array, answered by a
``numpy.save`` of the interpolated array; EOF on stdin ends the worker. Run as
``python -m nnsam_lab.benchmark.itk_worker``; this module must stay free of SimpleITK and the engine.
"""

from __future__ import annotations

import os
import sys

import numpy as np


def interpolate_with_itk(labels: np.ndarray) -> np.ndarray:
    """ITK's morphological contour interpolation of a (z, y, x) label array along z, every label on its own."""
    import itk

    array = np.ascontiguousarray(labels, dtype=np.uint8)
    # ITK orders axes x, y, z: axis 2 is numpy's axis 0, the slice axis.
    result = itk.morphological_contour_interpolator(itk.image_from_array(array), axis=2)
    return np.array(itk.array_from_image(result), dtype=np.uint8, copy=True)


class Pipe:
    """Arrays over a byte stream in numpy's .npy format, through read/write calls only (numpy's own file fast
    paths would bypass Python's buffering of a pipe)."""

    def __init__(self, stream):
        self.stream = stream
        self.pending = b""

    def read(self, n: int) -> bytes:
        data, self.pending = self.pending[:n], self.pending[n:]
        while len(data) < n:
            chunk = self.stream.read(n - len(data))
            if not chunk:
                break
            data += chunk
        return data

    def write(self, data) -> None:
        self.stream.write(data)

    def receive(self):
        """The next array, or None at the end of the stream."""
        self.pending = self.read(1)
        if not self.pending:
            return None
        return np.lib.format.read_array(self, allow_pickle=False)

    def send(self, array: np.ndarray) -> None:
        np.lib.format.write_array(self, np.ascontiguousarray(array), allow_pickle=False)
        self.stream.flush()


def serve() -> int:
    # The protocol owns the real stdout; anything a library prints goes to stderr instead.
    replies = Pipe(os.fdopen(os.dup(sys.stdout.fileno()), "wb"))
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    requests = Pipe(sys.stdin.buffer)
    while True:
        labels = requests.receive()
        if labels is None:  # the benchmark is done with us
            return 0
        replies.send(interpolate_with_itk(labels))


if __name__ == "__main__":
    code = serve()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip ITK's teardown at interpreter exit: nothing is left to clean up
