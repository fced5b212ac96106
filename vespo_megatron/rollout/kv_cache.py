"""KV-cache support for the embedded engine: which layouts can use it, and the model switches it needs.

The cached path runs megatron-core's own static-batching inference: a `StaticInferenceContext` is passed to
`GPTModel.forward`, every `Attention` layer stores its keys/values in [S_max, B, groups, hn] buffers and
attends over the cached prefix (our `ReferenceAttention` handles sk > sq with a causal offset; TE's
attention gets megatron's `no_mask` for a one-token decode step). RoPE follows the context's sequence offset,
so all rows of a batch share positions: prompts are right-padded, the prefill covers the shortest prompt,
and each decode step feeds one position for every row (rows still inside their prompt feed their prompt
token, as megatron's static text-generation controller does).

Layouts:
  - TP (with SP), EP, PP, DP: cached. Sequence parallelism cannot split a one-token decode step, so it is
    switched off for the duration of generation (`sequence_parallel_off`), as megatron's controller does
    for static batching; with EP = 1 and expert-TP = 1 every TP rank then runs the whole MoE on the whole
    (replicated) sequence, which is exact.
  - CP > 1: not cached (a one-token step cannot be split over CP ranks; megatron's static path has no CP).
  - TP > 1 together with EP > 1 or expert-TP > 1: not cached here (megatron keeps SP inside the MoE layers
    for that case; not implemented). These layouts fall back to the recompute path, with the reason.

Shape legend: [B] rows, [B, V] logits of one position, [B] u uniforms.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["kv_cache_unsupported_reason", "sequence_parallel_off", "inverse_cdf_sample"]

_SP_ATTRS = ("sequence_parallel", "scatter_to_sequence_parallel", "reduce_scatter_embeddings")


def kv_cache_unsupported_reason(*, tp: int, cp: int, ep: int, etp: int) -> str | None:
    """None when the layout can decode with the KV cache, else why not (the engine falls back)."""
    if cp > 1:
        return f"context parallelism (cp={cp}) cannot split a one-token decode step"
    if tp > 1 and (ep > 1 or etp > 1):
        return (f"tp={tp} with ep={ep}, expert-tp={etp}: MoE layers would need sequence parallelism inside a "
                "non-SP decode step (not implemented)")
    return None


@contextlib.contextmanager
def sequence_parallel_off(model: torch.nn.Module, config):
    """Turn sequence parallelism off in `config` and every module attribute that caches it; restore on exit."""
    if not getattr(config, "sequence_parallel", False):
        yield
        return
    changed = [(m, a) for m in model.modules() for a in _SP_ATTRS if getattr(m, a, None) is True]
    config.sequence_parallel = False
    for m, a in changed:
        setattr(m, a, False)
    try:
        yield
    finally:
        config.sequence_parallel = True
        for m, a in changed:
            setattr(m, a, True)


def inverse_cdf_sample(logp: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[B, V] log-probs, [B] uniforms in [0, 1) -> [B] token ids: the first id whose CDF exceeds u.

    Each row's k-th new token uses its own pre-drawn u[b, k], so the tokens do not depend on how the decode
    loop is batched (cached vs recompute, or one row vs many): the same probabilities give the same token.
    CDF in float64 so that rounding cannot move the boundary between the two paths' nearly equal probs."""
    cdf = logp.double().exp().cumsum(dim=-1)  # [B, V]
    target = u.double().to(cdf.device)[:, None] * cdf[:, -1:]  # scale by the total (sums to 1 +- eps)
    tok = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return tok.clamp(max=logp.size(-1) - 1)
