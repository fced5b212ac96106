"""Per-GPU memory plan of a MoE training run (Qwen3-MoE, Mixtral, ...) for one megatron-core parallel layout.

Why: a Qwen3-30B-A3B-class RL run fails with an out-of-memory error minutes after it is launched on a
cluster, after the model is built and the rollouts are generated. This module answers "how many GPUs and
which TP/EP/PP/CP layout" before the launch, from the Hugging Face config alone (no torch, no megatron): the
config's model family (`vespo_megatron.models`) turns it into a `ModelShape`, counted here.

What it counts, per GPU (one rank of one pipeline stage; every stage is planned and the worst is reported):

* parameters: embedding (first stage) and output layer (last stage), split over TP; attention split over TP;
  norms and the router replicated over TP; experts split over EP (whole experts) and expert-TP (columns);
  dense MLP layers (``ModelShape.dense_layers``) split over TP; layers split evenly over PP stages;
* static memory: weights (2 B/param bf16, 4 B fp32), fp32 main gradients (4 B/param: megatron's DDP with
  ``grad_reduce_in_fp32`` / megatron-lm's ``--accumulate-allreduce-grads-in-fp32``), Adam state (bf16
  params: fp32 master weights + m + v = 12 B/param; fp32 params: m + v = 8 B/param), sharded by the
  distributed optimizer over the dense data-parallel group (DP x CP, ``dp_cp``) for dense parameters and
  over the expert-data-parallel group (world / (etp * ep * pp)) for expert parameters;
* activations of one micro-batch (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models", arXiv:2205.05198, section 4, adapted to GQA, QK-norm, SwiGLU, no dropout, flash
  attention and top-k MoE), with and without full activation recomputation, times the micro-batches a
  1F1B pipeline stage holds in flight, plus the logits of the loss on the last stage;
* RL extras: routing-replay top-k ids and the per-token log-prob / batch tensors.

Not counted (covered by the headroom fraction): the CUDA context and allocator fragmentation, NCCL and
communication buffers (all-gather / all-to-all / grad buckets), transient GEMM workspaces, the rollout
engine (SGLang needs its own memory or offloading when colocated).

Units: bytes and parameter counts are ints; GiB = 2**30 bytes.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Literal

from vespo_megatron.base.validation import ConfigError
from vespo_megatron.models import PRESETS as MODEL_PRESETS
from vespo_megatron.models import ModelShape
from vespo_megatron.parallel.head_chunk_plan import (
    DEFAULT_SINGLE_PASS_CHUNK_ELEMENTS,
    default_whole_sequence_elements,
)

__all__ = [
    "PRESETS", "GIB", "ModelShape", "Layout", "RunSetup", "ParamCounts", "RankParams", "StageMemory",
    "MemoryPlan", "count_params", "rank_params", "stage_layers", "check_layout", "plan_memory",
    "search_layouts", "minimal_gpus",
]

GIB = 1 << 30
# Our chunked log-prob path (vespo_megatron.parallel.vocab_parallel) upcasts about this many logits
# elements at a time to fp32.
LOGPROB_CHUNK_ELEMENTS = 1 << 25
# Per token of a micro-batch on the GPU (RLMicroBatch): tokens, position_ids, labels, token_seq,
# token_index int64 (5 x 8 B), loss_mask bool (1 B), old_logp and rollout_logp fp32 (2 x 4 B).
BATCH_BYTES_PER_TOKEN = 5 * 8 + 1 + 2 * 4
# Per token of the loss: new log-prob, entropy, and the log-prob path's fp32 statistics (max, sum-exp,
# target logit, entropy sum, log-sum-exp) plus the per-token loss and its gradient.
LOSS_BYTES_PER_TOKEN = 9 * 4


def _int_at_least(cls: str, name: str, value: object, low: int) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
        raise ConfigError(cls, name, f"an int >= {low}", value)


# Published configs of every registered model family ("qwen3-30b-a3b", "mixtral-8x7b", ...).
PRESETS: dict[str, ModelShape] = {name: ModelShape.from_hf_config(cfg) for name, cfg in MODEL_PRESETS.items()}


# --- parameter counts ----------------------------------------------------------------------------------


def _attention_params(m: ModelShape) -> int:
    """q, k, v, o projections (+ biases): h*(d_q + 2 d_kv) + d_q*h."""
    d_q, d_kv = m.num_attention_heads * m.kv_channels, m.num_key_value_heads * m.kv_channels
    bias = (d_q + 2 * d_kv + m.hidden_size) if m.attention_bias else 0
    return m.hidden_size * (d_q + 2 * d_kv) + d_q * m.hidden_size + bias


def _layer_norm_params(m: ModelShape) -> int:
    """input and post-attention RMSNorm (h each), q_norm and k_norm (head_dim each)."""
    return 2 * m.hidden_size + (2 * m.kv_channels if m.qk_norm else 0)


def _expert_params(m: ModelShape) -> int:
    """One SwiGLU expert: gate and up [I, h], down [h, I]."""
    return 3 * m.hidden_size * m.moe_intermediate_size


@dataclass(frozen=True)
class ParamCounts:
    """Whole-model parameter counts (tied embeddings counted once)."""

    embedding: int
    output_layer: int  # 0 when tied
    attention: int  # all layers, projections (+ biases)
    norms: int  # all layers' norms + the final norm
    router: int
    experts: int
    dense_mlp: int
    active_experts: int  # top-k experts per MoE layer
    total: int
    active: int  # parameters touched by one token: everything but the unrouted experts
    non_embedding: int  # total without the embedding and output layer (Hugging Face's "non-embedding")


def count_params(m: ModelShape) -> ParamCounts:
    moe = m.moe_layers()
    n_moe, n_dense = sum(moe), len(moe) - sum(moe)
    embedding = m.vocab_size * m.hidden_size
    output = 0 if m.tie_word_embeddings else embedding
    attention = m.num_hidden_layers * _attention_params(m)
    norms = m.num_hidden_layers * _layer_norm_params(m) + m.hidden_size
    router = n_moe * m.num_experts * m.hidden_size
    experts = n_moe * m.num_experts * _expert_params(m)
    active_experts = n_moe * m.num_experts_per_tok * _expert_params(m)
    dense_mlp = n_dense * 3 * m.hidden_size * m.intermediate_size
    total = embedding + output + attention + norms + router + experts + dense_mlp
    return ParamCounts(embedding=embedding, output_layer=output, attention=attention, norms=norms, router=router,
                       experts=experts, dense_mlp=dense_mlp, active_experts=active_experts, total=total,
                       active=total - experts + active_experts, non_embedding=total - embedding - output)


# --- layout --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Layout:
    """megatron-core layout sizes; world = tp * cp * pp * dp. Sequence parallelism is assumed on whenever
    tp > 1 (megatron requires it for MoE with TP). The expert layout is etp x ep x expert-dp x pp."""

    tp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int = 1
    pp: int = 1
    dp: int = 1

    def __post_init__(self):
        for name in ("tp", "cp", "ep", "etp", "pp", "dp"):
            _int_at_least("Layout", name, getattr(self, name), 1)
        expert_block = self.etp * self.ep * self.pp
        if self.world % expert_block:
            raise ConfigError("Layout", "world", f"a multiple of etp*ep*pp={expert_block} (world = tp*cp*pp*dp)",
                       self.world)

    @classmethod
    def from_gpus(cls, gpus: int, *, tp: int = 1, cp: int = 1, ep: int = 1, etp: int = 1, pp: int = 1) -> Layout:
        for name, value in (("gpus", gpus), ("tp", tp), ("cp", cp), ("ep", ep), ("etp", etp), ("pp", pp)):
            _int_at_least("Layout", name, value, 1)
        if gpus % (tp * cp * pp):
            raise ConfigError("Layout", "gpus", f"a multiple of tp*cp*pp={tp * cp * pp}", gpus)
        if gpus % (etp * ep * pp):
            raise ConfigError("Layout", "gpus", f"a multiple of etp*ep*pp={etp * ep * pp}", gpus)
        return cls(tp=tp, cp=cp, ep=ep, etp=etp, pp=pp, dp=gpus // (tp * cp * pp))

    @property
    def world(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    @property
    def dp_cp(self) -> int:
        """megatron's dense data-parallel group with CP ranks (``dp_cp``): dense grads and optimizer shards."""
        return self.dp * self.cp

    @property
    def expert_dp(self) -> int:
        """megatron's expert-data-parallel group: expert grads and optimizer shards."""
        return self.world // (self.etp * self.ep * self.pp)

    @property
    def sp(self) -> bool:
        return self.tp > 1

    def name(self) -> str:
        return f"TP{self.tp} CP{self.cp} EP{self.ep} ETP{self.etp} PP{self.pp} DP{self.dp}"


def check_layout(m: ModelShape, lay: Layout) -> None:
    """Raise ValueError (field, expected, actual) if megatron-core cannot build `m` under `lay`."""
    need = [
        (m.num_attention_heads % lay.tp == 0, "num_attention_heads", f"a multiple of tp={lay.tp}",
         m.num_attention_heads),
        # megatron splits the query groups over TP (divide(num_query_groups, tp)): no KV-head replication.
        (m.num_key_value_heads % lay.tp == 0, "num_key_value_heads", f"a multiple of tp={lay.tp}",
         m.num_key_value_heads),
        # VocabParallelEmbedding / the output layer split the vocab evenly (our builder does not pad it).
        (m.vocab_size % lay.tp == 0, "vocab_size", f"a multiple of tp={lay.tp}", m.vocab_size),
        (m.num_hidden_layers % lay.pp == 0, "num_hidden_layers", f"a multiple of pp={lay.pp} (even stages)",
         m.num_hidden_layers),
    ]
    if any(not x for x in m.moe_layers()):
        need.append((m.intermediate_size % lay.tp == 0, "intermediate_size", f"a multiple of tp={lay.tp}",
                     m.intermediate_size))
    if m.num_experts > 0:
        need += [
            (m.num_experts % lay.ep == 0, "num_experts", f"a multiple of ep={lay.ep}", m.num_experts),
            (m.moe_intermediate_size % lay.etp == 0, "moe_intermediate_size", f"a multiple of etp={lay.etp}",
             m.moe_intermediate_size),
        ]
    else:
        need.append((lay.ep == 1 and lay.etp == 1, "ep", "ep=1 and etp=1 for a model without experts",
                     (lay.ep, lay.etp)))
    for ok, name, expected, got in need:
        if not ok:
            raise ConfigError("ModelShape", name, expected, got)


def stage_layers(m: ModelShape, pp: int, stage: int) -> range:
    """Layer indices of pipeline stage `stage` (even split, megatron's default)."""
    if m.num_hidden_layers % pp:
        raise ConfigError("ModelShape", "num_hidden_layers", f"a multiple of pp={pp}", m.num_hidden_layers)
    if not 0 <= stage < pp:
        raise ConfigError("stage_layers", "stage", f"in [0, {pp})", stage)
    per = m.num_hidden_layers // pp
    return range(stage * per, (stage + 1) * per)


@dataclass(frozen=True)
class RankParams:
    """Parameters held by one rank of one pipeline stage."""

    dense: int  # everything that is not a routed expert (router included): reduced over dp_cp
    expert: int  # routed-expert weights: reduced over expert-dp
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.dense + self.expert


def rank_params(m: ModelShape, lay: Layout, stage: int) -> RankParams:
    """Local parameter numel on one rank of pipeline stage `stage` (every TP/EP rank of a stage holds the same)."""
    check_layout(m, lay)
    layers = stage_layers(m, lay.pp, stage)
    moe = [m.moe_layers()[i] for i in layers]
    n_moe, n_dense = sum(moe), len(moe) - sum(moe)
    h, tp = m.hidden_size, lay.tp
    d_q, d_kv = m.num_attention_heads * m.kv_channels, m.num_key_value_heads * m.kv_channels
    # Column-parallel qkv (weight and bias split), row-parallel o_proj (weight split, bias replicated).
    attn = (h * (d_q + 2 * d_kv) + d_q * h) // tp
    if m.attention_bias:
        attn += (d_q + 2 * d_kv) // tp + h
    first, last = stage == 0, stage == lay.pp - 1
    parts = {
        "embedding": m.vocab_size * h // tp if first else 0,
        # Tied embeddings with PP > 1: megatron keeps a copy of the word embeddings on the last stage.
        "output_layer": m.vocab_size * h // tp if last and (not m.tie_word_embeddings or lay.pp > 1) else 0,
        "attention": len(layers) * attn,
        "norms": len(layers) * _layer_norm_params(m) + (h if last else 0),  # replicated over TP
        "router": n_moe * m.num_experts * h,  # replicated over TP
        "dense_mlp": n_dense * 3 * h * m.intermediate_size // tp,
        "experts": n_moe * (m.num_experts // lay.ep) * _expert_params(m) // lay.etp if m.num_experts else 0,
    }
    return RankParams(dense=sum(v for k, v in parts.items() if k != "experts"), expert=parts["experts"], parts=parts)


# --- run setup -----------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RunSetup:
    """Training choices that set memory besides the model and the layout.

    micro_batch_tokens: packed tokens of one micro-batch of one DP replica (before the CP split);
    seq_length: tokens per sequence (sets the sequences of a micro-batch; matters for unfused attention);
    micro_batches_per_step: micro-batches of one DP rank per RL step (the old-log-prob pass runs all of them:
      sizes the routing-replay ids kept for the step);
    params_dtype: "bf16" (mixed precision: fp32 master weights in the optimizer) or "fp32";
    attention: "flash" (fused kernels: no [s, s] tensor) or "unfused" (softmax probabilities saved);
    routing_replay: "off" | "r2" | "r3";
    loss_head: "fused" (the trainer's default: the fused head's single pass, `--fused-lm-head`) or "logits"
      (`--no-fused-lm-head`: the [tokens, V/tp] logits and their gradient held);
    gpu_memory_gib: the GPU sizes to check; headroom: fraction of each kept free (CUDA context, NCCL,
      fragmentation).
    """

    micro_batch_tokens: int
    seq_length: int
    micro_batches_per_step: int = 1
    params_dtype: Literal["bf16", "fp32"] = "bf16"
    distributed_optimizer: bool = True
    attention: Literal["flash", "unfused"] = "flash"
    routing_replay: Literal["off", "r2", "r3"] = "r2"
    loss_head: Literal["fused", "logits"] = "fused"
    gpu_memory_gib: tuple[float, ...] = (80.0,)
    headroom: float = 0.10

    def __post_init__(self):
        c = "RunSetup"
        for name in ("micro_batch_tokens", "seq_length", "micro_batches_per_step"):
            _int_at_least(c, name, getattr(self, name), 1)
        if self.seq_length > self.micro_batch_tokens:
            raise ConfigError(c, "seq_length", f"<= micro_batch_tokens={self.micro_batch_tokens}", self.seq_length)
        for name, allowed in (("params_dtype", ("bf16", "fp32")), ("attention", ("flash", "unfused")),
                              ("routing_replay", ("off", "r2", "r3")), ("loss_head", ("fused", "logits"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(c, name, f"one of {allowed}", getattr(self, name))
        if not isinstance(self.distributed_optimizer, bool):
            raise ConfigError(c, "distributed_optimizer", "a bool", self.distributed_optimizer)
        if not (isinstance(self.gpu_memory_gib, tuple) and self.gpu_memory_gib
                and all(isinstance(g, (int, float)) and g > 0 for g in self.gpu_memory_gib)):
            raise ConfigError(c, "gpu_memory_gib", "a non-empty tuple of sizes > 0", self.gpu_memory_gib)
        if not (isinstance(self.headroom, (int, float)) and 0 <= self.headroom < 1):
            raise ConfigError(c, "headroom", "a fraction in [0, 1)", self.headroom)

    @property
    def param_bytes(self) -> int:
        return 2 if self.params_dtype == "bf16" else 4

    @property
    def optimizer_bytes(self) -> int:
        """Adam state per parameter: fp32 master + m + v (bf16 params), m + v (fp32 params)."""
        return 12 if self.params_dtype == "bf16" else 8


def _check_tokens(lay: Layout, setup: RunSetup) -> None:
    # The trainer pads a micro-batch to a multiple of 2*cp (load-balanced CP chunks) times tp (SP split).
    multiple = (2 * lay.cp if lay.cp > 1 else 1) * lay.tp
    if setup.micro_batch_tokens % multiple:
        raise ConfigError("RunSetup", "micro_batch_tokens", f"a multiple of {multiple} (2*cp if cp > 1, times tp)",
                   setup.micro_batch_tokens)


# --- activations ---------------------------------------------------------------------------------------
#
# Korthikanti et al. 2022 (arXiv:2205.05198), section 4.1, bytes per transformer layer for s tokens, batch
# b, hidden h, a heads, 16-bit activations, t-way TP with sequence parallelism (eq. 4 of section 4.2.3):
#     s*b*h*(34/t + 5*a*s/(h*t))
# = attention 11sbh + 5as^2b, MLP 19sbh, two layernorms 4sbh, all divided by t. Adapted here:
#   * no dropout (Qwen3 trains with dropout 0): the 1-byte masks (2sbh) and the dropout output go;
#   * GQA and QK-norm: Q, K, V widths d_q = n_q*d, d_kv = n_kv*d instead of h; q_norm/k_norm save their inputs;
#   * flash attention (TE fused / FlashAttention): no [s, s] softmax; it saves q, k, v, its output and an
#     fp32 log-sum-exp per head and token. "unfused" adds the softmax probabilities 2as^2b/t (no dropout);
#   * SwiGLU MLP of width I: fc1 input (2sbh), fc1 output [s, 2I] (its backward recomputes the activation),
#     fc2 input [s, I];
#   * MoE (megatron-core alltoall dispatcher, probabilities applied in the experts): under uniform routing a
#     rank's local experts receive tokens*topk routed copies whatever EP is (each rank receives its EP peers'
#     tokens); with expert-TP each copy is all-gathered to the etp ranks of its expert, each holding I/etp
#     columns: copies per rank = local tokens * topk * etp.
# Everything below is bytes per token of this rank's SP shard (the micro-batch's tokens / (cp * tp)): TP
# splits heads and MLP columns over the full sequence (tokens / cp), which is the same number of elements.
# Full recomputation (megatron "full"/"uniform", 1 layer per checkpoint) keeps each layer's input (2sbh/t,
# Korthikanti section 4.2.3) and rematerialises one layer at a time in the backward pass.
# Pipeline 1F1B: stage i (0-based) holds min(pp - i, micro-batches) micro-batches in flight (Narayanan et al.
# 2021, section 2.2.1; Korthikanti section 4.2.3: the first stage holds pp micro-batches of L/pp layers).


def _attention_bytes(m: ModelShape, setup: RunSetup, b: int) -> dict[str, int]:
    h, d_q, d_kv = m.hidden_size, m.num_attention_heads * m.kv_channels, m.num_key_value_heads * m.kv_channels
    out = {
        "input_norm": b * h,  # RMSNorm input (Korthikanti: layernorm input 2sbh)
        "qkv_input": b * h,  # norm output: the SP shard saved by the column-parallel qkv GEMM
        "qk_norm": b * (d_q + d_kv) if m.qk_norm else 0,  # q_norm / k_norm inputs
        "q_k_v": b * (d_q + 2 * d_kv),  # after QK-norm and RoPE, saved by the attention kernel (Korthikanti Q,K,V 6sbh)
        "attention_out": b * d_q,  # kernel output = o_proj input (Korthikanti 2sbh)
        "softmax_stats": 4 * m.num_attention_heads if setup.attention == "flash" else 0,  # fp32 log-sum-exp
    }
    if setup.attention == "unfused":
        # [b, n_q/tp, s/cp, s] probabilities per sequence: per SP token n_q * s elements.
        out["softmax_probs"] = b * m.num_attention_heads * setup.seq_length
    return out


def _moe_bytes(m: ModelShape, lay: Layout, b: int) -> dict[str, int]:
    h, k, inter = m.hidden_size, m.num_experts_per_tok, m.moe_intermediate_size // lay.etp
    copies = k * lay.etp
    return {
        "pre_mlp_norm": b * h,
        "router_input": b * h,  # norm output, saved by the router GEMM
        "router": 4 * m.num_experts + k * (8 + 4),  # fp32 softmax output, int64 top-k ids, fp32 probs
        # per routed copy: fc1 input, fc1 output [2I/etp], fc2 input [I/etp], fp32 prob, int64 permutation index
        "experts": copies * (b * h + b * 2 * inter + b * inter + 4 + 8),
    }


def _dense_mlp_bytes(m: ModelShape, b: int) -> dict[str, int]:
    h, inter = m.hidden_size, m.intermediate_size
    return {"pre_mlp_norm": b * h, "mlp_fc1_input": b * h, "mlp_fc1_output": b * 2 * inter,
            "mlp_fc2_input": b * inter}


def layer_bytes_per_token(m: ModelShape, lay: Layout, setup: RunSetup, is_moe: bool) -> dict[str, int]:
    """Saved activations of one layer, bytes per SP-shard token, no recomputation."""
    b = setup.param_bytes  # activations in the parameters' dtype (no Float16Module: bf16 model -> bf16)
    out = _attention_bytes(m, setup, b)
    out.update(_moe_bytes(m, lay, b) if is_moe else _dense_mlp_bytes(m, b))
    return out


@dataclass(frozen=True)
class StageMemory:
    """One rank of one pipeline stage, bytes."""

    stage: int
    layers: tuple[int, int]  # [first, last] layer index
    in_flight: int  # micro-batches whose activations this stage holds at once (1F1B)
    params: RankParams
    weights: int
    grads: int
    optimizer: int
    activations: dict[str, int]  # "no_recompute", "full_recompute"
    activation_parts: dict[str, int]  # no-recompute breakdown, all in-flight micro-batches
    logits: int  # included in both activation totals (last stage)
    rl_extras: dict[str, int]

    @property
    def static(self) -> int:
        return self.weights + self.grads + self.optimizer

    def total(self, recompute: bool) -> int:
        key = "full_recompute" if recompute else "no_recompute"
        return self.static + self.activations[key] + sum(self.rl_extras.values())


def _stage_memory(m: ModelShape, lay: Layout, setup: RunSetup, stage: int) -> StageMemory:
    params = rank_params(m, lay, stage)
    layers = stage_layers(m, lay.pp, stage)
    moe_flags = [m.moe_layers()[i] for i in layers]
    last = stage == lay.pp - 1
    b = setup.param_bytes
    tokens_cp = setup.micro_batch_tokens // lay.cp  # this rank's tokens after the CP split
    tokens_sp = tokens_cp // lay.tp  # ... and after the SP split
    in_flight = min(lay.pp - stage, setup.micro_batches_per_step)

    # Static: weights, fp32 main grads, Adam state (sharded by the distributed optimizer).
    weights = params.total * b
    grads = params.total * 4
    opt = setup.optimizer_bytes
    if setup.distributed_optimizer:
        optimizer = math.ceil(params.dense * opt / lay.dp_cp) + math.ceil(params.expert * opt / lay.expert_dp)
    else:
        optimizer = params.total * opt

    # Activations of one micro-batch on this stage.
    per_layer = [sum(layer_bytes_per_token(m, lay, setup, f).values()) * tokens_sp for f in moe_flags]
    parts: dict[str, int] = {}
    for f in moe_flags:
        for name, v in layer_bytes_per_token(m, lay, setup, f).items():
            parts[name] = parts.get(name, 0) + v * tokens_sp * in_flight
    stored = sum(per_layer)
    checkpoints = len(moe_flags) * b * m.hidden_size * tokens_sp  # full recompute: each layer's input
    working = max(per_layer)  # one layer rematerialised in the backward pass
    logits = 0
    output_parts = 0
    if last:
        # final-norm input and the output layer's SP-shard input
        output_parts = 2 * b * m.hidden_size * tokens_sp
        logits = _loss_head_bytes(m, lay, setup, tokens_cp)
        parts["output_layer_inputs"] = output_parts
        parts["logits"] = logits
    activations = {
        # The last stage holds one micro-batch in flight: its logits are counted once.
        "no_recompute": in_flight * (stored + output_parts) + logits,
        # The logits and their gradient are freed before the last layer is rematerialised: max, not sum.
        "full_recompute": in_flight * (checkpoints + output_parts) + max(working, logits),
    }
    parts = {k: v for k, v in parts.items() if v}

    # RL extras.
    extras = {"batch_tensors": in_flight * tokens_cp * BATCH_BYTES_PER_TOKEN}
    if setup.routing_replay != "off" and sum(moe_flags):
        # R2: the old-log-prob pass records int64 [T_r, K] per router and micro-batch for the whole step;
        # R3: megatron's RouterReplay appends each replayed int64 [T_r, K] target until the pass ends.
        # T_r = this rank's router tokens (after CP and SP). The compact uint8/int16 R3 record stays on the host.
        extras["routing_replay_ids"] = (setup.micro_batches_per_step * tokens_sp * sum(moe_flags)
                                        * m.num_experts_per_tok * 8)
    return StageMemory(stage=stage, layers=(layers.start, layers.stop - 1), in_flight=in_flight, params=params,
                       weights=weights, grads=grads, optimizer=optimizer, activations=activations,
                       activation_parts=parts, logits=logits, rl_extras=extras)


def _loss_head_bytes(m: ModelShape, lay: Layout, setup: RunSetup, tokens_cp: int) -> int:
    """The loss head's memory on the last stage for one micro-batch of `tokens_cp` tokens (the `logits` entry)."""
    b = setup.param_bytes
    v_local = m.vocab_size // lay.tp
    stats = tokens_cp * LOSS_BYTES_PER_TOKEN
    if setup.loss_head == "logits":
        # Logits [tokens/cp, V/tp] in the model dtype, saved for the chunked log-prob backward, and their
        # gradient of the same size at the start of the backward pass; one fp32 chunk of the log-prob path.
        chunk = min(tokens_cp, max(1, LOGPROB_CHUNK_ELEMENTS // v_local)) * v_local * 4
        return 2 * tokens_cp * v_local * b + chunk + stats
    # The single pass (parallel/fused_lm_head_loss.py): one tile of logits, whose chunk holds whole sequences (a
    # sequence up to twice the tile, at most the cap, held whole), d W accumulated in fp32 (megatron's main_grad
    # path), and d hidden [tokens/cp, H], formed in the forward pass and held until the backward.
    seq_cp = setup.seq_length // lay.cp
    chunk = DEFAULT_SINGLE_PASS_CHUNK_ELEMENTS
    rows = min(tokens_cp, max(chunk // v_local, min(seq_cp, default_whole_sequence_elements(chunk) // v_local), 1))
    return rows * v_local * b + v_local * m.hidden_size * 4 + tokens_cp * m.hidden_size * b + stats


def routing_record_host_bytes(m: ModelShape, lay: Layout, setup: RunSetup) -> int:
    """R3: host-side compact record (uint8 ids for <= 256 experts, else int16) of one DP rank's step tokens."""
    if setup.routing_replay != "r3" or not m.num_experts:
        return 0
    id_bytes = 1 if m.num_experts <= 256 else 2
    return (setup.micro_batches_per_step * setup.micro_batch_tokens // lay.cp * sum(m.moe_layers())
            * m.num_experts_per_tok * id_bytes)


@dataclass(frozen=True)
class MemoryPlan:
    shape: ModelShape
    layout: Layout
    setup: RunSetup
    stages: tuple[StageMemory, ...]

    def worst(self, recompute: bool) -> StageMemory:
        return max(self.stages, key=lambda s: s.total(recompute))

    def peak(self, recompute: bool) -> int:
        return self.worst(recompute).total(recompute)

    def usable(self, gpu_gib: float) -> int:
        return int(gpu_gib * GIB * (1 - self.setup.headroom))

    def fits(self, gpu_gib: float, recompute: bool) -> bool:
        return self.peak(recompute) <= self.usable(gpu_gib)

    def summary(self) -> dict:
        """A JSON-ready dict: counts, layout groups, per-stage bytes, the worst stage and the fits."""
        def stage_dict(s: StageMemory) -> dict:
            return {"stage": s.stage, "layers": list(s.layers), "in_flight_micro_batches": s.in_flight,
                    "params_dense": s.params.dense, "params_expert": s.params.expert, "param_parts": s.params.parts,
                    "weights_bytes": s.weights, "grads_bytes": s.grads, "optimizer_bytes": s.optimizer,
                    "activations_bytes": s.activations, "activation_parts_bytes": s.activation_parts,
                    "rl_extras_bytes": s.rl_extras,
                    "total_bytes": {"no_recompute": s.total(False), "full_recompute": s.total(True)}}

        lay = self.layout
        return {
            "model": asdict(self.shape),
            "param_counts": asdict(count_params(self.shape)),
            "layout": {**asdict(lay), "world": lay.world, "sp": lay.sp, "dp_cp": lay.dp_cp,
                       "expert_dp": lay.expert_dp},
            "setup": asdict(self.setup),
            "stages": [stage_dict(s) for s in self.stages],
            "worst_stage": {"no_recompute": self.worst(False).stage, "full_recompute": self.worst(True).stage},
            "peak_bytes": {"no_recompute": self.peak(False), "full_recompute": self.peak(True)},
            "routing_record_host_bytes": routing_record_host_bytes(self.shape, lay, self.setup),
            "fits": {f"{g:g}GiB": {"usable_bytes": self.usable(g), "no_recompute": self.fits(g, False),
                                   "full_recompute": self.fits(g, True)} for g in self.setup.gpu_memory_gib},
        }


def plan_memory(m: ModelShape, lay: Layout, setup: RunSetup) -> MemoryPlan:
    """The per-GPU memory of every pipeline stage of `lay`; raises ValueError on an impossible layout."""
    check_layout(m, lay)
    _check_tokens(lay, setup)
    return MemoryPlan(shape=m, layout=lay, setup=setup,
                      stages=tuple(_stage_memory(m, lay, setup, s) for s in range(lay.pp)))


# --- search --------------------------------------------------------------------------------------------

SEARCH_TP = (1, 2, 4, 8)
SEARCH_EP = (1, 2, 4, 8, 16, 32)
SEARCH_PP = (1, 2, 4)
SEARCH_CP = (1, 2)


def search_layouts(m: ModelShape, setup: RunSetup, gpus: int, *, etp: int = 1, tps=SEARCH_TP, eps=SEARCH_EP,
                   pps=SEARCH_PP, cps=SEARCH_CP) -> tuple[list[MemoryPlan], dict[str, int]]:
    """Every valid layout of `gpus` GPUs in the grid, sorted by peak memory without recomputation.

    Returns (plans, skipped) where `skipped` counts the invalid combinations by the field that failed.
    """
    plans, skipped = [], {}
    for tp, ep, pp, cp in itertools.product(tps, eps, pps, cps):
        try:
            lay = Layout.from_gpus(gpus, tp=tp, cp=cp, ep=ep, etp=etp, pp=pp)
            plans.append(plan_memory(m, lay, setup))
        except ValueError as err:
            key = str(err).split(":", 1)[0]
            skipped[key] = skipped.get(key, 0) + 1
    plans.sort(key=lambda p: (p.peak(False), p.peak(True), p.layout.tp * p.layout.pp * p.layout.cp))
    return plans, skipped


def minimal_gpus(m: ModelShape, setup: RunSetup, gpu_gib: float, recompute: bool, candidates, *, etp: int = 1,
                 **grid) -> tuple[int, MemoryPlan] | None:
    """The fewest GPUs among `candidates` with a grid layout that fits `gpu_gib`, and its lowest-peak layout."""
    for gpus in sorted(candidates):
        plans, _ = search_layouts(m, setup, gpus, etp=etp, **grid)
        fitting = [p for p in plans if p.fits(gpu_gib, recompute)]
        if fitting:
            return gpus, min(fitting, key=lambda p: p.peak(recompute))
    return None
