"""The fused nnSAM network: nnU-Net's PlainConvUNet plus a frozen SAM embedding concatenated at one skip.

How the SAM embedding finds its way to a patch
------------------------------------------------
The encoder is frozen and deterministic, so each slice's embedding is computed once, from the whole
(nnU-Net-preprocessed) slice, and kept in an :class:`EmbeddingBank`. Patches tell the network where they come
from through three *grid channels* appended to the image channels:

- ``row`` and ``col``: the pixel's position in its whole slice, ``1 + (index + 0.5) / size``, so inside (1, 2);
- ``key``: an integer >= 1 naming the slice in the bank.

All three are 0 outside the slice (nnU-Net pads with 0). Because they are ordinary image channels, nnU-Net's
cropping, padding, rotation, scaling, sliding-window tiling and test-time mirroring move them exactly as they
move the image; the network samples the slice's embedding at those positions (``grid_sample``) at the
resolution of the injection skip. So augmentation stays honest without recomputing SAM, and at inference one
encoder call per slice serves every tile and mirror. The trainer keeps nnU-Net's intensity augmentations off
the grid channels.

The cache samples the embedding of the *clean* slice, so nnU-Net's intensity augmentations never reach the SAM
features (recomputing the embedding of every augmented patch, the authors' way, lets them). With
``embedding_variants = K`` the bank also holds K embeddings of intensity-augmented copies of each training slice,
made once before training with nnU-Net's own intensity transforms, and training draws one of the K + 1 per patch.

SAM is not mirror-equivariant: the embedding of a mirrored slice differs from the mirrored embedding (by 74-96 %
relative L2 on a CHD slice at 512 px, docs/benchmarks/chd_mirror_ds4_q1000), and nnU-Net mirrors three patches
in four. With ``mirror_embeddings`` the bank also holds the embeddings of each training slice's three mirror
images, and in training a patch whose grid runs backwards along an axis samples the embedding of the slice
mirrored along that axis, as recomputing would. Inference keeps one encoder call per slice (test-time mirroring
samples the mirrored embedding).

SAM is not rotation- or scale-equivariant either, and nnU-Net rotates and scales a patch in three cases out of
ten (the zero padding this brings in also reaches the encoder when recomputing). With ``embedding_views = V`` the
bank also holds the embeddings of V rotated and scaled copies of each training slice (random angles and scales in
nnU-Net's own ranges), each with the map from slice positions to its own; training draws among them as among the
intensity variants and samples the drawn copy's embedding where the patch's pixels lie in it (the clean slice's
embedding where the copy does not reach).

None of these fixed sets of extra embeddings closes the gap between the cache and recomputing at 192x192 (about
4 Dice points on CHD). With ``recompute_share = p`` a share p of the training steps, drawn at random, runs the
encoder on the augmented patches as recomputing does, and the rest sample the cache: fresh embeddings at that share
of recomputing's encoder cost. A tenth is the default; 0 is the cache alone, the fastest.

Every embedding the bank hands out comes with that map, a 2x2 matrix acting on normalised (x=column, y=row)
slice positions: identity for the clean slice and intensity variants, a sign flip for a mirror image.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from torch import nn

from .encoders import EMBEDDING_CHANNELS, FrozenEncoder, get_spec
from .methods import DEFAULT_RECOMPUTE_SHARE, LEGACY_RECOMPUTE_SHARE, MAX_EMBEDDING_VARIANTS

GRID_CHANNELS = 3
# Keys are stored in float32 image channels: exact for integers below 2**24.
SLICES_PER_CASE = 4096
MAX_KEY = 2 ** 24 - 1
INJECT_AUTO_STRIDE = 8  # the authors inject at the 1/8-resolution skip
EMBEDDING_MODES = ("cached", "recomputed")


@dataclass(frozen=True)
class NNSAMConfig:
    """What makes an nnSAM network different from plain nnU-Net; stored in every bundle."""

    encoder: str = "litemedsam"
    pretrained: bool = True          # False: the nnsam-random control (same encoder, random frozen weights)
    random_seed: int = 0             # seed of the random control's weights
    inject_stride: int = INJECT_AUTO_STRIDE  # inject at the skip with this in-plane downsampling factor
    embedding_norm: str = "standardise"  # "standardise": per-channel z-score with training-set statistics; "none"
    sam_input: Optional[str] = None  # methods.SAM_INPUTS; None: the encoder's own convention
    # "cached": each slice's embedding computed once, sampled through the grid channels (ours, the default);
    # "recomputed": in training the encoder runs on every augmented patch at every step, as the authors' code
    # does (the accuracy reference for the cache; inference is one embedding per slice either way).
    embeddings: str = "cached"
    # "cached" only: embeddings of this many intensity-augmented copies of each training slice, drawn from in
    # training beside the clean one (0: the clean embedding only). Inference always uses the clean slice.
    embedding_variants: int = 0
    # "cached" only: mirrored training patches sample the embedding of the mirrored slice (3 encoder calls more per
    # training slice, once); False: the mirrored embedding of the slice.
    mirror_embeddings: bool = False
    # "cached" only: embeddings of this many rotated and scaled copies of each training slice, drawn from in
    # training beside the clean one and the intensity variants (0: none).
    embedding_views: int = 0
    # "cached" only: the share of training steps (0 to 1, drawn per step) that run the encoder on the augmented
    # patches, as "recomputed" does at every step; the others sample the cache. Costs that share of recomputing's
    # encoder time; the default tenth is what closed the cache's accuracy gap (methods.DEFAULT_RECOMPUTE_SHARE).
    recompute_share: float = DEFAULT_RECOMPUTE_SHARE

    def __post_init__(self):
        if self.embeddings not in EMBEDDING_MODES:
            raise ValueError(f"unknown embeddings mode {self.embeddings!r}; one of {EMBEDDING_MODES}")
        for field in ("embedding_variants", "embedding_views"):
            if not 0 <= int(getattr(self, field)) <= MAX_EMBEDDING_VARIANTS:
                raise ValueError(f"{field} must be 0 to {MAX_EMBEDDING_VARIANTS}, not {getattr(self, field)}")
        if not 0.0 <= float(self.recompute_share) <= 1.0:
            raise ValueError(f"recompute_share must be 0 to 1, not {self.recompute_share}")
        if self.sam_input is None:
            object.__setattr__(self, "sam_input", get_spec(self.encoder).input_preparation)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "NNSAMConfig":
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        known.setdefault("sam_input", "nnunet")  # bundles written before the field existed fed the z-scored slice
        known.setdefault("recompute_share", LEGACY_RECOMPUTE_SHARE)  # and those before this one used the cache only
        return cls(**known)


# ------------------------------------------------------------------------------------------- grid channels
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


# ------------------------------------------------------------------------------------------- embedding bank
class EmbeddingBank:
    """Embeddings of whole slices by key, computed once by the frozen encoder and kept (float16) in memory.

    ``load_slices(keys)`` returns the nnU-Net-normalised slices (list of (H, W) arrays) for keys not yet held.
    """

    def __init__(self, encoder: FrozenEncoder, load_slices: Callable[[list[int]], list[np.ndarray]],
                 batch_size: int = 8, max_entries: int = 100_000):
        self.encoder = encoder
        self.load_slices = load_slices
        self.batch_size = batch_size
        self.max_entries = max_entries
        self._store: "OrderedDict[int, torch.Tensor]" = OrderedDict()
        self._variants: dict[int, torch.Tensor] = {}  # key -> (K, C, h, w) embeddings of augmented copies
        self._variant_maps: dict[int, torch.Tensor] = {}  # key -> (K, 2, 2) slice positions -> the copy's
        self._mirrored: dict[int, torch.Tensor] = {}  # key -> (3, C, h, w): rows, columns, both axes mirrored
        self.encoder_calls = 0  # slices passed through the encoder (for the speed benchmark)

    def __len__(self) -> int:
        return len(self._store)

    def keys(self) -> list[int]:
        return list(self._store)

    def warm(self, keys: Sequence[int]) -> None:
        """Compute missing embeddings in batches (slices of equal size batched together)."""
        missing = [k for k in dict.fromkeys(int(k) for k in keys) if k not in self._store]
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start:start + self.batch_size]
            slices = self.load_slices(chunk)
            by_shape: dict[tuple, list[int]] = {}
            for i, s in enumerate(slices):
                by_shape.setdefault(tuple(s.shape), []).append(i)
            for indices in by_shape.values():
                batch = torch.from_numpy(np.stack([np.asarray(slices[i], dtype=np.float32) for i in indices]))[:, None]
                embeddings = self.encode(batch).to("cpu", torch.float16)
                for i, emb in zip(indices, embeddings):
                    self._store[chunk[i]] = emb
            while len(self._store) > self.max_entries:
                self._store.popitem(last=False)

    def warm_variants(self, keys: Sequence[int], count: int,
                      augment: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Embed ``count`` copies of each slice, each passed through ``augment`` ((1, H, W) -> (1, H, W)), once."""
        for key in dict.fromkeys(int(k) for k in keys):
            if count < 1 or self.variant_count(key) > self.view_count(key):  # intensity variants already made
                continue
            clean = self._load_slice(key)[None]
            self._add_variants(key, [augment(clean.clone()) for _ in range(count)], torch.eye(2).expand(count, 2, 2))

    def warm_views(self, keys: Sequence[int], count: int, rotation: tuple[float, float],
                   scaling: tuple[float, float]) -> None:
        """Embed ``count`` rotated and scaled copies of each slice, once: angles (radians) and scale factors
        uniform in the given ranges, about the slice centre, zero outside the slice (as nnU-Net pads)."""
        for key in dict.fromkeys(int(k) for k in keys):
            if count < 1 or self.view_count(key):
                continue
            clean = self._load_slice(key)[None, None]
            height, width = clean.shape[-2:]
            angles = torch.empty(count).uniform_(*rotation)
            scales = torch.empty(count).uniform_(*scaling)
            # copy(p) = slice(A p) in normalised (x, y); a rotation in pixels is D^-1 R D in normalised coordinates
            pixels = torch.diag(torch.tensor([width / 2.0, height / 2.0]))
            cos, sin = torch.cos(angles), torch.sin(angles)
            rotations = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
            forward = scales[:, None, None] * torch.linalg.inv(pixels) @ rotations @ pixels
            sampling = F.affine_grid(torch.cat([forward, torch.zeros(count, 2, 1)], 2), [count, 1, height, width],
                                     align_corners=False)
            copies = F.grid_sample(clean.expand(count, -1, -1, -1), sampling, mode="bilinear", padding_mode="zeros",
                                   align_corners=False)
            self._add_variants(key, list(copies), torch.linalg.inv(forward))

    def _add_variants(self, key: int, copies: list[torch.Tensor], maps: torch.Tensor) -> None:
        embedded = [self.encode(torch.stack(copies[start:start + self.batch_size])).to("cpu", torch.float16)
                    for start in range(0, len(copies), self.batch_size)]
        if key in self._variants:
            embedded.insert(0, self._variants[key])
            maps = torch.cat([self._variant_maps[key], maps])
        self._variants[key] = torch.cat(embedded)
        self._variant_maps[key] = maps.float().clone()

    def warm_mirrored(self, keys: Sequence[int]) -> None:
        """Embed each slice mirrored along rows, along columns and along both, once."""
        for key in dict.fromkeys(int(k) for k in keys):
            if key in self._mirrored:
                continue
            clean = self._load_slice(key)
            mirrors = torch.stack([clean.flip(0), clean.flip(1), clean.flip(0, 1)])[:, None]
            self._mirrored[key] = self.encode(mirrors).to("cpu", torch.float16)

    def holds_mirrored(self, key: int) -> bool:
        return int(key) in self._mirrored

    def _load_slice(self, key: int) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.load_slices([key])[0], dtype=np.float32))

    def variant_count(self, key: int) -> int:
        """Embeddings held of augmented copies of the slice: intensity variants and geometric views."""
        variants = self._variants.get(int(key))
        return 0 if variants is None else variants.shape[0]

    def view_count(self, key: int) -> int:
        maps = self._variant_maps.get(int(key))
        return 0 if maps is None else int((~torch.isclose(maps, torch.eye(2)).flatten(1).all(1)).sum())

    def encode(self, slices: torch.Tensor) -> torch.Tensor:
        """Run the frozen encoder on (B, 1, H, W) slices now, counting the calls; nothing is stored."""
        self.encoder_calls += slices.shape[0]
        return self.encoder(slices)

    def get(self, keys: Sequence[int], device: torch.device, draw_variant: bool = False,
            mirrors: Optional[Sequence[tuple[bool, bool]]] = None) -> torch.Tensor:
        """Embeddings of ``keys`` (0: padding, zeros); see :meth:`get_mapped` (this drops the maps)."""
        return self.get_mapped(keys, device, draw_variant, mirrors)[0]

    def get_mapped(self, keys: Sequence[int], device: torch.device, draw_variant: bool = False,
                   mirrors: Optional[Sequence[tuple[bool, bool]]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of ``keys`` (0: padding, zeros) on ``device`` and, per key, the (2, 2) map from normalised
        (x, y) slice positions to the embedding's (on the CPU). ``draw_variant``: for slices with augmented
        copies, one of the clean embedding and the copies', drawn uniformly per key. ``mirrors``: per key,
        (rows, columns) mirrored: the embedding of the slice mirrored so instead (it must be held; no variant is
        drawn then)."""
        keys = [int(k) for k in keys]
        self.warm([k for k in keys if k > 0])
        out, maps = [], []
        for i, k in enumerate(keys):
            mirror = (2 * mirrors[i][1] + mirrors[i][0]) if mirrors is not None else 0  # 1 rows, 2 columns, 3 both
            position_map = torch.eye(2)
            if k > 0 and mirror:
                out.append(self._mirrored[k][mirror - 1])
                position_map = torch.diag(torch.tensor([-1.0 if mirror & 2 else 1.0, -1.0 if mirror & 1 else 1.0]))
            elif k > 0:
                self._store.move_to_end(k)
                choice = int(torch.randint(0, self.variant_count(k) + 1, ()).item()) if draw_variant else 0
                out.append(self._store[k] if choice == 0 else self._variants[k][choice - 1])
                if choice:
                    position_map = self._variant_maps[k][choice - 1]
            else:
                out.append(torch.zeros_like(next(iter(self._store.values()))) if self._store else
                           torch.zeros((EMBEDDING_CHANNELS, 64, 64), dtype=torch.float16))
            maps.append(position_map)
        return torch.stack(out).to(device=device, dtype=torch.float32, non_blocking=True), torch.stack(maps)

    def drop(self, keys: Sequence[int]) -> None:
        for k in keys:
            self._store.pop(int(k), None)
            self._variants.pop(int(k), None)
            self._variant_maps.pop(int(k), None)
            self._mirrored.pop(int(k), None)

    def channel_statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std over every held embedding (for ``embedding_norm='standardise'``)."""
        stacked = torch.stack(list(self._store.values())).float()  # (N, C, h, w)
        mean = stacked.mean(dim=(0, 2, 3))
        std = stacked.std(dim=(0, 2, 3)).clamp_min(1e-6)
        return mean, std


# ------------------------------------------------------------------------------------------- network
class FusedUNetDecoder(UNetDecoder):
    """nnU-Net's UNetDecoder whose stage that consumes skip ``inject_skip`` also takes the SAM features."""

    def __init__(self, encoder, num_classes, n_conv_per_stage, deep_supervision, inject_skip: int,
                 extra_channels: int = EMBEDDING_CHANNELS, nonlin_first: bool = False):
        super().__init__(encoder, num_classes, n_conv_per_stage, deep_supervision, nonlin_first=nonlin_first)
        n_stages = len(encoder.output_channels)
        self.inject_skip = inject_skip
        self.inject_decoder_stage = n_stages - 2 - inject_skip  # decoder stage s consumes skips[-(s + 2)]
        s = self.inject_decoder_stage
        skip_channels = encoder.output_channels[inject_skip]
        self.stages[s] = StackedConvBlocks(
            len(self.stages[s].convs), encoder.conv_op, 2 * skip_channels + extra_channels, skip_channels,
            encoder.kernel_sizes[inject_skip], 1, encoder.conv_bias, encoder.norm_op, encoder.norm_op_kwargs,
            encoder.dropout_op, encoder.dropout_op_kwargs, encoder.nonlin, encoder.nonlin_kwargs, nonlin_first)

    def forward(self, skips, sam_features: torch.Tensor):
        lres_input = skips[-1]
        seg_outputs = []
        for s in range(len(self.stages)):
            x = self.transpconvs[s](lres_input)
            parts = [x, skips[-(s + 2)]]
            if s == self.inject_decoder_stage:
                parts.append(sam_features.to(x.dtype))
            x = self.stages[s](torch.cat(parts, 1))
            if self.deep_supervision:
                seg_outputs.append(self.seg_layers[s](x))
            elif s == len(self.stages) - 1:
                seg_outputs.append(self.seg_layers[-1](x))
            lres_input = x
        seg_outputs = seg_outputs[::-1]
        return seg_outputs if self.deep_supervision else seg_outputs[0]


def choose_inject_skip(strides: Sequence, target_stride: int) -> int:
    """Index of the encoder skip whose in-plane downsampling first reaches ``target_stride`` (never the
    bottleneck, which is no skip)."""
    cumulative = np.ones(len(np.atleast_1d(strides[0])), dtype=int)
    last_skip = len(strides) - 2
    for k, stride in enumerate(strides):
        cumulative = cumulative * np.atleast_1d(stride)
        if int(cumulative.min()) >= target_stride:
            return min(k, last_skip)
    return last_skip


class NNSAMNet(nn.Module):
    """PlainConvUNet encoder + fused decoder. Input: image channels followed by the 3 grid channels.

    ``sam_bank`` (an :class:`EmbeddingBank`) is attached by the trainer or predictor and, like the frozen
    encoder it holds, is not a submodule: it is never saved, optimised or switched to train mode.
    """

    def __init__(self, unet: nn.Module, config: NNSAMConfig, inject_skip: int, deep_supervision: bool):
        super().__init__()
        encoder = unet.encoder
        self.config_dict = config.as_dict()
        self.encoder = encoder
        n_conv_decoder = [len(stage.convs) for stage in unet.decoder.stages]
        self.decoder = FusedUNetDecoder(encoder, unet.decoder.num_classes, n_conv_decoder, deep_supervision,
                                        inject_skip)
        self.inject_skip = inject_skip
        # Training-set statistics of the embedding; saved in checkpoints (tiny, and not encoder weights).
        self.register_buffer("embedding_mean", torch.zeros(EMBEDDING_CHANNELS))
        self.register_buffer("embedding_std", torch.ones(EMBEDDING_CHANNELS))
        object.__setattr__(self, "sam_bank", None)
        # Set by the trainer for the steps a recompute_share sends down the recomputed path.
        self.recompute_this_step = False

    def attach_bank(self, bank: Optional[EmbeddingBank]) -> None:
        object.__setattr__(self, "sam_bank", bank)

    def set_embedding_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.embedding_mean.copy_(mean)
        self.embedding_std.copy_(std)

    @staticmethod
    def _slice_coverage(grid: torch.Tensor, size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """At resolution ``size``: where the patch lies inside its slice (bool mask) and the slice position
        (row, col grid values) of each pooled pixel."""
        key_map = grid[:, 2:3]
        per_sample_key = key_map.flatten(1).amax(dim=1).clamp_min(1.0)[:, None, None, None]
        weight = (key_map / per_sample_key).clamp(0, 1)  # 1 inside the slice, 0 in padding, between at edges
        pooled_w = F.interpolate(weight, size=tuple(size), mode="area")
        pooled_rc = F.interpolate(grid[:, :2] * weight, size=tuple(size), mode="area")
        return pooled_w > 1e-3, pooled_rc / pooled_w.clamp_min(1e-3)

    @staticmethod
    def _patch_mirrors(inside: torch.Tensor, rc: torch.Tensor) -> list[tuple[bool, bool]]:
        """Per patch, whether its slice rows run backwards down the patch and its slice columns backwards
        across it (mirrored; a patch turned by 180 degrees is mirrored along both, the same image)."""
        both_rows = inside[:, 0, 1:, :] & inside[:, 0, :-1, :]
        both_cols = inside[:, 0, :, 1:] & inside[:, 0, :, :-1]
        rows_down = ((rc[:, 0, 1:, :] - rc[:, 0, :-1, :]) * both_rows).sum(dim=(1, 2))
        cols_across = ((rc[:, 1, :, 1:] - rc[:, 1, :, :-1]) * both_cols).sum(dim=(1, 2))
        return [(bool(r < 0), bool(c < 0)) for r, c in zip(rows_down.tolist(), cols_across.tolist())]

    def _standardise(self, features: torch.Tensor) -> torch.Tensor:
        if self.config_dict.get("embedding_norm", "none") == "standardise":
            return (features - self.embedding_mean[None, :, None, None]) / self.embedding_std[None, :, None, None]
        return features

    def sam_features(self, grid: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Sample each patch's slice embedding at the patch's pixel positions, at resolution ``size``."""
        if self.sam_bank is None:
            raise RuntimeError("no embedding bank attached to the nnSAM network")
        grid = grid.float()
        keys = torch.round(grid[:, 2].flatten(1).amax(dim=1)).long().tolist()
        inside, rc = self._slice_coverage(grid, size)
        mirrors = None
        if self.training and self.config_dict.get("mirror_embeddings", False):
            # only slices whose mirror images were embedded (every training slice); others as the plain cache
            mirrors = [pair if self.sam_bank.holds_mirrored(k) else (False, False)
                       for k, pair in zip(keys, self._patch_mirrors(inside, rc))]
        embeddings, maps = self.sam_bank.get_mapped(keys, grid.device, draw_variant=self.training, mirrors=mirrors)
        positions = (2.0 * (rc - 1.0) - 1.0).flip(1)  # normalised (x=col, y=row), as grid_sample wants
        outside = torch.full_like(positions, -2.0)  # grid_sample reads zeros there
        # The maps are on the CPU: telling identities and mirrors (which reach every pixel) from views costs no
        # device synchronisation, so inference and the plain cache pay nothing for views.
        signed_axes = bool((maps.abs() == torch.eye(2)).all())
        if signed_axes and bool((maps == torch.eye(2)).all()):
            return self._standardise(self._sample(embeddings, torch.where(inside, positions, outside))) * inside
        mapped = torch.einsum("bij,bjhw->bihw", maps.to(positions), positions)  # the pixels in the drawn embedding
        sampled = self._sample(embeddings, torch.where(inside, mapped, outside))
        if not signed_axes:  # where a turned or scaled view does not reach, the clean slice's embedding
            missed = inside & (mapped.abs() > 1.0).any(dim=1, keepdim=True)
            clean = self._sample(self.sam_bank.get(keys, grid.device), torch.where(inside, positions, outside))
            sampled = torch.where(missed, clean, sampled)
        return self._standardise(sampled) * inside

    @staticmethod
    def _sample(embeddings: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return F.grid_sample(embeddings, positions.permute(0, 2, 3, 1), mode="bilinear", padding_mode="zeros",
                             align_corners=False)

    def recomputed_sam_features(self, image: torch.Tensor, grid: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """The authors' way (``embeddings='recomputed'``): run the frozen encoder on the augmented patches
        themselves, now, and resize the embedding to resolution ``size``."""
        if self.sam_bank is None:
            raise RuntimeError("no embedding bank attached to the nnSAM network")
        embeddings = self.sam_bank.encode(image[:, :1]).to(image.device)
        inside, _ = self._slice_coverage(grid.float(), size)
        features = F.interpolate(embeddings, size=tuple(size), mode="bilinear", align_corners=False)
        return self._standardise(features) * inside

    def forward(self, x: torch.Tensor):
        image, grid = x[:, :-GRID_CHANNELS], x[:, -GRID_CHANNELS:]
        skips = self.encoder(image)
        size = skips[self.inject_skip].shape[2:]
        recompute = self.config_dict.get("embeddings", "cached") == "recomputed" or self.recompute_this_step
        if self.training and recompute:
            sam = self.recomputed_sam_features(image, grid, size)
        else:
            sam = self.sam_features(grid, size)
        return self.decoder(skips, sam)


def build_nnsam_network(plans_manager, configuration_manager, num_input_channels: int, num_output_channels: int,
                        enable_deep_supervision: bool, config: NNSAMConfig) -> NNSAMNet:
    """nnU-Net's planned PlainConvUNet, fused with a SAM branch as ``config`` says."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    unet = get_network_from_plans(configuration_manager.network_arch_class_name,
                                  configuration_manager.network_arch_init_kwargs,
                                  configuration_manager.network_arch_init_kwargs_req_import,
                                  num_input_channels, num_output_channels, allow_init=True,
                                  deep_supervision=enable_deep_supervision)
    if not hasattr(unet, "encoder") or not hasattr(unet.encoder, "strides"):
        raise ValueError(f"nnSAM needs a U-Net with an encoder; plans use {configuration_manager.network_arch_class_name}")
    inject_skip = choose_inject_skip(unet.encoder.strides, config.inject_stride)
    network = NNSAMNet(unet, config, inject_skip, enable_deep_supervision)
    if hasattr(unet, "initialize"):
        network.decoder.stages[network.decoder.inject_decoder_stage].apply(unet.initialize)
    return network
