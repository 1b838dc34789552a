"""Shared fixtures: real data (slicerio's chest CT, the project's cardiac sets) and one small trained bundle."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CHEST_SLICES = [10, 15, 20, 25]


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    # Never touch the user's weights cache or nnU-Net folders from tests.
    os.environ["NNSAM_CACHE_DIR"] = str(tmp_path_factory.mktemp("nnsam-cache"))
    yield


@pytest.fixture(scope="session")
def chest_ct() -> tuple[str, str]:
    import slicerio
    return slicerio.get_testdata_file("CTChest4.nrrd"), slicerio.get_testdata_file("Segmentation.seg.nrrd")


@pytest.fixture(scope="session")
def chd_dataset() -> Path:
    folder = SHARED_DATA / "Dataset901_CHD"
    if not folder.is_dir():
        pytest.skip(f"cardiac CT data not found at {folder}")
    return folder


class EncoderSpy:
    """Records every frozen encoder the trainer builds, with a copy of its state at build time."""

    def __init__(self):
        self.encoders = []

    def wrap(self, load_encoder):
        def spying_load_encoder(*args, **kwargs):
            encoder = load_encoder(*args, **kwargs)
            self.encoders.append((encoder, encoder.state_fingerprint()))
            return encoder
        return spying_load_encoder


@pytest.fixture(scope="session")
def trained(tmp_path_factory, chest_ct):
    """A bundle fine-tuned for a few iterations on 4 annotated slices of the chest CT, plus the encoder spy."""
    import nnsam_core.training.nnsam as training
    from nnsam_core import fine_tune

    spy = EncoderSpy()
    original = training.load_encoder
    training.load_encoder = spy.wrap(original)
    try:
        out = tmp_path_factory.mktemp("trained") / "chest_bundle"
        bundle = fine_tune(*chest_ct, output=out, slices=CHEST_SLICES, iterations=3, device="cpu", seed=1)
    finally:
        training.load_encoder = original
    return bundle, spy
