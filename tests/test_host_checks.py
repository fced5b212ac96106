"""Checks done on the micro-batch's host copy (`base.host_checks`, `megatron.step.host_facts`): the loss path then
reads no tensor value (a device sync each on CUDA), bad batches still fail with the field named, and the
declared label range is what the head compares with its vocabulary. A micro-batch moved to a device keeps its
host lengths, from which the attention's pack layout is computed without reading the device back."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vespo_megatron.base.host_checks import checked_on_host, host_checked
from vespo_megatron.losses import get_policy_loss
from vespo_megatron.parallel.sequence import build_loss_inputs, global_normalizer
from vespo_megatron.parallel.vocab_parallel import vocab_parallel_logprobs

pytestmark = pytest.mark.megatron


class ValueReads(TorchDispatchMode):
    """Counts the ops that read a tensor value on the host (`.item()`, `int(t)`, `bool(t)`: a sync on CUDA)."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ == "_local_scalar_dense":
            self.reads += 1
        return func(*args, **(kwargs or {}))


def _batch():
    from vespo_megatron.megatron.rl_batch import build_rl_microbatch
    from vespo_megatron.testing.layouts import random_rl_micro_batches

    (samples,) = random_rl_micro_batches(64, num_micro=1, per_micro=3)
    return build_rl_microbatch(samples)


def _loss_path(batch, logits):
    loss = get_policy_loss("vespo")
    lp = vocab_parallel_logprobs(logits, batch.labels, compute_entropy=True)
    inputs = build_loss_inputs(logp=lp.logprobs.reshape(-1), old_logp=batch.old_logp.reshape(-1),
                               mask=batch.loss_mask.reshape(-1), token_seq=batch.token_seq.reshape(-1),
                               num_seqs=batch.num_seqs, advantages=batch.advantages,
                               differentiable_seq_log_ratio=False)
    norm = global_normalizer([batch.loss_mask.reshape(-1)], [batch.token_seq.reshape(-1)], [batch.num_seqs])
    out = loss(inputs, norm, loss.default_config())
    return out.loss


def test_loss_path_reads_no_values_when_the_host_copy_was_checked():
    from vespo_megatron.megatron.step import host_facts

    batch = _batch()
    logits = torch.randn(*batch.labels.shape, 64)
    facts = host_facts(batch)
    assert facts == {"token_seq": True, "targets": (int(batch.labels.min()), int(batch.labels.max()))}
    norm_reads = ValueReads()
    with norm_reads:  # the normaliser is computed once per step, before the micro-batches: not counted below
        global_normalizer([batch.loss_mask.reshape(-1)], [batch.token_seq.reshape(-1)], [batch.num_seqs])
    unchecked, checked = ValueReads(), ValueReads()
    with unchecked:
        a = _loss_path(batch, logits)
    with checked_on_host(**facts), checked:
        b = _loss_path(batch, logits)
    assert torch.equal(a, b)
    # without the facts: the token-id range (2 reads) and the sequence-index range (2 reads, twice)
    assert unchecked.reads - norm_reads.reads >= 6
    assert checked.reads == norm_reads.reads  # only the normaliser's own reads remain
    assert host_checked("token_seq") is None  # the context is gone


def test_bad_batches_fail_on_the_host_with_the_field_named():
    from vespo_megatron.megatron.step import host_facts

    batch = _batch()
    bad = dataclasses.replace(batch, token_seq=batch.token_seq.clone().fill_(batch.num_seqs))
    with pytest.raises(ValueError, match=rf"token_seq: expected values in \[0, {batch.num_seqs}\), got range"):
        host_facts(bad)
    # the head compares the declared label range with its vocabulary (no device read): ids up to 64 in V = 64
    logits = torch.randn(*batch.labels.shape, 64)
    with checked_on_host(targets=(0, 64)), pytest.raises(ValueError, match=r"targets: expected token ids in "
                                                                           r"\[0, 64\) .*got ids in \[0, 64\]"):
        vocab_parallel_logprobs(logits, batch.labels)
    assert host_facts(batch.to("meta")) == {}  # a batch already on a device: the checks read the device values


def test_pack_layout_comes_from_the_host_copy_of_a_moved_batch():
    """`RLMicroBatch.to` keeps the host cu_seqlens on the moved PackedSeqParams, and the attention's pack layout
    is computed from them: here the device is `meta`, whose values cannot be read back at all."""
    from vespo_megatron.base.transfer import to_device
    from vespo_megatron.megatron.reference_attention import cached_thd_layout, thd_layout

    batch = _batch()
    psp = batch.packed_seq_params
    assert psp is not None  # the THD layout
    moved = batch.to("meta")
    assert moved.tokens.is_meta and moved.packed_seq_params.cu_seqlens_q.is_meta
    layout = cached_thd_layout(moved.packed_seq_params, torch.device("cpu"))
    ref = thd_layout(psp.cu_seqlens_q_padded.long(), psp.cu_seqlens_q.long(), torch.device("cpu"))
    assert layout.num_tokens == ref.num_tokens and layout.max_len == ref.max_len
    assert torch.equal(layout.src, ref.src) and torch.equal(layout.dst, ref.dst)
    t = torch.arange(5)
    assert to_device(t, "cpu") is t and to_device(t, "meta").is_meta


@pytest.mark.parametrize("budget_tokens", [10 ** 4, 12, 4])  # one chunk; several; sequences longer than a chunk
def test_single_pass_head_reads_no_values_per_chunk(budget_tokens):
    """RLStep's single-pass loss (the loss runs once per chunk of whole sequences inside the head): with the
    host copy's facts declared, as `RLStep.forward_step` declares them, a call (forward and backward) reads no
    tensor value however many chunks it has; without them each chunk's loss reads token_seq's range (twice in
    LossInputs, twice in loss_sums), so the count grows with the chunks."""
    from vespo_megatron.megatron.model import LMHeadInput
    from vespo_megatron.megatron.rl_batch import build_rl_microbatch
    from vespo_megatron.megatron.step import (
        RLStep,
        RLStepConfig,
        StepGroups,
        host_facts,
        sequence_token_counts,
    )
    from vespo_megatron.parallel.fused_lm_head_loss import plan_sequence_chunks
    from vespo_megatron.testing.layouts import random_rl_micro_batches

    (samples,) = random_rl_micro_batches(64, num_micro=1, per_micro=8)
    batch = build_rl_microbatch(samples)
    seq_tokens = sequence_token_counts(batch.token_seq, batch.num_seqs)
    chunks = len(plan_sequence_chunks(seq_tokens, budget_tokens))
    assert chunks == {10 ** 4: 1, 12: 6, 4: 8}[budget_tokens]
    step = RLStep(RLStepConfig(fused_lm_head=True, lm_head_single_pass=True,
                               lm_head_chunk_elements=64 * budget_tokens), StepGroups())
    norm = step.normalizer([batch])  # once per step, before the micro-batches: not counted
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(*batch.labels.shape, 16, generator=g, requires_grad=True)
    weight = torch.randn(64, 16, generator=g, requires_grad=True)
    counts, losses = {}, {}
    for checked, facts in ((False, {}), (True, host_facts(batch))):
        reads = ValueReads()
        with checked_on_host(**facts), reads:
            losses[checked] = step.loss_func(batch, norm, LMHeadInput(hidden, weight, False), seq_tokens)[0]
            losses[checked].backward()
        counts[checked] = reads.reads
    assert torch.equal(losses[False], losses[True])
    assert counts[True] == 0
    assert counts[False] == 2 + 4 * chunks  # the head's target range once, token_seq's range per chunk
