"""vespo_megatron.patches: the te_general_gemm fix, reproduced without it in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

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
    patched = _run("import vespo_megatron.patches as p; assert p.apply_all()['te_general_gemm'] is True")
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


class _FakeCP:
    """The two methods the THD RoPE reads from a process group."""

    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def _loop_rope():
    """megatron-core's own per-sequence THD RoPE (whatever apply() did in this process)."""
    from megatron.core.models.common.embeddings import rope_utils

    from vespo_megatron.patches import thd_rope

    thd_rope.apply()
    return thd_rope.ORIGINAL or rope_utils._apply_rotary_pos_emb_thd, rope_utils._apply_rotary_pos_emb_thd


@pytest.mark.megatron
@pytest.mark.parametrize("cp_size", [1, 2])
@pytest.mark.parametrize("exact_offsets", [False, True])
@pytest.mark.parametrize("interleaved", [False, True])
def test_vectorised_thd_rope_is_bitwise_the_per_sequence_loop(cp_size, exact_offsets, interleaved):
    """The patched THD RoPE against megatron's loop on the same packs: output and input gradient bitwise equal,
    for every CP rank, with frequencies per position (max length rows) or per packed token (exact offsets)."""
    from vespo_megatron.patches import thd_rope

    loop, patched = _loop_rope()
    assert patched is not loop and thd_rope.ORIGINAL is loop
    gen = torch.Generator().manual_seed(cp_size * 10 + exact_offsets)
    lengths = [8, 4, 12, 4, 16] if cp_size > 1 else [5, 1, 9, 3, 7, 2]  # CP: multiples of 2 * cp
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    total, heads, dim = int(cu[-1]), 3, 8
    rows = total if exact_offsets else max(lengths)
    freqs = torch.randn(rows, 1, 1, dim, generator=gen, dtype=torch.float64).float() * 3
    for rank in range(cp_size):
        x = torch.randn(total // cp_size, heads, dim, generator=gen)
        grad_out = torch.randn_like(x)
        outs = []
        for fn in (loop, patched):
            t = x.clone().requires_grad_(True)
            out = fn(t, cu, freqs, rotary_interleaved=interleaved, cp_group=_FakeCP(cp_size, rank))
            out.backward(grad_out)
            outs.append((out.detach(), t.grad))
        assert torch.equal(outs[0][0], outs[1][0]), f"rank {rank}: outputs differ"
        assert torch.equal(outs[0][1], outs[1][1]), f"rank {rank}: gradients differ"


@pytest.mark.megatron
def test_thd_rope_positions_against_a_plain_loop():
    """packed_positions against positions written out by hand: per-sequence restart, the CP chunks of rank r
    ([r * seg, (r + 1) * seg) and the mirrored chunk), and the global start added in exact-offset mode."""
    from vespo_megatron.patches.thd_rope import packed_positions

    lengths = [8, 4, 12]
    cu = torch.tensor([0, 8, 12, 24])
    assert packed_positions(cu, 24, 1, 0, 12).tolist() == [*range(8), *range(4), *range(12)]
    assert packed_positions(cu, 24, 1, 0, 24).tolist() == list(range(24))
    for rank in range(2):
        expected = []
        for n in lengths:
            seg = n // 4
            expected += [*range(rank * seg, (rank + 1) * seg), *range(n - (rank + 1) * seg, n - rank * seg)]
        assert packed_positions(cu, 12, 2, rank, 12).tolist() == expected


def test_thd_rope_apply_is_idempotent():
    from megatron.core.models.common.embeddings import rope_utils

    from vespo_megatron.patches import thd_rope

    thd_rope.apply()
    assert not thd_rope.needed() and thd_rope.apply() is False
    assert rope_utils._apply_rotary_pos_emb_thd is thd_rope._apply_thd_vectorized


def _original_l2(tensors):
    """megatron's local_multi_tensor_l2_norm without its hard-coded CUDA device (on CPU)."""
    return torch.norm(torch.tensor([[torch.norm(t) for t in tensors]]))


def test_foreach_grad_norm_and_scale_are_the_local_fallbacks_bitwise():
    """On CPU (foreach = the per-tensor loop) the foreach norm gives megatron's fallback value exactly, and the
    foreach scale gives `dst.copy_(src * scale)` exactly, in place (clipping) and into other tensors and dtypes."""
    from megatron.core.utils import local_multi_tensor_scale

    from vespo_megatron.patches.local_multi_tensor import foreach_l2_norm, foreach_scale

    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(*shape, generator=gen) * 10 ** k for k, shape in enumerate([(7, 5), (3,), (64, 33), (1,)])]
    flag = torch.zeros(1, dtype=torch.int)
    norm, per = foreach_l2_norm(2048 * 32, flag, [grads[:2], grads[2:]], False)
    assert per is None and norm.shape == (1,) and norm.dtype == torch.float32
    assert norm.item() == _original_l2(grads).item()
    assert foreach_l2_norm(2048 * 32, flag, [[]], False)[0].tolist() == [0.0]
    for make_dst in (lambda g: g.clone(), lambda g: torch.empty_like(g, dtype=torch.bfloat16)):
        src = [g.clone() for g in grads]
        dst_ref, dst = [make_dst(g) for g in grads], [make_dst(g) for g in grads]
        local_multi_tensor_scale(2048 * 32, flag, [src, dst_ref], 0.3712)
        foreach_scale(2048 * 32, flag, [src, dst], 0.3712)
        assert all(torch.equal(a, b) for a, b in zip(dst, dst_ref, strict=True))
        assert all(torch.equal(a, b) for a, b in zip(src, grads, strict=True))  # sources untouched
    inplace, ref = [g.clone() for g in grads], [g.clone() for g in grads]
    local_multi_tensor_scale(2048 * 32, flag, [ref, ref], 0.3712)
    foreach_scale(2048 * 32, flag, [inplace, inplace], 0.3712)
    assert all(torch.equal(a, b) for a, b in zip(inplace, ref, strict=True))
    with pytest.raises(ValueError, match="as many destinations"):
        foreach_scale(2048 * 32, flag, [grads, grads[:1]], 0.5)


def test_local_multi_tensor_patch_replaces_only_the_fallbacks(monkeypatch):
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    from vespo_megatron.patches import local_multi_tensor as patch

    monkeypatch.setattr(clip_grads, "l2_norm_impl", utils.local_multi_tensor_l2_norm)
    monkeypatch.setattr(clip_grads, "multi_tensor_scale_impl", utils.local_multi_tensor_scale)
    sentinel = object()  # a fused kernel (apex / transformer-engine) stays
    monkeypatch.setattr(optimizer, "multi_tensor_scale_impl", sentinel)
    assert patch.needed() and patch.apply() is True
    assert clip_grads.l2_norm_impl is patch.foreach_l2_norm
    assert clip_grads.multi_tensor_scale_impl is patch.foreach_scale
    assert optimizer.multi_tensor_scale_impl is sentinel
    assert not patch.needed() and patch.apply() is False
