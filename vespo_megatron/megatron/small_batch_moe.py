"""`SmallBatchMoELayer`: megatron's `MoELayer` with a dispatcher-free path for small inference batches.

Why: a KV-cached decode step of the embedded engine is host bound (`bench/decode_op_count.py`: ~700 torch ops
a step, a third of them in the MoE layers' dispatch, permute, per-expert bookkeeping and unpermute), and the
dispatcher's token counts reach the host in every MoE layer (`masked_select` sizes, `tokens_per_expert` for
the experts' split): a device sync each on CUDA, which also rules out capturing the step in a CUDA graph.
For a few hundred tokens the routed FLOPs are tiny, so computing *every* local expert on *every* token, with
the rows a token was not routed to zeroed, costs little device time (E / top-k times the routed FLOPs) and
needs no count at all:

    hidden [S, B, H] --router--> probs [T, E], routing_map [T, E]
      x [T, H] * routing_map^T --> [E, T, H] --bmm W1, act, * probs^T--> [E, T, F] --bmm W2--> [E, T, H] --sum E--> [T, H]

Shape legend: [S, B] the layer's input positions and rows, [T] = S * B tokens, [E] local experts (all experts:
the path runs only without expert parallelism), H hidden, F the experts' ffn width.

The router, the shared experts and routing replay are megatron's own calls (`route`,
`shared_experts_compute`), so R3's recording (`RouterReplay`) and the engine's router noise see no difference;
the experts' GEMMs are `BatchedSequentialMLP`'s (`dense_forward`), hooks' batched forms included.

When: only while `dense_rows_limit` > 0 (off by default; `dense_small_batches(model, limit)` sets it for a
block of code, as the embedded engine does for a generation with `EmbeddedEngineConfig.dense_moe_rows`), without
autograd and in eval mode, for E * T <= the limit, and where the dispatcher would do nothing but permute:
one expert-parallel rank and one expert-TP rank, no token dropping or padding, no latent projection, no
shared-expert overlap, no padding mask. Everything else goes to `MoELayer.forward` unchanged. Results: the
routing is the same call; the output equals the dispatcher path's up to GEMM rounding (`dense_forward`).
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer

__all__ = ["SmallBatchMoELayer", "dense_small_batches"]


class SmallBatchMoELayer(MoELayer):
    """Drop-in `MoELayer` (same constructor, parameters and checkpoints); see the module docstring."""

    dense_rows_limit: int = 0  # E * T rows at most for the dense path; 0: off (an instance attribute when set)

    def dense_reason(self) -> str | None:
        """Why this layer never takes the dense path (None: it can, for small enough no-grad batches)."""
        c = self.config
        if self.num_local_experts != c.num_moe_experts:
            return "expert parallelism (the experts of other ranks need the dispatcher's all-to-all)"
        if not callable(getattr(self.experts, "dense_forward", None)):
            return "experts without a dense_forward (not BatchedSequentialMLP)"
        if c.moe_expert_capacity_factor is not None or getattr(c, "moe_pad_expert_input_to_capacity", False):
            return "token dropping / padding to capacity"
        if getattr(c, "moe_router_padding_for_quantization", False):
            return "router padding for quantisation"
        if getattr(c, "moe_latent_size", None):
            return "latent projections"
        if self.shared_expert_overlap:
            return "shared-expert overlap (the dispatcher computes the shared experts)"
        return None

    def dense_path_reason(self, tokens: int, limit: int) -> str | None:
        """Why a no-grad, eval-mode forward of `tokens` tokens under the rows limit `limit` would take megatron's
        dispatcher (None: the dense path). The embedded engine asks it before capturing a decode step."""
        if not limit:
            return "the dense path is off (dense_moe_rows = 0)"
        if tokens * self.num_local_experts > limit:
            return f"experts x rows = {self.num_local_experts} x {tokens} > dense_moe_rows = {limit}"
        reason = self.__dict__.get("_dense_reason", False)  # the configuration part, computed once
        if reason is False:
            reason = self.__dict__["_dense_reason"] = self.dense_reason()
        # Hooks come and go (the engine's fp8 knob): asked before routing, which must run once per forward
        # (R3 records every router call).
        return reason if reason is not None else self.experts.unbatched_reason()

    def _dense_ok(self, hidden_states: torch.Tensor, intermediate_tensors, padding_mask) -> bool:
        if not self.dense_rows_limit or intermediate_tensors is not None or padding_mask is not None:
            return False
        if self.training or torch.is_grad_enabled():
            return False
        tokens = hidden_states.numel() // hidden_states.size(-1)
        return self.dense_path_reason(tokens, self.dense_rows_limit) is None

    def forward(self, hidden_states: torch.Tensor, intermediate_tensors=None, padding_mask=None):
        if self._dense_ok(hidden_states, intermediate_tensors, padding_mask):
            return self._dense_forward(hidden_states)
        return super().forward(hidden_states, intermediate_tensors, padding_mask)

    def _dense_forward(self, hidden_states: torch.Tensor):
        """(output [S, B, H], None) without the dispatcher."""
        shared = self.shared_experts_compute(hidden_states)
        probs, routing_map = self.route(hidden_states)  # [T, E] each
        x = hidden_states.reshape(-1, hidden_states.size(-1))  # [T, H]
        out = self.experts.dense_forward(x, probs, routing_map).view(hidden_states.shape)
        if shared is not None:
            out = out + shared
        return out, None


@contextlib.contextmanager
def dense_small_batches(model: torch.nn.Module, limit: int):
    """Let every `SmallBatchMoELayer` of `model` take its dense path for no-grad batches of E * T <= `limit`
    rows while entered (0: leave them as they are)."""
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise ValueError(f"limit: expected an int >= 0, got {limit!r}")
    layers = [m for m in model.modules() if isinstance(m, SmallBatchMoELayer)] if limit else []
    for m in layers:
        m.dense_rows_limit = limit
    try:
        yield layers
    finally:
        for m in layers:
            m.__dict__.pop("dense_rows_limit", None)
