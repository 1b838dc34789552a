"""``nnsam benchmark`` with the cache's views made by nnU-Net's whole training augmentation (an experiment).

With ``--embedding-views V`` the engine embeds V copies of each training slice rotated and scaled at random. Here
each of the V copies is instead one draw of nnU-Net's own training pipeline, as the trainer builds it for its
patches (the data loader's zero padding to the initial patch size, then spatial transform with its rotation and
scaling probabilities, intensity augmentations, mirroring), so the views follow the distribution of what
recomputing passes through the encoder, jointly. The grid channels travel through the pipeline with the image,
so each view's map from slice positions to its own is fitted from them (least squares; nnU-Net's rotation,
scaling and mirroring are linear about the patch centre). Everything else is the engine's.

    python pipeline_views.py BENCHMARK ARGUMENTS ... --embedding-views V     # as `nnsam benchmark`
"""

import sys

import torch

from nnsam_core import cli
from nnsam_core.network import EmbeddingBank, grid_channels
from nnsam_core.training import nnUNetTrainerNNSAM

engine_warm = nnUNetTrainerNNSAM._warm_embedding_variants


def pipeline_views(trainer, bank: EmbeddingBank, keys, count: int) -> None:
    rotation, dummy_2d, initial_patch_size, mirror_axes = \
        trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    pipeline = trainer.get_training_transforms(
        trainer.configuration_manager.patch_size, rotation, trainer._get_deep_supervision_scales(), mirror_axes,
        dummy_2d, use_mask_for_norm=trainer.configuration_manager.use_mask_for_norm, is_cascaded=False,
        foreground_labels=trainer.label_manager.foreground_labels, regions=None, ignore_label=None)
    for key in dict.fromkeys(int(k) for k in keys):
        clean = bank._load_slice(key)
        height, width = clean.shape
        grid = torch.from_numpy(grid_channels((1, height, width), [key])[:, 0])
        # the data loader's patch: the slice centred in the initial patch size, zero padded
        big = [int(s) for s in initial_patch_size]
        top, left = (big[0] - height) // 2, (big[1] - width) // 2
        padded = torch.zeros((1 + 3, *big))
        padded[0, top:top + height, left:left + width] = clean
        padded[1:, top:top + height, left:left + width] = grid
        copies, maps = [], []
        for _ in range(count):
            out = pipeline(image=padded.clone(), segmentation=torch.zeros((1, *big), dtype=torch.int16))["image"]
            image, rows, cols, slice_key = out[0], out[1], out[2], out[3]
            inside = slice_key > 0.5 * key
            h, w = image.shape
            view_y = (2 * (torch.arange(h, dtype=torch.float32) + 0.5) / h - 1)[:, None].expand(h, w)[inside]
            view_x = (2 * (torch.arange(w, dtype=torch.float32) + 0.5) / w - 1)[None, :].expand(h, w)[inside]
            slice_xy = torch.stack([2 * (cols[inside] - 1) - 1, 2 * (rows[inside] - 1) - 1,
                                    torch.ones_like(view_x)], 1)
            solution = torch.linalg.lstsq(slice_xy.double(), torch.stack([view_x, view_y], 1).double()).solution
            position_map, shift = solution[:2].T.float(), solution[2].float()
            assert float(shift.abs().max()) < 0.05, f"view of slice {key} is not centred: shift {shift.tolist()}"
            copies.append(image[None].float())
            maps.append(position_map)
        bank._add_variants(key, copies, torch.stack(maps))


def warm(self, bank, keys, variants, views=0):
    engine_warm(self, bank, keys, variants, 0)
    if views:
        pipeline_views(self, bank, keys, views)


if __name__ == "__main__":
    nnUNetTrainerNNSAM._warm_embedding_variants = warm
    sys.exit(cli.main(["benchmark", *sys.argv[1:]]))
