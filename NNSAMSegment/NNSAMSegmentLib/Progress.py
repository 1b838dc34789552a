"""The engine's ``--progress json`` protocol: line splitting, parsing, and time-left estimates.

The engine prints one JSON object per line on stdout::

    {"stage": "train", "step": 12, "total": 250, "loss": 0.41, "eta_s": 95.0, "message": ""}

Log text, partial lines and garbage may be interleaved; nothing here ever raises on them.
"""

from __future__ import annotations

import codecs
import json
import math
from dataclasses import dataclass
from typing import Optional, Union

ERROR_PREFIX = "nnsam: error:"

# Plain words for the stages the engine reports; unknown stages are shown capitalised.
STAGE_LABELS = {
    "prepare": "Preparing",
    "plan": "Planning",
    "preprocess": "Preprocessing",
    "embed": "Computing SAM features",
    "train": "Fine-tuning",
    "predict": "Segmenting",
    "save": "Saving",
    "download": "Downloading",
    "import": "Importing",
    "export": "Exporting",
    "done": "Done",
    "error": "Error",
}


@dataclass(frozen=True)
class ProgressEvent:
    stage: str
    step: int = 0
    total: int = 0
    loss: Optional[float] = None
    eta_s: Optional[float] = None
    message: str = ""

    @property
    def fraction(self) -> Optional[float]:
        """Progress within the stage in [0, 1], or None when the stage has no known length."""
        if self.total <= 0:
            return None
        return min(max(self.step / self.total, 0.0), 1.0)

    @property
    def stageLabel(self) -> str:
        return STAGE_LABELS.get(self.stage, self.stage.capitalize() if self.stage else "Working")


def _asInt(value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0
    if isinstance(value, float) and not math.isfinite(value):
        return 0
    return max(int(value), 0)


def _asOptionalFloat(value, nonNegative: bool = False) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    if not math.isfinite(value) or (nonNegative and value < 0):
        return None
    return value


def parseProgressLine(line: str) -> Optional[ProgressEvent]:
    """A :class:`ProgressEvent` if ``line`` is a progress object, else None (the line is log text)."""
    if not isinstance(line, str):
        return None
    text = line.strip()
    if not (text.startswith("{") and text.endswith("}")):
        return None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    stage = data.get("stage")
    if not isinstance(stage, str) or not stage.strip():
        return None
    message = data.get("message")
    return ProgressEvent(
        stage=stage.strip(),
        step=_asInt(data.get("step")),
        total=_asInt(data.get("total")),
        loss=_asOptionalFloat(data.get("loss")),
        eta_s=_asOptionalFloat(data.get("eta_s"), nonNegative=True),
        message=message if isinstance(message, str) else ("" if message is None else str(message)),
    )


def parseErrorLine(line: str) -> Optional[str]:
    """The message of an ``nnsam: error: <message>`` line, else None."""
    if not isinstance(line, str):
        return None
    text = line.strip()
    if not text.startswith(ERROR_PREFIX):
        return None
    message = text[len(ERROR_PREFIX):].strip()
    return message or None


class LineSplitter:
    """Turns chunks of process output (bytes or str, cut anywhere) into complete lines.

    Bytes are decoded incrementally as UTF-8, so a multi-byte character split across chunks survives; invalid
    bytes become U+FFFD instead of raising. ``\\r\\n``, ``\\n`` and ``\\r`` (progress bars) all end a line.
    """

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""

    def feed(self, chunk: Union[bytes, bytearray, str]) -> list[str]:
        if isinstance(chunk, (bytes, bytearray)):
            text = self._decoder.decode(bytes(chunk))
        else:
            text = str(chunk)
        self._pending += text
        return self._takeLines(final=False)

    def flush(self) -> list[str]:
        self._pending += self._decoder.decode(b"", final=True)
        return self._takeLines(final=True)

    def _takeLines(self, final: bool) -> list[str]:
        text = self._pending.replace("\r\n", "\n")
        # A lone "\r" at the very end may be the first half of "\r\n": keep it until more arrives.
        keepCarriageReturn = (not final) and text.endswith("\r")
        if keepCarriageReturn:
            text = text[:-1]
        text = text.replace("\r", "\n")
        parts = text.split("\n")
        if final:
            self._pending = ""
            lines = parts if parts[-1] else parts[:-1]
        else:
            self._pending = parts[-1] + ("\r" if keepCarriageReturn else "")
            lines = parts[:-1]
        return lines


def formatDuration(seconds: Optional[float]) -> str:
    """Short human duration: '45 s', '3 min 05 s', '12 min', '1 h 05 min'; '' when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return ""
    total = int(round(seconds))
    if total < 60:
        return f"{total} s"
    minutes, secs = divmod(total, 60)
    if minutes < 10:
        return f"{minutes} min {secs:02d} s"
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class ProgressTracker:
    """Keeps the latest event and estimates the time left in the current stage.

    The engine's ``eta_s`` wins; without it the rate since the stage began is extrapolated (after two steps,
    so a slow first step does not produce absurd estimates).
    """

    MIN_STEPS_FOR_ESTIMATE = 2

    def __init__(self):
        self.lastEvent: Optional[ProgressEvent] = None
        self._stageStartTime: Optional[float] = None
        self._stageStartStep = 0
        self._lastTime: Optional[float] = None

    def update(self, event: ProgressEvent, now: float) -> None:
        if self.lastEvent is None or event.stage != self.lastEvent.stage or event.step < self.lastEvent.step:
            self._stageStartTime = now
            self._stageStartStep = event.step
        self.lastEvent = event
        self._lastTime = now

    def secondsLeft(self) -> Optional[float]:
        event = self.lastEvent
        if event is None:
            return None
        if event.eta_s is not None:
            return event.eta_s
        if event.total <= 0 or self._stageStartTime is None or self._lastTime is None:
            return None
        stepsDone = event.step - self._stageStartStep
        if stepsDone < self.MIN_STEPS_FOR_ESTIMATE:
            return None
        elapsed = self._lastTime - self._stageStartTime
        if elapsed <= 0:
            return None
        return max(event.total - event.step, 0) * elapsed / stepsDone

    def statusText(self) -> str:
        """One line for the panel, e.g. 'Fine-tuning: 120 of 250, loss 0.412, about 3 min 05 s left'."""
        event = self.lastEvent
        if event is None:
            return ""
        finished = event.stage in ("done", "error")
        parts = [event.stageLabel]
        if event.total > 0 and not finished:
            parts[0] += f": {event.step} of {event.total}"
        details = []
        if event.loss is not None:
            details.append(f"loss {event.loss:.3g}")
        secondsLeft = self.secondsLeft()
        if secondsLeft is not None and secondsLeft >= 1 and not finished:
            details.append(f"about {formatDuration(secondsLeft)} left")
        if event.message:
            details.append(event.message)
        return ", ".join(parts + details)
