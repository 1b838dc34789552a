"""A stand-in for Slicer's ``qt`` module (PythonQt over Qt 5.15), just enough to run QProcessRunner for real.

What it keeps from PythonQt, because the module's bugs hide there:

- ``obj.signal.connect(slot)`` binds the overload of ``signal`` declared first and passes only that overload's
  arguments (``QProcess.finished`` -> ``finished(int)``, as in Qt 5.15);
- ``obj.connect("signal(types)", slot)`` binds exactly that overload; an unknown signature raises;
- an exception in a slot is printed and swallowed (the event loop goes on), and recorded in ``slotErrors``;
- signals are delivered by the event loop (:func:`QCoreApplication.processEvents`), on the calling thread.

``QProcess`` runs a real process with ``subprocess`` (same process group as the caller, as Qt's fork does);
``kill()`` kills that process only, as Qt does.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
import time
import traceback

_events: "queue.Queue" = queue.Queue()
_timers: list = []
slotErrors: list = []


def _deliver(slot, args) -> None:
    try:
        slot(*args)
    except Exception:  # PythonQt prints the error and returns to the event loop
        slotErrors.append(traceback.format_exc())
        traceback.print_exc()


class _BoundSignal:
    def __init__(self, owner, signature: str):
        self._owner, self._signature = owner, signature

    def connect(self, slot) -> None:
        self._owner.connect(self._signature, slot)


class QObject:
    SIGNALS: tuple = ()  # normalized signatures, in declaration order

    def __init__(self, parent=None):
        self._slots: dict = {}

    def __getattr__(self, name):
        for signature in type(self).SIGNALS:
            if signature.split("(")[0] == name:
                return _BoundSignal(self, signature)  # the first declared overload, as PythonQt binds it
        raise AttributeError(name)

    def connect(self, signature: str, slot) -> bool:
        normalized = signature.replace(" ", "")
        if normalized not in type(self).SIGNALS:
            raise ValueError(f"{type(self).__name__} has no signal {signature}")
        self._slots.setdefault(normalized, []).append(slot)
        return True

    def _emit(self, name: str, *args) -> None:
        """Emit every overload of ``name``; each slot gets its overload's number of arguments."""
        for signature in type(self).SIGNALS:
            if signature.split("(")[0] != name:
                continue
            inside = signature[signature.index("(") + 1:-1]
            count = len(inside.split(",")) if inside else 0
            for slot in list(self._slots.get(signature, [])):
                _deliver(slot, args[:count])


class QTimer(QObject):
    SIGNALS = ("timeout()",)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._single, self._interval, self._due = False, 0, None

    def setSingleShot(self, single: bool) -> None:
        self._single = single

    def setInterval(self, milliseconds: int) -> None:
        self._interval = milliseconds

    def start(self, milliseconds=None) -> None:
        if milliseconds is not None:
            self._interval = milliseconds
        self._due = time.monotonic() + self._interval / 1000.0
        if self not in _timers:
            _timers.append(self)

    def stop(self) -> None:
        self._due = None
        if self in _timers:
            _timers.remove(self)

    def isActive(self) -> bool:
        return self._due is not None

    def _fireIfDue(self, now: float) -> None:
        if self._due is not None and now >= self._due:
            if self._single:
                self.stop()
            else:
                self._due = now + self._interval / 1000.0
            self._emit("timeout")


class QByteArray:
    def __init__(self, data: bytes):
        self._data = data

    def data(self) -> bytes:
        return self._data


class QProcessEnvironment:
    def __init__(self, values=None):
        self.values = dict(values or {})

    @staticmethod
    def systemEnvironment():
        return QProcessEnvironment(os.environ)

    def insert(self, key, value) -> None:
        self.values[str(key)] = str(value)


class QProcess(QObject):
    # Qt 5.15's declaration order: the deprecated finished(int) comes first.
    SIGNALS = ("started()", "finished(int)", "finished(int,QProcess::ExitStatus)",
               "errorOccurred(QProcess::ProcessError)", "readyReadStandardOutput()", "readyReadStandardError()")
    NotRunning, Starting, Running = 0, 1, 2
    NormalExit, CrashExit = 0, 1
    FailedToStart, Crashed = 0, 1
    SeparateChannels = 0

    def __init__(self, parent=None):
        super().__init__(parent)
        self._popen = None
        self._state = QProcess.NotRunning
        self._program = ""
        self._environment = None
        self._workingDirectory = None
        self._buffers = {"stdout": b"", "stderr": b""}
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._error = ""

    def setProcessChannelMode(self, mode) -> None:
        pass

    def setProcessEnvironment(self, environment) -> None:
        self._environment = environment.values

    def setWorkingDirectory(self, directory) -> None:
        self._workingDirectory = directory

    def program(self) -> str:
        return self._program

    def errorString(self) -> str:
        return self._error

    def state(self) -> int:
        return self._state

    def processId(self) -> int:
        return self._popen.pid if self._popen is not None and self._state != QProcess.NotRunning else 0

    def start(self, program, args) -> None:
        self._program = program
        self._done.clear()
        try:
            self._popen = subprocess.Popen([program, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, env=self._environment, cwd=self._workingDirectory)
        except OSError as error:
            self._error = str(error)
            self._done.set()
            _events.put(lambda: self._emit("errorOccurred", QProcess.FailedToStart))
            return
        self._state = QProcess.Running
        readers = [threading.Thread(target=self._read, args=(self._popen.stdout, "stdout"), daemon=True),
                   threading.Thread(target=self._read, args=(self._popen.stderr, "stderr"), daemon=True)]
        for reader in readers:
            reader.start()
        threading.Thread(target=self._wait, args=(readers,), daemon=True).start()

    def _read(self, stream, name: str) -> None:
        signalName = "readyReadStandardOutput" if name == "stdout" else "readyReadStandardError"
        while True:
            chunk = stream.read1(65536)
            if not chunk:
                return
            with self._lock:
                self._buffers[name] += chunk
            _events.put(lambda: self._emit(signalName))

    def _wait(self, readers) -> None:
        code = self._popen.wait()
        for reader in readers:
            reader.join()
        self._done.set()
        _events.put(lambda: self._finish(code))

    def _finish(self, code: int) -> None:
        if self._state == QProcess.NotRunning:
            return
        self._state = QProcess.NotRunning
        crashed = code < 0
        self._emit("finished", 0 if crashed else code, QProcess.CrashExit if crashed else QProcess.NormalExit)

    def _take(self, name: str) -> QByteArray:
        with self._lock:
            data, self._buffers[name] = self._buffers[name], b""
        return QByteArray(data)

    def readAllStandardOutput(self) -> QByteArray:
        return self._take("stdout")

    def readAllStandardError(self) -> QByteArray:
        return self._take("stderr")

    def kill(self) -> None:
        if self._popen is not None and self._popen.poll() is None:
            try:
                os.kill(self._popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def waitForFinished(self, milliseconds: int = 30000) -> bool:
        deadline = None if milliseconds < 0 else time.monotonic() + milliseconds / 1000.0
        while self._state != QProcess.NotRunning:
            if deadline is not None and time.monotonic() > deadline:
                return False
            QCoreApplication.processEvents()
            time.sleep(0.01)
        return True


class QCoreApplication:
    @staticmethod
    def processEvents() -> None:
        while True:
            try:
                event = _events.get_nowait()
            except queue.Empty:
                break
            event()
        now = time.monotonic()
        for timer in list(_timers):
            timer._fireIfDue(now)


def runEventLoop(condition, timeoutSeconds: float) -> bool:
    """Process events until ``condition()`` holds; False on timeout."""
    deadline = time.monotonic() + timeoutSeconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        QCoreApplication.processEvents()
        time.sleep(0.01)
    return True


def reset() -> None:
    while not _events.empty():
        _events.get_nowait()
    _timers.clear()
    slotErrors.clear()
