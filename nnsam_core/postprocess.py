"""Whole-volume clean-up chosen from the painting: a structure the user painted as one piece on every painted
slice is one piece in 3D, so the blobs a 2D network leaves away from it are removed (nnU-Net's "largest
component" post-processing; nnU-Net chooses it per class by cross-validation, which a few painted slices cannot
give, so the painting itself decides)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

# A piece smaller than this share of the structure's painted area on its slice is a slip of the brush, not a
# second part of the structure.
SLIP_SHARE = 0.05


def single_piece_classes(labels: np.ndarray, painted: Sequence[int], values: Sequence[int]) -> list[int]:
    """Class values drawn as one connected piece on every painted slice (of labels shaped (Z, Y, X)) that holds
    them; a class absent from every painted slice is left alone."""
    from scipy import ndimage

    chosen = []
    for value in values:
        counts = []
        for z in painted:
            mask = labels[z] == value
            if not mask.any():
                continue
            pieces, n = ndimage.label(mask)
            sizes = np.bincount(pieces.ravel())[1:]
            counts.append(int((sizes >= SLIP_SHARE * sizes.sum()).sum()))
        if counts and all(c == 1 for c in counts):
            chosen.append(int(value))
    return chosen


def keep_largest_components(labels: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """``labels`` with every class in ``values`` reduced to its largest 3D connected component."""
    from nnunetv2.postprocessing.remove_connected_components import \
        remove_all_but_largest_component_from_segmentation

    for value in values:
        if (labels == value).any():
            labels = remove_all_but_largest_component_from_segmentation(labels, int(value))
    return labels
