"""nnsam benchmark: split logic (fast unit tests), the harness end to end on tiny synthetic data, resumability."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnsam_lab.benchmark import data as bdata
from nnsam_lab.benchmark.runner import Plan, Settings, run_in_volume_benchmark, run_slices_benchmark
from nnsam_lab.benchmark.splits import (Unit, default_split_mode, evenly_spaced, make_split, make_units,
                                         patient_ids)
from nnsam_lab.cli import main
from nnsam_core.errors import NNSAMError

CLASSES = ["disk", "square"]


# --------------------------------------------------------------------------------------------- synthetic data
def _shapes(size: int, rng: np.random.Generator) -> np.ndarray:
    """A disk (1) and a square (2) at random places: easy, but a model has to look at the image."""
    labels = np.zeros((size, size), np.uint8)
    yy, xx = np.mgrid[:size, :size]
    cy, cx, r = rng.integers(size // 4, 3 * size // 4), rng.integers(size // 4, size // 2), size // 8
    labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
    sy, sx = rng.integers(2, size // 2), rng.integers(size // 2 + 2, size - size // 6)
    labels[sy:sy + size // 6, sx:sx + size // 6] = 2
    return labels


def _image_from_labels(labels: np.ndarray, rng) -> np.ndarray:
    # Intensity encodes the class (100 per class) plus noise smaller than 50, so round(image/100) is the truth.
    return (labels.astype(np.float32) * 100 + rng.normal(0, 8, labels.shape)).astype(np.float32)


def _write_dataset(folder: Path, volumes: dict | None = None, patients: int = 4, per_patient: int = 3,
                   size: int = 48) -> Path:
    """nnU-Net raw dataset: one-slice cases syn_<patient>_<slice>, or volumes {name: (depth, labelled ks)}."""
    rng = np.random.default_rng(7)
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir(parents=True)

    def write(name, image, labels, spacing):
        img, lab = sitk.GetImageFromArray(image), sitk.GetImageFromArray(labels)
        for x in (img, lab):
            x.SetSpacing(spacing)
            x.SetOrigin((-10.0, 5.0, 2.0))
        sitk.WriteImage(img, str(folder / "imagesTr" / f"{name}_0000.nii.gz"))
        sitk.WriteImage(lab, str(folder / "labelsTr" / f"{name}.nii.gz"))

    if volumes is None:
        for p in range(patients):
            for s in range(per_patient):
                labels = _shapes(size, rng)[None]
                write(f"syn_{100 + p}_{10 * s + p}", _image_from_labels(labels, rng), labels, (1.5, 1.5, 1.0))
    else:
        for name, (depth, labelled) in volumes.items():
            labels = np.zeros((depth, size, size), np.uint8)
            for k in labelled:
                labels[k] = _shapes(size, rng)
            write(name, _image_from_labels(labels, rng), labels, (1.25, 1.25, 8.0))
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "disk": 1, "square": 2},
        "numTraining": len(list((folder / "labelsTr").iterdir())), "file_ending": ".nii.gz"}))
    return folder


def _units(patients=7, per_patient=(3, 5, 7, 2, 7, 6, 6)) -> list[Unit]:
    names = [f"chd_{1001 + p}_{10 * s + 1}" for p in range(patients) for s in range(per_patient[p])]
    return make_units(names, {})


# --------------------------------------------------------------------------------------------- splits
def test_patient_ids_from_case_names():
    assert patient_ids(["chd_1001_179", "chd_1001_63", "chd_1002_5"]) == {
        "chd_1001_179": "chd_1001", "chd_1001_63": "chd_1001", "chd_1002_5": "chd_1002"}
    assert patient_ids(["chd_1001_179", "scan"]) is None  # one name without a slice suffix: no ids at all
    units = make_units([], {"mscmr_01": [2, 3], "mscmr_02": [0]})
    assert [(u.name, u.patient) for u in units] == [("mscmr_01_z002", "mscmr_01"), ("mscmr_01_z003", "mscmr_01"),
                                                    ("mscmr_02_z000", "mscmr_02")]
    assert default_split_mode(units) == "patient"
    assert default_split_mode(make_units(["a", "b"], {})) == "slice"


def test_patient_split_never_shares_patients_and_subsets_are_nested():
    units = _units()
    split = make_split(units, "patient", 1 / 3, max_size=20)
    test_patients = {u.patient for u in split.test}
    train_patients = {u.patient for u in split.pool}
    assert test_patients and not test_patients & train_patients
    assert set(split.test) | set(split.pool) == set(units) and not set(split.test) & set(split.pool)
    assert len(split.test) >= round(len(units) / 3)
    previous: set = set()
    for size in (4, 8, 12, 16, 20):
        subset = split.training_subset(size)
        assert len(subset) == len(set(subset)) == size
        assert previous <= set(subset)          # nested: the 4 are inside the 8, ...
        assert not set(subset) & set(split.test)
        previous = set(subset)
    # round-robin pool order: 4 slices come from 4 different patients when there are that many
    assert len({u.patient for u in split.training_subset(4)}) == 4


def test_split_is_fixed_whatever_the_order_sizes_or_callers():
    units = _units()
    a = make_split(units, "patient", 1 / 3, max_size=4)
    b = make_split(list(reversed(units)), "patient", 1 / 3, max_size=20)
    assert a.test == b.test and a.pool == b.pool
    c = make_split(units, "patient", 1 / 3, seed=1)
    assert c.test != a.test or c.pool != a.pool  # the seed, not chance, fixes it


def test_slice_split_sizes_and_disjointness():
    units = _units()
    split = make_split(units, "slice", 0.25, max_size=20)
    assert len(split.test) == round(0.25 * len(units))
    assert not set(split.test) & set(split.pool)
    assert set(split.training_subset(8)) <= set(split.training_subset(12))
    # slices of a test patient may train in this mode (the paper's kind of partition)
    assert {u.patient for u in split.test} & {u.patient for u in split.pool}


def test_split_errors_name_the_fix():
    units = _units()
    with pytest.raises(NNSAMError, match="--sizes"):
        make_split(units, "patient", 1 / 3, max_size=30)
    with pytest.raises(NNSAMError, match="--split slice"):
        make_split(make_units(["a", "b", "c"], {}), "patient")
    with pytest.raises(NNSAMError, match="test-fraction"):
        make_split(units, "slice", 1.0)
    split = make_split(units, "patient", 1 / 3)
    with pytest.raises(NNSAMError, match="does not fit"):
        split.training_subset(len(split.pool) + 1)


def test_evenly_spaced_annotation():
    labelled = list(range(2, 14))
    for k in (1, 2, 3, 4):
        picks = evenly_spaced(labelled, k)
        assert len(picks) == k and set(picks) <= set(labelled)
        assert picks[0] != labelled[0] and picks[-1] != labelled[-1]  # ends avoided
    assert evenly_spaced([0, 1, 2, 3, 4, 5, 6, 7], 2) == [2, 6]
    with pytest.raises(NNSAMError):
        evenly_spaced([3, 4], 2)  # nothing left to score


def test_real_chd_patient_split(chd_dataset):
    info = bdata.read_dataset(chd_dataset)
    units = info.units()
    assert len(units) == 36 and default_split_mode(units) == "patient"
    split = make_split(units, "patient", 1 / 3, max_size=20)
    assert not {u.patient for u in split.test} & {u.patient for u in split.training_subset(20)}


# --------------------------------------------------------------------------------------------- data
def test_downsample_keeps_physical_geometry():
    image = sitk.GetImageFromArray(np.arange(64, dtype=np.float32).reshape(1, 8, 8))
    image.SetSpacing((0.5, 0.5, 3.0))
    image.SetOrigin((1.0, 2.0, 3.0))
    labels = sitk.GetImageFromArray(np.kron(np.array([[1, 2], [3, 0]], np.uint8), np.ones((4, 4), np.uint8))[None])
    labels.CopyInformation(image)
    small, small_labels = bdata.downsample(image, labels, 2)
    assert small.GetSize() == small_labels.GetSize() == (4, 4, 1)
    assert small.GetSpacing() == pytest.approx((1.0, 1.0, 3.0))
    assert small.GetOrigin() == pytest.approx((1.25, 2.25, 3.0))  # centre of the first 2x2 block
    assert small_labels.GetOrigin() == pytest.approx(small.GetOrigin())
    assert sitk.GetArrayFromImage(small)[0, 0, 0] == pytest.approx((0 + 1 + 8 + 9) / 4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(small_labels)[0],
                                  np.kron(np.array([[1, 2], [3, 0]]), np.ones((2, 2))))


def test_unit_store_cuts_volume_slices_in_place(tmp_path):
    ds = _write_dataset(tmp_path / "Dataset990_Vol", volumes={"vol_01": (6, [1, 2, 4])})
    info = bdata.read_dataset(ds)
    assert info.volumes == {"vol_01": [1, 2, 4]} and info.slice_cases == []
    store = bdata.UnitStore(info, tmp_path / "data")
    unit = Unit("vol_01", 4, "vol_01")
    store.prepare_unit(unit)
    image, labels = store.read(unit.name)
    full = sitk.ReadImage(str(info.image_path("vol_01")))
    assert image.GetSize() == (48, 48, 1)
    assert image.GetOrigin() == pytest.approx(full.TransformIndexToPhysicalPoint((0, 0, 4)))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels)[0],
                                  sitk.GetArrayFromImage(sitk.ReadImage(str(info.label_path("vol_01"))))[4])
    raw = store.write_training_dataset(tmp_path / "raw", [unit])
    assert json.loads((raw / "dataset.json").read_text())["labels"] == {"background": 0, "disk": 1, "square": 2}
    assert (raw / "imagesTr" / "vol_01_z004_0000.nii.gz").is_file()


# --------------------------------------------------------------------------------------------- end to end
def _plan(**overrides) -> Plan:
    settings = Settings(protocol="slices", dataset="", iterations=1, split="patient", test_fraction=0.25,
                        device="cpu")
    values = dict(settings=settings, methods=["nnsam", "nnunet"], sizes=[2, 3], seeds=[0],
                  report_classes=["disk"])
    values.update(overrides)
    return Plan(**values)


@pytest.fixture(scope="module")
def finished_report(tmp_path_factory):
    """The real harness (fine_tune, Segmenter, evaluation) on 12 tiny slices: 2 methods x 2 sizes x 1 seed."""
    root = tmp_path_factory.mktemp("bench")
    ds = _write_dataset(root / "Dataset991_Syn")
    plan = _plan()
    plan.settings.dataset = str(ds.resolve())
    lines: list[str] = []
    result = run_slices_benchmark(ds, root / "report", plan, log=lines.append, command="nnsam benchmark (test)")
    return ds, root / "report", result, lines


def test_end_to_end_writes_every_output(finished_report):
    _, report_dir, result, _ = finished_report
    assert result["trained"] == 4
    for name in ("report.md", "results.csv", "dice_vs_size.png", "examples.png", "benchmark.json"):
        assert (report_dir / name).is_file() and (report_dir / name).stat().st_size > 0, name
    for name in ("dice_vs_size.png", "examples.png"):
        assert (report_dir / name).stat().st_size < 300_000
        assert (report_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (report_dir / "report.md").read_text()
    assert "## Table 1: mean over disk" in text and "Table 2" in text and "Table 3" in text
    assert "| nnSAM |" in text and "| nnU-Net |" in text
    assert "Other classes (not in the means above): square" in text
    assert "Paired Dice differences" in text and "nnsam benchmark (test)" in text
    assert "Partial results" not in text
    # what the nnsam runs actually used: LiteMedSAM's default input, the authors' 1/8 skip, the default share
    assert ("(SAM input `unit-range`, injected at the 1/8 skip, embeddings recomputed at a share 0.1 of the training "
            "steps)") in text

    split = result["split"]
    test_names = {u.name for u in split.test}
    with open(report_dir / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    # every (method, size) scored every test slice for both classes, and only test slices
    assert {(r["method"], r["size"]) for r in rows} == {("nnsam", "2"), ("nnunet", "2"), ("nnsam", "3"), ("nnunet", "3")}
    assert {r["unit"] for r in rows} == test_names
    assert len(rows) == 4 * len(test_names) * 2
    for row in rows:
        if row["dice"]:
            assert 0.0 <= float(row["dice"]) <= 100.0

    for method in ("nnsam", "nnunet"):
        for size in (2, 3):
            metrics = json.loads((report_dir / "runs" / method / f"n{size:02d}_seed0" / "metrics.json").read_text())
            # every method of one size trained on the same slices, and never on a test slice
            assert metrics["train_units"] == [u.name for u in split.training_subset(size)]
            assert not set(metrics["train_units"]) & test_names
            assert metrics["iterations"] == 1
            assert (metrics["nnsam_config"] is None) == (method == "nnunet")
            preds = report_dir / "runs" / method / f"n{size:02d}_seed0" / "predictions"
            assert {p.name[:-7] for p in preds.glob("*.nii.gz")} == test_names
            assert not (preds.parent / "model").exists()  # models are deleted unless --keep-models


def test_second_invocation_does_not_retrain(finished_report, monkeypatch):
    ds, report_dir, _, _ = finished_report
    import nnsam_core.finetune as finetune

    calls = []
    monkeypatch.setattr(finetune, "fine_tune", lambda **kw: calls.append(kw))
    markers = sorted(report_dir.glob("runs/*/*/metrics.json"))
    stamps = [p.stat().st_mtime_ns for p in markers]
    plan = _plan()
    plan.settings.dataset = str(ds.resolve())
    lines: list[str] = []
    result = run_slices_benchmark(ds, report_dir, plan, log=lines.append, command="again")
    assert calls == [] and result["trained"] == 0
    assert [p.stat().st_mtime_ns for p in markers] == stamps
    assert sum("finished earlier, skipped" in line for line in lines) == 4
    state = json.loads((report_dir / "benchmark.json").read_text())
    assert [inv["command"] for inv in state["invocations"]][-1] == "again"


def test_resume_refuses_other_settings(finished_report):
    ds, report_dir, _, _ = finished_report
    plan = _plan()
    plan.settings.dataset = str(ds.resolve())
    plan.settings.iterations = 2
    with pytest.raises(NNSAMError, match="another -o REPORT_DIR"):
        run_slices_benchmark(ds, report_dir, plan, log=lambda _: None)


def test_sam_input_is_a_setting_of_the_nnsam_methods(finished_report):
    ds, report_dir, _, _ = finished_report
    plan = _plan()
    plan.settings.dataset = str(ds.resolve())
    assert "sam_input" not in plan.settings.comparable()  # default: folders written before the setting still match
    assert plan.settings.sam_input is None
    from nnsam_core.training.nnsam import nnUNetTrainerNNSAM
    from nnsam_core.training.registry import config_of_trainer
    assert plan.settings.nnsam_config("nnsam") == config_of_trainer(nnUNetTrainerNNSAM)  # the default share only
    plan.settings.sam_input = "unit-range"
    assert plan.settings.nnsam_config("nnunet") is None
    config = plan.settings.nnsam_config("nnsam-random")
    assert (config.sam_input, config.pretrained) == ("unit-range", False)
    with pytest.raises(NNSAMError, match="another -o REPORT_DIR"):
        run_slices_benchmark(ds, report_dir, plan, log=lambda _: None)


def test_inject_stride_is_a_setting_of_the_nnsam_methods(finished_report):
    ds, report_dir, _, _ = finished_report
    plan = _plan()
    plan.settings.dataset = str(ds.resolve())
    assert "inject_stride" not in plan.settings.comparable()
    plan.settings.inject_stride = 2
    config = plan.settings.nnsam_config("nnsam")
    assert (config.inject_stride, config.pretrained, config.sam_input) == (2, True, "unit-range")
    assert plan.settings.nnsam_config("nnsam-random").inject_stride == 2
    assert plan.settings.nnsam_config("nnunet") is None
    with pytest.raises(NNSAMError, match="another -o REPORT_DIR"):  # runs at 1/8 are not mixed with runs at 1/2
        run_slices_benchmark(ds, report_dir, plan, log=lambda _: None)


def test_report_marks_missing_runs_as_partial(finished_report, tmp_path):
    import shutil
    from nnsam_lab.benchmark.report import write_report

    _, report_dir, _, _ = finished_report
    copy = tmp_path / "copy"
    shutil.copytree(report_dir, copy)
    shutil.rmtree(copy / "runs" / "nnunet" / "n03_seed0")
    text = write_report(copy)["report"].read_text()
    assert "Partial results:" in text and "nnunet 3 0" in text


def test_report_compares_nnsam_with_its_random_encoder_control(finished_report, tmp_path):
    import shutil
    from nnsam_lab.benchmark.report import write_report

    _, report_dir, _, _ = finished_report
    copy = tmp_path / "copy"
    shutil.copytree(report_dir, copy)
    # a stand-in control run: nnU-Net's scores under the control's name, so nnSAM - control = nnSAM - nnU-Net
    shutil.copytree(copy / "runs" / "nnunet", copy / "runs" / "nnsam-random")
    for path in (copy / "runs" / "nnsam-random").glob("*/metrics.json"):
        path.write_text(path.read_text().replace('"method": "nnunet"', '"method": "nnsam-random"'))
    text = write_report(copy)["report"].read_text()
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| nnSAM | ")]
    against_nnunet = {row[2]: row[3] for row in rows if row[1] == "nnU-Net"}
    against_control = {row[2]: row[3] for row in rows if row[1].startswith("nnSAM (random encoder) (is the gain")}
    assert against_nnunet and against_control == against_nnunet


def _scored_run(method, dice_by_item, seed=0):
    """A finished run of size 4 as the report reads it: class 1 (LV) scored per item, class 2 (RV) at Dice 0."""
    return {"method": method, "size": 4, "seed": seed,
            "scores": [{"item": item,
                        "classes": {"1": {"dice": d, "asd_mm": 1.0}, "2": {"dice": 0.0, "asd_mm": 1.0}}}
                       for item, d in dice_by_item.items()]}


def test_paired_differences_count_patients_by_their_mean_difference():
    from nnsam_lab.benchmark.report import Results

    base = {"a1": 50.0, "a2": 50.0, "a3": 50.0, "b1": 50.0}
    better = {"a1": 60.0, "a2": 49.0, "a3": 49.0, "b1": 45.0}  # patient a: +10, -1, -1 (mean +2.7); b: -5
    patients = {"a1": "a", "a2": "a", "a3": "a", "b1": "b"}
    paired = Results([_scored_run("nnsam", better), _scored_run("nnunet", base)], ["LV"], ["LV"], patients).paired(
        "nnsam", "nnunet", 4)
    assert (paired["better"], paired["worse"], paired["n"]) == (1, 3, 4)
    assert (paired["patients_better"], paired["patients_worse"], paired["patients"]) == (1, 1, 2)
    assert paired["mean"] == pytest.approx(0.75)
    assert Results([_scored_run("nnsam", better), _scored_run("nnunet", base)], ["LV"], ["LV"]).paired(
        "nnsam", "nnunet", 4)["patients"] == 0


def test_seed_means_and_their_spread_are_reported_where_a_method_ran_several_seeds():
    from nnsam_lab.benchmark.report import Results, _seed_section

    runs = [_scored_run("nnsam", {"a": 40.0, "b": 60.0}, seed=0),
            _scored_run("nnsam", {"a": 30.0, "b": float("nan")}, seed=1),
            _scored_run("nnsam-recomputed", {"a": 20.0, "b": 20.0}, seed=0)]
    results = Results(runs, ["LV", "RV"], ["LV"])
    assert results.seed_means("nnsam", 4) == {0: 50.0, 1: 30.0}  # headline LV only; an unscored item is skipped
    rows = [line.split(" | ") for line in _seed_section(results, [4]) if line.startswith("| nnSAM | ")]
    assert rows == [["| nnSAM", "4", "0, 1", "50.00, 30.00", "40.00 ± 14.14 |"]]
    # one seed: no spread to show
    assert _seed_section(Results(runs[2:], ["LV", "RV"], ["LV"]), [4]) == []


def test_report_of_a_folder_copied_without_its_data_skips_only_the_examples(finished_report, tmp_path):
    import shutil
    from nnsam_lab.benchmark.report import write_report

    _, report_dir, _, _ = finished_report
    copy = tmp_path / "copy"
    shutil.copytree(report_dir, copy, ignore=shutil.ignore_patterns("data", "examples.png"))
    paths = write_report(copy)
    text = paths["report"].read_text()
    assert "Table 1" in text and (copy / "dice_vs_size.png").is_file() and (copy / "results.csv").is_file()
    assert not (copy / "examples.png").exists() and "examples.png" not in text


# --------------------------------------------------------------------------------------------- in-volume
class _FakeBundle:
    manifest = {"training": {"iterations": 1, "batch_size": 2, "device": "cpu"}}


class _PerfectSegmenter:
    """Stands in for a trained model: the synthetic images encode their labels (100 per class)."""

    def __init__(self, bundle, device):
        pass

    def segment(self, image):
        labels = sitk.GetImageFromArray(np.rint(sitk.GetArrayFromImage(image) / 100).clip(0, 2).astype(np.uint8))
        labels.CopyInformation(image)
        return labels


def test_in_volume_protocol_trains_on_k_slices_and_scores_the_others(tmp_path, monkeypatch):
    import nnsam_core.finetune as finetune
    import nnsam_core.predict as predict

    ds = _write_dataset(tmp_path / "Dataset992_Vol", volumes={"vol_01": (9, [1, 2, 3, 4, 5, 6, 7]),
                                                              "vol_02": (8, [0, 1, 2, 3, 4, 5]),
                                                              "vol_03": (8, [2, 3])})
    calls = []

    def fake_fine_tune(**kwargs):
        calls.append(kwargs)
        Path(kwargs["output"]).mkdir(parents=True)
        return _FakeBundle()

    monkeypatch.setattr(finetune, "fine_tune", fake_fine_tune)
    monkeypatch.setattr(predict, "Segmenter", _PerfectSegmenter)
    settings = Settings(protocol="in-volume", dataset=str(ds.resolve()), iterations=1, device="cpu")
    plan = Plan(settings=settings, methods=["nnsam", "nnunet"], annotated=[2, 3], seeds=[0])
    result = run_in_volume_benchmark(ds, tmp_path / "report", plan, count=2, log=lambda _: None)
    # vol_03 has too few labelled slices for k=3 and is skipped; the other two are used
    assert result["volumes"] == ["vol_01", "vol_02"]
    assert len(calls) == 2 * 2 * 2
    for kwargs in calls:
        assert sorted(kwargs["slices"]) == kwargs["slices"] and kwargs["class_names"] == CLASSES
        assert kwargs["modality"] == "MRI"
        assert kwargs["resume"] is True  # a run killed mid-training continues from its checkpoint
    first = calls[0]
    assert first["method"] == "nnsam" and first["slices"] == evenly_spaced([1, 2, 3, 4, 5, 6, 7], 2)
    metrics = json.loads((tmp_path / "report/runs/nnunet/k3_seed0/vol_02/metrics.json").read_text())
    assert set(metrics["scored_slices"]) == {0, 1, 2, 3, 4, 5} - set(metrics["annotated_slices"])
    assert len(metrics["annotated_slices"]) == 3
    text = (tmp_path / "report" / "report.md").read_text()
    assert "in-volume protocol" in text and "| nnSAM | 100.00 ± 0.00 | 100.00 ± 0.00 |" in text
    assert (tmp_path / "report" / "examples.png").is_file() and (tmp_path / "report" / "dice_vs_size.png").is_file()


class _FakeParent:
    def __init__(self, path):
        self.bundle, self.path = _FakeBundle(), Path(path)

    def record(self):
        return {"name": self.path.name, "id": "parent-id"}


def _start_from_fakes(monkeypatch) -> list[dict]:
    """fine_tune writes a bundle marker and records what it started from; the saved model loads as a fake."""
    import nnsam_core.adapt as adapt
    import nnsam_core.finetune as finetune
    import nnsam_core.predict as predict

    calls = []

    def fake_fine_tune(**kwargs):
        calls.append(kwargs)
        Path(kwargs["output"]).mkdir(parents=True)
        (Path(kwargs["output"]) / "nnsam.json").write_text("{}")
        bundle = _FakeBundle()
        bundle.manifest = {"training": {**_FakeBundle.manifest["training"],
                                        "start_from": {"name": Path(kwargs["start_from"]).name}}}
        return bundle

    monkeypatch.setattr(finetune, "fine_tune", fake_fine_tune)
    monkeypatch.setattr(predict, "Segmenter", _PerfectSegmenter)
    monkeypatch.setattr(adapt, "load_parent", lambda path, *a: _FakeParent(path))
    return calls


def test_start_from_methods_adapt_a_saved_model_alone_and_in_a_chain(tmp_path, monkeypatch):
    calls = _start_from_fakes(monkeypatch)
    ds = _write_dataset(tmp_path / "Dataset995_Vol", volumes={"vol_01": (9, [1, 2, 3, 4, 5, 6, 7]),
                                                              "vol_02": (8, [0, 1, 2, 3, 4, 5]),
                                                              "vol_03": (8, [1, 3, 5, 6])})
    base = tmp_path / "base_model"
    settings = Settings(protocol="in-volume", dataset=str(ds.resolve()), device="cpu", learning_rate=0.002)
    plan = Plan(settings=settings, methods=["base-model", "adapt", "adapt-chained"], annotated=[1, 2], seeds=[0],
                start_from=str(base))
    report = tmp_path / "report"
    run_in_volume_benchmark(ds, report, plan, log=lambda _: None)
    # the saved model alone trains nothing; the two adapting methods train once per volume and k
    assert len(calls) == 2 * 2 * 3
    for kwargs in calls:
        assert "method" not in kwargs and "encoder" not in kwargs and "nnsam_config" not in kwargs
        assert kwargs["learning_rate"] == 0.002  # a schedule under study reaches every adapted run
    adapt_starts = [Path(c["start_from"]) for c in calls if "/adapt/" in str(c["output"])]
    assert adapt_starts == [base] * 6
    chained = [(Path(c["output"]).parent.name, Path(c["start_from"])) for c in calls
               if "/adapt-chained/" in str(c["output"]) and "/k2_seed0/" in str(c["output"])]
    runs = report / "runs" / "adapt-chained" / "k2_seed0"
    assert chained == [("vol_01", base), ("vol_02", runs / "vol_01" / "model"), ("vol_03", runs / "vol_02" / "model")]
    # a chained model is the next volume's start, so it is kept; the others go as --keep-models says
    assert (runs / "vol_03" / "model" / "nnsam.json").is_file()
    assert not (report / "runs" / "adapt" / "k2_seed0" / "vol_01" / "model").exists()
    # every method of one k is scored on the same slices, the saved model alone included
    for volume in ("vol_01", "vol_02", "vol_03"):
        scored = {m: json.loads((report / "runs" / m / "k2_seed0" / volume / "metrics.json").read_text())
                  for m in plan.methods}
        assert len({tuple(r["scored_slices"]) for r in scored.values()}) == 1
        assert scored["base-model"]["iterations"] == 0 and scored["base-model"]["train_seconds"] == 0
        assert scored["base-model"]["start_from"]["name"] == "base_model"
    state = json.loads((report / "benchmark.json").read_text())
    assert state["invocations"][-1]["start_from"] == str(base)
    # a report folder keeps one schedule: another learning rate is another study, an unset one is not compared
    assert settings.comparable() != replace(settings, learning_rate=0.01).comparable()
    assert "learning_rate" not in replace(settings, learning_rate=None).comparable()
    assert "| Adapted from the saved model |" in (report / "report.md").read_text()


def test_start_from_methods_are_refused_without_their_saved_model_or_chain(tmp_path, monkeypatch):
    _start_from_fakes(monkeypatch)
    ds = _write_dataset(tmp_path / "Dataset996_Vol", volumes={"vol_01": (6, [0, 2, 4]), "vol_02": (6, [1, 3, 5])})
    settings = Settings(protocol="in-volume", dataset=str(ds.resolve()), device="cpu")
    with pytest.raises(NNSAMError, match="add --start-from BUNDLE"):
        run_in_volume_benchmark(ds, tmp_path / "r", Plan(settings=settings, methods=["adapt"], annotated=[2]),
                                log=lambda _: None)
    with pytest.raises(NNSAMError, match="add one of them to --methods"):
        run_in_volume_benchmark(ds, tmp_path / "r", Plan(settings=settings, methods=["nnsam"], annotated=[2],
                                                         start_from="base"), log=lambda _: None)
    slices = Settings(protocol="slices", dataset=str(ds.resolve()), device="cpu")
    with pytest.raises(NNSAMError, match="in-volume protocol only"):
        run_slices_benchmark(ds, tmp_path / "r", Plan(settings=slices, methods=["base-model"], sizes=[2],
                                                      start_from="base"), log=lambda _: None)
    # a chain whose first volume's model is gone cannot continue on the second
    chain = lambda: Plan(settings=settings, methods=["adapt-chained"], annotated=[2], start_from="base")
    run_in_volume_benchmark(ds, tmp_path / "r2", chain(), log=lambda _: None)
    runs = tmp_path / "r2" / "runs" / "adapt-chained" / "k2_seed0"
    shutil.rmtree(runs / "vol_01" / "model")
    (runs / "vol_02" / "metrics.json").unlink()
    with pytest.raises(NNSAMError, match="run the chain's volumes in order"):
        run_in_volume_benchmark(ds, tmp_path / "r2", chain(), log=lambda _: None)


# --------------------------------------------------------------------------------------------- command line
def test_cli_help_and_dry_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["benchmark", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--split" in out and "--in-volume" in out and "nested" in out
    ds = _write_dataset(tmp_path / "Dataset993_Syn")
    assert main(["benchmark", str(ds), "-o", str(tmp_path / "r"), "--sizes", "2", "4", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "patient split" in out and "4 runs" in out
    assert not (tmp_path / "r").exists()  # a dry run writes nothing


def test_cli_user_errors_exit_2(tmp_path, capsys):
    assert main(["benchmark", str(tmp_path / "missing"), "-o", str(tmp_path / "r")]) == 2
    ds = _write_dataset(tmp_path / "Dataset994_Syn")
    assert main(["benchmark", str(ds), "-o", str(tmp_path / "r"), "--sizes", "50", "--dry-run"]) == 2
    assert main(["benchmark", str(ds), "-o", str(tmp_path / "r"), "--sizes", "2", "--classes", "LV", "--dry-run"]) == 2
    assert main(["benchmark", str(ds), "-o", str(tmp_path / "r"), "--recompute-share", "-1", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "--sizes" in err and "LV" in err
    assert "--recompute-share must be 0 to 1 (a share of the training steps), not -1" in err
    assert not (tmp_path / "r").exists()


def test_processes_sharing_a_report_folder_record_every_invocation(tmp_path):
    """Several benchmark processes (e.g. one per method on a GPU machine) may start on one report folder at
    once; each invocation must be recorded and benchmark.json never be torn."""
    import multiprocessing

    from nnsam_lab.benchmark.runner import load_state

    methods = ("nnsam", "nnunet", "nnsam-random", "nnsam-recomputed")
    ctx = multiprocessing.get_context("spawn")
    start_together = ctx.Barrier(len(methods))
    procs = [ctx.Process(target=_record_invocations, args=(str(tmp_path), m, start_together)) for m in methods]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert all(p.exitcode == 0 for p in procs)
    state = load_state(tmp_path)
    recorded = sorted(i["methods"][0] for i in state["invocations"])
    assert recorded == sorted(list(methods) * INVOCATIONS_PER_PROCESS)
    assert not list(tmp_path.glob(".*partial"))


INVOCATIONS_PER_PROCESS = 40


def _record_invocations(report_dir: str, method: str, start_together) -> None:
    from nnsam_lab.benchmark.runner import init_state

    settings = Settings(protocol="slices", dataset="/data/Dataset901_CHD", split="patient", test_fraction=0.33)
    plan = Plan(settings=settings, methods=[method], sizes=[4])
    start_together.wait(240)
    for _ in range(INVOCATIONS_PER_PROCESS):
        init_state(Path(report_dir), plan, {"dataset_name": "Dataset901_CHD"}, f"nnsam benchmark --methods {method}")


def test_benchmark_folders_never_mix_runs_from_before_the_default_changed(tmp_path):
    from nnsam_lab.benchmark.runner import Plan, Settings, init_state

    def plan(methods, share=None):
        return Plan(settings=Settings(protocol="slices", dataset="/d", split="patient", test_fraction=0.25,
                                      recompute_share=share), methods=methods, sizes=[4])

    assert plan(["nnsam"]).settings.recompute_share == 0.1       # recorded even when it is the default
    assert plan(["nnsam"]).settings.nnsam_config("nnsam-recomputed") is None  # its trainer as it is: no share
    assert plan(["nnsam"], share=0.25).settings.nnsam_config("nnsam").recompute_share == 0.25
    # a folder written while the default was the cache alone recorded no share
    init_state(tmp_path, plan(["nnsam"]), {}, "old")
    state = json.loads((tmp_path / "benchmark.json").read_text())
    del state["settings"]["recompute_share"]
    (tmp_path / "benchmark.json").write_text(json.dumps(state))
    with pytest.raises(NNSAMError, match=r"another -o REPORT_DIR \(or --recompute-share 0 to continue it\)"):
        init_state(tmp_path, plan(["nnsam", "nnunet"]), {}, "today's default")
    init_state(tmp_path, plan(["nnsam"], share=0.0), {}, "as it was")
    init_state(tmp_path, plan(["nnunet"]), {}, "nnunet alone does not depend on it")
    commands = [i["command"] for i in json.loads((tmp_path / "benchmark.json").read_text())["invocations"]]
    assert commands == ["old", "as it was", "nnunet alone does not depend on it"]


def test_the_sam_branch_line_describes_only_runs_that_have_one():
    from nnsam_lab.benchmark.report import _sam_branch

    runs = [{"method": "fill-between"}, {"method": "nnunet"},
            {"method": "nnsam", "nnsam_config": {"sam_input": "unit-range", "inject_stride": 8,
                                                 "recompute_share": 0.1}}]
    line = _sam_branch(runs)
    assert "`unit-range`" in line and "`nnunet`" not in line and "share 0.1 of" in line and "0 or" not in line
