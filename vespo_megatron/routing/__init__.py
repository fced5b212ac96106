"""MoE routing replay (R3) inputs: compact per-sample routing records (SGLang's payloads are decoded into
them by `vespo_megatron.rollout.sglang.routed_experts`) and their per-rank alignment for megatron's RouterReplay. The megatron-side controller lives in
`vespo_megatron.routing.replay` (imported on its own: it needs megatron-core)."""

from vespo_megatron.routing.alignment import (
    global_routing_padded,
    global_routing_thd,
    local_routing,
    moe_layer_numbers,
    replay_tensors,
    router_order_mask,
    sample_routing,
    sequence_parallel_shard,
    stage_moe_layer_indices,
)
from vespo_megatron.routing.record import MAX_EXPERTS, RoutingRecord, RoutingSpec, compact_dtype, strided_fill

__all__ = [
    "MAX_EXPERTS",
    "RoutingRecord",
    "RoutingSpec",
    "compact_dtype",
    "global_routing_padded",
    "global_routing_thd",
    "local_routing",
    "moe_layer_numbers",
    "replay_tensors",
    "router_order_mask",
    "sample_routing",
    "sequence_parallel_shard",
    "stage_moe_layer_indices",
    "strided_fill",
]
