"""nnU-Net's datasets with the grid channels (row, col, slice key) appended to every case they load."""

from __future__ import annotations

import numpy as np
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2, nnUNetDatasetNumpy, infer_dataset_class

from ..model.grid import grid_channels, slice_key


class _GridChannelsMixin:
    """Case indices come from the sorted identifiers of the whole preprocessed folder, so training, validation
    and the embedding bank agree."""

    def __init__(self, folder, identifiers=None, folder_with_segs_from_previous_stage=None):
        super().__init__(folder, identifiers, folder_with_segs_from_previous_stage)
        self.case_index = {k: i for i, k in enumerate(sorted(self.get_identifiers(folder)))}

    def load_case(self, identifier):
        data, seg, seg_prev, properties = super().load_case(identifier)
        data = np.asarray(data[:], dtype=np.float32)
        case = self.case_index[identifier]
        keys = [slice_key(case, z) for z in range(data.shape[1])]
        return np.concatenate([data, grid_channels(data.shape[1:], keys)]), seg, seg_prev, properties

    def num_slices(self, identifier: str) -> int:
        return super().load_case(identifier)[0].shape[1]

    def load_image_slices(self, identifier: str, zs) -> list[np.ndarray]:
        """First image channel of the given slices, without grid channels (what SAM sees)."""
        data = super().load_case(identifier)[0]
        return [np.asarray(data[0, z], dtype=np.float32) for z in zs]


class NNSAMDatasetBlosc2(_GridChannelsMixin, nnUNetDatasetBlosc2):
    pass


class NNSAMDatasetNumpy(_GridChannelsMixin, nnUNetDatasetNumpy):
    pass


def grid_dataset_class(folder: str):
    base = infer_dataset_class(folder)
    return NNSAMDatasetBlosc2 if issubclass(base, nnUNetDatasetBlosc2) else NNSAMDatasetNumpy
