"""CPU thread count: all cores by default, OMP_NUM_THREADS when the user sets it."""

from __future__ import annotations

import os

import pytest
import torch

from nnsam_core.devices import cpu_threads, resolve_device


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_cpu_uses_every_core_by_default(monkeypatch, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cpu_threads() == (os.cpu_count() or 1)


@pytest.mark.parametrize("value, expected", [("1", 1), ("3", 3), ("0", None), ("many", None), ("", None)])
def test_omp_num_threads_is_respected(monkeypatch, restore_threads, value, expected):
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    assert cpu_threads() == (expected or os.cpu_count() or 1)  # unusable values fall back to every core
    resolve_device("cpu")
    assert torch.get_num_threads() == cpu_threads()
