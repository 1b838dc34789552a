"""Segment every axial slice of a volume with a bundle.

nnU-Net does the work (preprocessing, sliding window with Gaussian weighting and mirroring, resampling back);
nnSAM adds one encoder call per slice: the volume is processed in slabs, each slab's slice embeddings are
computed in one batch and reused by every tile and mirrored pass (see :mod:`nnsam_core.model.grid`).
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
from pathlib import Path
from typing import Union

import numpy as np
import SimpleITK as sitk
import torch

from .bundle import Bundle
from .bundle_files import default_mode
from .devices import resolve_device
from .encoders import load_encoder
from .errors import NNSAMError
from .images import as_volume, check_image, read_image
from .model.bank import EmbeddingBank
from .model.grid import grid_channels
from .model.network import build_nnsam_network
from .postprocess import keep_largest_components
from .progress import ProgressCallback, make_event, silent
from .workspace import CONFIGURATION, nnunet_output_to_stderr

DEFAULT_SLAB = 16
CPU_ENCODER_BATCH = 4


class Segmenter:
    """A loaded bundle ready to segment volumes (the network and encoder are built once)."""

    def __init__(self, bundle: Bundle, device: Union[str, torch.device] = "auto", use_mirroring: bool = True):
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        self.bundle = bundle
        self.use_mirroring = use_mirroring  # test-time mirroring: 4 network passes per tile in 2D, for accuracy
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.plans_manager = PlansManager(bundle.plans)
        self.configuration_manager = self.plans_manager.get_configuration(CONFIGURATION)
        self.label_manager = self.plans_manager.get_label_manager(bundle.dataset_json)
        self.config = bundle.nnsam_config
        self.network = self._build_network()
        self.encoder = None
        self.encoder_calls = 0

    @property
    def uses_sam(self) -> bool:
        return self.config is not None

    def _build_network(self):
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

        n_out = self.label_manager.num_segmentation_heads
        if self.uses_sam:
            network = build_nnsam_network(self.plans_manager, self.configuration_manager, 1, n_out, False, self.config)
        else:
            cm = self.configuration_manager
            network = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                             cm.network_arch_init_kwargs_req_import, 1, n_out, allow_init=False,
                                             deep_supervision=False)
        try:
            network.load_state_dict(self.bundle.network_weights, strict=True)
        except RuntimeError as exc:
            raise NNSAMError(f"bundle weights do not fit the network its plans describe "
                             f"({str(exc).splitlines()[0][:120]}); the bundle is damaged") from None
        return network.eval()

    def _ensure_encoder(self, device: torch.device):
        if self.encoder is None:
            self.encoder = load_encoder(self.config.encoder, self.config.pretrained, self.config.random_seed,
                                        self.config.sam_input)
            expected = self.bundle.manifest["encoder"].get("weights_sha256")
            if self.config.pretrained and expected and expected != self.encoder.weights_sha256:
                raise NNSAMError(f"the bundle was trained with {self.config.encoder} weights {expected[:12]}..., "
                                 f"but the installed weights are {str(self.encoder.weights_sha256)[:12]}...; "
                                 "install the weights the bundle names")
        self.encoder.to(device)
        return self.encoder

    @property
    def largest_component_classes(self) -> list[int]:
        """Class values the bundle keeps to their largest 3D piece (chosen from the painting at training)."""
        return list((self.bundle.manifest.get("postprocessing") or {}).get("largest_component", []))

    def segment(self, image: sitk.Image, progress: ProgressCallback = silent) -> sitk.Image:
        check_image(image, "image")
        volume = as_volume(image)
        attempts = [(self.device, DEFAULT_SLAB)]
        if self.device.type == "cuda":
            attempts += [(self.device, 2), (torch.device("cpu"), DEFAULT_SLAB)]
        for i, (device, slab) in enumerate(attempts):
            try:
                labels = self._segment_volume(volume, device, slab, progress)
                break
            except torch.cuda.OutOfMemoryError:
                if i == len(attempts) - 1:
                    raise NNSAMError("out of memory while segmenting even on the CPU; close other programs or "
                                     "crop the volume") from None
                nxt = attempts[i + 1]
                progress(make_event("predict", message=f"out of GPU memory; retrying on {nxt[0].type} with "
                                                       f"{nxt[1]} slices at a time"))
                self.network.to("cpu")  # free what the failed attempt held on the GPU
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        if self.largest_component_classes and labels.shape[0] > 1:
            labels = keep_largest_components(labels, self.largest_component_classes)
        out = sitk.GetImageFromArray(labels)
        out.CopyInformation(volume)
        if image.GetDimension() == 2:
            out = out[:, :, 0]
        return out

    @property
    def trained_on_single_slices(self) -> bool:
        # fine_tune always trains on one-slice cases; a bundle from nnUNetv2_train may have seen whole volumes.
        return self.bundle.plans.get("original_median_shape_after_transp", [0])[0] == 1

    def preprocess(self, volume: sitk.Image) -> tuple[np.ndarray, dict]:
        """nnU-Net's preprocessing of the whole volume, with intensities normalised the way the training cases
        were: per slice when the model was trained on single slices and its scheme is per image (z-score for MR)."""
        data = sitk.GetArrayFromImage(volume).astype(np.float32)[None]  # (1, Z, Y, X)
        properties = {"spacing": list(volume.GetSpacing())[::-1]}
        preprocessor = _slice_wise_normalisation_class() if self.trained_on_single_slices else _default_preprocessor()
        with nnunet_output_to_stderr():
            data, _, properties = preprocessor(verbose=False).run_case_npy(
                data, None, properties, self.plans_manager, self.configuration_manager, self.bundle.dataset_json)
        return data, properties

    def _segment_volume(self, volume: sitk.Image, device: torch.device, slab: int, progress) -> np.ndarray:
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        data, properties = self.preprocess(volume)
        with nnunet_output_to_stderr():
            predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=self.use_mirroring,
                                        perform_everything_on_device=device.type == "cuda", device=device,
                                        verbose=False, allow_tqdm=False)
        mirror_axes = self.bundle.inference_allowed_mirroring_axes
        predictor.manual_initialization(self.network, self.plans_manager, self.configuration_manager, None,
                                        self.bundle.dataset_json, self.bundle.manifest["trainer"], mirror_axes)
        n_slices = data.shape[1]
        bank = None
        if self.uses_sam:
            encoder = self._ensure_encoder(device)
            # Small encoder batches on CPU: a 16-slice TinyViT batch holds gigabytes of activations.
            bank = EmbeddingBank(encoder, lambda keys: [data[0, k - 1] for k in keys],
                                 batch_size=slab if device.type == "cuda" else CPU_ENCODER_BATCH)
            self.network.attach_bank(bank)
        to_labels = _SlabToLabels(self.plans_manager, self.configuration_manager, self.label_manager, properties)
        started = time.monotonic()
        try:
            for z0 in range(0, n_slices, slab):
                z1 = min(n_slices, z0 + slab)
                chunk = data[:, z0:z1]
                if bank is not None:
                    keys = list(range(z0 + 1, z1 + 1))
                    bank.warm(keys)
                    chunk = np.concatenate([chunk, grid_channels(chunk.shape[1:], keys)])
                with torch.no_grad(), nnunet_output_to_stderr():
                    logits = predictor.predict_sliding_window_return_logits(torch.from_numpy(np.ascontiguousarray(chunk)))
                to_labels.add(z0, z1, logits.to("cpu", torch.float32))
                if bank is not None:
                    bank.drop(keys)  # memory stays bounded by one slab of embeddings
                elapsed = time.monotonic() - started
                progress(make_event("predict", z1, n_slices, eta_s=elapsed / z1 * (n_slices - z1),
                                    message=f"segmented {z1}/{n_slices} slices"))
        finally:
            if bank is not None:
                self.encoder_calls += bank.encoder_calls
                self.network.attach_bank(None)
        return to_labels.result()


# Normalisation schemes whose parameters come from the training set, not from the image at hand.
DATASET_WIDE_SCHEMES = {"CTNormalization", "NoNormalization"}


def _default_preprocessor():
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    return DefaultPreprocessor


@functools.lru_cache(maxsize=None)
def _slice_wise_normalisation_class():  # built lazily: importing nnunetv2 is slow
    class SliceWiseNormalisation(_default_preprocessor()):
        """nnU-Net's preprocessor, but per-image normalisation schemes see one slice at a time (the first spatial
        axis after nnU-Net's transpose is the one its 2d configuration slices along)."""

        def _normalize(self, data, seg, configuration_manager, foreground_intensity_properties_per_channel):
            parent = super()._normalize
            if set(configuration_manager.normalization_schemes) <= DATASET_WIDE_SCHEMES:
                return parent(data, seg, configuration_manager, foreground_intensity_properties_per_channel)
            for z in range(data.shape[1]):
                data[:, z:z + 1] = parent(data[:, z:z + 1], seg[:, z:z + 1], configuration_manager,
                                          foreground_intensity_properties_per_channel)
            return data
    return SliceWiseNormalisation


class _SlabToLabels:
    """nnU-Net's logits-to-segmentation export (resample to the cropped input grid, argmax, undo the crop and the
    transpose), applied slab by slab so that only labels (uint8), never whole-volume logits, are held.

    The 2d configuration never resamples along the slice axis, so a slab's labels depend on that slab alone.
    """

    def __init__(self, plans_manager, configuration_manager, label_manager, properties: dict):
        self.plans_manager, self.configuration_manager, self.label_manager = plans_manager, configuration_manager, \
            label_manager
        self.properties = properties
        spacing = [properties["spacing"][i] for i in plans_manager.transpose_forward]
        self.original_spacing = spacing
        self.current_spacing = [spacing[0], *configuration_manager.spacing]
        dtype = np.uint8 if len(label_manager.foreground_labels) < 255 else np.uint16
        self.labels = np.zeros(properties["shape_after_cropping_and_before_resampling"], dtype=dtype)

    def add(self, z0: int, z1: int, logits: torch.Tensor) -> None:
        target = (z1 - z0, *self.labels.shape[1:])
        with nnunet_output_to_stderr():
            resampled = self.configuration_manager.resampling_fn_probabilities(
                logits, target, self.current_spacing, self.original_spacing)
            labels = self.label_manager.convert_logits_to_segmentation(resampled)
        self.labels[z0:z1] = np.asarray(labels.cpu() if torch.is_tensor(labels) else labels)

    def result(self) -> np.ndarray:
        from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image

        full = np.zeros(self.properties["shape_before_cropping"], dtype=self.labels.dtype)
        full = insert_crop_into_image(full, self.labels, self.properties["bbox_used_for_cropping"])
        return np.ascontiguousarray(np.asarray(full).transpose(self.plans_manager.transpose_backward))


def segment(bundle: Union[Bundle, str, os.PathLike], image: Union[sitk.Image, str, os.PathLike],
            device: str = "auto", progress: ProgressCallback = silent) -> sitk.Image:
    """Label image (same size, spacing, origin, direction as ``image``) with the bundle's class values."""
    if not isinstance(bundle, Bundle):
        bundle = Bundle.load(bundle)
    if not isinstance(image, sitk.Image):
        image = read_image(image, "image")
    return Segmenter(bundle, device).segment(image, progress)


def write_image_atomically(image: sitk.Image, path: os.PathLike) -> Path:
    """Write to a temporary name with the same extension beside ``path``, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name
    stem, dot, ext = name.partition(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".partial{dot}{ext}", dir=path.parent)
    os.close(fd)
    try:
        sitk.WriteImage(image, tmp, useCompression=True)
        os.chmod(tmp, default_mode(False))
        os.replace(tmp, path)
    except RuntimeError as exc:
        raise NNSAMError(f"could not write {path} ({str(exc).splitlines()[-1][:120]}); "
                         "use a .nii.gz, .nrrd or .mha name in a writable folder") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
