"""The off-policy RL loop on megatron-core, launched by torchrun (or plain python for one process).

    for step in range(start, steps):
        generations = engine.generate(requests for this DP rank's prompt groups)      # rollout
        samples     = rewards -> validation (counted rejections) -> group advantages
        micro       = RL micro-batches for this rank (THD packing, CP split)
        old logp    = trainer forward at the rollout weights (or the engine's log-probs)
        for mini in split(micro, N):                                                  # N = staleness
            forward/backward through megatron's schedule, clip, optimizer step
        engine.update_weights(model, version = step + 1)                              # weight sync
        log metrics, checkpoint every K steps

Shape legend: [B] samples of a micro-batch, [b, s] one rank's packed tokens of a micro-batch.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import shutil
import time

import torch
import torch.distributed as dist

from vespo_megatron.base.metric import Metric, finalize_metrics, merge_metrics
from vespo_megatron.compat import get_forward_backward_func
from vespo_megatron.data.math_reward import FAILURE_REASONS
from vespo_megatron.data.math_task import MathTask, MathTaskConfig
from vespo_megatron.hf.bridge import (
    gather_hf_tensors,
    hf_config_from_model,
    load_hf_weights,
    save_hf_checkpoint,
)
from vespo_megatron.hf.config import load_hf_config
from vespo_megatron.losses.inputs import sequence_sums
from vespo_megatron.megatron.cpu_shim import cpu_device_context
from vespo_megatron.megatron.model import build_gpt_model
from vespo_megatron.megatron.parallel_setup import initialize_parallel
from vespo_megatron.megatron.rl_batch import RLMicroBatch, RLSample, build_rl_microbatch
from vespo_megatron.megatron.step import RLStep, RLStepConfig, StepGroups
from vespo_megatron.metrics.mismatch import (
    derive_mismatch,
    mismatch_metrics,
    response_stats,
    staleness_histogram,
)
from vespo_megatron.parallel.cp_split import round_up
from vespo_megatron.parallel.reduce_metrics import all_reduce_metrics
from vespo_megatron.parallel.sequence import all_reduce_sum
from vespo_megatron.routing import RoutingRecord, strided_fill
from vespo_megatron.routing.alignment import moe_layer_numbers
from vespo_megatron.routing.replay import RoutingReplay, RoutingReplayConfig

from .checkpoint import load_latest_checkpoint, save_checkpoint
from .config import TrainerConfig
from .embedded_engine import EmbeddedEngine, EmbeddedEngineConfig
from .engine import GenerationRequest
from .optim import clip_and_step, wrap_ddp_and_optimizer
from .samples import Rejections, build_samples
from .toy_task import ArithmeticTask
from .weight_sync import DistributedWeightSender

__all__ = ["Trainer", "make_task"]


def make_task(cfg: TrainerConfig):
    """The toy arithmetic task, or a prompt dataset scored by the math checker (HF tokenizer from a local dir)."""
    if isinstance(cfg.task, MathTaskConfig):
        from transformers import AutoTokenizer

        return MathTask(cfg.task, AutoTokenizer.from_pretrained(cfg.hf.tokenizer or cfg.hf.load))
    return ArithmeticTask(cfg.task)


class Trainer:
    def __init__(self, cfg: TrainerConfig, *, log_fn=None):
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        cfg.validate(self.world_size)
        self.cfg = cfg
        self.task = make_task(cfg)
        if cfg.model.vocab_size < self.task.tok.vocab_size:
            raise ValueError(f"TinyMoEConfig.vocab_size: expected >= the tokenizer's {self.task.tok.vocab_size}, "
                             f"got {cfg.model.vocab_size}")
        self.groups = g = initialize_parallel(cfg.parallel)
        replay_mode = cfg.algorithm.routing_replay
        model_cfg = dataclasses.replace(cfg.model, moe_enable_routing_replay=replay_mode != "off")
        model = build_gpt_model(model_cfg, cfg.parallel, g, attention_backend="auto")
        # The config that exported checkpoints carry (rollout engines and evaluators read HF checkpoints).
        self.hf_config = load_hf_config(cfg.hf.load) if cfg.hf.load else hf_config_from_model(model_cfg)
        if cfg.hf.load:
            load_hf_weights(model, g, cfg.hf.load, hf_config=self.hf_config, model_cfg=model_cfg)
        self._sender = None  # DistributedWeightSender, opened on the first streamed sync (rank 0)
        self.model, self.optimizer = wrap_ddp_and_optimizer(
            model, lr=cfg.algorithm.lr, weight_decay=cfg.algorithm.weight_decay, clip_grad=cfg.algorithm.clip_grad,
            distributed_optimizer=cfg.algorithm.distributed_optimizer)
        self.step_fn = RLStep(RLStepConfig(loss_name=cfg.algorithm.loss, loss_config=cfg.algorithm.loss_config(),
                                           temperature=cfg.rollout.temperature), StepGroups(tp=g.tp, cp=g.cp))
        # Routing replay (megatron's RouterReplay): R3 replays the engine's routing, R2 the trainer's own
        # routing recorded in the old-log-prob pass. "off" builds no controller.
        self.replay = None
        if replay_mode != "off":
            self.replay = RoutingReplay(RoutingReplayConfig(mode=replay_mode), [self.model], tp_size=g.tp_size,
                                        tp_rank=g.tp_rank)
        self.moe_layers = moe_layer_numbers(model_cfg.moe_layer_freq, model_cfg.num_layers)
        self._replica_group, self._replica_src = self._replica_groups()
        self.reward_failures: collections.Counter = collections.Counter()  # math checker failures, per reason
        if cfg.rollout.engine == "sglang":
            self.engine = self._sglang_engine(model_cfg)
        else:
            self.engine = EmbeddedEngine(
                EmbeddedEngineConfig(precision=cfg.rollout.precision, lag=cfg.rollout.async_lag,
                                     record_routing=replay_mode == "r3"),
                self.model, g, vocab_size=self.task.tok.vocab_size, eos_id=self.task.tok.EOS,
                moe_layers=self.moe_layers, num_experts=model_cfg.num_experts)
        cp_mult = 2 * g.cp_size if g.cp_size > 1 else 1
        self.pad_multiple = cp_mult * (g.tp_size if cfg.parallel.sp else 1)
        longest = round_up(self.task.max_prompt_tokens + self.task.max_new_tokens, self.pad_multiple)
        self._longest = longest
        self.packed_len = cfg.algorithm.micro_batch_size * longest  # fixed: pipeline shapes, EP all-gather sizes
        # The rank that logs: last pipeline stage, first of TP / CP / DP (it holds the reduced loss metrics).
        self.is_log_rank = g.is_last_stage and g.tp_rank == 0 and g.cp_rank == 0 and g.dp_rank == 0
        self.log_fn = log_fn
        self.rejections = Rejections()

    def _sglang_engine(self, model_cfg):
        """The SGLang client on the first rank of each DP replica (TP / CP / PP rank 0); the other ranks of
        the replica receive its generations (`_replica_group`)."""
        from vespo_megatron.routing import RoutingSpec

        from .sglang_engine import SGLangEngine, SGLangEngineConfig

        spec = None
        if self.cfg.algorithm.routing_replay == "r3":
            spec = RoutingSpec(num_hidden_layers=model_cfg.num_layers, moe_layers=tuple(self.moe_layers),
                               top_k=model_cfg.moe_router_topk, num_experts=model_cfg.num_experts)
        engine = SGLangEngine(SGLangEngineConfig(base_url=self.cfg.rollout.sglang_url, routing_spec=spec))
        if self.rank == self._replica_src:
            engine.check_server()
        return engine

    def _replica_groups(self):
        """(group, first rank) of this rank's DP replica: the ranks that train on the same samples."""
        if self.world_size == 1:
            return None, 0
        g = self.groups
        everyone = [None] * self.world_size
        dist.all_gather_object(everyone, g.dp_rank)
        replicas = [dist.new_group([r for r, d in enumerate(everyone) if d == dp]) for dp in range(g.dp_size)]
        return replicas[g.dp_rank], min(r for r, d in enumerate(everyone) if d == g.dp_rank)

    def _from_replica_source(self, compute):
        """`compute()` run on the replica's first rank, its result on every rank of the replica."""
        if self._replica_group is None or dist.get_world_size(self._replica_group) == 1:
            return compute()
        out = [compute() if self.rank == self._replica_src else None]
        dist.broadcast_object_list(out, src=self._replica_src, group=self._replica_group)
        return out[0]

    def _rewards(self, problems, outputs) -> list[float]:
        """The task's reward for each (problem, output ids). Math-checker rewards are computed once per DP
        replica (in one batch, by the checker's worker pool): a check that times out on one rank and not on
        another would give the replica's TP / CP / PP ranks different advantages for the same samples."""
        if not isinstance(self.task, MathTask):
            return [self.task.reward(p, o) for p, o in zip(problems, outputs, strict=True)]
        results = self._from_replica_source(lambda: self.task.score_many(problems, outputs))
        self.reward_failures.update(r.reason for r in results if r.reason in FAILURE_REASONS)
        return [r.reward for r in results]

    def _generate(self, requests, seed: int):
        """Generations for this DP replica, one per request; a per-sample engine failure becomes a
        generation with finish_reason "error" (rejected and counted as `engine_error`)."""
        if not isinstance(self.engine, EmbeddedEngine):
            from .engine import Generation

            return self._from_replica_source(lambda: [r if isinstance(r, Generation) else Generation(
                sample_id=q.sample_id, prompt_ids=q.prompt_ids, output_ids=(), output_logprobs=(),
                weight_version=self.engine.weight_version, finish_reason="error")
                for q, r in zip(requests, self.engine.generate_results(requests), strict=True)])
        return self.engine.generate(requests, seed=seed)

    def _sync_weights(self, version: int) -> None:
        """Embedded engine: snapshot the weights (it generates with this model). SGLang: the policy as a
        Hugging Face checkpoint, either written to <out_dir>/weights/v<version> and loaded by the server
        (`/update_weights_from_disk`; the previous version's directory is removed afterwards) or streamed in
        buckets (`/update_weights_from_distributed`, weight_sync.mode="distributed"); tagged `version`."""
        if isinstance(self.engine, EmbeddedEngine):
            self.engine.update_weights(self.model, version=version)
            return
        ws, g = self.cfg.weight_sync, self.groups
        if ws.mode == "distributed":
            tensors = gather_hf_tensors(self.model, g, self.hf_config, dst=0)
            if self.rank == 0:
                if self._sender is None:
                    self._sender = DistributedWeightSender(self.engine, ws)
                    self._sender.open()
                self._sender.send(tensors, version)
            else:
                for _ in tensors:  # the gathers are collective
                    pass
        else:
            root = os.path.join(self.cfg.run.out_dir, "weights")
            path = self._write_hf(os.path.join(root, f"v{version:07d}"))
            if self.rank == 0:
                self.engine.update_weights(path, version)
                for old in os.listdir(root):  # the server has loaded `path`; older versions are not needed
                    if old.startswith("v") and old != os.path.basename(path):
                        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
        if self.world_size > 1:
            dist.barrier()

    def save_hf(self, step: int) -> str:
        """Write the policy as a Hugging Face checkpoint to <out_dir>/hf/step_<step> (collective)."""
        return self._write_hf(os.path.join(self.cfg.run.out_dir, "hf", f"step_{step:07d}"))

    def _write_hf(self, path: str) -> str:
        save_hf_checkpoint(self.model, self.groups, path, hf_config=self.hf_config, source_dir=self.cfg.hf.load,
                           dtype=getattr(torch, self.cfg.hf.save_dtype))
        return path

    # ------------------------------------------------------------------ pieces of one step

    def _micro_batches(self, samples: list[RLSample], num_micro: int, filler: RLSample,
                       seq_len: int | None = None) -> list[RLMicroBatch]:
        """Split samples into `num_micro` micro-batches as evenly as possible (rejections make it uneven).
        Every rank runs the same number of micro-batches (pipeline schedule, DDP): a micro-batch left without
        samples is an inert copy of `filler` with an empty loss mask (no tokens, no loss, no gradient)."""
        g = self.groups
        bounds = [round(i * len(samples) / num_micro) for i in range(num_micro + 1)]
        out = []
        for i in range(num_micro):
            part = samples[bounds[i]:bounds[i + 1]]
            mb = build_rl_microbatch(part or [filler], layout="thd", cp_size=g.cp_size, cp_rank=g.cp_rank,
                                     pad_multiple=self.pad_multiple, seq_len=seq_len or self.packed_len)
            out.append(mb if part else dataclasses.replace(mb, loss_mask=torch.zeros_like(mb.loss_mask)))
        return out

    def _filler(self, prompt_ids) -> RLSample:
        """A one-token sample (never trained on: its loss mask is cleared) for micro-batches left empty."""
        routing = None
        if self.cfg.algorithm.routing_replay == "r3":
            k = self.cfg.model.moe_router_topk
            ids = strided_fill(len(prompt_ids), len(self.moe_layers), k, self.cfg.model.num_experts)
            routing = RoutingRecord(sample_id="filler", expert_ids=ids, num_prompt_tokens=len(prompt_ids),
                                    num_output_tokens=1, moe_layers=self.moe_layers,
                                    num_experts=self.cfg.model.num_experts)
        return RLSample(prompt=torch.tensor(prompt_ids), response=torch.tensor([self.task.tok.EOS]),
                        old_logp=torch.zeros(1), rollout_logp=torch.zeros(1), advantage=0.0, routing=routing)

    def _schedule(self, forward_step, micro_batches, *, forward_only: bool, kind: str | None = None, start: int = 0):
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

    def _recompute_old_logprobs(self, micro_batches: list[RLMicroBatch]) -> tuple[list[RLMicroBatch], dict]:
        """The trainer's log-probs at the rollout weights become mu; the engine's stay as rollout log-probs."""
        self.model.eval()
        with torch.no_grad():
            outs, routing = self._schedule(self.step_fn.logprob_forward_step(), micro_batches, forward_only=True,
                                           kind="old_logp")
        self.model.train()
        if not self.groups.is_last_stage:
            return micro_batches, {}, routing
        new, metrics = [], []
        for mb, out in zip(micro_batches, outs, strict=True):
            logp = out["logp"].float().cpu()
            metrics.append(self._mismatch(mb, logp))
            new.append(dataclasses.replace(mb, old_logp=torch.where(mb.loss_mask, logp, mb.old_logp)))
        return new, merge_metrics(metrics), routing

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
        outs, routing = self._schedule(self.step_fn.forward_step(normalizer), micro_batches, forward_only=False,
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
        prompts_per_rank = cfg.rollout.prompts_per_step // g.dp_size
        problems = self.task.problems(step, cfg.rollout.prompts_per_step)[g.dp_rank * prompts_per_rank:
                                                                       (g.dp_rank + 1) * prompts_per_rank]
        requests, groups_of = [], []
        for i, p in enumerate(problems):
            for j in range(cfg.rollout.group_size):
                requests.append(GenerationRequest(sample_id=f"{step}/{g.dp_rank}/{i}/{j}", prompt_ids=p.prompt_ids,
                                                  max_new_tokens=self.task.max_new_tokens,
                                                  temperature=cfg.rollout.temperature,
                                                  stop_token_ids=(self.task.tok.EOS,),
                                                  return_routing=cfg.algorithm.routing_replay == "r3"))
                groups_of.append(i)
        gens = self._generate(requests, seed=hash((cfg.run.seed, step, g.dp_rank)) % (2**63))
        before = self.rejections.total()
        need_routing = (len(self.moe_layers), cfg.model.moe_router_topk) if cfg.algorithm.routing_replay == "r3" else None
        samples, scored = build_samples(
            gens, groups_of,
            lambda idx, valid: self._rewards([problems[groups_of[i]] for i in idx], [gen.output_ids for gen in valid]),
            self.rejections, vocab_size=self.task.tok.vocab_size, adv_eps=cfg.algorithm.adv_eps, routing=need_routing)
        t_rollout = time.time() - t0
        num_micro = cfg.rollout.samples_per_step // g.dp_size // cfg.algorithm.micro_batch_size
        micro = self._micro_batches(samples, num_micro, self._filler(requests[0].prompt_ids))
        metrics, routing = {}, []
        if cfg.rollout.old_logprobs == "recompute":
            micro, metrics, old_routing = self._recompute_old_logprobs(micro)
            routing.append({k.replace("routing/", "routing_old_logp/", 1): v for k, v in old_routing.items()})
        per_mini = num_micro // cfg.algorithm.staleness
        updates = [self._update(micro[k * per_mini:(k + 1) * per_mini], start=k * per_mini)
                   for k in range(cfg.algorithm.staleness)]
        metrics = merge_metrics([metrics, *(u[0] for u in updates)])
        routing = merge_metrics([*routing, *(u[1] for u in updates)])
        self._sync_weights(step + 1)

        rewards = torch.tensor([s.reward for s in scored], dtype=torch.float64)
        lengths = torch.tensor([len(s.generation.output_ids) for s in scored], dtype=torch.float64)
        lags = torch.tensor([step - s.generation.weight_version for s in scored], dtype=torch.long)
        # Rollout statistics are per sample and the same on every TP / CP / PP rank of a DP rank: reduce over DP.
        rollout = {**response_stats(lengths, rewards, binary=True),
                   **staleness_histogram(lags, max_lag=max(1, cfg.rollout.async_lag)),
                   "reward_mean": Metric.mean(rewards),
                   "rollout/rejected": Metric.sum(torch.tensor(float(self.rejections.total() - before)))}
        if g.is_last_stage and g.tp_rank == 0:
            metrics = all_reduce_metrics(metrics, g.dp_cp)
        metrics.update(all_reduce_metrics(rollout, g.dp))
        if self.replay is not None:  # every rank routes its own tokens / layers: reduce over the world
            metrics.update(all_reduce_metrics(routing, dist.group.WORLD if dist.is_initialized() else None))
        values = derive_mismatch(finalize_metrics(metrics))
        for reason, count in self.rejections.counts.items():
            values[f"rollout/rejected_total/{reason}"] = float(count)  # this rank's running totals
        if isinstance(self.task, MathTask):  # this rank's running totals: checker outcomes, dataset rows skipped
            values.update({f"reward/fail_total/{k}": float(self.reward_failures[k]) for k in FAILURE_REASONS})
            values.update({f"data/skipped/{k}": float(v) for k, v in self.task.skipped.items()})
        values.update({"time/step_s": time.time() - t0, "time/rollout_s": t_rollout, "weight_version": step + 1})
        if torch.cuda.is_available():  # this (logging) rank's peak; every rank of a balanced layout is alike
            values["memory/max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return values

    def evaluate(self, step: int) -> dict[str, float]:
        """pass@1 / mean@k / pass@k on the task's held-out prompts, k samples each (collective).

        The prompts are split evenly over DP ranks (a remainder is left out: eval/num_problems says how many
        were used); an engine error counts as a wrong sample and in eval/errors."""
        ec, g = self.cfg.eval, self.groups
        problems = self.task.eval_problems()[: ec.max_problems]
        per_rank = len(problems) // g.dp_size
        if per_rank == 0:
            raise ValueError(f"EvalConfig: {len(problems)} held-out prompts cannot be split over {g.dp_size} "
                             "data-parallel ranks; hold out more (eval_count)")
        mine = problems[g.dp_rank * per_rank:(g.dp_rank + 1) * per_rank]
        requests = [GenerationRequest(sample_id=f"eval{step}/{g.dp_rank}/{i}/{j}", prompt_ids=p.prompt_ids,
                                      max_new_tokens=self.task.max_new_tokens, temperature=ec.temperature,
                                      stop_token_ids=(self.task.tok.EOS,))
                    for i, p in enumerate(mine) for j in range(ec.k)]
        gens = self._generate(requests, seed=hash((self.cfg.run.seed, "eval", step, g.dp_rank)) % (2**63))
        ok = [i for i, gen in enumerate(gens) if gen.finish_reason != "error"]
        scored = self._rewards([mine[i // ec.k] for i in ok], [gens[i].output_ids for i in ok])
        rewards = torch.zeros(len(gens), dtype=torch.float64)
        rewards[ok] = torch.tensor(scored, dtype=torch.float64)
        rewards = rewards.view(len(mine), ec.k)
        correct = (rewards >= 0.5).double()
        errors = sum(gen.finish_reason == "error" for gen in gens)
        lengths = torch.tensor([float(len(gen.output_ids)) for gen in gens], dtype=torch.float64)
        metrics = {
            "eval/pass@1": Metric.mean(correct.mean(dim=1)),  # unbiased from k samples: c / k per prompt
            f"eval/mean@{ec.k}": Metric.mean(rewards.reshape(-1)),
            f"eval/pass@{ec.k}": Metric.mean(correct.amax(dim=1)),
            "eval/response_length": Metric.mean(lengths),
            "eval/errors": Metric.sum(torch.tensor(float(errors))),
            "eval/num_problems": Metric.sum(torch.tensor(float(len(mine)))),
        }
        return finalize_metrics(all_reduce_metrics(metrics, g.dp))

    def sft_warm_start(self) -> None:
        """Supervised warm start on correct answers: REINFORCE with A = 1 is maximum likelihood."""
        cfg, g = self.cfg, self.groups
        sft_step = RLStep(RLStepConfig(loss_name="reinforce", compute_entropy=False), StepGroups(tp=g.tp, cp=g.cp))
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.run.sft_lr
        n = cfg.rollout.samples_per_step // g.dp_size
        sft_mb = cfg.run.sft_micro_batch_size or cfg.algorithm.micro_batch_size
        if n % sft_mb:
            raise ValueError(f"RunConfig.sft_micro_batch_size: expected a divisor of the {n} samples per DP rank "
                             f"and step, got {sft_mb}")
        for k in range(cfg.run.sft_steps):
            problems = self.task.problems(k, cfg.rollout.samples_per_step, split="sft")[g.dp_rank * n:(g.dp_rank + 1) * n]
            answers = [torch.tensor(self.task.answer_ids(p)) for p in problems]
            samples = [RLSample(prompt=torch.tensor(p.prompt_ids), response=a, old_logp=torch.zeros(len(a)), advantage=1.0)
                       for p, a in zip(problems, answers, strict=True)]
            micro = self._micro_batches(samples, n // sft_mb, samples[0], seq_len=sft_mb * self._longest)
            self.model.zero_grad_buffer()
            self.optimizer.zero_grad()
            normalizer = sft_step.normalizer(micro, dp_group=g.dp)
            self._schedule(sft_step.forward_step(normalizer), micro, forward_only=False)  # routes live
            clip_and_step(self.optimizer, cfg.algorithm.clip_grad)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.algorithm.lr
        # RL starts with fresh Adam moments.
        for sub in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            sub.optimizer.state.clear()

    def resume(self) -> int:
        """Restore the newest checkpoint under run.out_dir (or warm-start a fresh run); the first step to run."""
        cfg = self.cfg
        resumed = load_latest_checkpoint(self.ckpt_dir, model=self.model, optimizer=self.optimizer, rank=self.rank,
                                         world_size=self.world_size)
        if resumed is not None:
            if isinstance(self.engine, EmbeddedEngine):
                self.engine.load_state(resumed["extra"]["engine"])
            else:
                self._sync_weights(resumed["step"] + 1)
            return resumed["step"] + 1
        if cfg.run.sft_steps:
            self.sft_warm_start()
        self._sync_weights(0)
        return 0

    @property
    def ckpt_dir(self) -> str:
        return os.path.join(self.cfg.run.out_dir, "checkpoints")

    def run(self, start: int | None = None) -> list[dict[str, float]]:
        start = self.resume() if start is None else start
        history = []
        for step in range(start, self.cfg.run.steps):
            values = self.rl_step(step)
            ev, hf = self.cfg.eval, self.cfg.hf
            if ev.every and (step + 1) % ev.every == 0:
                values.update(self.evaluate(step))
            if hf.save_every and (step + 1) % hf.save_every == 0 or hf.save_final and step + 1 == self.cfg.run.steps:
                self.save_hf(step + 1)
            history.append(values)
            if self.log_fn is not None and self.is_log_rank:
                self.log_fn(step, values)
            every = self.cfg.run.checkpoint_every
            if every and (step + 1) % every == 0:
                engine_state = self.engine.state() if isinstance(self.engine, EmbeddedEngine) else {}
                save_checkpoint(self.ckpt_dir, step, model=self.model, optimizer=self.optimizer,
                                extra={"engine": engine_state}, rank=self.rank, world_size=self.world_size)
        return history
