"""Third-party warnings every start prints and nobody can act on, filtered once, at start.

megatron-core warns at import time (per rank) that Transformer Engine / Apex are not installed and that it
falls back to its local or torch implementations, which is the intended set-up on CPU and without Apex,
about its own deprecated import paths, and, when the model is built, about its own default cuda-graph scope. Each filter below matches one exact known message, from
megatron-core only, so any other warning (ours, torch's, a new megatron one) still shows.
"""

from __future__ import annotations

import warnings

__all__ = ["KNOWN_WARNINGS", "filter_known_warnings"]

# (category, regex matched against the start of the message)
KNOWN_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # "Apex is not installed. Falling back to Torch Norm" (gpt_layer_specs, backends)
    (UserWarning, r"Apex is not installed\. Falling back to Torch Norm"),
    # "Transformer Engine and Apex are not installed. Falling back to Torch optimizers." / "... to local
    # implementations of multi_tensor_applier ..." (optimizer, clip_grads, megatron_fsdp)
    (UserWarning, r"Transformer Engine and Apex are not installed\. Falling back to "),
    # TransformerConfig's own default cuda_graph_scope="full" warns about itself on every model build
    (UserWarning, r"full scope is deprecated\. Use empty cuda_graph_scope to capture the whole layer"),
    # megatron-core's own deprecated module paths, imported by megatron-core itself
    (DeprecationWarning, r"The 'megatron\.core\.transformer\.custom_layers\.transformer_engine'\s+module is deprecated"),
    (DeprecationWarning, r"The following imports from `dynamic_context\.py` will be removed"),
)


def filter_known_warnings() -> None:
    """Install the filters (idempotent: `warnings.filterwarnings` does not duplicate an identical filter)."""
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=r"megatron\.")
