"""Reference core attention for megatron layer specs: padded, packed (THD) and context-parallel.

Replaces megatron's local `DotProductAttention`, which asserts CP == 1 and refuses `PackedSeqParams`. This
module materialises the full [sq, sk] score matrix (O(T^2) memory) on CPU, where tests need the explicit fp32
math; on CUDA the same masks go through torch's fused SDPA kernels (packed sequences as a padded batch, no
[t, t] mask), which makes it fast enough for the single-GPU testbed.
GPU users select transformer-engine's attention (`vespo_megatron.megatron.model.build_layer_spec` does
when TE imports).

Masking is always causal, by *global* token index:
  - sbhd (padded batch) without CP: key j is visible to query i iff j <= i (and the optional megatron
    `attention_mask` [b, 1, sq, sk], True = masked, does not mask it);
  - sbhd with CP: K/V are all-gathered over the CP group; local tokens carry their zigzag global positions;
  - sbhd with a KV cache (megatron's static inference context: `Attention` hands over the cached keys, so
    sk > sq): the queries are the *last* sq positions of the sk keys (causal offset sk - sq): query i sees
    key j iff j <= i + sk - sq. Prefill (sq == sk) is plain causal; a one-token decode step sees every key;
  - THD (packed, `packed_seq_params.qkv_format == 'thd'`): block-diagonal causal: same sequence (taken from
    `cu_seqlens_q_padded`, or `cu_seqlens_q`) and key index <= query index; with CP each sequence is zigzag
    split (vespo_megatron.parallel.cp_split) and K/V are all-gathered.
The all-gather is autograd-correct: its backward reduce-scatters (sums) the K/V gradients.
GQA and softmax scale follow megatron: K/V heads repeat-interleaved to the query heads, scale
1/sqrt(head_dim) unless `softmax_scale` is given. Softmax in fp32.

Shape legend:
    sq, sk  local query / key length (padded layout; sk > sq with a KV cache);  t  local packed tokens
    b  batch;  np  local query heads;  ng  local K/V groups;  hn  head dim;  cp  context-parallel size
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from vespo_megatron.base.transfer import to_device
from vespo_megatron.compat import PackedSeqParams, ProcessGroupCollection
from vespo_megatron.parallel.cp_split import thd_zigzag_indices, zigzag_indices

# Which kernels compute the attention: None = torch's fused SDPA kernels on CUDA and the explicit fp32 reference
# on CPU (tests compare the two by setting True / False).
FUSED_KERNELS: bool | None = None
# How the fused path computes a one-token decode step over cached keys: "sdpa" (torch's SDPA kernel) or "bmm"
# (two batched matmuls and a softmax on the cache's strided views; bench/decode_attention_probe.py times both).
DECODE_KERNEL: str = "sdpa"


class _AllGatherFirstDim(torch.autograd.Function):
    """Concatenate each rank's tensor on dim 0; backward sums the gradients and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        out = torch.empty((world * x.size(0), *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        world = dist.get_world_size(ctx.group)
        out = torch.empty((grad.size(0) // world, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
        dist.reduce_scatter_tensor(out, grad.contiguous(), group=ctx.group)
        return out, None


def all_gather_first_dim(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[n, ...] per rank -> [world*n, ...] in rank order; gradient is reduce-scattered."""
    if dist.get_world_size(group) == 1:
        return x
    return _AllGatherFirstDim.apply(x, group)


def _sdpa(query: Tensor, key: Tensor, value: Tensor, visible: Tensor | None, scale: float, *,
          causal: bool = True) -> Tensor:
    """The same attention through torch's fused kernels (flash / memory-efficient): no [sq, sk] scores in
    memory. query [b, np, sq, hn], key/value [b, np, sk, hn], visible [b or 1, 1, sq, sk] bool or None: then
    causal with sq == sk, or (causal=False) every key visible to every query (a one-token decode step over its
    cached keys, or its rep query heads of one K/V group: `_attend_decode`). Softmax accumulates in fp32 inside
    the kernels, as in the reference."""
    if visible is None:
        return F.scaled_dot_product_attention(query, key, value, is_causal=causal, scale=scale)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=visible, scale=scale)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, kernel: str) -> Tensor:
    """A decode step's attention without a mask: q [b, ng, rep, hn] (the rep query heads of each K/V group) over
    k / v [b, ng, sk, hn] (views of the [sk, b, ng, hn] cache) -> [b, ng, rep, hn]. kernel "sdpa": torch's SDPA;
    "bmm": two batched matmuls and an fp32 softmax, with (b, ng) flattened into one batch stride of the cache's
    views (no copy). `DECODE_KERNEL` picks it in `ReferenceAttention`; bench/decode_attention_probe.py times both."""
    if kernel == "sdpa":
        return _sdpa(q, k, v, None, scale, causal=False)
    if kernel != "bmm":
        raise ValueError(f"kernel: expected 'sdpa' or 'bmm', got {kernel!r}")
    b, ng, rep, hn = q.shape
    sk = k.size(2)
    kf, vf = k.reshape(b * ng, sk, hn), v.reshape(b * ng, sk, hn)
    scores = torch.bmm(q.reshape(b * ng, rep, hn), kf.transpose(1, 2)) * scale  # [b*ng, rep, sk]
    return torch.bmm(torch.softmax(scores.float(), dim=-1).to(vf.dtype), vf).view(b, ng, rep, hn)


class ThdLayout(NamedTuple):
    """Where each real token of a pack sits in the right-padded batch of its sequences (see `_thd_by_sequence`).
    src / dst [t_real] (on the attention's device): packed index / index in the [n * s_max] padded rows."""

    num_tokens: int  # t: packed tokens, padding included (cu_padded[-1])
    num_seqs: int  # n
    max_len: int  # s_max: the longest sequence's real tokens (>= 1)
    src: Tensor
    dst: Tensor


def thd_layout(cu_padded: Tensor, cu_real: Tensor, device: torch.device) -> ThdLayout:
    """The padded-batch layout of a pack from its cumulative lengths (cu_padded / cu_real [n + 1], cpu)."""
    counts = cu_real[1:] - cu_real[:-1]
    n, s_max = counts.numel(), max(int(counts.max()) if counts.numel() else 0, 1)
    seq = torch.repeat_interleave(torch.arange(n), counts)  # [t_real]
    offset = torch.arange(int(counts.sum())) - torch.repeat_interleave(cu_real[:-1], counts)  # position in its sequence
    src = to_device(torch.repeat_interleave(cu_padded[:-1], counts) + offset, device)  # [t_real] packed index
    dst = to_device(seq * s_max + offset, device)  # [t_real] index in the padded batch
    return ThdLayout(int(cu_padded[-1]), n, s_max, src, dst)


def cached_thd_layout(packed_seq_params: PackedSeqParams, device: torch.device) -> ThdLayout:
    """`thd_layout` of a micro-batch's pack, computed once and kept on its `PackedSeqParams`: every layer's
    attention (and the recompute of activation checkpointing) reuses it, so the pack's lengths are read back to
    the host once per micro-batch instead of once per layer (and not at all when `RLMicroBatch.to` kept the
    host copies). Keyed by the identity of the cu_seqlens tensors (a changed tensor is recomputed) and the
    device."""
    cu_padded = packed_seq_params.cu_seqlens_q_padded
    cu_real = packed_seq_params.cu_seqlens_q
    key = (cu_padded, cu_real, device)
    hit = getattr(packed_seq_params, "_vespo_thd_layout", None)
    if hit is not None and all(a is b for a, b in zip(hit[0][:2], key[:2], strict=True)) and hit[0][2] == device:
        return hit[1]
    # the lengths on the host: the micro-batch's host copy when it kept one (no read-back), else a device read
    host = getattr(packed_seq_params, "_vespo_host_params", packed_seq_params)
    host_padded, host_real = host.cu_seqlens_q_padded, host.cu_seqlens_q
    padded = (host_real if host_padded is None else host_padded).to("cpu", torch.long)
    real = padded if host_real is None else host_real.to("cpu", torch.long)
    layout = thd_layout(padded, real, device)
    object.__setattr__(packed_seq_params, "_vespo_thd_layout", (key, layout))
    return layout


def _thd_by_sequence(query: Tensor, key: Tensor, value: Tensor, layout: ThdLayout, scale: float) -> Tensor:
    """Block-diagonal causal attention over packed sequences without a [t, t] mask: each sequence's *real*
    tokens are laid out as a right-padded batch [n, np, s_max, hn] (right padding never reaches a valid query
    under the causal mask; `layout` says where each token goes), attended with the fused causal kernel and
    gathered back. Padding tokens get zeros, as transformer-engine's THD attention gives them (a pack's last
    sequence can carry thousands of padding tokens; attending them would cost O(t^2)).
    query/key/value [t, np, hn]. Returns [t, np, hn]."""
    n, s_max, t = layout.num_seqs, layout.max_len, query.size(0)

    def padded(x: Tensor) -> Tensor:
        out = x.new_zeros(n * s_max, *x.shape[1:]).index_copy(0, layout.dst, x.index_select(0, layout.src))
        return out.view(n, s_max, *x.shape[1:]).transpose(1, 2)  # [n, np, s_max, hn]

    out = F.scaled_dot_product_attention(padded(query), padded(key), padded(value), is_causal=True, scale=scale)
    rows = out.transpose(1, 2).reshape(n * s_max, *query.shape[1:]).index_select(0, layout.dst)
    return query.new_zeros(t, *query.shape[1:]).index_copy(0, layout.src, rows)


def attention_probs_reference(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, visible: torch.Tensor, scale: float
) -> torch.Tensor:
    """Pure math. query [b, np, sq, hn], key/value [b, np, sk, hn], visible [b or 1, 1, sq, sk] bool.

    Returns [b, np, sq, hn] in query's dtype; softmax in fp32.
    """
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, value.float()).to(query.dtype)


class ReferenceAttention(MegatronModule):
    """Drop-in `core_attention` for megatron's `SelfAttention` (same constructor and forward signature)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ):
        super().__init__(config=config)
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"attn_mask_type: expected causal, got {attn_mask_type}")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout != 0.0:
            raise ValueError(f"attention_dropout: expected 0.0 for ReferenceAttention, got {dropout}")
        if config.window_size is not None:
            raise ValueError(f"window_size: expected None for ReferenceAttention, got {config.window_size}")
        if config.softmax_type != "vanilla":
            raise ValueError(f"softmax_type: expected 'vanilla', got {config.softmax_type!r}")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.tp_group = pg_collection.tp
        self.cp_group = pg_collection.cp
        tp = self.tp_group.size()
        self.num_heads = config.num_attention_heads // tp
        self.num_groups = config.num_query_groups // tp
        head_dim = config.kv_channels
        self.softmax_scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale

    def _cp(self) -> tuple[int, int]:
        if self.cp_group is None:
            return 1, 0
        return self.cp_group.size(), self.cp_group.rank()

    def _repeat_kv(self, x: Tensor) -> Tensor:
        """GQA: K/V heads (dim 2 of [s, b, ng, hn] / dim 1 of [t, ng, hn]) repeated to the query heads."""
        rep = self.num_heads // self.num_groups
        return x.repeat_interleave(rep, dim=-2) if rep > 1 else x

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("attention_bias: expected None for ReferenceAttention")
        cp_size, cp_rank = self._cp()
        thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        fused = query.is_cuda if FUSED_KERNELS is None else FUSED_KERNELS
        if fused and thd and cp_size == 1 and attention_mask is None:
            # the fused packed path: the pack's layout once per micro-batch (no sync per layer)
            layout = cached_thd_layout(packed_seq_params, query.device)
            if layout.num_tokens != query.size(0):
                raise ValueError(f"query tokens: expected {layout.num_tokens} from cu_seqlens and cp=1, "
                                 f"got {query.size(0)}")
            key, value = self._repeat_kv(key), self._repeat_kv(value)
            out = _thd_by_sequence(query, key, value, layout, self.softmax_scale)
            return out.reshape(out.size(0), -1)  # [t, np*hn]
        if thd:
            # [t, np, hn] -> [1, t, np, hn] (sbhd with s=t, b=1) after index bookkeeping
            cu = packed_seq_params.cu_seqlens_q_padded
            if cu is None:
                cu = packed_seq_params.cu_seqlens_q
            cu = cu.to("cpu", torch.long)
            q_index = thd_zigzag_indices(cu, cp_size, cp_rank) if cp_size > 1 else torch.arange(int(cu[-1]))
            if q_index.numel() != query.size(0):
                raise ValueError(
                    f"query tokens: expected {q_index.numel()} from cu_seqlens and cp={cp_size}, "
                    f"got {query.size(0)}"
                )
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))
        elif fused and cp_size == 1 and attention_mask is None and (query.size(0) == 1 or key.size(0) == query.size(0)):
            # No mask to build (and no index tensors to copy to the device, a stream sync each): plain causal
            # attention, or a decode step, whose one query at the end of the cached keys sees all of them.
            if key.size(0) != query.size(0):
                return self._attend_decode(query, key, value)
            return self._attend_sbhd(query, self._repeat_kv(key), self._repeat_kv(value), None, fused=True)
        elif key.size(0) != query.size(0):
            # KV cache: sk cached + new keys, sq new queries at the end of the sequence
            if cp_size > 1 or key.size(0) < query.size(0):
                raise ValueError(
                    f"key length: expected sk >= sq and cp == 1 for cached keys, got sk={key.size(0)}, "
                    f"sq={query.size(0)}, cp={cp_size}"
                )
            sq, sk = query.size(0), key.size(0)
            q_index = torch.arange(sk - sq, sk)
        else:
            seq_global = query.size(0) * cp_size
            q_index = zigzag_indices(seq_global, cp_size, cp_rank) if cp_size > 1 else torch.arange(seq_global)
        if cp_size > 1:
            if attention_mask is not None:
                raise ValueError("attention_mask: expected None with context parallelism (causal only)")
            key = all_gather_first_dim(key, self.cp_group)
            value = all_gather_first_dim(value, self.cp_group)
            if thd:
                k_index = torch.cat([thd_zigzag_indices(cu, cp_size, r) for r in range(cp_size)])
            else:
                k_index = torch.cat([zigzag_indices(seq_global, cp_size, r) for r in range(cp_size)])
        elif not thd and key.size(0) != query.size(0):
            k_index = torch.arange(key.size(0))
        else:
            k_index = q_index
        key, value = self._repeat_kv(key), self._repeat_kv(value)
        q_index, k_index = to_device(q_index, query.device), to_device(k_index, query.device)
        visible = k_index[None, :] <= q_index[:, None]  # [sq, sk]
        if thd:
            cu_d = to_device(cu, query.device)
            q_seq = torch.searchsorted(cu_d, q_index, right=True)
            k_seq = torch.searchsorted(cu_d, k_index, right=True)
            visible = visible & (q_seq[:, None] == k_seq[None, :])
        visible = visible[None, None]  # [1, 1, sq, sk]
        if attention_mask is not None:
            visible = visible & ~attention_mask.bool()
        out = self._attend_sbhd(query, key, value, visible, fused=fused)
        return out.squeeze(1) if thd else out  # THD: [t, np*hn]

    def _attend_decode(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        """A decode step, [1, b, np, hn] query over [sk, b, ng, hn] cached key / value -> [1, b, np*hn], without
        repeating K/V to the query heads: the rep query heads of a K/V group (heads g*rep .. g*rep + rep - 1, as
        `_repeat_kv` pairs them) become rep queries of that group, each seeing every key (no mask). The cache
        is then read once per group instead of copied rep times, in every layer and every step."""
        _, b, heads, hn = query.shape
        groups = key.size(2)
        q = query.permute(1, 2, 0, 3).reshape(b, groups, heads // groups, hn)  # [b, ng, rep, hn]
        k, v = (x.permute(1, 2, 0, 3) for x in (key, value))  # [b, ng, sk, hn]
        return decode_attention(q, k, v, self.softmax_scale, DECODE_KERNEL).reshape(1, b, heads * hn)

    def _attend_sbhd(self, query: Tensor, key: Tensor, value: Tensor, visible: Tensor | None, *,
                     fused: bool) -> Tensor:
        """[s, b, n, hn] query / key / value (K/V heads repeated) -> [sq, b, np*hn]; `visible` as `_sdpa`'s."""
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, n, s, hn]
        if fused:
            out = _sdpa(q, k, v, visible, self.softmax_scale)
        else:
            out = attention_probs_reference(q, k, v, visible, self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(query.size(0), query.size(1), -1)
