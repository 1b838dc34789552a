"""A hostile but realistic user: bad inputs, odd output paths, damaged bundles and archives.

Every case must be refused before any work with a non-zero exit status, one or two lines on stderr naming the
problem, no traceback, and no file created or changed that the user had or did not ask for. The cases that need a
trained bundle share the session's one (``trained``); those that damage it work on a copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnsam_core.cli import main

SIZE = (6, 32, 32)  # slices, rows, columns


def _write(image: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(image, str(path), useCompression=str(path).endswith(".gz"))
    return path


def _image(rng=None) -> sitk.Image:
    rng = rng or np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.normal(0, 100, size=SIZE).astype(np.float32))
    image.SetSpacing((0.8, 0.8, 2.5))
    return image


def _labels(image: sitk.Image, values=(1, 2)) -> sitk.Image:
    array = np.zeros(SIZE, np.int16)
    array[1, 8:20, 8:20] = values[0]
    array[4, 10:22, 10:22] = values[1]
    labels = sitk.GetImageFromArray(array)
    labels.CopyInformation(image)
    return labels


def _truncate(path: Path, keep: float = 0.6) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    return path


def _rehash(bundle: Path, name: str) -> None:
    manifest = json.loads((bundle / "nnsam.json").read_text())
    manifest["files"][name] = hashlib.sha256((bundle / name).read_bytes()).hexdigest()
    (bundle / "nnsam.json").write_text(json.dumps(manifest))


def _edit_json(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


class Case:
    """The working folder of one case: the user's files, and the shared trained bundle."""

    def __init__(self, root: Path, bundle: Path, good_zip: Path):
        self.root = root
        self.shared_bundle = bundle
        self.good_zip = good_zip
        self.image = _write(_image(), root / "ct.nii.gz")
        self.labels = _write(_labels(sitk.ReadImage(str(self.image))), root / "labels.nii.gz")

    def path(self, name: str) -> Path:
        return self.root / name

    def bundle_copy(self, name: str = "model") -> Path:
        target = self.root / name
        shutil.copytree(self.shared_bundle, target)
        return target

    def train(self, *extra, labels=None, image=None, out=None):
        return ["train", image or self.image, labels or self.labels, "-o", out or self.path("new_model"),
                "--iterations", "1", "--device", "cpu", "--progress", "none", *extra]

    def predict(self, out, *extra, bundle=None, image=None):
        return ["predict", bundle or self.shared_bundle, image or self.image, "-o", out, "--device", "cpu",
                "--progress", "none", *extra]


def _labels_with(values) -> Callable[[Case], Path]:
    def make(c: Case) -> Path:
        return _write(_labels(sitk.ReadImage(str(c.image)), values), c.path("odd_labels.nii.gz"))
    return make


def _moved_labels(change: Callable[[sitk.Image], None]) -> Callable[[Case], Path]:
    def make(c: Case) -> Path:
        labels = sitk.ReadImage(str(c.labels))
        change(labels)
        return _write(labels, c.path("moved_labels.nii.gz"))
    return make


def _deny(monkeypatch, target: Path, mode: int) -> None:
    """As root every permission check passes; this makes os.access report what a normal user would see."""
    real = os.access

    def access(path, wanted, *args, **kwargs):
        if Path(path).resolve() == target.resolve() and wanted & mode:
            return False
        return real(path, wanted, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


def _seg_nrrd_from_other_volume(c: Case) -> Path:
    import slicerio
    seg = Path(slicerio.get_testdata_file("Segmentation.seg.nrrd"))
    return Path(shutil.copy(seg, c.path("other.seg.nrrd")))


def _damaged_zip(kind: str) -> Callable[[Case], Path]:
    def make(c: Case) -> Path:
        data = bytearray(c.good_zip.read_bytes())
        target = c.path("damaged.zip")
        with zipfile.ZipFile(c.good_zip) as archive:
            info = archive.getinfo("plans.json")
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
        if kind == "crc":
            data[start + 5] ^= 0xFF  # a flipped byte inside plans.json's compressed data
        else:  # the central directory understates plans.json's uncompressed size
            directory = bytes(data).find(b"PK\x01\x02", 0)
            while directory != -1:
                name_length = int.from_bytes(data[directory + 28:directory + 30], "little")
                if data[directory + 46:directory + 46 + name_length] == b"plans.json":
                    data[directory + 24:directory + 28] = (10).to_bytes(4, "little")
                    break
                directory = bytes(data).find(b"PK\x01\x02", directory + 4)
        target.write_bytes(bytes(data))
        return target
    return make


# name -> (setup returning argv, words the message must contain)
CASES: dict[str, Callable] = {}


def case(name: str, *words: str):
    def register(setup):
        CASES[name] = (setup, words)
        return setup
    return register


# ----------------------------------------------------------------------------------------------- train: outputs
case("train -o the input image", "overwrite the input")(lambda c, mp: c.train(out=c.image))
case("train -o the label map", "overwrite the input")(lambda c, mp: c.train(out=c.labels))
case("train -o an existing text file", "existing file")(
    lambda c, mp: (c.path("existing.txt").write_text("mine"), c.train(out=c.path("existing.txt")))[1])
case("train -o a folder with the user's files", "other files")(
    lambda c, mp: (c.path("results").mkdir(), c.path("results/notes.txt").write_text("x"),
                   c.train(out=c.path("results")))[2])
case("train -o a bundle with the user's files --overwrite", "other files")(
    lambda c, mp: (c.path("model_with_notes").mkdir(), [shutil.copy(p, c.path("model_with_notes"))
                   for p in c.shared_bundle.iterdir()], c.path("model_with_notes/notes.txt").write_text("x"),
                   c.train("--overwrite", out=c.path("model_with_notes")))[3])
case("train -o an existing bundle", "--overwrite")(lambda c, mp: c.train(out=c.bundle_copy()))
case("train -o .", "names a folder")(lambda c, mp: c.train(out=Path(".")))
case("train -o ..", "names a folder")(lambda c, mp: c.train(out=Path("..")))
case("train -o under /dev/null", "not a folder")(lambda c, mp: c.train(out=Path("/dev/null/model")))
case("train -o under a missing folder", "does not exist")(lambda c, mp: c.train(out=c.path("missing/sub/model")))
case("train -o under a missing mount", "does not exist")(lambda c, mp: c.train(out=Path("/mnt/nnsam-missing/m")))
case("train -o a read-only folder", "permission denied")(
    lambda c, mp: (c.path("readonly").mkdir(), _deny(mp, c.path("readonly"), os.W_OK),
                   c.train(out=c.path("readonly/model")))[2])
case("train -o a link", "existing link")(
    lambda c, mp: (os.symlink(c.path("nowhere"), c.path("link")), c.train(out=c.path("link")))[1])

# ----------------------------------------------------------------------------------------------- train: inputs
case("train a missing image", "does not exist")(lambda c, mp: c.train(image=c.path("missing.nii.gz")))
case("train a missing label map", "does not exist")(lambda c, mp: c.train(labels=c.path("missing.nii.gz")))
case("train an unreadable image", "permission denied")(
    lambda c, mp: (_deny(mp, c.image, os.R_OK), c.train())[1])
case("train a truncated .nii.gz", "incomplete")(lambda c, mp: c.train(image=_truncate(c.image)))
case("train a truncated .nii", "incomplete")(
    lambda c, mp: c.train(image=_truncate(_write(sitk.ReadImage(str(c.image)), c.path("ct.nii")))))
case("train a truncated .nrrd", "incomplete")(
    lambda c, mp: c.train(image=_truncate(_write(sitk.ReadImage(str(c.image)), c.path("ct.nrrd")))))
case("train a truncated .mha", "incomplete")(
    lambda c, mp: c.train(image=_truncate(_write(sitk.ReadImage(str(c.image)), c.path("ct.mha")))))
case("train a truncated label map", "incomplete")(lambda c, mp: c.train(labels=_truncate(c.labels)))
case("train a text file as image", "could not be read")(
    lambda c, mp: (c.path("notes.nii.gz").write_text("not an image"), c.train(image=c.path("notes.nii.gz")))[1])
case("train labels 0, 1, 1000", "1..N", "1000 to 2")(lambda c, mp: c.train(labels=_labels_with((1, 1000))(c)))
case("train a 0/255 mask", "1..N", "255 to 1")(lambda c, mp: c.train(labels=_labels_with((255, 255))(c)))
case("train negative labels", "negative")(lambda c, mp: c.train(labels=_labels_with((1, -2))(c)))
case("train float labels", "non-integer")(
    lambda c, mp: c.train(labels=_write(sitk.Cast(sitk.ReadImage(str(c.labels)), sitk.sitkFloat32) * 0.5,
                                        c.path("float_labels.nii.gz"))))
case("train labels of another spacing", "spacing")(
    lambda c, mp: c.train(labels=_moved_labels(lambda im: im.SetSpacing((1.0, 1.0, 2.5)))(c)))
case("train labels of another origin", "origin")(
    lambda c, mp: c.train(labels=_moved_labels(lambda im: im.SetOrigin((5.0, 0.0, 0.0)))(c)))
case("train labels of another direction", "direction")(
    lambda c, mp: c.train(labels=_moved_labels(lambda im: im.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, 1)))(c)))
case("train labels of another size", "size")(
    lambda c, mp: c.train(labels=_write(sitk.ReadImage(str(c.labels))[:, :, :4], c.path("short.nii.gz"))))
case("train a .seg.nrrd drawn on another volume", "not drawn on this image")(
    lambda c, mp: c.train(labels=_seg_nrrd_from_other_volume(c)))
case("train --slices -1,4", "count from 0")(lambda c, mp: c.train("--slices", "-1,4"))
case("train --slices=-1", "count from 0")(lambda c, mp: c.train("--slices=-1"))
case("train --slices 99", "outside")(lambda c, mp: c.train("--slices", "99"))
case("train --slices a,b", "comma-separated")(lambda c, mp: c.train("--slices", "a,b"))
case("train --slices on unpainted slices", "hold no label")(lambda c, mp: c.train("--slices", "0,2"))
case("train --slices ,", "empty")(lambda c, mp: c.train("--slices", ","))
case("train duplicate class names", "distinct")(lambda c, mp: c.train("--class-names", "LV,LV"))
case("train too few class names", "named")(lambda c, mp: c.train("--class-names", "LV"))
case("train --iterations 0", "at least 1")(lambda c, mp: c.train("--iterations", "0"))
case("train --max-size 10", "max-size")(lambda c, mp: c.train("--max-size", "10"))
case("train --recompute-share 2", "0 to 1")(lambda c, mp: c.train("--recompute-share", "2"))
case("train --recompute-share nan", "0 to 1")(lambda c, mp: c.train("--recompute-share", "nan"))
case("train nnunet with a share", "nnunet has none")(
    lambda c, mp: c.train("--method", "nnunet", "--recompute-share", "0.5"))
case("train an RGB image", "components")(
    lambda c, mp: c.train(image=_write(sitk.Compose([sitk.ReadImage(str(c.image))] * 3), c.path("rgb.nii.gz"))))
case("train a tiny image", "at least")(
    lambda c, mp: c.train(image=_write(sitk.ReadImage(str(c.image))[:8, :8, :], c.path("tiny.nii.gz")),
                          labels=_write(sitk.ReadImage(str(c.labels))[:8, :8, :], c.path("tiny_l.nii.gz"))))
case("train an image with NaN", "NaN")(lambda c, mp: c.train(image=_with_nan(c)))
case("train an empty label map", "no annotated slice")(lambda c, mp: c.train(labels=_labels_with((0, 0))(c)))
case("train a folder without dataset.json", "dataset.json")(
    lambda c, mp: (c.path("notdataset").mkdir(), ["train", c.path("notdataset"), "-o", c.path("m")])[1])
case("train image, labels and --dataset", "not both")(
    lambda c, mp: c.train("--dataset", str(c.root)))
case("train --resume with other inputs", "other inputs or settings")(lambda c, mp: _stopped_training(c))

# ----------------------------------------------------------------------------------------------- predict
case("predict -o the input image", "overwrite the input")(lambda c, mp: c.predict(c.image, "--overwrite"))
case("predict -o an existing file", "already exists")(
    lambda c, mp: (c.path("old.nii.gz").write_bytes(b"mine"), c.predict(c.path("old.nii.gz")))[1])
case("predict -o an existing folder", "existing folder")(
    lambda c, mp: (c.path("out.nii.gz").mkdir(), c.predict(c.path("out.nii.gz")))[1])
case("predict -o without an extension", "ending in")(lambda c, mp: c.predict(c.path("labels_out")))
case("predict -o a bare extension", "ending in")(lambda c, mp: c.predict(c.path(".nii.gz")))
case("predict -o under a missing folder", "does not exist")(lambda c, mp: c.predict(c.path("no/such/x.nii.gz")))
case("predict -o under /dev/null", "not a folder")(lambda c, mp: c.predict(Path("/dev/null/x.nii.gz")))
case("predict -o a read-only folder", "permission denied")(
    lambda c, mp: (c.path("ro").mkdir(), _deny(mp, c.path("ro"), os.W_OK), c.predict(c.path("ro/x.nii.gz")))[2])
case("predict -o into the bundle", "overwrite the input")(
    lambda c, mp: c.predict(c.shared_bundle / "x.nii.gz"))
case("predict with a missing bundle", "does not exist")(
    lambda c, mp: c.predict(c.path("x.nii.gz"), bundle=c.path("nobundle")))
case("predict a truncated image", "incomplete")(
    lambda c, mp: c.predict(c.path("x.nii.gz"), image=_truncate(c.image)))
case("predict with classes that disagree", "inconsistent")(
    lambda c, mp: (lambda b: (_edit_json(b / "nnsam.json", lambda m: m.update(classes=m["classes"][:1])),
                              c.predict(c.path("x.nii.gz"), bundle=b))[1])(c.bundle_copy()))
case("predict with a clean-up of classes it lacks", "postprocessing names classes")(
    lambda c, mp: (lambda b: (_edit_json(b / "nnsam.json", lambda m: m.update(postprocessing={
        "largest_component": [1, 99]})), c.predict(c.path("x.nii.gz"), bundle=b))[1])(c.bundle_copy()))
case("predict with plans lacking 2d", "no '2d' configuration")(
    lambda c, mp: (lambda b: (_edit_json(b / "plans.json", lambda p: p.update(
        configurations={"3d": p["configurations"]["2d"]})), _rehash(b, "plans.json"),
        c.predict(c.path("x.nii.gz"), bundle=b))[2])(c.bundle_copy()))
case("predict with dataset.json of other classes", "inconsistent")(
    lambda c, mp: (lambda b: (_edit_json(b / "dataset.json", lambda d: d["labels"].update(extra=99)),
                              _rehash(b, "dataset.json"), c.predict(c.path("x.nii.gz"), bundle=b))[2])(c.bundle_copy()))
case("predict with model.pth a link", "is a link")(
    lambda c, mp: (lambda b: (shutil.move(b / "model.pth", c.path("real.pth")), os.symlink(c.path("real.pth"),
                              b / "model.pth"), c.predict(c.path("x.nii.gz"), bundle=b))[2])(c.bundle_copy()))
case("predict with a truncated model.pth", "damaged")(
    lambda c, mp: (lambda b: (_truncate(b / "model.pth"), _rehash(b, "model.pth"),
                              c.predict(c.path("x.nii.gz"), bundle=b))[2])(c.bundle_copy()))
case("predict with a network of other classes", "inconsistent")(
    lambda c, mp: (lambda b: (_drop_a_class(b), c.predict(c.path("x.nii.gz"), bundle=b))[1])(c.bundle_copy()))
case("predict with broken nnsam.json", "not valid JSON")(
    lambda c, mp: (lambda b: ((b / "nnsam.json").write_text("{broken"),
                              c.predict(c.path("x.nii.gz"), bundle=b))[1])(c.bundle_copy()))
case("predict with an unknown trainer", "does not know")(
    lambda c, mp: (lambda b: (_edit_json(b / "nnsam.json", lambda m: m.update(trainer="EvilTrainer")),
                              c.predict(c.path("x.nii.gz"), bundle=b))[1])(c.bundle_copy()))
case("predict with format version 99", "format version")(
    lambda c, mp: (lambda b: (_edit_json(b / "nnsam.json", lambda m: m.update(format_version=99)),
                              c.predict(c.path("x.nii.gz"), bundle=b))[1])(c.bundle_copy()))
case("predict with a tampered plans.json", "SHA-256")(
    lambda c, mp: (lambda b: (_edit_json(b / "plans.json", lambda p: p.update(note="x")),
                              c.predict(c.path("x.nii.gz"), bundle=b))[1])(c.bundle_copy()))
case("predict with an invalid SAM setting", "invalid nnsam_config")(
    lambda c, mp: (lambda b: (_edit_json(b / "nnsam.json", lambda m: m["nnsam_config"].update(inject_stride=3)),
                              c.predict(c.path("x.nii.gz"), bundle=b))[1])(c.bundle_copy()))
case("predict with a text file as bundle", "neither a bundle folder nor a .zip")(
    lambda c, mp: (c.path("b.txt").write_text("x"), c.predict(c.path("x.nii.gz"), bundle=c.path("b.txt")))[1])

# ----------------------------------------------------------------------------------------------- bundle export
case("export over an image", "ending in .zip")(
    lambda c, mp: ["bundle", "export", c.shared_bundle, c.image])
case("export over an existing .zip", "already exists")(
    lambda c, mp: (c.path("old.zip").write_bytes(b"mine"), ["bundle", "export", c.shared_bundle, c.path("old.zip")])[1])
case("export to a folder named .zip", "existing folder")(
    lambda c, mp: (c.path("dir.zip").mkdir(), ["bundle", "export", c.shared_bundle, c.path("dir.zip")])[1])
case("export under a missing folder", "does not exist")(
    lambda c, mp: ["bundle", "export", c.shared_bundle, c.path("no/such.zip")])
case("export a folder that is no bundle", "not an nnSAM bundle")(
    lambda c, mp: (c.path("plain").mkdir(), ["bundle", "export", c.path("plain"), c.path("p.zip")])[1])

# ----------------------------------------------------------------------------------------------- bundle import
case("import into a folder with the user's files", "other files")(
    lambda c, mp: (c.path("team").mkdir(), c.path("team/notes.txt").write_text("x"),
                   ["bundle", "import", c.good_zip, c.path("team")])[2])
case("import over an existing bundle", "--overwrite")(
    lambda c, mp: ["bundle", "import", c.good_zip, c.bundle_copy()])
case("import over an existing file", "existing file")(
    lambda c, mp: ["bundle", "import", c.good_zip, c.image])
case("import a zip with a bad checksum", "damaged")(
    lambda c, mp: ["bundle", "import", _damaged_zip("crc")(c), c.path("imported")])
case("import a zip whose header understates a size", "damaged")(
    lambda c, mp: ["bundle", "import", _damaged_zip("size")(c), c.path("imported")])
case("import a file that is no zip", "nor a .zip bundle")(
    lambda c, mp: ["bundle", "import", c.image, c.path("imported")])
case("import a missing zip", "does not exist")(
    lambda c, mp: ["bundle", "import", c.path("missing.zip"), c.path("imported")])
case("import into a missing folder", "does not exist")(
    lambda c, mp: ["bundle", "import", c.good_zip, c.path("no/such/imported")])

# ----------------------------------------------------------------------------------------------- evaluate
case("evaluate a truncated prediction", "incomplete")(
    lambda c, mp: ["evaluate", _truncate(_write(sitk.ReadImage(str(c.labels)), c.path("pred.nii.gz"))), c.labels])
case("evaluate a missing prediction", "")(lambda c, mp: ["evaluate", c.path("none.nii.gz"), c.labels])
case("evaluate on another grid", "spacing")(
    lambda c, mp: ["evaluate", _moved_labels(lambda im: im.SetSpacing((1.0, 1.0, 2.5)))(c), c.labels])


def _with_nan(c: Case) -> Path:
    image = sitk.ReadImage(str(c.image))
    array = sitk.GetArrayFromImage(image)
    array[2, 3, 4] = np.nan
    nan = sitk.GetImageFromArray(array)
    nan.CopyInformation(image)
    return _write(nan, c.path("nan.nrrd"))  # ITK reads NaN in NIfTI files as 0


def _drop_a_class(bundle: Path) -> None:
    """A network whose output layer has one channel fewer than the manifest's classes, its hash updated."""
    checkpoint = torch.load(bundle / "model.pth", weights_only=True)
    weights = checkpoint["network_weights"]
    for key in [k for k in weights if k.startswith("decoder.seg_layers.")]:
        weights[key] = weights[key][:-1]
    torch.save(checkpoint, bundle / "model.pth")
    _rehash(bundle, "model.pth")


def _stopped_training(c: Case):
    """A stopped training's work folder, as fine_tune leaves it, whose recorded inputs differ from today's."""
    from nnsam_core.finetune import _work_dir_for
    from nnsam_core.workspace import Workspace

    out = c.path("resumed_model")
    workspace = Workspace(_work_dir_for(out))
    fold = workspace.output_folder("nnUNetTrainerNNSAM")
    fold.mkdir(parents=True)
    (fold / "checkpoint_latest.pth").write_bytes(b"checkpoint")
    (workspace.root / "inputs.json").write_text(json.dumps({"data_sha256": "0" * 64, "slices": [1, 4]}))
    return c.train("--resume", out=out)


def _snapshot(*roots: Path) -> dict:
    state = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            info = path.lstat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() and not path.is_symlink() \
                and info.st_size < 2_000_000 else None
            state[str(path)] = (info.st_mode, info.st_size, info.st_mtime_ns, digest)
    return state


@pytest.fixture(scope="module")
def good_zip(trained, tmp_path_factory):
    from nnsam_core.bundle_files import export_zip
    bundle, _ = trained
    return export_zip(bundle.path, tmp_path_factory.mktemp("hostile-zip") / "good.zip")


def test_the_battery_is_large_enough():
    assert len(CASES) >= 60


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_case_is_refused_cleanly(name, trained, good_zip, tmp_path, capsys, monkeypatch):
    setup, words = CASES[name]
    bundle, _ = trained
    work = tmp_path / "user"
    work.mkdir()
    c = Case(work, Path(bundle.path), good_zip)
    argv = [str(a) for a in setup(c, monkeypatch)]
    capsys.readouterr()
    before = _snapshot(work, Path(bundle.path))
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code not in (0, 1), (code, err)  # refused as the user's mistake, not an internal error
    lines = err.splitlines()
    assert 1 <= len(lines) <= 2 and lines[0].startswith("nnsam: error: "), err
    assert "Traceback" not in err and "np.float64" not in err and len(err) < 400, err
    for word in words:
        assert word.lower() in err.lower(), (word, err)
    after = _snapshot(work, Path(bundle.path))
    changed = sorted(set(before) ^ set(after)) + sorted(k for k in before if k in after and before[k] != after[k])
    assert changed == []  # nothing created, changed or removed
