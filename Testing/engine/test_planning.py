"""Planning a few annotated slices: nnU-Net's own fingerprint and preprocessing, run without spawning workers and
with a bounded number of intensity draws per case."""

from __future__ import annotations

import json
import multiprocessing.process

import pytest

from conftest import CHEST_SLICES
from nnsam_core.finetune import cases_from_sparse_slices
from nnsam_core.workspace import (CONFIGURATION, DATASET_ID, FOREGROUND_DRAWS_PER_CASE, PLANS, Workspace,
                                  few_case_fingerprint_extractor, plan_and_preprocess, write_raw_dataset)


def test_planning_spawns_no_process_and_gives_nnunets_fingerprint(chest_ct, tmp_path, monkeypatch):
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset

    cases, names, _ = cases_from_sparse_slices(*chest_ct, slices=CHEST_SLICES)
    workspace = Workspace(tmp_path / "work")
    write_raw_dataset(workspace, cases, names, {"0": "CT"})
    fingerprint_file = workspace.preprocessed_dataset / "dataset_fingerprint.json"

    # The reference: nnU-Net's fingerprint computed the stock way, in its spawned worker process, with its 10^8
    # intensity draws.
    with workspace.activated():
        extract_fingerprint_dataset(DATASET_ID, num_processes=1, clean=True, verbose=False, show_progress_bar=False)
        draws = few_case_fingerprint_extractor()(DATASET_ID, 1).num_foreground_voxels_for_intensitystats
    reference = json.loads(fingerprint_file.read_text())
    fingerprint_file.unlink()
    assert draws == FOREGROUND_DRAWS_PER_CASE * len(cases) < 1e8  # nnU-Net's own: 10^8 over all cases

    started = []

    def refuse_to_start(process):
        started.append(process.name)
        raise RuntimeError("planning a few slices must not start a process")

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse_to_start)
    plans = plan_and_preprocess(workspace)

    assert started == []
    fingerprint = json.loads(fingerprint_file.read_text())
    intensities = fingerprint.pop("foreground_intensity_properties_per_channel")["0"]
    expected = reference.pop("foreground_intensity_properties_per_channel")["0"]
    assert fingerprint == reference  # spacings, shapes, cropping: exactly nnU-Net's
    assert intensities.keys() == expected.keys()
    scale = expected["std"]
    for name, value in expected.items():  # estimated from fewer draws: equal to well within the intensities' spread
        assert intensities[name] == pytest.approx(value, abs=1e-2 * scale), name
    assert plans["configurations"][CONFIGURATION]["patch_size"]
    preprocessed = workspace.preprocessed_dataset / f"{PLANS}_{CONFIGURATION}"
    assert sorted(p.name for p in preprocessed.glob("*.pkl")) == sorted(f"{c.name}.pkl" for c in cases)
