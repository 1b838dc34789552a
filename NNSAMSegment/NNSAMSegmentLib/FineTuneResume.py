"""A stopped fine-tune that can be resumed: its job folder and what is needed to run the same command again.

A fine-tune job folder holds the exported image and labels, the bundle path the engine writes (``bundle``), and the
engine's hidden work folder beside it (``.bundle.nnsam-work``, holding nnU-Net's ``checkpoint_latest.pth``). A
small description file (:data:`DESCRIPTION_NAME`) written when the job starts makes the folder self-describing,
so only its path needs remembering across Slicer sessions.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from dataclasses import dataclass
from typing import Callable, Optional

from .EngineCommands import TrainOptions, validateClassNames, validateSlices
from .Errors import UserError

try:
    from slicer.i18n import tr as _
except ImportError:  # outside the Slicer application (tests with slicer-core): English
    def _(text: str) -> str:
        return text

DESCRIPTION_NAME = "nnsam-finetune.json"
IMAGE_NAME = "image.nrrd"
LABELS_NAME = "labels.nrrd"
BUNDLE_NAME = "bundle"
CHECKPOINT_NAME = "checkpoint_latest.pth"
_FORMAT_VERSION = 1
_OPTION_FIELDS = tuple(f.name for f in dataclasses.fields(TrainOptions) if f.name != "resume")


@dataclass(frozen=True)
class FineTuneRecord:
    jobDirectory: str
    bundleName: str
    title: str
    slices: tuple
    classNames: tuple
    options: TrainOptions

    @property
    def imagePath(self) -> str:
        return os.path.join(self.jobDirectory, IMAGE_NAME)

    @property
    def labelsPath(self) -> str:
        return os.path.join(self.jobDirectory, LABELS_NAME)

    @property
    def bundlePath(self) -> str:
        return os.path.join(self.jobDirectory, BUNDLE_NAME)

    @property
    def workDirectory(self) -> str:
        """The engine's work folder for this bundle path (``<parent>/.<bundle name>.nnsam-work``)."""
        return os.path.join(self.jobDirectory, f".{BUNDLE_NAME}.nnsam-work")

    def inputsExist(self) -> bool:
        return os.path.isfile(self.imagePath) and os.path.isfile(self.labelsPath)

    def hasCheckpoint(self) -> bool:
        """Whether the engine wrote a resumable checkpoint (without one, a resume starts the training over)."""
        pattern = os.path.join(glob.escape(self.workDirectory), "**", CHECKPOINT_NAME)
        return any(os.path.isfile(path) for path in glob.iglob(pattern, recursive=True))

    def describe(self) -> str:
        if self.hasCheckpoint():
            return f"{self.title}: stopped; resuming continues from its last checkpoint."
        return f"{self.title}: stopped before its first checkpoint; resuming trains again on the same annotations."

    # ------------------------------------------------------------------------------------------------ file
    def write(self) -> None:
        data = {"format_version": _FORMAT_VERSION, "bundleName": self.bundleName, "title": self.title,
                "slices": list(self.slices), "classNames": list(self.classNames),
                "options": {name: getattr(self.options, name) for name in _OPTION_FIELDS}}
        path = os.path.join(self.jobDirectory, DESCRIPTION_NAME)
        with open(path + ".partial", "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=1)
        os.replace(path + ".partial", path)

    @classmethod
    def read(cls, jobDirectory: str) -> "FineTuneRecord":
        """The record of ``jobDirectory``; a :class:`UserError` if the folder is gone, incomplete or unreadable."""
        jobDirectory = os.path.abspath(jobDirectory)
        path = os.path.join(jobDirectory, DESCRIPTION_NAME)
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
            if not isinstance(data, dict) or data.get("format_version") != _FORMAT_VERSION:
                raise ValueError("not a fine-tune description")
            stored = data["options"]
            options = TrainOptions(**{name: stored[name] for name in _OPTION_FIELDS if name in stored})
            options.validate()
            record = cls(jobDirectory=jobDirectory, bundleName=str(data["bundleName"]), title=str(data["title"]),
                         slices=tuple(validateSlices(data["slices"])),
                         classNames=tuple(validateClassNames(data["classNames"])), options=options)
        except (OSError, ValueError, KeyError, TypeError, UserError) as error:
            raise UserError(f"The stopped fine-tune in {jobDirectory} cannot be resumed ({error}).") from error
        if not record.inputsExist():
            raise UserError(f"The stopped fine-tune in {jobDirectory} cannot be resumed: its image or labels are "
                            "gone.")
        return record


def resumeNote(record: FineTuneRecord) -> str:
    """The sentence shown when a fine-tune stops or fails with its work kept."""
    if record.hasCheckpoint():
        return "Its work so far is kept: Resume fine-tune continues from the last checkpoint."
    return "Its inputs are kept: Resume fine-tune trains again on the same annotations (no checkpoint yet)."


def discardQuestion() -> tuple[str, str]:
    """(question, window title) asked before a new fine-tune discards a resumable one; translated in Slicer."""
    return (_("A stopped fine-tune can still be resumed. Start a new fine-tune and discard it?"),
            _("nnSAM: new fine-tune"))


def mayReplaceResumable(resumable: Optional[FineTuneRecord], confirm: Callable[[str, str], bool],
                        interactive: bool) -> bool:
    """Whether a new fine-tune may start. Starting one deletes the resumable fine-tune, so the user is asked
    (``confirm(question, title)``) when there is one; nobody is asked in testing or batch mode."""
    if resumable is None or not interactive:
        return True
    return bool(confirm(*discardQuestion()))
