"""Self-training on the scan's own slices: the painted slices teach a first model; its confident predictions on
the unpainted slices of the same scan (same patient, scanner and contrast) become extra training slices for a
short second round that starts from the first model's weights. Painted slices keep the user's labels and are
repeated so that they weigh at least as much as the predicted ones."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from .progress import ProgressCallback, make_event, silent
from .workspace import TrainingCase

# The second round trains this share of the first round's iterations (1.5x the training in all).
SECOND_ROUND_SHARE = 0.5
# Unpainted slices the first model segments to choose from, and the most that enter the second round: enough to
# cover a volume, few enough that the extra encoder calls and preprocessing stay small beside training.
CANDIDATE_SLICES = 48
MAX_PSEUDO_SLICES = 24
# A slice enters the second round when the first model's mean probability of its own labels, over the pixels it
# calls a structure or is unsure about, reaches this.
MIN_CONFIDENCE = 0.9
UNSURE_BELOW = 0.99


@dataclass(frozen=True)
class PseudoLabels:
    cases: list[TrainingCase]
    slices: list[int]                # the unpainted slices that enter the second round
    confidence: dict[int, float]     # every candidate slice's confidence


def second_round_iterations(first_round: int) -> int:
    return max(1, round(first_round * SECOND_ROUND_SHARE))


def evenly_chosen(items: Sequence[int], limit: int) -> list[int]:
    """At most ``limit`` of ``items``, spread evenly from first to last."""
    items = list(items)
    if len(items) <= limit:
        return items
    picks = np.linspace(0, len(items) - 1, limit).round().astype(int)
    return [items[i] for i in sorted(set(picks.tolist()))]


def slice_confidence(labels: np.ndarray, confidence: np.ndarray) -> float:
    """Mean probability of the predicted label over the pixels the model calls a structure or is unsure about; a
    slice where it is sure there is nothing counts as confident."""
    region = (labels > 0) | (confidence < UNSURE_BELOW)
    return float(confidence[region].astype(np.float32).mean()) if region.any() else 1.0


def sub_volume(image: sitk.Image, slices: Sequence[int]) -> sitk.Image:
    """The chosen axial slices stacked as one volume with the image's in-plane geometry (the 2d model segments
    each slice on its own)."""
    stacked = sitk.GetImageFromArray(sitk.GetArrayViewFromImage(image)[list(slices)])
    stacked.SetSpacing(image.GetSpacing())
    stacked.SetOrigin(image.GetOrigin())
    stacked.SetDirection(image.GetDirection())
    return stacked


def pseudo_labels(segmenter, image: sitk.Image, painted: Sequence[int],
                  progress: ProgressCallback = silent) -> PseudoLabels:
    """Segment up to CANDIDATE_SLICES unpainted slices with the first model and keep the confident ones (at most
    MAX_PSEUDO_SLICES, spread over the volume) as training cases labelled with its prediction."""
    candidates = evenly_chosen([z for z in range(image.GetSize()[2]) if z not in set(painted)], CANDIDATE_SLICES)
    if not candidates:
        return PseudoLabels([], [], {})
    progress(make_event("pseudo-label", message=f"first model segmenting {len(candidates)} unpainted slices"))
    stack = sub_volume(image, candidates)
    labels, confidence = segmenter.segment_with_confidence(stack)
    label_array = sitk.GetArrayViewFromImage(labels)
    scores = {z: slice_confidence(label_array[i], confidence[i]) for i, z in enumerate(candidates)}
    chosen = evenly_chosen([z for z in candidates if scores[z] >= MIN_CONFIDENCE], MAX_PSEUDO_SLICES)
    position = {z: i for i, z in enumerate(candidates)}
    cases = []
    for z in chosen:
        one_slice = image[:, :, z:z + 1]
        predicted = labels[:, :, position[z]:position[z] + 1]
        predicted.CopyInformation(one_slice)  # the slice's own place in the scan
        cases.append(TrainingCase(f"pseudo_{z:04d}", one_slice, predicted))
    progress(make_event("pseudo-label", message=f"{len(chosen)} of {len(candidates)} unpainted slices confident "
                                                f"enough to train on"))
    return PseudoLabels(cases, chosen, scores)


def weighted_painted(painted_cases: Sequence[TrainingCase], n_pseudo: int) -> list[TrainingCase]:
    """The painted cases, repeated so that they are at least as many as the predicted ones (nnU-Net samples its
    training cases uniformly)."""
    copies = max(1, math.ceil(n_pseudo / max(1, len(painted_cases))))
    out = list(painted_cases)
    for c in range(1, copies):
        out += [TrainingCase(f"{case.name}_copy{c}", case.image, case.labels) for case in painted_cases]
    return out
