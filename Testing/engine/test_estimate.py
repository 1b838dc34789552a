"""The expected time of a fine-tune: the cost model's arithmetic, the plan it assumes, the cache of measured costs,
and `nnsam estimate` end to end with one real (tiny) probe."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk

from nnsam_core import estimate as est
from nnsam_core.cli import main
from nnsam_core.estimate import (EstimateSettings, ImageGeometry, UnitCosts, Workload, estimate, phases_of,
                                 trained_iterations, working_plan)

COSTS = UnitCosts(train_step_s=0.5, encoder_call_s=2.0, segment_slice_s=0.25)
WORK = Workload(slices=160, painted=5, iterations=1000, batch_size=2, recompute_share=0.1, uses_encoder=True)


def test_nnsam_phase_by_phase():
    p = phases_of(WORK, COSTS)
    assert p.bank_fill_s == pytest.approx(5 * 2.0)                        # k encoder calls
    assert p.training_network_s == pytest.approx(1000 * 0.5)
    assert p.training_encoder_s == pytest.approx(1000 * 0.1 * 2 * 2.0)    # share x batch x call per step
    assert p.segmentation_network_s == pytest.approx(160 * 0.25)
    assert p.segmentation_encoder_s == pytest.approx(160 * 2.0)
    assert (p.training_s, p.segmentation_s, p.total_s) == pytest.approx((910, 360, 1270))


def test_nnunet_has_no_encoder_phases():
    nnunet = replace(WORK, uses_encoder=False, recompute_share=0.0)
    p = phases_of(nnunet, COSTS)
    assert p.bank_fill_s == p.training_encoder_s == p.segmentation_encoder_s == 0
    assert p.total_s == pytest.approx(1000 * 0.5 + 160 * 0.25)


def test_scaling_with_the_volume_and_the_painted_slices():
    base = phases_of(WORK, COSTS)
    twice_the_slices = phases_of(replace(WORK, slices=320), COSTS)
    assert twice_the_slices.segmentation_s == pytest.approx(2 * base.segmentation_s)
    assert twice_the_slices.training_s == pytest.approx(base.training_s)  # training sees the painted slices only
    more_painted = phases_of(replace(WORK, painted=10), COSTS)
    assert more_painted.bank_fill_s == pytest.approx(2 * base.bank_fill_s)
    assert more_painted.training_network_s == base.training_network_s      # steps, not slices, set training


def test_iterations_are_whole_epochs_as_the_trainer_schedules_them():
    from nnsam_core.training.fewshot import nnUNetTrainerFewShot

    assert est.EPOCH_ITERATIONS == nnUNetTrainerFewShot.iterations_per_epoch_cap
    for requested in (1, 3, 25, 26, 1000, 1001):
        schedule = type("Schedule", (), {"iterations_per_epoch_cap": nnUNetTrainerFewShot.iterations_per_epoch_cap})()
        nnUNetTrainerFewShot.set_schedule(schedule, requested)
        assert trained_iterations(requested) == schedule.num_epochs * schedule.num_iterations_per_epoch


def test_working_plan():
    ct = ImageGeometry((512, 512, 64), (0.7, 0.7, 2.5))
    on_cpu = working_plan(ct, 5, "cpu", 192)
    assert (on_cpu.working_size, on_cpu.patch_size, on_cpu.batch_size) == ((192, 192), (192, 192), 2)
    on_gpu = working_plan(ct, 5, "cuda", None)
    assert on_gpu.patch_size == (512, 512) and len(on_gpu.strides) == 8   # nnU-Net's 2d plan for 512x512 CT
    assert on_gpu.batch_size == 2                                          # 5 % of 5 slices is under one
    assert working_plan(ct, 400, "cuda", None).batch_size == 12
    odd = working_plan(ImageGeometry((130, 100, 9), (1.0, 1.0, 1.0)), 3, "cpu", 192)
    assert odd.working_size == (130, 100) and odd.patch_size == (112, 144)  # y, x rounded up for the pooling


def write_image(path, size=(64, 64, 10)):
    array = np.random.default_rng(0).normal(0, 100, size=size[::-1]).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, 2.5))
    sitk.WriteImage(image, str(path))
    return path


class CountingProbe:
    def __init__(self):
        self.specs = []

    def __call__(self, spec):
        self.specs.append(spec)
        return COSTS


def test_second_estimate_measures_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("NNSAM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(est, "machine_load", lambda: 0.1)
    image = write_image(tmp_path / "ct.nii.gz")
    probe = CountingProbe()
    settings = EstimateSettings(device="cpu")
    first = estimate(image, 3, settings, probe=probe)
    assert len(probe.specs) == 1 and first.measured_now and first.costs == COSTS
    cached = json.loads((tmp_path / "cache" / "estimates.json").read_text())["entries"]
    assert list(cached.values()) == [{"train_step_s": 0.5, "encoder_call_s": 2.0, "segment_slice_s": 0.25,
                                      "load_per_core": 0.1}]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["estimates.json"]  # no temporary left
    again = estimate(image, [0, 4, 9], replace(settings, iterations=50), probe=probe)
    assert len(probe.specs) == 1 and not again.measured_now and again.costs == COSTS
    assert again.work.painted == 3 and again.work.iterations == 50
    estimate(image, 3, replace(settings, method="nnunet"), probe=probe)     # another kind of job: measured
    assert len(probe.specs) == 2 and probe.specs[1].encoder is None
    estimate(image, 3, settings, probe=probe, remeasure=True)
    assert len(probe.specs) == 3


def test_a_measurement_made_while_busy_is_made_again_once_quiet(tmp_path, monkeypatch):
    image = write_image(tmp_path / "ct.nii.gz")
    probe = CountingProbe()
    load = [1.5]  # another training keeps the cores busy
    monkeypatch.setattr(est, "machine_load", lambda: load[0])
    first = estimate(image, 3, EstimateSettings(device="cpu"), probe=probe, cache_dir=tmp_path)
    assert first.measured_while_busy and first.as_dict()["measured_while_busy"] is True
    assert not estimate(image, 3, EstimateSettings(device="cpu"), probe=probe, cache_dir=tmp_path).measured_now
    load[0] = 0.2  # quiet now: measured again, then kept
    again = estimate(image, 3, EstimateSettings(device="cpu"), probe=probe, cache_dir=tmp_path)
    assert again.measured_now and not again.measured_while_busy and len(probe.specs) == 2
    load[0] = 1.5
    later = estimate(image, 3, EstimateSettings(device="cpu"), probe=probe, cache_dir=tmp_path)
    assert not later.measured_now and not later.measured_while_busy and len(probe.specs) == 2


def test_a_damaged_cache_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.setattr(est, "machine_load", lambda: None)  # a system without a load average
    image = write_image(tmp_path / "ct.nii.gz")
    (tmp_path / "estimates.json").write_text("{not json")
    probe = CountingProbe()
    assert estimate(image, 2, EstimateSettings(device="cpu"), probe=probe, cache_dir=tmp_path).measured_now
    assert estimate(image, 2, EstimateSettings(device="cpu"), probe=probe, cache_dir=tmp_path).measured_now is False


def test_a_header_without_its_voxels_is_enough(tmp_path):
    """The Slicer panel describes its volume with a MetaImage header alone (no voxel file is written)."""
    header = tmp_path / "geometry.mhd"
    header.write_text("ObjectType = Image\nNDims = 3\nDimSize = 300 200 40\nElementSpacing = 0.5 0.5 3\n"
                      "ElementType = MET_SHORT\nElementDataFile = absent.raw\n")
    geometry = est.read_geometry(header)
    assert geometry == ImageGeometry((300, 200, 40), (0.5, 0.5, 3.0))


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err.strip()


@pytest.mark.parametrize("args, words", [
    (["/no/such/ct.nii.gz"], ["does not exist"]),
    (["{image}", "--slices", "11"], ["--slices 11", "1 to the image's 10"]),
    (["{image}", "--slices", "3,10"], ["--slices 10", "outside"]),
    (["{image}", "--method", "nnunet", "--recompute-share", "0.5"], ["method nnunet"]),
])
def test_bad_input_is_one_line(capsys, tmp_path, args, words):
    image = write_image(tmp_path / "ct.nii.gz")
    code, out, err = run_cli(capsys, "estimate", *[a.format(image=image) for a in args], "--device", "cpu")
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("nnsam: error: "), err
    for word in words:
        assert word in err


def test_estimate_end_to_end_with_a_real_probe(capsys, tmp_path, monkeypatch):
    from nnsam_core import estimate_probe

    monkeypatch.setenv("NNSAM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(estimate_probe, "REPEATS", 1)  # tiny: one warm-up and one timed run of each
    monkeypatch.setattr(est, "machine_load", lambda: 0.1)  # whatever else this machine is doing
    image = write_image(tmp_path / "ct.nii.gz")
    code, out, err = run_cli(capsys, "estimate", image, "--slices", "3", "--device", "cpu", "--json")
    assert code == 0, err
    assert "measuring" in err
    result = json.loads(out)
    assert (result["device"], result["method"], result["encoder"]) == ("cpu", "nnsam", "litemedsam")
    assert (result["slices"], result["painted"], result["working_size"], result["batch_size"]) == (10, 3, [64, 64], 2)
    assert result["measured_now"] is True and result["probe_s"] > 0
    assert all(v > 0 for v in result["unit_costs_s"].values())
    assert result["total_s"] == pytest.approx(result["training_s"] + result["segmentation_s"], abs=0.2)
    assert math.isclose(sum(result["phases_s"].values()), result["total_s"], abs_tol=0.5)

    code, out, err = run_cli(capsys, "estimate", image, "--slices", "3", "--device", "cpu")
    assert code == 0 and "measuring" not in err                    # the measurement was kept
    assert out.startswith("expected on cpu: about ") and "10 slices at 64x64, 3 painted" in out
    assert len(out.strip().splitlines()) == 1
