"""How far nnU-Net's augmentations move LiteMedSAM's features of one slice: the embedding of the augmented slice
(what recomputing gives) against the clean embedding moved the same way (what the cache gives).

    python feature_gap.py IMAGE [DRAWS] [DOWNSAMPLE]

Prints, for DRAWS draws each of nnU-Net's mirroring alone, its rotation and scaling alone, and its intensity
augmentations alone, the relative L2 difference ||recomputed - cached|| / ||cached|| at the 1/8 skip."""

import math
import sys

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms

from nnsam_core.encoders import load_encoder
from nnsam_core.network import NNSAMNet, grid_channels
from nnsam_core.training import RestoreGridChannels, StashGridChannels, intensity_steps, nnUNetTrainerNNSAM


def main() -> None:
    torch.manual_seed(0)
    np.random.seed(0)
    image = sitk.GetArrayFromImage(sitk.ReadImage(sys.argv[1])).astype(np.float32).squeeze()
    draws = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    factor = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    if factor > 1:
        image = image.reshape(image.shape[0] // factor, factor, image.shape[1] // factor, factor).mean((1, 3))
    low, high = np.percentile(image, [0.5, 99.5])  # a CT-like normalisation is enough for a difference
    image = np.clip(image, low, high)
    image = ((image - image.mean()) / image.std()).astype(np.float32)
    h, w = image.shape
    size = (h // 8, w // 8)
    encoder = load_encoder("litemedsam", preparation="unit-range")
    pipeline = nnUNetTrainerNNSAM.get_training_transforms(
        (h, w), (-math.pi, math.pi), None, (0, 1), False, use_mask_for_norm=[False], is_cascaded=False,
        foreground_labels=[1], regions=None, ignore_label=None)
    steps = list(pipeline.transforms)
    stash = next(i for i, t in enumerate(steps) if isinstance(t, StashGridChannels))
    restore = next(i for i, t in enumerate(steps) if isinstance(t, RestoreGridChannels))
    geometric = {"mirroring": ComposeTransforms(steps[restore + 1:restore + 2]),
                 "rotation/scaling": ComposeTransforms(steps[:stash + 1] + steps[restore:restore + 1])}
    intensity = intensity_steps(pipeline)
    slice_ = torch.from_numpy(image)
    grid = torch.from_numpy(grid_channels((1, h, w), [1])[:, 0])

    def at_skip(embedding):
        return F.interpolate(embedding.float(), size=size, mode="bilinear", align_corners=False)

    with torch.no_grad():
        clean = encoder(slice_[None, None]).float()

        def cached(moved_grid):
            inside, rc = NNSAMNet._slice_coverage(moved_grid[None].float(), size)
            where = torch.where(inside, 2.0 * (rc - 1.0) - 1.0, torch.full_like(rc, -2.0)).flip(1).permute(0, 2, 3, 1)
            return F.grid_sample(clean, where, mode="bilinear", align_corners=False) * inside, inside.float()

        def gap(recomputed, reference, mask):
            return float(((recomputed - reference) ** 2 * mask).sum().sqrt() / ((reference ** 2) * mask).sum().sqrt())

        for name, transform in geometric.items():
            gaps = []
            for _ in range(draws):
                moved = transform(image=torch.cat([slice_[None], grid]), segmentation=torch.zeros((1, h, w)))["image"]
                reference, mask = cached(moved[1:])
                gaps.append(gap(at_skip(encoder(moved[None, :1])) * mask, reference, mask))
            print(f"{h}x{w} {name:17s} {np.round(sorted(gaps), 3).tolist()}")
        gaps = []
        for _ in range(draws):
            augmented = intensity(image=slice_[None].clone())["image"]
            reference = at_skip(clean)
            gaps.append(gap(at_skip(encoder(augmented[None])), reference, torch.ones_like(reference[:, :1])))
        print(f"{h}x{w} {'intensity':17s} {np.round(sorted(gaps), 3).tolist()}")


if __name__ == "__main__":
    main()
