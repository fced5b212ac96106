"""Helpers to run one forward/backward of the tiny MoE GPT under any parallel layout and gather the
full results, for layout-invariance tests (CPU gloo or GPU).

Inside a rank of an initialised `torch.distributed` world (e.g. `tests/dist_harness.run_distributed`):

    result = run_layout(ParallelConfig(tp=2, sp=True), model_cfg, batch, loss_fn)

builds the model for that layout (weights identical for every layout), splits the global `batch` over DP
(rows) and CP (zigzag), runs megatron's `get_forward_backward_func` (pipeline p2p included), reduces the
gradients like megatron's `finalize_model_grads` does (`finalize_grads`, SUM reductions) and returns a
`LayoutResult` with the summed loss, the full logits [B, S, V] and every full gradient by global parameter
name, identical on every rank. Compare results of different layouts directly.

Loss contract: `loss_fn(logits, local, groups) -> (loss, metrics)` gets this rank's logits
[b, s_local, V/tp] (vocab split over TP) and the `LocalBatch`; it returns a scalar already scaled for a SUM
over DP x CP ranks (e.g. divide by `local.num_global_tokens`), plus a dict of scalar tensors (also summed).
Under TP every TP rank returns the same loss; it is counted once.

Shape legend: B global rows, S global sequence (T packed), b local rows, s_local local tokens, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import tensor_parallel

from vespo_megatron.compat import PackedSeqParams, get_forward_backward_func
from vespo_megatron.megatron.cpu_shim import cpu_device_context
from vespo_megatron.megatron.model import (
    TinyMoEConfig,
    build_gpt_model,
    full_from_shards,
    param_layout,
)
from vespo_megatron.megatron.parallel_setup import (
    ParallelConfig,
    ParallelGroups,
    destroy_parallel,
    initialize_parallel,
)
from vespo_megatron.parallel.cp_split import PackedBatch, pack_sequences, zigzag_indices


@dataclass(frozen=True)
class Batch:
    """A global batch, identical on every rank. Packed (THD) batches have B == 1 and `packed` set."""

    tokens: torch.Tensor  # [B, S] int64
    position_ids: torch.Tensor  # [B, S]
    labels: torch.Tensor  # [B, S] int64
    loss_mask: torch.Tensor  # [B, S] float
    packed: PackedBatch | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.loss_mask.sum())


def make_padded_batch(vocab_size: int, rows: int, seq_len: int, seed: int = 0, pad_from=None) -> Batch:
    """Random next-token batch; `pad_from[i]` (optional) masks row i's tokens from that index on."""
    gen = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, vocab_size, (rows, seq_len + 1), generator=gen)
    mask = torch.ones(rows, seq_len)
    for i, start in enumerate(pad_from or []):
        mask[i, start:] = 0
    return Batch(
        tokens=seq[:, :-1],
        position_ids=torch.arange(seq_len).expand(rows, seq_len).clone(),
        labels=seq[:, 1:],
        loss_mask=mask,
    )


def make_packed_batch(vocab_size: int, lengths: list[int], pad_multiple: int, seed: int = 0) -> Batch:
    """Random sequences packed into one THD row; labels are next tokens within each sequence."""
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, vocab_size, (n + 1,), generator=gen) for n in lengths]
    packed = pack_sequences([s[:-1] for s in seqs], pad_multiple=pad_multiple)
    labels = pack_sequences([s[1:] for s in seqs], pad_multiple=pad_multiple).tokens
    return Batch(
        tokens=packed.tokens,
        position_ids=packed.position_ids,
        labels=labels,
        loss_mask=packed.valid.float().unsqueeze(0),
        packed=packed,
    )


@dataclass(frozen=True)
class LocalBatch:
    """This rank's share of a `Batch`: rows for its DP rank, tokens for its CP rank."""

    tokens: torch.Tensor  # [b, s_local]
    position_ids: torch.Tensor  # [b, s_local]
    labels: torch.Tensor  # [b, s_local]
    loss_mask: torch.Tensor  # [b, s_local]
    rows: torch.Tensor  # [b] global row indices
    token_index: torch.Tensor  # [s_local] global token (sequence-dim) indices
    packed_seq_params: PackedSeqParams | None
    num_global_tokens: int  # loss-mask sum of the whole global batch
    global_seq_len: int


def split_batch(batch: Batch, groups: ParallelGroups) -> LocalBatch:
    """Rows over DP (contiguous blocks), sequence over CP (zigzag; per sequence for THD)."""
    rows_total, seq_len = batch.tokens.shape
    dp, dp_rank = groups.dp_size, groups.dp_rank
    if rows_total % dp != 0:
        raise ValueError(f"batch rows: expected a multiple of dp={dp}, got {rows_total}")
    if batch.packed is not None and dp != 1:
        raise ValueError(f"packed batch: expected dp=1 (one packed row), got dp={dp}")
    per = rows_total // dp
    rows = torch.arange(dp_rank * per, (dp_rank + 1) * per)
    cp, cp_rank = groups.cp_size, groups.cp_rank
    if batch.packed is not None:
        token_index = batch.packed.cp_index(cp, cp_rank) if cp > 1 else torch.arange(seq_len)
        psp = batch.packed.packed_seq_params()
    else:
        token_index = zigzag_indices(seq_len, cp, cp_rank) if cp > 1 else torch.arange(seq_len)
        psp = None

    def take(x):
        return x.index_select(0, rows).index_select(1, token_index)

    return LocalBatch(
        tokens=take(batch.tokens),
        position_ids=take(batch.position_ids),
        labels=take(batch.labels),
        loss_mask=take(batch.loss_mask),
        rows=rows,
        token_index=token_index,
        packed_seq_params=psp,
        num_global_tokens=batch.num_tokens,
        global_seq_len=seq_len,
    )


def token_mean_cross_entropy(logits: torch.Tensor, local: LocalBatch, groups: ParallelGroups):
    """Cross-entropy averaged over the global batch's tokens (SUM-ready). logits [b, s_local, V/tp]."""
    # megatron reads its global TP group here (== groups.tp); it overwrites fp32 logits in place: copy.
    nll = tensor_parallel.vocab_parallel_cross_entropy(logits.float().clone(), local.labels)
    loss = (nll * local.loss_mask).sum() / local.num_global_tokens
    return loss, {"nll_sum": (nll * local.loss_mask).sum().detach()}


LossFn = Callable[[torch.Tensor, LocalBatch, ParallelGroups], tuple[torch.Tensor, dict]]


@dataclass
class LayoutResult:
    loss: float
    logits: torch.Tensor  # [B, S, V] full
    grads: dict[str, torch.Tensor]  # global parameter name -> full gradient
    metrics: dict[str, float] = field(default_factory=dict)


def finalize_grads(model, groups: ParallelGroups) -> None:
    """SUM-reduce gradients as megatron's `finalize_model_grads` does, without a DDP wrapper.

    - over TP: norm weights under SP (tagged `sequence_parallel`) and QK-norm weights (partial per rank);
    - dense parameters over DP x CP, expert parameters over the expert-DP group.
    """
    config = model.config
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        if groups.tp_size > 1 and (
            (config.sequence_parallel and getattr(param, "sequence_parallel", False))
            or (config.qk_layernorm and ("q_layernorm" in name or "k_layernorm" in name))
        ):
            dist.all_reduce(param.grad, group=groups.tp)
        group = groups.expt_dp if ".local_experts." in name else groups.dp_cp
        if group.size() > 1:
            dist.all_reduce(param.grad, group=group)


def _union_over_ranks(mine: dict[str, torch.Tensor], groups: ParallelGroups) -> dict[str, torch.Tensor]:
    """The union of every rank's {global name: value} (replicated names keep the first rank's), sorted."""
    everyone = [None] * groups.world_size
    dist.all_gather_object(everyone, mine)
    merged: dict[str, torch.Tensor] = {}
    for part in everyone:
        for k, v in part.items():
            merged.setdefault(k, v)
    return dict(sorted(merged.items()))


def random_rl_micro_batches(vocab: int, *, num_micro: int = 4, per_micro: int = 2, max_prompt: int = 5,
                            max_response: int = 9, logp_gap: float = 0.0, noise: float = 0.3, seed: int = 0):
    """Random RL samples (lists of `RLSample` per micro-batch): behaviour log-probs near a random model's
    (-log V - logp_gap, plus `noise`), rollout log-probs nearby, advantages of both signs."""
    from vespo_megatron.megatron.rl_batch import RLSample

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_micro):
        mb = []
        for _ in range(per_micro):
            P = int(torch.randint(1, max_prompt + 1, (1,), generator=g))
            R = int(torch.randint(1, max_response + 1, (1,), generator=g))
            old = -torch.log(torch.tensor(float(vocab))) - logp_gap + noise * torch.randn(R, generator=g)
            mb.append(RLSample(prompt=torch.randint(0, vocab, (P,), generator=g),
                               response=torch.randint(0, vocab, (R,), generator=g), old_logp=old,
                               rollout_logp=old + 0.1 * torch.randn(R, generator=g),
                               advantage=float(torch.randn(1, generator=g))))
        out.append(mb)
    return out


def gather_full_grads(model, groups: ParallelGroups) -> dict[str, torch.Tensor]:
    """Every full gradient by global name, on every rank (after `finalize_grads`)."""
    mine = {}
    for name, layout in param_layout(model, groups).items():
        grad = model.get_parameter(name).grad
        grad = torch.zeros_like(model.get_parameter(name)) if grad is None else grad.detach()
        if layout.partition_dim is not None:
            g = layout.group
            shards = [torch.empty_like(grad) for _ in range(g.size())]
            dist.all_gather(shards, grad.contiguous(), group=g)
            grad = full_from_shards(shards, layout.partition_dim, layout.stride)
        mine[layout.global_name] = grad.float().clone()
    return _union_over_ranks(mine, groups)


def gather_grad_norms(model, groups: ParallelGroups) -> dict[str, torch.Tensor]:
    """Every parameter's full-gradient L2 norm by global name (a 0-d float64 tensor), on every rank."""
    mine = {}
    for name, layout in param_layout(model, groups).items():
        grad = model.get_parameter(name).grad
        sq = torch.zeros((), dtype=torch.float64, device=model.get_parameter(name).device)
        if grad is not None:
            sq = grad.detach().double().pow(2).sum()
        if layout.partition_dim is not None and layout.group.size() > 1:
            dist.all_reduce(sq, group=layout.group)
        mine[layout.global_name] = sq.sqrt().cpu()
    return _union_over_ranks(mine, groups)


def gather_full_logits(logits: torch.Tensor | None, local: LocalBatch, groups: ParallelGroups, shape):
    """Assemble [B, S, V] from every last-stage rank's [b, s_local, V/tp]; result on every rank."""
    piece = None
    if logits is not None:
        shards = [torch.empty_like(logits) for _ in range(groups.tp_size)]
        dist.all_gather(shards, logits.contiguous(), group=groups.tp)
        if groups.tp_rank == 0:
            piece = (local.rows, local.token_index, torch.cat(shards, dim=-1).float())
    everyone = [None] * groups.world_size
    dist.all_gather_object(everyone, piece)
    full = torch.full(shape, float("nan"))
    for p in everyone:
        if p is not None:
            rows, tokens, values = p
            full[rows[:, None], tokens[None, :]] = values
    return full


def run_layout(
    layout: ParallelConfig,
    model_cfg: TinyMoEConfig,
    batch: Batch,
    loss_fn: LossFn = token_mean_cross_entropy,
    attention_backend: str = "reference",
    after_build: Callable[[torch.nn.Module, ParallelGroups], None] | None = None,
) -> LayoutResult:
    """Build, run one forward/backward, reduce and gather (see module docstring). Destroys its groups.

    `after_build(model, groups)` runs between building and the forward (e.g. loading a checkpoint)."""
    groups = initialize_parallel(layout)
    try:
        model = build_gpt_model(model_cfg, layout, groups, attention_backend=attention_backend)
        if after_build is not None:
            after_build(model, groups)
        local = split_batch(batch, groups)
        captured = {}

        def loss_func(output):
            loss, metrics = loss_fn(output, local, groups)
            captured["logits"] = output.detach()
            captured["metrics"] = {k: v.detach().float() for k, v in metrics.items()}
            captured["loss"] = loss.detach().float()
            # calculate_per_token_loss=True in our config: megatron applies no further scaling.
            return loss, torch.tensor(1, dtype=torch.int), {}

        def forward_step(data_iterator, chunk):
            data = next(data_iterator)
            out = chunk(
                input_ids=data.tokens,
                position_ids=data.position_ids,
                attention_mask=None,
                packed_seq_params=data.packed_seq_params,
            )
            return out, loss_func

        with cpu_device_context():
            get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iter([local]),
                model=[model],
                num_microbatches=1,
                seq_length=local.global_seq_len,
                micro_batch_size=local.tokens.size(0),
                forward_only=False,
            )
        finalize_grads(model, groups)
        grads = gather_full_grads(model, groups)
        rows, seq = batch.tokens.shape
        logits = gather_full_logits(captured.get("logits"), local, groups, (rows, seq, model_cfg.vocab_size))
        # Sum loss/metrics over DP x CP on last-stage TP-rank-0 ranks, then share with every rank.
        count_here = groups.is_last_stage and groups.tp_rank == 0
        names = sorted(captured.get("metrics", {}))
        everyone = [None] * groups.world_size
        dist.all_gather_object(
            everyone,
            (float(captured["loss"]), {k: float(captured["metrics"][k]) for k in names}) if count_here else None,
        )
        loss = sum(p[0] for p in everyone if p is not None)
        metrics: dict[str, float] = {}
        for p in everyone:
            if p is not None:
                for k, v in p[1].items():
                    metrics[k] = metrics.get(k, 0.0) + v
        return LayoutResult(loss=loss, logits=logits, grads=grads, metrics=metrics)
    finally:
        destroy_parallel()


# ---------------------------------------------------------------- RL loss step under any layout


@dataclass
class RLLayoutResult:
    """Summed loss over micro-batches, per-sequence log W / phi by global sample index, full gradients."""

    loss: float
    seq_log_ratio: torch.Tensor  # [num_samples] float64
    seq_phi: torch.Tensor | None  # [num_samples] (VESPO family only)
    grads: dict[str, torch.Tensor]
    metrics: dict[str, float] = field(default_factory=dict)


def run_rl_layout(
    layout: ParallelConfig,
    model_cfg: TinyMoEConfig,
    micro_batches: list[list],
    step_cfg,
    *,
    batch_layout: str = "thd",
    pad_multiple: int = 8,
    attention_backend: str = "reference",
    ddp: bool = False,
    grads: str = "full",
) -> RLLayoutResult:
    """One RL optimizer step's forward/backward under `layout` through `RLStep` and megatron's schedules.

    `micro_batches` is the global step: a list of micro-batches, each a list of `RLSample`. DP rank d takes
    micro-batches d, d + dp, ...; each micro-batch is built for this CP rank (`build_rl_microbatch`). The
    normaliser is computed once upstream (`RLStep.normalizer`), gradients are SUM-reduced (`finalize_grads`;
    with `ddp=True` by megatron's DistributedDataParallel and `finalize_model_grads`, as the trainer does).
    `grads="full"` gathers every full gradient; `grads="norms"` only each parameter's gradient norm (for
    models too big to gather: a Qwen3-30B-A3B slice on GPUs). Every rank returns the full result.
    """
    from vespo_megatron.base.metric import finalize_metrics, merge_metrics
    from vespo_megatron.megatron.rl_batch import build_rl_microbatch, common_seq_len
    from vespo_megatron.megatron.step import RLStep, StepGroups
    from vespo_megatron.parallel.reduce_metrics import all_reduce_metrics

    groups = initialize_parallel(layout)
    try:
        model = build_gpt_model(model_cfg, layout, groups, attention_backend=attention_backend)
        module = model
        if ddp:
            from vespo_megatron.training.optim import wrap_ddp_and_optimizer

            model, _ = wrap_ddp_and_optimizer(model, lr=1e-3, weight_decay=0.0, clip_grad=0.0)
            model.zero_grad_buffer()
        dp, dp_rank = groups.dp_size, groups.dp_rank
        if len(micro_batches) % dp != 0:
            raise ValueError(f"micro_batches: expected a multiple of dp={dp}, got {len(micro_batches)}")
        mine = list(range(dp_rank, len(micro_batches), dp))
        first_sample = [sum(len(m) for m in micro_batches[:i]) for i in range(len(micro_batches))]
        seq_len = common_seq_len(micro_batches, layout=batch_layout, pad_multiple=pad_multiple)
        local = [
            build_rl_microbatch(micro_batches[i], layout=batch_layout, cp_size=groups.cp_size, cp_rank=groups.cp_rank,
                                pad_multiple=pad_multiple, seq_len=seq_len)
            for i in mine
        ]
        step = RLStep(step_cfg, StepGroups(tp=groups.tp, cp=groups.cp))
        normalizer = step.normalizer(local, dp_group=groups.dp)
        with cpu_device_context():
            outputs = get_forward_backward_func()(
                forward_step_func=step.forward_step(normalizer),
                data_iterator=iter(local),
                model=[model],
                num_microbatches=len(local),
                seq_length=local[0].tokens.size(1) * groups.cp_size,
                micro_batch_size=local[0].tokens.size(0),
                forward_only=False,
            )
        if ddp:  # megatron reduced the grads (our finalizer); they live in the DDP buffers
            for p in module.parameters():
                p.grad = p.main_grad
        else:
            finalize_grads(model, groups)
        grads = gather_full_grads(module, groups) if grads == "full" else gather_grad_norms(module, groups)

        num_samples = sum(len(m) for m in micro_batches)
        seq_log_ratio = torch.zeros(num_samples, dtype=torch.float64)
        seq_phi = torch.zeros(num_samples, dtype=torch.float64)
        has_phi = False
        loss = 0.0
        parts = []
        for i, reported in zip(mine, outputs if groups.is_last_stage else [], strict=False):
            idx = slice(first_sample[i], first_sample[i] + len(micro_batches[i]))
            seq_log_ratio[idx] = reported["seq_log_ratio"].double()
            if reported["seq_phi"] is not None:
                seq_phi[idx] = reported["seq_phi"].double()
                has_phi = True
            parts.append(reported["metrics"])
            loss += float(reported["metrics"]["loss"].value)
        # Per-sequence values: identical on every TP/CP rank of a last stage; take TP 0 / CP 0 of each DP rank.
        owner = groups.is_last_stage and groups.tp_rank == 0 and groups.cp_rank == 0
        counted = groups.is_last_stage and groups.tp_rank == 0  # loss shares add over DP x CP
        everyone = [None] * groups.world_size
        dist.all_gather_object(everyone, (owner, counted, seq_log_ratio, seq_phi if has_phi else None, loss))
        total_loss = sum(p[4] for p in everyone if p[1])
        log_ratio = sum(p[2] for p in everyone if p[0])
        phis = [p[3] for p in everyone if p[0] and p[3] is not None]
        metrics = {}
        if groups.is_last_stage and groups.tp_rank == 0:
            reduced = all_reduce_metrics(merge_metrics(parts), groups.dp_cp)
            metrics = finalize_metrics(reduced)
        shared = [None] * groups.world_size
        dist.all_gather_object(shared, metrics)
        metrics = next(m for m in shared if m)
        return RLLayoutResult(loss=total_loss, seq_log_ratio=log_ratio, seq_phi=sum(phis) if phis else None,
                              grads=grads, metrics=metrics)
    finally:
        destroy_parallel()
