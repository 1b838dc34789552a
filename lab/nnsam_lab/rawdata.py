"""``nnsam-lab raw-dataset``: one image and its segmentation written as a one-case nnU-Net raw dataset.

The benchmark reads nnU-Net raw folders; this puts any scan the engine can read (NIfTI, NRRD, DICOM folder) with
a label map or a Slicer ``.seg.nrrd`` into that format, e.g. slicerio's small chest CT as an in-volume case. The
engine's own readers do the work, so the labels land on the image grid exactly as ``nnsam train`` would see them
(segment order = label value, segment names = class names).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Optional

from nnsam_core.errors import NNSAMError

EPILOG = """\
example (slicerio's chest CT, 7 segments, as an in-volume case):
  nnsam-lab raw-dataset "$(python -c "import slicerio; print(slicerio.get_testdata_file('CTChest4.nrrd'))")" \\
      "$(python -c "import slicerio; print(slicerio.get_testdata_file('Segmentation.seg.nrrd'))")" \\
      -o /tmp/Dataset903_ChestCT --case chest_01 --modality CT
  nnsam-lab benchmark --in-volume /tmp/Dataset903_ChestCT -o chest_fill --methods fill-between --annotated 3 5"""

_CASE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def add_raw_dataset_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("raw-dataset", help="write an image and its segmentation as a one-case nnU-Net "
                                   "raw dataset (for benchmark --in-volume)", description=__doc__.split("\n\n")[1],
                                   epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", metavar="IMAGE", help="the scan (NIfTI, NRRD, MHA or a DICOM folder)")
    parser.add_argument("labels", metavar="LABELS", help="its label map on the same grid, or a Slicer .seg.nrrd")
    parser.add_argument("-o", "--output", required=True, metavar="DATASET_DIR",
                        help="new nnU-Net raw dataset folder (must not exist yet)")
    parser.add_argument("--case", default="case_01", help="case name (default: case_01)")
    parser.add_argument("--modality", default="CT", help="channel name in dataset.json (default: CT)")
    parser.add_argument("--classes", nargs="+", metavar="NAME",
                        help="class names of label values 1..N (default: the segment names of a .seg.nrrd, else "
                             "class_1..class_N)")
    parser.set_defaults(func=run_raw_dataset_command)
    return parser


def run_raw_dataset_command(args) -> int:
    folder = write_one_case_dataset(args.image, args.labels, args.output, case=args.case, modality=args.modality,
                                    class_names=args.classes)
    print(f"dataset: {folder}")
    return 0


def write_one_case_dataset(image_path, labels_path, output, case: str = "case_01", modality: str = "CT",
                           class_names: Optional[list[str]] = None) -> Path:
    """imagesTr/<case>_0000.nii.gz, labelsTr/<case>.nii.gz and dataset.json in ``output``; returns the folder."""
    import SimpleITK as sitk

    from nnsam_core.images import as_volume, check_image, read_image, read_labels

    output = Path(output)
    if output.exists():
        raise NNSAMError(f"{output} already exists; give a new folder for the dataset")
    if not _CASE_NAME.match(case):
        raise NNSAMError(f"case name {case!r} must be letters, digits, '_' or '-'")
    image = as_volume(read_image(image_path))
    check_image(image)
    labels = read_labels(labels_path, image, class_names)
    (output / "imagesTr").mkdir(parents=True)
    (output / "labelsTr").mkdir()
    sitk.WriteImage(image, str(output / "imagesTr" / f"{case}_0000.nii.gz"), useCompression=True)
    sitk.WriteImage(labels.image, str(output / "labelsTr" / f"{case}.nii.gz"), useCompression=True)
    dataset_json = {
        "channel_names": {"0": modality},
        "labels": {"background": 0, **{name: i for i, name in enumerate(labels.class_names, start=1)}},
        "numTraining": 1,
        "file_ending": ".nii.gz",
        "description": f"{Path(image_path).name} with {Path(labels_path).name}, written by nnsam-lab raw-dataset",
    }
    (output / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return output
