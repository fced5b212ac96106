"""RMSNorm / LayerNorm for megatron layer specs that also works with sequence parallelism.

megatron's torch fallback (`WrappedTorchNorm`) asserts `not config.sequence_parallel`; transformer-engine's
norm is GPU-only. Under sequence parallelism each TP rank normalises a different shard of the tokens, so the
norm weight's gradient is partial per rank: we tag it `sequence_parallel = True`, which is the attribute
megatron's `finalize_model_grads` (and `vespo_megatron.testing.layouts.finalize_grads`) use to all-reduce it
over the TP group. QK-norm weights are reduced by name (`q_layernorm`/`k_layernorm`) in the same place.

Constructor signature follows megatron's norm builders: `(config, hidden_size, eps, ...)`.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class Norm(torch.nn.Module):
    """RMSNorm (Qwen3) or LayerNorm, chosen by `config.normalization`; computed in fp32, no bias for RMS."""

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,  # accepted for megatron's builders; no effect
        zero_centered_gamma: bool = False,
        normalization: str | None = None,
    ):
        super().__init__()
        self.normalization = normalization or config.normalization
        if self.normalization not in ("RMSNorm", "LayerNorm"):
            raise ValueError(f"normalization: expected 'RMSNorm' or 'LayerNorm', got {self.normalization!r}")
        if zero_centered_gamma or config.layernorm_zero_centered_gamma:
            raise ValueError("layernorm_zero_centered_gamma: expected False, got True")
        self.eps = eps
        device = None if torch.cuda.is_available() and not config.use_cpu_initialization else "cpu"
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype, device=device))
        self.bias = None
        if self.normalization == "LayerNorm":
            self.bias = torch.nn.Parameter(
                torch.zeros(hidden_size, dtype=config.params_dtype, device=device)
            )
        for p in self.parameters():
            p.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if self.normalization == "RMSNorm":
            # x * rsqrt(mean(x^2) + eps) * weight: torch's rms_norm is that composite on CPU (bitwise the same)
            # and one fused kernel on CUDA, where a decode step runs four norms per layer (launch bound)
            y = torch.nn.functional.rms_norm(xf, xf.shape[-1:], self.weight.float(), self.eps)
        else:
            y = torch.nn.functional.layer_norm(
                xf, xf.shape[-1:], self.weight.float(), self.bias.float(), self.eps
            )
        return y.to(x.dtype)
