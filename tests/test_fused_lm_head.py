"""fused_lm_head_logprobs against a float64 reference of the logits path (hidden @ W.T -> log_softmax), forward
and backward (d hidden and d W), with tiles small enough that the forward has many token chunks and the
backward many vocab tiles and several token blocks; against the bf16 logits path (vocab_parallel_logprobs
on materialised logits); and sharded over a real gloo TP group of 2 with replicated hidden states."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_harness import run_distributed

from vespo_megatron.parallel.fused_lm_head import fused_lm_head_logprobs
from vespo_megatron.parallel.vocab_parallel import vocab_parallel_logprobs

# fp32 inputs: fp32 GEMMs with K = H <= 64 and fp32 statistics -> 2e-5 absolute (logits ~ N(0, 3^2)).
FP32_TOL = dict(rtol=0.0, atol=2e-5)


def make_inputs(t, h, v, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * (3.0 / h**0.5)).to(dtype)  # logits ~ N(0, 3^2)
    targets = torch.randint(0, v, (t,), generator=g)
    return hidden, weight, targets, torch.randn(t, generator=g), torch.randn(t, generator=g)


def reference(hidden, weight, targets, temperature, glp, gh, entropy=True):
    """float64 logits path: logp, entropy and the gradients of sum(g_lp * logp + g_h * H) for hidden and W."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    logp_all = torch.log_softmax((h @ w.t()) / temperature, dim=-1)
    lp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    obj = (lp * glp.double()).sum() + ((ent * gh.double()).sum() if entropy else 0.0)
    dh, dw = torch.autograd.grad(obj, (h, w))
    return lp.detach(), ent.detach(), dh, dw


def run_fused(hidden, weight, targets, glp, gh, entropy=True, **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    out = fused_lm_head_logprobs(h, w, targets, compute_entropy=entropy, **kw)
    obj = (out.logprobs * glp).sum() + ((out.entropy * gh).sum() if entropy else 0.0)
    dh, dw = torch.autograd.grad(obj, (h, w))
    return out, dh, dw


# chunk_elements: 10**9 = one tile everywhere; 300 * 7 = 7 tokens per forward chunk and 7 vocab rows per
# backward tile (43 tiles); 2100 = 7 * 300 but 300 < 4096 so the backward's token blocks hold 2100 // 300 = 7
# tokens: several token blocks, dW accumulated in fp32.
@pytest.mark.parametrize("chunk_elements", [10**9, 300 * 7, 50])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("entropy", [True, False])
def test_matches_float64_reference(chunk_elements, temperature, entropy):
    hidden, weight, targets, glp, gh = make_inputs(37, 24, 300, seed=chunk_elements % 97)
    out, dh, dw = run_fused(hidden, weight, targets, glp, gh, entropy=entropy, temperature=temperature,
                            chunk_elements=chunk_elements)
    ref_lp, ref_h, ref_dh, ref_dw = reference(hidden, weight, targets, temperature, glp, gh, entropy)
    assert out.logprobs.dtype == torch.float32 and out.logprobs.shape == targets.shape
    assert (out.entropy is not None) == entropy
    torch.testing.assert_close(out.logprobs.double(), ref_lp, **FP32_TOL)
    if entropy:
        torch.testing.assert_close(out.entropy.double(), ref_h, **FP32_TOL)
    assert dh.dtype == torch.float32 and dw.dtype == torch.float32
    torch.testing.assert_close(dh.double(), ref_dh, **FP32_TOL)
    torch.testing.assert_close(dw.double(), ref_dw, **FP32_TOL)


def test_float64_inputs_and_leading_shape():
    """float64 hidden/W: the statistics are fp32 (as in vocab_parallel), so fp32 accuracy; gradients stay fp64."""
    hidden, weight, targets, glp, gh = make_inputs(30, 16, 50, dtype=torch.float64, seed=3)
    out, dh, dw = run_fused(hidden.view(5, 6, 16), weight, targets.view(5, 6), glp.view(5, 6), gh.view(5, 6),
                            temperature=1.3, chunk_elements=64)
    ref_lp, ref_h, ref_dh, ref_dw = reference(hidden, weight, targets, 1.3, glp, gh)
    assert out.logprobs.shape == (5, 6) and out.entropy.shape == (5, 6) and dh.shape == (5, 6, 16)
    tol = FP32_TOL
    assert dh.dtype == torch.float64 and dw.dtype == torch.float64
    torch.testing.assert_close(out.logprobs.reshape(-1).double(), ref_lp, **tol)
    torch.testing.assert_close(out.entropy.reshape(-1).double(), ref_h, **tol)
    torch.testing.assert_close(dh.reshape(-1, 16), ref_dh, **tol)
    torch.testing.assert_close(dw, ref_dw, **tol)


def test_bf16_equals_logits_path_up_to_rounding():
    """bf16 hidden/W: the fused head and the logits path (bf16 logits, then vocab_parallel_logprobs) agree to
    bf16 rounding of the gradients; both against float64 on the same bf16 inputs."""
    hidden, weight, targets, glp, gh = make_inputs(64, 32, 500, dtype=torch.bfloat16, seed=11)
    out, dh, dw = run_fused(hidden, weight, targets, glp, gh, temperature=0.8, chunk_elements=500 * 9)

    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    lp_path = vocab_parallel_logprobs(h @ w.t(), targets, temperature=0.8, compute_entropy=True)
    (lp_path.logprobs * glp + lp_path.entropy * gh).sum().backward()
    ref_lp, ref_h, ref_dh, ref_dw = reference(hidden, weight, targets, 0.8, glp, gh)

    assert dh.dtype == torch.bfloat16 and dw.dtype == torch.bfloat16
    # forward: both round the logits to bf16 once (a bf16 GEMM); CPU bf16 GEMMs may differ in the last bit
    torch.testing.assert_close(out.logprobs, lp_path.logprobs, rtol=0.0, atol=0.1)
    for ours, path, ref in ((dh, h.grad, ref_dh), (dw, w.grad, ref_dw)):
        scale = ref.abs().max().item()
        err_ours = (ours.double() - ref).abs().max().item() / scale
        err_path = (path.double() - ref).abs().max().item() / scale
        assert err_ours < 0.02 and err_path < 0.02, (err_ours, err_path)
        # relative to each other: within a few bf16 ulps of the largest entry
        assert (ours.double() - path.double()).abs().max().item() / scale < 0.02


def test_only_one_input_needs_grad_and_no_grad_pass():
    hidden, weight, targets, glp, gh = make_inputs(20, 8, 40, seed=5)
    _, _, ref_dh, ref_dw = reference(hidden, weight, targets, 1.0, glp, gh)
    w = weight.clone().requires_grad_()
    out = fused_lm_head_logprobs(hidden, w, targets, compute_entropy=True, chunk_elements=90)
    ((out.logprobs * glp).sum() + (out.entropy * gh).sum()).backward()
    torch.testing.assert_close(w.grad.double(), ref_dw, **FP32_TOL)
    h = hidden.clone().requires_grad_()
    out = fused_lm_head_logprobs(h, weight, targets, compute_entropy=True, chunk_elements=90)
    ((out.logprobs * glp).sum() + (out.entropy * gh).sum()).backward()
    torch.testing.assert_close(h.grad.double(), ref_dh, **FP32_TOL)
    with torch.no_grad():  # the old-log-prob pass
        out = fused_lm_head_logprobs(h, w, targets, compute_entropy=True, chunk_elements=90)
    assert not out.logprobs.requires_grad and out.logprobs.grad_fn is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=0.0), r"temperature: expected a finite float > 0, got 0\.0"),
        (dict(chunk_elements=0), r"chunk_elements: expected None or an int >= 1, got 0"),
        (dict(backend="cuda"), r"backend: expected one of"),
        (dict(weight=torch.randn(10, 7)), r"weight: expected a \[V/tp, H=8\] tensor"),
        (dict(weight=torch.randn(10, 8, dtype=torch.float64)), r"weight: expected dtype torch\.float32"),
        (dict(targets=torch.tensor([0, 1, 2, 10])), r"targets: expected token ids in \[0, 10\) .* \[0, 10\]"),
        (dict(targets=torch.zeros(5, dtype=torch.long)), r"targets: expected shape \(4,\)"),
    ],
)
def test_bad_inputs_raise(kwargs, match):
    args = dict(hidden=torch.randn(4, 8), weight=torch.randn(10, 8), targets=torch.zeros(4, dtype=torch.long))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fused_lm_head_logprobs(args.pop("hidden"), args.pop("weight"), args.pop("targets"), **args)


# ---------------------------------------------------------------------------------------------------------
# gloo TP = 2: each rank holds V/2 rows of W and the full hidden states; the partial d hidden is summed over
# TP (megatron's copy_to_tensor_model_parallel_region does that in the step).
# ---------------------------------------------------------------------------------------------------------


def _tp_worker(rank, world_size, hidden, weight, targets, glp, gh, chunk_elements):
    v_local = weight.shape[0] // world_size
    shard = weight[rank * v_local : (rank + 1) * v_local]
    h = hidden.clone().requires_grad_()
    w = shard.clone().requires_grad_()
    out = fused_lm_head_logprobs(h, w, targets, tp_group=dist.group.WORLD, temperature=0.9,
                                 compute_entropy=True, chunk_elements=chunk_elements)
    ((out.logprobs * glp).sum() + (out.entropy * gh).sum()).backward()
    dh = h.grad.clone()
    dist.all_reduce(dh)
    return out.logprobs, out.entropy, dh, w.grad


@pytest.mark.distributed
@pytest.mark.parametrize("chunk_elements", [None, 60])
def test_tp2_matches_reference(chunk_elements):
    hidden, weight, targets, glp, gh = make_inputs(23, 16, 120, seed=7)
    res = run_distributed(_tp_worker, 2, hidden, weight, targets, glp, gh, chunk_elements)
    ref_lp, ref_h, ref_dh, ref_dw = reference(hidden, weight, targets, 0.9, glp, gh)
    for lp, ent, dh, _ in res:
        torch.testing.assert_close(lp.double(), ref_lp, **FP32_TOL)
        torch.testing.assert_close(ent.double(), ref_h, **FP32_TOL)
        torch.testing.assert_close(dh.double(), ref_dh, **FP32_TOL)
    dw = torch.cat([r[3] for r in res])
    torch.testing.assert_close(dw.double(), ref_dw, **FP32_TOL)
