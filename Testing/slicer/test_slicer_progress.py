"""The --progress json protocol: good lines, malformed lines, lines cut anywhere, never an exception."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nnsam_slicer_helpers  # noqa: F401 - puts the module's folder on sys.path (so the file runs alone)
from NNSAMSegmentLib.Progress import (LineSplitter, ProgressEvent, ProgressTracker, formatDuration, parseErrorLine,
                                      parseProgressLine)


def test_good_line_is_parsed_completely():
    event = parseProgressLine('{"stage": "train", "step": 12, "total": 250, "loss": 0.41, "eta_s": 95.5, '
                              '"message": "fold 0"}\n')
    assert event == ProgressEvent("train", 12, 250, 0.41, 95.5, "fold 0")
    assert event.fraction == pytest.approx(12 / 250)
    assert event.stageLabel == "Fine-tuning"


def test_nulls_and_missing_keys_get_defaults():
    event = parseProgressLine('{"stage": "embed", "loss": null, "eta_s": null}')
    assert event == ProgressEvent("embed", 0, 0, None, None, "")
    assert event.fraction is None
    assert parseProgressLine('{"stage": "new-stage"}').stageLabel == "New-stage"


@pytest.mark.parametrize("line", [
    "", "   ", "Epoch 3: loss 0.2", "[", "{", '{"stage": "train"', '{"step": 1}', '{"stage": 3}', '{"stage": ""}',
    '["stage", "train"]', '"stage"', "null", "{'stage': 'train'}", '{"stage": "train"} trailing', "\x00\x01",
])
def test_non_progress_lines_are_log_text(line):
    assert parseProgressLine(line) is None


def test_wrong_types_inside_a_progress_object_are_tolerated():
    event = parseProgressLine('{"stage": "train", "step": "12", "total": true, "loss": "x", "eta_s": -5, '
                              '"message": 42}')
    assert (event.step, event.total, event.loss, event.eta_s, event.message) == (0, 0, None, None, "42")
    huge = parseProgressLine('{"stage": "train", "step": 1e999, "total": -3, "loss": NaN, "eta_s": Infinity}')
    assert (huge.step, huge.total, huge.loss, huge.eta_s) == (0, 0, None, None)
    assert parseProgressLine('{"stage": "train", "step": 7.9, "total": 10}').step == 7


def test_error_lines():
    assert parseErrorLine("nnsam: error: only 2 annotated slices; annotate at least 4\n") == \
        "only 2 annotated slices; annotate at least 4"
    assert parseErrorLine("nnsam: error:   ") is None
    assert parseErrorLine("warning: nnsam: error: x") is None


def test_deeply_nested_json_does_not_raise():
    assert parseProgressLine("{" + '"a":[' * 100000 + "]" * 100000 + "}") is None


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_parser_never_raises_on_arbitrary_text(text):
    result = parseProgressLine(text)
    assert result is None or isinstance(result, ProgressEvent)
    parseErrorLine(text)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["stage", "step", "total", "loss", "eta_s", "message", "x"]),
                       st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(),
                                 st.lists(st.integers(), max_size=2))))
def test_parser_never_raises_on_arbitrary_json_objects(data):
    event = parseProgressLine(json.dumps(data))
    if isinstance(data.get("stage"), str) and data["stage"].strip():
        assert event is not None and event.stage == data["stage"].strip()
        assert event.step >= 0 and event.total >= 0
        assert event.eta_s is None or event.eta_s >= 0
    else:
        assert event is None


def _split(chunks):
    splitter = LineSplitter()
    lines = []
    for chunk in chunks:
        lines += splitter.feed(chunk)
    return lines + splitter.flush()


def test_lines_cut_at_every_byte_position_come_out_whole():
    text = ('{"stage": "train", "step": 1, "total": 2, "message": "Ünïcødé ♥"}\r\nlog line\n'
            '{"stage": "done"}\rtail without newline').encode("utf-8")
    expected = ['{"stage": "train", "step": 1, "total": 2, "message": "Ünïcødé ♥"}', "log line",
                '{"stage": "done"}', "tail without newline"]
    for cut in range(len(text) + 1):
        assert _split([text[:cut], text[cut:]]) == expected
    assert _split([bytes([b]) for b in text]) == expected
    assert parseProgressLine(expected[0]).message == "Ünïcødé ♥"


def test_invalid_utf8_is_replaced_not_raised():
    assert _split([b"bad \xff\xfe bytes\n"]) == ["bad \ufffd\ufffd bytes"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=8))
def test_splitter_never_raises_and_loses_no_text(chunks):
    lines = _split(chunks)
    joined = b"".join(chunks).decode("utf-8", errors="replace")
    normalised = joined.replace("\r\n", "\n").replace("\r", "\n")
    assert "\n".join(lines) == normalised.rstrip("\n") or "\n".join(lines) + "\n" == normalised


def test_durations():
    assert formatDuration(None) == ""
    assert formatDuration(-1) == ""
    assert formatDuration(float("nan")) == ""
    assert formatDuration(4.4) == "4 s"
    assert formatDuration(185) == "3 min 05 s"
    assert formatDuration(1500) == "25 min"
    assert formatDuration(3900) == "1 h 05 min"


def test_tracker_prefers_the_engines_eta_and_estimates_otherwise():
    tracker = ProgressTracker()
    tracker.update(ProgressEvent("train", 10, 110, eta_s=42.0), now=0.0)
    assert tracker.secondsLeft() == 42.0
    tracker = ProgressTracker()
    tracker.update(ProgressEvent("train", 10, 110), now=100.0)
    assert tracker.secondsLeft() is None  # not enough steps seen yet
    tracker.update(ProgressEvent("train", 11, 110), now=101.0)
    assert tracker.secondsLeft() is None
    tracker.update(ProgressEvent("train", 30, 110), now=120.0)  # 1 s per step, 80 steps left
    assert tracker.secondsLeft() == pytest.approx(80.0)
    assert tracker.statusText() == "Fine-tuning: 30 of 110, about 1 min 20 s left"
    tracker.update(ProgressEvent("predict", 1, 34, loss=None), now=121.0)  # new stage: estimate restarts
    assert tracker.secondsLeft() is None
    tracker.update(ProgressEvent("done", 1, 1, message="saved"), now=122.0)
    assert tracker.statusText() == "Done, saved"
    tracker.update(ProgressEvent("train", 99, 100, eta_s=0.2), now=123.0)
    assert tracker.statusText() == "Fine-tuning: 99 of 100"  # no "about 0 s left"
