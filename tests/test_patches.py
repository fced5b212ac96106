"""vespo_megatron.patches: the te_general_gemm fix, reproduced without it in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

import pytest

_GATING = """
import torch
from megatron.core.transformer.moe import moe_utils
{patch}
inp, weight = torch.randn(3, 8), torch.randn(4, 8)
out = moe_utils.router_gating_linear(inp, weight, None, torch.float32)
torch.testing.assert_close(out, inp @ weight.t())
print("OK")
"""


def _run(patch: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _GATING.format(patch=patch)], capture_output=True, text=True, timeout=120
    )


@pytest.mark.megatron
def test_router_gating_fails_without_patch_and_works_with_it():
    from vespo_megatron.compat import transformer_engine_available

    if transformer_engine_available():
        pytest.skip("transformer-engine installed: the bug does not occur")
    unpatched = _run("")
    assert unpatched.returncode != 0
    assert "NameError" in unpatched.stderr and "te_general_gemm" in unpatched.stderr
    patched = _run("import vespo_megatron.patches as p; assert p.apply_all() == {'te_general_gemm': True}")
    assert patched.returncode == 0, patched.stderr
    assert patched.stdout.strip().endswith("OK")


def test_apply_is_idempotent_and_reports_changes(monkeypatch):
    from megatron.core.transformer.moe import moe_utils
    from vespo_megatron.patches import te_general_gemm

    monkeypatch.delattr(moe_utils, "te_general_gemm", raising=False)
    assert te_general_gemm.needed()
    assert te_general_gemm.apply() is True
    assert moe_utils.te_general_gemm is None
    assert te_general_gemm.apply() is False
    assert not te_general_gemm.needed()


def test_existing_attribute_is_left_alone(monkeypatch):
    from megatron.core.transformer.moe import moe_utils
    from vespo_megatron.patches import te_general_gemm

    sentinel = object()
    monkeypatch.setattr(moe_utils, "te_general_gemm", sentinel, raising=False)
    assert te_general_gemm.apply() is False
    assert moe_utils.te_general_gemm is sentinel
