"""MobileSAM weights: an official-format checkpoint written by the test is imported, verified and loaded."""

from __future__ import annotations

import pytest
import torch

from nnsam_core import weights
from nnsam_core.encoders import load_encoder
from nnsam_core.errors import NNSAMError


@pytest.fixture
def official_format_checkpoint(tmp_path, monkeypatch):
    """A mobile_sam.pt in the official format: the whole Sam model's state_dict (random weights)."""
    from mobile_sam import sam_model_registry

    monkeypatch.setenv("NNSAM_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    sam = sam_model_registry["vit_t"]()
    path = tmp_path / "mobile_sam.pt"
    torch.save(sam.state_dict(), path)
    return path, sam


def test_missing_weights_say_how_to_import(tmp_path, monkeypatch):
    monkeypatch.setenv("NNSAM_CACHE_DIR", str(tmp_path / "empty-cache"))
    with pytest.raises(NNSAMError, match="nnsam weights import mobilesam FILE"):
        load_encoder("mobilesam")


def test_unofficial_file_is_refused_without_a_pin(official_format_checkpoint, monkeypatch):
    path, _ = official_format_checkpoint
    monkeypatch.delenv("NNSAM_MOBILESAM_SHA256", raising=False)
    with pytest.raises(NNSAMError, match="not the official MobileSAM checkpoint"):
        weights.import_mobilesam(path)
    assert not weights.mobilesam_path().exists()


def test_wrong_sha256_is_refused(official_format_checkpoint, monkeypatch):
    path, _ = official_format_checkpoint
    monkeypatch.setenv("NNSAM_MOBILESAM_SHA256", "0" * 64)
    with pytest.raises(NNSAMError, match="SHA-256"):
        weights.import_mobilesam(path)
    assert not weights.mobilesam_path().exists()


def test_pinned_checkpoint_imports_and_loads(official_format_checkpoint, monkeypatch):
    path, sam = official_format_checkpoint
    sha = weights.sha256_of(path)
    monkeypatch.setenv("NNSAM_MOBILESAM_SHA256", sha)
    cached = weights.import_mobilesam(path)
    assert cached == weights.mobilesam_path() and cached.is_file()
    status = {row.encoder: row for row in weights.status()}
    assert status["mobilesam"].available and status["mobilesam"].sha256 == sha

    encoder = load_encoder("mobilesam", precision="float32")  # exact, to compare with MobileSAM's own module
    assert encoder.weights_sha256 == sha
    for key, value in encoder.module.state_dict().items():
        assert torch.equal(value, sam.image_encoder.state_dict()[key]), key
    slices = torch.randn(1, 1, 96, 80)
    embedding = encoder(slices)
    assert embedding.shape == (1, 256, 64, 64)
    with torch.no_grad():  # the same as MobileSAM's own encoder on the prepared input
        expected = sam.image_encoder.eval()(encoder.prepare(slices))
    assert torch.allclose(embedding, expected, atol=1e-5)


def test_git_blob_id_matches_git(tmp_path):
    import subprocess
    file = tmp_path / "blob.bin"
    file.write_bytes(b"nnsam\x00" * 1000)
    expected = subprocess.run(["git", "hash-object", str(file)], capture_output=True, text=True, check=True).stdout
    assert weights.git_blob_sha1_of(file) == expected.strip()
