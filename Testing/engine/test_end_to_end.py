"""End to end, as a user runs it: `nnsam train` then `nnsam predict` on real CT."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from conftest import CHEST_SLICES

NNSAM = [sys.executable, "-m", "nnsam_core.cli"]


def _assert_same_geometry(a: sitk.Image, b: sitk.Image):
    assert a.GetSize() == b.GetSize()
    assert np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-5)
    assert np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-5)
    assert np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


def test_cli_train_then_predict_chest_ct(tmp_path, chest_ct):
    ct, seg = chest_ct
    bundle = tmp_path / "chest_model"
    train = subprocess.run([*NNSAM, "train", ct, seg, "--slices", ",".join(map(str, CHEST_SLICES)),
                            "-o", str(bundle), "--iterations", "2", "--device", "cpu", "--progress", "json"],
                           capture_output=True, text=True, timeout=900)
    assert train.returncode == 0, train.stderr[-2000:]
    events = [json.loads(line) for line in train.stdout.splitlines()]  # stdout is pure JSON lines
    assert {"prepare", "plan", "embed", "train", "save", "done"} <= {e["stage"] for e in events}
    assert all(set(e) == {"stage", "step", "total", "loss", "eta_s", "message"} for e in events)
    manifest = json.loads((bundle / "nnsam.json").read_text())
    assert manifest["training"]["slices"] == CHEST_SLICES
    assert [c["name"] for c in manifest["classes"]][:2] == ["ribs", "cervical vertebral column"]

    out = tmp_path / "labels.nii.gz"
    predict = subprocess.run([*NNSAM, "predict", str(bundle), ct, "-o", str(out), "--device", "cpu",
                              "--progress", "none"], capture_output=True, text=True, timeout=900)
    assert predict.returncode == 0, predict.stderr[-2000:]
    image, labels = sitk.ReadImage(ct), sitk.ReadImage(str(out))
    _assert_same_geometry(image, labels)
    values = set(np.unique(sitk.GetArrayFromImage(labels)).tolist())
    assert values <= set(range(0, len(manifest["classes"]) + 1))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".") and "partial" in p.name] == []


def test_api_train_then_segment_cardiac_ct_slice(tmp_path, chd_dataset):
    from nnsam_core import Bundle, fine_tune, segment

    names = ["LV", "RV", "LA", "RA", "Myo", "aorta", "pulmonary_artery"]
    bundle = fine_tune(chd_dataset / "imagesTr" / "chd_1001_179_0000.nii.gz",
                       chd_dataset / "labelsTr" / "chd_1001_179.nii.gz", output=tmp_path / "chd_model",
                       class_names=names, iterations=2, device="cpu")
    assert bundle.class_names == names
    assert bundle.manifest["training"]["slices"] == [0]
    # The quick preset on a CPU trains at most CPU_QUICK_MAX_SIZE pixels across: nnU-Net plans a coarser
    # in-plane spacing for this 512x512 slice, and segmentation still returns the native grid (below).
    from nnsam_core.finetune import CPU_QUICK_MAX_SIZE
    source = sitk.ReadImage(str(chd_dataset / "imagesTr" / "chd_1001_179_0000.nii.gz"))
    planned = bundle.plans["configurations"]["2d"]
    assert bundle.manifest["training"]["max_size"] == CPU_QUICK_MAX_SIZE
    assert planned["spacing"] == bundle.manifest["training"]["working_spacing"]
    for axis, native in zip(planned["spacing"], reversed(source.GetSpacing()[:2])):
        assert abs(axis - native * 512 / CPU_QUICK_MAX_SIZE) < 1e-3 * axis
    assert max(planned["patch_size"]) <= CPU_QUICK_MAX_SIZE
    other = sitk.ReadImage(str(chd_dataset / "imagesTr" / "chd_1002_51_0000.nii.gz"))
    labels = segment(Bundle.load(tmp_path / "chd_model"), other, device="cpu")
    _assert_same_geometry(other, labels)
    assert set(np.unique(sitk.GetArrayFromImage(labels)).tolist()) <= set(range(8))


def test_segment_keeps_non_identity_geometry(trained, chest_ct):
    """A volume with oblique direction, odd origin and anisotropic spacing comes back on the same grid."""
    from nnsam_core import segment

    bundle, _ = trained
    image = sitk.ReadImage(chest_ct[0])[:, :, 12:14]
    image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    image.SetOrigin((12.5, -40.25, 7.0))
    image.SetSpacing((2.5, 3.1, 7.5))
    labels = segment(bundle, image, device="cpu")
    _assert_same_geometry(image, labels)
    assert labels.GetPixelID() in (sitk.sitkUInt8, sitk.sitkUInt16)
