"""Build the rollout engine a config names. Adding an engine: one module with a builder
`build(cfg: RolloutConfig, ctx: EngineContext) -> RolloutEngine`, plus one line in `ENGINES` (or pass
`--rollout-engine my_pkg.my_engine:build`, loaded by import path)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from vespo_megatron.base.imports import load_object

from .engine import RolloutEngine
from .replica import Replica, ReplicaEngine

__all__ = ["EngineContext", "ENGINES", "build_engine"]


@dataclass(frozen=True)
class EngineContext:
    """What the trainer knows that an engine may need. moe_layers: 1-based numbers of the MoE layers;
    record_routing: the trainer replays the engine's routing (R3), so generations must carry it."""

    model: object
    groups: object
    replica: Replica
    vocab_size: int
    eos_id: int
    num_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    record_routing: bool
    out_dir: str


def _embedded(cfg, ctx: EngineContext) -> RolloutEngine:
    from .embedded import EmbeddedEngine

    return EmbeddedEngine(cfg.embedded, ctx.model, ctx.groups, vocab_size=ctx.vocab_size, eos_id=ctx.eos_id,
                          moe_layers=ctx.moe_layers, num_experts=ctx.num_experts,
                          record_routing=ctx.record_routing)


def _sglang(cfg, ctx: EngineContext) -> RolloutEngine:
    """The client lives on each replica's first rank (it generates) and on rank 0 (it sends weights)."""
    import torch.distributed as dist

    from vespo_megatron.routing import RoutingSpec

    from .sglang.client import SGLangClient, SGLangClientConfig
    from .sglang.engine import SGLangEngine
    from .sglang.weight_sync import make_weight_sync

    sc = cfg.sglang
    rank = dist.get_rank() if dist.is_initialized() else 0
    spec = None
    if ctx.record_routing:
        spec = RoutingSpec(num_hidden_layers=ctx.num_layers, moe_layers=ctx.moe_layers, top_k=ctx.top_k,
                           num_experts=ctx.num_experts)
    client = None
    if ctx.replica.is_source or rank == 0:
        client = SGLangClient(SGLangClientConfig(
            base_url=sc.url, timeout_s=sc.timeout_s, max_retries=sc.max_retries, backoff_s=sc.backoff_s,
            max_backoff_s=sc.max_backoff_s, max_concurrency=sc.max_concurrency,
            update_timeout_s=sc.update_timeout_s, routing_spec=spec))
        if ctx.replica.is_source:
            client.wait_for_server(sc.wait_for_server_s)  # a server still starting up is waited for
            client.check_server()
    sync = make_weight_sync(sc.weight_sync, client if rank == 0 else None,
                            root=os.path.join(ctx.out_dir, "weights"))
    plan = None
    if ctx.record_routing:  # each rank receives only the routing it replays (routing.shards)
        from vespo_megatron.routing.shards import RankPlan, pad_multiple_for, rank_moe_layers

        g = ctx.groups
        model = ctx.model[0] if isinstance(ctx.model, (list, tuple)) else ctx.model
        while not hasattr(model, "decoder") and hasattr(model, "module"):  # DDP / Float16Module wrappers
            model = model.module
        sp = bool(model.config.sequence_parallel)  # the batcher's pad multiple: 2*cp, times tp with SP
        plan = RankPlan(moe_layers=rank_moe_layers(ctx.model), cp_size=g.cp_size, cp_rank=g.cp_rank,
                        pad_multiple=pad_multiple_for(g.cp_size, g.tp_size, sp))
    return ReplicaEngine(SGLangEngine(client, sync, sender=rank == 0, wait_for_server_s=sc.wait_for_server_s),
                         ctx.replica, plan=plan)


ENGINES: dict[str, Callable[..., RolloutEngine]] = {
    "embedded": _embedded,
    "sglang": _sglang,
}


def build_engine(cfg, ctx: EngineContext) -> RolloutEngine:
    """`cfg.engine` is a name in ENGINES or an import path 'module:builder'."""
    builder = ENGINES.get(cfg.engine) or load_object(cfg.engine, what="RolloutConfig.engine",
                                                     known=sorted(ENGINES))
    return builder(cfg, ctx)
