"""megatron-core's grad-norm and grad-scale fallbacks without a device sync per parameter.

Upstream: megatron-core 0.16.x-0.19.x and main (read: 0.16.1, 0.19.0, main of 2026-08). Without transformer-
engine and apex, `megatron/core/optimizer/clip_grads.py` and `optimizer.py` fall back to
`megatron.core.utils.local_multi_tensor_l2_norm` / `local_multi_tensor_scale`. The norm builds
`torch.tensor([[torch.norm(g) for g in grads]])`: every 0-dim device tensor goes to the host on its own, one
device sync per parameter tensor (95 for the testbed's 4-layer MoE) on every optimizer step, then one more for
the result; the scale launches a multiply and a copy per tensor. The testbed's N = 64 runs make 64 optimizer
steps per rollout batch, each host bound (docs/results/testbed/README.md), so these per-step costs add up.

The replacements compute the same numbers with foreach kernels: the per-tensor norms with `torch._foreach_norm`,
gathered to the host in one copy and reduced there with the same `torch.norm` as the original (so the result is
the original's whenever the per-tensor norms are: always on CPU, where foreach is the per-tensor loop; on CUDA the
foreach kernel may round a norm differently in the last bit); the scale with `torch._foreach_mul_` in place (the
clipping case, `[grads, grads]`) or `_foreach_mul` + `_foreach_copy_`: bitwise `dst.copy_(src * scale)`. The
result lives on the gradients' device (the original hard-codes "cuda").

Applies to each module attribute that holds the local fallback (transformer-engine or apex installed: no-op);
`apply()` is idempotent. Called through `vespo_megatron.patches.apply_all()`.
"""

from __future__ import annotations

import importlib

import torch

TARGET = "megatron-core"
TARGET_VERSIONS = ">=0.16.1"  # not fixed upstream as of main 2026-08
# (module, attribute, name of the megatron.core.utils fallback it holds when TE and apex are absent)
SITES = (
    ("megatron.core.optimizer.clip_grads", "l2_norm_impl", "local_multi_tensor_l2_norm"),
    ("megatron.core.optimizer.clip_grads", "multi_tensor_scale_impl", "local_multi_tensor_scale"),
    ("megatron.core.optimizer.optimizer", "multi_tensor_scale_impl", "local_multi_tensor_scale"),
)


def foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for `local_multi_tensor_l2_norm`: ([1] float32 L2 norm of every tensor of every list, None)."""
    tensors = [t for tensor_list in tensor_lists for t in tensor_list]
    if not tensors:
        return torch.zeros(1, dtype=torch.float, device=noop_flag.device), None
    norms = torch._foreach_norm(tensors)
    if len({n.dtype for n in norms}) > 1:  # the original turns each norm into a Python float: float32 here
        norms = [n.float() for n in norms]
    per_norm = torch.stack(norms).reshape(1, -1).to("cpu", torch.float)  # one copy to the host, not one per tensor
    reduced = torch.norm(per_norm)  # the original's host-side reduction
    return torch.tensor([float(reduced)], dtype=torch.float, device=tensors[0].device), None


def foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """Drop-in for `local_multi_tensor_scale`: dst = src * scale for every pair of the two lists."""
    src, dst = list(tensor_lists[0]), list(tensor_lists[1])
    if len(src) != len(dst):
        raise ValueError(f"multi_tensor_scale: expected as many destinations as sources, got {len(dst)} and {len(src)}")
    if not src:
        return
    if all(s is d for s, d in zip(src, dst, strict=True)):
        torch._foreach_mul_(dst, scale)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


_REPLACEMENT = {"local_multi_tensor_l2_norm": foreach_l2_norm, "local_multi_tensor_scale": foreach_scale}


def _pending() -> list[tuple[object, str, str]]:
    """(module, attribute, fallback name) for each site that holds megatron's local fallback now."""
    try:
        utils = importlib.import_module("megatron.core.utils")
    except ImportError:
        return []
    out = []
    for module_name, attribute, fallback in SITES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if getattr(module, attribute, None) is getattr(utils, fallback, object()):
            out.append((module, attribute, fallback))
    return out


def needed() -> bool:
    """Whether some optimizer module still uses megatron's per-tensor fallback."""
    return bool(_pending())


def apply() -> bool:
    """Point every site that uses a local fallback at its foreach version. Idempotent; returns whether anything
    changed."""
    pending = _pending()
    for module, attribute, fallback in pending:
        setattr(module, attribute, _REPLACEMENT[fallback])
    return bool(pending)
