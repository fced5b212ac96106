# Shape legend (used in comments and names below):
#   [T]        tokens: all leading dims of `targets` flattened, sequences contiguous (`seq_ends`)
#   [H]        hidden size
#   [V/tp]     this rank's vocab shard: rows of the output-layer weight W
#   [C, V/tp]  one chunk's logits: C tokens of whole sequences, every vocab row of the shard
"""The RL loss head in one pass: the output layer, log-probs, the policy loss *and its gradients*, chunk by
chunk, with three GEMMs per token instead of the recomputing head's four.

``fused_lm_head_logprobs`` (the recomputing head) cannot know d loss / d log-prob while it holds a chunk's
logits: the loss needs every token of a sequence (VESPO's log W sums the whole sequence), so its backward
recomputes each logits tile, a fourth GEMM (1.33x the three-GEMM floor before anything else;
bench/README.md). Here the loss is evaluated *inside* the head, one chunk of whole sequences at a time:

* per chunk of whole sequences (C tokens, at most ``chunk_elements / (V/tp)`` unless one sequence is longer):
  GEMM ``hidden[C] @ W.T -> [C, V/tp]``; the statistics kernel and the TP combine give log-probs (and
  entropies); the caller's ``chunk_loss`` runs on them (with autograd, on this chunk's sequences only) and
  ``torch.autograd.grad`` gives the per-token upstream gradients; the gradient kernel turns the tile in
  place into d loss / d logits; ``d hidden[C] = G @ W`` (one GEMM over the whole shard: nothing to
  accumulate) and ``dW += G.T @ hidden[C]`` (fp32 accumulator; the chunk's logits are then freed).
* a chunk over that budget is one sequence longer than ``chunk_elements / (V/tp)`` tokens (a chunk never splits
  a sequence). Up to ``whole_sequence_elements`` logits (default twice a chunk, at most 2**30) it is still held
  whole; beyond, it does not hold its logits: the recomputing head's functions give its log-probs from ``[C', V/tp]``
  tiles of at most ``chunk_elements`` (keeping only ``[C]`` statistics), ``chunk_loss`` runs on them as for
  any chunk, and the recomputing backward forms d hidden and adds d W into the same accumulator from
  recomputed tiles: one extra GEMM, for the over-long sequences only (``HeadLossOutput.recomputed``).
* backward only scales the stored gradients by the upstream gradient of the loss (1 in megatron's bf16
  schedules; a loss scale under fp16).

That is exact only for losses that are a *sum over sequences* given global normalisers (every loss of this
package with the global ``LossNormalizer``: the sum of the chunks' losses is the micro-batch's loss, and each
chunk's gradient is the full loss's gradient restricted to it). Collectives inside ``chunk_loss`` (the
context-parallel all-reduce of log W) must be made by every rank of their group for the same chunks:
``plan_sequence_chunks`` depends only on the per-sequence token counts, which are the same on every CP rank
(each holds an equal share of every sequence) and on every TP rank.

The forward-only pass (``fused_lm_head_chunked_logprobs``, RL's old-log-prob pass when the training pass is
this head): the same plan and the same per-chunk forward (`_forward_chunks`: the chunk GEMMs with the same row
counts, the statistics kernel, the recomputing tiles of an over-long sequence, the TP combine), without
``chunk_loss`` and storing nothing for backward. Its log-probs are bitwise those of the training pass for the
same hidden states and weights, so that pi / pi_old is exactly 1 at the first update on a rollout batch. The
recomputing head's forward gives the same values only up to rounding: its tiles of ``chunk_elements / (V/tp)``
tokens cut sequences elsewhere, and a GEMM of another row count may round differently on a GPU (cuBLAS picks
its kernel, and its reduction order, by shape).

Memory: one tile of ``chunk_elements`` logits (up to ``whole_sequence_elements`` for a sequence held whole; the
over-long sequences' tiles reuse the same buffer), the ``dW``
accumulator (``V/tp x H``, fp32 unless a single chunk without ``main_grad`` makes d W in one GEMM in the
weight's dtype; backward scales it in place and casts it), ``d hidden`` (the output's size) and, for an
over-long sequence, the recomputing backward's fp32 ``d hidden`` block when its vocab is tiled: flat in the
sequence length beyond the ``[T]`` / ``[T, H]`` tensors.

Weight gradient into ``main_grad``: megatron's DDP gives each parameter an fp32 ``main_grad`` and, with
``grad_added_to_main_grad``, lets a layer add its weight gradient there itself (its gradient-accumulation
fusion). The accumulator is then private only until backward, which adds ``scale * accumulator`` to
``main_grad`` and, as megatron's linear layers do, hands autograd a dummy gradient so that DDP's hooks still
fire (they skip the addition when ``grad_added_to_main_grad`` is set).

Under tensor parallelism ``hidden`` must be the full (TP-replicated) ``[T, H]``; the gradient returned for it
is this rank's partial sum over its vocab shard, reduced by megatron's region functions as for the
recomputing head. This module imports without megatron-core and takes its process group explicitly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from vespo_megatron.parallel import vocab_parallel as vp
from vespo_megatron.parallel.fused_lm_head import (
    _accumulate,
    _backward_tiles,
    _forward_stats,
    _grad_in_place,
)
from vespo_megatron.parallel.head_chunk_plan import (
    DEFAULT_SINGLE_PASS_CHUNK_ELEMENTS,
    default_whole_sequence_elements,
    plan_head_chunks,
    plan_sequence_chunks,
)
from vespo_megatron.parallel.vocab_parallel import TokenLogProbs

__all__ = ["ChunkLogProbs", "HeadLossOutput", "plan_sequence_chunks", "plan_head_chunks", "fused_lm_head_loss",
           "fused_lm_head_chunked_logprobs", "DEFAULT_SINGLE_PASS_CHUNK_ELEMENTS", "default_whole_sequence_elements"]


@dataclass(frozen=True)
class ChunkLogProbs:
    """What `chunk_loss` sees: tokens [start, end) = sequences [seq_start, seq_end) of the flattened input.
    `logprobs` / `entropy` are [C] fp32 leaves (requiring grad when the head computes gradients)."""

    seq_start: int
    seq_end: int
    start: int
    end: int
    logprobs: Tensor
    entropy: Tensor | None


@dataclass(frozen=True)
class HeadLossOutput:
    """loss: the sum of the chunks' losses (differentiable w.r.t. hidden and weight); logprobs / entropy:
    [T] fp32, detached, shaped like `targets`; chunks: the plan that ran, (seq_start, seq_end) per chunk;
    recomputed: per chunk, whether it was longer than the budget (one sequence of more than
    chunk_elements / (V/tp) tokens) and went through the recomputing head's tiles instead."""

    loss: Tensor
    logprobs: Tensor
    entropy: Tensor | None
    chunks: tuple[tuple[int, int], ...]
    recomputed: tuple[bool, ...] = ()


class _HeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, grads: dict):
        # The work is done by `_run` before apply (it needs autograd for the chunk losses, which forward
        # disables); forward only registers the stored gradients with the graph.
        ctx.grads = grads
        return grads.pop("loss").clone()

    @staticmethod
    def backward(ctx, g_out):
        grads, ctx.grads = ctx.grads, None
        scale = g_out.reshape(())
        d_hidden = grads.get("hidden")
        if d_hidden is not None:
            d_hidden.mul_(scale.to(d_hidden.dtype))
        weight, acc = grads["weight"], grads.get("weight_acc")
        d_weight = None
        if acc is not None:
            if grads["into_main_grad"]:
                # megatron's gradient-accumulation-fusion contract (LinearWithGradAccumulation...): add into
                # the fp32 main_grad here, mark it, and give autograd a dummy so that DDP's hook still runs.
                weight.main_grad.addcmul_(acc.to(weight.main_grad.dtype), scale.to(weight.main_grad.dtype))
                weight.grad_added_to_main_grad = True
                # (DDP's hook still adds a zero_out_wgrad parameter's .grad: that dummy must be zeros)
                zero = getattr(weight, "zero_out_wgrad", False)
                d_weight = torch.zeros_like(weight) if zero else torch.empty_like(weight)
            elif acc.dtype == weight.dtype:  # one chunk, or fp32 weights: the GEMM's own result, scaled in place
                d_weight = acc.mul_(scale.to(acc.dtype))
            else:
                # scaled in place, then cast: the peak is the fp32 accumulator plus the weight-dtype result, not
                # a second V/tp x H fp32 temporary (1.16 GiB at 151936 x 2048); the same values as acc * scale
                d_weight = acc.mul_(scale.to(acc.dtype)).to(weight.dtype)
        return d_hidden, d_weight, None


def _into_main_grad(weight: Tensor) -> bool:
    """Whether `weight` carries megatron DDP's fp32 main_grad and its grad_added_to_main_grad flag."""
    return hasattr(weight, "main_grad") and hasattr(weight, "grad_added_to_main_grad")


def fused_lm_head_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    chunk_loss: Callable[[ChunkLogProbs], Tensor],
    *,
    seq_tokens: Sequence[int],
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    compute_entropy: bool = False,
    chunk_elements: int | None = None,
    backend: str = "auto",
    into_main_grad: bool = True,
    whole_sequence_elements: int | None = None,
) -> HeadLossOutput:
    """The loss ``sum over chunks of chunk_loss(log-probs of the chunk)`` from the final hidden states and this
    rank's output-layer shard, with the gradients formed while each chunk's logits are alive.

    Args:
        hidden: ``[..., H]`` final hidden states (TP-replicated, as for ``fused_lm_head_logprobs``).
        weight: ``[V/tp, H]`` this rank's output-layer shard, hidden's dtype.
        targets: token ids shaped like ``hidden`` without its last dim, global ids in ``[0, V)``.
        chunk_loss: called once per chunk (in order) with a ``ChunkLogProbs``; returns that chunk's scalar
            loss. It must depend on the chunk's log-probs (and entropies) only through the sequences of the
            chunk: the head sums the chunks' losses and gradients.
        seq_tokens: host ints, the number of tokens of each sequence in the flattened order of ``targets``
            (sequences are contiguous there); they must sum to ``targets.numel()``.
        tp_group, temperature, compute_entropy, backend: as for ``fused_lm_head_logprobs``.
        chunk_elements: logits elements per chunk (sequences are never split: one longer than the budget goes
            through the recomputing head's tiles of this size, one more GEMM); None: 2**29.25
            (DEFAULT_SINGLE_PASS_CHUNK_ELEMENTS).
        into_main_grad: add d W into ``weight.main_grad`` when the weight carries megatron DDP's attributes
            (module docstring). Pass False for a weight with other uses in the graph (embeddings tied to the
            output layer): autograd would sum their gradient with the dummy, and DDP's hook would skip the sum.
        whole_sequence_elements: a sequence over the chunk budget whose logits have at most this many elements
            is still held whole, in a chunk of its own (three GEMMs); only longer ones take the recomputing
            tiles (four). None: 2 x chunk_elements capped at 2**30 (never below the chunk), so the logits
            held never exceed twice a chunk nor 2 GiB in bf16 while a sequence a little over the budget keeps
            the single pass. Set it to chunk_elements for a hard cap at one chunk.

    Gradients are formed only when grad mode is on and ``hidden`` or ``weight`` requires grad; otherwise the
    chunk losses run without autograd (an evaluation pass).
    """
    plan = _plan(hidden, weight, targets, seq_tokens, tp_group=tp_group, temperature=temperature,
                 compute_entropy=compute_entropy, chunk_elements=chunk_elements, backend=backend,
                 whole_sequence_elements=whole_sequence_elements)
    want_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    grads = _run(plan, weight.detach(), chunk_loss, want_grad, need_h=hidden.requires_grad,
                 need_w=weight.requires_grad,
                 fp32_weight_grad=((into_main_grad and _into_main_grad(weight)) or len(plan.chunks) > 1
                                   or any(plan.recompute)))
    logp, ent = grads.pop("logprobs"), grads.pop("entropy")
    if want_grad:
        grads["weight"], grads["into_main_grad"] = weight, into_main_grad and _into_main_grad(weight)
        loss = _HeadLoss.apply(plan.h2d, weight, grads)
    else:
        loss = grads.pop("loss")
    return HeadLossOutput(loss=loss, logprobs=logp.view(targets.shape),
                          entropy=None if ent is None else ent.view(targets.shape), chunks=plan.chunks,
                          recomputed=plan.recompute)


def fused_lm_head_chunked_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    seq_tokens: Sequence[int],
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    compute_entropy: bool = False,
    chunk_elements: int | None = None,
    backend: str = "auto",
    whole_sequence_elements: int | None = None,
) -> TokenLogProbs:
    """The single pass's log-probs (and entropies) without its loss: the forward-only pass (the old-log-prob
    pass) of a run that trains with ``fused_lm_head_loss``.

    It runs that function's own forward (`_forward_chunks`) on the same plan: the same chunks of whole sequences
    (`plan_head_chunks`), the same GEMM per chunk (same row counts), the same statistics kernel, the same
    recomputing tiles for an over-long sequence and the same TP combine. The values are therefore bitwise those
    that ``fused_lm_head_loss(...).logprobs`` / ``.entropy`` give for the same arguments, on any device: a GEMM
    of another row count (the recomputing head's token tiles cut sequences elsewhere) may round differently on
    a GPU, and pi / pi_old must be exactly 1 at the first update on a rollout batch.

    Arguments as for ``fused_lm_head_loss`` (no ``chunk_loss``, no ``into_main_grad``). Nothing is stored for
    backward: the inputs are detached and the work runs under ``torch.no_grad``; the outputs never require grad.

    Returns:
        TokenLogProbs (fp32, shaped like ``targets``; entropy None unless ``compute_entropy``).
    """
    plan = _plan(hidden, weight, targets, seq_tokens, tp_group=tp_group, temperature=temperature,
                 compute_entropy=compute_entropy, chunk_elements=chunk_elements, backend=backend,
                 whole_sequence_elements=whole_sequence_elements)
    logps, ents = [], []
    with torch.no_grad():
        for c in _forward_chunks(plan, weight.detach()):
            logps.append(c.logp)
            ents.append(c.ent)
        logp, ent = _cat_tokens(plan, logps, ents)
    return TokenLogProbs(logp.view(targets.shape), None if ent is None else ent.view(targets.shape))


@dataclass(frozen=True)
class _Plan:
    """What the single pass runs on, checked and flattened (`_plan`): the training pass (`_run`) and the
    forward-only pass (`fused_lm_head_chunked_logprobs`) both give it to `_forward_chunks`."""

    h2d: Tensor  # [T, H] the caller's hidden states, flattened (still attached to the caller's graph)
    local_tgt: Tensor  # [T] int64 ids local to this shard, -1 where the target lies in another rank's shard
    offsets: tuple[int, ...]  # [B + 1] each sequence's first token, then T
    chunks: tuple[tuple[int, int], ...]  # (seq_start, seq_end) per chunk (`plan_head_chunks`)
    recompute: tuple[bool, ...]  # per chunk: an over-long sequence, through the recomputing head's tiles
    tp_group: dist.ProcessGroup | None
    world: int
    temperature: float
    entropy: bool
    chunk_elements: int
    use_triton: bool


def _plan(hidden, weight, targets, seq_tokens, *, tp_group, temperature, compute_entropy, chunk_elements, backend,
          whole_sequence_elements) -> _Plan:
    """The arguments of the single pass (either of its entry points) checked, and its chunk plan."""
    if not isinstance(hidden, Tensor) or not hidden.is_floating_point() or hidden.dim() < 1:
        raise ValueError(f"hidden: expected a floating-point tensor [..., H], got {vp._describe(hidden)}")
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight: expected a [V/tp, H={hidden.shape[-1]}] tensor, got {vp._describe(weight)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight: expected dtype {hidden.dtype} (hidden's), got {weight.dtype}")
    seq_tokens = [int(n) for n in seq_tokens]
    if sum(seq_tokens) != targets.numel():
        raise ValueError(f"seq_tokens: expected counts summing to the {targets.numel()} tokens of targets, got "
                         f"{len(seq_tokens)} sequences of {sum(seq_tokens)} tokens")
    v_local = weight.shape[0]
    world, vocab_start, use_triton = vp.check_head_args(
        hidden, "hidden", targets, v_local, temperature=temperature, chunk_name="chunk_elements",
        chunk=chunk_elements, backend=backend, tp_group=tp_group)
    tgt = targets.reshape(-1).to(torch.int64) - vocab_start
    local_tgt = torch.where((tgt >= 0) & (tgt < v_local), tgt, torch.full_like(tgt, -1)).contiguous()
    elements = DEFAULT_SINGLE_PASS_CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    chunks, recompute = plan_head_chunks(seq_tokens, v_local, elements, whole_sequence_elements)
    offsets = [0]
    for n in seq_tokens:
        offsets.append(offsets[-1] + n)
    return _Plan(h2d=hidden.reshape(-1, hidden.shape[-1]), local_tgt=local_tgt, offsets=tuple(offsets),
                 chunks=tuple(chunks), recompute=recompute, tp_group=tp_group, world=world,
                 temperature=float(temperature), entropy=compute_entropy, chunk_elements=elements,
                 use_triton=use_triton)


@dataclass(frozen=True)
class _ChunkForward:
    """One chunk's forward (`_forward_chunks`): tokens [start, end) = sequences [seq_start, seq_end); lse, logp
    and ent (None without entropy) are its [C] fp32 statistics, TP-combined. z: its [C, V/tp] logits, a view of
    `buf` that the next chunk overwrites; None for an over-long sequence (`long`), whose logits were only ever
    the recomputing head's tiles (in `buf`, which its recomputing backward reuses)."""

    seq_start: int
    seq_end: int
    start: int
    end: int
    long: bool
    z: Tensor | None
    lse: Tensor
    logp: Tensor
    ent: Tensor | None
    buf: Tensor


def _forward_chunks(plan: _Plan, weight: Tensor) -> Iterator[_ChunkForward]:
    """The single pass's forward, one chunk at a time (the one implementation of both of its passes): per chunk
    of whole sequences the GEMM ``hidden[C] @ W.T -> [C, V/tp]`` into one shared buffer, the statistics kernel and
    the TP combine; an over-long sequence through the recomputing head's `_forward_stats` tiles instead. `weight`
    [V/tp, H] must be detached (as the hidden states are here): nothing is recorded for autograd."""
    h2d = plan.h2d.detach()
    v_local = weight.shape[0]
    max_rows = max((plan.offsets[b] - plan.offsets[a] for (a, b), r in zip(plan.chunks, plan.recompute, strict=True)
                    if not r), default=0)
    # one [C, V/tp] tile; the recomputing head's tiles (at most chunk_elements each) reuse it
    buf = torch.empty(max(max_rows * v_local, plan.chunk_elements if any(plan.recompute) else 0), dtype=h2d.dtype,
                      device=h2d.device)
    for (seq_start, seq_end), long in zip(plan.chunks, plan.recompute, strict=True):
        s, e = plan.offsets[seq_start], plan.offsets[seq_end]
        tgt = plan.local_tgt[s:e]
        if long:  # one sequence over the budget: its logits are never whole, only tiles of the recomputing head
            z = None
            lse, logp, ent = _forward_stats(h2d[s:e], weight, tgt, plan.tp_group, plan.world, plan.temperature,
                                            plan.entropy, plan.chunk_elements, plan.use_triton, buf=buf)
        else:
            z = buf[: (e - s) * v_local].view(e - s, v_local)
            torch.mm(h2d[s:e], weight.t(), out=z)
            stats = vp._local_stats(z, tgt, plan.temperature, plan.entropy, plan.use_triton,
                                    vp._chunk_tokens(None, v_local))
            lse, logp, ent = vp._combine(*stats, plan.tp_group, plan.world)
        yield _ChunkForward(seq_start, seq_end, s, e, long, z, lse, logp, ent, buf)


def _cat_tokens(plan: _Plan, logps: list[Tensor], ents: list[Tensor | None]) -> tuple[Tensor, Tensor | None]:
    """The chunks' [C] log-probs (and entropies) as [T] fp32 tensors, in token order."""
    empty = plan.h2d.new_zeros(0, dtype=torch.float32)
    logp = torch.cat(logps) if logps else empty
    return logp, ((torch.cat(ents) if ents else empty) if plan.entropy else None)


def _chunk_loss_grads(chunk_loss, chunk: ChunkLogProbs, want_grad: bool):
    """(loss, d loss / d logprobs, d loss / d entropy) of one chunk; the gradients are None when not formed or
    when the loss does not depend on them."""
    with torch.enable_grad() if want_grad else torch.no_grad():
        loss = chunk_loss(chunk)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"chunk_loss: expected a scalar tensor, got {vp._describe(loss)}")
        g_lp = g_h = None
        if want_grad and loss.requires_grad:
            leaves = [chunk.logprobs] if chunk.entropy is None else [chunk.logprobs, chunk.entropy]
            got = torch.autograd.grad(loss, leaves, allow_unused=True)
            g_lp, g_h = got[0], (got[1] if len(got) > 1 else None)
    return loss.detach().reshape(()), g_lp, g_h


def _run(plan: _Plan, weight: Tensor, chunk_loss, want_grad: bool, *, need_h: bool, need_w: bool,
         fp32_weight_grad: bool) -> dict:
    """`_forward_chunks`, and per chunk its loss and (with `want_grad`) its gradients while its logits are alive.
    `weight` [V/tp, H] detached."""
    h2d = plan.h2d.detach()
    t, h = h2d.shape
    v_local = weight.shape[0]
    # dW: one chunk without main_grad is a single GEMM in the weight's dtype (as the logits path); otherwise
    # the chunks' products accumulate in fp32 (no rounding to bf16 in between).
    low = h2d.dtype in (torch.bfloat16, torch.float16)
    acc_dtype = torch.float32 if low and fp32_weight_grad else h2d.dtype
    d_hidden = torch.empty_like(h2d) if want_grad and need_h else None
    dw_acc = torch.zeros(v_local, h, dtype=acc_dtype, device=weight.device) if want_grad and need_w else None
    logps, ents, losses = [], [], []
    for c in _forward_chunks(plan, weight):
        s, e = c.start, c.end
        logps.append(c.logp)
        ents.append(c.ent)
        chunk = ChunkLogProbs(c.seq_start, c.seq_end, s, e, c.logp.detach().requires_grad_(want_grad),
                              None if c.ent is None else c.ent.detach().requires_grad_(want_grad))
        loss, g_lp, g_h = _chunk_loss_grads(chunk_loss, chunk, want_grad)
        losses.append(loss)
        if not want_grad:
            continue
        if g_lp is None and g_h is None:  # the chunk's loss does not depend on it: zero gradients
            if d_hidden is not None:
                d_hidden[s:e].zero_()
            continue
        g_lp = torch.zeros_like(c.lse) if g_lp is None else g_lp.float().contiguous()
        g_h = None if g_h is None else g_h.float().contiguous()
        tgt = plan.local_tgt[s:e]
        if c.long:  # the fourth GEMM, for this sequence only: d hidden rows written, d W added into the accumulator
            _backward_tiles(h2d[s:e], weight, tgt, c.lse, c.ent, g_lp, g_h, plan.temperature, plan.chunk_elements,
                            plan.use_triton, need_h=d_hidden is not None, need_w=dw_acc is not None, dw_acc=dw_acc,
                            d_hidden=None if d_hidden is None else d_hidden[s:e], buf=c.buf)
            continue
        z = c.z
        _grad_in_place(z, tgt, c.lse, c.ent, g_lp, g_h, plan.temperature, plan.use_triton)  # z: d loss / d logits
        if d_hidden is not None:
            torch.mm(z, weight, out=d_hidden[s:e])  # every vocab row in one GEMM: no accumulation
        if dw_acc is not None:
            if len(plan.chunks) == 1 and dw_acc.dtype == z.dtype:
                torch.mm(z.t(), h2d[s:e], out=dw_acc)  # all tokens in one GEMM, exactly as the logits path
            else:
                _accumulate(dw_acc, z.t(), h2d[s:e])
    c = z = chunk = None  # the last chunk's views: the buffer is freed here
    total = torch.stack(losses).sum() if losses else h2d.new_zeros((), dtype=torch.float32)
    logp, ent = _cat_tokens(plan, logps, ents)
    return {"loss": total, "logprobs": logp, "entropy": ent, "hidden": d_hidden, "weight_acc": dw_acc}
