"""Which labelled slices train and which test: fixed, documented, nested splits.

A *unit* is one labelled 2D slice: a one-slice case of an nnU-Net raw dataset, or one labelled slice k of a
volume case (slices of a volume without any label are unlabelled and never used). Units belong to a *patient*:

- a volume case is one patient (``mscmr_07`` = patient ``mscmr_07``);
- a one-slice case named ``<prefix>_<digits>`` belongs to patient ``<prefix>`` when every one-slice case of the
  dataset is named that way (``chd_1003_120`` = patient ``chd_1003``, slice 120);
- otherwise units carry no patient id and only ``--split slice`` is possible.

The split is a pure function of the unit list and :data:`SPLIT_SEED` (not of the training seeds, sizes or
methods), so every method, seed and size sees the same test set, and rerunning gives the same split:

- ``patient``: patients are shuffled with SPLIT_SEED and moved to the test side in that order until it holds at
  least ``test_fraction`` of the units; test patients are never seen in training.
- ``slice``: units are shuffled with SPLIT_SEED and the first ``round(test_fraction * N)`` test (slices of one
  patient may fall on both sides, as in the paper's partition).

Training subsets are nested prefixes of one fixed *pool order* of the remaining units (the 4 slices are inside the
8, ...). The pool order visits patients round-robin (patients and their slices shuffled with SPLIT_SEED), so small
subsets draw on as many patients as possible instead of, by chance, one.
"""

from __future__ import annotations

import random
import re
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Iterable, Optional, Sequence

from nnsam_core.errors import NNSAMError

SPLIT_SEED = 20240607  # fixed on purpose: the split must not change with --seeds
DEFAULT_TEST_FRACTION = 1 / 3
SPLIT_MODES = ("patient", "slice")
_PATIENT_SUFFIX = re.compile(r"^(?P<patient>.+)_(?P<slice>\d+)$")


@dataclass(frozen=True, order=True)
class Unit:
    """One labelled 2D slice: ``case`` of the dataset and, for a volume, its slice index ``k``."""

    case: str
    k: Optional[int] = None         # None: the case is a single slice
    patient: Optional[str] = None

    @property
    def name(self) -> str:
        """File-safe name, also the case name of the slice in training subsets and predictions."""
        return self.case if self.k is None else f"{self.case}_z{self.k:03d}"

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Unit":
        return cls(data["case"], data.get("k"), data.get("patient"))


def patient_ids(slice_cases: Sequence[str]) -> Optional[dict[str, str]]:
    """Case -> patient for one-slice cases named ``<patient>_<digits>``; None unless every name fits."""
    found = {}
    for case in slice_cases:
        match = _PATIENT_SUFFIX.match(case)
        if match is None:
            return None
        found[case] = match["patient"]
    return found


def sparse_volumes(slice_cases: Sequence[str]) -> Optional[dict[str, list[tuple[int, str]]]]:
    """Patient -> [(slice index, case)] ordered by slice index, for one-slice cases named ``<patient>_<digits>``
    (the digits are the slice's index in the patient's scan); None unless every name fits.

    Ordered by the number, not the name ("63" before "179"), and two cases of one patient at the same index are
    refused: a patient's slices become one sparse volume whose slices must have distinct places."""
    ids = patient_ids(slice_cases)
    if not ids:
        return None
    groups: dict[str, list[tuple[int, str]]] = {}
    for case, patient in ids.items():
        groups.setdefault(patient, []).append((int(_PATIENT_SUFFIX.match(case)["slice"]), case))
    for patient, members in groups.items():
        members.sort()
        indices = [z for z, _ in members]
        if len(set(indices)) != len(indices):
            raise NNSAMError(f"patient {patient} has two one-slice cases at the same slice index; "
                             "case names must be <patient>_<slice index>")
    return dict(sorted(groups.items()))


def make_units(slice_cases: Sequence[str], volumes: dict[str, Sequence[int]]) -> list[Unit]:
    """Units from one-slice case names and volume case -> labelled slice indices."""
    ids = patient_ids(slice_cases) if slice_cases else {}
    units = [Unit(case, None, ids.get(case) if ids else None) for case in slice_cases]
    units += [Unit(case, int(k), case) for case, ks in volumes.items() for k in ks]
    return sorted(units, key=lambda u: (u.case, -1 if u.k is None else u.k))


def has_patient_ids(units: Iterable[Unit]) -> bool:
    return all(u.patient is not None for u in units)


def default_split_mode(units: Sequence[Unit]) -> str:
    return "patient" if has_patient_ids(units) else "slice"


@dataclass(frozen=True)
class Split:
    mode: str
    test: tuple[Unit, ...]
    pool: tuple[Unit, ...]          # training candidates in their fixed order; subsets are prefixes
    test_fraction: float
    seed: int = SPLIT_SEED

    def training_subset(self, size: int) -> list[Unit]:
        if not 1 <= size <= len(self.pool):
            raise NNSAMError(f"a training set of {size} slices does not fit: the {self.mode} split leaves "
                             f"{len(self.pool)} training slices; choose --sizes up to {len(self.pool)} or a smaller "
                             "--test-fraction")
        return list(self.pool[:size])

    def test_patients(self) -> list[str]:
        return sorted({u.patient for u in self.test if u.patient is not None})

    def as_dict(self) -> dict:
        return {"mode": self.mode, "seed": self.seed, "test_fraction": self.test_fraction,
                "test": [u.as_dict() for u in self.test], "pool": [u.as_dict() for u in self.pool]}


def make_split(units: Sequence[Unit], mode: str, test_fraction: float = DEFAULT_TEST_FRACTION,
               max_size: int = 0, seed: int = SPLIT_SEED) -> Split:
    """The fixed split of ``units`` (see the module docstring); ``max_size``: largest training set needed."""
    if mode not in SPLIT_MODES:
        raise NNSAMError(f"unknown split '{mode}'; choose patient or slice")
    if not 0 < test_fraction < 1:
        raise NNSAMError(f"--test-fraction {test_fraction} must lie strictly between 0 and 1")
    units = sorted(set(units), key=lambda u: (u.case, -1 if u.k is None else u.k))
    if len(units) < 2:
        raise NNSAMError(f"the dataset has {len(units)} labelled slice(s); a benchmark needs at least 2")
    n_test = max(1, round(test_fraction * len(units)))
    rng = random.Random(seed)
    if mode == "patient":
        if not has_patient_ids(units):
            raise NNSAMError("case names carry no patient id (expected <patient>_<slice> for one-slice cases); "
                             "use --split slice")
        by_patient = _group_by_patient(units)
        patients = sorted(by_patient)
        if len(patients) < 2:
            raise NNSAMError("all slices belong to one patient, so a patient split is impossible; use --split slice")
        rng.shuffle(patients)
        test: list[Unit] = []
        for patient in patients[:-1]:  # at least one patient stays for training
            if len(test) >= n_test:
                break
            test.extend(by_patient[patient])
    else:
        shuffled = list(units)
        rng.shuffle(shuffled)
        test = shuffled[:n_test]
    test_set = set(test)
    pool = _round_robin([u for u in units if u not in test_set], random.Random(seed + 1))
    if max_size > len(pool):
        raise NNSAMError(f"the {mode} split keeps {len(test)} of {len(units)} slices for testing and leaves "
                         f"{len(pool)} for training, fewer than the largest --sizes {max_size}; lower --sizes or "
                         "--test-fraction")
    test_sorted = tuple(sorted(test, key=lambda u: (u.case, -1 if u.k is None else u.k)))
    return Split(mode, test_sorted, tuple(pool), test_fraction, seed)


def _group_by_patient(units: Sequence[Unit]) -> "OrderedDict[str, list[Unit]]":
    groups: "OrderedDict[str, list[Unit]]" = OrderedDict()
    for unit in units:
        key = unit.patient if unit.patient is not None else unit.name  # no id: each slice is its own group
        groups.setdefault(key, []).append(unit)
    return groups


def _round_robin(units: Sequence[Unit], rng: random.Random) -> list[Unit]:
    """Shuffle patients and each patient's slices, then take one slice per patient in turn."""
    groups = _group_by_patient(units)
    order = sorted(groups)
    rng.shuffle(order)
    queues = []
    for patient in order:
        members = list(groups[patient])
        rng.shuffle(members)
        queues.append(members)
    out = []
    while any(queues):
        for queue in queues:
            if queue:
                out.append(queue.pop(0))
    return out


def evenly_spaced(labelled: Sequence[int], k: int) -> list[int]:
    """``k`` of the labelled slice indices, spread evenly: the centre of each of k equal bins.

    The ends of a stack (apex, base) are avoided unless k is large; that is where a clinician would not start.
    """
    labelled = sorted(labelled)
    if not 1 <= k < len(labelled):
        raise NNSAMError(f"cannot annotate {k} of {len(labelled)} labelled slices and still score the rest; "
                         f"choose --annotated below {len(labelled)}")
    picks = [labelled[int((i + 0.5) * len(labelled) / k)] for i in range(k)]
    return sorted(set(picks))
