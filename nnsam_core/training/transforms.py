"""Keeps nnU-Net's intensity augmentations off the grid channels, while its spatial ones and mirroring move them
with the image."""

from __future__ import annotations

import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms

from ..model.grid import GRID_CHANNELS


class StashGridChannels(BasicTransform):
    """Moves the grid channels out of 'image' so intensity augmentations cannot touch them."""

    def apply(self, data_dict, **params):
        image = data_dict["image"]
        data_dict["image"], data_dict["nnsam_grid"] = image[:-GRID_CHANNELS], image[-GRID_CHANNELS:]
        return data_dict


class RestoreGridChannels(BasicTransform):
    """Puts the grid channels back (before mirroring, which must move them with the image)."""

    def apply(self, data_dict, **params):
        grid = data_dict.pop("nnsam_grid")
        data_dict["image"] = torch.cat([data_dict["image"], grid.to(data_dict["image"].dtype)])
        return data_dict


def protect_grid_channels(transforms: ComposeTransforms) -> ComposeTransforms:
    steps = list(transforms.transforms)
    spatial = next(i for i, t in enumerate(steps) if isinstance(t, SpatialTransform))
    steps.insert(spatial + 1, StashGridChannels())
    mirror = next((i for i, t in enumerate(steps) if isinstance(t, MirrorTransform)), len(steps))
    steps.insert(mirror, RestoreGridChannels())
    return ComposeTransforms(steps)
