"""Define `te_general_gemm` in megatron-core's MoE utilities when transformer-engine is absent.

Upstream: megatron-core 0.16.x (seen on 0.16.1). `megatron/core/transformer/moe/moe_utils.py` imports
`te_general_gemm` only inside `try: import transformer_engine`, but `router_gating_linear` reads the name
unconditionally (`if te_general_gemm is not None ...`). Without transformer-engine the first MoE forward
fails with `NameError: name 'te_general_gemm' is not defined`, on CPU and GPU alike. Defining the module
attribute as `None` selects the plain torch path the function already has.

Applies only where the attribute is missing (transformer-engine installed, or a fixed upstream: no-op).
"""

from __future__ import annotations

import importlib

TARGET = "megatron-core"
TARGET_VERSIONS = ">=0.16.1,<0.17"  # the versions where the bug was seen; harmless on others
MODULE = "megatron.core.transformer.moe.moe_utils"
ATTRIBUTE = "te_general_gemm"


def needed() -> bool:
    """Whether the MoE utilities module lacks the attribute (so the first MoE forward would fail)."""
    try:
        module = importlib.import_module(MODULE)
    except ImportError:
        return False
    return not hasattr(module, ATTRIBUTE)


def apply() -> bool:
    """Define the missing attribute as None. Idempotent; returns whether anything was changed."""
    if not needed():
        return False
    module = importlib.import_module(MODULE)
    setattr(module, ATTRIBUTE, None)
    return True
