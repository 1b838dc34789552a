"""Starting from a saved model, as methods of the in-volume benchmark (``--start-from BUNDLE``).

- ``base-model``: the saved model segments the volume as it is, nothing painted. Its runs are made per k all the
  same: k names the slices the other methods painted, which are left out of its score, so every method of one k
  is scored on the same slices.
- ``adapt``: ``nnsam train --start-from BUNDLE`` on the k painted slices; every volume starts from the saved model.
- ``adapt-chained``: the volumes in the benchmark's order, each adapted from the previous volume's adapted model
  (the first from the saved model), as a study's scans are painted one after the other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from nnsam_core.errors import NNSAMError

BASE_MODEL, ADAPT, ADAPT_CHAINED = "base-model", "adapt", "adapt-chained"
START_FROM_METHODS = (BASE_MODEL, ADAPT, ADAPT_CHAINED)
START_FROM_HELP = (f"with --start-from BUNDLE: {BASE_MODEL}: the saved model alone, nothing painted (scored on the "
                   f"same slices as the others of each k); {ADAPT}: adapted from it to each volume's k painted "
                   f"slices; {ADAPT_CHAINED}: each volume adapted from the previous volume's adapted model")


def check_start_from(methods: Sequence[str], start_from: Optional[str], protocol: str) -> None:
    """One line before any work: these methods need a saved model and a volume to paint."""
    wanted = [m for m in methods if m in START_FROM_METHODS]
    if wanted and start_from is None:
        raise NNSAMError(f"{', '.join(wanted)} start from a saved model; add --start-from BUNDLE")
    if wanted and protocol != "in-volume":
        raise NNSAMError(f"{', '.join(wanted)} adapt a saved model to the painted slices of one volume, so they run "
                         "in the in-volume protocol only; add --in-volume")
    if start_from is not None and not wanted:
        raise NNSAMError(f"--start-from is used by the methods {', '.join(START_FROM_METHODS)} only; add one of "
                         "them to --methods")
    if start_from is not None:
        from nnsam_core.adapt import load_parent
        load_parent(start_from)  # unreadable or incomplete bundles are refused here, before any training


def parent_of(method: str, start_from: Path, method_runs: Path, volumes: Sequence[str], volume: str) -> Path:
    """The bundle ``method`` adapts on ``volume``; ``method_runs`` holds the method's runs of this k and seed."""
    position = volumes.index(volume)
    if method != ADAPT_CHAINED or position == 0:
        return Path(start_from)
    previous = method_runs / volumes[position - 1] / "model"
    if not (previous / "nnsam.json").is_file():
        raise NNSAMError(f"{ADAPT_CHAINED} on {volume} starts from the model adapted to {volumes[position - 1]}, "
                         f"which {previous} does not hold; run the chain's volumes in order into one report folder")
    return previous


def keeps_model(method: str) -> bool:
    """A chained run's model is the next volume's starting point, so it stays whatever --keep-models says."""
    return method == ADAPT_CHAINED
