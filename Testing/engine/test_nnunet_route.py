"""The plug-and-play promise: nnU-Net's own commands train nnSAM, and `nnsam predict` uses the result."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import nnsam_core
from conftest import CHEST_SLICES


def _bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else shutil.which(name)


def test_nnunetv2_train_with_nnsam_trainer(tmp_path, chest_ct):
    from nnsam_core.images import read_labels
    from nnsam_core.workspace import write_raw_dataset, Workspace, slice_case

    ct, seg = chest_ct
    image = sitk.ReadImage(ct)
    labels = read_labels(seg, image)
    env = dict(os.environ, nnUNet_raw=str(tmp_path / "raw"), nnUNet_preprocessed=str(tmp_path / "pre"),
               nnUNet_results=str(tmp_path / "results"),
               nnUNet_extTrainer=str(Path(nnsam_core.__file__).parent / "trainers"))
    # A normal nnU-Net raw dataset, written the way any user would have one.
    raw = tmp_path / "raw" / "Dataset998_Chest"
    cases = [slice_case(image, labels.image, k, f"chest_{k:03d}") for k in CHEST_SLICES]
    written = write_raw_dataset(Workspace(tmp_path / "unused"), cases, labels.class_names, {"0": "CT"})
    shutil.copytree(written, raw)

    plan = subprocess.run([_bin("nnUNetv2_plan_and_preprocess"), "-d", "998", "-c", "2d", "-np", "1"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert plan.returncode == 0, plan.stderr[-3000:]
    train = subprocess.run([_bin("nnUNetv2_train"), "998", "2d", "all", "-tr", "nnUNetTrainerNNSAM_debug",
                            "-device", "cpu"], env=dict(env, nnUNet_n_proc_DA="0"), capture_output=True, text=True,
                           timeout=900)
    assert train.returncode == 0, (train.stdout[-3000:], train.stderr[-3000:])
    fold = tmp_path / "results" / "Dataset998_Chest" / "nnUNetTrainerNNSAM_debug__nnUNetPlans__2d" / "fold_all"
    assert (fold / "checkpoint_final.pth").is_file()
    summary = json.loads((fold / "validation" / "summary.json").read_text())  # nnU-Net's own final validation ran
    assert "mean" in summary
    # the SAM branch's settings are recorded beside the checkpoint and win over the trainer's current defaults
    from nnsam_core.bundle import Bundle
    from nnsam_core.errors import NNSAMError
    recorded = fold / "nnsam_config.json"
    trained_with = json.loads(recorded.read_text())
    assert trained_with["encoder"] == "litemedsam" and trained_with["sam_input"] == "unit-range"
    assert Bundle.from_nnunet_results(fold).manifest["nnsam_config"] == trained_with
    recorded.write_text(json.dumps(dict(trained_with, sam_input="nnunet")))
    assert Bundle.from_nnunet_results(fold).manifest["nnsam_config"]["sam_input"] == "nnunet"
    recorded.write_text(json.dumps(dict(trained_with, embeddings="sometimes")))
    with pytest.raises(NNSAMError, match="nnsam_config.json is not a valid"):
        Bundle.from_nnunet_results(fold)
    recorded.unlink()  # a folder from before the record: the trainer's settings, with the cache alone as then
    assert trained_with["recompute_share"] == 0.1
    assert Bundle.from_nnunet_results(fold).manifest["nnsam_config"] == dict(trained_with, recompute_share=0.0)
    recorded.write_text(json.dumps(trained_with))

    crop = image[:, :, 18:20]
    sitk.WriteImage(crop, str(tmp_path / "crop.nii.gz"))
    out = tmp_path / "pred.nii.gz"
    predict = subprocess.run([sys.executable, "-m", "nnsam_core.cli", "predict", str(fold), str(tmp_path / "crop.nii.gz"),
                              "-o", str(out), "--device", "cpu", "--progress", "none"],
                             capture_output=True, text=True, timeout=600)
    assert predict.returncode == 0, predict.stderr[-2000:]
    result = sitk.ReadImage(str(out))
    assert result.GetSize() == crop.GetSize()
    assert set(np.unique(sitk.GetArrayFromImage(result)).tolist()) <= set(range(len(labels.class_names) + 1))


@pytest.mark.parametrize("name, share", [("nnUNetTrainerNNSAM", "0.1"), ("nnUNetTrainerNNSAMCached", "0.0")])
def test_nnunets_trainer_lookup_finds_each_recompute_share_variant(name, share):
    env = dict(os.environ, nnUNet_extTrainer=str(Path(nnsam_core.__file__).parent / "trainers"))
    code = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
            f"trainer = find('{name}')\n"
            "print(trainer.nnsam_config.recompute_share, trainer.nnsam_config.embeddings, trainer.nnsam_config.method)")
    found = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert found.returncode == 0, found.stderr[-2000:]
    assert found.stdout.split()[-3:] == [share, "cached", "nnsam"]
    from nnsam_core.methods import TRAINER_CATALOGUE
    assert name in TRAINER_CATALOGUE   # its results folders can be read
