"""Planning a few annotated slices: nnU-Net's own fingerprint and preprocessing, run without spawning workers."""

from __future__ import annotations

import json
import multiprocessing.process

from conftest import CHEST_SLICES
from nnsam_core.finetune import cases_from_sparse_slices
from nnsam_core.workspace import CONFIGURATION, DATASET_ID, PLANS, Workspace, plan_and_preprocess, write_raw_dataset


def test_planning_spawns_no_process_and_gives_nnunets_own_fingerprint(chest_ct, tmp_path, monkeypatch):
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset

    cases, names, _ = cases_from_sparse_slices(*chest_ct, slices=CHEST_SLICES)
    workspace = Workspace(tmp_path / "work")
    write_raw_dataset(workspace, cases, names, {"0": "CT"})
    fingerprint_file = workspace.preprocessed_dataset / "dataset_fingerprint.json"

    # The reference: nnU-Net's fingerprint computed the stock way, in its spawned worker process.
    with workspace.activated():
        extract_fingerprint_dataset(DATASET_ID, num_processes=1, clean=True, verbose=False, show_progress_bar=False)
    reference = json.loads(fingerprint_file.read_text())
    fingerprint_file.unlink()

    started = []

    def refuse_to_start(process):
        started.append(process.name)
        raise RuntimeError("planning a few slices must not start a process")

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse_to_start)
    plans = plan_and_preprocess(workspace)

    assert started == []
    assert json.loads(fingerprint_file.read_text()) == reference
    assert plans["configurations"][CONFIGURATION]["patch_size"]
    preprocessed = workspace.preprocessed_dataset / f"{PLANS}_{CONFIGURATION}"
    assert sorted(p.name for p in preprocessed.glob("*.pkl")) == sorted(f"{c.name}.pkl" for c in cases)
