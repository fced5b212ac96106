"""MoE routing replay (R3) inputs: SGLang's routed-experts payloads decoded into compact per-sample records,
and their per-rank alignment for megatron's RouterReplay. The megatron-side controller lives in
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
from vespo_megatron.routing.sglang_payload import (
    WIRE_DTYPES,
    RoutingPayloadError,
    b64_backend,
    decode_routed_experts,
    routing_from_meta_info,
)

__all__ = [
    "MAX_EXPERTS",
    "WIRE_DTYPES",
    "RoutingPayloadError",
    "RoutingRecord",
    "RoutingSpec",
    "b64_backend",
    "compact_dtype",
    "decode_routed_experts",
    "global_routing_padded",
    "global_routing_thd",
    "local_routing",
    "moe_layer_numbers",
    "replay_tensors",
    "router_order_mask",
    "routing_from_meta_info",
    "sample_routing",
    "sequence_parallel_shard",
    "stage_moe_layer_indices",
    "strided_fill",
]
