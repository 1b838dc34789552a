"""The expected time of a fine-tune, shown before it starts.

The engine estimates it (``nnsam estimate IMAGE --json``: a cost model from costs it measured on this computer's
device once, then kept). The panel describes its volume to the engine with a MetaImage header alone: the estimate
reads only the image's size and spacing, so no voxel is written. :class:`FineTuneEstimator` runs one estimate at a
time in the background, never beside another job (it would slow that job and be measured wrong), and shows only
the answer to the latest question: a request made while an estimate runs waits for it, then replaces it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

from .EngineCommands import TrainOptions
from .EngineJob import EngineJob, JobState
from .Signal import Signal

GEOMETRY_FILE = "geometry.mhd"
ASSUMED_PAINTED = 5  # painted slices assumed before any is painted (as the engine's default)
ADAPT_ITERATIONS = 250  # what a fine-tune from a saved model trains by default (nnsam_core.adapt.ADAPT_ITERATIONS)
DEVICE_NAMES = {"cpu": "this computer's CPU", "cuda": "this computer's GPU", "mps": "this Mac's GPU"}


@dataclass(frozen=True)
class EstimateRequest:
    dimensions: tuple          # I, J, K voxels
    spacing: tuple             # mm, I, J, K
    painted: int
    paintedAssumed: bool       # nothing painted yet: ASSUMED_PAINTED
    options: TrainOptions      # method, encoder, preset, device, iterations, recompute share


def estimateRequest(dimensions: Sequence[int], spacing: Sequence[float], paintedSlices: Optional[Sequence[int]],
                    options: TrainOptions, startFromMethod: str = "", startFromEncoder: str = "") \
        -> EstimateRequest:
    """What to ask the engine for the panel's current choices. A fine-tune from a saved model takes that model's
    method and encoder and trains ADAPT_ITERATIONS by default."""
    painted = len(set(paintedSlices or ()))
    if options.startFrom:
        method = startFromMethod if startFromMethod in ("nnsam", "nnunet") else "nnsam"
        options = dataclasses.replace(options, startFrom=None, method=method,
                                      encoder=startFromEncoder or options.encoder,
                                      iterations=options.iterations or ADAPT_ITERATIONS)
    if options.method == "nnunet":
        options = dataclasses.replace(options, recomputeShare=None)
    return EstimateRequest(tuple(int(d) for d in dimensions), tuple(float(s) for s in spacing),
                           painted or ASSUMED_PAINTED, painted == 0, options)


def writeGeometryHeader(path: str, request: EstimateRequest) -> None:
    """A MetaImage header with the volume's size and spacing; its voxel file is never written."""
    i, j, k = request.dimensions
    si, sj, sk = request.spacing
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(f"ObjectType = Image\nNDims = 3\nDimSize = {i} {j} {k}\nElementSpacing = {si:g} {sj:g} {sk:g}\n"
                     "ElementType = MET_SHORT\nElementDataFile = not-written.raw\n")


def parseEstimate(stdoutText: str) -> Optional[dict]:
    """The engine's estimate (the last JSON object with a total on stdout), or None."""
    for line in reversed((stdoutText or "").splitlines()):
        text = line.strip()
        if not (text.startswith("{") and text.endswith("}")):
            continue
        try:
            data = json.loads(text)
        except ValueError:
            continue
        if isinstance(data, dict) and isinstance(data.get("total_s"), (int, float)) \
                and not isinstance(data.get("total_s"), bool):
            return data
    return None


def roughDuration(seconds: float) -> str:
    """'40 s', '14 min', '2.5 h': an estimate's precision."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{max(1, int(round(seconds)))} s"
    if seconds < 90 * 60:
        return f"{int(round(seconds / 60))} min"
    return f"{seconds / 3600:.1f} h"


def estimateText(data: dict, paintedAssumed: bool = False) -> str:
    """The panel's line, e.g. 'Expected: about 14 min on this computer's CPU (training 12 min, segmenting 2 min).'"""
    where = DEVICE_NAMES.get(str(data.get("device")), "this computer")
    text = (f"Expected: about {roughDuration(data['total_s'])} on {where} (training "
            f"{roughDuration(data.get('training_s', 0))}, segmenting {roughDuration(data.get('segmentation_s', 0))}")
    if paintedAssumed:
        text += f"; for {data.get('painted', ASSUMED_PAINTED)} painted slices"
    return text + ")."


def estimateToolTip(data: dict) -> str:
    phases = data.get("phases_s") or {}
    names = {"bank_fill_s": "SAM features of the training slices", "training_network_s": "training, network",
             "training_encoder_s": "training, SAM encoder", "segmentation_network_s": "segmenting, network",
             "segmentation_encoder_s": "segmenting, SAM encoder"}
    lines = [f"{label}: {roughDuration(phases[key])}" for key, label in names.items()
             if isinstance(phases.get(key), (int, float)) and phases[key] > 0]
    size = data.get("working_size")
    if isinstance(size, list) and len(size) == 2:
        lines.append(f"{data.get('slices')} slices, trained at {size[0]}x{size[1]} pixels, "
                     f"{data.get('iterations')} iterations")
    lines.append("From this computer's speed, measured once by the engine. Setup and saving are not included.")
    if data.get("measured_while_busy") is True:
        lines.append("Other programs kept the computer busy while it was measured: probably too long. It is "
                     "measured again once the computer is quieter.")
    return "\n".join(lines)


class FineTuneEstimator:
    """Runs ``workflow.startEstimate(request)`` for the latest request, one at a time, never beside another job.

    Signal ``changed(text, toolTip)`` whenever the panel's line changes.
    """

    RUNNING_TEXT = "Estimating the time on this computer..."
    WAITING_TEXT = "The expected time is estimated once the running job has finished."
    NO_INPUT_TEXT = "Select an input volume to see how long a fine-tune will take."

    def __init__(self, workflow):
        self.workflow = workflow
        self.changed = Signal()
        self.text = ""
        self.toolTip = ""
        self.latest: Optional[EstimateRequest] = None
        self.job: Optional[EngineJob] = None
        self._jobRequest: Optional[EstimateRequest] = None
        self._answered: Optional[EstimateRequest] = None  # the request the shown line answers
        self._startedJobConnection = workflow.jobStarted.connect(lambda job: self.cancel())

    def close(self) -> None:
        self.workflow.jobStarted.disconnect(self._startedJobConnection)
        self.latest = None
        self.cancel()

    def _show(self, text: str, toolTip: str = "") -> None:
        if (text, toolTip) != (self.text, self.toolTip):
            self.text, self.toolTip = text, toolTip
            self.changed.emit(text, toolTip)

    @property
    def isRunning(self) -> bool:
        return self.job is not None and self.job.isRunning

    def _anotherJob(self) -> bool:
        """Whether a fine-tune, segmentation, ... runs or is starting (``jobStarted`` comes just before its start)."""
        job = self.workflow.currentJob
        return job is not None and (job.isRunning or job.state == JobState.NEW)

    def request(self, request: Optional[EstimateRequest]) -> None:
        """Show the expected time for ``request`` (None: nothing to estimate)."""
        self.latest = request
        if request is None:
            self._answered = None
            self._show(self.NO_INPUT_TEXT)
            return
        if request == self._answered or self.isRunning:
            return  # already shown, or asked once the running estimate has finished
        if self._anotherJob():
            self._show(self.WAITING_TEXT)
            return
        self._start(request)

    def cancel(self) -> None:
        """Stop a running estimate (e.g. a fine-tune starts: the cores are needed there); nothing is shown for it."""
        if self.isRunning:
            self._jobRequest = None  # its answer, if any, is stale
            self.job.stop()

    def _start(self, request: EstimateRequest) -> None:
        self._show(self.RUNNING_TEXT)
        self._jobRequest = request
        try:
            job = self.workflow.startEstimate(request)
        except Exception as error:  # a UserError from the inputs, or the engine that cannot start
            self._jobRequest, self._answered = None, request
            self._show(f"No time estimate: {error}")
            return
        self.job = job
        if job.isRunning:
            job.finished.connect(self._onFinished)
        else:  # it ended while starting (the program could not start)
            self._onFinished(job)

    def _onFinished(self, job: EngineJob) -> None:
        if job is not self.job:
            return
        request, self._jobRequest, self.job = self._jobRequest, None, None
        if request is not None and request == self.latest and job.state != JobState.STOPPED:
            self._answered = request
            data = parseEstimate(job.stdoutText) if job.state == JobState.SUCCEEDED else None
            if data is not None:
                self._show(estimateText(data, request.paintedAssumed), estimateToolTip(data))
            else:
                self._show(f"No time estimate: {job.errorMessage or 'the engine gave no answer'}")
            return
        # stale (the inputs changed meanwhile) or stopped: answer the latest question instead
        if self.latest is not None and not self._anotherJob():
            self._start(self.latest)
        elif self.latest is not None:
            self._show(self.WAITING_TEXT)


def geometryFilePath(jobDirectory: str) -> str:
    return os.path.join(jobDirectory, GEOMETRY_FILE)
