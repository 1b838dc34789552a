"""Which compute devices the engine can use here.

The engine's own ``--device auto`` picks CUDA, then Apple MPS, then CPU; this module only fills the panel's list
and says what "auto" will mean. The panel asks in a separate process (:data:`DETECTION_SCRIPT`): importing torch
takes seconds and would freeze Slicer, and a broken GPU driver must not take Slicer down with it.
"""

from __future__ import annotations

import json

# Prints a JSON list of devices, best first; "cpu" alone when torch is missing or broken.
DETECTION_SCRIPT = """
import json
devices = []
try:
    import torch
    try:
        if torch.cuda.is_available():
            devices.append("cuda")
    except Exception:
        pass
    try:
        if torch.backends.mps.is_available():
            devices.append("mps")
    except Exception:
        pass
except Exception:
    pass
print(json.dumps(devices + ["cpu"]))
"""


def parseDetectionOutput(text: str) -> list[str]:
    """Devices from the detection script's output; ["cpu"] for anything unexpected."""
    for line in reversed(str(text).splitlines()):
        try:
            devices = json.loads(line)
        except ValueError:
            continue
        if isinstance(devices, list) and devices and all(d in ("cuda", "mps", "cpu") for d in devices):
            return devices if devices[-1] == "cpu" else devices + ["cpu"]
    return ["cpu"]


def describeAuto(devices: list[str]) -> str:
    best = devices[0] if devices else "cpu"
    return {"cuda": "auto (CUDA GPU found)", "mps": "auto (Apple GPU found)"}.get(best, "auto (CPU only: slow)")


def deviceChoices(devices: list[str]) -> list[tuple[str, str]]:
    """(value, label) pairs for the panel: "auto" first, then the devices found."""
    labels = {"cuda": "CUDA GPU", "mps": "Apple GPU (MPS)", "cpu": "CPU"}
    return [("auto", describeAuto(devices))] + [(device, labels.get(device, device)) for device in devices]
