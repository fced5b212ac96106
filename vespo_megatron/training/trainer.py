"""The off-policy RL loop on megatron-core, launched by torchrun (or plain python for one process).

    for step in range(start, steps):
        generations = engine.generate(this DP replica's requests)                     # rollout
        samples     = rewards -> validation (counted rejections) -> advantages
        micro       = RL micro-batches for this rank (THD packing, CP split)
        old logp    = trainer forward at the rollout weights (or the engine's log-probs)
        for mini in split(micro, N):                                                  # N = staleness
            forward/backward through megatron's schedule, clip, optimizer step
        engine.sync_weights(policy, version = step + 1)                               # weight sync
        log metrics, checkpoint every K steps

The engine is whatever `vespo_megatron.rollout.factory` built from the config; the trainer never asks which.
Shape legend: [B] samples of a micro-batch, [b, s] one rank's packed tokens of a micro-batch.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import torch
import torch.distributed as dist

from vespo_megatron.base.metric import Metric, finalize_metrics, merge_metrics
from vespo_megatron.compat import get_forward_backward_func
from vespo_megatron.hf.bridge import hf_config_from_model, load_hf_weights
from vespo_megatron.hf.config import load_hf_config
from vespo_megatron.losses.inputs import sequence_sums
from vespo_megatron.megatron.cpu_shim import cpu_device_context
from vespo_megatron.megatron.model import build_gpt_model
from vespo_megatron.megatron.parallel_setup import initialize_parallel
from vespo_megatron.megatron.rl_batch import RLMicroBatch
from vespo_megatron.megatron.step import RLStep, RLStepConfig, StepGroups
from vespo_megatron.metrics.mismatch import derive_mismatch, mismatch_metrics
from vespo_megatron.parallel.reduce_metrics import all_reduce_metrics
from vespo_megatron.parallel.sequence import all_reduce_sum
from vespo_megatron.rollout.engine import GenerationRequest
from vespo_megatron.rollout.factory import EngineContext, build_engine
from vespo_megatron.rollout.replica import replica_of
from vespo_megatron.rollout.weights import MegatronPolicyWeights
from vespo_megatron.routing.alignment import moe_layer_numbers
from vespo_megatron.routing.replay import RoutingReplay, RoutingReplayConfig

from .advantages import resolve_advantage
from .batching import MicroBatcher
from .checkpoint import check_writable, load_latest_checkpoint, save_checkpoint, state_bytes
from .config import TrainerConfig
from .evaluation import evaluate
from .optim import clip_and_step, wrap_ddp_and_optimizer
from .rewards import RewardScorer, make_task, rollout_metrics, task_counters
from .run_dir import check_init_checkpoint, check_run_config
from .samples import Rejections, build_samples, sampling_seed
from .sft import sft_warm_start

__all__ = ["Trainer", "make_task"]


class Trainer:
    def __init__(self, cfg: TrainerConfig, *, log_fn=None):
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        cfg.validate(self.world_size)
        self.cfg, self.log_fn = cfg, log_fn
        self.task = make_task(cfg)
        if cfg.model.vocab_size < self.task.tok.vocab_size:
            raise ValueError(f"TinyMoEConfig.vocab_size: expected >= the tokenizer's {self.task.tok.vocab_size}, "
                             f"got {cfg.model.vocab_size}")
        self.groups = g = initialize_parallel(cfg.parallel)
        algo, replay_mode = cfg.algorithm, cfg.algorithm.routing_replay
        model_cfg = dataclasses.replace(cfg.model, moe_enable_routing_replay=replay_mode != "off")
        model = build_gpt_model(model_cfg, cfg.parallel, g, attention_backend="auto")
        # The config that exported checkpoints carry (rollout engines and evaluators read HF checkpoints).
        hf_config = load_hf_config(cfg.hf.load) if cfg.hf.load else hf_config_from_model(model_cfg)
        if cfg.hf.load:
            load_hf_weights(model, g, cfg.hf.load, hf_config=hf_config, model_cfg=model_cfg)
        self.model, self.optimizer = wrap_ddp_and_optimizer(
            model, lr=algo.lr, weight_decay=algo.weight_decay, clip_grad=algo.clip_grad,
            distributed_optimizer=algo.distributed_optimizer)
        self.policy = MegatronPolicyWeights(self.model, g, hf_config, source_dir=cfg.hf.load,
                                            save_dtype=getattr(torch, cfg.hf.save_dtype))
        self.step_fn = RLStep(RLStepConfig(loss_name=algo.loss, loss_config=algo.loss_config,
                                           temperature=cfg.rollout.temperature,
                                           fused_lm_head=cfg.perf.fused_lm_head,
                                           lm_head_chunk_elements=cfg.perf.lm_head_chunk_elements,
                                           lm_head_single_pass=cfg.perf.single_pass,
                                           lm_head_whole_sequence_elements=cfg.perf.lm_head_whole_sequence_elements),
                              StepGroups(tp=g.tp, cp=g.cp))
        # Routing replay (megatron's RouterReplay): R3 replays the engine's routing, R2 the trainer's own
        # routing recorded in the old-log-prob pass. "off" builds no controller.
        self.replay = None
        if replay_mode != "off":
            self.replay = RoutingReplay(RoutingReplayConfig(mode=replay_mode), [self.model], tp_size=g.tp_size,
                                        tp_rank=g.tp_rank)
        self.moe_layers = moe_layer_numbers(model_cfg.moe_layer_freq, model_cfg.num_layers)
        self.replica = replica_of(g.dp_rank, g.dp_size)
        self.rewards = RewardScorer(self.task, self.replica)
        self.advantages = resolve_advantage(algo.advantage)
        self.engine = build_engine(cfg.rollout, EngineContext(
            model=self.model, groups=g, replica=self.replica, vocab_size=self.task.tok.vocab_size,
            eos_id=self.task.tok.EOS, num_layers=model_cfg.num_layers, moe_layers=tuple(self.moe_layers),
            num_experts=model_cfg.num_experts, top_k=model_cfg.moe_router_topk,
            record_routing=replay_mode == "r3", out_dir=cfg.run.run_dir))
        self.batcher = MicroBatcher(
            g, sp=cfg.parallel.sp, longest=self.task.max_prompt_tokens + self.task.max_new_tokens,
            micro_batch_size=algo.micro_batch_size, eos_id=self.task.tok.EOS,
            routing=(tuple(self.moe_layers), model_cfg.moe_router_topk, model_cfg.num_experts)
            if replay_mode == "r3" else None)
        # The rank that logs: last pipeline stage, first of TP / CP / DP (it holds the reduced loss metrics).
        self.is_log_rank = g.is_last_stage and g.tp_rank == 0 and g.cp_rank == 0 and g.dp_rank == 0
        self.rejections = Rejections()

    # ------------------------------------------------------------------ pieces of one step

    def requests(self, tag: str, problems, n: int, temperature: float, *, routing: bool = False):
        """`n` generation requests per problem, ids `<tag>/<dp rank>/<problem>/<sample>`."""
        return [GenerationRequest(sample_id=f"{tag}/{self.groups.dp_rank}/{i}/{j}", prompt_ids=p.prompt_ids,
                                  max_new_tokens=self.task.max_new_tokens, temperature=temperature,
                                  stop_token_ids=(self.task.tok.EOS,), return_routing=routing)
                for i, p in enumerate(problems) for j in range(n)]

    def schedule(self, forward_step, micro_batches, *, forward_only: bool, kind: str | None = None, start: int = 0):
        """Run megatron's schedule over `micro_batches`; with routing replay, as pass `kind` of the step.
        Returns (per-micro-batch outputs on the last stage, routing-agreement metrics)."""
        data = iter(micro_batches)
        if self.replay is not None and kind is not None:
            self.replay.begin_pass(kind)
            data = self.replay.data_iterator(micro_batches, start=start)
        with cpu_device_context():
            outs = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=data, model=[self.model],
                num_microbatches=len(micro_batches), seq_length=micro_batches[0].tokens.size(1) * self.groups.cp_size,
                micro_batch_size=1, forward_only=forward_only)
        routing = self.replay.end_pass() if self.replay is not None and kind is not None else {}
        return outs, routing

    def _recompute_old_logprobs(self, micro_batches: list[RLMicroBatch], samples, filler):
        """The trainer's log-probs at the rollout weights become mu; the engine's stay as rollout log-probs.
        With algorithm.logprob_micro_batch_size the pass runs on packs of that many samples and its values go
        back to the update's micro-batches (`_scatter_logp`)."""
        lp_size = self.cfg.algorithm.logprob_micro_batch_size
        passes = micro_batches
        if lp_size is not None and lp_size != self.cfg.algorithm.micro_batch_size:
            per_rank = self.cfg.rollout.samples_per_step // self.groups.dp_size
            passes = self.batcher.split(samples, per_rank // lp_size, filler, seq_len=lp_size * self.batcher.longest)
        self.model.eval()
        with torch.no_grad():
            outs, routing = self.schedule(self.step_fn.logprob_forward_step(), passes, forward_only=True,
                                          kind="old_logp")
        self.model.train()
        routing = {k.replace("routing/", "routing_old_logp/", 1): v for k, v in routing.items()}
        if not self.groups.is_last_stage:
            return micro_batches, {}, routing
        logps = [out["logp"].float().cpu() for out in outs]
        metrics = merge_metrics([self._mismatch(mb, logp) for mb, logp in zip(passes, logps, strict=True)])
        return _scatter_logp(passes, logps, micro_batches), metrics, routing

    def _mismatch(self, mb: RLMicroBatch, train_logp: torch.Tensor) -> dict:
        """Trainer vs rollout-engine log-probs on the loss's tokens; the [B] sequence sums are completed over
        context parallelism first, so sequence-level numbers do not depend on the split."""
        train, rollout = train_logp.reshape(-1), mb.rollout_logp.reshape(-1)
        mask, seq = mb.loss_mask.reshape(-1), mb.token_seq.reshape(-1)
        # rows: sum of (train - rollout), response-token count (the loss inputs' sums, mu = the engine)
        local = sequence_sums(logp=train, old_logp=rollout, mask=mask, token_seq=seq, num_seqs=mb.num_seqs)
        total = all_reduce_sum(local, self.groups.cp, differentiable=False)
        return mismatch_metrics(train, rollout, mask, seq, mb.num_seqs, seq_log_ratio=total[0], seq_num_tokens=total[1])

    def _update(self, micro_batches: list[RLMicroBatch], start: int) -> tuple[dict, dict]:
        """One optimizer step on the mini-batch of micro-batches [start, start + n) of this step; returns
        this rank's (unreduced) loss metrics and routing-agreement metrics."""
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        try:
            normalizer = self.step_fn.normalizer(micro_batches, dp_group=self.groups.dp)
        except ValueError:  # no response token left anywhere (every sample rejected): skip, counted
            return {"update_skipped": Metric.sum(torch.tensor(1.0))}, {}
        outs, routing = self.schedule(self.step_fn.forward_step(normalizer), micro_batches, forward_only=False,
                                      kind="update", start=start)
        updated, grad_norm = clip_and_step(self.optimizer, self.cfg.algorithm.clip_grad)
        metrics = merge_metrics([o["metrics"] for o in outs]) if self.groups.is_last_stage else {}
        if start == 0 and self.cfg.rollout.old_logprobs == "engine" and self.groups.is_last_stage:
            # mu is the engine's: no recompute pass measured trainer vs engine, so the first mini-batch's
            # forward (the weights of this step, before any update) does, under the same metric names.
            metrics.update(merge_metrics([self._mismatch(mb, o["logp"].float().cpu())
                                          for mb, o in zip(micro_batches, outs, strict=True)]))
        metrics["grad_norm_mean"] = Metric.mean(torch.tensor([grad_norm]))
        metrics["grad_norm_max"] = Metric.max(torch.tensor(grad_norm))
        metrics["update_skipped"] = Metric.sum(torch.tensor(0.0 if updated else 1.0))
        return metrics, routing

    # ------------------------------------------------------------------ the loop

    def rl_step(self, step: int) -> dict[str, float]:
        cfg, g, t0 = self.cfg, self.groups, time.time()
        r3 = cfg.algorithm.routing_replay == "r3"
        per_rank = cfg.rollout.prompts_per_step // g.dp_size
        problems = self.task.problems(step, cfg.rollout.prompts_per_step)[g.dp_rank * per_rank:
                                                                       (g.dp_rank + 1) * per_rank]
        requests = self.requests(str(step), problems, cfg.rollout.group_size, cfg.rollout.temperature, routing=r3)
        groups_of = [i for i in range(len(problems)) for _ in range(cfg.rollout.group_size)]
        t_generate = time.time()
        gens = self.engine.generate(requests, seed=sampling_seed(cfg.run.seed, step, g.dp_rank))
        t_generate = time.time() - t_generate
        before = self.rejections.total()
        samples, scored = build_samples(
            gens, groups_of,
            lambda idx, valid: self.rewards([problems[groups_of[i]] for i in idx], [v.output_ids for v in valid]),
            self.rejections, vocab_size=self.task.tok.vocab_size, adv_eps=cfg.algorithm.adv_eps,
            routing=(len(self.moe_layers), cfg.model.moe_router_topk) if r3 else None, advantages=self.advantages)
        t_rollout = time.time() - t0
        num_micro = cfg.rollout.samples_per_step // g.dp_size // cfg.algorithm.micro_batch_size
        filler = self.batcher.filler(requests[0].prompt_ids)
        micro = self.batcher.split(samples, num_micro, filler)
        metrics, routing = {}, {}
        if cfg.rollout.old_logprobs == "recompute":
            micro, metrics, routing = self._recompute_old_logprobs(micro, samples, filler)
        per_mini = num_micro // cfg.algorithm.staleness
        updates = [self._update(micro[k * per_mini:(k + 1) * per_mini], start=k * per_mini)
                   for k in range(cfg.algorithm.staleness)]
        metrics = merge_metrics([metrics, *(u[0] for u in updates)])
        routing = merge_metrics([routing, *(u[1] for u in updates)])
        self.engine.sync_weights(self.policy, step + 1)

        rollout = rollout_metrics(scored, step, max_lag=max(1, cfg.rollout.embedded.lag),
                                  rejected=self.rejections.total() - before)
        if g.is_last_stage and g.tp_rank == 0:
            metrics = all_reduce_metrics(metrics, g.dp_cp)
        metrics.update(all_reduce_metrics(rollout, g.dp))  # per sample, alike on a replica's ranks: over DP
        if self.replay is not None:  # every rank routes its own tokens / layers: reduce over the world
            metrics.update(all_reduce_metrics(routing, dist.group.WORLD if dist.is_initialized() else None))
        values = derive_mismatch(finalize_metrics(metrics))
        values.update(task_counters(self.rejections, self.rewards, self.task))
        values.update({"time/step_s": time.time() - t0, "time/rollout_s": t_rollout, "time/generate_s": t_generate,
                       "weight_version": step + 1})
        if torch.cuda.is_available():  # this (logging) rank's peak; every rank of a balanced layout is alike
            values["memory/max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return values

    def evaluate(self, step: int, k: int | None = None) -> dict[str, float]:
        return evaluate(self, step, k=k)

    def save_hf(self, step: int) -> str:
        """Write the policy as a Hugging Face checkpoint to <run_dir>/hf/step_<step> (collective)."""
        return self.policy.write_hf(os.path.join(self.cfg.run.run_dir, "hf", f"step_{step:07d}"))

    def say(self, message: str) -> None:
        """A line for the user, once (from the logging rank), on stderr beside the console metrics."""
        if self.is_log_rank:
            print(message, file=sys.stderr, flush=True)

    def resume(self) -> int:
        """The first step to run: after the newest intact checkpoint in the run's directory (run.run_dir), or 0
        after the warm start of a fresh run; run.steps or more when the run is already complete. First, before
        any model work: the directory must be writable with room for a checkpoint, and the config must match
        the one this run directory was started with (else ConfigMismatchError names the differing flags)."""
        run = self.cfg.run
        check_writable(run.run_dir, self.checkpoint_bytes_estimate())  # creates the directory, or says why not
        check_run_config(run.run_dir, self.cfg, rank=self.rank, log=self.say)
        if self.cfg.hf.load:  # the same path can hold another base (each device call unpacks its own there)
            check_init_checkpoint(run.run_dir, self.cfg.hf.load, rank=self.rank,
                                  allow_change=run.allow_config_change, log=self.say)
        resumed = load_latest_checkpoint(self.ckpt_dir, model=self.model, optimizer=self.optimizer, rank=self.rank,
                                         world_size=self.world_size)
        if resumed is not None:
            self.engine.load_state(resumed["extra"]["engine"], self.policy)
            start = resumed["step"] + 1
            self.say(f"already complete ({start} steps): {run.run_dir}" if start >= run.steps
                     else f"resumed from step {start} (of {run.steps}; steps 0-{start - 1} done): {run.run_dir}")
            return start
        if self.cfg.run.sft_steps:
            sft_warm_start(self)
        self.engine.sync_weights(self.policy, 0)
        return 0

    def checkpoint_bytes_estimate(self) -> int:
        """This rank's checkpoint size before the optimizer has state: the parameters plus Adam's two fp32
        moments and an fp32 master copy per parameter (0 when checkpoints are off)."""
        if not self.cfg.run.checkpoint_every:
            return 0
        params = sum(p.numel() for p in self.model.parameters())
        return state_bytes(self.model.state_dict()) + 12 * params

    @property
    def ckpt_dir(self) -> str:
        return os.path.join(self.cfg.run.run_dir, "checkpoints")

    def run(self, start: int | None = None) -> list[dict[str, float]]:
        start = self.resume() if start is None else start
        history = []
        for step in range(start, self.cfg.run.steps):
            values = self.rl_step(step)
            hf = self.cfg.hf
            k = self.cfg.eval.k_at(step, self.cfg.run.steps)
            if k is not None:
                values.update(self.evaluate(step, k=k))
            if hf.save_every and (step + 1) % hf.save_every == 0 or hf.save_final and step + 1 == self.cfg.run.steps:
                self.save_hf(step + 1)
            history.append(values)
            if self.log_fn is not None and self.is_log_rank:
                self.log_fn(step, values)
            every = self.cfg.run.checkpoint_every
            # also after the last step, so a finished run restarts as "already complete", not from scratch
            if every and ((step + 1) % every == 0 or step + 1 == self.cfg.run.steps):
                save_checkpoint(self.ckpt_dir, step, model=self.model, optimizer=self.optimizer,
                                extra={"engine": self.engine.state()}, rank=self.rank, world_size=self.world_size,
                                keep=self.cfg.run.keep_checkpoints)
        return history


def _scatter_logp(passes: list[RLMicroBatch], logps: list[torch.Tensor], micro_batches: list[RLMicroBatch]):
    """The log-probs of the loss tokens of `passes` as the old log-probs of `micro_batches`. Either the two are
    the same packs, or packs of the same samples in the same order without context parallelism: in both, a
    pack's loss tokens are its samples' response tokens, sample by sample, so the two flattened sequences are
    the same tokens."""
    values = torch.cat([logp[mb.loss_mask] for mb, logp in zip(passes, logps, strict=True)])
    counts = [int(mb.loss_mask.sum()) for mb in micro_batches]
    if sum(counts) != values.numel():
        raise RuntimeError(f"old log-prob pass: {values.numel()} loss tokens in the pass's packs, {sum(counts)} in "
                           "the update's micro-batches (the two packings must hold the same samples)")
    out = []
    for mb, part in zip(micro_batches, torch.split(values, counts), strict=True):
        old = mb.old_logp.clone()
        old[mb.loss_mask] = part
        out.append(dataclasses.replace(mb, old_logp=old))
    return out
