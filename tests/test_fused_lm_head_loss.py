"""fused_lm_head_loss (the single-pass head: the loss runs per chunk of whole sequences inside the head) against a
float64 reference of the logits path with the loss on the whole batch: loss, log-probs, entropies, d hidden and
d W, for chunk budgets that give one chunk, several chunks and sequences longer than a chunk (those go through
the recomputing head's tiles: `HeadLossOutput.recomputed`; no tensor larger than a tile is created, whatever
their length); with a loss that has a detached sequence weight (VESPO-like), a differentiable sequence term
(GSPO-like) and an entropy bonus; temperature; the upstream gradient scale; megatron's main_grad contract; bf16
against the logits path (and backward's in-place scaling of the fp32 d W accumulator); the no-grad pass; bad
inputs; and a real gloo TP group of 2 with replicated hidden states and an over-long sequence.

`fused_lm_head_chunked_logprobs` (the single pass's forward-only pass, RL's old-log-prob pass) gives bitwise the
single pass's log-probs and entropies (fp32 and bf16, whole chunks, sequences held whole over the budget and
over-long ones through the recomputing tiles, TP2), runs the same GEMMs (shapes recorded at dispatch, unlike the
recomputing head's token tiles) and stores nothing for backward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from dist_harness import run_distributed
from gemm_shapes import GemmShapes
from torch.utils._python_dispatch import TorchDispatchMode

from vespo_megatron.parallel.fused_lm_head import DEFAULT_CHUNK_ELEMENTS, fused_lm_head_logprobs
from vespo_megatron.parallel.fused_lm_head_loss import (
    DEFAULT_SINGLE_PASS_CHUNK_ELEMENTS,
    default_whole_sequence_elements,
    fused_lm_head_chunked_logprobs,
    fused_lm_head_loss,
    plan_head_chunks,
    plan_sequence_chunks,
)
from vespo_megatron.parallel.vocab_parallel import vocab_parallel_logprobs

SEQ_TOKENS = [7, 12, 0, 5, 9, 4]  # one empty sequence: it joins a neighbour's chunk
T, H, V = sum(SEQ_TOKENS), 24, 300


def head_loss(*args, **kwargs):
    """fused_lm_head_loss with its hard cap, whole_sequence_elements = chunk_elements: the sequences here are a
    few tokens over their budgets, which the default (twice a chunk) would still hold whole."""
    if kwargs.get("chunk_elements") is not None:
        kwargs.setdefault("whole_sequence_elements", kwargs["chunk_elements"])
    return fused_lm_head_loss(*args, **kwargs)


def make_inputs(dtype=torch.float32, seed=0, seq_tokens=SEQ_TOKENS, v=V):
    g = torch.Generator().manual_seed(seed)
    t = sum(seq_tokens)
    hidden = torch.randn(t, H, generator=g).to(dtype)
    weight = (torch.randn(v, H, generator=g) * (3.0 / H**0.5)).to(dtype)
    targets = torch.randint(0, v, (t,), generator=g)
    old = -torch.rand(t, generator=g, dtype=torch.float64) * 6
    adv = torch.randn(len(seq_tokens), generator=g, dtype=torch.float64)
    return hidden, weight, targets, old, adv


def seq_loss(lp, ent, seq, n, old, adv):
    """A sum over sequences (global normaliser T): a detached sequence weight on log pi, a differentiable
    sequence-level ratio term and an entropy bonus."""
    lp64, zeros = lp.double(), torch.zeros(n, dtype=torch.float64)
    log_w = zeros.index_add(0, seq, lp64 - old)  # [n]
    phi = torch.exp(-0.1 * log_w.detach().abs())
    count = zeros.index_add(0, seq, torch.ones_like(lp64)).clamp(min=1)
    gspo = torch.exp((log_w / count).clamp(max=5.0))
    loss = -(phi[seq] * adv[seq] * lp64).sum() - (gspo * adv).sum() * 0.3
    if ent is not None:
        loss = loss - 0.05 * ent.double().sum()
    return loss / T


def reference(hidden, weight, targets, old, adv, temperature, entropy, scale=1.0, seq_tokens=SEQ_TOKENS):
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    logp_all = torch.log_softmax((h @ w.t()) / temperature, dim=-1)
    lp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1) if entropy else None
    seq = torch.repeat_interleave(torch.arange(len(seq_tokens)), torch.tensor(seq_tokens))
    loss = seq_loss(lp, ent, seq, len(seq_tokens), old, adv)
    dh, dw = torch.autograd.grad(loss * scale, (h, w))
    return loss.detach(), lp.detach(), None if ent is None else ent.detach(), dh, dw


def chunk_loss_of(old, adv, calls=None, seq_tokens=SEQ_TOKENS):
    seq = torch.repeat_interleave(torch.arange(len(seq_tokens)), torch.tensor(seq_tokens))

    def chunk_loss(c):
        if calls is not None:
            calls.append((c.seq_start, c.seq_end, c.start, c.end, c.logprobs.requires_grad))
        tokens = slice(c.start, c.end)
        return seq_loss(c.logprobs, c.entropy, seq[tokens] - c.seq_start, c.seq_end - c.seq_start, old[tokens],
                        adv[c.seq_start:c.seq_end])

    return chunk_loss


def test_plan_sequence_chunks():
    assert plan_sequence_chunks([7, 12, 0, 5, 9, 4], 10 ** 6) == [(0, 6)]
    assert plan_sequence_chunks([7, 12, 0, 5, 9, 4], 20) == [(0, 3), (3, 6)]
    assert plan_sequence_chunks([7, 12, 0, 5, 9, 4], 5) == [(0, 1), (1, 2), (2, 4), (4, 5), (5, 6)]
    assert plan_sequence_chunks([], 5) == []
    with pytest.raises(ValueError, match=r"max_tokens must be >= 1, got 0"):
        plan_sequence_chunks([1], 0)
    with pytest.raises(ValueError, match=r"seq_tokens\[1\] must be >= 0, got -2"):
        plan_sequence_chunks([1, -2], 4)


# chunk_elements / V tokens per chunk: 10**9 -> one chunk; 20 * V -> 2 chunks of whole sequences; 8 * V -> the
# sequences of 12 and 9 tokens are longer than a chunk (a chunk of their own, recomputed) between short ones;
# 5 * V -> those of 7, 12 and 9 tokens are (the recomputing head then takes 2-3 tiles of 5 tokens each).
@pytest.mark.parametrize(("chunk_elements", "recomputed"), [
    (10**9, (False,)), (20 * V, (False, False)), (8 * V, (False, True, False, True, False)),
    (5 * V, (True, True, False, True, False))])
@pytest.mark.parametrize(("temperature", "entropy"), [(1.0, False), (0.7, True)])
def test_matches_float64_reference(chunk_elements, recomputed, temperature, entropy):
    chunks = len(recomputed)
    hidden, weight, targets, old, adv = make_inputs(seed=chunk_elements % 89)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    calls = []
    out = head_loss(h, w, targets, chunk_loss_of(old, adv, calls), seq_tokens=SEQ_TOKENS,
                             temperature=temperature, compute_entropy=entropy, chunk_elements=chunk_elements)
    assert len(out.chunks) == len(calls) == chunks and out.recomputed == recomputed
    assert [c[:2] for c in calls] == list(out.chunks) and all(c[4] for c in calls)
    assert calls[0][2] == 0 and calls[-1][3] == T  # contiguous token ranges covering every token
    assert all(a[3] == b[2] for a, b in zip(calls[:-1], calls[1:], strict=True))
    dh, dw = torch.autograd.grad(out.loss * 3.0, (h, w))  # an upstream scale, as a loss scaler gives
    ref_loss, ref_lp, ref_ent, ref_dh, ref_dw = reference(hidden, weight, targets, old, adv, temperature, entropy,
                                                          scale=3.0)
    tol = dict(rtol=0.0, atol=2e-5)
    assert out.logprobs.dtype == torch.float32 and not out.logprobs.requires_grad
    torch.testing.assert_close(out.logprobs.double(), ref_lp, **tol)
    torch.testing.assert_close(out.loss.double(), ref_loss, rtol=1e-5, atol=1e-7)
    if entropy:
        torch.testing.assert_close(out.entropy.double(), ref_ent, **tol)
    else:
        assert out.entropy is None
    assert ref_dh.abs().max() > 1e-3 and ref_dw.abs().max() > 1e-3
    torch.testing.assert_close(dh.double(), ref_dh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dw.double(), ref_dw, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("chunk_elements", "recomputed"), [
    (20 * V, (False, False)), (8 * V, (False, True, False, True, False)), (4 * V, (True,) * 4 + (False,))])
def test_bf16_equals_logits_path_up_to_rounding(chunk_elements, recomputed):
    """bf16 inputs: the single pass (d W accumulated in fp32 over 2 chunks, or over short chunks and the
    recomputing head's tiles of the over-long sequences) against the bf16 logits path."""
    hidden, weight, targets, old, adv = make_inputs(torch.bfloat16, seed=3)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = head_loss(h, w, targets, chunk_loss_of(old, adv), seq_tokens=SEQ_TOKENS,
                             chunk_elements=chunk_elements)
    dh, dw = torch.autograd.grad(out.loss, (h, w))
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp = vocab_parallel_logprobs(h2 @ w2.t(), targets)
    seq = torch.repeat_interleave(torch.arange(len(SEQ_TOKENS)), torch.tensor(SEQ_TOKENS))
    loss = seq_loss(lp.logprobs, None, seq, len(SEQ_TOKENS), old, adv)
    ref_dh, ref_dw = torch.autograd.grad(loss, (h2, w2))
    assert dh.dtype == dw.dtype == torch.bfloat16 and out.recomputed == recomputed
    torch.testing.assert_close(out.loss.double(), loss.double(), rtol=1e-5, atol=1e-7)
    for got, ref in ((dh, ref_dh), (dw, ref_dw)):
        rel = (got.float() - ref.float()).norm() / ref.float().norm()
        assert rel < 1e-2, rel  # bf16 rounding of the logits gradient and of the outputs


def test_weight_gradient_into_megatron_main_grad():
    """A weight with megatron DDP's fp32 main_grad and grad_added_to_main_grad: backward adds scale * d W to
    main_grad, sets the flag and hands autograd a dummy (zeros when zero_out_wgrad is set)."""
    hidden, weight, targets, old, adv = make_inputs(seed=4)
    ref_dw = reference(hidden, weight, targets, old, adv, 1.0, False, scale=2.0)[4]
    for zero_out, elements in ((False, 20 * V), (True, 20 * V), (False, 8 * V)):
        w = torch.nn.Parameter(weight.clone())
        w.main_grad = torch.full_like(w, 0.5)
        w.grad_added_to_main_grad = False
        if zero_out:
            w.zero_out_wgrad = True
        h = hidden.clone().requires_grad_()
        out = head_loss(h, w, targets, chunk_loss_of(old, adv), seq_tokens=SEQ_TOKENS,
                                 chunk_elements=elements)
        (out.loss * 2.0).backward()
        assert w.grad_added_to_main_grad is True and any(out.recomputed) == (elements == 8 * V)
        torch.testing.assert_close(w.main_grad.double(), ref_dw + 0.5, rtol=1e-4, atol=1e-6)
        assert w.grad is not None and w.grad.shape == w.shape
        if zero_out:
            assert not w.grad.any()
    # into_main_grad=False (a tied weight): a real gradient for autograd to sum, main_grad left to DDP's hook
    w = torch.nn.Parameter(weight.clone())
    w.main_grad, w.grad_added_to_main_grad = torch.zeros_like(w), False
    out = head_loss(hidden, w, targets, chunk_loss_of(old, adv), seq_tokens=SEQ_TOKENS,
                             chunk_elements=20 * V, into_main_grad=False)
    (out.loss * 2.0).backward()
    assert w.grad_added_to_main_grad is False and not w.main_grad.any()
    torch.testing.assert_close(w.grad.double(), ref_dw, rtol=1e-4, atol=1e-6)


def test_bf16_weight_into_fp32_main_grad_one_and_two_chunks():
    """A bf16 weight with megatron's fp32 main_grad, as a bf16 run under DDP has it: d W reaches main_grad in
    fp32 with one chunk (no direct GEMM into the fp32 buffer) and with two, close to the float64 reference."""
    hidden, weight, targets, old, adv = make_inputs(torch.bfloat16, seed=8)
    ref_dw = reference(hidden.double(), weight.double(), targets, old, adv, 1.0, False)[4]
    for elements, n_chunks in ((10 ** 6, 1), (20 * V, 2), (8 * V, 5)):
        w = torch.nn.Parameter(weight.clone())
        w.main_grad = torch.zeros(w.shape, dtype=torch.float32)
        w.grad_added_to_main_grad = False
        out = head_loss(hidden, w, targets, chunk_loss_of(old, adv), seq_tokens=SEQ_TOKENS,
                                 chunk_elements=elements)
        out.loss.backward()
        assert len(out.chunks) == n_chunks and w.grad_added_to_main_grad is True
        rel = (w.main_grad.double() - ref_dw).norm() / ref_dw.norm()
        assert rel < 1e-2, (n_chunks, rel)


@pytest.mark.parametrize("chunk_elements", [20 * V, 8 * V])  # 8 * V: two sequences through the recomputing tiles
def test_no_grad_pass_and_inputs_without_grad(chunk_elements):
    hidden, weight, targets, old, adv = make_inputs(seed=5)
    ref_loss, ref_lp, _, ref_dh, _ = reference(hidden, weight, targets, old, adv, 1.0, False)
    calls = []
    with torch.no_grad():
        out = head_loss(hidden.clone().requires_grad_(), weight, targets, chunk_loss_of(old, adv, calls),
                                 seq_tokens=SEQ_TOKENS, chunk_elements=chunk_elements)
    assert not out.loss.requires_grad and not any(c[4] for c in calls)
    assert any(out.recomputed) == (chunk_elements == 8 * V)
    torch.testing.assert_close(out.loss.double(), ref_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.logprobs.double(), ref_lp, rtol=0.0, atol=2e-5)
    h = hidden.clone().requires_grad_()  # only hidden needs grad: no d W is formed
    out = head_loss(h, weight, targets, chunk_loss_of(old, adv), seq_tokens=SEQ_TOKENS,
                             chunk_elements=chunk_elements)
    (dh,) = torch.autograd.grad(out.loss, (h,))
    torch.testing.assert_close(dh.double(), ref_dh, rtol=1e-4, atol=1e-6)


def test_chunks_whose_loss_ignores_them_get_zero_gradients():
    hidden, weight, targets, old, adv = make_inputs(seed=6)
    h = hidden.clone().requires_grad_()
    real = chunk_loss_of(old, adv)

    def first_chunk_only(c):
        return real(c) if c.seq_start == 0 else c.logprobs.new_zeros(())

    out = head_loss(h, weight, targets, first_chunk_only, seq_tokens=SEQ_TOKENS, chunk_elements=20 * V)
    (dh,) = torch.autograd.grad(out.loss, (h,))
    assert dh[:19].abs().max() > 0 and not dh[19:].any()  # chunk 0 holds sequences 0-1 (19 tokens)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(seq_tokens=[T - 1]), r"seq_tokens: expected counts summing to the 37 tokens of targets, got 1 "
                               r"sequences of 36 tokens"),
    (dict(chunk_loss=lambda c: c.logprobs), r"chunk_loss: expected a scalar tensor, got"),
    (dict(weight=torch.zeros(V, H + 1)), r"weight: expected a \[V/tp, H=24\] tensor"),
    (dict(targets=torch.full((T,), V)), r"targets: expected token ids in \[0, 300\)"),
    (dict(chunk_elements=8 * V, whole_sequence_elements=4 * V),
     r"whole_sequence_elements: expected an int >= chunk_elements \(2400\) or None, got 1200"),
])
def test_bad_inputs_raise(kwargs, match):
    hidden, weight, targets, old, adv = make_inputs()
    args = dict(hidden=hidden, weight=weight, targets=targets, chunk_loss=chunk_loss_of(old, adv),
                seq_tokens=SEQ_TOKENS)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fused_lm_head_loss(args.pop("hidden"), args.pop("weight"), args.pop("targets"), args.pop("chunk_loss"), **args)


def _tp_worker(rank, world_size, hidden, weight, targets, old, adv):
    torch.set_num_threads(1)
    group = dist.group.WORLD
    shard = weight[rank * V // 2 : (rank + 1) * V // 2]
    h, w = hidden.clone().requires_grad_(), shard.clone().requires_grad_()
    out = head_loss(h, w, targets, chunk_loss_of(old, adv), seq_tokens=SEQ_TOKENS, tp_group=group,
                             temperature=0.8, compute_entropy=True, chunk_elements=10 * V // 2)
    dh, dw = torch.autograd.grad(out.loss, (h, w))
    dist.all_reduce(dh, group=group)  # what megatron's region functions do with each rank's partial d hidden
    fwd = fused_lm_head_chunked_logprobs(h, w, targets, seq_tokens=SEQ_TOKENS, tp_group=group, temperature=0.8,
                                         compute_entropy=True, chunk_elements=10 * V // 2,
                                         whole_sequence_elements=10 * V // 2)
    return out.loss, out.logprobs, out.entropy, dh, dw, out.recomputed, fwd.logprobs, fwd.entropy


@pytest.fixture(scope="module")
def tp2_results():
    hidden, weight, targets, old, adv = make_inputs(seed=7)
    return (hidden, weight, targets, old, adv), run_distributed(_tp_worker, 2, hidden, weight, targets, old, adv)


def test_tp2_matches_reference(tp2_results):
    (hidden, weight, targets, old, adv), results = tp2_results
    ref_loss, ref_lp, ref_ent, ref_dh, ref_dw = reference(hidden, weight, targets, old, adv, 0.8, True)
    for rank, (loss, lp, ent, dh, dw, recomputed, _, _) in enumerate(results):
        # 10 tokens per chunk on a V/2 shard: the 12-token sequence goes through the recomputing head's tiles
        # (its statistics' TP all-reduces made by both ranks for the same chunk)
        assert recomputed == (False, True, False, False, False)
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(lp.double(), ref_lp, rtol=0.0, atol=2e-5)
        torch.testing.assert_close(ent.double(), ref_ent, rtol=0.0, atol=2e-5)
        torch.testing.assert_close(dh.double(), ref_dh, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(dw.double(), ref_dw[rank * V // 2 : (rank + 1) * V // 2], rtol=1e-4, atol=1e-6)



def test_tp2_chunked_logprobs_are_the_single_pass_logprobs_bitwise(tp2_results):
    """Under gloo TP2 (the statistics' all-reduces, the 12-token sequence through the recomputing tiles) the
    forward-only pass gives each rank bitwise the single pass's log-probs and entropies."""
    for _, lp, ent, _, _, recomputed, fwd_lp, fwd_ent in tp2_results[1]:
        assert any(recomputed)
        assert torch.equal(fwd_lp, lp) and torch.equal(fwd_ent, ent)

class _Created(TorchDispatchMode):
    """Records (dtype, shape) of the tensors that ops create (outputs sharing no input's storage): what a call
    allocates, seen on CPU."""

    def __init__(self):
        super().__init__()
        self.tensors = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in pytree.tree_leaves((args, kwargs or {})) if isinstance(a, torch.Tensor)]
        ptrs = {a.untyped_storage().data_ptr() for a in inputs}
        for o in pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in ptrs:
                self.tensors.append((o.dtype, tuple(o.shape)))
        return out


def test_bf16_two_chunk_backward_scales_the_fp32_accumulator_in_place():
    """bf16, 2 chunks, no main_grad: d W accumulates in fp32; backward scales that accumulator in place and casts
    it, so no second [V, H] fp32 buffer exists beside it (the peak of backward), and d W is the scaled gradient."""
    hidden, weight, targets, old, adv = make_inputs(torch.bfloat16, seed=9)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = head_loss(h, w, targets, chunk_loss_of(old, adv), seq_tokens=SEQ_TOKENS, chunk_elements=20 * V)
    assert len(out.chunks) == 2
    created = _Created()
    with created:
        dh, dw = torch.autograd.grad(out.loss * 3.0, (h, w))
    assert (torch.float32, (V, H)) not in created.tensors, created.tensors
    ref_dw = reference(hidden.double(), weight.double(), targets, old, adv, 1.0, False, scale=3.0)[4]
    assert dw.dtype == torch.bfloat16
    rel = (dw.double() - ref_dw).norm() / ref_dw.norm()
    assert rel < 1e-2, rel


def test_default_holds_a_sequence_up_to_twice_a_chunk_whole():
    """The default whole_sequence_elements (2 x chunk_elements): with an 8-token budget, sequences of 12 and 9
    tokens keep the single pass in a chunk of their own and one of 20 tokens takes the recomputing tiles; no
    logits tensor beyond twice a chunk is created; values as the float64 reference."""
    seq_tokens = [7, 12, 0, 5, 9, 4, 20]
    t, elements = sum(seq_tokens), 8 * V
    hidden, weight, targets, old, adv = make_inputs(seed=11, seq_tokens=seq_tokens)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    created = _Created()
    with created:
        out = fused_lm_head_loss(h, w, targets, chunk_loss_of(old, adv, seq_tokens=seq_tokens),
                                 seq_tokens=seq_tokens, compute_entropy=True, chunk_elements=elements)
        dh, dw = torch.autograd.grad(out.loss, (h, w))
    tokens = [sum(seq_tokens[a:b]) for a, b in out.chunks]
    assert tokens[:2] == [7, 12] and [n for n, r in zip(tokens, out.recomputed, strict=True) if r] == [20]
    sizes = [math.prod(shape) for _, shape in created.tensors if shape not in ((V, H), (t, H))]
    assert 12 * V in sizes and max(sizes) <= 2 * elements  # the 12-token sequence's logits, held whole
    ref = reference(hidden, weight, targets, old, adv, 1.0, True, seq_tokens=seq_tokens)
    torch.testing.assert_close(out.logprobs.double(), ref[1], rtol=0.0, atol=2e-5)
    torch.testing.assert_close(dh.double(), ref[3], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dw.double(), ref[4], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_flat_in_the_sequence_length(dtype):
    """A sequence longer than the chunk budget (here 8 tokens) is never held as [C, V] logits: whatever its
    length (40 or 80 tokens), no tensor of more than chunk_elements elements is created in forward, backward
    or the no-grad pass, besides d W ([V, H]) and d hidden ([T, H]); the values still match float64."""
    elements = 8 * V
    for seq_tokens in ([3, 40, 2], [3, 80, 2]):
        t = sum(seq_tokens)
        hidden, weight, targets, old, adv = make_inputs(dtype, seed=t, seq_tokens=seq_tokens)
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        created = _Created()
        with created:
            out = head_loss(h, w, targets, chunk_loss_of(old, adv, seq_tokens=seq_tokens),
                                     seq_tokens=seq_tokens, temperature=0.8, compute_entropy=True,
                                     chunk_elements=elements)
            dh, dw = torch.autograd.grad(out.loss, (h, w))
            with torch.no_grad():
                head_loss(h, w, targets, chunk_loss_of(old, adv, seq_tokens=seq_tokens),
                                   seq_tokens=seq_tokens, compute_entropy=True, chunk_elements=elements)
        assert out.recomputed == (False, True, False)
        sizes = [math.prod(shape) for _, shape in created.tensors if shape not in ((V, H), (t, H))]
        assert max(sizes) <= elements, (seq_tokens, max(sizes))
        ref = reference(hidden.double(), weight.double(), targets, old, adv, 0.8, True, seq_tokens=seq_tokens)
        tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=0.0, atol=5e-2)  # bf16 logits
        torch.testing.assert_close(out.logprobs.double(), ref[1], **tol)
        torch.testing.assert_close(out.entropy.double(), ref[2], **tol)
        for got, want in ((dh, ref[3]), (dw, ref[4])):
            rel = (got.double() - want).norm() / want.norm()
            assert rel < (1e-5 if dtype == torch.float32 else 2e-2), rel  # bf16: the logits gradient rounded


def test_long_sequences_with_vocab_tiles_match_float64():
    """A vocabulary wider than the recomputing backward's narrowest vocab tile (4096 rows): an over-long
    sequence's backward tiles the vocab too, adding each tile's d W rows into the single pass's accumulator;
    temperature, entropy, and a short chunk beside the long ones."""
    v, seq_tokens = 4500, [6, 2, 9, 3]
    hidden, weight, targets, old, adv = make_inputs(seed=11, seq_tokens=seq_tokens, v=v)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    # budget 16384 // 4500 = 3 tokens; the recomputing backward: blocks of 4 tokens x 4096 + 404 vocab rows
    out = head_loss(h, w, targets, chunk_loss_of(old, adv, seq_tokens=seq_tokens), seq_tokens=seq_tokens,
                             temperature=0.7, compute_entropy=True, chunk_elements=4 * 4096)
    assert out.chunks == ((0, 1), (1, 2), (2, 3), (3, 4)) and out.recomputed == (True, False, True, False)
    dh, dw = torch.autograd.grad(out.loss * 2.0, (h, w))
    ref_loss, ref_lp, ref_ent, ref_dh, ref_dw = reference(hidden, weight, targets, old, adv, 0.7, True, scale=2.0,
                                                          seq_tokens=seq_tokens)
    torch.testing.assert_close(out.loss.double(), ref_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.logprobs.double(), ref_lp, rtol=0.0, atol=2e-5)
    torch.testing.assert_close(out.entropy.double(), ref_ent, rtol=0.0, atol=2e-5)
    torch.testing.assert_close(dh.double(), ref_dh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dw.double(), ref_dw, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- the forward-only pass (the old-log-prob pass)

# (seq_tokens, chunk_elements, whole_sequence_elements or None for the default, the plan's recomputed flags):
# 2 chunks of whole sequences; sequences of 12 and 9 tokens over an 8-token budget through the recomputing
# tiles; the default holding those whole and taking the 20-token one through the tiles; an 80-token sequence
# between short ones. In every case the recomputing head's tiles (chunk_elements / V tokens) cut sequences.
FORWARD_CASES = [
    (SEQ_TOKENS, 20 * V, 20 * V, (False, False)),
    (SEQ_TOKENS, 8 * V, 8 * V, (False, True, False, True, False)),
    ([7, 12, 0, 5, 9, 4, 20], 8 * V, None, (False, False, False, False, False, True)),
    ([3, 80, 2, 6], 8 * V, None, (False, True, False)),
]


@pytest.mark.parametrize(("seq_tokens", "elements", "whole", "recomputed"), FORWARD_CASES)
@pytest.mark.parametrize(("dtype", "temperature", "entropy"),
                         [(torch.float32, 0.7, True), (torch.bfloat16, 1.0, True), (torch.bfloat16, 0.9, False)])
def test_chunked_logprobs_are_the_single_pass_logprobs_bitwise(seq_tokens, elements, whole, recomputed, dtype,
                                                                temperature, entropy):
    hidden, weight, targets, old, adv = make_inputs(dtype, seed=len(seq_tokens) + elements % 97, seq_tokens=seq_tokens)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    kw = dict(seq_tokens=seq_tokens, temperature=temperature, compute_entropy=entropy, chunk_elements=elements,
              whole_sequence_elements=whole)
    train = fused_lm_head_loss(h, w, targets, chunk_loss_of(old, adv, seq_tokens=seq_tokens), **kw)
    assert train.recomputed == recomputed and train.loss.requires_grad  # the training pass, gradients formed
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fwd = fused_lm_head_chunked_logprobs(h, w, targets, **kw)  # grad mode on, inputs requiring grad
    assert not saved and not fwd.logprobs.requires_grad and fwd.logprobs.grad_fn is None  # nothing for backward
    assert fwd.logprobs.dtype == torch.float32 and fwd.logprobs.shape == targets.shape
    assert torch.equal(fwd.logprobs, train.logprobs)
    if entropy:
        assert not fwd.entropy.requires_grad and torch.equal(fwd.entropy, train.entropy)
    else:
        assert fwd.entropy is None and train.entropy is None
    with torch.no_grad():  # the evaluation pass of the single pass too
        evaluated = fused_lm_head_loss(hidden, weight, targets, chunk_loss_of(old, adv, seq_tokens=seq_tokens), **kw)
    assert torch.equal(fwd.logprobs, evaluated.logprobs)
    # the batch's shape is kept: [b, s] with the sequences in row-major order
    as_rows = fused_lm_head_chunked_logprobs(hidden.view(1, -1, H), weight, targets.view(1, -1), **kw)
    assert as_rows.logprobs.shape == (1, targets.numel()) and torch.equal(as_rows.logprobs.view(-1), fwd.logprobs)




def gemm_shapes(fn) -> list:
    rec = GemmShapes()
    with rec:
        fn()
    return rec.shapes


@pytest.mark.parametrize(("seq_tokens", "elements", "whole", "recomputed"), FORWARD_CASES)
def test_chunked_logprobs_run_the_single_pass_gemms(seq_tokens, elements, whole, recomputed):
    """The same GEMMs, in the same order and of the same row counts, as the single pass's forward (its no-grad
    evaluation: forward GEMMs only); the recomputing head's token tiles would run others (they cut sequences)."""
    hidden, weight, targets, old, adv = make_inputs(torch.bfloat16, seed=1, seq_tokens=seq_tokens)
    kw = dict(seq_tokens=seq_tokens, compute_entropy=True, chunk_elements=elements, whole_sequence_elements=whole)
    with torch.no_grad():
        single = gemm_shapes(lambda: fused_lm_head_loss(hidden, weight, targets,
                                                        chunk_loss_of(old, adv, seq_tokens=seq_tokens), **kw))
        recomputing = gemm_shapes(lambda: fused_lm_head_logprobs(hidden, weight, targets, compute_entropy=True,
                                                                 chunk_elements=elements))
    forward_only = gemm_shapes(lambda: fused_lm_head_chunked_logprobs(hidden, weight, targets, **kw))
    assert len(single) >= len(recomputed) and all(b == (H, V) for _, b in single)
    assert forward_only == single
    assert recomputing != single  # what the old-log-prob pass ran before: other row counts


# --------------------------------------------------------------------------------------- the default chunk plan


@pytest.mark.parametrize(("v_local", "seq_tokens", "chunks", "recomputed"), [
    # the bench's shapes (bench/README.md): Qwen3's vocabulary at TP = 1 and on a V/4 shard
    (151936, [2048] * 8, [(0, 2), (2, 4), (4, 6), (6, 8)], (False,) * 4),  # two sequences a chunk, not one
    (151936, [4096] * 8, [(i, i + 1) for i in range(8)], (False,) * 8),
    (37984, [2048] * 8, [(0, 8)], (False,)),  # the whole micro-batch in one chunk (2**29: two)
    (37984, [4096] * 8, [(0, 4), (4, 8)], (False, False)),
    # over the chunk: held whole up to 2**30 logits (7,067 tokens at TP = 1), beyond through the tiles
    (151936, [100, 7067, 100], [(0, 1), (1, 2), (2, 3)], (False, False, False)),
    (151936, [100, 7068, 100], [(0, 1), (1, 2), (2, 3)], (False, True, False)),
])
def test_default_chunk_is_the_single_pass_chunk_and_whole_sequences_stop_at_2_gib(v_local, seq_tokens, chunks,
                                                                                   recomputed):
    """The single pass's defaults: chunks of 2**29.25 logits (not the recomputing head's 2**29 tiles), a sequence
    over the chunk held whole up to twice the chunk but at most 2**30 logits. Expected plans counted by hand."""
    assert DEFAULT_SINGLE_PASS_CHUNK_ELEMENTS == int(2**29.25) > DEFAULT_CHUNK_ELEMENTS
    plan, rec = plan_head_chunks(seq_tokens, v_local)
    assert (plan, rec) == (chunks, recomputed)
    assert plan_head_chunks(seq_tokens, v_local, DEFAULT_SINGLE_PASS_CHUNK_ELEMENTS, 1 << 30) == (plan, rec)


def test_default_whole_sequence_elements():
    """Twice the chunk, capped at 2**30 logits, never below the chunk itself."""
    assert default_whole_sequence_elements(8 * V) == 16 * V
    assert default_whole_sequence_elements(1 << 29) == 1 << 30
    assert default_whole_sequence_elements(DEFAULT_SINGLE_PASS_CHUNK_ELEMENTS) == 1 << 30
    assert default_whole_sequence_elements(1 << 31) == 1 << 31
