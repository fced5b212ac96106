"""torch.compile of the embedded engine's decode-step forward (`EmbeddedEngineConfig.compile_decode`).

Why: a replayed decode step of the testbed model is bound by its ~200 small kernels (the device busy ~80 % of
a generation, bench/results/engine_round13_h100/): megatron's unfused RoPE and norms (transformer-engine fuses
them, the device has none), the router's softmax / top-k, the experts' activation and the residual adds.
Inductor fuses those elementwise chains into a few Triton kernels; the GEMMs and the attention kernel stay.
The compiled forward is what the CUDA graphs capture (`decode_graphs`): the first generation that reaches a
position runs it (compiling once, see below) and captures it, later generations replay the fused kernels.

One compile for every decode step of a batch shape: `dynamic=True` makes the cache offset and the key length
symbolic, so later positions reuse the graph (`bench/compile_decode_probe.py`: no recompile as the offset
moves); the number of rows stays specialised (the KV cache's buffers are sized by it), so each batch shape
compiles once, as each gets its own CUDA-graph set (a training run has two: rollouts and evaluation).
The prefill (and the recompute path) stays eager: one forward a generation.

megatron-core breaks dynamo's graph in two places: `get_tensor_model_parallel_group_if_none` warns
(`warnings.warn`, which dynamo cannot trace) when `RowParallelLinear` passes `tp_group=None`, and
`make_viewless_tensor` assigns `.data`. Each break splits the forward into pieces that dynamo compiles as
separate frames, with their own guards (strides of size-1 dims, a layer's kwargs): a dozen more compiles, and
recompiles when the batch shape changes. `_register_polyfills` gives dynamo a traceable stand-in for each
(`torch.compiler.substitute_in_graph`: used only while dynamo traces, eager calls still run megatron's own):
the same group without the warning, and the tensor itself (inference builds no autograd graph, so a view
needs no viewless copy). The whole decode forward is then one graph. The stand-ins hold for every later
torch.compile of megatron code in the process (the same group; a view instead of its viewless copy, the same
values), and never for eager calls.

What changes: the fused kernels round differently from eager (~2e-6 on the logits in fp32), so the engine's
log-probs are no longer bitwise the trainer's at N = 1, as with any real inference engine; a near-tie in the
inverse-CDF draw can flip a token. The first generation pays the compile (8-10 s on an H100 with inductor's
on-disk cache warm, which serves later processes of the same code and shapes; 20-55 s on a CPU).

What it must not see (`compile_unsupported_reason`): collectives (one model-parallel rank), and the engine's
mismatch knobs that install new Python objects on the model every generation (fp8's input hooks, the router
noise's generators): each would be a new guard and a recompile.
"""

from __future__ import annotations

import torch

__all__ = ["CompiledDecode", "compile_unsupported_reason", "tp_group_if_none", "viewless_in_inference"]


def compile_unsupported_reason(*, model_parallel_size: int, fp8: str, router_noise: float) -> str | None:
    """None when the decode step's forward can be compiled, else why not (the engine then runs it eagerly).
    `model_parallel_size`: the ranks one generation's forward spans (TP x CP x EP x PP)."""
    if model_parallel_size != 1:
        return f"model parallelism of {model_parallel_size} ranks (collectives inside the forward)"
    if fp8 != "off":
        return "the fp8 mismatch (its input hooks are new objects every generation: a recompile each)"
    if router_noise > 0:
        return "router noise (a new generator per generation inside the forward: a recompile each)"
    return None


def _forward(model: torch.nn.Module, tokens: torch.Tensor, positions: torch.Tensor, context) -> torch.Tensor:
    return model(input_ids=tokens, position_ids=positions, attention_mask=None, inference_context=context,
                 runtime_gather_output=True)


_compiled_forward = None  # one compiled function for the process: dynamo's cache is per code object anyway


def tp_group_if_none(tp_group, is_expert=False, check_initialized=True):
    """megatron's `utils.get_tensor_model_parallel_group_if_none` less its deprecation warning: the same group
    (dynamo traces this one in its place; tests/test_compiled_decode.py checks the two agree)."""
    from megatron.core import parallel_state

    if tp_group is not None or not torch.distributed.is_initialized() or not parallel_state.is_initialized():
        return tp_group
    if is_expert:
        return parallel_state.get_expert_tensor_parallel_group(check_initialized=check_initialized)
    return parallel_state.get_tensor_model_parallel_group(check_initialized=check_initialized)


def viewless_in_inference(inp, requires_grad, keep_graph):
    """megatron's `utils.make_viewless_tensor` for a forward without autograd: the tensor itself (nothing keeps
    a view's base alive past the step, so no viewless copy is needed)."""
    return inp


def _register_polyfills() -> None:
    """Traceable stand-ins for megatron's two graph breaks (module docstring), registered once, where the
    installed megatron-core has the functions."""
    from megatron.core import utils

    from vespo_megatron.megatron import cpu_shim

    if torch.cuda.current_device is cpu_shim._cpu_device:
        # CPU runs (tests): megatron asks for "the device" through torch.cuda.current_device, which the CPU shim
        # answers; dynamo folds the real one to a constant and would break the graph on the shim's (private table)
        from torch._dynamo.variables import torch as dynamo_torch

        folded = getattr(dynamo_torch, "constant_fold_functions", None)
        if isinstance(folded, dict):
            folded[cpu_shim._cpu_device] = None
    for name, stand_in in (("get_tensor_model_parallel_group_if_none", tp_group_if_none),
                           ("make_viewless_tensor", viewless_in_inference)):
        original = getattr(utils, name, None)
        if original is not None:
            torch.compiler.substitute_in_graph(original)(stand_in)


class CompiledDecode:
    """`model`'s KV-cached forward, compiled with dynamic shapes: call with ([B, 1] tokens, [B, 1] positions,
    the static inference context) -> [B, 1, V] logits, as `model(...)` with `runtime_gather_output=True`.
    Every engine of the process shares the compiled function (and so its compiled graphs)."""

    def __init__(self, model: torch.nn.Module):
        global _compiled_forward
        if _compiled_forward is None:
            _register_polyfills()
            _compiled_forward = torch.compile(_forward, dynamic=True)
        self.model = model
        self.calls = 0  # forwards run through the compiled function (captures and eager steps)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, context) -> torch.Tensor:
        self.calls += 1
        return _compiled_forward(self.model, tokens, positions, context)
