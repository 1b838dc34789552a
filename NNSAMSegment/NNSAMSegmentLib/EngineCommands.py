"""Command lines of the engine (``python -m nnsam_core.cli VERB ...``).

Only this module knows the engine's flags, so a change of the engine's interface is a change here. Inputs are
validated first, so a bad choice becomes a one-line :class:`UserError` instead of an engine usage error.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

from .Errors import UserError

ENCODERS = ("litemedsam", "mobilesam")
DEFAULT_ENCODER = "litemedsam"
METHODS = ("nnsam", "nnunet")  # the engine's user command line; research controls stay in its research harness
PRESETS = ("quick", "full")
DEVICES = ("auto", "cpu", "cuda", "mps")
ENGINE_MODULE = "nnsam_core.cli"
RECOMPUTE_SHARES = (0.0, 0.1, 0.25, 1.0)
DEFAULT_RECOMPUTE_SHARE = 0.1


@dataclass(frozen=True)
class EngineCommand:
    program: str
    args: tuple

    def commandLine(self) -> str:
        """Readable command line for the log (not for a shell)."""
        return " ".join([self.program, *self.args])


@dataclass
class TrainOptions:
    encoder: str = DEFAULT_ENCODER
    method: str = "nnsam"
    preset: str = "quick"
    device: str = "auto"
    iterations: Optional[int] = None
    resume: bool = False
    startFrom: Optional[str] = None  # a saved model's bundle folder to adapt instead of learning from scratch
    recomputeShare: Optional[float] = None  # share of steps with fresh embeddings (None: the engine's default)

    def validate(self) -> None:
        _checkChoice("encoder", self.encoder, ENCODERS)
        _checkChoice("method", self.method, METHODS)
        _checkChoice("preset", self.preset, PRESETS)
        _checkChoice("device", self.device, DEVICES)
        if self.iterations is not None and _asCount(self.iterations) < 1:
            raise UserError(f"The number of iterations must be a whole number of 1 or more, not {self.iterations}.")
        if self.recomputeShare is not None:
            share = _asShare(self.recomputeShare)
            if share is None:
                raise UserError("The share of training steps with fresh embeddings must be a number from 0 to 1, "
                                f"not {self.recomputeShare}.")
            if share > 0 and self.method == "nnunet":
                raise UserError("Fresh embeddings apply to nnSAM's SAM encoder, which method nnunet does not have; "
                                "choose cached embeddings or another method.")


def _asShare(value) -> Optional[float]:
    """The float value of a number from 0 to 1, or None for anything else (bools, text, NaN, out of range)."""
    if isinstance(value, bool):
        return None
    try:
        share = float(value)
    except (TypeError, ValueError):
        return None
    return share if 0.0 <= share <= 1.0 else None


def _asCount(value) -> int:
    """The int value of a whole number, or -1 for anything else (bools, fractions, text)."""
    if isinstance(value, bool):
        return -1
    try:
        number = int(value)
    except (TypeError, ValueError):
        return -1
    return number if number == value or str(number) == str(value).strip() else -1


def _checkChoice(what: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise UserError(f"Unknown {what} '{value}'; choose one of: {', '.join(choices)}.")


def validateClassNames(classNames: Sequence[str]) -> list[str]:
    names = [str(name) for name in classNames]
    if not names:
        raise UserError("No classes to learn: the annotation segmentation has no painted segment.")
    for name in names:
        if not name.strip():
            raise UserError("A segment has an empty name; give every annotated segment a name.")
        if "," in name:
            raise UserError(f"Segment name '{name}' contains a comma; rename it (commas separate class names).")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise UserError(f"Two segments are named '{duplicates[0]}'; give each annotated segment its own name.")
    return names


def validateSlices(slices: Sequence[int]) -> list[int]:
    result = sorted({int(k) for k in slices})
    if not result:
        raise UserError("No annotated slices: paint the structures on a few slices first.")
    if result[0] < 0:
        raise UserError(f"Slice index {result[0]} is negative.")
    return result


def defaultPythonExecutable() -> str:
    """The Python that runs the engine: PythonSlicer inside Slicer (same packages as Slicer), else this one."""
    found = shutil.which("PythonSlicer")
    if found:
        return found
    return sys.executable


class EngineCommandBuilder:
    """Builds engine command lines.

    ``launcher`` are the arguments between the interpreter and the verb: ``["-m", "nnsam_core.cli"]`` by default;
    tests pass the path of a fake engine script instead.
    """

    def __init__(self, pythonExecutable: Optional[str] = None, launcher: Optional[Sequence[str]] = None,
                 progressFormat: str = "json"):
        self.pythonExecutable = pythonExecutable or defaultPythonExecutable()
        self.launcher = list(launcher) if launcher is not None else ["-m", ENGINE_MODULE]
        self.progressFormat = progressFormat

    def _command(self, *args) -> EngineCommand:
        return EngineCommand(self.pythonExecutable, tuple(self.launcher) + tuple(str(a) for a in args))

    def train(self, image: str, labels: str, outputDir: str, slices: Sequence[int], classNames: Sequence[str],
              options: TrainOptions) -> EngineCommand:
        options.validate()
        args = ["train", os.fspath(image), os.fspath(labels), "-o", os.fspath(outputDir),
                "--slices", ",".join(str(k) for k in validateSlices(slices)),
                "--class-names", ",".join(validateClassNames(classNames))]
        if options.startFrom:  # the saved model brings its own encoder, method and SAM settings
            args += ["--start-from", os.fspath(options.startFrom)]
        else:
            args += ["--encoder", options.encoder, "--method", options.method]
        args += ["--preset", options.preset, "--device", options.device]
        if options.iterations is not None:
            args += ["--iterations", int(options.iterations)]
        if options.recomputeShare is not None and not options.startFrom:
            args += ["--recompute-share", f"{float(options.recomputeShare):g}"]
        if options.resume:
            args.append("--resume")
        args += ["--progress", self.progressFormat]
        return self._command(*args)

    def estimate(self, image: str, painted: int, options: TrainOptions) -> EngineCommand:
        """The expected time of the fine-tune ``options`` describe on ``painted`` slices of ``image``, plus the
        segmentation of all of its slices (one JSON object on stdout)."""
        options.validate()
        if options.startFrom:
            raise ValueError("estimate the adapted model's method and schedule (Estimates.estimateRequest)")
        if _asCount(painted) < 1:
            raise UserError(f"The number of painted slices must be 1 or more, not {painted}.")
        args = ["estimate", os.fspath(image), "--slices", int(painted), "--method", options.method,
                "--encoder", options.encoder, "--device", options.device, "--preset", options.preset]
        if options.iterations is not None:
            args += ["--iterations", int(options.iterations)]
        if options.recomputeShare is not None and options.method == "nnsam":
            args += ["--recompute-share", f"{float(options.recomputeShare):g}"]
        args.append("--json")
        return self._command(*args)

    def predict(self, bundleDir: str, image: str, outputLabelmap: str, device: str = "auto") -> EngineCommand:
        _checkChoice("device", device, DEVICES)
        return self._command("predict", os.fspath(bundleDir), os.fspath(image), "-o", os.fspath(outputLabelmap),
                             "--device", device, "--progress", self.progressFormat)

    def weightsStatus(self) -> EngineCommand:
        return self._command("weights", "status", "--json")

    def weightsDownload(self, encoder: str) -> EngineCommand:
        _checkChoice("encoder", encoder, ENCODERS)
        return self._command("weights", "download", encoder, "--progress", self.progressFormat)

    def weightsImport(self, encoder: str, file: str) -> EngineCommand:
        _checkChoice("encoder", encoder, ENCODERS)
        return self._command("weights", "import", encoder, os.fspath(file))

    def bundleExport(self, bundleDir: str, zipPath: str) -> EngineCommand:
        return self._command("bundle", "export", os.fspath(bundleDir), os.fspath(zipPath))

    def bundleImport(self, zipPath: str, outputDir: str) -> EngineCommand:
        return self._command("bundle", "import", os.fspath(zipPath), os.fspath(outputDir))
