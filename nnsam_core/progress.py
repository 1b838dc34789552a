"""Progress reporting: a text bar for people, one JSON object per line for the Slicer module.

JSON lines carry exactly: stage, step, total, loss, eta_s, message. Anything else a job prints (nnU-Net's own
log) goes to stderr in JSON mode, so stdout stays machine-readable.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Callable, Optional, TextIO

FIELDS = ("stage", "step", "total", "loss", "eta_s", "message")
STAGES = ("prepare", "plan", "preprocess", "embed", "train", "predict", "save", "download", "done", "error")


def make_event(stage: str, step: int = 0, total: int = 0, loss: Optional[float] = None,
               eta_s: Optional[float] = None, message: str = "") -> dict:
    def finite(value):
        return None if value is None or not math.isfinite(float(value)) else round(float(value), 4)

    return {"stage": str(stage), "step": int(step), "total": int(total), "loss": finite(loss),
            "eta_s": finite(eta_s), "message": " ".join(str(message).split())}


class ProgressError(ValueError):
    pass


def parse_progress_line(line: str) -> dict:
    """Parse one JSON progress line; raises :class:`ProgressError` (one line) for anything malformed."""
    try:
        data = json.loads(line)
    except (ValueError, TypeError, RecursionError):
        raise ProgressError("not a JSON progress line") from None
    if not isinstance(data, dict):
        raise ProgressError("progress line is not a JSON object")
    missing = [f for f in FIELDS if f not in data]
    if missing:
        raise ProgressError(f"progress line lacks {', '.join(missing)}")
    try:
        return make_event(data["stage"], data["step"], data["total"], data["loss"], data["eta_s"], data["message"])
    except (TypeError, ValueError, OverflowError):
        raise ProgressError("progress line has a field of the wrong type") from None


class Reporter:
    """Callable taking event dicts; prints them as text or JSON lines."""

    def __init__(self, mode: str = "text", stream: Optional[TextIO] = None):
        if mode not in ("text", "json", "none"):
            raise ValueError(mode)
        self.mode = mode
        self.stream = stream or sys.stdout
        self._last_text = 0.0

    def __call__(self, event: dict) -> None:
        event = make_event(**{k: event.get(k) for k in FIELDS if k in event})
        if self.mode == "json":
            self.stream.write(json.dumps(event) + "\n")
            self.stream.flush()
        elif self.mode == "text":
            self._text(event)

    def _text(self, event: dict) -> None:
        now = time.monotonic()
        final = event["total"] and event["step"] >= event["total"]
        if event["stage"] == "train" and not final and now - self._last_text < 1.0:
            return  # a bar redrawn at most once a second
        self._last_text = now
        if event["total"]:
            width = 30
            filled = int(width * min(event["step"], event["total"]) / event["total"])
            bar = "#" * filled + "-" * (width - filled)
            eta = f" eta {format_seconds(event['eta_s'])}" if event["eta_s"] is not None else ""
            loss = f" loss {event['loss']:.4f}" if event["loss"] is not None else ""
            line = f"{event['stage']:<10} [{bar}] {event['step']}/{event['total']}{loss}{eta} {event['message']}"
        else:
            line = f"{event['stage']:<10} {event['message']}"
        end = "\r" if event["stage"] == "train" and not final and self.stream.isatty() else "\n"
        self.stream.write(line + end)
        self.stream.flush()


def format_seconds(seconds: Optional[float]) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


ProgressCallback = Callable[[dict], None]


def silent(_event: dict) -> None:
    pass
