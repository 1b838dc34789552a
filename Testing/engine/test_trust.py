"""Trust: untrusted bundles are safe to open, kills are survivable, jobs do not clash, OOM falls back,
runs are reproducible."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import CHEST_SLICES
from nnsam_core import zipsafe as zipsafe_module
from nnsam_core.bundle import Bundle
from nnsam_core.bundle_files import export_zip, import_zip
from nnsam_core.errors import NNSAMError
from nnsam_core.weights import sha256_of

NNSAM = [sys.executable, "-m", "nnsam_core.cli"]


def _copy(trained, tmp_path, name="copy") -> Path:
    target = tmp_path / name
    shutil.copytree(trained[0].path, target)
    return target


def _rehash(folder: Path):
    """Make nnsam.json agree with the (tampered) files, as a careful attacker would."""
    manifest = json.loads((folder / "nnsam.json").read_text())
    manifest["files"] = {name: sha256_of(folder / name) for name in manifest["files"]}
    (folder / "nnsam.json").write_text(json.dumps(manifest))


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ----------------------------------------------------------------------------------------- untrusted bundles
def test_pickled_code_in_checkpoint_is_not_executed(trained, tmp_path):
    folder = _copy(trained, tmp_path)
    marker = tmp_path / "code_ran"
    weights = torch.load(folder / "model.pth", weights_only=True)
    torch.save({"network_weights": weights["network_weights"], "x": _RunsCode(marker)}, folder / "model.pth")
    _rehash(folder)
    with pytest.raises(NNSAMError, match="more than plain tensors"):
        Bundle.load(folder)
    assert not marker.exists(), "loading a bundle executed code from it"


def test_unknown_trainer_name_is_refused(trained, tmp_path):
    folder = _copy(trained, tmp_path)
    manifest = json.loads((folder / "nnsam.json").read_text())
    manifest["trainer"] = "os.system"
    (folder / "nnsam.json").write_text(json.dumps(manifest))
    with pytest.raises(NNSAMError, match="does not know"):
        Bundle.load(folder)


def test_tampered_weights_are_refused(trained, tmp_path):
    folder = _copy(trained, tmp_path)
    state = torch.load(folder / "model.pth", weights_only=True)
    key = next(iter(state["network_weights"]))
    state["network_weights"][key] = state["network_weights"][key] + 1
    torch.save(state, folder / "model.pth")
    with pytest.raises(NNSAMError, match="SHA-256"):
        Bundle.load(folder)


def test_zip_roundtrip(trained, tmp_path):
    archive = export_zip(trained[0].path, tmp_path / "model.zip")
    imported = import_zip(archive, tmp_path / "imported")
    assert Bundle.load(imported).manifest["files"] == trained[0].manifest["files"]
    assert Bundle.load(archive).class_names == trained[0].class_names


def _zip_with(tmp_path, trained, extra_name=None, extra_bytes=b"x", symlink=None) -> Path:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        for name in ("nnsam.json", "plans.json", "dataset.json", "model.pth"):
            z.write(trained[0].path / name, name)
        if extra_name:
            z.writestr(extra_name, extra_bytes)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (0o120777 << 16)
            z.writestr(info, "/etc/passwd")
    return archive


@pytest.mark.parametrize("entry", ["../escaped.txt", "/tmp/absolute_nnsam_test.txt", "sub/../../escaped.txt"])
def test_zip_with_unsafe_paths_is_refused(trained, tmp_path, entry):
    archive = _zip_with(tmp_path, trained, extra_name=entry)
    (tmp_path / "out").mkdir()
    with pytest.raises(NNSAMError, match="unsafe path"):
        import_zip(archive, tmp_path / "out" / "model")
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "out" / "escaped.txt").exists()
    assert not Path("/tmp/absolute_nnsam_test.txt").exists()
    assert not (tmp_path / "out" / "model").exists()


def test_zip_with_symlink_is_refused(trained, tmp_path):
    archive = _zip_with(tmp_path, trained, symlink="link")
    with pytest.raises(NNSAMError, match="link"):
        import_zip(archive, tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_zip_bomb_is_refused(trained, tmp_path, monkeypatch):
    monkeypatch.setattr(zipsafe_module, "MAX_UNPACKED_BYTES", 150 * 1024 ** 2)
    archive = _zip_with(tmp_path, trained, extra_name="padding.bin", extra_bytes=bytes(200 * 1024 ** 2))
    assert archive.stat().st_size < 100 * 1024 ** 2
    with pytest.raises(NNSAMError, match="zip bomb"):
        import_zip(archive, tmp_path / "model")
    assert not (tmp_path / "model").exists()


# ----------------------------------------------------------------------------------------- kill and resume
def _train_cmd(chest_ct, out, iterations, *extra):
    return [*NNSAM, "train", *chest_ct, "--slices", ",".join(map(str, CHEST_SLICES)), "-o", str(out),
            "--iterations", str(iterations), "--device", "cpu", "--progress", "json", *extra]


# nnsam train, with a checkpoint every 2 iterations (the API's checkpoint_every; the command line checkpoints by
# the clock, about every minute, too rarely for a test of a few iterations)
EVERY_2 = [sys.executable, "-c", "import functools, sys\nimport nnsam_core.finetune as f\n"
           "f.fine_tune = functools.partial(f.fine_tune, checkpoint_every=2)\n"
           "from nnsam_core.cli import main\nsys.exit(main(sys.argv[1:]))"]


def _train_every_2(chest_ct, out, iterations, *extra):
    return [*EVERY_2, *_train_cmd(chest_ct, out, iterations, *extra)[len(NNSAM):]]


def test_sigkill_keeps_old_bundle_and_resume_finishes(trained, tmp_path, chest_ct):
    out = _copy(trained, tmp_path, "model")  # an earlier bundle at the same path
    before = {p.name: sha256_of(p) for p in out.iterdir()}
    # started at a share other than the default: the resume below must keep it without being told
    proc = subprocess.Popen(_train_every_2(chest_ct, out, 8, "--overwrite", "--recompute-share", "0.5"),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    checkpoint = None
    deadline = time.monotonic() + 600
    for line in proc.stdout:  # wait for a train step after the first epoch's checkpoint
        event = json.loads(line)
        found = list(tmp_path.glob(".model.nnsam-work/nnUNet_results/*/*/fold_all/checkpoint_latest.pth"))
        if found and event["stage"] == "train" and event["step"] >= 3:
            checkpoint = found[0]
            break
        assert time.monotonic() < deadline, "training never reached its first checkpoint"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert checkpoint is not None
    assert {p.name: sha256_of(p) for p in out.iterdir()} == before, "the old bundle was touched"
    Bundle.load(out)

    mixed = subprocess.run(_train_cmd(chest_ct, out, 8, "--overwrite", "--resume", "--recompute-share", "0.25"),
                           capture_output=True,
                           text=True, timeout=900)
    assert mixed.returncode == 2 and mixed.stderr.strip().count("\n") == 0, mixed.stderr[-2000:]
    assert "recompute_share 0.5 then, 0.25 now" in mixed.stderr
    assert {p.name: sha256_of(p) for p in out.iterdir()} == before and checkpoint.is_file()

    resumed = subprocess.run(_train_every_2(chest_ct, out, 8, "--overwrite", "--resume"), capture_output=True,
                             text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    steps = [json.loads(l)["step"] for l in resumed.stdout.splitlines() if json.loads(l)["stage"] == "train"]
    assert steps and steps[0] > 2 and steps[-1] == 8, f"resume started from scratch: {steps}"
    assert Bundle.load(out).manifest["training"]["iterations"] == 8
    assert Bundle.load(out).manifest["nnsam_config"]["recompute_share"] == 0.5  # as started, not today's default
    assert not any(tmp_path.glob(".model.*partial*"))


# ----------------------------------------------------------------------------------------- concurrency
def test_concurrent_trainings(tmp_path, chest_ct):
    a = subprocess.Popen(_train_cmd(chest_ct, tmp_path / "a", 2), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    b = subprocess.Popen(_train_cmd(chest_ct, tmp_path / "b", 2), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    # wait until a holds its output, then try a second writer of the same bundle
    for line in a.stdout:
        if json.loads(line)["stage"] == "plan":
            break
    clash = subprocess.run(_train_cmd(chest_ct, tmp_path / "a", 2), capture_output=True, text=True, timeout=300)
    assert clash.returncode == 2
    assert "another nnsam job is writing" in clash.stderr
    a_out, a_err = a.communicate(timeout=900)
    b_out, b_err = b.communicate(timeout=900)
    assert a.returncode == 0, a_err[-2000:]
    assert b.returncode == 0, b_err[-2000:]
    Bundle.load(tmp_path / "a")
    Bundle.load(tmp_path / "b")


# ----------------------------------------------------------------------------------------- out of memory
def test_cuda_out_of_memory_falls_back(trained, chest_ct, monkeypatch):
    from nnsam_core.predict import Segmenter

    segmenter = Segmenter(trained[0], "cpu")
    segmenter.device = torch.device("cuda")  # pretend: the first attempts run "on the GPU"
    real = Segmenter._segment_volume
    attempts = []

    def flaky(self, volume, device, slab, progress):
        attempts.append((device.type, slab))
        if device.type == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real(self, volume, device, slab, progress)

    monkeypatch.setattr(Segmenter, "_segment_volume", flaky)
    events = []
    image = sitk.ReadImage(chest_ct[0])[:, :, 14:16]
    labels = segmenter.segment(image, events.append)
    assert attempts == [("cuda", 16), ("cuda", 2), ("cpu", 16)]
    assert labels.GetSize() == image.GetSize()
    retries = [e["message"] for e in events if "out of GPU memory" in e["message"]]
    assert len(retries) == 2 and "cpu" in retries[-1]


def test_training_out_of_memory_says_what_to_change(monkeypatch, capsys, chest_ct, tmp_path):
    import nnsam_core.finetune as finetune
    from nnsam_core.cli import main

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(finetune, "fine_tune", oom)
    code = main(["train", *chest_ct, "-o", str(tmp_path / "m"), "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 3 and "--device cpu" in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------- reproducibility
def test_same_seed_same_predictions(tmp_path, chest_ct):
    from nnsam_core import fine_tune, segment

    image = sitk.ReadImage(chest_ct[0])[:, :, 15:17]
    results = []
    for run in range(2):
        bundle = fine_tune(*chest_ct, output=tmp_path / f"run{run}", slices=CHEST_SLICES, iterations=2,
                           device="cpu", seed=7)
        results.append(sitk.GetArrayFromImage(segment(bundle, image, device="cpu")))
        assert bundle.manifest["training"]["seed"] == 7
        assert bundle.manifest["versions"]["nnunetv2"] and bundle.manifest["versions"]["torch"]
    weights = [torch.load(tmp_path / f"run{r}" / "model.pth", weights_only=True)["network_weights"] for r in range(2)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert np.array_equal(results[0], results[1])


@pytest.mark.parametrize("field, value", [("files", "x"), ("encoder", None), ("classes", [{"value": "1"}]),
                                          ("trainer", 3)])
def test_malformed_manifest_is_refused(trained, tmp_path, field, value):
    folder = _copy(trained, tmp_path)
    manifest = json.loads((folder / "nnsam.json").read_text())
    manifest[field] = value
    (folder / "nnsam.json").write_text(json.dumps(manifest))
    with pytest.raises(NNSAMError, match="damaged"):
        Bundle.load(folder)
