"""Make megatron-core's forward/backward path run on a CPU-only torch (tests, CI, small runs).

`install_cpu_shim()` does nothing when `torch.cuda.is_available()`; otherwise it installs the items below,
once (idempotent). Each item is a place where megatron-core 0.16 calls CUDA unconditionally; on a CPU-only
process "the device" is the CPU, so each gets the CPU equivalent:

1. `torch.cuda.current_device` -> `torch.device("cpu")`. Used as `device=` for buffers and tensors in
   RoPE (models/common/embeddings/rotary_pos_embedding.py), the router (transformer/moe/router.py),
   sequence-parallel gathers (tensor_parallel/mappings.py), linear layers (tensor_parallel/layers.py),
   pipeline p2p buffers (pipeline_parallel/p2p_communication.py) and others.
2. RNG tracker (tensor_parallel/random.py): `model_parallel_cuda_manual_seed` and
   `CudaRNGStatesTracker.add/fork` read and write the CUDA generator through `torch.cuda.manual_seed`,
   `torch.cuda.get_rng_state` and the module's `_get_cuda_rng_state` / `_set_cuda_rng_state`; they are
   pointed at the CPU default generator.
3. The default causal mask of megatron's own `DotProductAttention` (fusions/fused_softmax.py imports
   `get_default_causal_mask` from transformer/utils.py, which builds it with `device="cuda"`): replaced by
   the same mask on CPU. Only reached when a spec uses megatron's attention with `attention_mask=None`.
4. `get_pos_emb_on_this_cp_rank` (models/common/embeddings/rope_utils.py, imported by name into
   rotary_pos_embedding.py): slices RoPE for context parallelism with a pinned-memory tensor moved by
   `.cuda()`; replaced by the same zigzag slice on CPU.

5. Literal `device="cuda"` in factory calls, e.g. `torch.zeros([], device="cuda")` for the token count in
   every schedule of pipeline_parallel/schedules.py (`forward_backward_no_pipelining`, the 1F1B and
   interleaved schedules). These cannot be redirected by name, so `cpu_device_context()` is a
   `TorchFunctionMode` that rewrites a CUDA `device=` argument to the CPU while it is entered; wrap the
   `get_forward_backward_func()(...)` call in it. It is a null context when CUDA exists.

Not needed on our path (configured away instead): `torch.cuda.synchronize` after batched p2p (set
`batch_p2p_sync=False`), CUDA streams of the alltoall dispatcher (use `allgather`), fused kernels
(fusion flags off), megatron's gradient clipping and distributed optimizer (CUDA tensor-type asserts).

Nothing here is active when CUDA exists, and no megatron source file is changed.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.overrides import TorchFunctionMode

_INSTALLED = False


def _cpu_device() -> torch.device:
    return torch.device("cpu")


def _cpu_get_rng_state(device=None, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device=None, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


@functools.lru_cache
def _cpu_default_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq), diagonal=1).bool()


def _cpu_pos_emb_on_this_cp_rank(pos_emb: torch.Tensor, seq_dim: int, cp_group) -> torch.Tensor:
    from vespo_megatron.parallel.cp_split import zigzag_indices

    if cp_group is None:
        raise ValueError("cp_group must be provided to get positional embedding per CP rank")
    index = zigzag_indices(pos_emb.size(seq_dim), cp_group.size(), cp_group.rank())
    return pos_emb.index_select(seq_dim, index.to(pos_emb.device))


def install_cpu_shim() -> bool:
    """Install the CPU answers (see module docstring). Returns whether it is active in this process."""
    global _INSTALLED
    if torch.cuda.is_available():
        return False
    if _INSTALLED:
        return True
    from megatron.core.fusions import fused_softmax
    from megatron.core.models.common.embeddings import rope_utils, rotary_pos_embedding
    from megatron.core.tensor_parallel import random as mcore_random

    torch.cuda.current_device = _cpu_device  # item 1
    torch.cuda.manual_seed = torch.manual_seed  # item 2
    torch.cuda.get_rng_state = _cpu_get_rng_state
    mcore_random._get_cuda_rng_state = _cpu_get_rng_state
    mcore_random._set_cuda_rng_state = _cpu_set_rng_state
    fused_softmax.get_default_causal_mask = _cpu_default_causal_mask  # item 3
    rope_utils.get_pos_emb_on_this_cp_rank = _cpu_pos_emb_on_this_cp_rank  # item 4
    rotary_pos_embedding.get_pos_emb_on_this_cp_rank = _cpu_pos_emb_on_this_cp_rank
    _INSTALLED = True
    return True


def _is_cuda_device(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaToCpu(TorchFunctionMode):
    """Rewrite `device="cuda"` (or a CUDA torch.device) keyword arguments to the CPU (item 5)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_cuda_device(kwargs.get("device")):
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


def cpu_device_context() -> contextlib.AbstractContextManager:
    """Context in which literal CUDA devices in factory calls mean the CPU; a null context with CUDA."""
    if torch.cuda.is_available():
        return contextlib.nullcontext()
    return _CudaToCpu()
