# Shape legend (used in comments and names below):
#   [T]        tokens: all leading dims of `targets` flattened
#   [H]        hidden size
#   [V/tp]     this rank's vocab shard: rows of the output-layer weight W, global ids [rank * V/tp, (rank+1) * V/tp)
#   [C, V/tp]  forward tile of logits: C tokens, every vocab row of the shard (C * V/tp <= chunk_elements)
#   [Tb, Cv]   backward tile of logits, turned in place into its gradient: Tb tokens x Cv vocab rows
#              (Tb * Cv <= chunk_elements)
"""The RL loss head fused with the output layer: per-token log-probs (and entropy) straight from the final
hidden states and this rank's output-layer weight shard, without ever holding the ``[T, V/tp]`` logits.

``fused_lm_head_logprobs(hidden [T, H], weight [V/tp, H], targets [T])`` computes the same values as
``vocab_parallel_logprobs(hidden @ weight.T, targets)`` and the same gradients for ``hidden`` and
``weight``, but keeps at most one tile of ``chunk_elements`` logits alive:

* forward, per token chunk of C tokens: one GEMM ``hidden[C] @ W.T -> [C, V/tp]`` in the weight's dtype,
  then the per-token statistics kernel of ``vocab_parallel`` (max, sum-exp, entropy sum, target logit).
  Only the ``[T]`` statistics are kept; across TP they are combined with the same two small all-reduces.
  Saved for backward: ``hidden`` and ``W`` (already alive: they are the inputs) and ``[T]`` lse / entropy.
* backward, per tile ``[Tb, Cv]``: recompute the logits tile (one GEMM), turn it *in place* into
  d(loss)/d(logits) with the per-token upstream gradients (the ``vocab_parallel`` gradient kernel), then
  ``dW[Cv] = G.T @ hidden[Tb]`` and ``d hidden[Tb] += G @ W[Cv]``.

Why the backward tiles the vocab, not the tokens: a token-chunked backward must accumulate ``dW``
(``V/tp x H``, 0.6 GiB bf16 for Qwen3's 151936 x 2048) over the chunks. Doing that in bf16 rounds once per
chunk (not the logits path's single rounding); doing it in fp32 costs a 1.2 GiB buffer plus 2.5 GB of
traffic per chunk. Tiling the vocab instead makes each ``dW`` row block one GEMM over *all* Tb tokens
(written once, exactly like the logits path), and what accumulates is ``d hidden`` (``Tb x H``, 4x smaller
than dW at 32k tokens), in fp32. Up to ``chunk_elements / min_vocab_tile`` tokens there is a single token
block; beyond it the token blocks accumulate ``dW`` in fp32 (the memory then stays flat in T).

Under tensor parallelism ``hidden`` must be the full (TP-replicated) ``[T, H]``; the returned gradient of
``hidden`` is this rank's partial sum over its vocab shard. As with megatron's ``ColumnParallelLinear``, the
caller reduces it over TP: ``copy_to_tensor_model_parallel_region`` (all-reduce in backward) or, with
sequence parallelism, ``gather_from_sequence_parallel_region`` (reduce-scatter in backward) applied to the
hidden states before this function. This module imports without megatron-core and takes its process group
explicitly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from vespo_megatron.parallel import vocab_parallel as vp
from vespo_megatron.parallel.vocab_parallel import TokenLogProbs

__all__ = ["fused_lm_head_logprobs", "DEFAULT_CHUNK_ELEMENTS"]

# One tile of logits: 2**29 elements = 1 GiB in bf16 (C = 3533 tokens of Qwen3's full 151936 vocab).
DEFAULT_CHUNK_ELEMENTS = 1 << 29
# Backward vocab tiles never get narrower than this (GEMM efficiency); more tokens -> several token blocks.
_MIN_VOCAB_TILE = 4096
_ROW_ALIGN = 128  # tile edges on multiples of 128 rows where possible (GEMM tiles)

# How `_accumulate` adds a low-precision product into an fp32 accumulator on this build (for the bench).
ACCUMULATE_PATH: dict[str, str] = {}


def _rows(total: int, budget: int, other: int) -> int:
    """Rows of a tile with `other` columns under `budget` elements: at least 1, aligned when large."""
    n = max(1, budget // max(other, 1))
    if n >= total:
        return total
    return (n // _ROW_ALIGN) * _ROW_ALIGN if n >= _ROW_ALIGN else n


def _accumulate(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b, with acc in fp32 (or a's dtype when that is already fp32/fp64) and no rounding of the
    product to a's dtype first."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
        return
    if a.is_cuda:
        # cuBLAS bf16 x bf16 -> fp32 with beta = 1 (torch >= 2.8: the out_dtype overload), else an fp32 product.
        path = ACCUMULATE_PATH.get("cuda")
        if path in (None, "addmm_out_dtype"):
            try:
                torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
                ACCUMULATE_PATH["cuda"] = "addmm_out_dtype"
                return
            except (TypeError, RuntimeError, NotImplementedError):
                ACCUMULATE_PATH["cuda"] = "mm_out_dtype"
        if ACCUMULATE_PATH["cuda"] == "mm_out_dtype":
            try:
                acc.add_(torch.mm(a, b, out_dtype=acc.dtype))
                return
            except (TypeError, RuntimeError, NotImplementedError):
                ACCUMULATE_PATH["cuda"] = "upcast"
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _grad_in_place(z: Tensor, tgt: Tensor, lse, ent, g_lp, g_h, temperature: float, use_triton: bool) -> None:
    if use_triton:
        vp._grad_triton(z, tgt, lse, ent, g_lp, g_h, temperature, out=z)
    else:
        vp._grad_torch(z, tgt, lse, ent, g_lp, g_h, temperature, vp._chunk_tokens(None, z.shape[1]), out=z)


def _tile_buffer(buf: Tensor | None, n: int, like: Tensor) -> Tensor:
    """A flat buffer of `n` elements in `like`'s dtype: the front of the caller's `buf` when it is large enough
    (the single pass lends its own chunk buffer, so that one tile is alive, not two), else a new one."""
    if buf is not None and buf.numel() >= n and buf.dtype == like.dtype:
        return buf[:n]
    return torch.empty(n, dtype=like.dtype, device=like.device)


def _forward_stats(hidden, weight, local_tgt, tp_group, world, temperature, entropy, chunk_elements, use_triton,
                   buf: Tensor | None = None):
    """(lse, logp, ent) [T] fp32 of `hidden` [T, H] against this rank's shard, one [C, V/tp] tile alive at a time
    (ent None unless `entropy`); TP-combined with `vocab_parallel`'s two all-reduces. `local_tgt`: ids local to
    the shard, -1 where the target lies in another rank's shard. `buf`: an optional flat buffer to use."""
    t = hidden.shape[0]
    v_local = weight.shape[0]
    c = _rows(t, chunk_elements, v_local)
    buf = _tile_buffer(buf, c * v_local, hidden)  # one [C, V/tp] tile
    parts: list[list[Tensor]] = [[], [], [], []]  # m_l, s_l, a_l, tgt_l per chunk, each [C]
    for s in range(0, t, c):
        e = min(s + c, t)
        z = buf[: (e - s) * v_local].view(e - s, v_local)
        torch.mm(hidden[s:e], weight.t(), out=z)
        stats = vp._local_stats(z, local_tgt[s:e], temperature, entropy, use_triton, vp._chunk_tokens(None, v_local))
        for lst, x in zip(parts, stats, strict=True):
            lst.append(x)
    del buf
    m_l, s_l, tgt_l = (torch.cat(parts[i]) if t else hidden.new_zeros(0, dtype=torch.float32) for i in (0, 1, 3))
    a_l = (torch.cat(parts[2]) if t else torch.zeros_like(m_l)) if entropy else None
    return vp._combine(m_l, s_l, a_l, tgt_l, tp_group, world)


def _backward_tiles(hidden, weight, local_tgt, lse, ent, g_lp, g_h, temperature, chunk_elements, use_triton, *,
                   need_h: bool, need_w: bool, dw_acc: Tensor | None = None, d_hidden: Tensor | None = None,
                   buf: Tensor | None = None):
    """(d hidden, d W) for the upstream gradients g_lp / g_h ([T] fp32; g_h None without entropy) of the
    log-probs / entropies that `_forward_stats` gave: per [Tb, Cv] tile, recompute the logits (one GEMM), turn
    them in place into d loss / d logits, then ``d W[Cv] = G.T @ hidden[Tb]`` and ``d hidden[Tb] += G @ W[Cv]``.

    `dw_acc` (optional, [V/tp, H]): d W is *added* into it (fp32 products when it is fp32, `_accumulate`) and
    the returned d W is None; else d W is a new tensor in the weight's dtype. `d_hidden` (optional, [T, H] in
    hidden's dtype): written in place instead of a new tensor. `buf`: an optional flat buffer for the tiles."""
    t, h = hidden.shape
    v_local = weight.shape[0]
    # fp32 accumulators for bf16/fp16 (the logits path's GEMMs accumulate in fp32 too)
    acc_dtype = torch.float32 if hidden.dtype in (torch.bfloat16, torch.float16) else hidden.dtype
    tb = _rows(t, chunk_elements, min(v_local, _MIN_VOCAB_TILE))  # tokens per block
    if need_h and d_hidden is None:
        d_hidden = torch.empty_like(hidden)
    d_weight, caller_acc = None, dw_acc is not None
    if need_w and not caller_acc:
        if tb < t:  # several token blocks: accumulate in fp32, round once at the end
            dw_acc = torch.zeros(v_local, h, dtype=acc_dtype, device=weight.device)
        else:
            d_weight = torch.empty_like(weight)
    for ts in range(0, t, tb):
        te = min(ts + tb, t)
        rows = te - ts
        hb = hidden[ts:te]
        cv = _rows(v_local, chunk_elements, rows)  # vocab rows per tile
        if ts == 0:  # the first token block is the largest
            buf = _tile_buffer(buf, rows * cv, hidden)
        one_tile = cv >= v_local
        dh_acc = None
        if need_h and not (one_tile and acc_dtype == hidden.dtype):
            dh_acc = torch.zeros(rows, h, dtype=acc_dtype, device=hidden.device)
        tgt_b = local_tgt[ts:te]
        for vs in range(0, v_local, cv):
            ve = min(vs + cv, v_local)
            wv = weight[vs:ve]
            z = buf[: rows * (ve - vs)].view(rows, ve - vs)
            torch.mm(hb, wv.t(), out=z)  # recompute the logits tile [Tb, Cv]
            shifted = tgt_b - vs
            tgt_tile = torch.where((shifted >= 0) & (shifted < ve - vs), shifted, torch.full_like(shifted, -1))
            _grad_in_place(
                z, tgt_tile.contiguous(), lse[ts:te], None if ent is None else ent[ts:te], g_lp[ts:te],
                None if g_h is None else g_h[ts:te], temperature, use_triton,
            )  # z is now d loss / d logits of the tile, in the weight's dtype
            if need_w:
                if d_weight is None:
                    _accumulate(dw_acc[vs:ve], z.t(), hb)
                else:
                    torch.mm(z.t(), hb, out=d_weight[vs:ve])  # all Tb tokens in one GEMM: no accumulation
            if need_h:
                if dh_acc is None:
                    torch.mm(z, wv, out=d_hidden[ts:te])
                else:
                    _accumulate(dh_acc, z, wv)
        if dh_acc is not None:
            d_hidden[ts:te].copy_(dh_acc)
    if need_w and not caller_acc and d_weight is None:
        d_weight = dw_acc.to(weight.dtype)
    return d_hidden, d_weight


class _FusedLMHeadLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, local_tgt, tp_group, world, temperature, entropy, chunk_elements, use_triton):
        lse, logp, ent = _forward_stats(hidden, weight, local_tgt, tp_group, world, temperature, entropy,
                                       chunk_elements, use_triton)
        ctx.save_for_backward(hidden, weight, local_tgt, lse, ent)
        ctx.cfg = (temperature, chunk_elements, use_triton)
        ctx.set_materialize_grads(False)
        if entropy:
            return logp, ent
        return logp

    @staticmethod
    def backward(ctx, g_lp, g_h=None):
        hidden, weight, local_tgt, lse, ent = ctx.saved_tensors
        temperature, chunk_elements, use_triton = ctx.cfg
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        none = (None,) * 7
        if (g_lp is None and g_h is None) or not (need_h or need_w):
            return None, None, *none
        g_lp = g_lp.float().contiguous() if g_lp is not None else torch.zeros_like(lse)
        g_h = g_h.float().contiguous() if g_h is not None and ent is not None else None
        d_hidden, d_weight = _backward_tiles(hidden, weight, local_tgt, lse, ent, g_lp, g_h, temperature,
                                            chunk_elements, use_triton, need_h=need_h, need_w=need_w)
        return d_hidden, d_weight, *none


def fused_lm_head_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    compute_entropy: bool = False,
    chunk_elements: int | None = None,
    backend: str = "auto",
) -> TokenLogProbs:
    """log softmax(hidden @ weight.T / temperature)[target] (and the entropy), never materialising the logits.

    Args:
        hidden: ``[..., H]`` final hidden states, the same on every rank of ``tp_group`` (gather them first
            under sequence parallelism); any float dtype, the same as ``weight``'s.
        weight: ``[V/tp, H]`` this rank's output-layer shard (rank r holds ids ``[r * V/tp, (r + 1) * V/tp)``).
        targets: integer token ids with the leading shape of ``hidden``, global ids in ``[0, V)``.
        tp_group: the group the vocab is split over; None or size 1 means no communication.
        temperature: > 0; logits are divided by it before the softmax.
        compute_entropy: also return the (differentiable) entropy of the tempered distribution.
        chunk_elements: logits elements per tile (forward and backward); None: 2**29 (1 GiB in bf16).
        backend: "torch", "triton" or "auto" for the per-token kernels, as in ``vocab_parallel_logprobs``.

    Returns:
        TokenLogProbs (fp32, shaped like ``targets``). Gradients flow to ``hidden`` (this rank's partial sum
        over its vocab shard: reduce it over TP, as megatron's region functions do) and to ``weight``.
    """
    if not isinstance(hidden, Tensor) or not hidden.is_floating_point() or hidden.dim() < 1:
        raise ValueError(f"hidden: expected a floating-point tensor [..., H], got {vp._describe(hidden)}")
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight: expected a [V/tp, H={hidden.shape[-1]}] tensor, got {vp._describe(weight)}"
        )
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight: expected dtype {hidden.dtype} (hidden's), got {weight.dtype}")
    if weight.shape[0] < 1:
        raise ValueError(f"weight: expected at least one vocab row, got shape {tuple(weight.shape)}")
    v_local = weight.shape[0]
    world, vocab_start, use_triton = vp.check_head_args(
        hidden, "hidden", targets, v_local, temperature=temperature, chunk_name="chunk_elements",
        chunk=chunk_elements, backend=backend, tp_group=tp_group)

    h2d = hidden.reshape(-1, hidden.shape[-1])  # [T, H]
    if h2d.stride(-1) != 1:
        h2d = h2d.contiguous()
    tgt = targets.reshape(-1).to(torch.int64) - vocab_start
    local_tgt = torch.where((tgt >= 0) & (tgt < v_local), tgt, torch.full_like(tgt, -1)).contiguous()
    chunk = DEFAULT_CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    out = _FusedLMHeadLogProbs.apply(
        h2d, weight, local_tgt, tp_group, world, float(temperature), compute_entropy, chunk, use_triton
    )
    if compute_entropy:
        logp, ent = out
        return TokenLogProbs(logp.view(targets.shape), ent.view(targets.shape))
    return TokenLogProbs(out.view(targets.shape), None)
