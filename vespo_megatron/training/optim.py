"""megatron-core's DDP wrapper and optimizer for the policy, and one optimizer step with gradient clipping.

On CUDA the step is megatron's own (`optimizer.step()`: grad norm over all model-parallel groups, clipping,
update). megatron's clipping asserts CUDA tensor types, so on a CPU-only torch the optimizer is built with
`clip_grad=0` and `clip_and_step` applies the same clipping between megatron's `prepare_grads`,
`get_grad_norm` (which works on CPU) and `step_with_ready_grads`.
"""

from __future__ import annotations

import torch

from vespo_megatron.megatron.cpu_shim import cpu_device_context
from vespo_megatron.megatron.step import install_rl_grad_finalizer

__all__ = ["wrap_ddp_and_optimizer", "clip_and_step"]


def wrap_ddp_and_optimizer(model, *, lr: float, weight_decay: float, clip_grad: float, pg_collection=None,
                           distributed_optimizer: bool = False):
    """(DDP-wrapped model, megatron optimizer). Gradients are summed over DP x CP (the loss is globally
    normalised upstream; see `install_rl_grad_finalizer`). bf16 parameters get fp32 main weights in the
    optimizer; `distributed_optimizer` shards those and Adam's moments over the data-parallel ranks."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    install_rl_grad_finalizer(model.config, pg_collection)
    on_cuda = torch.cuda.is_available()
    if not on_cuda and (model.config.bf16 or distributed_optimizer):
        # megatron's mixed-precision and distributed optimizers accept CUDA tensors only
        raise ValueError("params dtype bf16 / distributed_optimizer: expected a CUDA device (megatron's "
                         f"Float16 and distributed optimizers), got bf16={model.config.bf16}, "
                         f"distributed_optimizer={distributed_optimizer} on a CPU-only torch")
    with cpu_device_context():
        ddp = DistributedDataParallel(
            model.config,
            DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                          use_distributed_optimizer=distributed_optimizer),
            model,
        )
        opt = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=lr, weight_decay=weight_decay, adam_beta1=0.9, adam_beta2=0.98,
                            clip_grad=clip_grad if on_cuda else 0.0, bf16=model.config.bf16, fp16=False,
                            use_distributed_optimizer=distributed_optimizer),
            [ddp],
        )
    return ddp, opt


@torch.no_grad()
def clip_and_step(optimizer, clip_grad: float) -> tuple[bool, float]:
    """One update; returns (updated, grad norm before clipping)."""
    if torch.cuda.is_available():
        updated, grad_norm, _ = optimizer.step()
        return bool(updated), float(grad_norm) if grad_norm is not None else float("nan")
    with cpu_device_context():  # get_grad_norm_fp32 allocates a buffer with device="cuda"
        if optimizer.prepare_grads():  # found inf/nan (only with loss scaling)
            return False, float("nan")
        grad_norm = float(optimizer.get_grad_norm())
        if clip_grad > 0 and grad_norm > clip_grad:
            coeff = clip_grad / (grad_norm + 1e-6)
            for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
                for p in sub.get_parameters():
                    if p.grad is not None:
                        p.grad.mul_(coeff)
        return bool(optimizer.step_with_ready_grads()), grad_norm
