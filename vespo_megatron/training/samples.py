"""Generations -> RL samples: rewards, validation with counted rejection, advantages within each group.

A bad generation (empty response, non-finite log-probs, token ids outside the vocabulary, wrong routing
shape; a per-rank routing shard is checked against its own share) is dropped with a reason; the rest of its group keeps going (advantages are normalised over the
samples that remain). Nothing is dropped silently: `Rejections` counts every reason.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from vespo_megatron.megatron.rl_batch import RLSample
from vespo_megatron.rollout.engine import Generation, SampleError

from .advantages import Estimator, grpo_advantages

__all__ = ["Rejections", "ScoredSample", "validate_generation", "build_samples", "sampling_seed", "EVAL_STREAM"]

# The eval generations' seed stream, apart from the rollouts' (an int: see sampling_seed).
EVAL_STREAM = -1


def sampling_seed(*parts: int) -> int:
    """The engine seed of one generation call, a pure function of its int parts (run seed, step, DP rank, ...).
    Ints only: hash() of an int tuple is the same in every process, while a str in it is salted per process
    (PYTHONHASHSEED), which made the eval samples differ between runs and between a run and its resume.
    Rollouts: sampling_seed(seed, step, rank), the seed they always had."""
    if not all(isinstance(p, int) and not isinstance(p, bool) for p in parts):
        raise TypeError(f"sampling_seed: expected int parts, got {parts!r}")
    return hash(parts) % (2**63)


@dataclass
class Rejections:
    counts: collections.Counter = field(default_factory=collections.Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def add(self, reason: str, sample_id: str) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, str(sample_id))

    def total(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True)
class ScoredSample:
    generation: Generation
    reward: float
    group: int
    advantage: float = 0.0


def validate_generation(gen: Generation | SampleError, *, vocab_size: int, num_moe_layers: int = 0,
                        top_k: int = 0, need_routing: bool = False) -> str | None:
    """The reason this generation cannot be trained on, or None."""
    if isinstance(gen, SampleError):
        return "engine_error"
    if len(gen.output_ids) == 0:
        return "empty_response"
    if len(gen.output_logprobs) != len(gen.output_ids):
        return "logprob_count_mismatch"
    # (map with C functions: this runs on every token of every rollout, on the step's critical path)
    if not all(map(math.isfinite, gen.output_logprobs)):
        return "nonfinite_logprob"
    ids = (*gen.prompt_ids, *gen.output_ids)
    if int(min(ids)) < 0 or int(max(ids)) >= vocab_size:
        return "token_out_of_vocab"
    if need_routing:
        r = gen.routing
        if r is None:
            return "missing_routing"
        seq_len = len(gen.prompt_ids) + len(gen.output_ids)
        if r.cp_share is None:
            # Whole tokens; all the model's MoE layers, or (a PP shard, routing.shards) a subset of them.
            expected = (seq_len - 1, num_moe_layers if len(r.moe_layers) >= num_moe_layers else len(r.moe_layers),
                        top_k)
        else:
            # A per-rank CP shard: the routed positions of its share, which follow from P + O and the share.
            if r.num_prompt_tokens + r.num_output_tokens != seq_len or len(r.moe_layers) > num_moe_layers:
                return "routing_shape"
            expected = (len(r.token_positions()), len(r.moe_layers), top_k)
        if tuple(r.expert_ids.shape) != expected or r.first_row != 0:
            return "routing_shape"
    return None


def build_samples(
    generations: Sequence[Generation | SampleError],
    groups: Sequence[int],
    reward_fn: Callable[[list[int], list[Generation]], list[float]],
    rejections: Rejections,
    *,
    vocab_size: int,
    adv_eps: float = 1e-6,
    routing: tuple[int, int] | None = None,
    advantages: Estimator = grpo_advantages,
) -> tuple[list[RLSample], list[ScoredSample]]:
    """Validate, score and turn generations into `RLSample`s (behaviour log-probs = the engine's for now;
    the trainer replaces them when it recomputes old log-probs). `routing` = (num_moe_layers, top_k) when
    routing replay needs the engine's routing. `reward_fn(indices, generations)` scores the valid
    generations in one call (a checker pool works on them concurrently), one reward each."""
    if len(groups) != len(generations):
        raise ValueError(f"groups: expected one per generation ({len(generations)}), got {len(groups)}")
    valid: list[int] = []
    for i, gen in enumerate(generations):
        reason = validate_generation(gen, vocab_size=vocab_size, need_routing=routing is not None,
                                     num_moe_layers=routing[0] if routing else 0, top_k=routing[1] if routing else 0)
        if reason is not None:
            rejections.add(reason, gen.sample_id)
        else:
            valid.append(i)
    rewards = reward_fn(valid, [generations[i] for i in valid])
    kept = [ScoredSample(generations[i], r, groups[i]) for i, r in zip(valid, rewards, strict=True)]
    advs = advantages([s.reward for s in kept], [s.group for s in kept], adv_eps)
    scored = [ScoredSample(s.generation, s.reward, s.group, a) for s, a in zip(kept, advs, strict=True)]
    gens = [s.generation for s in scored]
    (prompts,) = _pieces([g.prompt_ids for g in gens], torch.long)
    (responses,) = _pieces([g.output_ids for g in gens], torch.long)
    # rollout_logp in storage of its own: the trainer replaces old_logp
    old_logps, rollout_logps = _pieces([g.output_logprobs for g in gens], torch.float32, copies=2)
    samples = [
        RLSample(prompt=p, response=r, old_logp=lo, rollout_logp=lr, advantage=s.advantage,
                 routing=s.generation.routing if routing is not None else None)
        for s, p, r, lo, lr in zip(scored, prompts, responses, old_logps, rollout_logps, strict=True)
    ]
    return samples, scored


def _pieces(seqs: list, dtype: torch.dtype, copies: int = 1) -> list[tuple[torch.Tensor, ...]]:
    """`copies` times one tensor per sequence of `seqs`, each copy one tensor (its own storage) split into views:
    a few hundred small torch.tensor calls per rollout cost milliseconds of the step."""
    flat = torch.tensor([x for seq in seqs for x in seq], dtype=dtype)
    sizes = [len(seq) for seq in seqs]
    return [(flat if k == 0 else flat.clone()).split(sizes) for k in range(copies)]


