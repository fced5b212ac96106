# Shape legend: [T_r] this rank's router tokens (after packing, CP and the SP split; s-major), [K] top-k,
# [E] experts, [L_moe] MoE layers of the model.
"""Routing replay on megatron-core's own `RouterReplay` (no patched router): R3, R2 and the agreement metric.

Modes (`RoutingReplayConfig.mode`):
    "r3"  replay the rollout engine's routing (SGLang, `RLMicroBatch.routed_experts`) in the old-log-prob
          pass and in the update;
    "r2"  record the trainer's own routing in the old-log-prob pass (forward only), replay it in the update;
    "off" route live; the controller only checks the setup.

Per optimizer step, around megatron's `get_forward_backward_func`:

    replay = RoutingReplay(RoutingReplayConfig(mode="r3"), [model], tp_size=..., tp_rank=...)
    replay.begin_pass("old_logp")                  # R2: RECORD; R3: REPLAY_FORWARD
    fwd_bwd(..., data_iterator=replay.data_iterator(micro_batches), forward_only=True)
    old_metrics = replay.end_pass()                # {"routing/agree_exact/layer0": Metric, ...}
    replay.begin_pass("update")                    # REPLAY_FORWARD (+ REPLAY_BACKWARD in recompute)
    fwd_bwd(..., data_iterator=replay.data_iterator(micro_batches), forward_only=False)
    metrics = replay.end_pass()                    # clears every index list (they accumulate otherwise)

`data_iterator` wraps the micro-batch iterator: when the schedule draws micro-batch k on this stage (right
before its forward), it hands each local router its `[T_r, K]` int64 target (R3: the micro-batch's routing
cut for this TP rank and stage by `vespo_megatron.routing.alignment`; R2: what that router recorded for
micro-batch k). With a virtual pipeline pass one iterator per model chunk (`chunk=`); each sets only that
chunk's routers. R2 replays by position: the update must draw the same micro-batches in the same order.

Activation recomputation. `RouterReplay.set_target_indices` also appends to a FIFO that
`REPLAY_BACKWARD` pops. Nothing in megatron 0.16 selects that action, so a forward pre-hook on each router
does: inside megatron's `CheckpointFunction.backward` (`tensor_parallel.random.is_checkpointing()` with
grad enabled) the router is re-running a forward for the backward pass -> REPLAY_BACKWARD (pops the oldest
target: backward order = forward order per stage, also under 1F1B); otherwise REPLAY_FORWARD. Layers that
are not recomputed never pop; `begin_pass` / `end_pass` clear every list. `torch.utils.checkpoint` (used
with fp8 / transformer-engine checkpointing) does not set megatron's flag and is not supported.

Agreement metric (`track_agreement`): a forward hook on each router recomputes, without grad and without
touching the forward's result, the router's logits from the hook's input (`router.gating`) and megatron's
own `topk_routing_with_score_function` without replay -- the experts the trainer would choose -- and
compares them with the replayed ids, over the loss-mask tokens (every one has a real rollout row):
`routing/agree_exact/layer{n}` (all K ids equal as a set) and `routing/overlap/layer{n}` (|A n B| / K),
`n` the model's 0-based layer number, plus totals over layers `routing/agree_exact`, `routing/overlap`.
They are `Metric`s with Reduce.MEAN (sums and counts), one per MoE layer of the whole model on every rank
(zero counts for other stages' layers), so `all_reduce_metrics(metrics, world_group)` gives the global
means: under SP/CP/DP/EP each rank routes distinct tokens, and each layer lives on one stage.
Recompute forwards are not counted. Costs one router GEMM [T_r, h] x [h, E] and a top-k per layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from megatron.core.tensor_parallel.random import is_checkpointing
from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function
from megatron.core.transformer.moe.router import TopKRouter
from torch import Tensor

from vespo_megatron.base.metric import Metric, Reduce
from vespo_megatron.compat import RouterReplay, RouterReplayAction
from vespo_megatron.routing.alignment import (
    moe_layer_numbers,
    replay_tensors,
    router_order_mask,
    sequence_parallel_shard,
    stage_moe_layer_indices,
)
from vespo_megatron.routing.record import RoutingSpec

__all__ = ["ReplayMode", "RoutingReplay", "RoutingReplayConfig", "validate_replay_setup"]

ReplayMode = Literal["off", "r2", "r3"]
PassKind = Literal["old_logp", "update"]
_MODES = ("off", "r2", "r3")


@dataclass(frozen=True, kw_only=True)
class RoutingReplayConfig:
    """mode: "r3" | "r2" | "off"; track_agreement: log trainer-vs-replayed routing agreement per layer."""

    mode: ReplayMode = "r3"
    track_agreement: bool = True

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"RoutingReplayConfig.mode: expected one of {_MODES}, got {self.mode!r}")


def validate_replay_setup(config, mode: ReplayMode, spec: RoutingSpec | None = None, *,
                          track_agreement: bool = False) -> None:
    """Reject megatron configs where replay would be silently ignored or wrong (ValueError).

    config: megatron's TransformerConfig; spec: the routing's model facts (R3), checked against the model.
    """
    if mode not in _MODES:
        raise ValueError(f"mode: expected one of {_MODES}, got {mode!r}")
    if mode == "off":
        return
    if not getattr(config, "num_moe_experts", None):
        raise ValueError(f"routing replay mode {mode!r}: expected a MoE model (num_moe_experts > 0), got a dense "
                         f"model (num_moe_experts={getattr(config, 'num_moe_experts', None)!r})")
    if not config.moe_enable_routing_replay:
        raise ValueError(f"routing replay mode {mode!r}: expected TransformerConfig.moe_enable_routing_replay=True "
                         "(megatron builds no RouterReplay otherwise), got False")
    if config.moe_router_fusion:
        raise ValueError("moe_router_fusion: expected False with routing replay (the fused top-k kernel silently "
                         "ignores RouterReplay), got True")
    balancing = config.moe_router_load_balancing_type
    types = balancing if isinstance(balancing, (list, tuple)) else [balancing]
    if "sinkhorn" in types:
        raise ValueError(f"moe_router_load_balancing_type: expected no 'sinkhorn' with routing replay (sinkhorn "
                         f"routing bypasses RouterReplay), got {balancing!r}")
    if "quantile_balancing" in types:  # megatron-core >= 0.19
        raise ValueError(f"moe_router_load_balancing_type: expected no 'quantile_balancing' with routing replay "
                         f"(quantile-balanced routing bypasses RouterReplay, as sinkhorn does, so replay would "
                         f"silently do nothing), got {balancing!r}")
    force_biased = getattr(config, "moe_router_force_biased", None)  # megatron-core >= 0.19; absent in 0.16
    if force_biased is not None:
        raise ValueError(f"moe_router_force_biased: expected None with routing replay (a random bias on the router "
                         f"logits changes the scores the replayed routing and the agreement metric re-compute), "
                         f"got {force_biased!r}")
    if config.moe_router_force_load_balancing:
        raise ValueError("moe_router_force_load_balancing: expected False with routing replay (random logits), "
                         "got True")
    if config.moe_expert_capacity_factor is not None:
        raise ValueError(f"moe_expert_capacity_factor: expected None with routing replay (token dropping after "
                         f"the top-k changes the replayed dispatch), got {config.moe_expert_capacity_factor}")
    if track_agreement and config.moe_input_jitter_eps:
        raise ValueError(f"moe_input_jitter_eps: expected None with track_agreement (jittered router input cannot "
                         f"be re-scored), got {config.moe_input_jitter_eps}")
    if spec is not None:
        model_layers = moe_layer_numbers(config.moe_layer_freq, config.num_layers)
        if spec.num_hidden_layers != config.num_layers or spec.moe_layers != model_layers:
            raise ValueError(f"routing spec: expected the model's {config.num_layers} layers with MoE layers "
                             f"{model_layers}, got {spec.num_hidden_layers} layers with MoE layers {spec.moe_layers}")
        if spec.top_k != config.moe_router_topk:
            raise ValueError(f"routing spec: expected top_k={config.moe_router_topk} (moe_router_topk), "
                             f"got {spec.top_k}")
        if spec.num_experts != config.num_moe_experts:
            raise ValueError(f"routing spec: expected num_experts={config.num_moe_experts}, got {spec.num_experts}")


@dataclass
class _Router:
    router: TopKRouter
    layer_number: int  # 0-based global layer number
    record_index: int  # index into the routing's MoE-layer axis
    chunk: int
    recorded: list[Tensor]  # R2: [T_r, K] per micro-batch, in forward order
    mask: Tensor | None = None  # [T_r] bool, tokens counted by the agreement metric (current micro-batch)


class RoutingReplay:
    """Drives megatron's RouterReplay for one model (list of pipeline chunks) on this rank; see module doc."""

    def __init__(self, cfg: RoutingReplayConfig, model: Sequence[torch.nn.Module] | torch.nn.Module, *,
                 tp_size: int = 1, tp_rank: int = 0, spec: RoutingSpec | None = None):
        self.cfg = cfg
        chunks = list(model) if isinstance(model, (list, tuple)) else [model]
        config = _unwrap(chunks[0]).config
        validate_replay_setup(config, cfg.mode, spec, track_agreement=cfg.track_agreement)
        self.config = config
        self.tp_size, self.tp_rank = (tp_size, tp_rank) if config.sequence_parallel else (1, 0)
        self.top_k = config.moe_router_topk
        self.model_moe_layers = moe_layer_numbers(config.moe_layer_freq, config.num_layers) \
            if config.num_moe_experts else ()
        self.routers: list[_Router] = []
        for c, chunk in enumerate(chunks):
            layers = list(_unwrap(chunk).decoder.layers)
            numbers = [layer.layer_number - 1 for layer in layers]
            is_moe = [isinstance(getattr(layer.mlp, "router", None), TopKRouter) for layer in layers]
            indices = stage_moe_layer_indices(self.model_moe_layers, numbers, is_moe)
            moe = [layer for layer, m in zip(layers, is_moe, strict=True) if m]
            for layer, index in zip(moe, indices, strict=True):
                self.routers.append(_Router(layer.mlp.router, layer.layer_number - 1, index, c, []))
        self._pass: PassKind | None = None
        self._counts: dict[int, list[Tensor]] = {}
        self._handles = []
        if cfg.mode == "off":
            return
        mine = [r.router.router_replay for r in self.routers]
        if any(rr is None for rr in mine):
            raise ValueError("model: expected a RouterReplay on every TopKRouter (moe_enable_routing_replay=True)")
        # Instances of earlier models (a rollout copy, a rebuilt model) stay in megatron's class-level list
        # and break its global helpers: keep only this model's, in construction order.
        ids = {id(rr) for rr in mine}
        stale = [rr for rr in RouterReplay.global_router_replay_instances if id(rr) not in ids]
        if stale or len(RouterReplay.global_router_replay_instances) != len(mine):
            RouterReplay.clear_global_router_replay_instances()
            RouterReplay.global_router_replay_instances.extend(mine)
        for r in self.routers:
            self._handles.append(r.router.register_forward_pre_hook(self._make_pre_hook(r)))
            self._handles.append(r.router.register_forward_hook(self._make_post_hook(r)))

    # ------------------------------------------------------------------ passes

    @property
    def local_moe_layers(self) -> list[int]:
        """0-based global numbers of this rank's MoE layers, in build order (all chunks)."""
        return [r.layer_number for r in self.routers]

    def _action(self) -> RouterReplayAction | None:
        if self.cfg.mode == "off" or self._pass is None:
            return None
        if self.cfg.mode == "r2" and self._pass == "old_logp":
            return RouterReplayAction.RECORD
        return RouterReplayAction.REPLAY_FORWARD

    def begin_pass(self, kind: PassKind) -> None:
        """Start the old-log-prob ("old_logp", forward only) or the "update" pass of a step."""
        if kind not in ("old_logp", "update"):
            raise ValueError(f"kind: expected 'old_logp' or 'update', got {kind!r}")
        if self.cfg.mode == "r2" and kind == "update" and self.routers and not self.routers[0].recorded:
            raise ValueError("R2 update: expected an 'old_logp' pass that recorded routing first, got none")
        if self.cfg.mode == "r2" and kind == "old_logp":
            for r in self.routers:
                r.recorded = []
        self._pass = kind
        self._counts = {}
        self._clear_indices()

    def end_pass(self) -> dict[str, Metric]:
        """Finish the pass: clear every router's indices and FIFO, return the agreement metrics."""
        metrics = self.metrics()
        self._clear_indices()
        for r in self.routers:
            r.mask = None
            if r.router.router_replay is not None:
                r.router.router_replay.clear_router_replay_action()
        self._pass = None
        return metrics

    def _clear_indices(self) -> None:
        for r in self.routers:
            if r.router.router_replay is not None:
                r.router.router_replay.clear_indices()

    def close(self) -> None:
        """Remove the hooks and leave the routers routing live."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._clear_indices()
        for r in self.routers:
            if r.router.router_replay is not None:
                r.router.router_replay.clear_router_replay_action()

    # ------------------------------------------------------------------ data

    def data_iterator(self, micro_batches: Iterable, chunk: int = 0, start: int = 0) -> Iterator:
        """Yield the micro-batches (`RLMicroBatch`), setting this chunk's router targets as each is drawn.

        start: the position of the first of these micro-batches in the old-log-prob pass (R2 replays by
        position; an update on the mini-batch of micro-batches [start, start + n) passes `start`)."""
        routers = [r for r in self.routers if r.chunk == chunk]
        for k, mb in enumerate(micro_batches, start=start):
            if self._pass is not None and routers:
                self._prepare(routers, k, mb)
            yield mb

    def _prepare(self, routers: list[_Router], k: int, mb) -> None:
        mask = sequence_parallel_shard(router_order_mask(mb.loss_mask), self.tp_size, self.tp_rank).bool()
        mask = mask.to(routers[0].router.weight.device)
        action = self._action()
        if action is RouterReplayAction.REPLAY_FORWARD:
            if self.cfg.mode == "r3":
                routed = getattr(mb, "routed_experts", None)
                if routed is None:
                    raise ValueError("R3: expected RLMicroBatch.routed_experts (RLSample.routing on every sample), "
                                     "got None")
                # Whole records give [L_moe, T_local, K]; per-rank shards (routing.shards) only this rank's
                # MoE layers [L_stage, T_local, K], in model order.
                full, mine = len(self.model_moe_layers), len(self.routers)
                if routed.dim() != 3 or routed.shape[0] not in (full, mine) or routed.shape[2] != self.top_k:
                    raise ValueError(f"routed_experts: expected [L_moe={full} (whole records) or L_stage={mine} "
                                     f"(this rank's shard), T_local, K={self.top_k}], got shape {tuple(routed.shape)}")
                if routed.shape[0] == full:
                    indices = [r.record_index for r in routers]
                else:
                    stage = sorted(self.local_moe_layers)
                    indices = [stage.index(r.layer_number) for r in routers]
                device = routers[0].router.weight.device  # one host-to-device copy per layer, [T_r, K] int64
                targets = replay_tensors(routed, indices, self.tp_size, self.tp_rank, device=device)
            else:
                if any(k >= len(r.recorded) for r in routers):
                    raise ValueError(f"R2 update: micro-batch {k} has no recorded routing (the old-log-prob pass "
                                     f"recorded {len(routers[0].recorded)}); draw the same micro-batches")
                targets = [r.recorded[k] for r in routers]
            for r, target in zip(routers, targets, strict=True):
                if target.shape[0] != mask.shape[0]:
                    raise ValueError(f"layer {r.layer_number}: expected {mask.shape[0]} router tokens on this rank, "
                                     f"got {target.shape[0]} replayed rows")
                r.router.router_replay.set_target_indices(target)
        for r in routers:
            r.mask = mask

    # ------------------------------------------------------------------ hooks

    def _make_pre_hook(self, r: _Router):
        def pre_hook(module, args):
            if self._pass is None:
                return  # idle: leave the router to whoever drives it
            action = self._action()
            if action is RouterReplayAction.REPLAY_FORWARD and is_checkpointing() and torch.is_grad_enabled():
                action = RouterReplayAction.REPLAY_BACKWARD  # recompute inside the backward pass
            if action is None:
                module.router_replay.clear_router_replay_action()
            else:
                module.router_replay.set_router_replay_action(action)

        return pre_hook

    def _make_post_hook(self, r: _Router):
        def post_hook(module, args, output):
            if self._pass is None or (is_checkpointing() and torch.is_grad_enabled()):
                return  # idle, or a recompute (already counted / recorded in the first forward)
            rr = module.router_replay
            if rr.router_replay_action is RouterReplayAction.RECORD:
                r.recorded.append(rr.recorded_topk_idx.detach().clone())
            elif rr.router_replay_action is RouterReplayAction.REPLAY_FORWARD and self.cfg.track_agreement:
                with torch.no_grad():
                    overlap = replay_overlap(module, args[0], rr.target_topk_idx)
                    self._accumulate(r, overlap)

        return post_hook

    def _accumulate(self, r: _Router, overlap: Tensor) -> None:
        mask = r.mask if r.mask is not None else torch.ones_like(overlap, dtype=torch.bool)
        mask = mask.to(overlap.device)
        k = self.top_k
        sums = torch.stack([
            (overlap == k).logical_and(mask).sum().double(),
            torch.where(mask, overlap, 0).sum().double() / k,
            mask.sum().double(),
        ])
        prev = self._counts.get(r.layer_number)
        self._counts[r.layer_number] = sums if prev is None else prev + sums

    def metrics(self) -> dict[str, Metric]:
        """Agreement metrics of the current pass so far (see module doc); empty when not tracking."""
        if self.cfg.mode == "off" or not self.cfg.track_agreement or self._action() is not RouterReplayAction.REPLAY_FORWARD:
            return {}
        out: dict[str, Metric] = {}
        zero = torch.zeros(3, dtype=torch.float64)
        total = torch.zeros(3, dtype=torch.float64)
        for n in self.model_moe_layers:
            exact, overlap, count = self._counts.get(n, zero).cpu()
            out[f"routing/agree_exact/layer{n}"] = Metric(exact, Reduce.MEAN, count)
            out[f"routing/overlap/layer{n}"] = Metric(overlap, Reduce.MEAN, count)
            total = total + torch.stack([exact, overlap, count])
        out["routing/agree_exact"] = Metric(total[0], Reduce.MEAN, total[2])
        out["routing/overlap"] = Metric(total[1], Reduce.MEAN, total[2])
        return out


def live_routing_map(router: TopKRouter, hidden: Tensor) -> Tensor:
    """``[T_r, E]`` bool: the experts `router` picks for `hidden` ([s, b, h]) without replay (no grad)."""
    cfg = router.config
    logits = router.gating(hidden).view(-1, cfg.num_moe_experts)
    _, routing_map = topk_routing_with_score_function(
        logits, router.topk, use_pre_softmax=cfg.moe_router_pre_softmax, num_groups=cfg.moe_router_num_groups,
        group_topk=cfg.moe_router_group_topk, scaling_factor=cfg.moe_router_topk_scaling_factor,
        score_function=router.score_function, expert_bias=router.expert_bias, fused=False, router_replay=None,
    )
    return routing_map


def replay_overlap(router: TopKRouter, hidden: Tensor, replayed: Tensor) -> Tensor:
    """``[T_r]`` int: how many of each token's replayed ids ``[T_r, K]`` the live router would also pick."""
    live = live_routing_map(router, hidden)
    return live.gather(1, replayed.to(live.device)).sum(dim=1)


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while not hasattr(module, "decoder") and hasattr(module, "module"):
        module = module.module
    return module
