"""Reading a raw nnU-Net dataset into benchmark units, and writing training subsets as raw datasets.

Every unit is cached once, as a one-slice NIfTI image/label pair under ``REPORT_DIR/data`` (after the optional
in-plane downsampling), with the source's spacing, origin and direction. Training subsets are raw datasets made of
those files, and test predictions are made on them, so training and testing see exactly the same slices.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk

from nnsam_core.errors import NNSAMError
from nnsam_core.workspace import read_raw_dataset
from .splits import Unit, make_units, sparse_volumes


@dataclass
class DatasetInfo:
    folder: Path
    dataset_json: dict
    class_names: list[str]          # label value i -> class_names[i - 1]
    ending: str
    slice_cases: list[str]          # one-slice cases
    volumes: dict[str, list[int]]   # volume case -> labelled slice indices
    # Sparse volumes (one patient's one-slice cases stacked in slice order): volume -> its cases, and the real
    # slice index of each stacked slice. Empty for datasets of real volumes.
    members: dict[str, list[str]] = field(default_factory=dict)
    positions: dict[str, list[int]] = field(default_factory=dict)

    @property
    def channel_name(self) -> str:
        return str(next(iter(self.dataset_json["channel_names"].values())))

    def image_path(self, case: str) -> Path:
        return self.folder / "imagesTr" / f"{case}_0000{self.ending}"

    def label_path(self, case: str) -> Path:
        return self.folder / "labelsTr" / f"{case}{self.ending}"

    def units(self) -> list[Unit]:
        return make_units(self.slice_cases, self.volumes)


def read_dataset(folder) -> DatasetInfo:
    """Classes, cases and, for volumes, their labelled slices (a slice with no label at all is unlabelled)."""
    raw = read_raw_dataset(folder)
    folder, ending = raw.folder, raw.ending
    slice_cases, volumes = [], {}
    for label_file in raw.label_files:
        case = raw.case_name(label_file)
        if not raw.image_file(case).is_file():
            raise NNSAMError(f"case {case} has labels but no image imagesTr/{case}_0000{ending}")
        labels_image = sitk.ReadImage(str(label_file))
        if labels_image.GetDimension() == 2 or labels_image.GetSize()[2] == 1:
            slice_cases.append(case)
        else:
            array = sitk.GetArrayViewFromImage(labels_image)
            volumes[case] = [int(k) for k in np.flatnonzero(array.reshape(array.shape[0], -1).any(axis=1))]
    return DatasetInfo(folder, raw.dataset_json, raw.class_names, ending, slice_cases, volumes)


def with_sparse_volumes(info: DatasetInfo) -> DatasetInfo:
    """The one-slice cases of ``info`` as one sparse volume per patient (cases ``<patient>_<slice index>``): the
    patient's slices stacked in slice order, each keeping its real slice index in ``positions``."""
    if info.volumes:
        return info
    groups = sparse_volumes(info.slice_cases) if info.slice_cases else None
    if not groups:
        raise NNSAMError(f"{info.folder.name} holds one-slice cases whose names carry no patient and slice index "
                         "(<patient>_<slice index>), so they cannot be grouped into volumes for the in-volume "
                         "protocol")
    clash = sorted(set(groups) & set(info.slice_cases))
    if clash:
        raise NNSAMError(f"patient id {clash[0]} is also a case name of {info.folder.name}; rename the case")
    volumes, members, positions = {}, {}, {}
    for patient, slices in groups.items():
        members[patient] = [case for _, case in slices]
        positions[patient] = [z for z, _ in slices]
        labelled = [sitk.GetArrayFromImage(sitk.ReadImage(str(info.label_path(case)))).any()
                    for case in members[patient]]
        volumes[patient] = [k for k, flag in enumerate(labelled) if flag]
    return replace(info, slice_cases=[], volumes=volumes, members=members, positions=positions)


def stack_slices(images: Sequence[sitk.Image]) -> sitk.Image:
    """One-slice images stacked along k, with the first one's in-plane geometry and slice spacing.

    The stack's k is an order, not a distance (a sparse volume's slices are not evenly spaced); the real slice
    indices travel beside it (``DatasetInfo.positions``), which is what fill-between reads."""
    first = as_3d(images[0])
    slices = [as_3d(image)[:, :, 0] for image in images]
    stacked = sitk.JoinSeries(slices, first.GetOrigin()[2], first.GetSpacing()[2])
    stacked.SetOrigin(first.GetOrigin())
    stacked.SetDirection(first.GetDirection())
    return stacked


def as_3d(image: sitk.Image) -> sitk.Image:
    return image if image.GetDimension() == 3 else sitk.JoinSeries([image])


def downsample(image: sitk.Image, labels: sitk.Image, factor: int) -> tuple[sitk.Image, sitk.Image]:
    """In-plane downsampling by an integer factor: the image by block averaging (no aliasing), the labels by
    nearest neighbour on the same new grid. Physical extent, origin of the first block centre and direction are
    kept, so distances stay in mm."""
    if factor == 1:
        return image, labels
    small = sitk.BinShrink(sitk.Cast(image, sitk.sitkFloat32), [factor, factor, 1])
    small_labels = sitk.Resample(labels, small, sitk.Transform(), sitk.sitkNearestNeighbor, 0, labels.GetPixelID())
    return small, small_labels


class UnitStore:
    """The one-slice (or, for the in-volume protocol, whole-volume) files of the benchmark, written once."""

    def __init__(self, info: DatasetInfo, root: Path, downsample_factor: int = 1):
        self.info = info
        self.root = Path(root)
        self.factor = int(downsample_factor)

    def image_file(self, name: str) -> Path:
        return self.root / "imagesTr" / f"{name}_0000.nii.gz"

    def label_file(self, name: str) -> Path:
        return self.root / "labelsTr" / f"{name}.nii.gz"

    def _write(self, name: str, image: sitk.Image, labels: sitk.Image) -> None:
        image, labels = downsample(image, sitk.Cast(labels, sitk.sitkUInt8), self.factor)
        for path, img in ((self.image_file(name), image), (self.label_file(name), labels)):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".partial_{os.getpid()}_" + path.name)  # several processes may share a report
            sitk.WriteImage(img, str(tmp), useCompression=True)
            tmp.replace(path)  # a crash never leaves a half-written file under the final name

    def prepare_unit(self, unit: Unit) -> None:
        if self.image_file(unit.name).is_file() and self.label_file(unit.name).is_file():
            return
        image = as_3d(sitk.ReadImage(str(self.info.image_path(unit.case))))
        labels = as_3d(sitk.ReadImage(str(self.info.label_path(unit.case))))
        if unit.k is not None:
            # image[:, :, k:k+1] keeps the slice's physical position, so spacing and origin stay right.
            image, labels = image[:, :, unit.k:unit.k + 1], labels[:, :, unit.k:unit.k + 1]
        self._write(unit.name, image, labels)

    def prepare_volume(self, case: str) -> None:
        if self.image_file(case).is_file() and self.label_file(case).is_file():
            return
        if case in self.info.members:
            cases = self.info.members[case]
            image = stack_slices([sitk.ReadImage(str(self.info.image_path(c))) for c in cases])
            labels = stack_slices([sitk.ReadImage(str(self.info.label_path(c))) for c in cases])
            self._write(case, image, labels)
            return
        image = as_3d(sitk.ReadImage(str(self.info.image_path(case))))
        labels = as_3d(sitk.ReadImage(str(self.info.label_path(case))))
        self._write(case, image, labels)

    def read(self, name: str) -> tuple[sitk.Image, sitk.Image]:
        return sitk.ReadImage(str(self.image_file(name))), sitk.ReadImage(str(self.label_file(name)))

    def write_training_dataset(self, folder: Path, units: Sequence[Unit]) -> Path:
        """A raw nnU-Net dataset holding exactly ``units`` as one-slice cases (what fine_tune trains on)."""
        folder = Path(folder)
        if folder.exists():
            shutil.rmtree(folder)
        (folder / "imagesTr").mkdir(parents=True)
        (folder / "labelsTr").mkdir(parents=True)
        for unit in units:
            shutil.copyfile(self.image_file(unit.name), folder / "imagesTr" / f"{unit.name}_0000.nii.gz")
            shutil.copyfile(self.label_file(unit.name), folder / "labelsTr" / f"{unit.name}.nii.gz")
        dataset_json = {
            "channel_names": self.info.dataset_json["channel_names"],
            "labels": {"background": 0, **{n: i for i, n in enumerate(self.info.class_names, start=1)}},
            "numTraining": len(units),
            "file_ending": ".nii.gz",
            "description": f"nnsam benchmark training subset of {self.info.folder.name}: "
                           + ", ".join(u.name for u in units),
        }
        (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
        return folder


def pick_volumes(info: DatasetInfo, count: Optional[int], names: Optional[Sequence[str]] = None,
                 min_labelled: int = 2) -> list[str]:
    """Volumes for the in-volume protocol: the named ones, or ``count`` spread evenly over the sorted list."""
    candidates = sorted(c for c, ks in info.volumes.items() if len(ks) >= min_labelled)
    if not info.volumes:
        raise NNSAMError(f"{info.folder.name} holds no volumes (every case is a single slice); the in-volume "
                         "protocol needs 3D cases")
    if names:
        unknown = sorted(set(names) - set(info.volumes))
        if unknown:
            raise NNSAMError(f"--cases {unknown[:5]} are not volume cases of {info.folder.name}")
        short = [n for n in names if n not in candidates]
        if short:
            raise NNSAMError(f"--cases {short[:5]} have fewer than {min_labelled} labelled slices; pick others or "
                             "lower --annotated")
        return list(names)
    if not candidates:
        raise NNSAMError(f"no volume of {info.folder.name} has at least {min_labelled} labelled slices")
    count = len(candidates) if count is None else count
    if count < 1:
        raise NNSAMError("--volumes must be at least 1")
    count = min(count, len(candidates))
    # Evenly spread over the sorted names: deterministic, and not just the first few subjects.
    return [candidates[int((i + 0.5) * len(candidates) / count)] for i in range(count)]
