"""Evaluation of segmentations: Dice (%) and average symmetric surface distance (mm).

:mod:`.metrics` holds the pure functions on arrays, :mod:`.evaluate` reads files and folders and
summarises, :mod:`.command` registers the ``nnsam evaluate`` verb. Conventions: see README.md here.
"""

from nnsam_core.evaluation.evaluate import evaluate, write_json
from nnsam_core.evaluation.metrics import (
    average_symmetric_surface_distance,
    dice,
    evaluate_case,
    summarize,
)

__all__ = [
    "average_symmetric_surface_distance",
    "dice",
    "evaluate",
    "evaluate_case",
    "summarize",
    "write_json",
]
