"""vespo_megatron.megatron.norms.Norm: RMSNorm against a float64 loop and, on CPU, bitwise against the explicit
formula it replaced (torch's rms_norm is that composite there; on CUDA it is one fused kernel)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.megatron


def _config(**kw):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True,
                             normalization="RMSNorm", **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_float64_and_the_explicit_formula(dtype):
    from vespo_megatron.megatron.norms import Norm

    norm = Norm(_config(), 32, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 32))
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 3, 32, generator=g) * 3).to(dtype)
    y = norm(x)
    assert y.dtype == dtype and y.shape == x.shape
    xd, wd = x.double(), norm.weight.double()
    ref = torch.empty_like(xd)
    for i in range(5):
        for j in range(3):
            ms = sum(float(v) ** 2 for v in xd[i, j]) / 32
            ref[i, j] = xd[i, j] / (ms + 1e-6) ** 0.5 * wd
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(y.double(), ref, **tol)
    xf = x.float()
    explicit = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.float()).to(dtype)
    assert torch.equal(y, explicit)
