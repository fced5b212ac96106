"""A megatron-core MoE `GPTModel` (tiny by default), built identically under every parallel layout.

The shape every model family of `vespo_megatron.models` maps onto: RMSNorm, SwiGLU experts, optional
QK-norm (Qwen3-MoE: on, Mixtral: off), GQA, RoPE, untied embeddings, no biases, softmax top-k router with
normalised top-k probabilities; `moe_layer_freq` mixes dense layers in. `vespo_megatron.models` builds
this config from a Hugging Face config.

Determinism across layouts: after megatron builds the local shards, `init_params_deterministic` overwrites
every matrix with a slice of a full tensor drawn from a generator seeded by (seed, global parameter name),
so the full (gathered) weights are bit-identical for every TP/SP/CP/EP/PP/DP layout. The same name and
partition bookkeeping (`param_layout`, `shard_of_full`, `full_from_shards`) is used to gather full
gradients in `vespo_megatron.testing.layouts`.

Shape legend: V vocab, h hidden, P size of the group a parameter is split over, s partition stride.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from vespo_megatron import patches
from vespo_megatron.compat import RouterReplay, transformer_engine_available, with_experts_module
from vespo_megatron.megatron.batched_experts import BatchedSequentialMLP
from vespo_megatron.megatron.cpu_shim import install_cpu_shim
from vespo_megatron.megatron.model_config import TinyMoEConfig
from vespo_megatron.megatron.norms import Norm
from vespo_megatron.megatron.parallel_setup import ParallelConfig, ParallelGroups
from vespo_megatron.megatron.reference_attention import ReferenceAttention
from vespo_megatron.megatron.small_batch_moe import SmallBatchMoELayer


def transformer_config(cfg: TinyMoEConfig, pcfg: ParallelConfig) -> TransformerConfig:
    """megatron's TransformerConfig for `cfg` under layout `pcfg` (CPU-safe choices where CUDA is absent)."""
    pcfg.validate_for_moe(cfg.num_experts)
    stages = pcfg.pp * (pcfg.vpp or 1)
    if cfg.num_layers % stages != 0:
        raise ValueError(f"TinyMoEConfig.num_layers: expected a multiple of pp x vpp = {stages} (even pipeline "
                         f"stages), got {cfg.num_layers}")
    on_cpu = not torch.cuda.is_available()
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.kv_channels,
        ffn_hidden_size=cfg.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.layernorm_epsilon,
        qk_layernorm=cfg.qk_layernorm,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_method_std,
        params_dtype=cfg.dtype,
        pipeline_dtype=cfg.dtype,
        bf16=cfg.dtype == torch.bfloat16,
        fp16=cfg.dtype == torch.float16,
        use_cpu_initialization=on_cpu,
        perform_initialization=True,
        tensor_model_parallel_size=pcfg.tp,
        sequence_parallel=pcfg.sp,
        context_parallel_size=pcfg.cp,
        expert_model_parallel_size=pcfg.ep,
        expert_tensor_parallel_size=pcfg.etp,
        pipeline_model_parallel_size=pcfg.pp,
        virtual_pipeline_model_parallel_size=pcfg.vpp,
        num_moe_experts=cfg.num_experts,
        moe_router_topk=cfg.moe_router_topk,
        moe_ffn_hidden_size=cfg.moe_ffn_hidden_size,
        moe_layer_freq=list(cfg.moe_pattern()),
        moe_router_score_function="softmax",
        moe_router_pre_softmax=False,  # softmax over the top-k = renormalised top-k probabilities (Qwen3-MoE, Mixtral)
        moe_router_load_balancing_type="aux_loss" if cfg.moe_aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=cfg.moe_aux_loss_coeff,
        moe_token_dispatcher_type="allgather" if on_cpu else "alltoall",
        moe_grouped_gemm=False,
        moe_router_fusion=False,  # the fused top-k path ignores routing replay
        moe_permute_fusion=False,
        moe_enable_routing_replay=cfg.moe_enable_routing_replay,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        batch_p2p_sync=not on_cpu,  # its torch.cuda.synchronize() has no CPU answer
        recompute_granularity="full" if cfg.recompute else None,
        recompute_method="uniform" if cfg.recompute else None,
        recompute_num_layers=1 if cfg.recompute else None,
        # Our losses return values ready for a SUM reduction; megatron's schedule must not rescale them.
        calculate_per_token_loss=True,
    )


AttentionBackend = Literal["auto", "te", "reference"]


def _local_layer_spec(num_experts: int | None, qk_layernorm: bool, batched_experts: bool = True) -> ModuleSpec:
    """megatron's local layer spec with our SP-capable norm and reference (CP, THD) attention; MoE layers'
    experts are `BatchedSequentialMLP` (all local experts in batched GEMMs) unless `batched_experts` is False
    (megatron's `SequentialMLP`, one expert at a time)."""
    spec = get_gpt_layer_local_spec(
        num_experts=num_experts, moe_grouped_gemm=False, qk_layernorm=qk_layernorm, normalization="RMSNorm"
    )
    layer = spec.submodules
    attn = layer.self_attention
    attn_sub = dataclasses.replace(
        attn.submodules,
        core_attention=ReferenceAttention,
        q_layernorm=Norm if qk_layernorm else attn.submodules.q_layernorm,
        k_layernorm=Norm if qk_layernorm else attn.submodules.k_layernorm,
    )
    layer = dataclasses.replace(
        layer,
        input_layernorm=Norm,
        pre_mlp_layernorm=Norm,
        self_attention=dataclasses.replace(attn, submodules=attn_sub),
    )
    if num_experts and batched_experts:
        layer = dataclasses.replace(layer, mlp=with_experts_module(layer.mlp, BatchedSequentialMLP, SmallBatchMoELayer))
    return dataclasses.replace(spec, submodules=layer)


def build_block_spec(
    config: TransformerConfig,
    attention_backend: AttentionBackend = "auto",
    pp_rank: int | None = None,
    vp_stage: int | None = None,
    batched_experts: bool = True,
) -> TransformerBlockSubmodules:
    """The decoder block spec of one pipeline stage.

    "te": megatron's transformer-engine spec (GPU). "reference": megatron's local spec with our `Norm` and
    `ReferenceAttention` (CPU, tests), its experts batched unless `batched_experts` is False (see
    `_local_layer_spec`). "auto": "te" when transformer-engine imports, else "reference".
    """
    if attention_backend not in ("auto", "te", "reference"):
        raise ValueError(f"attention_backend: expected 'auto', 'te' or 'reference', got {attention_backend!r}")
    use_te = attention_backend == "te" or (attention_backend == "auto" and transformer_engine_available())
    if use_te:
        return get_gpt_decoder_block_spec(
            config, use_transformer_engine=True, normalization="RMSNorm", vp_stage=vp_stage, pp_rank=pp_rank
        )
    dense = _local_layer_spec(None, config.qk_layernorm)
    moe = _local_layer_spec(config.num_moe_experts, config.qk_layernorm, batched_experts)
    specs = [moe if is_moe else dense for is_moe in config.moe_layer_freq]
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=specs[offset : offset + count], layer_norm=Norm)


def build_gpt_model(
    cfg: TinyMoEConfig,
    parallel_cfg: ParallelConfig,
    groups: ParallelGroups,
    *,
    attention_backend: AttentionBackend = "auto",
    vp_stage: int | None = None,
    clear_router_replay: bool = True,
) -> GPTModel:
    """Build this rank's `GPTModel` (pre/post process per pipeline stage) with layout-independent weights.

    Applies `vespo_megatron.patches` and, where CUDA is absent, the CPU shim. `clear_router_replay` drops
    megatron's class-level RouterReplay instances first, so this model's layers are the only ones registered.
    """
    patches.apply_all()
    install_cpu_shim()
    if clear_router_replay:
        RouterReplay.clear_global_router_replay_instances()
    config = transformer_config(cfg, parallel_cfg)
    pp_rank = groups.pp_rank
    vpp = parallel_cfg.vpp
    first = pp_rank == 0 and (vp_stage is None or vp_stage == 0)
    last = pp_rank == groups.pp_size - 1 and (vp_stage is None or vpp is None or vp_stage == vpp - 1)
    # megatron's RNG tracker (dropout/init forks); on CPU it tracks the CPU generator (cpu_shim item 2).
    tensor_parallel.model_parallel_cuda_manual_seed(
        cfg.seed,
        tp_rank=groups.tp_rank,
        ep_rank=groups.ep_rank,
        etp_rank=groups.expt_tp.rank(),
        force_reset_rng=True,
    )
    torch.manual_seed(cfg.seed)
    model = GPTModel(
        config=config,
        transformer_layer_spec=build_block_spec(config, attention_backend, pp_rank=pp_rank, vp_stage=vp_stage,
                                                batched_experts=cfg.batched_experts),
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.seq_length,
        pre_process=first,
        post_process=last,
        parallel_output=True,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=cfg.rotary_base,
        pg_collection=groups.pg_collection,
        vp_stage=vp_stage,
    )
    if not torch.cuda.is_available():
        model = model.to(cfg.dtype)
    else:
        model = model.cuda()
    init_params_deterministic(model, cfg, groups)
    mark_expert_params(model)
    if last:
        model.output_layer.__class__ = SkippableOutputLayer  # see output_layer_skipped
    return model


def mark_expert_params(model: torch.nn.Module) -> int:
    """Tag every routed-expert parameter `allreduce = False`; returns how many were changed.

    megatron-core's linear layers tag expert weights only when expert parallelism is on (EP > 1). With EP = 1
    and an expert-TP size different from TP (our CPU layouts: TP = 2 with SP, expert-TP = 1), every TP rank
    runs the whole experts on its own sequence shard, so their gradients must be summed over the expert-DP
    group, which contains the TP ranks. Untagged, megatron's DDP treats them as dense parameters, reduces
    them over data parallelism only, and the TP ranks' expert copies drift apart. Tagged, DDP reduces them
    over the expert-DP group (and the optimizer puts them in its expert group), which is also right when EP > 1.
    """
    changed = 0
    for name, param in model.named_parameters():
        if ".mlp.experts." in name and getattr(param, "allreduce", True):
            param.allreduce = False
            changed += 1
    return changed


# --- parameter layout: global names and partitions -------------------------------------------------------

_LAYER = re.compile(r"decoder\.layers\.(\d+)\.")
_EXPERT = re.compile(r"local_experts\.(\d+)\.")


@dataclass(frozen=True)
class ParamLayout:
    """Where one local parameter sits in the full model."""

    global_name: str
    full_shape: tuple[int, ...]
    partition_dim: int | None  # None: not split (replicated)
    stride: int
    group: torch.distributed.ProcessGroup | None  # the group it is split over
    is_expert: bool


def param_layout(model: GPTModel, groups: ParallelGroups) -> dict[str, ParamLayout]:
    """Local parameter name -> its `ParamLayout` (global layer/expert numbering, full shape, split)."""
    layer_numbers = {i: layer.layer_number - 1 for i, layer in enumerate(model.decoder.layers)}
    layouts = {}
    for name, param in model.named_parameters():
        global_name = _LAYER.sub(lambda m: f"decoder.layers.{layer_numbers[int(m.group(1))]}.", name)
        is_expert = ".local_experts." in name
        if is_expert:
            experts = _owning_experts(model, name)
            offset = groups.ep_rank * experts.num_local_experts
            global_name = _EXPERT.sub(lambda m, o=offset: f"local_experts.{int(m.group(1)) + o}.", global_name)
        group = groups.expt_tp if is_expert else groups.tp
        split = getattr(param, "tensor_model_parallel", False) and group.size() > 1
        dim = param.partition_dim if split else None
        stride = getattr(param, "partition_stride", 1) if split else 1
        shape = list(param.shape)
        if split:
            shape[dim] *= group.size()
        layouts[name] = ParamLayout(global_name, tuple(shape), dim, stride, group if split else None, is_expert)
    return layouts


def _owning_experts(model: GPTModel, name: str):
    prefix = name[: name.index(".local_experts.")]
    return model.get_submodule(prefix)


def shard_of_full(full: torch.Tensor, dim: int, stride: int, rank: int, size: int) -> torch.Tensor:
    """Megatron's split of a full tensor: `size*stride` chunks on `dim`, rank r keeps chunks r, r+size, ..."""
    chunks = full.chunk(size * stride, dim=dim)
    return torch.cat([chunks[rank + k * size] for k in range(stride)], dim=dim)


def full_from_shards(shards: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """Inverse of `shard_of_full` given every rank's shard in rank order."""
    size = len(shards)
    per_rank = [s.chunk(stride, dim=dim) for s in shards]
    ordered = [per_rank[c % size][c // size] for c in range(size * stride)]
    return torch.cat(ordered, dim=dim)


def _full_init(global_name: str, shape: tuple[int, ...], cfg: TinyMoEConfig, device=None) -> torch.Tensor:
    """The full tensor, from a generator on `device` (the same values for every layout on one device type;
    a GPU draws billions of numbers in milliseconds where the CPU takes seconds)."""
    gen = torch.Generator(device=device or "cpu")
    gen.manual_seed((cfg.seed * 1_000_003 + zlib.crc32(global_name.encode())) % 2**63)
    std = cfg.init_method_std
    if global_name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        std = std / (2.0 * cfg.num_layers) ** 0.5  # megatron's scaled init for output projections
    return torch.randn(shape, generator=gen, dtype=torch.float32, device=device) * std


@torch.no_grad()
def init_params_deterministic(model: GPTModel, cfg: TinyMoEConfig, groups: ParallelGroups) -> None:
    """Overwrite every matrix with its shard of a full tensor seeded by (cfg.seed, global name).

    Vectors (norm weights) keep their construction value (ones), which is layout independent already.
    """
    for name, layout in param_layout(model, groups).items():
        param = model.get_parameter(name)
        if param.dim() < 2:
            continue
        full = _full_init(layout.global_name, layout.full_shape, cfg, param.device)
        if layout.partition_dim is not None:
            g = layout.group
            full = shard_of_full(full, layout.partition_dim, layout.stride, g.rank(), g.size())
        param.copy_(full.to(param.dtype))


# --- the fused LM head: stop at the final hidden states -------------------------------------------------


@dataclass(frozen=True)
class LMHeadInput:
    """What the fused RL loss head needs from the last pipeline stage instead of logits.

    hidden: [b, s_local, h] the final (normed) hidden states as `GPTModel` returns them with its output layer
    skipped (s_local = s / tp under sequence parallelism; CP-local); weight: [V/tp, h] this rank's
    output-layer shard (the shared embedding under tied weights); sequence_parallel: the output layer's flag;
    tied: whether that weight is the shared embedding (it then has another gradient in the graph).
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    sequence_parallel: bool
    tied: bool = False


def unwrap_gpt(model: torch.nn.Module) -> GPTModel:
    """The `GPTModel` inside megatron's wrappers (DDP, Float16Module: each holds it as `.module`)."""
    inner = model
    while not isinstance(inner, GPTModel):
        if not hasattr(inner, "module"):
            raise ValueError(f"model: expected a GPTModel or a wrapper of one (.module), got {type(model).__name__}")
        inner = inner.module
    return inner


class SkippableOutputLayer(tensor_parallel.ColumnParallelLinear):
    """megatron's output layer, which can hand back its input instead of the logits (`emit_hidden`), so that
    the fused RL loss head computes the log-probs from the hidden states and this layer's weight without the
    [s, b, V/tp] logits. `build_gpt_model` gives the model's output layer this class; nothing else changes
    (same parameters, same checkpoint, same logits while `emit_hidden` is False)."""

    emit_hidden: bool = False

    def forward(self, input_, weight=None, runtime_gather_output=None, **kwargs):
        if self.emit_hidden:
            return input_, None
        return super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output, **kwargs)


@contextmanager
def output_layer_skipped(model: torch.nn.Module):
    """Within the context the model returns its final hidden states [b, s_local, h] instead of logits.

    Yields a function `head(output) -> LMHeadInput` for the model's output, or None on a pipeline stage without
    an output layer (it returns its hidden states anyway). megatron's `_postprocess` is kept (it only calls
    the output layer, then transposes [s, b, .] -> [b, s, .]); the output layer (`SkippableOutputLayer`) hands
    back its input while the context is open, so the weight stays a parameter of the model.
    """
    gpt = unwrap_gpt(model)
    if not gpt.post_process:
        yield None
        return
    if gpt.config.mtp_num_layers:
        raise ValueError(f"RLStepConfig.fused_lm_head: expected a model without multi-token prediction, got "
                         f"mtp_num_layers={gpt.config.mtp_num_layers}")
    layer = gpt.output_layer
    if not isinstance(layer, SkippableOutputLayer):
        raise ValueError("RLStepConfig.fused_lm_head: expected a model from build_gpt_model (its output layer can "
                         f"hand back the hidden states), got an output layer of type {type(layer).__name__}")
    weight = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else layer.weight
    sp = bool(layer.sequence_parallel)
    layer.emit_hidden = True
    try:
        yield lambda output: LMHeadInput(hidden=output, weight=weight, sequence_parallel=sp,
                                         tied=bool(gpt.share_embeddings_and_output_weights))
    finally:
        layer.emit_hidden = False


def _head_hidden(head: LMHeadInput, tp_group):
    """The TP-replicated hidden states the fused head multiplies, through megatron's own region functions with
    `tp_group`, exactly as `ColumnParallelLinear` does before its GEMM: with sequence parallelism an all-gather
    of the sequence (reduce-scatter of d hidden in backward), giving [s, b, h] (seq_major True); else the
    identity (all-reduce of d hidden in backward), [b, s, h]."""
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        gather_from_sequence_parallel_region,
    )

    tp = tp_group.size() if tp_group is not None else 1
    if head.sequence_parallel and tp > 1:
        return gather_from_sequence_parallel_region(head.hidden.transpose(0, 1), group=tp_group), True
    return (head.hidden if tp == 1 else copy_to_tensor_model_parallel_region(head.hidden, group=tp_group)), False


def lm_head_token_logprobs(head: LMHeadInput, labels: torch.Tensor, *, tp_group, temperature: float,
                           compute_entropy: bool, chunk_elements: int | None = None):
    """Per-token log-probs [b, s_local] (and entropy) through `fused_lm_head_logprobs` (`_head_hidden` says how
    the hidden states reach it under TP / SP)."""
    from vespo_megatron.parallel.fused_lm_head import fused_lm_head_logprobs
    from vespo_megatron.parallel.vocab_parallel import TokenLogProbs

    hidden, seq_major = _head_hidden(head, tp_group)
    targets = labels.transpose(0, 1) if seq_major else labels  # [s, b] under SP
    out = fused_lm_head_logprobs(hidden, head.weight, targets, tp_group=tp_group, temperature=temperature,
                                 compute_entropy=compute_entropy, chunk_elements=chunk_elements)
    if not seq_major:
        return out
    return TokenLogProbs(out.logprobs.transpose(0, 1), None if out.entropy is None else out.entropy.transpose(0, 1))


def _head_hidden_bsh(head: LMHeadInput, tp_group) -> torch.Tensor:
    """`_head_hidden` in the [b, s, h] order of the labels, whatever the layout: the single pass needs every
    sequence's tokens contiguous (under SP the gathered [s, b, h] states are transposed back: a copy of the
    states when b > 1, never of the logits)."""
    hidden, seq_major = _head_hidden(head, tp_group)
    return hidden.transpose(0, 1) if seq_major else hidden


def lm_head_loss(head: LMHeadInput, labels: torch.Tensor, chunk_loss, seq_tokens, *, tp_group, temperature: float,
                 compute_entropy: bool, chunk_elements: int | None = None,
                 whole_sequence_elements: int | None = None):
    """The single-pass head (`fused_lm_head_loss`): the loss of chunks of whole sequences with its gradients
    formed while each chunk's logits are alive. Tokens go in the [b, s] order of `labels` (`_head_hidden_bsh`);
    `seq_tokens` counts each sequence's tokens in that order. Returns `HeadLossOutput` with log-probs /
    entropies shaped [b, s]."""
    from vespo_megatron.parallel.fused_lm_head_loss import fused_lm_head_loss

    return fused_lm_head_loss(_head_hidden_bsh(head, tp_group), head.weight, labels, chunk_loss,
                              seq_tokens=seq_tokens, tp_group=tp_group, temperature=temperature,
                              compute_entropy=compute_entropy, chunk_elements=chunk_elements,
                              into_main_grad=not head.tied, whole_sequence_elements=whole_sequence_elements)


def lm_head_chunked_logprobs(head: LMHeadInput, labels: torch.Tensor, seq_tokens, *, tp_group, temperature: float,
                             compute_entropy: bool, chunk_elements: int | None = None,
                             whole_sequence_elements: int | None = None):
    """The forward-only pass of the single-pass head (`fused_lm_head_chunked_logprobs`): per-token log-probs
    [b, s] (and entropies) from the same chunks of whole sequences, GEMMs and kernels as `lm_head_loss` with the
    same arguments, so bitwise its log-probs (the old-log-prob pass of a run training with it). The hidden states
    reach it exactly as they reach `lm_head_loss` (`_head_hidden_bsh`); nothing is stored for backward."""
    from vespo_megatron.parallel.fused_lm_head_loss import fused_lm_head_chunked_logprobs

    with torch.no_grad():  # the region functions and the [b, s, h] copy record nothing for autograd either
        return fused_lm_head_chunked_logprobs(_head_hidden_bsh(head, tp_group), head.weight, labels,
                                              seq_tokens=seq_tokens, tp_group=tp_group, temperature=temperature,
                                              compute_entropy=compute_entropy, chunk_elements=chunk_elements,
                                              whole_sequence_elements=whole_sequence_elements)
