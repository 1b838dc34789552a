"""A private nnU-Net workspace: raw dataset, planning and preprocessing with nnunetv2's own code.

nnU-Net finds its folders through the environment variables nnUNet_raw / nnUNet_preprocessed / nnUNet_results
(read lazily). They are pointed at the workspace only for the duration of a job and restored afterwards, so the
user's own nnU-Net setup is left alone.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import SimpleITK as sitk

DATASET_ID = 999
DATASET_NAME = f"Dataset{DATASET_ID:03d}_NNSAM"
PLANS = "nnUNetPlans"
CONFIGURATION = "2d"
FOLD = "all"
NNUNET_ENV = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


@dataclass(frozen=True)
class Workspace:
    root: Path

    @property
    def raw(self) -> Path:
        return self.root / "nnUNet_raw"

    @property
    def preprocessed(self) -> Path:
        return self.root / "nnUNet_preprocessed"

    @property
    def results(self) -> Path:
        return self.root / "nnUNet_results"

    @property
    def raw_dataset(self) -> Path:
        return self.raw / DATASET_NAME

    @property
    def preprocessed_dataset(self) -> Path:
        return self.preprocessed / DATASET_NAME

    def output_folder(self, trainer_name: str) -> Path:
        return self.results / DATASET_NAME / f"{trainer_name}__{PLANS}__{CONFIGURATION}" / f"fold_{FOLD}"

    def activated(self):
        """Point nnU-Net's environment variables here for the duration of the block."""
        folders = (self.raw, self.preprocessed, self.results)
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
        return scoped_environ({k: str(f) for k, f in zip(NNUNET_ENV, folders)})


@contextlib.contextmanager
def scoped_environ(values: dict) -> Iterator[None]:
    """Set (or, for None, unset) environment variables for the block, then restore what was there."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        _set_environ(values)
        yield
    finally:
        _set_environ(saved)


def _set_environ(values: dict) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@dataclass(frozen=True)
class RawDataset:
    """An nnU-Net raw dataset folder as nnsam uses it: one input channel, labels background plus 1..N."""

    folder: Path
    dataset_json: dict
    class_names: list
    ending: str
    label_files: list

    def image_file(self, case: str) -> Path:
        return self.folder / "imagesTr" / f"{case}_0000{self.ending}"

    def case_name(self, label_file: Path) -> str:
        return label_file.name[: -len(self.ending)]


def read_raw_dataset(folder) -> RawDataset:
    from .errors import NNSAMError

    folder = Path(folder)
    path = folder / "dataset.json"
    if not path.is_file():
        raise NNSAMError(f"{folder} has no dataset.json; give an nnU-Net raw dataset folder")
    try:
        dataset_json = json.loads(path.read_text())
    except ValueError:
        raise NNSAMError(f"{path} is not valid JSON; fix the dataset description") from None
    channels = len(dataset_json.get("channel_names", {}))
    if channels != 1:
        raise NNSAMError(f"{folder.name} has {channels} input channels; nnsam supports single-channel images")
    try:
        labels = {n: int(v) for n, v in dataset_json.get("labels", {}).items() if n != "background"}
    except (TypeError, ValueError):
        labels = {}
    if not labels or sorted(labels.values()) != list(range(1, len(labels) + 1)):
        raise NNSAMError(f"{folder.name}/dataset.json labels must be background plus 1..N (regions are not supported)")
    class_names = [n for n, _ in sorted(labels.items(), key=lambda kv: kv[1])]
    ending = dataset_json.get("file_ending", ".nii.gz")
    label_files = sorted((folder / "labelsTr").glob(f"*{ending}"))
    if not label_files:
        raise NNSAMError(f"{folder}/labelsTr holds no {ending} files")
    return RawDataset(folder, dataset_json, class_names, ending, label_files)


@dataclass
class TrainingCase:
    name: str
    image: sitk.Image   # one-slice 3D image (or a volume whose every slice is labelled)
    labels: sitk.Image


def write_raw_dataset(workspace: Workspace, cases: Sequence[TrainingCase], class_names: Sequence[str],
                      channel_names: dict) -> Path:
    """nnU-Net raw format: imagesTr/<case>_0000.nii.gz, labelsTr/<case>.nii.gz, dataset.json."""
    folder = workspace.raw_dataset
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    for case in cases:
        sitk.WriteImage(case.image, str(folder / "imagesTr" / f"{case.name}_0000.nii.gz"))
        sitk.WriteImage(case.labels, str(folder / "labelsTr" / f"{case.name}.nii.gz"))
    dataset_json = {
        "channel_names": {str(k): v for k, v in channel_names.items()},
        "labels": {"background": 0, **{name: i for i, name in enumerate(class_names, start=1)}},
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
        "description": "Annotated slices written by nnsam_core",
    }
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return folder


def plan_and_preprocess(workspace: Workspace, max_size: Optional[int] = None) -> dict:
    """Fingerprint, plan (2d) and preprocess with nnunetv2; returns the plans dict.

    The axis transpose nnU-Net may choose is suppressed: slices must stay along the image's third axis, since
    training cases are single slices. ``max_size`` caps the in-plane size (pixels, longer side of the median
    case) that nnU-Net works at: when the planned spacing would give larger slices, the in-plane target spacing is
    coarsened by the same factor on both axes (nnU-Net resamples to it and predicts back at the original
    resolution, as its 3d_lowres configuration does). The intensity statistics are drawn from at most
    FOREGROUND_DRAWS_PER_CASE values per case.
    """
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset, preprocess_dataset
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    with workspace.activated(), nnunet_output_to_stderr(), nnunet_pools_in_process():
        extract_fingerprint_dataset(DATASET_ID, few_case_fingerprint_extractor(), num_processes=1,
                                    check_dataset_integrity=False, clean=True, verbose=False, show_progress_bar=False)
        planner = ExperimentPlanner(DATASET_ID, suppress_transpose=True)
        if max_size:
            planner.overwrite_target_spacing = capped_target_spacing(planner, max_size)
        planner.plan_experiment()
        preprocess_dataset(DATASET_ID, PLANS, configurations=(CONFIGURATION,), num_processes=[1],
                           verbose=False, show_progress_bar=False)
    return json.loads((workspace.preprocessed_dataset / f"{PLANS}.json").read_text())


def preprocess_with_plans(workspace: Workspace, plans: dict) -> dict:
    """Preprocess with given plans (a parent model's, when adapting it) instead of planning anew: the network keeps
    the parent's shape and the new scan is resampled and normalised as the parent's training scans were."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset, preprocess_dataset

    plans = dict(plans, dataset_name=DATASET_NAME, plans_name=PLANS)
    with workspace.activated(), nnunet_output_to_stderr(), nnunet_pools_in_process():
        extract_fingerprint_dataset(DATASET_ID, few_case_fingerprint_extractor(), num_processes=1,
                                    check_dataset_integrity=False, clean=True, verbose=False, show_progress_bar=False)
        workspace.preprocessed_dataset.mkdir(parents=True, exist_ok=True)
        (workspace.preprocessed_dataset / f"{PLANS}.json").write_text(json.dumps(plans, indent=2))
        # what nnU-Net's planner would have copied beside its plans
        (workspace.preprocessed_dataset / "dataset.json").write_text(
            (workspace.raw_dataset / "dataset.json").read_text())
        preprocess_dataset(DATASET_ID, PLANS, configurations=(CONFIGURATION,), num_processes=[1],
                           verbose=False, show_progress_bar=False)
    return plans


# nnU-Net estimates the foreground intensity statistics (CT normalisation) from 10^8 values drawn with replacement,
# split evenly over the cases. Four one-slice cases then get 25 million draws each from at most 262,144 pixels:
# 4 of the 5 s of planning on a 2-core CPU, for statistics that a million draws per case give just as well (4 CHD
# slices: mean 0.008 % off, percentiles equal; 4 slices of a chest CT: 99.5th percentile 505 instead of 507 HU).
FOREGROUND_DRAWS_PER_CASE = 1_000_000


@functools.lru_cache(maxsize=None)
def few_case_fingerprint_extractor():  # built lazily: importing nnunetv2 is slow
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor

    class FewCaseFingerprintExtractor(DatasetFingerprintExtractor):
        """nnU-Net's fingerprint with at most FOREGROUND_DRAWS_PER_CASE intensity draws per case (nnU-Net's own
        budget is unchanged from 100 cases up)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.num_foreground_voxels_for_intensitystats = min(
                self.num_foreground_voxels_for_intensitystats, FOREGROUND_DRAWS_PER_CASE * len(self.dataset))

    return FewCaseFingerprintExtractor


@contextlib.contextmanager
def nnunet_pools_in_process() -> Iterator[None]:
    """nnU-Net's planning runs its worker pools as threads of this process. Its fingerprint extraction and
    preprocessing otherwise each spawn a fresh Python that imports torch and nnU-Net again (2 to 3 s apiece on a
    2-core CPU), and listing the raw files forks 12 workers from a process whose torch has started its threads;
    for a few annotated slices that was most of the planning time. nnU-Net's own code still does all the work:
    only the pools it asks ``multiprocessing`` for are swapped, and only inside this block."""
    from multiprocessing.pool import ThreadPool
    from types import SimpleNamespace
    from unittest import mock
    from nnunetv2.experiment_planning.dataset_fingerprint import fingerprint_extractor
    from nnunetv2.preprocessing.preprocessors import default_preprocessor
    from nnunetv2.utilities import utils

    # These call multiprocessing.get_context("spawn").Pool(n) or Pool(processes=n) and then use only the Pool
    # interface (starmap, starmap_async, ready, get, _pool[i].is_alive()), which ThreadPool provides.
    in_process = SimpleNamespace(get_context=lambda method=None: SimpleNamespace(Pool=ThreadPool))
    with mock.patch.object(fingerprint_extractor, "multiprocessing", in_process), \
            mock.patch.object(default_preprocessor, "multiprocessing", in_process), \
            mock.patch.object(utils, "Pool", ThreadPool):
        yield


def capped_target_spacing(planner, max_size: int) -> Optional[list]:
    """nnU-Net's own target spacing (z, y, x), coarsened in-plane so the median case is at most ``max_size``
    pixels on its longer side; None when it already is."""
    import numpy as np
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

    if max_size < 8:
        raise ValueError("max_size must be at least 8 pixels")
    spacing = np.asarray(planner.determine_fullres_target_spacing(), dtype=float)
    fingerprint = planner.dataset_fingerprint
    shapes = [compute_new_shape(shape, case_spacing, spacing)
              for case_spacing, shape in zip(fingerprint["spacings"], fingerprint["shapes_after_crop"])]
    longest = float(np.max(np.median(shapes, 0)[1:]))
    if longest <= max_size:
        return None
    factor = longest / max_size
    return [float(spacing[0]), float(spacing[1] * factor), float(spacing[2] * factor)]


class _StderrProxy:
    """Writes to whatever sys.stderr is at the time of writing (test runners swap it)."""

    def write(self, text):
        import sys
        return sys.stderr.write(text)

    def flush(self):
        import sys
        sys.stderr.flush()


def nnunet_output_to_stderr():
    """nnU-Net prints its chatter to stdout; keep stdout for results and progress lines."""
    return contextlib.redirect_stdout(_StderrProxy())


def slice_case(image: sitk.Image, labels: sitk.Image, k: int, name: str) -> TrainingCase:
    """A one-slice case cut at index k, keeping its physical geometry."""
    return TrainingCase(name, image[:, :, k:k + 1], labels[:, :, k:k + 1])

