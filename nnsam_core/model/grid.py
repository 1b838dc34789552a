"""Grid channels: how a patch tells the network where it comes from.

The encoder is frozen and deterministic, so each slice's embedding is computed once, from the whole
(nnU-Net-preprocessed) slice. Patches carry three *grid channels* after the image channels:

- ``row`` and ``col``: the pixel's position in its whole slice, ``1 + (index + 0.5) / size``, so inside (1, 2);
- ``key``: an integer >= 1 naming the slice in the embedding bank.

All three are 0 outside the slice (nnU-Net pads with 0). Being ordinary image channels, they move exactly as the
image under nnU-Net's cropping, padding, rotation, scaling, sliding-window tiling and test-time mirroring; the
network samples the slice's embedding at those positions. One encoder call per slice serves every tile and mirror.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

GRID_CHANNELS = 3
# Keys are stored in float32 image channels: exact for integers below 2**24.
SLICES_PER_CASE = 4096
MAX_KEY = 2 ** 24 - 1


def slice_key(case_index: int, z: int) -> int:
    key = 1 + case_index * SLICES_PER_CASE + z
    if z >= SLICES_PER_CASE or key > MAX_KEY:
        raise ValueError(f"slice key out of range (case {case_index}, slice {z})")
    return key


def split_key(key: int) -> tuple[int, int]:
    return divmod(int(key) - 1, SLICES_PER_CASE)


def grid_channels(spatial_shape: Sequence[int], keys_per_slice: Sequence[int]) -> np.ndarray:
    """(3, Z, Y, X) float32 grid channels for a case of ``spatial_shape`` (Z, Y, X)."""
    z, y, x = (int(s) for s in spatial_shape)
    rows = 1.0 + (np.arange(y, dtype=np.float32) + 0.5) / y
    cols = 1.0 + (np.arange(x, dtype=np.float32) + 0.5) / x
    grid = np.empty((GRID_CHANNELS, z, y, x), dtype=np.float32)
    grid[0] = rows[None, :, None]
    grid[1] = cols[None, None, :]
    grid[2] = np.asarray(keys_per_slice, dtype=np.float32)[:, None, None]
    return grid
