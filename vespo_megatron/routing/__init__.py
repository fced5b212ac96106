"""MoE routing replay (R3) inputs: SGLang's routed-experts payloads decoded into compact per-sample records."""

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
    "routing_from_meta_info",
    "strided_fill",
]
