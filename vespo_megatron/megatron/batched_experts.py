"""`BatchedSequentialMLP`: megatron's `SequentialMLP` with all local experts in a few batched kernels.

megatron's `SequentialMLP` (the local spec's experts without grouped GEMM, i.e. without transformer-engine)
runs each local expert as its own `MLP` call: E x (fc1 GEMM, SwiGLU, probs, fc2 GEMM) launches per MoE layer,
Python overhead included. A KV-cached decode step is launch bound on exactly this loop (engine profile: ~320
`Linear` calls per step at 16 experts, 1.77 s CPU against 0.24 s GPU). This subclass computes the same thing
with two `torch.bmm` over the experts' stacked weights:

    x [T, H] --index_copy--> [E, C, H] --bmm W1--> [E, C, 2F] --act, * probs--> [E, C, F] --bmm W2--> [E, C, H]
      --index_select--> [T, H]

Shape legend: [T] permuted tokens (grouped by expert, as the dispatcher hands them over); [E] local experts
(without grad: only those that got tokens);
[C] = max tokens of one expert; [E, C, .] per-expert rows padded with zero rows to C; H hidden (the experts'
input and output width); F the experts' ffn width (fc1 gives 2F with SwiGLU); flat index [T]: row of each
permuted token in the [E * C] padded rows.

Everything that is not computation is the parent's: the experts are still `local_experts.{i}` `MLP` modules
with `linear_fc1.weight` / `linear_fc2.weight`, so parameter names, the state dict, `sharded_state_dict`,
the HF bridge, DDP's grad buffers and the expert-parallel bookkeeping see no difference. `torch.stack` of the
weights keeps autograd to each expert's parameter (the gradient lands in each `param.grad` as before); it
copies the weights on every call (one more read and write of them: small next to the launches it saves at
our sizes, not free for memory-bound decoding of large experts). Results equal the loop's up to GEMM rounding
(bmm and mm may sum in another order).

The batched path is taken only where it is the same computation as the parent's loop (`unbatched_reason`
says why not otherwise, and `forward` then calls the parent): expert-TP size 1 (the linear layers do no
communication), no biases, no fp8/fp4, no fused or TE activation, megatron's own linear layers, and no hook
on an expert's linear layer except forward pre-hooks that declare a batched form (below). Padding costs
compute and activation memory; above `max_padding_ratio` x T padded rows (and `small_batch_rows`, below which
it costs nothing worth saving) the loop runs instead, so a collapsed router cannot blow up training memory.

Hooks: the batched path never calls the experts' `linear_fc1` / `linear_fc2` modules, so their hooks would be
skipped silently. A forward pre-hook object with a `batched(x)` method, the same object on every expert, is
applied as `batched` on the padded inputs [E, C, in] instead: it must give each expert's rows `x[e, :n_e]`
what the hook gives them alone, whatever the zero rows below them (`rollout.mismatch`'s fp8 input
quantisation: one scale per expert, and zeros raise no amax). Any other hook sends the call to the loop.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.experts import SequentialMLP
from torch.nn.modules import module as _torch_module

from vespo_megatron.base.transfer import to_device

__all__ = ["BatchedSequentialMLP"]

# torch's global module hooks (`register_module_forward_pre_hook` and friends) would also be skipped.
_GLOBAL_HOOKS = ("_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def _batched_pre_hooks(linear: torch.nn.Module) -> list | None:
    """The linear layer's forward pre-hooks when each has a `batched` form and it has no other hook; else None."""
    if linear._forward_hooks or linear._backward_hooks or linear._backward_pre_hooks:
        return None
    hooks = list(linear._forward_pre_hooks.values())
    if linear._forward_pre_hooks_with_kwargs or not all(callable(getattr(h, "batched", None)) for h in hooks):
        return None
    return hooks


class BatchedSequentialMLP(SequentialMLP):
    """Drop-in `SequentialMLP` (same constructor, parameters and checkpoints) computing all local experts
    with batched GEMMs where that is the same computation; see the module docstring."""

    max_padding_ratio: float = 4.0  # padded rows E * C allowed per permuted token ...
    small_batch_rows: int = 4096  # ... unless E * C is at most this (decode steps: padding costs nothing)

    def unbatched_reason(self) -> str | None:
        """Why `forward` runs the parent's per-expert loop for this configuration (None: the batched path).
        The padding limit, which depends on the routing, is checked in `forward`."""
        return self._plan()[0]

    def _plan(self):
        """(unbatched reason or None, (fc1 hooks, fc2 hooks) when batched). The configuration part is fixed at
        construction and computed once; hooks can come and go (the engine's fp8 mismatch adds them for a
        generation), so they are looked at on every call, on cached module lists (a decode step calls this
        once per MoE layer: it must cost microseconds, not the ~0.3 ms of walking the experts' modules)."""
        static = self.__dict__.get("_static_reason", False)
        if static is False:
            static = self._static_reason()
            self.__dict__["_static_reason"] = static
            self.__dict__["_linears"] = ([e.linear_fc1 for e in self.local_experts],
                                         [e.linear_fc2 for e in self.local_experts])
        if static is not None:
            return static, None
        if any(getattr(_torch_module, name, None) for name in _GLOBAL_HOOKS):
            return "global module hooks", None
        transforms = self._input_transforms()
        if transforms is None:
            return "hooks on the experts' linear layers without a batched form", None
        return None, transforms

    def _static_reason(self) -> str | None:
        c = self.config
        if self.num_local_experts == 1:
            return "one local expert (the parent runs it in one call already)"
        if self.tp_group is not None and self.tp_group.size() > 1:
            return "expert tensor parallelism (the experts' linear layers communicate)"
        if c.add_bias_linear:
            return "biases on the experts' linear layers"
        if c.fp8 or c.fp4:
            return "fp8 / fp4 (quantised GEMMs)"
        if c.bias_activation_fusion or c.use_te_activation_func or getattr(c, "delay_wgrad_compute", False):
            return "fused / TE activation or delayed wgrad (other kernels than the plain MLP path)"
        for e in self.local_experts:
            if (type(e) is not MLP or type(e.linear_fc1) is not ColumnParallelLinear
                    or type(e.linear_fc2) is not RowParallelLinear):
                return "experts that are not megatron's MLP with Column/RowParallelLinear"
        return None

    def _input_transforms(self):
        """(fc1 hooks, fc2 hooks), each hook's `batched` applied to the padded GEMM input; None when some
        hook has no batched form or the experts' hooks differ (one batched call must stand for all)."""
        out = []
        for linears in self.__dict__["_linears"]:
            if not any(m._forward_pre_hooks or m._forward_hooks or m._backward_hooks or m._backward_pre_hooks
                       for m in linears):
                out.append([])  # the common case: no hook at all
                continue
            per_expert = [_batched_pre_hooks(m) for m in linears]
            if any(h is None or h != per_expert[0] for h in per_expert):
                return None
            out.append([h.batched for h in per_expert[0]])
        return out

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        reason, transforms = self._plan()
        if reason is not None:
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
        x, probs = permuted_local_hidden_states, permuted_probs  # [T, H], [T]
        # The dispatcher's counts live on the host or are brought there (the parent's torch.split syncs too);
        # the index bookkeeping runs on the host and goes to the device in one copy.
        counts = tokens_per_expert.to("cpu", torch.long)  # [E]
        (T, H), experts = x.shape, list(self.local_experts)
        if not torch.is_grad_enabled() and 0 < T == int(counts.sum()):
            # Inference: only the experts that got tokens (no gradient needs the others' zeros): a small decode
            # batch then stacks and reads only the weights it uses, as the loop does.
            used = counts > 0
            experts, counts = [e for e, u in zip(experts, used.tolist(), strict=True) if u], counts[used]
        E, C = len(experts), int(counts.max())
        if int(counts.sum()) != T or E * C > max(self.max_padding_ratio * T, self.small_batch_rows):
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
        if self.config.moe_apply_probs_on_input:
            # As the parent: scale the inputs in their own dtype, then every expert output gets probs 1.
            x = (probs.unsqueeze(-1) * x).to(x.dtype)
            probs = torch.ones_like(probs)
        expert = torch.repeat_interleave(torch.arange(E), counts)  # [T] expert of each permuted token
        starts = torch.cumsum(counts, 0) - counts  # [E] first permuted row of each expert
        flat = to_device(expert * C + torch.arange(T) - starts[expert], x.device)  # [T] row in [E * C]
        # Zero rows pad each expert to C rows: they stay zero through fc1, and their probs are 0, so they add
        # nothing to any output or gradient (and nothing to an amax a quantising hook takes).
        rows = x.new_zeros(E * C, H).index_copy(0, flat, x).view(E, C, H)
        scale = probs.new_zeros(E * C).index_copy(0, flat, probs).view(E, C, 1)  # [E, C, 1]
        out = self._expert_gemms(rows, scale, experts, transforms)  # [E, C, H]
        return out.view(E * C, H).index_select(0, flat), None  # [T, H]; no bias (see unbatched_reason)

    def dense_forward(self, x: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor) -> torch.Tensor:
        """The routed experts' output for un-permuted tokens, every local expert over every token, without a
        host read: x [T, H], the router's probs [T, E] (0 where not routed) and routing_map [T, E] -> [T, H]
        (`small_batch_moe.SmallBatchMoELayer`'s decode path; only where `unbatched_reason()` is None, i.e.
        the batched GEMMs are the parent's computation). A token's rows of the experts it was not routed to are zero
        (masked inputs, probs 0), so they add exact zeros to its sum and raise no amax in a quantising hook: with
        top-2 the sum equals the dispatcher's scatter-add bit for bit; the GEMMs equal the permuted path's up
        to GEMM rounding. Costs E / top-k times the routed FLOPs: for small batches (decode steps) only."""
        reason, transforms = self._plan()
        if reason is not None:
            raise RuntimeError(f"dense_forward: the experts run megatron's loop here ({reason})")
        mask = routing_map.t().unsqueeze(-1)  # [E, T, 1]
        if self.config.moe_apply_probs_on_input:
            # As the parent: each routed row scaled by its prob in the input's dtype, the outputs by 1.
            rows = (probs.t().unsqueeze(-1) * x).to(x.dtype)  # [E, T, H] (unrouted rows: prob 0)
            scale = mask.to(probs.dtype)
        else:
            rows = x * mask.to(x.dtype)  # [E, T, H]
            scale = probs.t().unsqueeze(-1)  # [E, T, 1]
        return self._expert_gemms(rows, scale, list(self.local_experts), transforms).sum(0)  # [T, H]

    def _expert_gemms(self, rows: torch.Tensor, scale: torch.Tensor, experts: list, transforms) -> torch.Tensor:
        """rows [E, R, H] of inputs per expert, scale [E, R, 1] their probs -> [E, R, H]: fc1, activation, probs,
        fc2 as `MLP.forward` does per expert, with the hooks' batched forms on the GEMM inputs."""
        fc1_hooks, fc2_hooks = transforms
        for hook in fc1_hooks:
            rows = hook(rows)
        w1 = torch.stack([e.linear_fc1.weight for e in experts])  # [E, 2F, H]
        h = torch.bmm(rows, w1.transpose(1, 2))  # [E, R, 2F]
        h = self._activation(h)  # [E, R, F]
        # MLP.forward's per_token_scale: multiply in the promoted dtype, back to the activation's dtype.
        h = (h * scale).to(h.dtype)
        for hook in fc2_hooks:
            h = hook(h)
        w2 = torch.stack([e.linear_fc2.weight for e in experts])  # [E, H, F]
        return torch.bmm(h, w2.transpose(1, 2))  # [E, R, H]

    def _activation(self, h: torch.Tensor) -> torch.Tensor:
        """MLP.forward's unfused activation (row-wise, so the padded layout changes nothing)."""
        c = self.config
        if not c.gated_linear_unit:
            return c.activation_func(h)
        gate, up = torch.chunk(h, 2, dim=-1)
        clamp = getattr(c, "activation_func_clamp_value", None)  # fields of newer megatron-core releases
        if clamp is not None:
            gate = gate.clamp(max=clamp)
            up = up.clamp(min=-clamp, max=clamp)
        return c.activation_func(gate) * (up + getattr(c, "glu_linear_offset", 0.0))
