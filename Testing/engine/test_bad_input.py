"""Every bad input gives exit status 2 and one line naming the problem and the fix; nothing is left behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnsam_core.cli import main


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    return code, err


def assert_one_line_error(code: int, err: str, *words: str):
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("nnsam: error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word.lower() in err.lower(), (word, err)


def write(image: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture
def small_pair(tmp_path):
    """A 32x32x6 CT-like image and labels annotated on slices 1 and 4."""
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.normal(0, 100, size=(6, 32, 32)).astype(np.float32))
    image.SetSpacing((0.8, 0.8, 2.5))
    labels_arr = np.zeros((6, 32, 32), np.uint8)
    labels_arr[1, 8:20, 8:20] = 1
    labels_arr[4, 10:22, 10:22] = 2
    labels = sitk.GetImageFromArray(labels_arr)
    labels.CopyInformation(image)
    return write(image, tmp_path / "ct.nii.gz"), write(labels, tmp_path / "labels.nii.gz"), image, labels


def train_args(image, labels, out, *extra):
    return ["train", image, labels, "-o", out, "--iterations", "1", "--device", "cpu", "--progress", "none", *extra]


def assert_nothing_written(out: Path):
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.") and
                 not p.name.endswith(".lock")]
    assert leftovers == []


def test_missing_image(capsys, tmp_path, small_pair):
    out = tmp_path / "model"
    code, err = run_cli(capsys, *train_args(tmp_path / "nope.nii.gz", small_pair[1], out))
    assert_one_line_error(code, err, "does not exist")
    assert_nothing_written(out)


def test_unreadable_image(capsys, tmp_path, small_pair):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"this is not an image")
    out = tmp_path / "model"
    code, err = run_cli(capsys, *train_args(bad, small_pair[1], out))
    assert_one_line_error(code, err, "could not be read")
    assert_nothing_written(out)


@pytest.mark.parametrize("change, word", [("size", "size"), ("spacing", "spacing"), ("origin", "origin"),
                                          ("direction", "direction")])
def test_label_geometry_mismatch(capsys, tmp_path, small_pair, change, word):
    ct, _, image, labels = small_pair
    arr = sitk.GetArrayFromImage(labels)
    if change == "size":
        moved = sitk.GetImageFromArray(arr[:, :30, :])
        moved.SetSpacing(labels.GetSpacing())
    else:
        moved = sitk.Image(labels)
        if change == "spacing":
            moved.SetSpacing((0.9, 0.8, 2.5))
        elif change == "origin":
            moved.SetOrigin((5.0, 0.0, 0.0))
        else:
            moved.SetDirection((0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    out = tmp_path / "model"
    code, err = run_cli(capsys, *train_args(ct, write(moved, tmp_path / "moved.nii.gz"), out))
    assert_one_line_error(code, err, "does not match the image", word)
    assert_nothing_written(out)


def test_no_annotated_slice(capsys, tmp_path, small_pair):
    ct, _, _, labels = small_pair
    empty = sitk.Image(labels.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(labels)
    out = tmp_path / "model"
    code, err = run_cli(capsys, *train_args(ct, write(empty, tmp_path / "empty.nii.gz"), out))
    assert_one_line_error(code, err, "no annotated slice")
    assert_nothing_written(out)


def test_label_values_outside_class_list(capsys, tmp_path, small_pair):
    ct, labels_path, _, _ = small_pair
    out = tmp_path / "model"
    code, err = run_cli(capsys, *train_args(ct, labels_path, out, "--class-names", "LV"))
    assert_one_line_error(code, err, "value 2", "LV")
    assert_nothing_written(out)


def test_slices_out_of_range(capsys, tmp_path, small_pair):
    out = tmp_path / "model"
    code, err = run_cli(capsys, *train_args(small_pair[0], small_pair[1], out, "--slices", "1,40"))
    assert_one_line_error(code, err, "outside", "40")
    assert_nothing_written(out)


@pytest.mark.parametrize("size", ["-1", "10"])
def test_max_size_too_small(capsys, tmp_path, small_pair, size):
    out = tmp_path / "model"
    code, err = run_cli(capsys, *train_args(small_pair[0], small_pair[1], out, "--max-size", size))
    assert_one_line_error(code, err, "--max-size", "32")
    assert_nothing_written(out)


def test_rgb_image(capsys, tmp_path, small_pair):
    rgb = sitk.GetImageFromArray(np.zeros((6, 32, 32, 3), np.uint8), isVector=True)
    out = tmp_path / "model"
    code, err = run_cli(capsys, *train_args(write(rgb, tmp_path / "rgb.nrrd"), small_pair[1], out))
    assert_one_line_error(code, err, "components")
    assert_nothing_written(out)


def test_4d_image(capsys, tmp_path, small_pair):
    frame = sitk.GetImageFromArray(np.zeros((6, 32, 32), np.float32))
    four_d = sitk.JoinSeries([frame, frame])  # two time points
    assert four_d.GetDimension() == 4
    out = tmp_path / "model"
    code, err = run_cli(capsys, *train_args(write(four_d, tmp_path / "4d.nii.gz"), small_pair[1], out))
    assert_one_line_error(code, err, "4D")
    assert_nothing_written(out)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_or_infinite_voxels(capsys, tmp_path, small_pair, value):
    _, labels_path, image, _ = small_pair
    arr = sitk.GetArrayFromImage(image)
    arr[2, 3, 3] = value
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(image)
    out = tmp_path / "model"
    code, err = run_cli(capsys, *train_args(write(bad, tmp_path / "nan.mha"), labels_path, out))
    assert_one_line_error(code, err, "NaN or infinite")
    assert_nothing_written(out)


def test_image_too_small(capsys, tmp_path):
    tiny = sitk.GetImageFromArray(np.zeros((3, 12, 40), np.float32))
    labels = sitk.GetImageFromArray(np.ones((3, 12, 40), np.uint8))
    out = tmp_path / "model"
    code, err = run_cli(capsys, *train_args(write(tiny, tmp_path / "tiny.nii.gz"),
                                            write(labels, tmp_path / "tiny_labels.nii.gz"), out))
    assert_one_line_error(code, err, "16 pixels")
    assert_nothing_written(out)


def test_mobilesam_weights_missing_offline(capsys, tmp_path, small_pair, monkeypatch):
    monkeypatch.setenv("NNSAM_CACHE_DIR", str(tmp_path / "no-weights"))
    out = tmp_path / "model"
    code, err = run_cli(capsys, *train_args(small_pair[0], small_pair[1], out, "--encoder", "mobilesam"))
    assert_one_line_error(code, err, "nnsam weights import mobilesam FILE")
    assert_nothing_written(out)


def _copy_bundle(trained, tmp_path) -> Path:
    bundle, _ = trained
    copy = tmp_path / "bundle_copy"
    shutil.copytree(bundle.path, copy)
    return copy


def test_bundle_of_another_format_version(capsys, tmp_path, trained, chest_ct):
    copy = _copy_bundle(trained, tmp_path)
    manifest = json.loads((copy / "nnsam.json").read_text())
    manifest["format_version"] = 99
    (copy / "nnsam.json").write_text(json.dumps(manifest))
    out = tmp_path / "out.nii.gz"
    code, err = run_cli(capsys, "predict", copy, chest_ct[0], "-o", out, "--progress", "none")
    assert_one_line_error(code, err, "format version 99")
    assert_nothing_written(out)


@pytest.mark.parametrize("victim", ["model.pth", "plans.json"])
def test_bundle_checksum_mismatch(capsys, tmp_path, trained, chest_ct, victim):
    copy = _copy_bundle(trained, tmp_path)
    with open(copy / victim, "ab") as handle:
        handle.write(b" ")
    out = tmp_path / "out.nii.gz"
    code, err = run_cli(capsys, "predict", copy, chest_ct[0], "-o", out, "--progress", "none")
    assert_one_line_error(code, err, victim, "SHA-256")
    assert_nothing_written(out)


def test_json_progress_reports_the_error_too(capsys, tmp_path, small_pair):
    out = tmp_path / "model"
    code = main([str(a) for a in ["train", tmp_path / "nope.nii.gz", small_pair[1], "-o", out, "--progress", "json"]])
    captured = capsys.readouterr()
    assert code == 2
    last = json.loads(captured.out.strip().splitlines()[-1])
    assert last["stage"] == "error" and "does not exist" in last["message"]


def test_the_engine_can_be_interrupted_even_when_started_with_sigint_ignored():
    """A shell starts background programs with SIGINT ignored; Stop must still reach the engine's clean-up."""
    import signal

    from nnsam_core.cli import interruptible

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        interruptible()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_stop_file_interrupts_the_engine_as_ctrl_c_does(tmp_path, monkeypatch):
    """Slicer's Stop creates $NNSAM_STOP_FILE (its launcher forwards no signal): the engine raises
    KeyboardInterrupt in its main thread, so the interrupt clean-up runs."""
    import time

    from nnsam_core.cli import watch_stop_file

    stop = tmp_path / "stop"
    monkeypatch.setenv("NNSAM_STOP_FILE", str(stop))
    watch_stop_file()
    time.sleep(1.0)  # not there yet: nothing happens
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        # Created inside the block: the watcher may fire while the file is still being written.
        stop.touch()
        while time.monotonic() - started < 10:
            time.sleep(0.05)
    assert time.monotonic() - started < 3 and stop.exists()  # the file is left for its creator


def test_the_engine_stopped_by_its_stop_file_exits_130_and_writes_nothing(tmp_path, small_pair):
    import os
    import subprocess
    import sys

    image, labels, _, _ = small_pair
    stop = tmp_path / "stop"
    stop.write_text("")
    out = tmp_path / "model"
    run = subprocess.run([sys.executable, "-m", "nnsam_core.cli", *map(str, train_args(image, labels, out))],
                         env=dict(os.environ, NNSAM_STOP_FILE=str(stop)), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 130, run.stderr[-2000:]
    assert run.stderr.strip().splitlines()[-1].startswith("nnsam: error: interrupted")
    assert "Traceback" not in run.stderr and not out.exists()


def test_a_constant_image_is_warned_about_before_training(tmp_path, small_pair):
    from nnsam_core import fine_tune

    _, labels_path, image, _ = small_pair
    constant = sitk.Image(image.GetSize(), sitk.sitkFloat32) + 7.0
    constant.CopyInformation(image)
    events = []

    class Seen(Exception):
        pass

    def progress(event):
        events.append(event)
        if event["stage"] == "warning":
            raise Seen  # the warning came before any work: stop here

    with pytest.raises(Seen):
        fine_tune(write(constant, tmp_path / "flat.nii.gz"), labels_path, output=tmp_path / "m", iterations=1,
                  device="cpu", progress=progress)
    assert "the value 7" in events[-1]["message"] and [e["stage"] for e in events] == ["prepare", "warning"]
    assert not (tmp_path / "m").exists()


def test_a_normal_image_gets_no_warning():
    from nnsam_core.cases import constant_image_warning

    image = sitk.GetImageFromArray(np.arange(6 * 32 * 32, dtype=np.float32).reshape(6, 32, 32))
    assert constant_image_warning(image) is None
    assert "value 0" in constant_image_warning(image * 0)
