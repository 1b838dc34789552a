"""The clinician's baseline in the in-volume benchmark: fill between slices (ITK's morphological contour
interpolation), sparse volumes from one-slice cases, the 3D Dice report, and the benchmark end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnsam_lab.benchmark import data as bdata
from nnsam_lab.benchmark.fill import BENCH_METHODS, FILL_BETWEEN, fill_between
from nnsam_lab.benchmark.report import VolumeResults, slice_region, volume_scores, write_report
from nnsam_lab.benchmark.runner import Plan, Settings, run_in_volume_benchmark
from nnsam_lab.benchmark.splits import sparse_volumes
from nnsam_lab.cli import main
from nnsam_core.methods import METHODS

from test_benchmark import _FakeBundle, _PerfectSegmenter, _write_dataset

LAB = Path(__file__).resolve().parents[2] / "lab"
REPO = LAB.parent


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int(np.logical_and(a, b).sum()) / total if total else float("nan")


def _sphere(depth=41, side=64, radius=18) -> np.ndarray:
    zz, yy, xx = np.mgrid[:depth, :side, :side]
    return ((zz - depth // 2) ** 2 + (yy - side / 2) ** 2 + (xx - side / 2) ** 2 <= radius ** 2).astype(np.uint8)


# --------------------------------------------------------------------------------------------- fill between
def test_fill_between_recovers_a_sphere_from_three_painted_slices():
    sphere = _sphere()
    painted = [10, 20, 30]
    filled = fill_between(sphere, painted)
    for k in painted:  # the painting as it was
        np.testing.assert_array_equal(filled[k], sphere[k])
    for k in range(painted[0] + 1, painted[-1]):
        if k not in painted:
            assert _dice(filled[k] == 1, sphere[k] == 1) > 0.9, k
    # nothing outside the painted range, although the sphere goes on there
    assert sphere[:10].any() and sphere[31:].any()
    assert not filled[:10].any() and not filled[31:].any()
    # only the painted slices were read: the answer does not depend on the unpainted ground truth
    hidden = sphere.copy()
    hidden[[k for k in range(len(sphere)) if k not in painted]] = 0
    np.testing.assert_array_equal(fill_between(hidden, painted), filled)


def test_a_structure_absent_from_one_painted_slice_is_bridged_across_it():
    """ITK's filter interpolates each label between the painted slices that hold it: a structure painted on slices
    2 and 10 but absent from the painted slice 6 is bridged from 2 to 10; slice 6 keeps its painting (without it)."""
    labels = np.zeros((13, 32, 32), np.uint8)
    for k in (2, 6, 10):
        labels[k, 4:12, 4:12] = 1
    for k in (2, 10):
        labels[k, 18:26, 18:26] = 2
    filled = fill_between(labels, [2, 6, 10])
    for k in (3, 4, 5, 7, 8, 9):
        assert (filled[k] == 2).sum() == 64, k            # bridged across the slice where it is absent
        assert _dice(filled[k] == 1, labels[2] == 1) == 1.0
    np.testing.assert_array_equal(filled[6], labels[6])   # painted slice unchanged: no label 2 written on it
    assert not filled[:2].any() and not filled[11:].any()


def test_fill_between_places_sparse_slices_at_their_real_distance():
    """A cone (radius growing half a pixel a slice) kept at slices 2, 6, 18 and 22, painted at 2 and 22: the slices
    6 and 18 get the interpolation at 4 and 16 slices from the first painted one (what the full grid gives), which
    matches the cone; the same stack read as evenly spaced puts slice 6 a third of the way and misses it."""
    zz, yy, xx = np.mgrid[:25, :64, :64]
    cone = ((yy - 32) ** 2 + (xx - 32) ** 2 <= (8 + zz / 2) ** 2).astype(np.uint8)
    positions = [2, 6, 18, 22]
    stack = cone[positions]
    filled = fill_between(stack, [0, 3], positions)
    reference = fill_between(cone, [2, 22])
    np.testing.assert_array_equal(filled[1], reference[6])
    np.testing.assert_array_equal(filled[2], reference[18])
    evenly = fill_between(stack, [0, 3])  # the same stack read as slices 0, 1, 2, 3
    for k, z in ((1, 6), (2, 18)):
        assert _dice(filled[k] == 1, cone[z] == 1) > 0.9
    assert _dice(evenly[1] == 1, cone[6] == 1) < 0.8
    with pytest.raises(ValueError, match="increasing"):
        fill_between(stack, [0, 3], [10, 20, 20, 30])


def test_a_process_that_ran_fill_between_beside_simpleitk_exits_cleanly(tmp_path):
    """ITK and SimpleITK loaded in one process abort at interpreter exit; the lab keeps ITK in a worker process,
    and both it and the process using it (with SimpleITK, as the benchmark) end with status 0."""
    code = ("import numpy as np, SimpleITK as sitk\n"
            "from nnsam_lab.benchmark.fill import close_itk, fill_between\n"
            "a = np.zeros((5, 16, 16), np.uint8); a[0, 4:8, 4:8] = 1; a[4, 5:10, 5:10] = 1\n"
            "image = sitk.GetImageFromArray(fill_between(a, [0, 4]))\n"
            f"sitk.WriteImage(image, {str(tmp_path / 'filled.nii.gz')!r})\n"
            "print(int(sitk.GetArrayFromImage(image)[2].sum()), 'itk' in __import__('sys').modules)\n"
            "print(close_itk())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": f"{LAB}:{REPO}", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    voxels, itk_here, worker_status = done.stdout.split()
    assert int(voxels) > 0 and itk_here == "False" and worker_status == "0"


def test_fill_between_is_the_labs_method_only():
    assert FILL_BETWEEN not in METHODS
    assert BENCH_METHODS == METHODS + (FILL_BETWEEN,)


# --------------------------------------------------------------------------------------------- sparse volumes
def test_one_slice_cases_group_into_one_sparse_volume_per_patient():
    cases = ["chd_1001_179", "chd_1001_63", "chd_1001_185", "chd_1004_216", "chd_1004_128"]
    groups = sparse_volumes(cases)
    assert groups == {"chd_1001": [(63, "chd_1001_63"), (179, "chd_1001_179"), (185, "chd_1001_185")],
                      "chd_1004": [(128, "chd_1004_128"), (216, "chd_1004_216")]}  # by number, not by name
    assert sparse_volumes(["chd_1001_179", "scan"]) is None


def _write_slices(folder: Path, slices: dict[str, np.ndarray], spacing=(0.7, 0.7, 1.0)) -> Path:
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir(parents=True)
    for name, labels in slices.items():
        for sub, array in (("imagesTr", labels.astype(np.float32) * 100), ("labelsTr", labels)):
            image = sitk.GetImageFromArray(array[None])
            image.SetSpacing(spacing)
            sitk.WriteImage(image, str(folder / sub / (f"{name}_0000.nii.gz" if sub == "imagesTr" else
                                                       f"{name}.nii.gz")))
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "ball": 1}, "numTraining": len(slices),
        "file_ending": ".nii.gz"}))
    return folder


def test_sparse_volume_stacks_a_patients_slices_in_slice_order(tmp_path):
    sphere = _sphere()
    slices = {f"pat_7_{z}": sphere[z] for z in (10, 20, 23, 30, 12)}
    slices["pat_8_3"] = sphere[20]
    slices["pat_8_5"] = np.zeros_like(sphere[0])  # an unlabelled slice is not a labelled slice of its volume
    info = bdata.with_sparse_volumes(bdata.read_dataset(_write_slices(tmp_path / "Dataset995_Sparse", slices)))
    assert info.positions == {"pat_7": [10, 12, 20, 23, 30], "pat_8": [3, 5]}
    assert info.members["pat_7"] == ["pat_7_10", "pat_7_12", "pat_7_20", "pat_7_23", "pat_7_30"]
    assert info.volumes == {"pat_7": [0, 1, 2, 3, 4], "pat_8": [0]}
    store = bdata.UnitStore(info, tmp_path / "data")
    store.prepare_volume("pat_7")
    image, labels = store.read("pat_7")
    assert labels.GetSize() == (64, 64, 5) and image.GetSpacing() == pytest.approx((0.7, 0.7, 1.0))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), sphere[[10, 12, 20, 23, 30]])


def test_in_volume_protocol_on_one_slice_cases_scores_each_patients_unpainted_slices(tmp_path):
    sphere = _sphere()
    slices = {f"pat_7_{z}": sphere[z] for z in (10, 14, 20, 23, 30)}
    slices.update({f"pat_9_{z}": sphere[z] for z in (12, 16, 20, 28)})
    ds = _write_slices(tmp_path / "Dataset996_Sparse", slices)
    settings = Settings(protocol="in-volume", dataset=str(ds.resolve()), device="cpu")
    plan = Plan(settings=settings, methods=[FILL_BETWEEN], annotated=[2])
    result = run_in_volume_benchmark(ds, tmp_path / "report", plan, log=lambda _: None)
    assert result["volumes"] == ["pat_7", "pat_9"]
    metrics = json.loads((tmp_path / "report/runs/fill-between/k2_seed0/pat_7/metrics.json").read_text())
    assert metrics["slice_positions"] == [10, 14, 20, 23, 30] and metrics["annotated_slices"] == [1, 3]
    assert metrics["scored_slices"] == [0, 2, 4]
    prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "report/runs/fill-between/k2_seed0/pat_7/"
                                                            "prediction.nii.gz")))
    # slice 20 of the scan, 6 slices from the painted 14 and 3 from the painted 23
    np.testing.assert_array_equal(prediction[2], fill_between(sphere, [14, 23])[20])
    assert not prediction[0].any() and not prediction[4].any()
    state = json.loads((tmp_path / "report/benchmark.json").read_text())
    assert state["positions"]["pat_9"] == [12, 16, 20, 28]
    assert "Sparse volumes" in (tmp_path / "report/report.md").read_text()


# --------------------------------------------------------------------------------------------- the report
def _slice(k, per_class):
    """A scored slice as a run records it: per class (gt voxels, pred voxels, shared voxels)."""
    classes = {}
    for value, (g, p, i) in per_class.items():
        classes[value] = {"dice": 200.0 * i / (g + p) if g + p else float("nan"), "asd_mm": 1.0,
                          "gt_voxels": g, "pred_voxels": p}
    return {"item": "v", "k": k, "classes": classes}


def test_3d_dice_per_structure_pools_the_voxels_of_the_unpainted_slices():
    rng = np.random.default_rng(3)
    gt = rng.integers(0, 3, (9, 12, 12)) * (rng.random((9, 12, 12)) < 0.5)
    pred = np.where(rng.random(gt.shape) < 0.8, gt, rng.integers(0, 3, gt.shape))
    gt[5] = np.where(gt[5] == 2, 0, gt[5])     # structure 2 absent from slice 5, where the prediction has a blob
    pred[5, :3, :3] = 2
    annotated = [2, 6]
    scored = [0, 1, 3, 4, 5, 7, 8]
    run = {"annotated_slices": annotated, "scores": [
        _slice(k, {str(v): (int((gt[k] == v).sum()), int((pred[k] == v).sum()),
                            int(((gt[k] == v) & (pred[k] == v)).sum())) for v in (1, 2)}) for k in scored]}
    scores = volume_scores(run, ["1", "2"], ["1", "2"])
    for region, ks in (("all", scored), ("inside", [3, 4, 5]), ("outside", [0, 1, 7, 8])):
        direct = [100 * _dice(gt[ks] == v, pred[ks] == v) for v in (1, 2)]
        assert [scores["dice3d"][region][v] for v in ("1", "2")] == pytest.approx(direct)
        assert scores["dice3d"][region]["headline"] == pytest.approx(np.mean(direct))
        assert scores["slices"][region] == len(ks)
        per_slice = [np.nanmean([100 * _dice(gt[k] == v, pred[k] == v) for v in (1, 2)]) for k in ks]
        assert scores["dice2d"][region] == pytest.approx(np.mean(per_slice))
    # the stray blob costs the slice-level mean a whole 0 on slice 5, the pooled 3D Dice only its voxels
    assert run["scores"][4]["classes"]["2"]["dice"] == 0.0
    assert [slice_region(k, annotated) for k in (1, 2, 3, 5, 6, 7)] == ["outside", "outside", "inside", "inside",
                                                                          "outside", "outside"]


def _volume_run(method, volume, annotated, slices, train=10.0, seconds=2.0):
    return {"protocol": "in-volume", "method": method, "size": len(annotated), "seed": 0, "volume": volume,
            "annotated_slices": annotated, "train_seconds": train, "predict_seconds": seconds,
            "scores": [{**_slice(k, {"1": c}), "item": volume} for k, c in slices.items()]}


def test_volume_results_compare_every_method_with_fill_between():
    runs = [_volume_run(FILL_BETWEEN, "a", [2, 6], {4: (10, 10, 10), 8: (10, 0, 0)}, train=0.0, seconds=0.1),
            _volume_run("nnsam", "a", [2, 6], {4: (10, 10, 8), 8: (10, 10, 5)}),
            _volume_run(FILL_BETWEEN, "b", [2, 6], {4: (10, 10, 6)}, train=0.0, seconds=0.3),
            _volume_run("nnsam", "b", [2, 6], {4: (10, 10, 4)}, train=30.0)]
    vr = VolumeResults(runs, ["LV"], ["LV"])
    fill_a = 100 * 20 / 30          # 3D: (10 + 0) shared of (20 gt + 10 pred)
    nnsam_a = 100 * 26 / 40
    assert vr.value((FILL_BETWEEN, 2, 0, "a"), "dice3d") == pytest.approx(fill_a)
    p = vr.paired("nnsam", FILL_BETWEEN, 2, "dice3d")
    assert p["n"] == 2 and p["mean"] == pytest.approx(((nnsam_a - fill_a) + (40 - 60)) / 2)
    assert (p["better"], p["worse"]) == (0, 2)
    outside = vr.paired("nnsam", FILL_BETWEEN, 2, "dice3d", "outside")
    assert outside["n"] == 1 and outside["mean"] == pytest.approx(50.0)  # volume b has no slice outside
    assert vr.cell(FILL_BETWEEN, 2, "dice3d", "outside")[2] == 1
    assert vr.time_cell("nnsam", 2)["total"][0] == pytest.approx(22.0)
    assert vr.time_cell(FILL_BETWEEN, 2)["train"][0] == 0.0


def test_in_volume_report_leads_with_3d_dice_and_compares_with_fill_between(tmp_path, monkeypatch):
    """End to end with fill-between and a stand-in network (the synthetic images encode their labels)."""
    import nnsam_core.finetune as finetune
    import nnsam_core.predict as predict

    ds = _write_dataset(tmp_path / "Dataset997_Vol", volumes={"vol_01": (9, [1, 2, 3, 4, 5, 6, 7]),
                                                              "vol_02": (8, [0, 1, 2, 3, 4, 5])})

    def fake_fine_tune(**kwargs):
        Path(kwargs["output"]).mkdir(parents=True)
        return _FakeBundle()

    monkeypatch.setattr(finetune, "fine_tune", fake_fine_tune)
    monkeypatch.setattr(predict, "Segmenter", _PerfectSegmenter)
    settings = Settings(protocol="in-volume", dataset=str(ds.resolve()), iterations=1, device="cpu")
    plan = Plan(settings=settings, methods=["nnunet", FILL_BETWEEN], annotated=[2, 3], report_classes=["disk"])
    run_in_volume_benchmark(ds, tmp_path / "report", plan, log=lambda _: None)
    text = (tmp_path / "report" / "report.md").read_text()
    headline = text.index("## Headline: 3D Dice per structure")
    assert headline < text.index("## Table 1")
    assert "| Method | 2 annotated: 3D Dice | 2 annotated: 2D per-slice |" in text
    assert "| nnU-Net | 100.00 ± 0.00 | 100.00 ± 0.00 |" in text   # the stand-in is perfect
    assert "### Inside and outside the annotated range" in text
    assert "### Paired differences against fill between slices" in text
    assert "### Time per run" in text and "### Per volume" in text
    per_volume = text[text.index("### Per volume"):].splitlines()
    assert any(line.startswith("| vol_01 |") for line in per_volume)
    assert any(line.startswith("| vol_02 |") for line in per_volume)
    # the synthetic shapes move from slice to slice, so interpolating them gives little, and outside nothing
    vr = VolumeResults([json.loads(p.read_text()) for p in (tmp_path / "report/runs").glob("**/metrics.json")],
                       CLASSES, ["disk"])
    assert vr.cell(FILL_BETWEEN, 2, "dice3d", "outside")[0] == 0.0
    assert vr.paired("nnunet", FILL_BETWEEN, 2, "dice3d")["mean"] > 0
    metrics = json.loads((tmp_path / "report/runs/fill-between/k3_seed0/vol_02/metrics.json").read_text())
    assert metrics["train_seconds"] == 0.0 and metrics["iterations"] is None
    filled = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "report/runs/fill-between/k3_seed0/vol_02/"
                                                       "prediction.nii.gz")))
    gt = sitk.GetArrayFromImage(sitk.ReadImage(str(ds / "labelsTr" / "vol_02.nii.gz")))
    for k in metrics["annotated_slices"]:
        np.testing.assert_array_equal(filled[k], gt[k])
    assert (tmp_path / "report" / "volumes.csv").is_file()
    # the report can be rewritten from the folder alone
    assert "## Headline" in write_report(tmp_path / "report")["report"].read_text()


CLASSES = ["disk", "square"]


def test_benchmark_command_runs_fill_between_without_training(tmp_path, capsys, monkeypatch):
    import nnsam_core.finetune as finetune

    monkeypatch.setattr(finetune, "fine_tune", lambda **kw: pytest.fail("fill-between must not train"))
    ds = _write_dataset(tmp_path / "Dataset998_Vol", volumes={"vol_01": (9, [1, 2, 3, 4, 5, 6, 7])})
    assert main(["benchmark", "--in-volume", str(ds), "-o", str(tmp_path / "r"), "--methods", "fill-between",
                 "--annotated", "2", "3"]) == 0
    text = (tmp_path / "r" / "report.md").read_text()
    assert "| Fill between slices |" in text and "## Headline" in text


def test_fill_between_on_the_labelled_slices_protocol_is_refused_in_one_line(tmp_path, capsys):
    ds = _write_dataset(tmp_path / "Dataset999_Syn")
    assert main(["benchmark", str(ds), "-o", str(tmp_path / "r"), "--methods", "nnunet", "fill-between",
                 "--sizes", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "in-volume protocol only" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------------------------- chest CT
def test_chest_ct_becomes_a_one_case_raw_dataset_for_the_in_volume_protocol(tmp_path, chest_ct, capsys):
    folder = tmp_path / "Dataset903_ChestCT"
    assert main(["raw-dataset", *chest_ct, "-o", str(folder), "--case", "chest_01"]) == 0
    info = bdata.read_dataset(folder)
    assert len(info.class_names) == 7 and info.class_names[0] == "ribs"
    assert list(info.volumes) == ["chest_01"] and len(info.volumes["chest_01"]) == 34
    image = sitk.ReadImage(str(info.image_path("chest_01")))
    assert image.GetSize() == (128, 128, 34)
    assert main(["raw-dataset", *chest_ct, "-o", str(folder)]) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err
    assert main(["benchmark", "--in-volume", str(folder), "-o", str(tmp_path / "r"), "--methods", "fill-between",
                 "--annotated", "3", "5", "--dry-run"]) == 0
    assert "chest_01" in capsys.readouterr().out


def test_in_volume_benchmark_with_a_trained_network_beside_fill_between(tmp_path):
    """The real harness (fine_tune at 2 iterations, Segmenter) and fill between slices on one tiny volume."""
    ds = _write_dataset(tmp_path / "Dataset989_Vol", volumes={"vol_01": (7, [1, 2, 3, 4, 5])}, size=32)
    settings = Settings(protocol="in-volume", dataset=str(ds.resolve()), iterations=2, device="cpu")
    plan = Plan(settings=settings, methods=["nnunet", FILL_BETWEEN], annotated=[2])
    result = run_in_volume_benchmark(ds, tmp_path / "report", plan, log=lambda _: None)
    assert result["trained"] == 2
    network = json.loads((tmp_path / "report/runs/nnunet/k2_seed0/vol_01/metrics.json").read_text())
    filled = json.loads((tmp_path / "report/runs/fill-between/k2_seed0/vol_01/metrics.json").read_text())
    assert network["iterations"] == 2 and network["train_seconds"] > 0
    assert network["scored_slices"] == filled["scored_slices"] == [1, 3, 5]
    text = (tmp_path / "report" / "report.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| 2 | nnU-Net |")]
    assert any("(" in row and "/" in row for row in rows)  # a paired row against fill between slices
    assert "| Fill between slices |" in text and "| nnU-Net |" in text
