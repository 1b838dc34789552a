"""The fine-tune's schedule and working-size defaults (light: no torch, no nnU-Net), shared by ``fine_tune`` and
the time estimate."""

from __future__ import annotations

from typing import Optional

# quick: 1000 iterations (40 epochs x 25): about a minute on a GPU with the planned batch; on a CPU the batch is
# capped at CPU_BATCH_SIZE. Fewer iterations left nnU-Net predicting only the largest structure even on its own
# training slices (docs/results.md).
PRESETS = {"quick": 1000, "full": 250_000}
CPU_BATCH_SIZE = 2
# On a CPU the quick preset trains at most 192 pixels across (nnU-Net resamples; results come back at full
# resolution): a CPU step grows with the pixel count, and at 512x512 the quick preset would take hours on a laptop
# (docs/results.md, Speed).
CPU_QUICK_MAX_SIZE = 192


def working_max_size(requested: Optional[int], preset: str, device) -> Optional[int]:
    """The in-plane size cap to plan with (None: native resolution); ``device``: a torch.device (its type)."""
    if requested is not None:
        return requested or None
    return CPU_QUICK_MAX_SIZE if device.type == "cpu" and preset == "quick" else None
