"""One run of the engine: its temporary folder, progress, log, stop, and the plain-words outcome.

Everything the job writes lives in its own temporary folder, and results leave that folder only after the engine
exited with status 0 (the ``onSuccess`` callback moves or imports them). A stopped or failed job deletes the folder
once its process has ended, so it never leaves a half-written bundle or label map where the user keeps theirs.
The one exception is asked for by the ``keepFolder`` callback: a stopped training keeps its folder (never the
user's bundle store) so that it can be resumed from its last checkpoint.
"""

from __future__ import annotations

import collections
import enum
import logging
import os
import shutil
import tempfile
import time
from typing import Callable, Optional

from .EngineCommands import EngineCommand
from .Errors import UserError
from .ProcessRunner import STOP_GRACE_SECONDS, ProcessRunner
from .Progress import LineSplitter, ProgressTracker, parseErrorLine, parseProgressLine
from .Signal import Signal

KEEP_JOB_DIR_VARIABLE = "NNSAM_KEEP_JOB_DIR"  # set to 1 to keep job folders for debugging

# Stop protocol. Signals do not reach the engine inside Slicer (PythonSlicer is a launcher that runs the real
# interpreter as a child and forwards none; Windows has no interrupt for a process without a console), so a job
# asks its engine to stop with a file: the engine is started with STOP_FILE_VARIABLE naming a file in the job folder
# and, once that file exists, ends as on Ctrl-C (its clean-up runs, exit status 130). The runner kills the whole
# process tree if the engine has not ended after its grace period.
STOP_FILE_VARIABLE = "NNSAM_STOP_FILE"
STOP_FILE_NAME = "nnsam-stop"


class JobState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"


def createJobDirectory(baseDirectory: Optional[str] = None, prefix: str = "nnsam-job-") -> str:
    if baseDirectory:
        os.makedirs(baseDirectory, exist_ok=True)
    return tempfile.mkdtemp(prefix=prefix, dir=baseDirectory)


class EngineJob:
    """Runs ``command`` through ``runner`` and reports progress and the outcome.

    Signals: ``progress(ProgressEvent)``, ``logged(str)`` for every line of output, ``finished(EngineJob)`` once.
    ``onSuccess(job)`` runs after exit status 0 and before the folder is deleted; a :class:`UserError` it raises
    turns the job into a failure with that message. ``keepFolder(job)`` is asked after a stop or failure: it
    returns None to delete the folder as usual, or a sentence for the user (e.g. how to resume) to keep it.
    """

    MAX_LOG_LINES = 2000

    def __init__(self, runner: ProcessRunner, command: EngineCommand, jobDirectory: str, title: str = "",
                 onSuccess: Optional[Callable[["EngineJob"], None]] = None, env: Optional[dict] = None,
                 clock: Callable[[], float] = time.monotonic, kind: str = "",
                 keepFolder: Optional[Callable[["EngineJob"], Optional[str]]] = None):
        self.runner = runner
        self.command = command
        self.jobDirectory = jobDirectory
        self.title = title or "Engine job"
        self.kind = kind  # what the job does, e.g. "fine-tune", "predict", "weights-status"
        self.onSuccess = onSuccess
        self.keepFolder = keepFolder
        self.env = env
        self.clock = clock
        self.stopGraceSeconds = STOP_GRACE_SECONDS  # after a stop request, the process tree is killed after this

        self.progress = Signal()
        self.logged = Signal()
        self.finished = Signal()

        self.state = JobState.NEW
        self.exitCode: Optional[int] = None
        self.errorMessage = ""
        self.result = None  # set by onSuccess, e.g. the adopted bundle or the result segmentation node
        self.folderKept = False  # True when keepFolder kept the folder of a stopped or failed job
        self.stagesSeen: set = set()  # the progress stages the engine reported, e.g. {"prepare", "train"}
        self.tracker = ProgressTracker()
        self.logLines: collections.deque = collections.deque(maxlen=self.MAX_LOG_LINES)
        self.stdoutLines: collections.deque = collections.deque(maxlen=self.MAX_LOG_LINES)  # non-progress stdout
        self.startTime: Optional[float] = None
        self.endTime: Optional[float] = None

        self._stdout = LineSplitter()
        self._stderr = LineSplitter()
        self._engineError = ""  # from "nnsam: error: ..." on stderr
        # A crash's last words go to stderr; its lines and stdout's reach the log from two pipes in no fixed order.
        self._lastStderrLine = ""
        self._errorEventMessage = ""  # from a {"stage": "error"} line on stdout
        self._stopRequested = False
        self._connections = []

    # ------------------------------------------------------------------------------------------------ control
    @property
    def isRunning(self) -> bool:
        return self.state == JobState.RUNNING

    @property
    def stopFile(self) -> str:
        return os.path.join(self.jobDirectory, STOP_FILE_NAME)

    def _environment(self) -> dict:
        env = dict(self.env or {})
        env[STOP_FILE_VARIABLE] = self.stopFile
        return env

    def start(self) -> None:
        if self.state != JobState.NEW:
            raise RuntimeError("a job can only be started once")
        try:
            os.remove(self.stopFile)  # left by an earlier stop of a resumed job
        except OSError:
            pass
        self._connections = [
            (self.runner.stdoutReceived, self.runner.stdoutReceived.connect(self._onStdout)),
            (self.runner.stderrReceived, self.runner.stderrReceived.connect(self._onStderr)),
            (self.runner.finished, self.runner.finished.connect(self._onFinished)),
        ]
        self.state = JobState.RUNNING
        self.startTime = self.clock()
        self._log(f"$ {self.command.commandLine()}")
        try:
            self.runner.start(self.command.program, list(self.command.args), env=self._environment(),
                              workingDirectory=self.jobDirectory)
        except Exception as error:  # reported like any failure, so the job never stays "running"
            self._onFinished(None, f"Could not start the engine: {error}")

    def stop(self) -> None:
        """Ask the engine to stop; ``finished`` follows once the process has really ended."""
        if self.state != JobState.RUNNING:
            return
        self._stopRequested = True
        self._log("Stop requested: asking the engine to end.")
        try:
            with open(self.stopFile, "w", encoding="utf-8") as handle:
                handle.write("stop\n")
        except OSError as error:  # the runner's grace period still ends the process
            self._log(f"Could not write {self.stopFile} ({error.strerror or error}); the engine will be killed.")
        self.runner.stop(self.stopGraceSeconds)

    def wait(self, timeoutSeconds: Optional[float] = None) -> bool:
        """Block until the job finished (scripts, tests, Slicer self-test). True if it did."""
        if self.state == JobState.RUNNING:
            self.runner.waitForFinished(timeoutSeconds)
        return self.state not in (JobState.NEW, JobState.RUNNING)

    @property
    def elapsedSeconds(self) -> Optional[float]:
        if self.startTime is None:
            return None
        return (self.endTime if self.endTime is not None else self.clock()) - self.startTime

    # ------------------------------------------------------------------------------------------------ output
    def _log(self, line: str) -> None:
        self.logLines.append(line)
        self.logged.emit(line)

    def _onStdout(self, chunk) -> None:
        for line in self._stdout.feed(chunk):
            self._handleStdoutLine(line)

    def _onStderr(self, chunk) -> None:
        for line in self._stderr.feed(chunk):
            self._handleStderrLine(line)

    def _handleStdoutLine(self, line: str) -> None:
        event = parseProgressLine(line)
        if event is None:
            self.stdoutLines.append(line)
            if line.strip():
                self._log(line)
            return
        if event.stage == "error" and event.message:
            self._errorEventMessage = event.message
        self.stagesSeen.add(event.stage)
        self.tracker.update(event, self.clock())
        self.progress.emit(event)

    def _handleStderrLine(self, line: str) -> None:
        message = parseErrorLine(line)
        if message:
            self._engineError = message
        if line.strip():
            self._lastStderrLine = line
            self._log(line)

    @property
    def stdoutText(self) -> str:
        """What the engine printed on stdout besides progress lines (e.g. the answer of ``weights status``)."""
        return "\n".join(self.stdoutLines)

    # ------------------------------------------------------------------------------------------------ outcome
    def _onFinished(self, exitCode: Optional[int], errorText: str) -> None:
        if self.state != JobState.RUNNING:
            return
        for line in self._stdout.flush():
            self._handleStdoutLine(line)
        for line in self._stderr.flush():
            self._handleStderrLine(line)
        for signal, connectionId in self._connections:
            signal.disconnect(connectionId)
        self.exitCode = exitCode
        self.endTime = self.clock()
        if errorText:
            self._log(errorText)

        finishedCleanly = exitCode == 0 and not self._errorEventMessage
        if self._stopRequested and not finishedCleanly:
            self.state = JobState.STOPPED
            self.errorMessage = "Stopped; nothing was saved."
        elif finishedCleanly:
            if self._stopRequested:  # the engine finished before the stop reached it: its result is complete
                self._log("The engine had already finished when the stop was requested; its result is kept.")
            self._runOnSuccess()
        else:
            self.state = JobState.FAILED
            self.errorMessage = self._failureMessage(exitCode, errorText)

        note = self._askKeepFolder() if self.state != JobState.SUCCEEDED else None
        if note:
            self.folderKept = True
            self.errorMessage = f"Stopped; no model was saved. {note}" if self.state == JobState.STOPPED \
                else f"{self.errorMessage} {note}"
            self._log(f"Kept job folder {self.jobDirectory}: {note}")
        else:
            self._cleanUp()
        if self.state == JobState.FAILED:
            self._log(f"Failed: {self.errorMessage}")
        self.finished.emit(self)

    def _askKeepFolder(self) -> Optional[str]:
        if self.keepFolder is None:
            return None
        try:
            return self.keepFolder(self) or None
        except Exception:  # a bug: fall back to the safe default (nothing half-finished is kept)
            logging.exception("NNSAMSegment: deciding whether to keep the job folder failed")
            return None

    def _runOnSuccess(self) -> None:
        try:
            if self.onSuccess is not None:
                self.onSuccess(self)
            self.state = JobState.SUCCEEDED
        except UserError as error:
            self.state = JobState.FAILED
            self.errorMessage = str(error)
        except Exception as error:  # a bug, but the user must still see it in the panel
            logging.exception("NNSAMSegment: importing the engine's result failed")
            self.state = JobState.FAILED
            self.errorMessage = f"Could not use the engine's result ({error.__class__.__name__}: {error})."

    def _failureMessage(self, exitCode: Optional[int], errorText: str) -> str:
        if self._engineError:
            return self._engineError
        if self._errorEventMessage:
            return self._errorEventMessage
        if errorText:
            return errorText
        lastLine = self._lastStderrLine or next((line for line in reversed(self.logLines)
                                                 if not line.startswith("$ ")), "")
        reason = "crashed or was killed" if exitCode is None else f"stopped with exit code {exitCode}"
        message = f"The engine {reason}."
        if lastLine:
            message += f" Last message: {lastLine.strip()}"
        return message + " See the log for details."

    def _cleanUp(self) -> None:
        if os.environ.get(KEEP_JOB_DIR_VARIABLE) == "1":
            self._log(f"Kept job folder {self.jobDirectory} ({KEEP_JOB_DIR_VARIABLE}=1).")
            return
        shutil.rmtree(self.jobDirectory, ignore_errors=True)
        if os.path.exists(self.jobDirectory):
            self._log(f"Could not delete the temporary folder {self.jobDirectory}; delete it by hand.")
