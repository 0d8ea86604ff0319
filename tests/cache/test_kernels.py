"""The fused encode+statistics kernel against its torch reference.

The reference is checked against first principles here; the Triton kernel is checked against the
reference bit for bit, on CPU through Triton's interpreter (when Triton is installed) and on CUDA
when a GPU is present (experiments/benchmarks/gpu_cache_sae.py runs the same check on a GPU).
"""

import textwrap

import pytest
import torch

from irmlens.cache.capture import capture_encoded, capture_hooks
from irmlens.cache.kernels import encode_reference, encode_with_statistics, triton

H1 = "blocks.1.hook_resid_post"


def _hard_rows() -> torch.Tensor:
    """Random rows plus the awkward cases: a zero row, exact .5 ties, one huge value, odd d."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(53, 70, generator=g) * 3
    x[5] = 0.0
    x[6] = torch.arange(70) % 3 - 1.0  # absmax 1, scale 1/127
    x[6, :10] = 0.5 / 127 * torch.arange(1, 11)  # v = 0.5, 1.0, 1.5, ... : ties
    x[7, 3] = 1e4
    return x


def test_reference_matches_first_principles():
    x = _hard_rows()
    for dtype in ("float32", "bfloat16", "int8"):
        tensors, col_sum, norm_sum = encode_reference(x, dtype)
        assert torch.allclose(col_sum.double(), x.double().sum(0), rtol=1e-5, atol=1e-4)
        assert abs(norm_sum.item() - x.double().norm(dim=1).sum().item()) < 1e-3
    assert torch.equal(encode_reference(x, "bfloat16")[0]["activations"], x.to(torch.bfloat16))
    t = encode_reference(x, "int8")[0]
    recon = t["q"].float() * t["scale"][:, None]
    bound = x.abs().amax(1, keepdim=True) / 254
    assert ((recon - x).abs() <= bound * (1 + 1e-5) + 1e-12).all()
    assert t["q"][5].eq(0).all() and t["scale"][5] == 0
    # Ties round away from zero: v = 0.5 -> 1, 1.5 -> 2, 2.5 -> 3.
    assert t["q"][6, :5].tolist() == [1, 1, 2, 2, 3]
    with pytest.raises(ValueError, match="cache dtype 'fp8'"):
        encode_reference(x, "fp8")


def test_capture_encoded_equals_capture_then_encode_on_cpu(make_hooked):
    model = make_hooked()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, 300, (9, 12), generator=g)
    valid = torch.ones_like(tokens, dtype=torch.bool)
    valid[:, 0] = False
    valid[4, 7:] = False
    plain = capture_hooks(model, tokens, valid, [H1], batch_size=4)[H1]
    for dtype in ("bfloat16", "int8"):
        tensors, col_sum, norm_sum = capture_encoded(model, tokens, valid, [H1], 4, dtype)[H1]
        expected, _, _ = encode_reference(plain, dtype)
        for key in expected:
            assert torch.equal(tensors[key], expected[key]), (dtype, key)
        assert torch.allclose(col_sum, plain.double().sum(0), rtol=1e-5, atol=1e-4)
        assert abs(norm_sum - plain.double().norm(dim=1).sum().item()) < 1e-2


_INTERPRETED = textwrap.dedent(
    """
    import torch
    from irmlens.cache.kernels import encode_reference, encode_triton
    from tests.cache.test_kernels import _hard_rows
    x = _hard_rows()
    for rows in (1, 8, 16):
        for dtype in ("float32", "bfloat16", "int8"):
            ref, cs, ns = encode_reference(x, dtype)
            got, cs2, ns2 = encode_triton(x, dtype, rows_per_program=rows)
            for k in ref:
                assert torch.equal(ref[k], got[k]), (rows, dtype, k)
            assert torch.allclose(cs, cs2, rtol=1e-5, atol=1e-4), (rows, dtype)
            assert abs(ns.item() - ns2.item()) <= 1e-5 * ns.item(), (rows, dtype)
    empty = encode_triton(x[:0], "int8")
    assert empty[0]["q"].shape == (0, 70) and empty[1].abs().sum() == 0
    print("kernel == reference")
    """
)


@pytest.mark.skipif(triton is None, reason="Triton not installed (pip install triton)")
def test_triton_kernel_matches_reference_in_interpreter(triton_interpreter):
    """Runs the real kernel source on CPU via TRITON_INTERPRET=1 (read when the kernel is defined)."""
    assert "kernel == reference" in triton_interpreter(_INTERPRETED)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_triton_kernel_matches_reference_on_cuda():  # pragma: no cover - GPU only
    x = _hard_rows().cuda()
    for dtype in ("float32", "bfloat16", "int8"):
        ref, cs, ns = encode_reference(x.cpu(), dtype)
        got, cs2, ns2 = encode_with_statistics(x, dtype)
        for k in ref:
            assert torch.equal(ref[k], got[k].cpu()), (dtype, k)
        assert torch.allclose(cs, cs2.cpu(), rtol=1e-5, atol=1e-4)
        assert abs(ns.item() - ns2.item()) <= 1e-5 * ns.item()
