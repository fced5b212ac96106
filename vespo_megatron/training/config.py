"""The trainer's configuration: one validated dataclass per component, grouped like the launch scripts
(model, parallelism, rollout, algorithm, logging/checkpointing). `TrainerConfig.validate(world_size)`
checks everything that depends on several groups at start, before any model is built."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

from vespo_megatron.base.imports import is_import_path
from vespo_megatron.base.validation import ConfigError, check_choice, check_float, check_int
from vespo_megatron.data.math_task import MathTaskConfig
from vespo_megatron.losses import LossConfig, resolve_policy_loss
from vespo_megatron.megatron.model_config import TinyMoEConfig
from vespo_megatron.megatron.parallel_config import ParallelConfig
from vespo_megatron.parallel.head_chunk_plan import DEFAULT_SINGLE_PASS_CHUNK_ELEMENTS
from vespo_megatron.rollout.embedded_config import EmbeddedEngineConfig
from vespo_megatron.rollout.factory import ENGINES
from vespo_megatron.rollout.sglang.engine import SGLangEngineConfig
from vespo_megatron.training.advantages import resolve_advantage
from vespo_megatron.training.reasoning_task import ReasoningTaskConfig
from vespo_megatron.training.toy_task import ArithmeticTaskConfig

__all__ = ["RolloutConfig", "AlgorithmConfig", "RunConfig", "HFCheckpointConfig", "EvalConfig", "TrainerConfig"]



@dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    """engine: a name in `vespo_megatron.rollout.factory.ENGINES` (embedded: the policy samples itself;
    sglang: an HTTP server) or an import path 'module:builder'. old_logprobs: recompute (trainer forward at
    the rollout weights) | engine (the engine's log-probs as mu). embedded / sglang: each engine's settings."""

    engine: str = "embedded"
    prompts_per_step: int = 32
    group_size: int = 8
    temperature: float = 1.0
    old_logprobs: str = "recompute"
    embedded: EmbeddedEngineConfig = field(default_factory=EmbeddedEngineConfig)
    sglang: SGLangEngineConfig = field(default_factory=SGLangEngineConfig)

    def __post_init__(self) -> None:
        c = "RolloutConfig"
        if self.engine not in ENGINES and not is_import_path(self.engine):
            raise ConfigError(c, "engine", f"one of {sorted(ENGINES)} or an import path 'module:builder'",
                              self.engine)
        check_int(c, "prompts_per_step", self.prompts_per_step, low=1)
        check_int(c, "group_size", self.group_size, low=1)
        if self.group_size < 2:
            raise ConfigError(c, "group_size", "an int >= 2 (group-normalised advantages need 2 samples)",
                              self.group_size)
        check_float(c, "temperature", self.temperature, positive=True)
        check_choice(c, "old_logprobs", self.old_logprobs, ("recompute", "engine"))
        if self.engine == "sglang" and not self.sglang.url:
            raise ConfigError("SGLangEngineConfig", "url", "the server's URL when engine='sglang'", self.sglang.url)

    @property
    def samples_per_step(self) -> int:
        return self.prompts_per_step * self.group_size


@dataclass(frozen=True, kw_only=True)
class AlgorithmConfig:
    """loss: a registered policy loss (`vespo_megatron.losses.POLICY_LOSSES`) or an import path
    'module:build' (`build()` returns a `PolicyLoss`). loss_config: that loss's typed config (None: its
    defaults). advantage: an estimator in `ADVANTAGE_ESTIMATORS` (grpo, dr_grpo, rloo) or an import path.
    staleness N = global batch / mini-batch: optimizer updates per rollout batch (the paper's knob)."""

    loss: str = "vespo"
    loss_config: LossConfig | None = None
    advantage: str = "grpo"
    staleness: int = 2
    micro_batch_size: int = 32  # samples per micro-batch on one DP rank
    # Samples per micro-batch of the forward-only pass that recomputes the old log-probs (verl's
    # log_prob_micro_batch_size): it stores no activations, so it can take far more than an update's
    # micro-batch, and at large N (micro-batches of a few samples) it is otherwise N times the launches.
    # None: micro_batch_size. Context parallelism must be 1 (a pack's last sequence takes the pack's padding,
    # which moves its CP split; the values are mapped back to the update's micro-batches token by token).
    logprob_micro_batch_size: int | None = None
    lr: float = 3e-4
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    adv_eps: float = 1e-6
    routing_replay: str = "off"  # off | r2 | r3
    distributed_optimizer: bool = False  # shard fp32 main weights and Adam moments over data parallelism

    def __post_init__(self) -> None:
        c = "AlgorithmConfig"
        loss = resolve_policy_loss(self.loss)
        if self.loss_config is None:
            object.__setattr__(self, "loss_config", loss.default_config())
        elif not isinstance(self.loss_config, loss.config_cls):
            raise ConfigError(c, "loss_config", f"a {loss.config_cls.__name__} for loss {self.loss!r}",
                              type(self.loss_config).__name__)
        resolve_advantage(self.advantage)
        check_int(c, "staleness", self.staleness, low=1, high=64)
        check_int(c, "micro_batch_size", self.micro_batch_size, low=1)
        if self.logprob_micro_batch_size is not None:
            check_int(c, "logprob_micro_batch_size", self.logprob_micro_batch_size, low=1)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(c, "lr", "a finite float > 0", self.lr)
        if not self.clip_grad >= 0:
            raise ConfigError(c, "clip_grad", "a float >= 0 (0: no clipping)", self.clip_grad)
        check_choice(c, "routing_replay", self.routing_replay, ("off", "r2", "r3"))

    @property
    def policy_loss(self):
        return resolve_policy_loss(self.loss)


SFT_LR_DECAYS = ("constant", "cosine")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Each run owns the directory `run_dir` = <out_dir>/<run_name>/: its config.json, metrics
    (<run_name>.jsonl), checkpoints/, plots, HF exports (hf/) and engine weight dirs (weights/). A restart with
    the same out-dir and name resumes it when the saved config matches (`vespo_megatron.training.run_dir`);
    allow_config_change: resume even when it does not. threads: torch intra-op threads per process (0: torch's
    default)."""

    steps: int = 60
    seed: int = 0
    sft_steps: int = 40  # supervised warm start on correct answers before RL
    sft_lr: float = 3e-3
    sft_micro_batch_size: int | None = None  # None: the RL micro-batch size (staleness sweeps shrink that one)
    # SFT lr schedule (training/sft.py: sft_lr_at): linear warmup over sft_warmup_steps, then constant or a cosine
    # down to 10 % of sft_lr at sft_decay_steps (None: sft_steps; examples/testbed_sft.py: its --max-steps).
    sft_warmup_steps: int = 0
    sft_lr_decay: str = "constant"
    sft_decay_steps: int | None = None
    out_dir: str = "runs"
    run_name: str = "toy"
    allow_config_change: bool = False
    checkpoint_every: int = 10  # 0: never
    keep_checkpoints: int = 0  # keep the newest K complete checkpoints, delete older ones (0: keep all)
    console: bool = True
    wandb: bool = False  # also log to wandb (offline unless WANDB_MODE=online)
    threads: int = 0

    def __post_init__(self) -> None:
        c = "RunConfig"
        check_int(c, "steps", self.steps, low=1)
        if not (isinstance(self.sft_steps, int) and self.sft_steps >= 0):
            raise ConfigError(c, "sft_steps", "an int >= 0", self.sft_steps)
        if self.sft_micro_batch_size is not None:
            check_int(c, "sft_micro_batch_size", self.sft_micro_batch_size, low=1)
        check_int(c, "sft_warmup_steps", self.sft_warmup_steps, low=0)
        check_choice(c, "sft_lr_decay", self.sft_lr_decay, SFT_LR_DECAYS)
        if self.sft_decay_steps is not None:
            check_int(c, "sft_decay_steps", self.sft_decay_steps, low=1)
        if not (isinstance(self.checkpoint_every, int) and self.checkpoint_every >= 0):
            raise ConfigError(c, "checkpoint_every", "an int >= 0", self.checkpoint_every)
        check_int(c, "threads", self.threads, low=0)
        check_int(c, "keep_checkpoints", self.keep_checkpoints, low=0)
        if not isinstance(self.out_dir, str) or not self.out_dir:
            raise ConfigError(c, "out_dir", "a directory", self.out_dir)
        name = self.run_name
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
            raise ConfigError(c, "run_name", "a non-empty name without '/' (the run's directory under out_dir)", name)

    @property
    def run_dir(self) -> str:
        """<out_dir>/<run_name>: everything this run writes lives here, so runs never share files."""
        return os.path.join(self.out_dir, self.run_name)


@dataclass(frozen=True, kw_only=True)
class PerformanceConfig:
    """How the loss head runs; the numbers do not depend on it. fused_lm_head: stop the model at its final
    hidden states and compute log-probs and entropy with the output layer fused in, a token chunk at a time,
    so the [T, V/tp] logits and their gradient are never held (`parallel/fused_lm_head.py`; bench/README.md
    has the memory and time on an H200 and an H100). On by default since round 12 (the single pass below: within
    1.08-1.29x of the GEMM floor at <= 2.45 GiB extra on H100s, where the logits path holds 9-19 GiB, and its
    on-policy ratio exactly 1); False: the logits path. lm_head_chunk_elements: logits per tile of the fused head
    (None: 2**29, 1 GiB in bf16, for the recomputing head; 2**29.25, chunks of whole sequences, for the single
    pass: `fused_lm_head_loss.DEFAULT_SINGLE_PASS_CHUNK_ELEMENTS` says why). lm_head_single_pass: with
    fused_lm_head, evaluate the loss inside the head on chunks of whole sequences and form the gradients while
    each chunk's logits are alive (three GEMMs instead of four; `parallel/fused_lm_head_loss.py`; the old-log-prob
    pass then runs the single pass's forward on the same chunks of whole sequences, so that its log-probs are
    bitwise the training pass's on the same micro-batches);
    None (the default): on exactly when fused_lm_head is (`single_pass` is the resolved value), so
    `--no-fused-lm-head` alone gives the logits path and `--no-lm-head-single-pass` the recomputing fused head.
    lm_head_whole_sequence_elements: with the single pass, the most logits a sequence over the chunk may hold
    whole (None: twice the chunk, at most 2**30 unless the chunk is larger); a longer sequence takes the
    recomputing head's tiles (one more GEMM for it), so memory stays flat in the sequence length; set it to the
    chunk for a hard cap."""

    fused_lm_head: bool = True
    lm_head_chunk_elements: int | None = None
    lm_head_single_pass: bool | None = None
    lm_head_whole_sequence_elements: int | None = None

    @property
    def single_pass(self) -> bool:
        """Whether the fused head runs its single pass (`lm_head_single_pass`, None resolved)."""
        return self.fused_lm_head if self.lm_head_single_pass is None else self.lm_head_single_pass

    def __post_init__(self) -> None:
        if not isinstance(self.fused_lm_head, bool):
            raise ConfigError("PerformanceConfig", "fused_lm_head", "a bool", self.fused_lm_head)
        if self.lm_head_single_pass is not None and not isinstance(self.lm_head_single_pass, bool):
            raise ConfigError("PerformanceConfig", "lm_head_single_pass", "a bool or None", self.lm_head_single_pass)
        if self.lm_head_single_pass and not self.fused_lm_head:
            raise ConfigError("PerformanceConfig", "lm_head_single_pass", "False while fused_lm_head is False (the "
                              "single pass is a mode of the fused head: add --fused-lm-head)", self.lm_head_single_pass)
        if self.lm_head_chunk_elements is not None:
            check_int("PerformanceConfig", "lm_head_chunk_elements", self.lm_head_chunk_elements, low=1)
        if self.lm_head_whole_sequence_elements is not None:
            if not self.single_pass:
                raise ConfigError("PerformanceConfig", "lm_head_whole_sequence_elements", "None unless "
                                  "lm_head_single_pass (only the single pass holds whole sequences: add "
                                  "--lm-head-single-pass)", self.lm_head_whole_sequence_elements)
            chunk = self.lm_head_chunk_elements or DEFAULT_SINGLE_PASS_CHUNK_ELEMENTS
            whole = self.lm_head_whole_sequence_elements
            if not isinstance(whole, int) or isinstance(whole, bool) or whole < chunk:
                raise ConfigError("PerformanceConfig", "lm_head_whole_sequence_elements",
                                  f"an int >= lm_head_chunk_elements ({chunk})", whole)


@dataclass(frozen=True, kw_only=True)
class HFCheckpointConfig:
    """Hugging Face checkpoints. load: a Qwen3-MoE checkpoint directory to start from (its config.json must
    match the model flags; a trainer checkpoint of the run, when present, still wins on restart).
    save_every: also write the policy as an HF checkpoint to <run_dir>/hf/step_<n> every K steps (0: never);
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
    logs eval/pass@1 (the unbiased estimate from the k samples), eval/mean@k, eval/pass@k and eval/k.
    max_problems caps the held-out prompts used (None: all; the count used is logged as eval/num_problems).
    final_k: the evaluation after the run's last step draws this many samples per prompt instead of k (None:
    k), and happens even when the last step is not a multiple of `every` (with every > 0): the number a
    comparison reads is then the least noisy one (sampling noise of pass@1 falls as 1/sqrt(k)), at the cost
    of one larger generation per run."""

    every: int = 0
    k: int = 4
    temperature: float = 1.0
    max_problems: int | None = None
    final_k: int | None = None

    def __post_init__(self) -> None:
        c = "EvalConfig"
        if not (isinstance(self.every, int) and self.every >= 0):
            raise ConfigError(c, "every", "an int >= 0", self.every)
        check_int(c, "k", self.k, low=1)
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(c, "temperature", "a float > 0", self.temperature)
        if self.max_problems is not None:
            check_int(c, "max_problems", self.max_problems, low=1)
        if self.final_k is not None:
            check_int(c, "final_k", self.final_k, low=1)

    def k_at(self, step: int, steps: int) -> int | None:
        """The samples per prompt of the evaluation after `step` (0-based) of a run of `steps`; None: none."""
        if not self.every:
            return None
        if step + 1 == steps and self.final_k is not None:
            return self.final_k
        return self.k if (step + 1) % self.every == 0 else None


@dataclass(frozen=True, kw_only=True)
class TrainerConfig:
    model: TinyMoEConfig = field(default_factory=TinyMoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    task: ArithmeticTaskConfig | ReasoningTaskConfig | MathTaskConfig = field(default_factory=ArithmeticTaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    run: RunConfig = field(default_factory=RunConfig)
    perf: PerformanceConfig = field(default_factory=PerformanceConfig)
    hf: HFCheckpointConfig = field(default_factory=HFCheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self, world_size: int) -> None:
        """Checks across groups; raises ConfigError naming the field (so the command line can name its flag)
        and the numbers involved. It needs no process group: the command line runs it with the launch's
        world size before importing megatron-core or starting anything."""
        p, r, a = self.parallel, self.rollout, self.algorithm
        p.validate_world_size(world_size)
        p.validate_for_moe(self.model.num_experts)
        dp = p.data_parallel_size(world_size)
        if r.prompts_per_step % dp != 0:
            raise ConfigError("RolloutConfig", "prompts_per_step",
                              f"a multiple of the data-parallel size {dp} (whole groups per DP rank)", r.prompts_per_step)
        per_rank = r.samples_per_step // dp
        if per_rank % a.staleness != 0:
            raise ConfigError("AlgorithmConfig", "staleness", f"a divisor of the {per_rank} samples per DP rank and "
                              "step (prompts_per_step * group_size / dp), split into one mini-batch per update", a.staleness)
        mini = per_rank // a.staleness
        if mini % a.micro_batch_size != 0:
            raise ConfigError("AlgorithmConfig", "micro_batch_size",
                              f"a divisor of the {mini} samples per DP rank of a mini-batch", a.micro_batch_size)
        if a.logprob_micro_batch_size is not None:
            if per_rank % a.logprob_micro_batch_size != 0:
                raise ConfigError("AlgorithmConfig", "logprob_micro_batch_size",
                                  f"a divisor of the {per_rank} samples per DP rank and step", a.logprob_micro_batch_size)
            if p.cp > 1:
                raise ConfigError("AlgorithmConfig", "logprob_micro_batch_size",
                                  f"None (the update's micro-batch) under context parallelism (cp = {p.cp})",
                                  a.logprob_micro_batch_size)
        sft_mb = self.run.sft_micro_batch_size or a.micro_batch_size
        if self.run.sft_steps and per_rank % sft_mb != 0:
            raise ConfigError("RunConfig", "sft_micro_batch_size",
                              f"a divisor of the {per_rank} samples per DP rank and warm-start step", sft_mb)
        stages = p.pp * (p.vpp or 1)
        if self.model.num_layers % stages != 0:
            raise ConfigError("TinyMoEConfig", "num_layers", f"a multiple of pp x vpp = {stages} (even pipeline "
                              "stages)", self.model.num_layers)
        if a.routing_replay == "r2" and r.old_logprobs != "recompute":
            raise ConfigError("RolloutConfig", "old_logprobs", "'recompute' with routing_replay='r2' (it records the "
                              "trainer's routing in the old-log-prob pass)", r.old_logprobs)
        if r.engine == "sglang" and r.embedded != EmbeddedEngineConfig():
            changed = next(f.name for f in dataclasses.fields(EmbeddedEngineConfig)
                           if getattr(r.embedded, f.name) != getattr(EmbeddedEngineConfig(), f.name))
            raise ConfigError("EmbeddedEngineConfig", changed, "its default with engine='sglang' (the server decides "
                              "it)", getattr(r.embedded, changed))
        if a.routing_replay == "r3" and r.engine == "embedded" and p.tp * p.cp * p.pp != 1:
            raise ConfigError("AlgorithmConfig", "routing_replay", "'r2' or 'off' with the embedded engine unless "
                              f"tp = cp = pp = 1 (r3 records routing where one rank sees every token and layer; here "
                              f"tp={p.tp}, cp={p.cp}, pp={p.pp}), or the SGLang engine", a.routing_replay)
        if not isinstance(self.task, ArithmeticTaskConfig | ReasoningTaskConfig | MathTaskConfig):
            raise ConfigError("TrainerConfig", "task", "an ArithmeticTaskConfig, a ReasoningTaskConfig or a "
                              "MathTaskConfig", self.task)
        if isinstance(self.task, MathTaskConfig) and not (self.hf.tokenizer or self.hf.load):
            raise ConfigError("HFCheckpointConfig", "tokenizer", "a Hugging Face tokenizer directory for a dataset "
                              "task (or load, to use the checkpoint's)", None)
        if r.sglang.weight_sync.mode != "disk" and r.engine != "sglang":
            raise ConfigError("WeightSyncConfig", "mode", f"'disk' with engine={r.engine!r} (the others stream weights "
                              "to an SGLang server)", r.sglang.weight_sync.mode)
        if self.hf.load is not None:
            from vespo_megatron.hf.config import check_matches_hf, load_hf_config

            check_matches_hf(self.model, load_hf_config(self.hf.load), source=f"hf checkpoint {self.hf.load!r}")
        moe = self.model.moe_layer_freq
        if a.routing_replay != "off" and not any(self.model.moe_pattern()):
            raise ConfigError("AlgorithmConfig", "routing_replay", f"'off' for a model without MoE layers "
                              f"(moe_layer_freq={moe!r})", a.routing_replay)
