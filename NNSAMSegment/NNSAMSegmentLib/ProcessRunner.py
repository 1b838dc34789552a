"""Running the engine in a separate process.

:class:`EngineJob` talks to a runner through this small interface:

- ``start(program, args, env=None, workingDirectory=None)``
- ``stop(graceSeconds)``: the last resort of Stop. The job has already asked the engine to end (see
  :mod:`EngineJob`: a stop file the engine watches, which works through Slicer's ``PythonSlicer`` launcher on
  every platform); if the process has not ended after the grace period, it is killed together with every process
  it started (:func:`ProcessTree.killTree`). No signal is sent to the started process itself: inside Slicer that
  is the launcher, which would die alone and leave the engine running.
- ``isRunning()``, ``waitForFinished(timeoutSeconds)``
- signals ``stdoutReceived(bytes)``, ``stderrReceived(bytes)``, ``finished(exitCode, errorText)``; ``exitCode`` is
  None when the process crashed, was killed or could not start.

Two implementations: :class:`QProcessRunner` inside Slicer (signals arrive on Qt's main thread, so the panel stays
responsive and MRML is only touched from that thread), and :class:`SubprocessRunner` for tests and scripts, which
delivers its signals in whatever thread calls :meth:`SubprocessRunner.processEvents` or ``waitForFinished``.

Qt signals are connected with their full signature (``"finished(int,QProcess::ExitStatus)"``), never as
attributes: for an overloaded signal PythonQt's attribute form (``finished.connect(slot)``) binds the overload
declared first (``finished(int)`` in Qt 5.15) and passes only its arguments.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
import time
from typing import Optional, Protocol, Sequence

from .ProcessTree import killTree
from .Signal import Signal

# How long a stopped engine may take to clean up (nnU-Net shuts down its workers, temporary files are removed)
# before its process tree is killed; generous because a laptop busy with training can be slow to schedule it.
STOP_GRACE_SECONDS = 15.0


class ProcessRunner(Protocol):
    stdoutReceived: Signal
    stderrReceived: Signal
    finished: Signal

    def start(self, program: str, args: Sequence[str], env: Optional[dict] = None,
              workingDirectory: Optional[str] = None) -> None: ...

    def stop(self, graceSeconds: float = STOP_GRACE_SECONDS) -> None: ...

    def isRunning(self) -> bool: ...

    def waitForFinished(self, timeoutSeconds: Optional[float] = None) -> bool: ...


def _mergedEnvironment(env: Optional[dict]) -> dict:
    merged = dict(os.environ)
    # Unbuffered output: progress lines must arrive while the engine works, not when it exits.
    merged["PYTHONUNBUFFERED"] = "1"
    if env:
        merged.update({str(k): str(v) for k, v in env.items()})
    return merged


class SubprocessRunner:
    """``subprocess.Popen`` runner; reader threads queue output, the caller's thread emits the signals."""

    def __init__(self):
        self.stdoutReceived = Signal()
        self.stderrReceived = Signal()
        self.finished = Signal()
        self._process: Optional[subprocess.Popen] = None
        self._queue: "queue.Queue[tuple]" = queue.Queue()
        self._finishedDelivered = False
        self._threads: list[threading.Thread] = []

    def start(self, program, args, env=None, workingDirectory=None) -> None:
        if self.isRunning():
            raise RuntimeError("process already running")
        self._finishedDelivered = False
        self._queue = queue.Queue()
        kwargs = {}
        if os.name == "posix":
            # Own process group, so stop() also ends the engine's worker processes.
            kwargs["start_new_session"] = True
        else:  # pragma: no cover - Windows
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        try:
            self._process = subprocess.Popen([program, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, env=_mergedEnvironment(env),
                                             cwd=workingDirectory, **kwargs)
        except OSError as error:
            self._process = None
            self._queue.put(("finished", None, f"Could not start {program}: {error.strerror or error}"))
            return
        readers = [threading.Thread(target=self._read, args=(self._process.stdout, "stdout"), daemon=True),
                   threading.Thread(target=self._read, args=(self._process.stderr, "stderr"), daemon=True)]
        waiter = threading.Thread(target=self._wait, args=(self._process, readers), daemon=True)
        self._threads = readers + [waiter]
        for thread in self._threads:
            thread.start()

    def _read(self, stream, name: str) -> None:
        try:
            while True:
                chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
                if not chunk:
                    break
                self._queue.put((name, chunk))
        except (OSError, ValueError):
            pass
        finally:
            try:
                stream.close()
            except OSError:
                pass

    def _wait(self, process: subprocess.Popen, readers: list) -> None:
        for reader in readers:
            reader.join()
        returnCode = process.wait()
        # A negative return code means "killed by a signal": report it like Qt's CrashExit.
        self._queue.put(("finished", returnCode if returnCode >= 0 else None, ""))

    def _dispatch(self, item: tuple) -> None:
        kind = item[0]
        if kind == "stdout":
            self.stdoutReceived.emit(item[1])
        elif kind == "stderr":
            self.stderrReceived.emit(item[1])
        elif kind == "finished" and not self._finishedDelivered:
            self._finishedDelivered = True
            self.finished.emit(item[1], item[2])

    def processEvents(self) -> bool:
        """Emit queued output and completion; True once ``finished`` has been emitted."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return self._finishedDelivered
            self._dispatch(item)

    def waitForFinished(self, timeoutSeconds: Optional[float] = None) -> bool:
        deadline = None if timeoutSeconds is None else time.monotonic() + timeoutSeconds
        while not self._finishedDelivered:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            try:
                item = self._queue.get(timeout=0.1 if remaining is None else min(remaining, 0.1))
            except queue.Empty:
                continue
            self._dispatch(item)
        return True

    def isRunning(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self, graceSeconds: float = STOP_GRACE_SECONDS) -> None:
        """Give the process ``graceSeconds`` to end by itself, then kill its tree; blocks until it has ended."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        try:
            process.wait(timeout=graceSeconds)
        except subprocess.TimeoutExpired:
            killTree(process.pid)
            process.wait()
        if os.name == "posix":
            # Children the engine left behind must not outlive the job either (the process has its own group).
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


class QProcessRunner:
    """``qt.QProcess`` runner for Slicer: non-blocking, signals delivered on Qt's main thread."""

    def __init__(self, parent=None):
        import qt  # Slicer only; imported here so the package stays importable without Qt.

        self._qt = qt
        self.stdoutReceived = Signal()
        self.stderrReceived = Signal()
        self.finished = Signal()
        self._finishedDelivered = True
        self._process = qt.QProcess(parent)
        self._process.setProcessChannelMode(qt.QProcess.SeparateChannels)
        self._process.connect("readyReadStandardOutput()", self._onStdout)
        self._process.connect("readyReadStandardError()", self._onStderr)
        self._process.connect("finished(int,QProcess::ExitStatus)", self._onFinished)
        self._process.connect("errorOccurred(QProcess::ProcessError)", self._onError)
        self._killTimer = qt.QTimer()
        self._killTimer.setSingleShot(True)
        self._killTimer.connect("timeout()", self._killIfRunning)

    def start(self, program, args, env=None, workingDirectory=None) -> None:
        if self.isRunning():
            raise RuntimeError("process already running")
        qt = self._qt
        environment = qt.QProcessEnvironment.systemEnvironment()
        for key, value in _mergedEnvironment(env).items():
            environment.insert(key, value)
        self._process.setProcessEnvironment(environment)
        if workingDirectory:
            self._process.setWorkingDirectory(workingDirectory)
        self._finishedDelivered = False
        self._process.start(program, list(args))

    @staticmethod
    def _bytes(byteArray) -> bytes:
        data = byteArray.data()
        return data if isinstance(data, bytes) else bytes(data)

    def _onStdout(self) -> None:
        data = self._bytes(self._process.readAllStandardOutput())
        if data:
            self.stdoutReceived.emit(data)

    def _onStderr(self) -> None:
        data = self._bytes(self._process.readAllStandardError())
        if data:
            self.stderrReceived.emit(data)

    def _deliverFinished(self, exitCode, errorText: str) -> None:
        if self._finishedDelivered:
            return
        self._finishedDelivered = True
        self._killTimer.stop()
        self.finished.emit(exitCode, errorText)

    def _onFinished(self, exitCode, exitStatus) -> None:
        self._onStdout()
        self._onStderr()
        crashed = exitStatus == self._qt.QProcess.CrashExit
        self._deliverFinished(None if crashed else int(exitCode), "")

    def _onError(self, error) -> None:
        if error == self._qt.QProcess.FailedToStart:
            self._deliverFinished(None, f"Could not start {self._process.program()}: {self._process.errorString()}")

    def isRunning(self) -> bool:
        return self._process.state() != self._qt.QProcess.NotRunning

    def stop(self, graceSeconds: float = STOP_GRACE_SECONDS) -> None:
        """Kill the process tree if the process has not ended ``graceSeconds`` from now; returns at once."""
        if not self.isRunning() or self._killTimer.isActive():
            return
        self._killTimer.start(int(graceSeconds * 1000))

    def _killIfRunning(self) -> None:
        if self.isRunning():
            killTree(int(self._process.processId()))
            self._process.kill()

    def waitForFinished(self, timeoutSeconds: Optional[float] = None) -> bool:
        """Block (scripts, self-test) until ``finished`` was delivered; Qt events are processed meanwhile, so a
        pending stop's kill timer still fires."""
        deadline = None if timeoutSeconds is None else time.monotonic() + timeoutSeconds
        while not self._finishedDelivered:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            if self.isRunning():
                self._process.waitForFinished(100)
            self._qt.QCoreApplication.processEvents()
            if not self.isRunning() and not self._finishedDelivered:
                time.sleep(0.01)  # finished is queued: the next processEvents delivers it
        return True
