"""The frozen encoder's precision on a CPU: bfloat16 only where the CPU runs it natively (auto), float32
elsewhere, NNSAM_ENCODER_PRECISION to choose, and a bad choice refused in one line before any work."""

from __future__ import annotations

import pytest
import torch

from nnsam_core import encoders
from nnsam_core.encoders import PRECISION_ENV, load_encoder, native_cpu_bfloat16, resolve_cpu_precision
from nnsam_core.errors import NNSAMError


@pytest.fixture
def fresh_detection():
    native_cpu_bfloat16.cache_clear()
    yield
    native_cpu_bfloat16.cache_clear()


@pytest.mark.parametrize("flags, machine, native", [
    ({"avx512f", "avx512_bf16"}, "x86_64", True),
    ({"amx_bf16", "amx_tile"}, "x86_64", True),
    ({"avx512f", "avx2"}, "x86_64", False),       # AVX-512 without bfloat16: emulated, slower than float32
    (set(), "x86_64", False),                      # flags unreadable (not Linux)
    ({"avx512_bf16"}, "aarch64", False),           # not measured there: float32
])
def test_native_bfloat16_needs_the_cpu_flag(monkeypatch, fresh_detection, flags, machine, native):
    monkeypatch.setattr(encoders, "_cpu_flags", lambda: flags)
    monkeypatch.setattr(encoders.platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    assert native_cpu_bfloat16() is native
    monkeypatch.delenv(PRECISION_ENV, raising=False)
    assert resolve_cpu_precision() == ("bfloat16" if native else "float32")


def test_native_bfloat16_also_needs_torch_to_use_it(monkeypatch, fresh_detection):
    monkeypatch.setattr(encoders, "_cpu_flags", lambda: {"avx512_bf16"})
    monkeypatch.setattr(encoders.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False, raising=False)
    assert native_cpu_bfloat16() is False


def test_explicit_and_environment_choices_win_over_detection(monkeypatch):
    assert resolve_cpu_precision("float32") == "float32"
    assert resolve_cpu_precision("bfloat16") == "bfloat16"
    monkeypatch.setenv(PRECISION_ENV, "float32")
    assert resolve_cpu_precision() == "float32"
    monkeypatch.setenv(PRECISION_ENV, " BFloat16 ")
    assert resolve_cpu_precision() == "bfloat16"
    assert resolve_cpu_precision("float32") == "float32"  # an explicit argument beats the environment


def test_a_bad_choice_is_refused_in_one_line_naming_where_it_came_from(monkeypatch):
    monkeypatch.setenv(PRECISION_ENV, "fp8")
    with pytest.raises(NNSAMError, match=f"{PRECISION_ENV}=fp8 is not one of auto, float32, bfloat16") as caught:
        load_encoder("litemedsam", pretrained=False)  # refused before any weights are read
    assert "\n" not in str(caught.value)
    with pytest.raises(NNSAMError, match="encoder precision 'half'"):
        resolve_cpu_precision("half")


def test_the_encoder_computes_at_its_precision(monkeypatch):
    """float32 gives the module's own float32 result; bfloat16 gives a close but different embedding, float32
    typed either way; the environment reaches encoders built deep inside (trainer, segmenter)."""
    torch.manual_seed(0)
    slices = torch.randn(1, 1, 64, 64)
    exact = load_encoder("litemedsam", pretrained=False, precision="float32")
    half = load_encoder("litemedsam", pretrained=False, precision="bfloat16")
    assert (exact.cpu_precision, half.cpu_precision) == ("float32", "bfloat16")
    e32, e16 = exact(slices), half(slices)
    assert e32.dtype == e16.dtype == torch.float32 and e32.shape == e16.shape == (1, 256, 64, 64)
    with torch.no_grad():
        reference = exact.module(exact.prepare(slices).contiguous())
    torch.testing.assert_close(e32, reference, rtol=1e-4, atol=1e-4)
    assert not torch.equal(e16, e32)
    cosine = torch.nn.functional.cosine_similarity(e16.flatten(), e32.flatten(), dim=0)
    assert cosine > 0.98

    monkeypatch.setenv(PRECISION_ENV, "float32")
    assert load_encoder("litemedsam", pretrained=False).cpu_precision == "float32"
