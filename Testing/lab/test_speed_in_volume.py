"""``nnsam-lab bench-speed --scenario in-volume`` end to end on a tiny configuration, the phase accounting it
rests on, and ``nnsam-lab bench-encoder``. Timings are never asserted (the commands measure them)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from nnsam_lab.speed_in_volume import PHASES, EncoderClock, StepClock, phases_of_run, quick_estimate


def _run(args, tmp_path, timeout=1800):
    cmd = [sys.executable, "-m", "nnsam_lab.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ), cwd=tmp_path)


def test_in_volume_tiny_end_to_end_reports_every_phase_and_they_add_up(tmp_path):
    out = tmp_path / "in_volume.json"
    proc = _run(["bench-speed", "--scenario", "in-volume", "--device", "cpu", "--size", "64", "--slices", "6",
                 "--annotated", "2", "--iterations", "3", "--synthetic", "--json", str(out),
                 "--work-dir", str(tmp_path / "scratch")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert re.fullmatch(r"time_to_result_ratio=\d+\.\d+", lines[-1]), lines[-1]
    for label in ("bank fill", "training: encoder", "training: network", "segmentation: encoder calls",
                  "segmentation: network", "time to a result", "ratio nnSAM / nnU-Net", "quick preset 1000 it"):
        assert label in proc.stdout, label

    result = json.loads(out.read_text())
    assert result["volume"] == [64, 64, 6] and len(result["annotated_slices"]) == 2
    assert result["recompute_share"] == pytest.approx(0.1)  # nnsam train's default
    for name, run in result["methods"].items():
        phases = run["phases_s"]
        assert set(phases) == set(PHASES)
        assert all(value >= 0 for value in phases.values()), (name, phases)
        assert sum(phases.values()) == pytest.approx(run["total_s"], rel=1e-9)
        assert run["total_s"] == pytest.approx(run["fine_tune_s"] + run["segment_s"], rel=1e-9)
        assert phases["segment_encoder"] + phases["segment_network"] == pytest.approx(run["segment_s"], rel=1e-9)
        assert run["steps"] == 3
        quick = run["quick"]
        assert sum(quick["phases_s"].values()) == pytest.approx(quick["total_s"], rel=1e-9)
        for kept in ("setup", "bank_fill", "save", "segment_encoder", "segment_network"):
            assert quick["phases_s"][kept] == phases[kept]  # only the training loop is extrapolated
    unet, sam = result["methods"]["nnunet"], result["methods"]["nnsam"]
    for phase in ("bank_fill", "training_encoder", "segment_encoder"):
        assert unet["phases_s"][phase] == 0.0 and unet["quick"]["phases_s"][phase] == 0.0
    calls = sam["encoder_calls"]
    assert calls["bank_fill_slices"] == 2                      # each painted slice once, before training
    assert calls["segment_encoder_slices"] == 6 == sam["segmenter_encoder_calls"]  # one per segmented slice
    assert calls["training_encoder_slices"] % sam["batch_size"] == 0  # recomputing steps encode the whole batch
    assert sam["phases_s"]["bank_fill"] > 0 and sam["phases_s"]["segment_encoder"] > 0
    # at the share, the quick preset's training encoder is share x iterations x batch x seconds per slice
    assert sam["quick"]["phases_s"]["training_encoder"] == pytest.approx(
        0.1 * 1000 * sam["batch_size"] * sam["encoder_s_per_slice"])
    assert result["ratio_quick"] == pytest.approx(sam["quick"]["total_s"] / unet["quick"]["total_s"])
    assert float(lines[-1].split("=")[1]) == pytest.approx(result["ratio_quick"], rel=1e-3)
    assert result["nnsam_quick_cache_only_s"] == pytest.approx(
        sam["quick"]["total_s"] - sam["quick"]["phases_s"]["training_encoder"])
    assert not any((tmp_path / "scratch").iterdir())  # the working folder is removed


@pytest.mark.parametrize("args, message", [
    (["--slices", "4", "--annotated", "4"], "--annotated must be at least 1 and fewer than --slices (4)"),
    (["--slices", "4", "--annotated", "0"], "--annotated must be at least 1"),
    (["--slices", "1"], "--slices must be at least 2"),
    (["--iterations", "1"], "--iterations must be at least 2"),
])
def test_in_volume_refuses_bad_input_in_one_line(tmp_path, args, message):
    proc = _run(["bench-speed", "--scenario", "in-volume", "--device", "cpu", "--size", "64", "--synthetic",
                 "--work-dir", str(tmp_path / "work"), *args], tmp_path, timeout=600)
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "work").exists()  # refused before any work


def test_a_bad_precision_in_the_environment_is_refused_in_one_line(tmp_path):
    env = dict(os.environ, NNSAM_ENCODER_PRECISION="double")
    cmd = [sys.executable, "-m", "nnsam_lab.cli", "bench-speed", "--scenario", "in-volume", "--device", "cpu",
           "--size", "64", "--synthetic"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "NNSAM_ENCODER_PRECISION=double" in proc.stderr, proc.stderr


class _Steps:
    def __init__(self, first_start, first_end, last_end):
        self.first_start, self.first_end, self.last_end = first_start, first_end, last_end


def _clock(calls):
    clock = EncoderClock()
    clock.calls.extend(calls)
    return clock


def test_phases_split_the_run_by_the_steps_and_the_encoder_calls():
    # fine-tune 0..100 s, first step 30..31, last step ends at 90, segmentation 100..160
    calls = [(10.0, 4.0, 2), (12.0, 2.0, 1),       # bank fill, before the first step
             (30.5, 0.3, 2), (50.0, 1.0, 2),       # recomputing steps (one inside the first step)
             (101.0, 20.0, 8), (130.0, 5.0, 2)]    # segmentation
    run = phases_of_run(0.0, 100.0, 160.0, _Steps(30.0, 31.0, 90.0), _clock(calls))
    phases = run["phases_s"]
    assert phases == pytest.approx({"setup": 24.0, "bank_fill": 6.0, "training_encoder": 1.3,
                                    "training_network": 58.7, "save": 10.0, "segment_encoder": 25.0,
                                    "segment_network": 35.0})
    assert sum(phases.values()) == pytest.approx(run["total_s"]) == pytest.approx(160.0)
    assert run["encoder_calls"]["bank_fill_slices"] == 3 and run["encoder_calls"]["segment_encoder_slices"] == 10
    assert run["first_step_network_s"] == pytest.approx(0.7)

    # 10 iterations measured -> 1000: the first step once, the others' network time per iteration scaled;
    # the encoder at the share's expectation, at the run's seconds per slice
    quick = quick_estimate(run, iterations=10, quick_iterations=1000, share=0.1, batch_size=2,
                           encoder_s_per_slice=2.0)
    per_iteration = (58.7 - 0.7) / 9
    assert quick["phases_s"]["training_network"] == pytest.approx(0.7 + 999 * per_iteration)
    assert quick["phases_s"]["training_encoder"] == pytest.approx(0.1 * 1000 * 2 * 2.0)
    assert quick["total_s"] == pytest.approx(sum(quick["phases_s"].values()))
    # at the quick preset itself nothing is estimated
    assert quick_estimate(run, 1000, 1000, 0.1, 2, 2.0)["phases_s"] == phases


def test_a_run_without_training_steps_is_an_error_not_a_table():
    with pytest.raises(RuntimeError, match="no training step"):
        phases_of_run(0.0, 1.0, 2.0, StepClock(), EncoderClock())


def test_bench_encoder_times_each_precision_and_batch_and_measures_the_error(tmp_path):
    out = tmp_path / "encoder.json"
    proc = _run(["bench-encoder", "--random-encoder", "--synthetic", "--slices", "2", "--batch-sizes", "1,2",
                 "--repeats", "1", "--json", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [(r["precision"], r["batch_size"]) for r in result["rows"]] == [
        ("float32", 1), ("float32", 2), ("bfloat16", 1), ("bfloat16", 2)]
    assert all(r["s_per_slice"] > 0 for r in result["rows"])
    errors = result["errors_vs_float32"]
    assert errors["float32"]["raw"]["relative_l2_max"] == 0.0 and errors["float32"]["raw"]["cosine_min"] > 0.9999
    assert errors["bfloat16"]["raw"]["relative_l2_mean"] > 0.0      # bfloat16 really ran
    assert 0.0 < errors["float32+noise"]["raw"]["relative_l2_mean"]  # the yardstick is there
    assert result["auto_resolves_to"] in ("float32", "bfloat16")
    assert "input + noise sd 0.1 (reference)" in proc.stdout and "precision 'auto' runs" in proc.stdout


@pytest.mark.parametrize("args, message", [(["--batch-sizes", "0"], "--batch-sizes wants positive numbers"),
                                           (["--precisions", "float16"], "--precisions: each value must be one of")])
def test_bench_encoder_refuses_bad_lists_in_one_line(tmp_path, args, message):
    proc = _run(["bench-encoder", "--random-encoder", "--synthetic", *args], tmp_path, timeout=600)
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr, proc.stderr


def test_segmentation_measured_on_part_of_the_volume_scales_to_all_of_it():
    from nnsam_lab.speed_in_volume import scale_segmentation

    calls = [(10.0, 4.0, 2), (101.0, 20.0, 8)]
    run = phases_of_run(0.0, 100.0, 150.0, _Steps(30.0, 31.0, 90.0), _clock(calls))
    scaled = scale_segmentation(run, measured_slices=8, volume_slices=32)
    assert scaled["phases_s"]["segment_encoder"] == pytest.approx(80.0)
    assert scaled["phases_s"]["segment_network"] == pytest.approx(120.0)
    assert scaled["segment_s"] == pytest.approx(200.0) and scaled["total_s"] == pytest.approx(300.0)
    assert sum(scaled["phases_s"].values()) == pytest.approx(scaled["total_s"])
    for phase in ("setup", "bank_fill", "training_encoder", "training_network", "save"):
        assert scaled["phases_s"][phase] == run["phases_s"][phase]
    assert scaled["measured"]["total_s"] == pytest.approx(150.0) and scaled["measured"]["segment_slices"] == 8
    assert scale_segmentation(run, 32, 32) is run
