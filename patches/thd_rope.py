"""RoPE on packed (THD) sequences in one pass over the tokens, without a host sync per call.

Upstream: megatron-core 0.16.x-0.19.x (`megatron/core/models/common/embeddings/rope_utils.py:
_apply_rotary_pos_emb_thd`, the unfused path every run without transformer-engine takes). It reads the
sequence lengths back to the host (`.tolist()`, a device sync) and slices the frequencies sequence by sequence
(0.16: ~4 small ops per sequence; 0.19: the whole rotation per sequence, ~10 ops each), for the query and
the key of every layer. A pack of 128 samples then costs ~4,000 launches and 8 syncs per forward of a 4-layer
model, and the syncs stall the host until the GPU has drained its queue: the testbed's training steps are
host bound (docs/results/testbed/README.md). Upstream main replaced the loop by per-token position
arithmetic after 0.19 (its `_apply_rotary_pos_emb_thd` takes `max_seqlen`); this is the same idea for the
released versions.

The replacement computes each token's frequency row with a handful of tensor ops on the device
(`searchsorted` over the local cumulative lengths, the context-parallel load-balanced mapping, the exact-offset
mode when `freqs` has one row per packed token) and applies the version's own `_apply_rotary_pos_emb_bshd`
once to all tokens. The rotation is elementwise, so the result and its gradient are bitwise those of the
loop (tests/test_patches.py compares them, cp 1 and 2, both frequency modes, interleaved or not). The
exact-offset mode is detected without a sync: `freqs` has one row per packed token iff it has
cp_size x (local tokens) rows, since the local tokens are this rank's share of `cu_seqlens[-1]` (the loop's
`torch.split` requires that too).

Applies where the installed function is the per-sequence loop (no `max_seqlen` parameter, not already this
one); `apply()` is idempotent. Called through `vespo_megatron.patches.apply_all()`.
"""

from __future__ import annotations

import importlib
import inspect

import torch

TARGET = "megatron-core"
TARGET_VERSIONS = ">=0.16.1,<0.20"  # 0.16.1 and 0.19.0 read; upstream main has its own vectorised version
MODULE = "megatron.core.models.common.embeddings.rope_utils"
FUNCTION = "_apply_rotary_pos_emb_thd"

ORIGINAL = None  # the function replaced (set by apply; tests compare against it)


def packed_positions(cu_seqlens: torch.Tensor, num_local: int, cp_size: int, cp_rank: int,
                     num_freqs: int) -> torch.Tensor:
    """[t] the row of `freqs` for each of this rank's `num_local` packed tokens, as the per-sequence loop
    picks them: the position within its sequence (restarting at 0 per sequence; under CP the rank's two
    load-balanced chunks, [r * seg, (r + 1) * seg) and the mirrored one), plus the sequence's global start when
    `freqs` has a row per packed token (`num_freqs == cp_size * num_local`)."""
    cu = cu_seqlens.to(torch.int64)
    local_len = (cu[1:] - cu[:-1]) // cp_size  # [n]
    local_cu = torch.nn.functional.pad(local_len.cumsum(0), (1, 0))  # [n + 1]
    token = torch.arange(num_local, device=cu.device)
    seq = torch.searchsorted(local_cu[1:], token, right=True)  # [t] the sequence each token belongs to
    pos = token - local_cu[seq]
    if cp_size > 1:
        seg = local_len[seq] // 2
        pos = torch.where(pos < seg, cp_rank * seg + pos, cp_size * local_len[seq] - (cp_rank + 1) * seg + (pos - seg))
    if num_freqs == cp_size * num_local:
        pos = pos + cu[seq]
    return pos


def _apply_thd_vectorized(t, cu_seqlens, freqs, *args, cp_group=None, **bshd_kwargs):
    """Drop-in for the version's `_apply_rotary_pos_emb_thd(t [t, h, d], cu_seqlens [n + 1], freqs [s, 1, 1, d],
    ..., cp_group)`; the keywords besides cp_group are the version's own and go to its `_apply_rotary_pos_emb_bshd`
    unchanged (0.16: multi_latent_attention; 0.19: mla_rotary_interleaved)."""
    if args or cp_group is None or freqs.dim() < 1:  # not the call shape we know (or the loop's own error): the loop
        return ORIGINAL(t, cu_seqlens, freqs, *args, cp_group=cp_group, **bshd_kwargs)
    rope = importlib.import_module(MODULE)
    return rope._apply_rotary_pos_emb_bshd(t.unsqueeze(1), _packed_freqs(cu_seqlens, freqs, t.size(0), cp_group),
                                           **bshd_kwargs).squeeze(1)


_LAST: list = [None, None]  # [key, freqs rows]: the last pack's, reused by the key and by every layer


def _packed_freqs(cu_seqlens, freqs, num_local: int, cp_group) -> torch.Tensor:
    """[t, 1, 1, d] each local token's frequency row. The query and key of every layer of one forward use the
    same cu_seqlens and freqs tensors: the rows are computed once and reused while both tensors are the same
    objects, unmodified (their in-place version counters are in the key) and freqs needs no gradient."""
    key = (cu_seqlens, cu_seqlens._version, freqs, freqs._version, num_local, cp_group.size(), cp_group.rank())
    last = _LAST[0]
    if last is not None and len(last) == len(key) and all(a is b or (type(a) is int and a == b)
                                                            for a, b in zip(last, key, strict=True)):
        return _LAST[1]
    rows = freqs[packed_positions(cu_seqlens, num_local, cp_group.size(), cp_group.rank(), freqs.size(0))]
    if not freqs.requires_grad:
        _LAST[0], _LAST[1] = key, rows
    return rows


def needed() -> bool:
    """Whether megatron-core's THD RoPE is the per-sequence loop (and not replaced yet)."""
    try:
        rope = importlib.import_module(MODULE)
    except ImportError:
        return False
    current = getattr(rope, FUNCTION, None)
    if current is None or current is _apply_thd_vectorized:
        return False
    return "max_seqlen" not in inspect.signature(current).parameters


def apply() -> bool:
    """Route megatron's THD RoPE through the vectorised version. Idempotent; returns whether anything changed."""
    global ORIGINAL
    if not needed():
        return False
    rope = importlib.import_module(MODULE)
    ORIGINAL = getattr(rope, FUNCTION)
    setattr(rope, FUNCTION, _apply_thd_vectorized)
    return True
