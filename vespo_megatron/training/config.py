"""The trainer's configuration: one validated dataclass per component, grouped like the launch scripts
(model, parallelism, rollout, algorithm, logging/checkpointing). `TrainerConfig.validate(world_size)`
checks everything that depends on several groups at start, before any model is built."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from vespo_megatron.base.validation import ConfigError
from vespo_megatron.data.math_task import MathTaskConfig
from vespo_megatron.losses import get_policy_loss, make_loss_config
from vespo_megatron.megatron.model import TinyMoEConfig
from vespo_megatron.megatron.parallel_setup import ParallelConfig
from vespo_megatron.training.toy_task import ArithmeticTaskConfig
from vespo_megatron.training.weight_sync import WeightSyncConfig

__all__ = ["RolloutConfig", "AlgorithmConfig", "RunConfig", "HFCheckpointConfig", "EvalConfig", "TrainerConfig"]



def _positive_int(cls: str, name: str, value: object) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ConfigError(cls, name, "an int >= 1", value)


@dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    """engine: embedded (the policy samples itself) | sglang (HTTP server at sglang_url).
    old_logprobs: recompute (trainer forward at rollout weights) | engine (the engine's log-probs as mu)."""

    engine: str = "embedded"
    prompts_per_step: int = 16
    group_size: int = 4
    temperature: float = 1.0
    precision: str = "fp32"  # embedded engine: "bf16" gives a real train/inference mismatch
    async_lag: int = 0  # rollouts by weights this many syncs old (fully asynchronous mode)
    old_logprobs: str = "recompute"
    sglang_url: str | None = None

    def __post_init__(self) -> None:
        c = "RolloutConfig"
        if self.engine not in ("embedded", "sglang"):
            raise ConfigError(c, "engine", "'embedded' or 'sglang'", self.engine)
        _positive_int(c, "prompts_per_step", self.prompts_per_step)
        _positive_int(c, "group_size", self.group_size)
        if self.group_size < 2:
            raise ConfigError(c, "group_size", "an int >= 2 (group-normalised advantages need 2 samples)", self.group_size)
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(c, "temperature", "a float > 0", self.temperature)
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(c, "precision", "'fp32' or 'bf16'", self.precision)
        if not (isinstance(self.async_lag, int) and 0 <= self.async_lag <= 64):
            raise ConfigError(c, "async_lag", "an int in [0, 64]", self.async_lag)
        if self.old_logprobs not in ("recompute", "engine"):
            raise ConfigError(c, "old_logprobs", "'recompute' or 'engine'", self.old_logprobs)
        if self.engine == "sglang" and not self.sglang_url:
            raise ConfigError(c, "sglang_url", "the server's URL when engine='sglang'", self.sglang_url)

    @property
    def samples_per_step(self) -> int:
        return self.prompts_per_step * self.group_size


@dataclass(frozen=True, kw_only=True)
class AlgorithmConfig:
    """staleness N = global batch / mini-batch: optimizer updates per rollout batch (the paper's knob)."""

    loss: str = "vespo"
    loss_options: dict[str, Any] = field(default_factory=dict)  # fields of the loss's config
    staleness: int = 1
    micro_batch_size: int = 8  # samples per micro-batch on one DP rank
    lr: float = 1e-3
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    adv_eps: float = 1e-6
    routing_replay: str = "off"  # off | r2 | r3
    distributed_optimizer: bool = False  # shard fp32 main weights and Adam moments over data parallelism

    def __post_init__(self) -> None:
        c = "AlgorithmConfig"
        get_policy_loss(self.loss)
        self.loss_config()  # validates loss_options
        if not (isinstance(self.staleness, int) and 1 <= self.staleness <= 64):
            raise ConfigError(c, "staleness", "an int in [1, 64]", self.staleness)
        _positive_int(c, "micro_batch_size", self.micro_batch_size)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(c, "lr", "a finite float > 0", self.lr)
        if not self.clip_grad >= 0:
            raise ConfigError(c, "clip_grad", "a float >= 0 (0: no clipping)", self.clip_grad)
        if self.routing_replay not in ("off", "r2", "r3"):
            raise ConfigError(c, "routing_replay", "'off', 'r2' or 'r3'", self.routing_replay)

    def loss_config(self):
        return make_loss_config(self.loss, **self.loss_options)


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    steps: int = 30
    seed: int = 0
    sft_steps: int = 0  # supervised warm start on correct answers before RL
    sft_lr: float = 3e-3
    sft_micro_batch_size: int | None = None  # None: the RL micro-batch size (staleness sweeps shrink that one)
    out_dir: str = "runs/toy"
    checkpoint_every: int = 0  # 0: never

    def __post_init__(self) -> None:
        c = "RunConfig"
        _positive_int(c, "steps", self.steps)
        if not (isinstance(self.sft_steps, int) and self.sft_steps >= 0):
            raise ConfigError(c, "sft_steps", "an int >= 0", self.sft_steps)
        if self.sft_micro_batch_size is not None:
            _positive_int(c, "sft_micro_batch_size", self.sft_micro_batch_size)
        if not (isinstance(self.checkpoint_every, int) and self.checkpoint_every >= 0):
            raise ConfigError(c, "checkpoint_every", "an int >= 0", self.checkpoint_every)


@dataclass(frozen=True, kw_only=True)
class HFCheckpointConfig:
    """Hugging Face checkpoints. load: a Qwen3-MoE checkpoint directory to start from (its config.json must
    match the model flags; a trainer checkpoint of the run, when present, still wins on restart).
    save_every: also write the policy as an HF checkpoint to <out_dir>/hf/step_<n> every K steps (0: never);
    save_final: and after the last step. save_dtype: the stored dtype. tokenizer: the tokenizer directory for
    dataset prompts (default: `load`)."""

    load: str | None = None
    save_every: int = 0
    save_final: bool = False
    save_dtype: str = "bfloat16"
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        c = "HFCheckpointConfig"
        if not (isinstance(self.save_every, int) and self.save_every >= 0):
            raise ConfigError(c, "save_every", "an int >= 0", self.save_every)
        if self.save_dtype not in ("bfloat16", "float16", "float32"):
            raise ConfigError(c, "save_dtype", "'bfloat16', 'float16' or 'float32'", self.save_dtype)


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Held-out evaluation every `every` steps (0: never): k samples per held-out prompt at `temperature`;
    logs eval/pass@1 (the unbiased estimate from the k samples), eval/mean@k, eval/pass@k. max_problems caps
    the held-out prompts used (None: all; the count used is logged as eval/num_problems)."""

    every: int = 0
    k: int = 4
    temperature: float = 1.0
    max_problems: int | None = None

    def __post_init__(self) -> None:
        c = "EvalConfig"
        if not (isinstance(self.every, int) and self.every >= 0):
            raise ConfigError(c, "every", "an int >= 0", self.every)
        _positive_int(c, "k", self.k)
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(c, "temperature", "a float > 0", self.temperature)
        if self.max_problems is not None:
            _positive_int(c, "max_problems", self.max_problems)


@dataclass(frozen=True, kw_only=True)
class TrainerConfig:
    model: TinyMoEConfig = field(default_factory=TinyMoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    task: ArithmeticTaskConfig | MathTaskConfig = field(default_factory=ArithmeticTaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    run: RunConfig = field(default_factory=RunConfig)
    hf: HFCheckpointConfig = field(default_factory=HFCheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)

    def validate(self, world_size: int) -> None:
        """Checks across groups; raises ValueError naming the fields and numbers involved."""
        p, r, a = self.parallel, self.rollout, self.algorithm
        p.validate_world_size(world_size)
        p.validate_for_moe(self.model.num_experts)
        dp = p.data_parallel_size(world_size)
        if r.prompts_per_step % dp != 0:
            raise ValueError(f"RolloutConfig.prompts_per_step: expected a multiple of the data-parallel size "
                             f"{dp} (whole groups per DP rank), got {r.prompts_per_step}")
        per_rank = r.samples_per_step // dp
        if per_rank % a.staleness != 0:
            raise ValueError(f"AlgorithmConfig.staleness: the {per_rank} samples per DP rank and step "
                             f"(prompts_per_step * group_size / dp) must split into {a.staleness} mini-batches")
        mini = per_rank // a.staleness
        if mini % a.micro_batch_size != 0:
            raise ValueError(f"AlgorithmConfig.micro_batch_size: a mini-batch has {mini} samples per DP rank, "
                             f"not a multiple of micro_batch_size={a.micro_batch_size}")
        if a.routing_replay == "r2" and r.old_logprobs != "recompute":
            raise ValueError("AlgorithmConfig.routing_replay: 'r2' records the trainer's routing in the old-log-prob "
                             f"pass; expected RolloutConfig.old_logprobs='recompute', got {r.old_logprobs!r}")
        if r.engine == "sglang" and (r.async_lag or r.precision != "fp32"):
            raise ValueError("RolloutConfig.async_lag / precision: embedded-engine settings; with engine='sglang' "
                             f"the server decides them, got async_lag={r.async_lag}, precision={r.precision!r}")
        if a.routing_replay == "r3" and r.engine == "embedded" and p.tp * p.cp * p.pp != 1:
            raise ValueError("AlgorithmConfig.routing_replay: 'r3' with the embedded engine records routing where "
                             f"one rank sees every token and layer (tp = cp = pp = 1), got tp={p.tp}, cp={p.cp}, "
                             f"pp={p.pp}; use 'r2' or the SGLang engine")
        if not isinstance(self.task, ArithmeticTaskConfig | MathTaskConfig):
            raise ConfigError("TrainerConfig", "task", "an ArithmeticTaskConfig or a MathTaskConfig", self.task)
        if isinstance(self.task, MathTaskConfig) and not (self.hf.tokenizer or self.hf.load):
            raise ValueError("HFCheckpointConfig.tokenizer: a dataset task needs a Hugging Face tokenizer directory "
                             "(tokenizer, or load to use the checkpoint's), got None")
        if self.weight_sync.mode != "disk" and r.engine != "sglang":
            raise ValueError(f"WeightSyncConfig.mode: {self.weight_sync.mode!r} streams weights to an SGLang server; "
                             f"expected 'disk' with RolloutConfig.engine={r.engine!r}")
        if self.hf.load is not None:
            from vespo_megatron.hf.config import check_matches_hf, load_hf_config

            check_matches_hf(self.model, load_hf_config(self.hf.load), source=f"hf checkpoint {self.hf.load!r}")
        moe = self.model.moe_layer_freq
        has_moe = any(moe) if isinstance(moe, tuple) else moe >= 1
        if a.routing_replay != "off" and not has_moe:
            raise ValueError(f"AlgorithmConfig.routing_replay: {a.routing_replay!r} needs MoE layers, and the "
                             f"model has none (moe_layer_freq={moe!r})")
