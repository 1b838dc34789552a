"""Property-based tests: validation and progress parsing never crash with a traceback, whatever the input."""

from __future__ import annotations

import json

import numpy as np
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from nnsam_core.errors import NNSAMError
from nnsam_core.finetune import cases_from_sparse_slices
from nnsam_core.images import parse_slices
from nnsam_core.progress import FIELDS, ProgressError, make_event, parse_progress_line

# ------------------------------------------------------------------------------------------- progress lines
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
                           lambda children: st.lists(children, max_size=3) |
                           st.dictionaries(st.text(max_size=5), children, max_size=3), max_leaves=8)


@given(st.text())
def test_progress_parser_never_raises_anything_but_progress_error(line):
    try:
        event = parse_progress_line(line)
    except ProgressError as error:
        assert "\n" not in str(error)
    else:
        assert tuple(event) == FIELDS


@given(st.dictionaries(st.sampled_from(FIELDS + ("extra",)), json_values))
def test_progress_parser_on_json_objects(data):
    line = json.dumps(data)
    try:
        event = parse_progress_line(line)
    except ProgressError:
        return
    assert set(FIELDS) <= set(data)
    assert isinstance(event["step"], int) and isinstance(event["message"], str)


@given(st.sampled_from(["prepare", "train", "predict"]), st.integers(0, 10 ** 6), st.integers(0, 10 ** 6),
       st.none() | st.floats(allow_nan=True, allow_infinity=True), st.none() | st.floats(0, 1e6), st.text())
def test_progress_roundtrip(stage, step, total, loss, eta, message):
    event = make_event(stage, step, total, loss, eta, message)
    line = json.dumps(event, allow_nan=False)  # never a NaN on the wire
    assert "\n" not in line
    assert parse_progress_line(line) == event


# ------------------------------------------------------------------------------------------- image validation
@st.composite
def image_and_labels(draw):
    dims = draw(st.sampled_from([2, 3]))
    shape = tuple(draw(st.lists(st.integers(1, 24), min_size=dims, max_size=dims)))
    dtype = draw(st.sampled_from([np.float32, np.float64, np.int16, np.uint8]))
    elements = (st.floats(-1e4, 1e4, width=32) | st.sampled_from([np.nan, np.inf, -np.inf])
                if dtype in (np.float32, np.float64) else st.integers(0, 200))
    image = draw(hnp.arrays(dtype, shape, elements=elements))
    label_shape = shape if draw(st.booleans()) else tuple(draw(st.lists(st.integers(1, 24), min_size=dims,
                                                                        max_size=dims)))
    label_dtype = draw(st.sampled_from([np.uint8, np.int16, np.float32]))
    label_elements = {np.uint8: st.integers(0, 9), np.int16: st.integers(-2, 9),
                      np.float32: st.floats(-1, 9, width=32) | st.just(np.nan)}[label_dtype]
    labels = draw(hnp.arrays(label_dtype, label_shape, elements=label_elements))
    names = draw(st.none() | st.lists(st.text(min_size=1, max_size=4), min_size=1, max_size=4, unique=True))
    slices = draw(st.none() | st.lists(st.integers(-2, 30), min_size=1, max_size=4))
    return image, labels, names, slices


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(image_and_labels())
def test_validation_gives_cases_or_one_line_error(example):
    image_array, label_array, names, slices = example
    image, labels = sitk.GetImageFromArray(image_array), sitk.GetImageFromArray(label_array)
    try:
        cases, class_names, chosen = cases_from_sparse_slices(image, labels, slices, names)
    except NNSAMError as error:
        assert "\n" not in str(error) and str(error)
        return
    # Accepted input really is valid: finite, big enough, same grid, labels within the classes.
    assert np.isfinite(image_array).all()
    assert min(image_array.shape[-2:]) >= 16
    assert label_array.shape == image_array.shape
    assert all(np.any(label_array.reshape((-1, *label_array.shape[-2:]))[k]) for k in chosen) or slices is not None
    assert label_array.min() >= 0 and label_array.max() <= len(class_names)
    assert len(cases) == len(chosen)


@given(st.text(max_size=30), st.integers(1, 50))
def test_parse_slices(text, n):
    try:
        slices = parse_slices(text, n)
    except NNSAMError as error:
        assert "\n" not in str(error)
    else:
        assert slices == sorted(set(slices)) and all(0 <= s < n for s in slices)
