"""Which in-plane resolution nnU-Net trains at: capped for the quick preset on a CPU, native otherwise."""

from __future__ import annotations

import pytest
import torch

from nnsam_core.finetune import CPU_QUICK_MAX_SIZE, working_max_size

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("requested, preset, device, expected", [
    (None, "quick", CPU, CPU_QUICK_MAX_SIZE),   # the laptop default
    (None, "full", CPU, None),                  # the paper's schedule keeps nnU-Net's resolution
    (None, "quick", CUDA, None),                # a GPU is fast enough at full resolution
    (0, "quick", CPU, None),                    # the user asks for native resolution
    (256, "quick", CUDA, 256),                  # an explicit cap applies anywhere
])
def test_working_max_size(requested, preset, device, expected):
    assert working_max_size(requested, preset, device) == expected


class _Planner:
    """What capped_target_spacing reads of nnU-Net's ExperimentPlanner."""

    def __init__(self, spacing, shapes):
        self._spacing = spacing
        self.dataset_fingerprint = {"spacings": [spacing] * len(shapes), "shapes_after_crop": shapes}

    def determine_fullres_target_spacing(self):
        return self._spacing


def test_capped_target_spacing_coarsens_in_plane_only():
    from nnsam_core.workspace import capped_target_spacing

    planner = _Planner([5.0, 0.4, 0.5], [[1, 512, 400]] * 3)
    assert capped_target_spacing(planner, 512) is None
    capped = capped_target_spacing(planner, 128)
    assert capped == pytest.approx([5.0, 1.6, 2.0])   # longer side 512 -> 128: factor 4 on both axes
