"""How long a fine-tune plus the segmentation of the scan will take on this machine's device, told before it starts.

A cost model: the job's counts (training steps, encoder calls, segmented slices) times per-phase costs that a
short probe measures on this device once (``estimate_probe.py``) and keeps in a cache (``estimate_cache.py``).
Only the image's header is read. Not counted: planning and preprocessing, writing the bundle, resampling the
result (docs/cli.md).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from .errors import NNSAMError
from .methods import DEFAULT_RECOMPUTE_SHARE, ENCODER_NAMES, USER_METHODS, check_recompute_share
from .presets import CPU_BATCH_SIZE, PRESETS, working_max_size

# nnU-Net's training epochs are nnUNetTrainerFewShot.iterations_per_epoch_cap iterations; a schedule is rounded up
# to whole epochs (a test checks the two agree).
EPOCH_ITERATIONS = 25
# The classes the panel offers (LV, RV, LA, RA, Myo) plus background: the network's output heads in the probe.
PROBE_CLASSES = 6


@dataclass(frozen=True)
class EstimateSettings:
    """What the fine-tune would be run with (the ``nnsam train`` options that change its time)."""

    method: str = "nnsam"
    encoder: str = ENCODER_NAMES[0]
    device: str = "auto"
    preset: str = "quick"
    iterations: Optional[int] = None           # None: the preset's
    max_size: Optional[int] = None             # None: as fine_tune decides (working_max_size); 0: native
    recompute_share: Optional[float] = None    # None: the engine's default (nnsam only)

    def check(self) -> None:
        if self.method not in USER_METHODS:
            raise NNSAMError(f"unknown method '{self.method}'; choose one of {', '.join(USER_METHODS)}")
        if self.encoder not in ENCODER_NAMES:
            raise NNSAMError(f"unknown encoder '{self.encoder}'; choose one of {', '.join(ENCODER_NAMES)}")
        if self.preset not in PRESETS:
            raise NNSAMError(f"unknown preset '{self.preset}'; choose quick or full")
        if self.iterations is not None and self.iterations < 1:
            raise NNSAMError("--iterations must be at least 1")
        if self.max_size is not None and (self.max_size < 0 or 0 < self.max_size < 32):
            raise NNSAMError("--max-size must be 0 (native resolution) or at least 32 pixels")
        if self.recompute_share is not None:
            check_recompute_share(self.recompute_share)
            if self.method == "nnunet" and self.recompute_share > 0:
                raise NNSAMError("--recompute-share applies to nnSAM's embeddings; method nnunet has none")


@dataclass(frozen=True)
class ImageGeometry:
    size: tuple[int, int, int]          # x, y, slices (ITK's order)
    spacing: tuple[float, float, float]


@dataclass(frozen=True)
class WorkingPlan:
    """nnU-Net's 2d plan as the estimate approximates it (see :func:`working_plan`)."""

    working_size: tuple[int, int]       # x, y: the slices as the network sees them
    patch_size: tuple[int, int]         # y, x, as nnU-Net writes it
    strides: tuple                      # per stage, (y, x)
    kernel_sizes: tuple                 # per stage, (y, x)
    batch_size: int


@dataclass(frozen=True)
class UnitCosts:
    """Seconds, measured by the probe on this device."""

    train_step_s: float      # one training step (on a CPU with nnU-Net's augmentation of the batch), embeddings cached
    encoder_call_s: float    # the frozen encoder on one slice (0 for nnunet)
    segment_slice_s: float   # the network on one slice: 4 mirrored passes, as nnU-Net's 2d predictor


@dataclass(frozen=True)
class Workload:
    """What the fine-tune and segmentation will do, in counts."""

    slices: int              # N, the scan's slices
    painted: int             # k
    iterations: int          # the training steps, whole epochs
    batch_size: int
    recompute_share: float   # share of steps that run the encoder on the batch (0 for nnunet)
    uses_encoder: bool

    @property
    def bank_slices(self) -> int:
        """Slices whose embedding the bank computes before training: the painted ones."""
        return self.painted if self.uses_encoder else 0


@dataclass(frozen=True)
class Phases:
    """Seconds per phase."""

    bank_fill_s: float
    training_network_s: float
    training_encoder_s: float
    segmentation_network_s: float
    segmentation_encoder_s: float

    @property
    def training_s(self) -> float:
        return self.bank_fill_s + self.training_network_s + self.training_encoder_s

    @property
    def segmentation_s(self) -> float:
        return self.segmentation_network_s + self.segmentation_encoder_s

    @property
    def total_s(self) -> float:
        return self.training_s + self.segmentation_s


def phases_of(work: Workload, costs: UnitCosts) -> Phases:
    """The cost model: each phase's count times its measured unit cost."""
    encoder = costs.encoder_call_s if work.uses_encoder else 0.0
    steps = work.iterations
    return Phases(
        bank_fill_s=work.bank_slices * encoder,
        training_network_s=steps * costs.train_step_s,
        training_encoder_s=steps * work.recompute_share * work.batch_size * encoder,
        segmentation_network_s=work.slices * costs.segment_slice_s,
        segmentation_encoder_s=work.slices * encoder,  # one call per slice serves every tile and mirror
    )


@dataclass(frozen=True)
class Estimate:
    device: str
    method: str
    encoder: Optional[str]               # None for nnunet
    image_size: tuple[int, int]          # x, y
    plan: WorkingPlan
    work: Workload
    costs: UnitCosts
    phases: Phases
    measured_now: bool                   # False: the unit costs came from the cache
    probe_s: Optional[float] = field(default=None)  # how long measuring took (when measured now)
    load_when_measured: Optional[float] = field(default=None)  # other programs' load per core then (see BUSY_LOAD)

    @property
    def measured_while_busy(self) -> bool:
        return self.load_when_measured is not None and self.load_when_measured > BUSY_LOAD

    @property
    def training_s(self) -> float:
        return self.phases.training_s

    @property
    def segmentation_s(self) -> float:
        return self.phases.segmentation_s

    @property
    def total_s(self) -> float:
        return self.phases.total_s

    def summary(self) -> str:
        x, y = self.image_size
        size = f"{x}x{y}"
        if tuple(self.plan.working_size) != tuple(self.image_size):
            size += " (trained at {}x{})".format(*self.plan.working_size)
        return (f"expected on {self.device}: {about(self.total_s)} (training {about(self.training_s, False)}, "
                f"segmentation {about(self.segmentation_s, False)}; {self.work.slices} slices at {size}, "
                f"{self.work.painted} painted)")

    def as_dict(self) -> dict:
        phases = asdict(self.phases)
        return {"device": self.device, "method": self.method, "encoder": self.encoder,
                "slices": self.work.slices, "painted": self.work.painted, "image_size": list(self.image_size),
                "working_size": list(self.plan.working_size), "patch_size": list(self.plan.patch_size),
                "batch_size": self.plan.batch_size, "iterations": self.work.iterations,
                "recompute_share": self.work.recompute_share,
                "phases_s": {k: round(v, 2) for k, v in phases.items()},
                "training_s": round(self.training_s, 1), "segmentation_s": round(self.segmentation_s, 1),
                "total_s": round(self.total_s, 1),
                "unit_costs_s": {k: round(v, 4) for k, v in asdict(self.costs).items()},
                "measured_now": self.measured_now,
                "probe_s": round(self.probe_s, 1) if self.probe_s is not None else None,
                "measured_while_busy": self.measured_while_busy,
                "summary": self.summary()}


def about(seconds: float, prefix: bool = True) -> str:
    """'about 40 s', 'about 14 min', 'about 2.5 h'."""
    if seconds < 60:
        text = f"{max(1, int(round(seconds)))} s"
    elif seconds < 90 * 60:
        text = f"{int(round(seconds / 60.0))} min"
    else:
        text = f"{seconds / 3600.0:.1f} h"
    return f"about {text}" if prefix else text


def trained_iterations(requested: int) -> int:
    """The steps nnUNetTrainerFewShot.set_schedule trains for ``requested``: whole epochs."""
    per_epoch = max(1, min(EPOCH_ITERATIONS, requested))
    return -(-requested // per_epoch) * per_epoch


def painted_count(painted: Union[int, Sequence[int]], slices: int) -> int:
    """How many slices are painted: a count, or the painted slice indices (checked against the image)."""
    if isinstance(painted, int):
        if not 1 <= painted <= slices:
            raise NNSAMError(f"--slices {painted}: give a number of painted slices from 1 to the image's {slices}")
        return painted
    from .images import parse_slices
    return len(parse_slices(",".join(str(k) for k in painted), slices))


def read_geometry(path: os.PathLike) -> ImageGeometry:
    """Size and spacing from the image's header only (a DICOM folder: its first file and the series' length)."""
    import SimpleITK as sitk

    from .images import MIN_SIDE

    path = Path(path)
    if not path.exists():
        raise NNSAMError(f"image {path} does not exist; check the path")
    try:
        if path.is_dir():
            series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise NNSAMError(f"image folder {path} holds no DICOM series; give an image file or a DICOM folder")
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series[0])
            reader = sitk.ImageFileReader()
            reader.SetFileName(files[0])
            reader.ReadImageInformation()
            size, spacing, components = (reader.GetSize()[0], reader.GetSize()[1], len(files)), reader.GetSpacing(), \
                reader.GetNumberOfComponents()
        else:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            size, spacing, components = reader.GetSize(), reader.GetSpacing(), reader.GetNumberOfComponents()
    except RuntimeError as exc:
        first = next((line.strip() for line in reversed(str(exc).splitlines()) if line.strip()), "unreadable")
        raise NNSAMError(f"image {path} could not be read as an image ({first[:160]}); give a NIfTI, NRRD, MHA or "
                         "DICOM file") from None
    if len(size) not in (2, 3) or components != 1:
        raise NNSAMError(f"image {path} is not a single-channel 2D or 3D image")
    if min(size[:2]) < MIN_SIDE:
        raise NNSAMError(f"image {path} is {size[0]}x{size[1]} pixels in-plane; slices must be at least {MIN_SIDE} "
                         "pixels a side")
    size3 = (int(size[0]), int(size[1]), int(size[2]) if len(size) == 3 else 1)
    spacing3 = (float(spacing[0]), float(spacing[1]), float(spacing[2]) if len(spacing) == 3 else 1.0)
    return ImageGeometry(size3, spacing3)


def working_plan(geometry: ImageGeometry, painted: int, device_type: str, max_size: Optional[int]) -> WorkingPlan:
    """nnU-Net's 2d plan, approximated without planning: the slices scaled down so the longer side is at most
    ``max_size`` (as workspace.capped_target_spacing coarsens the spacing), and nnU-Net's own network topology
    rule for that size and spacing (patch = the working size rounded up to what the pooling needs, e.g. 128 -> 128,
    100 -> 112). Not modelled: nnU-Net's crop to the non-zero region and its memory-driven patch shrinking (which
    only large slices on a GPU meet, then segmented in several tiles). Batch: CPU_BATCH_SIZE on a CPU; on a GPU
    nnU-Net's planner caps it so a batch covers at most 5 % of the training pixels, which with k one-slice cases is
    max(2, round(0.05 k x slice area / patch area)), and never above the 12 it plans for 512x512 slices."""
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    x, y = geometry.size[:2]
    scale = min(1.0, max_size / max(x, y)) if max_size else 1.0
    working = (max(1, int(round(x * scale))), max(1, int(round(y * scale))))
    spacing_yx = [geometry.spacing[1] / scale, geometry.spacing[0] / scale]
    _, strides, kernels, patch, _ = get_pool_and_conv_props(spacing_yx, [working[1], working[0]], 4, 999999)
    patch = (int(patch[0]), int(patch[1]))
    if device_type == "cpu":
        batch = CPU_BATCH_SIZE
    else:
        batch = max(2, min(12, round(0.05 * painted * working[0] * working[1] / (patch[0] * patch[1]))))
    return WorkingPlan(working, patch, tuple(tuple(int(v) for v in s) for s in strides),
                       tuple(tuple(int(v) for v in k) for k in kernels), batch)


def encoder_precision(device_type: str) -> str:
    """How the frozen encoder computes on this device (encoders.FrozenEncoder): bfloat16 autocast on a GPU, the
    CPU's resolved precision elsewhere."""
    if device_type == "cuda":
        return "bfloat16"
    from .encoders import resolve_cpu_precision
    return resolve_cpu_precision()


Probe = Callable[..., UnitCosts]  # takes an estimate_probe.ProbeSpec

# Other programs keeping the cores busy slow the probe far beyond their share (on a 2-core CPU busy with another
# training, a training step measured several times its quiet time): a measurement made above this load per core
# is flagged and made again once the computer is quieter.
BUSY_LOAD = 0.5


def machine_load() -> Optional[float]:
    """The last minute's load average per core (None where the system has none, e.g. Windows)."""
    try:
        return os.getloadavg()[0] / max(1, os.cpu_count() or 1)
    except (AttributeError, OSError):
        return None


def estimate(image: os.PathLike, painted: Union[int, Sequence[int]], settings: EstimateSettings = EstimateSettings(),
             probe: Optional[Probe] = None, cache_dir: Optional[os.PathLike] = None,
             on_measure: Callable[[], None] = lambda: None, remeasure: bool = False) -> Estimate:
    """The expected time of fine-tuning on ``painted`` slices of ``image`` (a count, or the slice indices) and
    segmenting all of its slices.
    Unit costs come from the cache, else (or when ``remeasure``, or when they were measured while the computer was
    busy and it is quiet now) ``probe`` measures them (default: estimate_probe.measure_costs) and ``on_measure`` is
    called first (to say that this takes a moment)."""
    from .devices import resolve_device
    from .estimate_cache import CostCache, cache_key
    from .estimate_probe import ProbeSpec

    settings.check()
    geometry = read_geometry(image)
    slices = geometry.size[2]
    painted = painted_count(painted, slices)
    device = resolve_device(settings.device)
    plan = working_plan(geometry, painted, device.type, working_max_size(settings.max_size, settings.preset, device))
    uses_encoder = settings.method == "nnsam"
    share = (DEFAULT_RECOMPUTE_SHARE if settings.recompute_share is None else settings.recompute_share) \
        if uses_encoder else 0.0
    work = Workload(slices=slices, painted=painted,
                    iterations=trained_iterations(settings.iterations or PRESETS[settings.preset]),
                    batch_size=plan.batch_size, recompute_share=share, uses_encoder=uses_encoder)
    precision = encoder_precision(device.type) if uses_encoder else None
    spec = ProbeSpec(device=device, method=settings.method, encoder=settings.encoder if uses_encoder else None,
                     patch_size=plan.patch_size, strides=plan.strides, kernel_sizes=plan.kernel_sizes,
                     batch_size=plan.batch_size, classes=PROBE_CLASSES)
    cache = CostCache(cache_dir)
    key = cache_key(device.type, settings.method, spec.encoder, precision, plan.patch_size, plan.batch_size)
    stored, probe_s, load = (None if remeasure else cache.get(key)), None, machine_load()
    if stored is not None and stored.load is not None and stored.load > BUSY_LOAD and load is not None \
            and load <= BUSY_LOAD:
        stored = None  # measured while the computer was busy, and it is quiet now
    if stored is None:
        if probe is None:
            from .estimate_probe import measure_costs as probe
        on_measure()
        started = time.monotonic()
        costs = probe(spec)
        probe_s = time.monotonic() - started
        cache.put(key, costs, load)
    else:
        costs, load = stored.costs, stored.load
    return Estimate(device=device.type, method=settings.method, encoder=spec.encoder,
                    image_size=geometry.size[:2], plan=plan, work=work, costs=costs, phases=phases_of(work, costs),
                    measured_now=probe_s is not None, probe_s=probe_s, load_when_measured=load)
