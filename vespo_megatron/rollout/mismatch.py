"""A production-like train/inference mismatch for the embedded engine: fp8 GEMMs and router-logit noise.

Real rollout engines differ from the trainer in more than bf16: they run the expert and attention GEMMs in
fp8 (e4m3, per-tensor or per-row scales) and their router logits differ by kernel noise, so some tokens
flip experts. `engine_mismatch(model, fp8=..., router_noise=..., seed=...)` injects both, for the engine's
forward only: it is a context manager that

  - fake-quantises (quantise to `torch.float8_e4m3fn`, dequantise) the weights of every attention GEMM
    (`linear_qkv`, `linear_proj`) and routed-expert GEMM (`.mlp.experts.` `linear_fc1`, `linear_fc2`) in
    place, and restores the saved originals bit for bit on exit (the trainer never sees them);
  - fake-quantises the inputs of the same GEMMs (forward pre-hooks, removed on exit): an fp8 GEMM quantises
    both operands. Under transformer-engine `linear_qkv` fuses the input norm, so its hook sees the pre-norm
    input (per-row scales commute with the RMS division; the norm's gain is the only difference). The batched
    experts (`megatron.batched_experts`) apply the hook's `batched` form to all experts' inputs at once, with
    each expert's own per-tensor scale, so the knob quantises the same numbers on either experts module;
  - adds N(0, router_noise^2) to every router's logits (its `gating` output), from a generator seeded by
    (seed, global layer number): reproducible per `generate` call.

Scales: per_tensor = one amax over the (local) tensor; per_row = one amax per row of the last dim (per output
channel for weights [out, in], per token for activations [s, b, h]). Scales follow the local shard, as a
tensor-parallel engine's do, so under TP the injected error depends on the layout (routers, embeddings,
norms and the output layer stay in full precision, as in production fp8 recipes).

`mismatch_stats` reports KL k3 of (engine || trainer) over sampled tokens and the per-layer routing flip
rate (share of tokens whose top-k expert set differs).

Shape legend: [out, in] a weight; [..., h] activations (rows = tokens); [T] tokens; [T, L, K] top-k expert
ids per token and MoE layer.
"""

from __future__ import annotations

import contextlib
import re
import zlib

import torch

__all__ = ["FP8_MODES", "E4M3_MAX", "fp8_fake_quant", "engine_mismatch", "kl_k3", "routing_flip_rate"]

FP8_MODES = ("off", "per_tensor", "per_row")
E4M3_MAX = 448.0  # largest finite float8_e4m3fn
_GEMM = re.compile(r"(self_attention\.linear_(qkv|proj)|\.mlp\.experts\..*linear_fc[12])$")
_WEIGHT = re.compile(r"^weight\d*$")


def fp8_fake_quant(x: torch.Tensor, mode: str, batch_dims: int = 0) -> torch.Tensor:
    """x -> dequant(quant_e4m3(x / scale)) * scale, scale = amax / 448 per tensor or per row (last dim).
    batch_dims: per_tensor takes one amax per index of x's first `batch_dims` dims (x [E, C, in]: one scale per
    expert, as each expert's own GEMM has). Returns x's dtype and shape; all-zero rows stay zero."""
    if mode == "off" or x.numel() == 0:  # an expert that got no tokens
        return x
    if mode not in FP8_MODES:
        raise ValueError(f"fp8: expected one of {FP8_MODES}, got {mode!r}")
    xf = x.float()
    if mode == "per_row":
        amax = xf.abs().amax(dim=-1, keepdim=True)
    elif batch_dims:
        amax = xf.abs().flatten(batch_dims).amax(-1)
        amax = amax.reshape(*amax.shape, *[1] * (xf.dim() - batch_dims))
    else:
        amax = xf.abs().amax()
    scale = (amax / E4M3_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    q = (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * scale
    return q.to(x.dtype)


def _gemm_modules(model: torch.nn.Module):
    for name, module in model.named_modules():
        if _GEMM.search(name):
            yield name, module


class _QuantInput:
    """Forward pre-hook: fake-quantise the GEMM's input. `batched(x)` does the same for the padded per-expert
    inputs [E, C, in] of `BatchedSequentialMLP` (which never calls the experts' linear modules): one per-tensor
    scale per expert; its zero padding rows raise no amax and stay zero."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, module, args):
        return (fp8_fake_quant(args[0], self.mode), *args[1:])

    def batched(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_fake_quant(x, self.mode, batch_dims=1)


@contextlib.contextmanager
def engine_mismatch(model: torch.nn.Module, *, fp8: str = "off", router_noise: float = 0.0, seed: int = 0):
    """Inject fp8 GEMMs and/or router-logit noise into `model`'s forward while entered (see module doc)."""
    if fp8 not in FP8_MODES:
        raise ValueError(f"fp8: expected one of {FP8_MODES}, got {fp8!r}")
    if router_noise < 0:
        raise ValueError(f"router_noise: expected >= 0, got {router_noise}")
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = []
    routers = []
    try:
        if fp8 != "off":
            with torch.no_grad():
                quant_input = _QuantInput(fp8)  # one hook object for all: batched experts check they agree
                for _, module in _gemm_modules(model):
                    for pname, param in module.named_parameters(recurse=False):
                        if _WEIGHT.match(pname) and param.dim() == 2:
                            saved.append((param, param.detach().clone()))
                            param.copy_(fp8_fake_quant(param.detach(), fp8))
                    hooks.append(module.register_forward_pre_hook(quant_input))
        if router_noise > 0:
            for name, module in model.named_modules():
                if name.endswith(".mlp.router") and hasattr(module, "gating"):
                    layer = getattr(module, "layer_number", None) or zlib.crc32(name.encode())
                    gen = torch.Generator(device=module.weight.device)
                    gen.manual_seed((seed * 1_000_003 + int(layer)) % 2**63)
                    original = module.gating

                    def noisy(x, original=original, gen=gen):
                        logits = original(x)
                        noise = torch.randn(logits.shape, generator=gen, device=logits.device, dtype=torch.float32)
                        return logits + (router_noise * noise).to(logits.dtype)

                    module.gating = noisy  # instance attribute shadows the method; deleted on exit
                    routers.append(module)
        yield
    finally:
        for h in hooks:
            h.remove()
        for module in routers:
            del module.gating
        with torch.no_grad():
            for param, original in saved:
                param.copy_(original)


def kl_k3(train_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """KL(engine || trainer) estimated on engine-sampled tokens: mean (e^d - d - 1), d = log pi - log mu.
    [T] each (float64 inside)."""
    d = train_logp.double() - engine_logp.double()
    k3 = torch.expm1(d) - d
    if mask is not None:
        k3 = k3[mask.bool()]
    return float(k3.mean()) if k3.numel() else 0.0


def routing_flip_rate(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[T, L, K] top-k expert ids twice -> [L] share of tokens whose expert *set* differs per layer."""
    if a.shape != b.shape:
        raise ValueError(f"routing shapes: expected equal, got {tuple(a.shape)} and {tuple(b.shape)}")
    differ = (a.sort(dim=-1).values != b.sort(dim=-1).values).any(dim=-1)  # [T, L]
    return differ.double().mean(dim=0)
