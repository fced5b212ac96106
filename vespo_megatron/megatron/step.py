"""The RL training step on megatron-core's `get_forward_backward_func` contract.

    fwd_bwd = get_forward_backward_func()
    step = RLStep(RLStepConfig(loss_name="vespo"), groups=StepGroups(tp=..., cp=...))
    normalizer = step.normalizer(micro_batches, dp_group=...)          # once per optimizer step
    outputs = fwd_bwd(forward_step_func=step.forward_step(normalizer), data_iterator=iter(micro_batches),
                      model=model, num_microbatches=len(micro_batches), seq_length=..., micro_batch_size=...)

Loss scaling. Each micro-batch's loss is already this rank's share of the *globally* normalised loss (the
normaliser counts every micro-batch on every DP rank), so megatron must not scale it again:
`calculate_per_token_loss=True` keeps megatron from dividing by the micro-batch count, DDP then sums
(rather than averages) gradients over DP x CP, and `finalize_model_grads_func` is set to skip the division
by the token count (`install_rl_grad_finalizer`). The sum over ranks of the shares is the single-process
loss of the whole batch, so the summed gradient is its gradient.

Shape legend: [b, s] this rank's model input, [b, s, V/tp] logits (vocab split over TP), [T] = b * s tokens,
[B] sequences of the micro-batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vespo_megatron.base.host_checks import checked_on_host
from vespo_megatron.base.metric import Metric, merge_metrics
from vespo_megatron.losses import LossNormalizer, resolve_policy_loss
from vespo_megatron.losses.segments import check_token_seq
from vespo_megatron.megatron.rl_batch import RLMicroBatch
from vespo_megatron.parallel.sequence import build_loss_inputs, global_normalizer
from vespo_megatron.parallel.vocab_parallel import vocab_parallel_logprobs

__all__ = ["RLStepConfig", "StepGroups", "RLStep", "install_rl_grad_finalizer", "sequence_token_counts"]


@dataclass(frozen=True, kw_only=True)
class RLStepConfig:
    """loss_name: a registered loss or an import path (`resolve_policy_loss`);
    loss_config: its config (None: the loss's defaults);
    temperature: the rollout engine's sampling temperature (log-probs are of softmax(logits / T));
    fused_lm_head: stop the model at its final hidden states and compute the log-probs with the output layer
    fused in (`parallel.fused_lm_head`: the [T, V/tp] logits are never held; same values and gradients);
    False keeps the logits path; lm_head_chunk_elements: the fused head's logits tile (None: 2**29; the
    single pass's chunk 2**29.25);
    lm_head_single_pass: with fused_lm_head, run the loss inside the head on chunks of whole sequences and form
    the gradients while each chunk's logits are alive (`parallel.fused_lm_head_loss`: three GEMMs per token
    instead of four; same loss, metrics and gradients; a chunk holds at least one whole sequence);
    lm_head_whole_sequence_elements: with the single pass, the most logits one over-long sequence may hold
    whole (None: twice the chunk, at most 2**30; longer ones take the recomputing tiles: `fused_lm_head_loss`).
    With the single pass the forward-only old-log-prob pass (`logprob_forward_step`) follows the single pass's
    chunk plan too (`fused_lm_head_chunked_logprobs`: the same chunks of whole sequences, GEMMs of the same row
    counts, the same kernels), not the recomputing head's token tiles: a GEMM of another row count may round
    differently on a GPU, and the on-policy ratio pi / pi_old of the first update must be exactly 1. (Bitwise
    for the same micro-batches: packs of another size, the trainer's `logprob_micro_batch_size`, group the
    sequences into other chunks.)"""

    loss_name: str = "vespo"
    loss_config: Any = None
    temperature: float = 1.0
    compute_entropy: bool = True
    logprob_chunk_size: int | None = None
    fused_lm_head: bool = False
    lm_head_chunk_elements: int | None = None
    lm_head_single_pass: bool = False
    lm_head_whole_sequence_elements: int | None = None

    def __post_init__(self) -> None:
        loss = resolve_policy_loss(self.loss_name)  # ValueError for unknown names
        if self.loss_config is not None and not isinstance(self.loss_config, loss.config_cls):
            raise ValueError(f"RLStepConfig.loss_config: expected a {loss.config_cls.__name__} for "
                             f"{self.loss_name!r}, got {type(self.loss_config).__name__}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ValueError(f"RLStepConfig.temperature: expected a float > 0, got {self.temperature!r}")
        if not isinstance(self.fused_lm_head, bool):
            raise ValueError(f"RLStepConfig.fused_lm_head: expected a bool, got {self.fused_lm_head!r}")
        if not isinstance(self.lm_head_single_pass, bool):
            raise ValueError(f"RLStepConfig.lm_head_single_pass: expected a bool, got {self.lm_head_single_pass!r}")
        if self.lm_head_single_pass and not self.fused_lm_head:
            raise ValueError("RLStepConfig.lm_head_single_pass: expected fused_lm_head=True with it (the single "
                             "pass is a mode of the fused head), got fused_lm_head=False")
        if self.lm_head_whole_sequence_elements is not None and not self.lm_head_single_pass:
            raise ValueError("RLStepConfig.lm_head_whole_sequence_elements: expected None without "
                             f"lm_head_single_pass, got {self.lm_head_whole_sequence_elements!r}")


@dataclass(frozen=True)
class StepGroups:
    """The process groups the loss path needs, passed explicitly (None = not split)."""

    tp: Any = None
    cp: Any = None


class RLStep:
    """Builds megatron `forward_step` functions whose `loss_func` runs the chosen policy loss."""

    def __init__(self, cfg: RLStepConfig, groups: StepGroups):
        self.cfg = cfg
        self.groups = groups
        self.loss = resolve_policy_loss(cfg.loss_name)
        self.loss_config = cfg.loss_config if cfg.loss_config is not None else self.loss.default_config()

    @property
    def rollout_correction(self):
        return self.loss_config.rollout_correction

    def normalizer(self, micro_batches: Sequence[RLMicroBatch], *, dp_group=None) -> LossNormalizer:
        """The global normaliser of one optimizer step (all micro-batches of this rank; CP and DP reduced),
        counting only the tokens the loss keeps (masked IS rejects before the step)."""
        return global_normalizer(
            [mb.loss_mask.reshape(-1) for mb in micro_batches],
            [mb.token_seq.reshape(-1) for mb in micro_batches],
            [mb.num_seqs for mb in micro_batches],
            cp_group=self.groups.cp,
            dp_group=dp_group,
            old_logps=[mb.old_logp.reshape(-1) for mb in micro_batches],
            rollout_logps=[None if mb.rollout_logp is None else mb.rollout_logp.reshape(-1) for mb in micro_batches],
            rollout_correction=self.rollout_correction,
        )

    def token_logprobs(self, logits, batch: RLMicroBatch):
        """`logits` [b, s, V/tp], or the model's `LMHeadInput` when `fused_lm_head` is on."""
        if self.cfg.fused_lm_head:
            from vespo_megatron.megatron.model import lm_head_token_logprobs

            return lm_head_token_logprobs(
                logits, batch.labels, tp_group=self.groups.tp, temperature=self.cfg.temperature,
                compute_entropy=self.cfg.compute_entropy, chunk_elements=self.cfg.lm_head_chunk_elements,
            )
        return vocab_parallel_logprobs(
            logits, batch.labels, tp_group=self.groups.tp, temperature=self.cfg.temperature,
            compute_entropy=self.cfg.compute_entropy, chunk_size=self.cfg.logprob_chunk_size,
        )

    def _loss_inputs(self, batch: RLMicroBatch, logp: Tensor, tokens: slice = slice(None),
                     seqs: slice = slice(None)):
        """LossInputs of the tokens `tokens` of the flattened micro-batch, which must be the whole sequences
        `seqs` (all of them by default); `logp` holds those tokens' log-probs."""
        first = seqs.start or 0
        num_seqs = (batch.num_seqs if seqs.stop is None else seqs.stop) - first
        token_seq = batch.token_seq.reshape(-1)[tokens]
        return build_loss_inputs(
            logp=logp,
            old_logp=batch.old_logp.reshape(-1)[tokens],
            mask=batch.loss_mask.reshape(-1)[tokens],
            token_seq=token_seq - first if first else token_seq,
            num_seqs=num_seqs,
            advantages=batch.advantages[seqs],
            rollout_logp=None if batch.rollout_logp is None else batch.rollout_logp.reshape(-1)[tokens],
            rollout_correction=self.rollout_correction,
            cp_group=self.groups.cp,
            differentiable_seq_log_ratio=self.loss.seq_grad(self.loss_config),
        )

    def loss_func(self, batch: RLMicroBatch, normalizer: LossNormalizer, logits: Tensor, seq_tokens=None):
        """megatron's loss_func contract: (loss, num_tokens, reported). `reported` holds the metrics (each
        with its reduction) and the per-sequence log W / phi of this micro-batch. `seq_tokens` (host ints,
        each sequence's tokens in the flattened [b, s] order) is needed by the single-pass head only."""
        if self.cfg.lm_head_single_pass:
            return self._single_pass_loss(batch, normalizer, logits, seq_tokens)
        lp = self.token_logprobs(logits, batch)
        inputs = self._loss_inputs(batch, lp.logprobs.reshape(-1))
        out = self.loss(inputs, normalizer, self.loss_config)
        return self._report(batch, out.loss, [(inputs, out)], lp.logprobs, lp.entropy)

    def _single_pass_loss(self, batch: RLMicroBatch, normalizer: LossNormalizer, head, seq_tokens):
        """The loss of each chunk of whole sequences runs inside the fused head (`model.lm_head_loss`); the
        chunks' losses and metrics add up to the whole micro-batch's (global normaliser, per-sequence terms)."""
        from vespo_megatron.megatron.model import lm_head_loss

        if seq_tokens is None:
            seq_tokens = sequence_token_counts(batch.token_seq, batch.num_seqs)
        parts = []

        def chunk_loss(c):
            inputs = self._loss_inputs(batch, c.logprobs, slice(c.start, c.end), slice(c.seq_start, c.seq_end))
            out = self.loss(inputs, normalizer, self.loss_config)
            parts.append((inputs, out))
            return out.loss

        res = lm_head_loss(head, batch.labels, chunk_loss, seq_tokens, tp_group=self.groups.tp,
                           temperature=self.cfg.temperature, compute_entropy=self.cfg.compute_entropy,
                           chunk_elements=self.cfg.lm_head_chunk_elements,
                           whole_sequence_elements=self.cfg.lm_head_whole_sequence_elements)
        return self._report(batch, res.loss, parts, res.logprobs, res.entropy)

    @staticmethod
    def _report(batch: RLMicroBatch, loss: Tensor, parts, logp: Tensor, entropy: Tensor | None):
        """(loss, kept tokens, reported) from the (inputs, output) of the loss's calls (one, or one per chunk
        of whole sequences in order: their metrics merge by each metric's reduction, [B] results concatenate)."""
        metrics = merge_metrics(out.metrics for _, out in parts)
        if entropy is not None:
            metrics["entropy_mean"] = Metric.mean(entropy.reshape(-1), batch.loss_mask.reshape(-1))

        def seqs(get):
            values = [get(inputs, out) for inputs, out in parts]
            if any(v is None for v in values):
                return None
            return values[0].detach() if len(values) == 1 else torch.cat([v.detach() for v in values])

        reported = {
            "metrics": metrics,
            "seq_log_ratio": seqs(lambda inputs, out: inputs.seq_log_ratio),
            "seq_log_w": seqs(lambda inputs, out: out.seq_log_w),
            "seq_phi": seqs(lambda inputs, out: out.seq_phi),
            "logp": logp.detach(),  # [b, s]: the trainer-vs-engine mismatch when mu is the engine's
        }
        kept = sum(inputs.mask.sum() for inputs, _ in parts)  # the tokens the loss kept
        return loss, kept.to(torch.int), reported

    def forward_step(self, normalizer: LossNormalizer):
        """A `forward_step_func(data_iterator, model)` for `get_forward_backward_func` (training)."""
        return self._forward_step(lambda batch, output, seq_tokens: self.loss_func(batch, normalizer, output,
                                                                                   seq_tokens),
                                  chunk_plan=self.cfg.lm_head_single_pass)

    def forward_only_logprobs(self, logits, batch: RLMicroBatch, seq_tokens=None):
        """The old-log-prob pass's log-probs: exactly what the training pass's head computes for the same
        outputs. With `lm_head_single_pass` that is the single pass's own forward on its chunks of whole
        sequences (`model.lm_head_chunked_logprobs`: same GEMMs, so bitwise the same log-probs and pi / pi_old
        exactly 1 on policy; `seq_tokens` as for `loss_func`); else `token_logprobs`."""
        if not self.cfg.lm_head_single_pass:
            return self.token_logprobs(logits, batch)
        from vespo_megatron.megatron.model import lm_head_chunked_logprobs

        if seq_tokens is None:
            seq_tokens = sequence_token_counts(batch.token_seq, batch.num_seqs)
        return lm_head_chunked_logprobs(
            logits, batch.labels, seq_tokens, tp_group=self.groups.tp, temperature=self.cfg.temperature,
            compute_entropy=self.cfg.compute_entropy, chunk_elements=self.cfg.lm_head_chunk_elements,
            whole_sequence_elements=self.cfg.lm_head_whole_sequence_elements,
        )

    def logprob_forward_step(self):
        """A forward-only `forward_step_func` whose outputs (last pipeline stage) are
        {"logp": [b, s] fp32, "entropy": [b, s] or None} per micro-batch: the old-log-prob pass
        (`forward_only_logprobs`: the training pass's head, chunk plan included)."""

        def logprob_func(batch: RLMicroBatch, logits: Tensor, seq_tokens=None):
            lp = self.forward_only_logprobs(logits, batch, seq_tokens)
            zero = (logits.hidden if self.cfg.fused_lm_head else logits).sum() * 0.0
            return zero, batch.loss_mask.sum().to(torch.int), {"logp": lp.logprobs.detach(), "entropy": (
                None if lp.entropy is None else lp.entropy.detach())}

        return self._forward_step(logprob_func, chunk_plan=self.cfg.lm_head_single_pass)

    def _forward_step(self, on_output, chunk_plan: bool = False):
        def forward_step(data_iterator, model):
            host_batch: RLMicroBatch = next(data_iterator)
            facts = host_facts(host_batch)  # checked on the host copy: the loss path's checks need no device sync
            # The single-pass head's chunk plan, from the batch's host copy.
            seq_tokens = sequence_token_counts(host_batch.token_seq, host_batch.num_seqs) if chunk_plan else None
            batch = host_batch.to(next(model.parameters()).device)
            head = None
            with contextlib.ExitStack() as stack:
                if self.cfg.fused_lm_head:  # the model returns its final hidden states, not logits
                    from vespo_megatron.megatron.model import output_layer_skipped

                    head = stack.enter_context(output_layer_skipped(model))
                logits = model(
                    input_ids=batch.tokens,
                    position_ids=batch.position_ids,
                    attention_mask=None,
                    packed_seq_params=batch.packed_seq_params,
                )

            def loss_of(output):
                with checked_on_host(**facts):
                    return on_output(batch, output if head is None else head(output), seq_tokens)

            return logits, loss_of

        return forward_step


def host_facts(batch: RLMicroBatch) -> dict:
    """What the loss path checks, checked on `batch` while it is on the host (free there): sequence indices in
    [0, num_seqs) (ValueError otherwise) and the range of the labels, which the head compares with its
    vocabulary. Empty for a batch already on a device (the checks then read the device values)."""
    if batch.token_seq.device.type != "cpu" or batch.labels.device.type != "cpu":
        return {}
    check_token_seq(batch.token_seq.reshape(-1), batch.num_seqs)
    if batch.labels.numel() == 0:
        return {"token_seq": True}
    return {"token_seq": True, "targets": (int(batch.labels.min()), int(batch.labels.max()))}


def sequence_token_counts(token_seq: Tensor, num_seqs: int) -> list[int]:
    """Tokens of each sequence in the flattened order of `token_seq` [b, s] (host ints), for the single-pass
    head, which needs every sequence's tokens contiguous in that order (ValueError otherwise)."""
    flat = token_seq.reshape(-1).cpu()
    if flat.numel() > 1 and bool((flat[1:] < flat[:-1]).any()):
        raise ValueError("RLMicroBatch.token_seq: the single-pass head (lm_head_single_pass) expects each "
                         "sequence's tokens contiguous and in sequence order, got a decreasing sequence index")
    check_token_seq(flat, num_seqs)
    return torch.bincount(flat, minlength=num_seqs).tolist()


def install_rl_grad_finalizer(model_config, pg_collection=None) -> None:
    """Make megatron's schedules leave the (already global) loss scale alone: calculate_per_token_loss so
    nothing divides by the micro-batch count, and a grad finalizer that reduces gradients over DP x CP
    (and SP norms over TP, embeddings over PP) without dividing by the token count."""
    from megatron.core.distributed import finalize_model_grads

    model_config.calculate_per_token_loss = True

    def finalize(model, num_tokens=None, pg_collection=pg_collection, force_all_reduce=False):
        finalize_model_grads(model, None, pg_collection=pg_collection, force_all_reduce=force_all_reduce)

    model_config.finalize_model_grads_func = finalize
