# Shape legend (used in comments and names below):
#   [T]       tokens: all leading dims of `targets` (e.g. [S, B]) flattened
#   [V/tp]    this rank's vocab shard, V_local columns; its global ids are [vocab_start, vocab_start + V/tp)
#   [V]       global (padded) vocab, V = tp * V/tp
#   [C]       tokens in one chunk (chunk_size)
#   [C, V/tp] one chunk of logits, upcast to fp32 (the only fp32 logits-sized buffers ever alive)
#   [k, T]    k per-token statistics packed into one all-reduce
"""Per-token log-probabilities and entropies from vocab-parallel (tensor-parallel) logits.

Megatron's output layer under tensor parallelism leaves each TP rank with logits ``[..., V/tp]`` for the
vocab range ``[rank_in_group * V/tp, (rank_in_group + 1) * V/tp)``. :func:`vocab_parallel_logprobs` returns
``log p(target)`` and optionally the entropy ``H = -sum_v p_v log p_v`` of ``softmax(logits / temperature)``
over the *global* vocab, in fp32, without ever materialising an fp32 copy of the logits: the forward pass
upcasts ``chunk_size`` tokens at a time, and the backward pass recomputes the softmax chunk-wise from the
saved logits and the per-token log-sum-exp.

Communication (forward only; backward needs none), per call, over ``tp_group`` of size tp > 1:

* one all-reduce(MAX) of the per-token max: ``4 * T`` bytes (fp32 ``[T]``),
* one all-reduce(SUM) of the packed per-token statistics ``[k, T]`` fp32: sum-exp, target logit (only the
  owning rank contributes a non-zero) and, with ``compute_entropy``, sum of ``exp(z - max) * (z - max)``:
  ``8 * T`` bytes without entropy, ``12 * T`` bytes with it.

(A ring all-reduce moves about ``2 * (tp - 1) / tp`` times those payloads per rank.) With ``tp_group``
``None`` or of size 1 nothing is communicated.

The module deliberately never reads megatron's global ``parallel_state`` and imports without megatron-core;
Triton is optional (a fused CUDA path used by ``backend="auto"`` on CUDA tensors when it is installed).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from vespo_megatron.base.host_checks import host_checked

try:  # optional fused CUDA kernels
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    _HAS_TRITON = False

__all__ = ["TokenLogProbs", "vocab_parallel_logprobs"]

# Default chunk: about this many logits elements per fp32 buffer (128 MiB), i.e. C = this // V_local tokens.
_DEFAULT_CHUNK_ELEMENTS = 1 << 25


@dataclass(frozen=True)
class TokenLogProbs:
    """fp32 outputs with the leading shape of ``targets``; ``entropy`` is None unless it was requested."""

    logprobs: Tensor
    entropy: Tensor | None


# --------------------------------------------------------------------------------------------------------
# Per-shard statistics and gradients: torch chunked reference path
# --------------------------------------------------------------------------------------------------------


def _chunk_tokens(chunk_size: int | None, v_local: int) -> int:
    if chunk_size is None:
        return max(1, _DEFAULT_CHUNK_ELEMENTS // max(v_local, 1))
    return chunk_size


def _local_stats_torch(z2d: Tensor, local_tgt: Tensor, temperature: float, entropy: bool, chunk: int):
    """Shard statistics of z = logits / temperature, each [T] fp32: local max m_l, sum exp(z - m_l),
    sum exp(z - m_l) * (z - m_l) (entropy only, else None) and the target's z (0 where not in this shard)."""
    t, v_local = z2d.shape
    dev = z2d.device
    m_l = torch.empty(t, dtype=torch.float32, device=dev)
    s_l = torch.empty(t, dtype=torch.float32, device=dev)
    a_l = torch.empty(t, dtype=torch.float32, device=dev) if entropy else None
    tgt_l = torch.empty(t, dtype=torch.float32, device=dev)
    c_max = min(chunk, t)
    buf = torch.empty(c_max, v_local, dtype=torch.float32, device=dev)  # [C, V/tp]
    ebuf = torch.empty_like(buf) if entropy else None
    for s in range(0, t, chunk):
        e = min(s + chunk, t)
        zc = buf[: e - s]
        zc.copy_(z2d[s:e])  # upcast one chunk; never writes to the input
        if temperature != 1.0:
            zc.div_(temperature)
        idx = local_tgt[s:e]
        owned = idx >= 0
        tz = zc.gather(1, idx.clamp(min=0).unsqueeze(1)).squeeze(1)
        tgt_l[s:e] = torch.where(owned, tz, torch.zeros_like(tz))
        mc = zc.amax(dim=1)
        m_l[s:e] = mc
        zc.sub_(mc.unsqueeze(1))  # z - m_l
        if entropy:
            ec = ebuf[: e - s]
            torch.exp(zc, out=ec)
            s_l[s:e] = ec.sum(dim=1)
            a_l[s:e] = zc.mul_(ec).sum(dim=1)
        else:
            s_l[s:e] = zc.exp_().sum(dim=1)
    return m_l, s_l, a_l, tgt_l


def _grad_torch(z2d, local_tgt, lse, ent, g_lp, g_h, temperature: float, chunk: int, out=None) -> Tensor:
    """d/d logits of sum_t (g_lp[t] * logp[t] + g_h[t] * H[t]) for this shard, in the logits' dtype.

    ``out``: where to write it (None: a new tensor); ``out=z2d`` is allowed (each chunk is read before it
    is overwritten), which the fused LM head uses to turn a recomputed logits tile into its gradient.

    With logp_v = z_v - lse and p_v = exp(logp_v):
    dlogp_t/dz_v = 1[v == y_t] - p_v, dH_t/dz_v = -p_v (logp_v + H_t), and dz/dlogits = 1 / temperature.
    """
    t, v_local = z2d.shape
    dev = z2d.device
    grad = torch.empty_like(z2d) if out is None else out  # [T, V/tp] in the logits' dtype
    inv_t = 1.0 / temperature
    glp = (g_lp * inv_t) if g_lp is not None else torch.zeros(t, dtype=torch.float32, device=dev)
    gh = (g_h * inv_t) if g_h is not None else None
    c_max = min(chunk, t)
    buf = torch.empty(c_max, v_local, dtype=torch.float32, device=dev)
    pbuf = torch.empty_like(buf) if gh is not None else None
    for s in range(0, t, chunk):
        e = min(s + chunk, t)
        zc = buf[: e - s]
        zc.copy_(z2d[s:e])
        if temperature != 1.0:
            zc.div_(temperature)
        zc.sub_(lse[s:e].unsqueeze(1))  # log p
        gl = glp[s:e].unsqueeze(1)
        if gh is not None:
            pc = pbuf[: e - s]
            torch.exp(zc, out=pc)
            # coefficient g_lp + g_h * (log p + H), then times -p
            zc.add_(ent[s:e].unsqueeze(1)).mul_(gh[s:e].unsqueeze(1)).add_(gl)
            out = pc.mul_(zc).neg_()
        else:
            out = zc.exp_().mul_(gl.neg())
        idx = local_tgt[s:e]
        owned = idx >= 0
        add = torch.where(owned, glp[s:e], torch.zeros_like(glp[s:e])).unsqueeze(1)
        out.scatter_add_(1, idx.clamp(min=0).unsqueeze(1), add)
        grad[s:e].copy_(out)  # downcast to the logits' dtype
    return grad


# --------------------------------------------------------------------------------------------------------
# Per-shard statistics and gradients: fused Triton path (CUDA)
# --------------------------------------------------------------------------------------------------------

if _HAS_TRITON:

    @triton.jit
    def _stats_kernel(
        z_ptr, stride_t, tgt_ptr, m_ptr, s_ptr, a_ptr, t_ptr, V_LOCAL, inv_temp,
        ENTROPY: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        base = z_ptr + row * stride_t
        cols = tl.arange(0, BLOCK)
        m = -1e30  # finite so that (m_old - m_new) * s_old stays 0 on the first tile
        s = 0.0
        a = 0.0
        for start in range(0, V_LOCAL, BLOCK):
            offs = start + cols
            mask = offs < V_LOCAL
            x = tl.load(base + offs, mask=mask, other=-float("inf")).to(tl.float32) * inv_temp
            m_new = tl.maximum(m, tl.max(x, axis=0))
            alpha = tl.exp(m - m_new)
            d = tl.where(mask, x - m_new, 0.0)
            ex = tl.where(mask, tl.exp(d), 0.0)
            if ENTROPY:
                a = alpha * (a + (m - m_new) * s) + tl.sum(ex * d, axis=0)
            s = alpha * s + tl.sum(ex, axis=0)
            m = m_new
        idx = tl.load(tgt_ptr + row)
        owned = idx >= 0
        tz = tl.load(base + tl.maximum(idx, 0), mask=owned, other=0.0).to(tl.float32) * inv_temp
        tl.store(m_ptr + row, m)
        tl.store(s_ptr + row, s)
        if ENTROPY:
            tl.store(a_ptr + row, a)
        tl.store(t_ptr + row, tl.where(owned, tz, 0.0))

    @triton.jit
    def _grad_kernel(
        z_ptr, g_ptr, stride_t, stride_gt, tgt_ptr, lse_ptr, ent_ptr, glp_ptr, gh_ptr, V_LOCAL, inv_temp,
        ENTROPY: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < V_LOCAL
        x = tl.load(z_ptr + row * stride_t + offs, mask=mask, other=0.0).to(tl.float32) * inv_temp
        logp = x - tl.load(lse_ptr + row)
        p = tl.exp(logp)
        glp = tl.load(glp_ptr + row) * inv_temp
        coef = glp
        if ENTROPY:
            gh = tl.load(gh_ptr + row) * inv_temp
            coef = glp + gh * (logp + tl.load(ent_ptr + row))
        g = -p * coef
        idx = tl.load(tgt_ptr + row)
        g = tl.where(offs == idx, g + glp, g)
        tl.store(g_ptr + row * stride_gt + offs, g.to(g_ptr.dtype.element_ty), mask=mask)


_STATS_BLOCK = 4096
_GRAD_BLOCK = 2048


def _local_stats_triton(z2d: Tensor, local_tgt: Tensor, temperature: float, entropy: bool):
    t, v_local = z2d.shape
    f32 = dict(dtype=torch.float32, device=z2d.device)
    m_l, s_l, tgt_l = torch.empty(t, **f32), torch.empty(t, **f32), torch.empty(t, **f32)
    a_l = torch.empty(t, **f32) if entropy else s_l  # dummy pointer when unused
    if t > 0:
        _stats_kernel[(t,)](
            z2d, z2d.stride(0), local_tgt, m_l, s_l, a_l, tgt_l, v_local, 1.0 / temperature,
            ENTROPY=entropy, BLOCK=min(_STATS_BLOCK, triton.next_power_of_2(v_local)), num_warps=8,
        )  # fmt: skip
    return m_l, s_l, (a_l if entropy else None), tgt_l


def _grad_triton(z2d, local_tgt, lse, ent, g_lp, g_h, temperature: float, out=None) -> Tensor:
    """As `_grad_torch`; ``out=z2d`` is allowed (every element is loaded before the same program stores it)."""
    t, v_local = z2d.shape
    grad = torch.empty_like(z2d) if out is None else out
    glp = g_lp.contiguous() if g_lp is not None else torch.zeros_like(lse)
    entropy = g_h is not None
    gh = g_h.contiguous() if entropy else glp
    block = min(_GRAD_BLOCK, triton.next_power_of_2(v_local))
    if t > 0:
        _grad_kernel[(t, triton.cdiv(v_local, block))](
            z2d, grad, z2d.stride(0), grad.stride(0), local_tgt, lse, ent if entropy else lse, glp, gh,
            v_local, 1.0 / temperature, ENTROPY=entropy, BLOCK=block, num_warps=8,
        )  # fmt: skip
    return grad


# --------------------------------------------------------------------------------------------------------
# Combining the shards and the autograd function
# --------------------------------------------------------------------------------------------------------


def _combine(m_l, s_l, a_l, tgt_l, tp_group, world: int):
    """Global lse, log p(target) and entropy from the per-shard statistics (the only communication)."""
    if world > 1:
        m = m_l.clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
        scale = torch.exp(m_l - m)
        rows = [s_l * scale, tgt_l]
        if a_l is not None:
            rows.append(scale * (a_l + (m_l - m) * s_l))
        packed = torch.stack(rows)  # [k, T]
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=tp_group)
        s, tgt = packed[0], packed[1]
        a = packed[2] if a_l is not None else None
    else:
        m, s, a, tgt = m_l, s_l, a_l, tgt_l
    log_s = torch.log(s)
    lse = m + log_s
    logp = tgt - lse
    ent = (log_s - a / s) if a is not None else None  # H = log S - sum e^(z-m) (z-m) / S
    return lse, logp, ent


def _local_stats(z2d: Tensor, local_tgt: Tensor, temperature: float, entropy: bool, use_triton: bool, chunk: int):
    """The shard statistics of `_local_stats_torch` from the Triton kernel or torch (`chunk` tokens at a time)."""
    if use_triton:
        return _local_stats_triton(z2d, local_tgt, temperature, entropy)
    return _local_stats_torch(z2d, local_tgt, temperature, entropy, chunk)


class _VocabParallelLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z2d, local_tgt, tp_group, world, temperature, entropy, chunk, use_triton):
        stats = _local_stats(z2d, local_tgt, temperature, entropy, use_triton, chunk)
        lse, logp, ent = _combine(*stats, tp_group, world)
        ctx.save_for_backward(z2d, local_tgt, lse, ent)
        ctx.cfg = (temperature, chunk, use_triton)
        ctx.set_materialize_grads(False)
        if entropy:
            return logp, ent
        return logp

    @staticmethod
    def backward(ctx, g_lp, g_h=None):
        z2d, local_tgt, lse, ent = ctx.saved_tensors
        temperature, chunk, use_triton = ctx.cfg
        if g_lp is None and g_h is None:
            return (None,) * 8
        g_lp = g_lp.float() if g_lp is not None else None
        g_h = g_h.float() if g_h is not None and ent is not None else None
        if use_triton:
            grad = _grad_triton(z2d, local_tgt, lse, ent, g_lp, g_h, temperature)
        else:
            grad = _grad_torch(z2d, local_tgt, lse, ent, g_lp, g_h, temperature, chunk)
        return (grad,) + (None,) * 7


def _triton_usable(logits: Tensor) -> bool:
    if not _HAS_TRITON:
        return False
    return logits.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def check_head_args(x: Tensor, x_name: str, targets: Tensor, v_local: int, *, temperature, chunk_name: str,
                    chunk, backend: str, tp_group) -> tuple[int, int, bool]:
    """The argument checks a log-prob head shares (the logits path and the fused LM head): `targets` are
    token ids shaped like `x` without its last dim and inside the global vocabulary; returns (TP world size,
    this rank's first vocab id, whether the Triton kernels run)."""
    if not isinstance(targets, Tensor) or targets.is_floating_point() or targets.is_complex():
        raise ValueError(f"targets: expected an integer tensor of token ids, got {_describe(targets)}")
    if tuple(targets.shape) != tuple(x.shape[:-1]):
        raise ValueError(
            f"targets: expected shape {tuple(x.shape[:-1])} (the leading shape of {x_name} "
            f"{tuple(x.shape)}), got {tuple(targets.shape)}"
        )
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature: expected a float > 0, got {temperature!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature: expected a finite float > 0, got {temperature!r}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"{chunk_name}: expected None or an int >= 1, got {chunk!r}")
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend: expected one of 'auto', 'torch', 'triton', got {backend!r}")
    world = dist.get_world_size(tp_group) if tp_group is not None else 1
    rank = dist.get_rank(tp_group) if world > 1 else 0
    vocab_start, v_global = rank * v_local, world * v_local
    if targets.numel() > 0:
        # (lo, hi) read on the host copy when the caller declared them (`checked_on_host`): no device sync
        lo, hi = host_checked("targets") or (int(targets.min()), int(targets.max()))
        if lo < 0 or hi >= v_global:
            raise ValueError(
                f"targets: expected token ids in [0, {v_global}) (V = tp {world} x V/tp {v_local}), "
                f"got ids in [{lo}, {hi}]"
            )
    use_triton = backend == "triton" or (backend == "auto" and x.is_cuda)
    if use_triton and not _triton_usable(x):
        if backend == "triton":
            raise ValueError(f"backend: 'triton' needs Triton installed and CUDA {x_name} (or TRITON_INTERPRET=1)")
        use_triton = False
    return world, vocab_start, use_triton


def vocab_parallel_logprobs(
    logits: Tensor,
    targets: Tensor,
    *,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    compute_entropy: bool = False,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> TokenLogProbs:
    """log softmax(logits / temperature)[target] (and the entropy) over the vocab sharded across ``tp_group``.

    Args:
        logits: ``[..., V/tp]`` this rank's shard (any float dtype; any leading shape, e.g. ``[S, B]``).
        targets: integer token ids with the leading shape of ``logits``, global ids in ``[0, V)``.
        tp_group: the tensor-parallel group the vocab is split over (rank r holds ids
            ``[r * V/tp, (r + 1) * V/tp)``); None or size 1 means no communication.
        temperature: > 0; logits are divided by it before the softmax, as the rollout engine does.
        compute_entropy: also return the entropy of the tempered distribution (differentiable too).
        chunk_size: tokens upcast to fp32 at a time by the torch path; None picks about 2**25 / (V/tp).
        backend: "torch" (chunked reference, the CPU default), "triton" (fused CUDA kernels) or "auto"
            (Triton for CUDA tensors when it is installed, else torch).

    Returns:
        TokenLogProbs with fp32 ``logprobs`` and ``entropy`` (None unless requested), shaped like ``targets``.
        Gradients flow to ``logits`` (in its dtype); ``logits`` is never modified.
    """
    if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.dim() < 1:
        raise ValueError(f"logits: expected a floating-point tensor [..., V/tp], got {_describe(logits)}")
    v_local = logits.shape[-1]
    if v_local < 1:
        raise ValueError(f"logits: expected a non-empty vocab dimension, got shape {tuple(logits.shape)}")
    world, vocab_start, use_triton = check_head_args(
        logits, "logits", targets, v_local, temperature=temperature, chunk_name="chunk_size", chunk=chunk_size,
        backend=backend, tp_group=tp_group)

    z2d = logits.reshape(-1, v_local)  # [T, V/tp]; a view for contiguous logits
    if use_triton and z2d.stride(1) != 1:
        z2d = z2d.contiguous()
    # local column of the target, -1 where another rank owns it
    tgt = targets.reshape(-1).to(torch.int64) - vocab_start
    local_tgt = torch.where((tgt >= 0) & (tgt < v_local), tgt, torch.full_like(tgt, -1)).contiguous()
    chunk = _chunk_tokens(chunk_size, v_local)

    out = _VocabParallelLogProbs.apply(
        z2d, local_tgt, tp_group, world, float(temperature), compute_entropy, chunk, use_triton
    )
    if compute_entropy:
        logp, ent = out
        return TokenLogProbs(logp.view(targets.shape), ent.view(targets.shape))
    return TokenLogProbs(out.view(targets.shape), None)


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"tensor of dtype {x.dtype} and shape {tuple(x.shape)}"
    return f"{type(x).__name__}"
