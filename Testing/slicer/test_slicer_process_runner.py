"""The runners as Slicer uses them: QProcessRunner under a PythonQt-like ``qt`` (fake_qt), and Stop through a
launcher that, like Slicer's PythonSlicer (CTKAppLauncher), runs the engine as its child and forwards no signals.
"""

import os
import sys
import textwrap
import time

import pytest

import fake_qt
import nnsam_slicer_helpers  # noqa: F401 - puts the module folder on sys.path
from NNSAMSegmentLib.EngineCommands import EngineCommand
from NNSAMSegmentLib.EngineJob import STOP_FILE_VARIABLE, EngineJob, JobState, createJobDirectory
from NNSAMSegmentLib.ProcessRunner import QProcessRunner, SubprocessRunner
from NNSAMSegmentLib.ProcessTree import descendants

# Like CTKAppLauncher: start the program as a child, wait, exit with its status; no signal handling of its own
# (an interrupt ends the launcher alone).
LAUNCHER = textwrap.dedent("""
    import subprocess, sys
    sys.exit(subprocess.Popen(sys.argv[1:]).wait())
""")

# An engine that works until stopped. With the stop hook (the default) it ends as on Ctrl-C once the file named by
# NNSAM_STOP_FILE exists, cleans up and exits 130; FAKE_IGNORES_STOP=1 makes it an engine without the hook.
ENGINE = textwrap.dedent("""
    import _thread, os, sys, threading, time
    with open(os.environ["FAKE_PID_FILE"], "w") as handle:
        handle.write(str(os.getpid()))
    stopFile = os.environ.get("NNSAM_STOP_FILE")
    if stopFile and os.environ.get("FAKE_IGNORES_STOP") != "1":
        def watch():
            while not os.path.exists(stopFile):
                time.sleep(0.05)
            _thread.interrupt_main()
        threading.Thread(target=watch, daemon=True).start()
    try:
        while True:
            print('{"stage": "train", "step": 1, "total": 100}', flush=True)
            time.sleep(0.05)
    except KeyboardInterrupt:
        with open(os.environ["FAKE_CLEANED"], "w") as handle:
            handle.write("cleaned")
        print("nnsam: error: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
""")


@pytest.fixture
def fakeQt(monkeypatch):
    fake_qt.reset()
    monkeypatch.setitem(sys.modules, "qt", fake_qt)
    yield fake_qt
    fake_qt.reset()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False
    except OSError:
        return True


def test_qprocess_runner_reports_the_end_of_a_process(fakeQt):
    runner = QProcessRunner()
    output, finished = [], []
    runner.stdoutReceived.connect(output.append)
    runner.finished.connect(lambda exitCode, errorText: finished.append((exitCode, errorText)))
    runner.start(sys.executable, ["-c", "import sys; print('hello'); sys.exit(3)"])
    assert fake_qt.runEventLoop(lambda: finished, 20), f"finished never arrived; slot errors: {fake_qt.slotErrors}"
    assert finished == [(3, "")]
    assert b"".join(output).strip() == b"hello"
    assert not fake_qt.slotErrors
    assert not runner.isRunning()


def test_qprocess_runner_reports_a_program_that_cannot_start(fakeQt, tmp_path):
    runner = QProcessRunner()
    finished = []
    runner.finished.connect(lambda exitCode, errorText: finished.append((exitCode, errorText)))
    runner.start(str(tmp_path / "missing-program"), [])
    assert fake_qt.runEventLoop(lambda: finished, 5)
    assert finished[0][0] is None and "Could not start" in finished[0][1]


def test_an_engine_job_under_qprocess_finishes_and_succeeds(fakeQt, tmp_path):
    job = EngineJob(QProcessRunner(), EngineCommand(sys.executable, ("-c", "print('done')")),
                    createJobDirectory(str(tmp_path / "jobs")), title="quick")
    job.start()
    assert job.wait(20)
    assert job.state == JobState.SUCCEEDED and job.exitCode == 0
    assert not os.path.exists(job.jobDirectory)


@pytest.fixture
def launchedEngine(tmp_path, monkeypatch):
    (tmp_path / "launcher.py").write_text(LAUNCHER)
    (tmp_path / "engine.py").write_text(ENGINE)
    monkeypatch.setenv("FAKE_PID_FILE", str(tmp_path / "engine.pid"))
    monkeypatch.setenv("FAKE_CLEANED", str(tmp_path / "cleaned"))
    command = EngineCommand(sys.executable, (str(tmp_path / "launcher.py"), sys.executable,
                                             str(tmp_path / "engine.py")))
    return command, tmp_path


def _startAndWaitForEngine(job, tmp_path, pump) -> int:
    job.start()
    pidFile = tmp_path / "engine.pid"
    deadline = time.monotonic() + 20
    while not (pidFile.exists() and pidFile.read_text()) or job.tracker.lastEvent is None:
        assert time.monotonic() < deadline, "the engine did not start"
        pump()
        time.sleep(0.02)
    return int(pidFile.read_text())


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads process states from /proc")
@pytest.mark.parametrize("runnerName", ["qprocess", "subprocess"])
def test_stop_reaches_the_engine_through_the_launcher_and_it_cleans_up(fakeQt, launchedEngine, runnerName):
    command, tmp_path = launchedEngine
    runner = QProcessRunner() if runnerName == "qprocess" else SubprocessRunner()
    pump = fake_qt.QCoreApplication.processEvents if runnerName == "qprocess" else runner.processEvents
    job = EngineJob(runner, command, createJobDirectory(str(tmp_path / "jobs")), title="training")
    enginePid = _startAndWaitForEngine(job, tmp_path, pump)
    assert _alive(enginePid)
    started = time.monotonic()
    job.stop()
    assert job.wait(job.stopGraceSeconds + 10), "the job never finished after Stop"
    assert time.monotonic() - started < job.stopGraceSeconds, "the engine did not end by itself: it was killed"
    assert job.state == JobState.STOPPED
    assert (tmp_path / "cleaned").read_text() == "cleaned", "the engine's clean-up did not run"
    assert not _alive(enginePid)
    assert not os.path.exists(job.jobDirectory)
    assert not fake_qt.slotErrors


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads process states from /proc")
@pytest.mark.parametrize("runnerName", ["qprocess", "subprocess"])
def test_an_engine_that_ignores_stop_is_killed_with_its_launcher_after_the_grace_period(
        fakeQt, launchedEngine, monkeypatch, runnerName):
    command, tmp_path = launchedEngine
    monkeypatch.setenv("FAKE_IGNORES_STOP", "1")
    runner = QProcessRunner() if runnerName == "qprocess" else SubprocessRunner()
    pump = fake_qt.QCoreApplication.processEvents if runnerName == "qprocess" else runner.processEvents
    job = EngineJob(runner, command, createJobDirectory(str(tmp_path / "jobs")), title="training")
    job.stopGraceSeconds = 1.0
    enginePid = _startAndWaitForEngine(job, tmp_path, pump)
    job.stop()
    assert job.wait(15), "the job never finished after Stop"
    assert job.state == JobState.STOPPED
    deadline = time.monotonic() + 5
    while _alive(enginePid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(enginePid), "the engine outlived its launcher"
    assert not (tmp_path / "cleaned").exists()
    assert not os.path.exists(job.jobDirectory)


def test_the_engine_is_told_where_the_stop_file_is(tmp_path):
    runner = SubprocessRunner()
    printStopFile = f"import os; print(os.environ['{STOP_FILE_VARIABLE}'])"
    job = EngineJob(runner, EngineCommand(sys.executable, ("-c", printStopFile)),
                    createJobDirectory(str(tmp_path / "jobs")))
    job.start()
    assert job.wait(20) and job.state == JobState.SUCCEEDED
    assert job.stdoutText.strip() == job.stopFile
    assert os.path.dirname(job.stopFile) == job.jobDirectory


def test_descendants_are_found_deepest_first_without_psutil(monkeypatch):
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil raises ImportError
    parents = {10: 1, 11: 10, 12: 11, 13: 10, 20: 1, 21: 20}
    found = descendants(10, parentMap=lambda: parents)
    assert sorted(found) == [11, 12, 13]
    assert found.index(12) < found.index(11)  # a grandchild is killed before its parent
    assert descendants(99, parentMap=lambda: parents) == []
