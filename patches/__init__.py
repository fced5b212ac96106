"""Small, explicit fixes for upstream packages, one module per fix.

Each module names the upstream package and the versions it targets, applies itself only where needed and
is idempotent. `apply_all()` applies every fix whose target is installed. See patches/README.md.
"""

from __future__ import annotations


def apply_all() -> dict[str, bool]:
    """Apply every fix; returns {fix name: whether it changed anything}."""
    from . import local_multi_tensor, te_general_gemm, thd_rope

    return {"te_general_gemm": te_general_gemm.apply(), "thd_rope": thd_rope.apply(),
            "local_multi_tensor": local_multi_tensor.apply()}
