"""SGLang as the rollout engine: `client` (HTTP API), `weight_sync` (disk and streamed strategies),
`routed_experts` (the `return_routed_experts` payload decoder) and `engine` (the `RolloutEngine`)."""
