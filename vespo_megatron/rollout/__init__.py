"""The rollout wing: the engine protocol (`engine`), the embedded engine (`embedded`), SGLang (`sglang/`:
HTTP client, weight-sync strategies, routed-experts decoder), one-rank-per-replica engines (`replica`),
the policy view engines read (`weights`) and the engine factory (`factory`).

Imports go one way: training -> rollout -> {hf, routing, parallel, megatron}; nothing here imports training.
"""

from .engine import EngineError, Generation, GenerationRequest, PolicyWeights, RolloutEngine, SampleError

__all__ = ["EngineError", "Generation", "GenerationRequest", "PolicyWeights", "RolloutEngine", "SampleError"]
