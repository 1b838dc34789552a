"""``nnsam bench-speed`` end to end on a tiny configuration, and the encoder-call contract it measures:
one encoder call per segmented slice, none per training iteration. Timings are never asserted here (the
benchmark measures them; see docs/results.md)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from nnsam_core.errors import NNSAMError
from nnsam_lab.speed import SliceSource, annotated_indices, format_table, parse_ram_volume_slices


@pytest.mark.parametrize("sam_option, share", [(["--compare-recomputed", "--recompute-share", "0"], 0.0),
                                               ([], 0.1)])  # the cache alone; nnsam train's default share
def test_bench_speed_tiny_end_to_end(tmp_path, sam_option, share):
    out = tmp_path / "speed.json"
    cmd = [sys.executable, "-m", "nnsam_lab.cli", "bench-speed", "--device", "cpu", "--size", "64",
           "--steps", "2", "--warmup", "0", "--slices", "2", "--iterations", "1", "--ram-volume-slices", "2",
           *sam_option, "--json", str(out), "--work-dir", str(tmp_path / "scratch" / "new")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert re.fullmatch(r"train_step_ratio=\d+\.\d+", lines[-1]), lines[-1]
    assert any(line.startswith("| measure") for line in lines), proc.stdout
    assert "encoder calls per segmented slice" in proc.stdout

    result = json.loads(out.read_text())
    ratio = float(lines[-1].split("=", 1)[1])
    training = result["training_iteration"]
    if share:
        # nnSAM's step is the long-run mix of its two measured steps, and the headline ratio is that step's
        mixed = (1 - share) * training["nnsam_step_s"] + share * training["recomputed_step_s"]
        assert training["share_step_s"] == pytest.approx(mixed)
        assert ratio == pytest.approx(mixed / training["nnunet_step_s"], rel=1e-3)
        assert training["share_encoder_calls_per_train_iteration"] == pytest.approx(share * training["batch_size"])
        assert training["share_iteration_ratio"] == pytest.approx(
            (mixed + training["nnsam_data_s"]) / (training["nnunet_step_s"] + training["nnunet_data_s"]))
        assert f"recompute share {share:g}" in proc.stdout
    else:
        assert "share_step_s" not in training
        assert ratio == pytest.approx(training["train_step_ratio"], rel=1e-3)
        assert "recomputing embeddings every step" in proc.stdout
    assert training["bank_fill_encoder_calls"] == 4          # the 4 training slices, once, before training
    assert training["encoder_calls_during_timed_iterations"] == 0
    assert training["encoder_calls_per_train_iteration"] == 0
    assert training["patch_size"] == [64, 64]
    # the authors' way, timed for reference: one encoder call per patch of the batch, every step
    assert training["recomputed_encoder_calls_per_train_iteration"] == training["batch_size"]
    assert training["recomputed_step_s"] > 0
    tts = result["time_to_segmentation"]
    assert tts["recompute_share"] == share  # read back from the bundle the fine-tune wrote
    assert tts["volume"] == [64, 64, 2]
    assert tts["encoder_calls_per_segmented_slice"] == 1
    ram = result["peak_ram"]["runs"]
    assert len(ram) == 1 and ram[0]["slices"] == 2 and ram[0]["encoder_calls"] == 2 and ram[0]["peak_rss_gb"] > 0
    work_parent = tmp_path / "scratch" / "new"          # made on demand, and emptied again
    assert work_parent.is_dir() and not any(p.name.startswith("nnsam-bench-speed-") for p in work_parent.iterdir())


def test_bench_speed_refuses_a_work_dir_it_cannot_create(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cmd = [sys.executable, "-m", "nnsam_lab.cli", "bench-speed", "--device", "cpu", "--size", "64", "--synthetic",
           "--work-dir", str(blocker / "work")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0, proc.stderr           # one line, no traceback
    assert "--work-dir" in proc.stderr and "writable folder" in proc.stderr
    assert blocker.read_text() == "not a folder"


def test_one_encoder_call_per_segmented_slice(trained, chest_ct):
    """The real Segmenter on the chest CT bundle (4 annotated slices, fine-tuned briefly): every tile and
    mirrored pass of a slice reuses that slice's single embedding."""
    import SimpleITK as sitk
    from nnsam_core.predict import Segmenter

    bundle, _ = trained
    ct = sitk.ReadImage(chest_ct[0])[:, :, 10:13]  # 3 slices keep the test short
    segmenter = Segmenter(bundle, "cpu")
    labels = segmenter.segment(ct)
    assert labels.GetSize() == ct.GetSize()
    assert segmenter.encoder_calls == 3
    segmenter.segment(ct)  # a second volume: again one call per slice, nothing leaks between volumes
    assert segmenter.encoder_calls == 6


def test_annotated_indices_spread_inside_the_volume():
    assert annotated_indices(64) == [13, 25, 38, 50]
    assert annotated_indices(2) == [0, 1]
    assert annotated_indices(5) == [0, 1, 3, 4]
    for n in range(4, 301):
        chosen = annotated_indices(n)
        assert len(chosen) == 4 and all(0 <= k < n for k in chosen)


def test_synthetic_source_when_no_data():
    source = SliceSource(48, None)
    image, labels = source.slice(3)
    assert image.shape == labels.shape == (48, 48) and image.dtype == np.int16
    assert set(np.unique(labels)) <= {0, 1, 2, 3} and labels.max() > 0
    volume, label_volume = source.volume(3)
    assert volume.GetSize() == label_volume.GetSize() == (48, 48, 3)


def test_table_reports_targets():
    result = {"device": "cpu", "peak_rss_gb": {"self": 1.0, "children": 0.5},
              "training_iteration": {"steps_timed": 3, "batch_size": 2, "patch_size": [512, 512],
                                     "nnunet_step_s": 2.0, "nnsam_step_s": 2.1, "train_step_ratio": 1.05,
                                     "nnunet_data_s": 0.3, "nnsam_data_s": 0.35, "iteration_ratio": 1.06,
                                     "encoder_calls_per_train_iteration": 0.0, "bank_fill_encoder_calls": 4}}
    table = format_table(result)
    assert "| train_step_ratio nnSAM/nnU-Net" in table and "met" in table and "MISSED" not in table


def test_table_with_a_recompute_share_judges_the_mixed_step():
    result = {"device": "cpu", "peak_rss_gb": {"self": 1.0, "children": 0.5},
              "training_iteration": {"steps_timed": 3, "batch_size": 2, "patch_size": [512, 512],
                                     "nnunet_step_s": 2.0, "nnsam_step_s": 2.1, "train_step_ratio": 1.05,
                                     "recomputed_step_s": 6.1, "recomputed_step_ratio": 3.05,
                                     "recompute_share": 0.25, "share_step_s": 3.1, "share_step_ratio": 1.55,
                                     "share_encoder_calls_per_train_iteration": 0.5,
                                     "recomputed_encoder_calls_per_train_iteration": 2.0,
                                     "nnunet_data_s": 0.3, "nnsam_data_s": 0.35, "iteration_ratio": 1.06,
                                     "encoder_calls_per_train_iteration": 0.0, "bank_fill_encoder_calls": 4}}
    table = format_table(result)
    ratio_row = next(line for line in table.splitlines() if line.startswith("| train_step_ratio"))
    assert "recompute share 0.25" in ratio_row and "1.550" in ratio_row and "MISSED" in ratio_row
    assert "1.050 / 3.050" in table  # the cached and the recomputing ratio stay visible


def test_bench_speed_refuses_a_share_outside_0_to_1():
    cmd = [sys.executable, "-m", "nnsam_lab.cli", "bench-speed", "--device", "cpu", "--synthetic",
           "--recompute-share", "1.5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "--recompute-share" in proc.stderr, proc.stderr


def test_bench_speed_times_mobilesam_randomly_initialised_without_its_weights(tmp_path):
    """--encoder mobilesam --random-encoder: both nnSAM trainers run MobileSAM's 1024-pixel encoder, built from
    no weights file (the test's cache holds none)."""
    out = tmp_path / "speed.json"
    cmd = [sys.executable, "-m", "nnsam_lab.cli", "bench-speed", "--device", "cpu", "--size", "64", "--synthetic",
           "--steps", "1", "--warmup", "0", "--skip-segmentation", "--encoder", "mobilesam", "--random-encoder",
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "encoder mobilesam (randomly initialised" in proc.stdout
    result = json.loads(out.read_text())
    training = result["training_iteration"]
    assert training["encoder"] == {"name": "mobilesam", "pretrained": False, "input_size": 1024}
    assert result["encoder"] == {"name": "mobilesam", "weights": "random"}
    assert training["bank_fill_encoder_calls"] == 4 and training["encoder_calls_during_timed_iterations"] == 0
    assert training["recomputed_encoder_calls_per_train_iteration"] == training["batch_size"]


def test_bench_speed_without_mobilesam_weights_says_how_to_get_them_or_time_without(tmp_path):
    env = dict(os.environ, NNSAM_CACHE_DIR=str(tmp_path / "empty-cache"))
    cmd = [sys.executable, "-m", "nnsam_lab.cli", "bench-speed", "--device", "cpu", "--synthetic",
           "--encoder", "mobilesam", "--work-dir", str(tmp_path / "work")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0, proc.stderr           # one line, no traceback
    assert "nnsam weights import mobilesam" in proc.stderr and "--random-encoder" in proc.stderr
    assert not (tmp_path / "work").exists()  # refused before any work


def test_on_encoder_feeds_the_new_encoder_its_own_input():
    from nnsam_core.config import NNSAMConfig
    from nnsam_lab.speed import on_encoder

    default = NNSAMConfig()
    assert on_encoder(default, "litemedsam", random_weights=False) is default
    mobile = on_encoder(default, "mobilesam", random_weights=True)
    assert (mobile.encoder, mobile.pretrained, mobile.sam_input) == ("mobilesam", False, "nnunet")
    assert mobile.recompute_share == default.recompute_share  # nothing else changes
    assert on_encoder(default, "litemedsam", random_weights=True).sam_input == default.sam_input


def test_bench_speed_is_registered():
    from nnsam_lab.cli import build_parser
    args = build_parser().parse_args(["bench-speed", "--size", "128", "--slices", "3"])
    assert args.size == 128 and args.slices == 3 and callable(args.func)


def test_ram_volume_slices_zero_skips_and_bad_values_are_refused():
    assert parse_ram_volume_slices("16,32") == [16, 32]
    assert parse_ram_volume_slices("0") == []
    assert parse_ram_volume_slices("") == []
    with pytest.raises(NNSAMError, match="ram-volume-slices"):
        parse_ram_volume_slices("16,x")
    with pytest.raises(NNSAMError, match="positive"):
        parse_ram_volume_slices("-4")


def test_peak_ram_extrapolates_only_a_peak_that_grew():
    from nnsam_lab.speed import RAM_TARGET_SLICES, format_table, peak_ram_at_target

    grew = peak_ram_at_target([{"slices": 16, "peak_rss_gb": 2.0}, {"slices": 32, "peak_rss_gb": 2.16}])
    assert grew["peak_rss_gb_target"] == pytest.approx(2.16 + 0.01 * (RAM_TARGET_SLICES - 32))
    assert grew["method"].startswith("linear extrapolation from 16 and 32")
    # a peak that fell (allocator noise above the growth) would extrapolate below what was measured: refused
    fell = peak_ram_at_target([{"slices": 16, "peak_rss_gb": 2.405}, {"slices": 32, "peak_rss_gb": 2.349}])
    assert fell["peak_rss_gb_target"] is None and "did not grow" in fell["method"]
    assert f"--ram-volume-slices {RAM_TARGET_SLICES}" in fell["method"]
    direct = peak_ram_at_target([{"slices": RAM_TARGET_SLICES, "peak_rss_gb": 4.04}])
    assert direct == {"peak_rss_gb_target": 4.04, "method": f"measured at {RAM_TARGET_SLICES} slices"}
    assert peak_ram_at_target([{"slices": 2, "peak_rss_gb": 1.0}, {"slices": 4, "peak_rss_gb": 1.1}])[
        "peak_rss_gb_target"] is None  # below one slab: nothing to extrapolate from

    result = {"device": "cpu", "peak_rss_gb": {"self": 1.0, "children": 0.5},
              "training_iteration": {"steps_timed": 3, "batch_size": 2, "patch_size": [512, 512],
                                     "nnunet_step_s": 2.0, "nnsam_step_s": 2.1, "train_step_ratio": 1.05,
                                     "nnunet_data_s": 0.3, "nnsam_data_s": 0.35, "iteration_ratio": 1.06,
                                     "encoder_calls_per_train_iteration": 0.0, "bank_fill_encoder_calls": 4},
              "peak_ram": {"runs": [{"slices": 16, "peak_rss_gb": 2.405}, {"slices": 32, "peak_rss_gb": 2.349}],
                           **fell}}
    ram_row = next(line for line in format_table(result).splitlines() if f"{RAM_TARGET_SLICES} slices" in line)
    assert "did not grow" in ram_row and "met" not in ram_row


def test_time_to_segmentation_targets_apply_only_to_the_issue_configurations():
    from nnsam_lab.speed import time_to_segmentation_target

    assert time_to_segmentation_target([512, 512, 64], "cpu") == (20.0, True)
    assert time_to_segmentation_target([512, 512, 200], "cuda") == (2.0, True)
    assert time_to_segmentation_target([512, 512, 64], "cuda")[1] is False
    assert time_to_segmentation_target([256, 256, 64], "cpu")[1] is False


def test_trainers_already_built_are_shut_down_when_a_later_build_fails(monkeypatch):
    import contextlib

    import torch

    from nnsam_lab import speed

    built, shut_down = [], []

    def build(trainer_class, workspace, device, seed, config=None):
        if len(built) == 1:
            raise RuntimeError("second trainer cannot be built")
        built.append(trainer_class.__name__)
        return trainer_class.__name__

    class Workspace:
        activated = staticmethod(contextlib.nullcontext)

    monkeypatch.setattr(speed, "_build_trainer", build)
    monkeypatch.setattr(speed, "_shutdown", shut_down.append)
    with pytest.raises(RuntimeError, match="second trainer"):
        speed.measure_training_iteration(Workspace(), torch.device("cpu"), steps=1, warmup=0)
    assert built == ["nnUNetTrainerFewShot"] and shut_down == built
